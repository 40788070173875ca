"""vhost-user-trace's device feature bit names against the kernel's own: every
VIRTIO_<TYPE>_F_<NAME> that /usr/include/linux (linux-libc-dev) defines for a device type
the tracer knows is in its table, as <TYPE>_<NAME>, at the same bit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vhostuser.protocol.constants import LOG_ALL, VirtioFeature
from vhostuser.trace.describe import feature_names
from vhostuser.trace.device_bits import DEVICE_BITS

HEADERS = Path("/usr/include/linux")
DEFINE = re.compile(r"^#define\s+VIRTIO_([A-Z0-9]+)_F_([A-Z0-9_]+)\s+(\d+)\b", re.M)


def kernel_bits() -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for header in HEADERS.glob("virtio_*.h"):
        for kind, name, bit in DEFINE.findall(header.read_text(errors="replace")):
            if kind.lower() in DEVICE_BITS:
                out.setdefault(kind.lower(), {})[int(bit)] = f"{kind}_{name}"
    return out


def test_the_names_are_the_kernels() -> None:
    found = kernel_bits()
    if not found:
        pytest.skip(f"no virtio headers in {HEADERS} (linux-libc-dev)")
    checked = 0
    for kind, bits in found.items():
        for bit, name in bits.items():
            assert DEVICE_BITS[kind].get(bit) == name, (kind, bit, name)
            checked += 1
    assert {"blk", "net", "scsi"} <= set(found) and checked >= 40, found


def test_a_feature_word_by_name() -> None:
    value = (1 << 9) | (1 << 13) | LOG_ALL | VirtioFeature.VERSION_1 | (1 << 49)
    assert feature_names(value, VirtioFeature, DEVICE_BITS["blk"]) == [
        "BLK_FLUSH", "BLK_DISCARD", "LOG_ALL", "VERSION_1", "bit 49"]
    assert feature_names(1 << 9, VirtioFeature) == ["bit 9"]  # no type given: unnamed
