from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# The project's programs (vhost-user-switch, ...) are looked up in PATH by some tests: take
# them from this interpreter's environment (the checkout's .venv), never from another install.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

from daemon import Daemon

from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.kernel_walk import cache_dir

# test modules import kernel modules (numba) directly: their cache goes where the daemons'
# does, not into the source tree
os.environ.setdefault("NUMBA_CACHE_DIR", cache_dir())

IMAGE_MB = 16

# Each test module's markers (pyproject.toml lists them): `pytest -m unit` runs the
# in-process part alone, `-m "not guest"` leaves out the VMs. A new module must be listed.
MODULE_MARKERS = {
    "test_atomic": ["unit"],
    "test_ratelog": ["unit"],
    "test_codec": ["unit"],
    "test_engine_parallel": ["unit"],
    "test_sockets": ["unit"],
    "test_exit_status": ["unit"],
    "test_bridge_kicks": ["unit"],
    "test_bridge_hostile": ["daemon"],
    "test_check": ["daemon"],
    "test_check_net": ["daemon", "dpdk"],
    "test_check_fs": ["daemon"],
    "test_check_scsi": ["daemon"],
    "test_split_ring": ["unit"],
    "test_packed_ring": ["unit"],
    "test_inflight_packed": ["unit"],
    "test_packed_daemon": ["daemon"],
    "test_inflight": ["unit"],
    "test_inflight_daemon": ["daemon"],
    "test_dirty_log": ["daemon"],
    "test_dirtylog": ["unit"],
    "test_qemu_migrate": ["guest"],
    "test_qemu_net_migrate": ["guest"],
    "test_sysfs_lock": ["unit"],
    "test_vfio_user_protocol": ["unit"],
    "test_vvu_pci": ["unit"],
    "test_vvu_relay": ["unit"],
    "test_blk_backend": ["daemon"],
    "test_hostile_peers": ["daemon"],
    "test_malformed": ["daemon"],
    "test_switch": ["daemon"],
    "test_vvu_device": ["daemon"],
    "test_vvu_intx": ["daemon"],
    "test_worker_lifetime": ["daemon"],
    "test_worker_fds": ["daemon"],
    "test_rng": ["daemon"],
    "test_input": ["daemon"],
    "test_vsock": ["daemon"],
    "test_scsi": ["daemon"],
    "test_device_fuzz": ["daemon"],
    "test_fs": ["daemon"],
    "test_blk_kill": ["guest"],
    "test_qemu_blk": ["guest"],
    "test_qemu_net": ["guest"],
    "test_qemu_net_offload": ["guest"],
    "test_net_offload": ["unit"],
    "test_qemu_rng": ["guest"],
    "test_qemu_fs": ["guest"],
    "test_qemu_fs_migrate": ["guest"],
    "test_fs_restart": ["daemon"],
    "test_fs_migrate": ["daemon"],
    "test_layering": ["unit"],
    "test_split_kernel": ["unit"],
    "test_packed_kernel": ["unit"],
    "test_blk_kernel": ["unit"],
    "test_net_kernel": ["unit"],
    "test_fs_threads": ["daemon"],
    "test_net_tap": ["daemon"],
    "test_fuse_tables": ["unit"],
    "test_descriptors": ["daemon"],
    "test_trace": ["guest"],
    "test_scsi_hotplug": ["daemon"],
    "test_trace_proxy": ["daemon"],
    "test_trace_names": ["unit"],
    "test_qemu_input": ["guest"],
    "test_qemu_vsock": ["guest"],
    "test_qemu_scsi": ["guest"],
    "test_qemu_vvu": ["guest"],
    "test_vvu_bridge": ["guest"],
    "test_vvu_bridge_dpdk": ["guest", "dpdk"],
    "test_vm_harness": ["guest"],
    "test_vvu_appliance_vm": ["guest", "appliance"],
    "test_vvu_qemu": ["guest", "appliance"],
    "test_dpdk_harness": ["dpdk"],
    "test_switch_dpdk": ["dpdk"],
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__ if item.module is not None else ""  # type: ignore[attr-defined]
        names = MODULE_MARKERS.get(module)
        if names is None:
            raise pytest.UsageError(f"{module}: list it in MODULE_MARKERS (tests/conftest.py)")
        for name in names:
            item.add_marker(name)


# every compiled kernel, loaded the way a daemon loads them (VHOSTUSER_JIT=1)
_WARM = """
from vhostuser.devices import blk_kernel, net_kernel
from vhostuser.switch import pair, route
from vhostuser.virtq import kernel_walk
kernel_walk.warm()
assert (blk_kernel.available() and net_kernel.available() and route.available()
        and pair.available())
"""


@pytest.fixture(scope="session", autouse=True)
def _kernels_compiled() -> None:
    """Compile the numba kernels into numba's cache once, in a process of their own,
    before any test starts a daemon with VHOSTUSER_JIT=1: a daemon's first start on a
    machine compiles them (15-25 s here), which a test's wait for the daemon's socket is
    not there to measure; later starts load them from the cache."""
    subprocess.run([sys.executable, "-c", _WARM], env={**os.environ, "VHOSTUSER_JIT": "1"},
                   check=True, timeout=900)


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    """1 MiB of guest RAM at guest address 0x10000 (ring tests: driver and device side)."""
    yield GuestRam(1 << 20, guest_addr=0x10000)  # freed with the views tests keep of it


@pytest.fixture
def mem(ram: GuestRam) -> Iterator[GuestMemory]:
    """The engine's view of `ram`: one region, mapped as a back-end maps it."""
    m = GuestMemory()
    m.add(ram.region(), mmap_region(ram.region(), ram.fd))
    yield m
    m.clear()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 16 MiB raw image with a recognisable pattern in every sector."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        for s in range(IMAGE_MB * 2048):
            f.write(s.to_bytes(4, "little") * 128)
    return path


@pytest.fixture
def blk_daemon(tmp_path: Path, image: Path) -> Iterator[Callable[..., Daemon]]:
    """Start `vhost-user-blk` on `image` with extra args; each is stopped (SIGTERM) and
    must exit 0 with no worker left behind."""
    started: list[Daemon] = []

    def start(*extra: str, img: Path = image) -> Daemon:
        sock = tmp_path / f"blk{len(started)}.sock"
        d = Daemon(["vhostuser.cli.blk", "--socket-path", str(sock), "--blk-file", str(img),
                    *extra], sock, tmp_path / f"blk{len(started)}.log")
        started.append(d)
        return d

    yield start
    for d in started:
        pid, kids = d.proc.pid, d.children()
        rc = d.stop()
        assert rc == 0, f"back-end exited {rc}:\n{d.log()}"
        assert "Traceback" not in d.log(), d.log()
        assert not os.path.exists(f"/proc/{pid}"), "back-end process left behind"
        deadline = time.monotonic() + 5
        while any(os.path.exists(f"/proc/{k}") for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [k for k in kids if os.path.exists(f"/proc/{k}")], "worker left behind"
