"""Virtqueues in guest memory: the split ring (device side), tear-free index access, iovecs.

Ring fields are little-endian (virtio 1.x); the accessors here read and write them as
native integers, which is only right on a little-endian host, so this package refuses to
load anywhere else rather than corrupt rings.
"""

import sys

if sys.byteorder != "little":
    raise ImportError("vhostuser.virtq accesses little-endian virtio rings as native integers:"
                      " a big-endian host is not supported")
