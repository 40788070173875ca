"""vhost-user-vsock with a QEMU 7.2 guest (Linux's virtio-vsock driver, AF_VSOCK sockets
used by the host's Python over 9p: tests/vsock_guest.py): a host program connects to the
guest (CONNECT 5000) and 16 MiB go each way, checked by sha256 on both sides; then the guest
opens 32 streams to the host at once, each echoed back whole."""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import sys
import threading
from pathlib import Path

import pytest
from qemu_helpers import BackendDaemon, require_guest_prerequisites, watchdog

from testbed.guest import GuestVM

MODULES = ["virtio_pci", "9pnet_virtio", "9p", "vmw_vsock_virtio_transport"]
SCRIPT = r"""
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs dev /host/dev
mount -t tmpfs run /host/run
TMPDIR=/run chroot /host @PYTHON@ @GUEST@
"""
SIZE = 16 << 20


@pytest.fixture(scope="module", autouse=True)
def kver() -> str:
    return require_guest_prerequisites()


def echo_server(lst: socket.socket, count: int, errors: list[str]) -> None:
    """The host's port 6000: echo each stream back whole."""
    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while chunk := conn.recv(1 << 20):
                data += chunk
            conn.sendall(data)

    threads = []
    try:
        for _ in range(count):
            conn, _ = lst.accept()
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            t.start()
            threads.append(t)
    except OSError as e:
        errors.append(str(e))
    for t in threads:
        t.join(60)


def test_guest_streams_both_ways(tmp_path: Path) -> None:
    uds = str(tmp_path / "vm.vsock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_6000")
    lst.listen(64)
    lst.settimeout(120)
    errors: list[str] = []
    server = threading.Thread(target=echo_server, args=(lst, 32, errors), daemon=True)
    server.start()
    script = (SCRIPT.replace("@PYTHON@", shlex.quote(sys.executable))
              .replace("@GUEST@", shlex.quote(str(Path(__file__).with_name("vsock_guest.py")))))
    data = os.urandom(SIZE)
    with BackendDaemon(tmp_path, "vhost-user-vsock", ["--guest-cid", "3", "--uds-path", uds],
                       name="vsock") as d:
        vm = GuestVM(script, modules=MODULES, timeout=300, mem_mb=384, qemu_args=[
            "-cpu", "max",
            "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on",
            "-chardev", f"socket,id=c0,path={d.sock}",
            "-device", "vhost-user-vsock-pci,chardev=c0"])
        with vm, watchdog(d, vm):
            vm.start()
            vm.wait_for("READY", 120)
            host = socket.socket(socket.AF_UNIX)
            host.settimeout(120)
            host.connect(uds)
            host.sendall(b"CONNECT 5000\n")
            line = b""
            while not line.endswith(b"\n"):
                line += host.recv(1)
            assert line.startswith(b"OK "), line

            def send() -> None:
                host.sendall(data)
                host.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            back = bytearray()
            while len(back) < SIZE and (chunk := host.recv(1 << 20)):
                back += chunk
            sender.join(60)
            host.close()
            result = vm.wait()
        server.join(60)
        lst.close()
        assert result.status == 0, f"{result.console[-3000:]}\n{d.describe()}"
        out = dict(line.split(" ", 1) for line in result.lines if " " in line)
        assert out["ECHOED"].split() == [str(SIZE), hashlib.sha256(data).hexdigest()]
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
        assert out["STREAMS"] == "32 ok" and not errors, (out, errors)
        assert d.stop() == 0, d.describe()
        assert "Traceback" not in d.log, d.describe()


def test_a_stream_goes_on_across_a_vm_pause(tmp_path: Path) -> None:
    """QMP stop/cont while a host program and the guest stream: QEMU stops the rx/tx
    queues and starts them again; the stream goes on in the next worker, nothing lost."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    from qemu_helpers import wait_until

    uds, qmp_path = str(tmp_path / "vm.vsock"), tmp_path / "qmp.sock"
    script = (SCRIPT.replace("@PYTHON@", shlex.quote(sys.executable))
              .replace("@GUEST@", shlex.quote(str(Path(__file__).with_name("vsock_guest.py")))
                       + " 0"))
    first, second = os.urandom(1 << 20), os.urandom(1 << 20)
    with BackendDaemon(tmp_path, "vhost-user-vsock", ["--guest-cid", "3", "--uds-path", uds],
                       name="vsock") as d:
        vm = GuestVM(script, modules=MODULES, timeout=300, mem_mb=384, qemu_args=[
            "-cpu", "max", "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on",
            "-chardev", f"socket,id=c0,path={d.sock}",
            "-device", "vhost-user-vsock-pci,chardev=c0"])
        with vm, watchdog(d, vm):
            vm.start()
            vm.wait_for("READY", 120)
            host = socket.socket(socket.AF_UNIX)
            host.settimeout(120)
            host.connect(uds)
            host.sendall(b"CONNECT 5000\n")
            line = b""
            while not line.endswith(b"\n"):
                line += host.recv(1)
            assert line.startswith(b"OK "), line

            def echo(data: bytes) -> bytes:
                sender = threading.Thread(target=host.sendall, args=(data,), daemon=True)
                sender.start()
                back = bytearray()
                while len(back) < len(data) and (chunk := host.recv(1 << 20)):
                    back += chunk
                sender.join(60)
                return bytes(back)

            assert echo(first) == first
            before = d.workers()
            qmp = QEMUMonitorProtocol(str(qmp_path))
            qmp.connect()
            try:
                qmp.cmd("stop")
                assert wait_until(lambda: len(d.workers()) < len(before), 10), \
                    "the rx/tx queues did not stop"
                qmp.cmd("cont")
                assert wait_until(lambda: len(d.workers()) == len(before), 10)
            finally:
                qmp.close()
            assert d.workers() != before
            assert echo(second) == second, "the stream did not survive the pause"
            host.shutdown(socket.SHUT_WR)
            assert host.recv(100) == b""
            host.close()
            result = vm.wait()
        assert result.status == 0, f"{result.console[-3000:]}\n{d.describe()}"
        out = dict(line.split(" ", 1) for line in result.lines if " " in line)
        assert out["ECHOED"].split() == [str(2 << 20),
                                         hashlib.sha256(first + second).hexdigest()]
        assert d.stop() == 0, d.describe()
        assert "Traceback" not in d.log, d.describe()
