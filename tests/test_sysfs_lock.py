"""A back-end driving the virtio-vhost-user device through sysfs (in the appliance VM)
holds an exclusive lock on the PCI function for as long as any of its processes lives, its
forked queue workers included; a restarted back-end waits for the old one's processes to be
gone before it touches the device (resetting it ends the consumer's session). Here on a
directory laid out as sysfs lays out a PCI function (flock is the VFS's, the same on sysfs
as on any file system); the appliance-VM tests take the same path on the real bus."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from vhostuser.appliance.sysfs_pci import SysfsPciError, SysfsPciFunction

BDF = "0000:00:04.0"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    dev = tmp_path / BDF
    dev.mkdir()
    (dev / "config").write_bytes(bytes(256))
    (dev / "enable").write_text("0")
    return tmp_path


def test_a_second_backend_waits_for_every_process_of_the_first(root: Path) -> None:
    first = SysfsPciFunction(BDF, root)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a queue worker of the first back-end: it holds the lock by inheritance
        os.close(r)
        os.write(w, b"x")
        time.sleep(60)
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        first.close()  # the main process lets go: its worker still holds the device
        t0 = time.monotonic()
        with pytest.raises(SysfsPciError, match="in use by another back-end"):
            SysfsPciFunction(BDF, root, lock_wait=0.3)
        assert time.monotonic() - t0 >= 0.3
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        second = SysfsPciFunction(BDF, root, lock_wait=5)  # free once the worker is gone
        second.close()
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert (root / BDF / "enable").read_text() == "1"


def test_a_waiting_backend_starts_as_soon_as_the_old_one_is_gone(root: Path) -> None:
    first = SysfsPciFunction(BDF, root)
    pid = os.fork()
    if pid == 0:  # the old back-end: lets go after a while (exits)
        time.sleep(0.2)
        os._exit(0)
    first.close()  # only the child holds the lock now
    t0 = time.monotonic()
    second = SysfsPciFunction(BDF, root, lock_wait=10)
    took = time.monotonic() - t0
    os.waitpid(pid, 0)
    second.close()
    assert took < 5, took


def test_a_failed_set_up_releases_the_lock(root: Path) -> None:
    (root / BDF / "enable").unlink()
    (root / BDF / "enable").mkdir()  # writing it fails
    with pytest.raises(OSError):
        SysfsPciFunction(BDF, root)
    (root / BDF / "enable").rmdir()
    (root / BDF / "enable").write_text("0")
    SysfsPciFunction(BDF, root, lock_wait=0).close()  # not held by the failed attempt
