"""vhost-user-rng with a QEMU guest: the guest's hwrng is the virtio one and what it reads
from /dev/hwrng comes from our source. The source is a file of known random bytes, so the
guest's bytes must be a contiguous run of it (the hwrng core's fill thread is off:
rng_core.default_quality=0, so nothing else reads in between)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qemu_helpers import BackendDaemon, require_guest_prerequisites, watchdog

from testbed.guest import GuestVM

SCRIPT = """
echo "CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
echo "HEX $(head -c 4096 /dev/hwrng | od -An -tx1 -v | tr -d ' \\n')"
"""


@pytest.fixture(scope="module", autouse=True)
def kver() -> str:
    return require_guest_prerequisites()


def rng_qemu_args(sock: Path) -> list[str]:
    return ["-chardev", f"socket,id=c0,path={sock}", "-device", "vhost-user-rng-pci,chardev=c0"]


def test_guest_reads_our_source_through_hwrng(tmp_path: Path) -> None:
    source = os.urandom(1 << 20)
    (tmp_path / "source").write_bytes(source)
    with BackendDaemon(tmp_path, "vhost-user-rng", ["--source", str(tmp_path / "source")],
                       name="rng") as d:
        vm = GuestVM(SCRIPT, modules=["virtio_pci", "virtio_rng"], timeout=60,
                     qemu_args=rng_qemu_args(d.sock), append="rng_core.default_quality=0")
        with vm, watchdog(d, vm):
            result = vm.run()
        assert result.status == 0, f"{result.console}\n{d.describe()}"
        lines = dict(line.split(" ", 1) for line in result.lines if " " in line)
        assert lines.get("CURRENT") == "virtio_rng.0", result.console
        got = bytes.fromhex(lines["HEX"])
        assert len(got) == 4096, result.console
        assert got in source, "the guest read bytes that are not a run of our source"
        assert d.stop() == 0, d.describe()
        assert "Traceback" not in d.log, d.describe()
