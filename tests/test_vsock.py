"""vhost-user-vsock driven by the Python front-end playing the guest (CID 3) and real host
programs (UNIX sockets): connections both ways in the hybrid convention, data both ways,
half and full close, refused connections, the guest's credit honoured (the client asserts
it), our credit enforced, a host program that stops reading stalls only its stream, bad
CONNECT lines, many streams at once. The Linux guest's view is in test_qemu_vsock.py.

Numbers are the virtio spec's: ops REQUEST 1, RESPONSE 2, RST 3, SHUTDOWN 4, RW 5,
CREDIT_UPDATE 6, CREDIT_REQUEST 7; SHUTDOWN flags RCV 1, SEND 2; the host is CID 2."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.vsock import Packet, VsockClient
from vhostuser.protocol import ProtocolFeature, VirtioFeature

REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
RCV, SEND = 1, 2
CID = 3
FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX | VirtioFeature.PROTOCOL_FEATURES


class Session:
    def __init__(self, tmp_path: Path, buf_alloc: int = 64 << 10) -> None:
        self.uds = str(tmp_path / "vm.vsock")
        sock = tmp_path / "vsock.sock"
        self.d = Daemon(["vhostuser.cli.vsock", "--socket-path", str(sock), "--guest-cid",
                         str(CID), "--uds-path", self.uds], sock, tmp_path / "vsock.log")
        self.fe = Frontend(self.d.sock)
        self.fe.negotiate(FEATURES, ProtocolFeature.CONFIG | ProtocolFeature.REPLY_ACK)
        assert struct.unpack("<Q", self.fe.get_config(8)) == (CID,)
        self.fe.set_mem_table()
        self.fe.setup_queue(0, 128)  # 48 rx buffers of 2 descriptors (header, data)
        self.fe.setup_queue(1, 64)
        self.g = VsockClient(self.fe, CID, rx_buffers=48, buf_alloc=buf_alloc)

    def listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.bind(f"{self.uds}_{port}")
        s.listen()
        s.settimeout(10)
        return s

    def host_connect(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(self.uds)
        s.sendall(f"CONNECT {port}\n".encode())
        return s

    def host_connect_no_line(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(self.uds)
        return s

    def close(self) -> None:
        self.fe.close()
        assert self.d.stop() == 0, self.d.log()
        assert "Traceback" not in self.d.log(), self.d.log()


@pytest.fixture
def vs(tmp_path: Path) -> Iterator[Session]:
    s = Session(tmp_path)
    yield s
    s.close()


def is_pkt(p: Packet, op: int, src: int, dst: int) -> bool:
    return (p.op, p.src_cid, p.dst_cid, p.src_port, p.dst_port) == (op, 2, CID, src, dst)


def recv_data(g: VsockClient, port: int, host_port: int, n: int) -> bytes:
    """RW payload for our `port` until `n` bytes came, consuming (crediting) as it goes."""
    out = b""
    while len(out) < n:
        (p,) = g.recv()
        assert is_pkt(p, RW, host_port, port), p
        out += p.data
        g.consume(port, host_port, len(p.data))
    return out


def test_guest_connects_to_a_host_program(vs: Session) -> None:
    lst = vs.listen(1234)
    vs.g.send(5000, 1234, REQUEST)
    (p,) = vs.g.recv()
    assert is_pkt(p, RESPONSE, 1234, 5000) and p.buf_alloc > 0
    host, _ = lst.accept()
    host.settimeout(10)
    vs.g.send(5000, 1234, RW, b"hello host")
    assert host.recv(100) == b"hello host"
    host.sendall(b"hello guest")
    assert recv_data(vs.g, 5000, 1234, 11) == b"hello guest"
    host.shutdown(socket.SHUT_WR)  # the host is done sending: SHUTDOWN SEND to the guest
    (p,) = vs.g.recv()
    assert is_pkt(p, SHUTDOWN, 1234, 5000) and p.flags == SEND
    vs.g.send(5000, 1234, RW, b"still fine")  # the other way still works
    assert host.recv(100) == b"still fine"
    vs.g.send(5000, 1234, SHUTDOWN, flags=RCV | SEND)  # the guest closes: RST answers
    (p,) = vs.g.recv()
    assert is_pkt(p, RST, 1234, 5000)
    assert host.recv(100) == b""  # and the host program sees EOF


def test_host_program_connects_to_the_guest(vs: Session) -> None:
    host = vs.host_connect(7000)
    (p,) = vs.g.recv()
    assert p.op == REQUEST and (p.src_cid, p.dst_cid, p.dst_port) == (2, CID, 7000)
    local = p.src_port
    vs.g.send(7000, local, RESPONSE)
    assert host.recv(100) == f"OK {local}\n".encode()
    host.sendall(b"ping")
    assert recv_data(vs.g, 7000, local, 4) == b"ping"
    vs.g.send(7000, local, RW, b"pong")
    assert host.recv(100) == b"pong"
    vs.g.send(7000, local, RST)
    assert host.recv(100) == b""


def test_refused_connections(vs: Session) -> None:
    vs.g.send(5001, 4321, REQUEST)  # nobody listens on <uds>_4321
    (p,) = vs.g.recv()
    assert is_pkt(p, RST, 4321, 5001)
    host = vs.host_connect(7001)  # the guest refuses
    (p,) = vs.g.recv()
    vs.g.send(7001, p.src_port, RST)
    assert host.recv(100) == b""
    vs.g.send(5002, 999, RW, b"x")  # data on no connection
    (p,) = vs.g.recv()
    assert is_pkt(p, RST, 999, 5002)


@pytest.mark.parametrize("line", [b"HELLO 7\n", b"CONNECT seven\n", b"CONNECT 99999999999\n",
                                  b"x" * 100])
def test_bad_connect_lines_are_dropped(vs: Session, line: bytes) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(vs.uds)
    s.sendall(line)
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:  # closed with our line unread: as good as EOF
        pass
    vs.d.wait_log("host connection dropped")


def test_guest_credit_is_honoured_and_data_arrives_whole(tmp_path: Path) -> None:
    """The guest gives 4 KiB of credit; the host sends 64 KiB: it comes in credit-sized
    steps, in order (VsockClient asserts no packet goes past the credit)."""
    s = Session(tmp_path, buf_alloc=4096)
    try:
        lst = s.listen(1235)
        s.g.send(5003, 1235, REQUEST)
        assert s.g.recv()[0].op == RESPONSE
        host, _ = lst.accept()
        data = os.urandom(64 << 10)
        host.sendall(data)
        assert recv_data(s.g, 5003, 1235, len(data)) == data
    finally:
        s.close()


def test_our_credit_is_enforced(vs: Session) -> None:
    """A guest that ignores our credit while the host program does not read is reset once
    it has more in flight than we advertised; we never hold more than that."""
    lst = vs.listen(1236)
    vs.g.send(5004, 1236, REQUEST)
    (p,) = vs.g.recv()
    credit = p.buf_alloc
    host, _ = lst.accept()  # never reads
    chunk = bytes(60 << 10)
    sent, fwd, reset = 0, 0, False
    while not reset and sent < 64 << 20:
        vs.g.send(5004, 1236, RW, chunk)  # whatever the credit says
        sent += len(chunk)
        vs.g.send(5999, 9999, REQUEST)  # a ping: refused after what the RW caused is out
        pending: list[Packet] = []
        while True:
            if not pending:
                pending += vs.g.recv()
            p = pending.pop(0)
            if p.dst_port == 5999:
                assert p.op == RST, p
                break
            assert p.op in (CREDIT_UPDATE, RST) and p.dst_port == 5004, p
            fwd, reset = max(fwd, p.fwd_cnt), reset or p.op == RST
    assert reset
    assert sent - fwd > credit  # reset for a reason: more in flight than our credit...
    assert sent - fwd <= credit + len(chunk)  # ...and as soon as that was so
    assert host.recv(100)  # what the host got before the reset is still there


def test_a_host_program_that_stops_reading_stalls_only_its_stream(vs: Session) -> None:
    """The guest honours our credit: with the host program not reading, its stream stops
    (no credit update comes), another stream goes on; once the program reads, everything
    arrives."""
    slow_l, fast_l = vs.listen(1237), vs.listen(1238)
    vs.g.send(5005, 1237, REQUEST)
    credit = vs.g.recv()[0].buf_alloc
    vs.g.send(5006, 1238, REQUEST)
    assert vs.g.recv()[0].op == RESPONSE
    slow, _ = slow_l.accept()
    fast, _ = fast_l.accept()
    fast.settimeout(10)
    data = os.urandom(4 << 20)  # far more than the credit and the socket buffer
    window, fwd, sent, updates = credit, 0, 0, []
    while sent < len(data) and sent - fwd < window:
        n = min(60 << 10, window - (sent - fwd), len(data) - sent)
        vs.g.send(5005, 1237, RW, data[sent : sent + n])
        sent += n
    vs.g.send(5006, 1238, RW, b"the other stream")
    assert fast.recv(100) == b"the other stream"
    got = b""
    while len(got) < len(data):  # now the program reads; the guest sends as credit comes
        got += slow.recv(1 << 20)
        while vs.fe.queues[0].ring.used_idx() != vs.fe.queues[0].ring.last_used:
            for p in vs.g.recv():
                assert is_pkt(p, CREDIT_UPDATE, 1237, 5005), p
                fwd = p.fwd_cnt
                updates.append(fwd)
        while sent < len(data) and sent - fwd < window:
            n = min(60 << 10, window - (sent - fwd), len(data) - sent)
            vs.g.send(5005, 1237, RW, data[sent : sent + n])
            sent += n
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert updates and updates == sorted(updates)


def test_many_streams_at_once(vs: Session) -> None:
    lst = vs.listen(1239)
    for i in range(32):
        vs.g.send(6000 + i, 1239, REQUEST)
    got = vs.g.recv(32)
    assert sorted(p.dst_port for p in got if p.op == RESPONSE) == list(range(6000, 6032))
    hosts = [lst.accept()[0] for _ in range(32)]
    for i in range(32):
        vs.g.send(6000 + i, 1239, RW, f"stream {i}".encode())
    seen = sorted(h.recv(100).decode() for h in hosts)
    assert seen == sorted(f"stream {i}" for i in range(32))
    for i, h in enumerate(hosts):
        h.sendall(f"back {i}".encode())
    back = {}
    while len(back) < 32:
        for p in vs.g.recv():
            assert p.op == RW, p
            back[p.dst_port] = p.data
    assert back == {6000 + i: f"back {i}".encode() for i in range(32)}


def test_malformed_packets_do_not_stop_the_daemon(vs: Session) -> None:
    vs.g.send(0, 0, 0, raw=b"short")  # shorter than a header
    vs.g.send(0, 0, 0, raw=struct.pack("<QQIIIHHIII", 99, 2, 1, 2, 0, 1, 1, 0, 0, 0))  # cid
    vs.g.send(0, 0, 0, raw=struct.pack("<QQIIIHHIII", CID, 2, 1, 2, 0, 9, 1, 0, 0, 0))  # type
    (p,) = vs.g.recv()
    assert is_pkt(p, RST, 2, 1)
    vs.g.send(0, 0, 0, raw=struct.pack("<QQIIIHHIII", CID, 2, 5, 6, 1000, 1, 5, 0, 0, 0))
    (p,) = vs.g.recv()  # RW that claims more bytes than it has, on no connection
    assert is_pkt(p, RST, 6, 5)
    lst = vs.listen(1240)  # and the device still serves
    vs.g.send(5007, 1240, REQUEST)
    assert vs.g.recv()[0].op == RESPONSE
    lst.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostuser.cli.vsock", *args],
                          capture_output=True, text=True, timeout=30)


def test_print_capabilities() -> None:
    out = run_cli("--print-capabilities")
    assert out.returncode == 0 and json.loads(out.stdout) == {"type": "vsock", "features": []}


@pytest.mark.parametrize("args, message", [
    (["--uds-path", "U"], "--guest-cid and --uds-path are required"),
    (["--guest-cid", "2", "--uds-path", "U"], "--guest-cid must be between 3"),
])
def test_bad_arguments_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    out = run_cli("--socket-path", str(tmp_path / "s"), *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_an_unusable_uds_path_is_a_clear_error(tmp_path: Path) -> None:
    out = run_cli("--socket-path", str(tmp_path / "s"), "--guest-cid", "3", "--uds-path",
                  str(tmp_path / "no" / "such" / "dir"))
    assert out.returncode == 1 and out.stderr.startswith("error: "), out.stderr


def test_a_small_window_gets_credit_updates_unasked(tmp_path: Path) -> None:
    """A guest whose own buffer is 32 KiB sends at most that much before it waits for a
    credit update (Linux caps its window so, and never asks): updates must come unasked."""
    s = Session(tmp_path, buf_alloc=32 << 10)
    try:
        lst = s.listen(1241)
        s.g.send(5008, 1241, REQUEST)
        assert s.g.recv()[0].op == RESPONSE
        host, _ = lst.accept()
        host.settimeout(10)
        for _ in range(4):
            s.g.send(5008, 1241, RW, bytes(8 << 10))
        got = 0
        while got < 32 << 10:
            got += len(host.recv(1 << 20))
        fwd = 0
        while fwd < 32 << 10:  # without an update here the guest would wait for ever
            for p in s.g.recv():
                assert is_pkt(p, CREDIT_UPDATE, 1241, 5008), p
                fwd = p.fwd_cnt
        assert fwd == 32 << 10
    finally:
        s.close()


def test_streams_go_on_across_a_queue_restart(vs: Session) -> None:
    """The front-end stops the rx/tx queues and starts them again (a VM pause): the
    streams go on in the next worker — data both ways, the credit counts, a host program
    still waiting for the guest's answer, a host program yet to say CONNECT."""
    lst = vs.listen(1242)
    vs.g.send(5009, 1242, REQUEST)
    assert vs.g.recv()[0].op == RESPONSE
    host, _ = lst.accept()
    host.settimeout(10)
    host.sendall(b"before")
    assert recv_data(vs.g, 5009, 1242, 6) == b"before"
    waiting = vs.host_connect(7001)  # the guest has not answered it yet
    (req,) = vs.g.recv()
    assert req.op == REQUEST and req.dst_port == 7001
    silent = vs.host_connect_no_line()
    workers = vs.d.children()
    assert [vs.fe.restart_queue(i) for i in (0, 1)] == [
        vs.fe.queues[0].ring.avail_idx - 48, vs.fe.queues[1].ring.avail_idx]
    assert vs.d.children() != workers, "the queues did not move to a new worker"
    vs.g.send(5009, 1242, RW, b"after")  # guest -> host, on the next worker
    assert host.recv(100) == b"after"
    host.sendall(b"and back")
    assert recv_data(vs.g, 5009, 1242, 8) == b"and back"
    vs.g.send(7001, req.src_port, RESPONSE)  # the guest accepts the one that waited
    assert waiting.recv(100) == f"OK {req.src_port}\n".encode()
    silent.sendall(b"CONNECT 7002\n")
    (p,) = vs.g.recv()
    assert p.op == REQUEST and p.dst_port == 7002
    vs.g.send(5009, 1242, RST)
    assert host.recv(100) == b""


def test_a_worker_started_meanwhile_does_not_hold_the_streams(vs: Session) -> None:
    """The event queue's worker starts while the engine holds the rx/tx streams' sockets
    (their queues are stopped): it must not inherit them, or a stream the next muxer ends
    would never reach EOF on the host side."""
    lst = vs.listen(1244)
    vs.g.send(5011, 1244, REQUEST)
    assert vs.g.recv()[0].op == RESPONSE
    host, _ = lst.accept()
    host.settimeout(5)
    bases = [vs.fe.get_vring_base(i) for i in (0, 1)]
    vs.fe.setup_queue(2, 16)  # forks the event queue's worker now
    for i, base in zip((0, 1), bases, strict=True):  # the rx/tx group comes back
        vs.fe.start_queue(i, base)
    vs.g.send(5011, 1244, RST)  # the guest ends the stream: the muxer closes its socket
    assert host.recv(100) == b""


def test_the_streams_end_with_the_front_end(vs: Session) -> None:
    """What a stopped worker handed over belongs to that front-end's session: once it
    disconnects, host programs see EOF."""
    lst = vs.listen(1243)
    vs.g.send(5010, 1243, REQUEST)
    assert vs.g.recv()[0].op == RESPONSE
    host, _ = lst.accept()
    host.settimeout(10)
    for i in (0, 1):
        vs.fe.get_vring_base(i)
    host.setblocking(False)
    with pytest.raises(BlockingIOError):  # still open while the queues are stopped
        host.recv(100)
    host.settimeout(5)
    vs.fe.close()
    assert host.recv(100) == b""
    vs.fe = Frontend(vs.d.sock)  # for the fixture's clean-up


def test_a_connect_line_in_pieces(vs: Session) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(vs.uds)
    s.sendall(b"CONNECT 7")
    vs.g.send(5010, 9999, REQUEST)  # a ping: refused once the piece above was looked at
    (p,) = vs.g.recv()
    assert is_pkt(p, RST, 9999, 5010)
    s.sendall(b"002\n")
    (p,) = vs.g.recv()
    assert p.op == REQUEST and p.dst_port == 7002


def test_a_host_program_that_hangs_up_before_the_guest_accepts(vs: Session) -> None:
    """The guest's RESPONSE then finds the host socket gone: that stream ends (RST), the
    device goes on (it used to kill the worker, and every stream with it)."""
    host = vs.host_connect(7003)
    (p,) = vs.g.recv()
    assert p.op == REQUEST
    host.close()
    vs.g.send(7003, p.src_port, RESPONSE)
    got = vs.g.recv()
    assert [q.op for q in got] == [RST] and got[0].dst_port == 7003
    lst = vs.listen(1243)  # and a new stream works
    vs.g.send(5011, 1243, REQUEST)
    assert vs.g.recv()[0].op == RESPONSE
    lst.close()
    assert "Traceback" not in vs.d.log()


def test_a_port_pair_taken_by_the_guest_meanwhile(vs: Session) -> None:
    """A host program gets local port N; before it says CONNECT X, the guest connects
    from X to host port N. The late CONNECT is refused; the guest's stream is untouched."""
    host = vs.host_connect_no_line()
    vs.g.send(5012, 9999, REQUEST)  # a ping: the device has accepted the host program
    (p,) = vs.g.recv()
    assert p.op == RST
    n = 1024  # the first local port the device hands out
    lst = vs.listen(n)
    vs.g.send(5013, n, REQUEST)
    assert vs.g.recv()[0].op == RESPONSE
    conn, _ = lst.accept()
    conn.settimeout(10)
    host.sendall(b"CONNECT 5013\n")
    try:
        assert host.recv(100) == b""
    except ConnectionResetError:
        pass
    vs.d.wait_log("in use")
    vs.g.send(5013, n, RW, b"still mine")
    assert conn.recv(100) == b"still mine"
