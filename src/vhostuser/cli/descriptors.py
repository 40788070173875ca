"""vhost-user-descriptors: write the vhost-user.json descriptors of this installation's
back-ends (QEMU's docs/interop/vhost-user.json: how management software such as libvirt
finds a back-end for a device type), with the absolute paths of the programs as installed
here. The package ships the same files for the usual install prefix (/usr/local) in
share/qemu/vhost-user/."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

# program -> (vhost-user.json type, description)
BACKENDS = {
    "vhost-user-blk": ("block", "Python vhost-user-blk: virtio-blk from a raw image"),
    "vhost-user-fs": ("fs", "Python vhost-user-fs: virtio-fs, a host directory over FUSE"),
    "vhost-user-input": ("input", "Python vhost-user-input: evdev passthrough or virtual"),
    "vhost-user-net": ("net", "Python vhost-user-net: a virtio-net port, TAP uplink"),
    "vhost-user-rng": ("rng", "Python vhost-user-rng: virtio-rng from an entropy source"),
    "vhost-user-scsi": ("scsi", "Python vhost-user-scsi: a virtio-scsi target over images"),
    "vhost-user-vsock": ("vsock", "Python vhost-user-vsock: AF_VSOCK to UNIX sockets"),
}


def descriptor(program: str, binary: str) -> dict[str, object]:
    kind, description = BACKENDS[program]
    return {"description": description, "type": kind, "binary": binary}


def file_name(program: str) -> str:
    return f"50-python-{program}.json"


def installed(program: str) -> str | None:
    """The program's absolute path in this installation (beside this Python first)."""
    beside = Path(sys.executable).parent / program
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(program)
    return os.path.abspath(found) if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vhost-user-descriptors", description=__doc__)
    ap.add_argument("--dir", default=os.path.expanduser("~/.config/qemu/vhost-user"),
                    help="where to write them (default ~/.config/qemu/vhost-user; "
                         "/etc/qemu/vhost-user for the whole machine)")
    args = ap.parse_args(argv)
    out = Path(args.dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for program in BACKENDS:
            binary = installed(program)
            if binary is None:
                print(f"warning: {program} is not installed here; skipped", file=sys.stderr)
                continue
            path = out / file_name(program)
            path.write_text(json.dumps(descriptor(program, binary), indent=2) + "\n")
            print(path)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
