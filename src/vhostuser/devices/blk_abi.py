"""The virtio-blk ABI (virtio 1.x §5.2), as the device (blk.py, its kernels) and the
driver (frontend/blk.py) both use it: feature bits, request types and status codes, the
request header and the discard/write-zeroes segment."""

from __future__ import annotations

import struct

SECTOR = 512

# Feature bits
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_CONFIG_WCE = 1 << 11
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

# Request types and status codes
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
T_BARRIER = 0x80000000  # legacy bit, masked as SPDK and QEMU's contrib back-end do
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20
SEG_F_UNMAP = 1

REQ_HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
SEGMENT = struct.Struct("<QII")  # discard/write-zeroes: sector, num_sectors, flags
