"""Malformed input over a real socket, and malicious rings: each gets a logged error and a
NACK or a dropped connection; the daemon stays up and serves the next front-end."""

from __future__ import annotations

import array
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon import BLK_FEATURES, Daemon, blk_session

from vhostuser.frontend.client import BackendError, Frontend
from vhostuser.protocol import FrontendReq, ProtocolFeature, request
from vhostuser.protocol import payloads as p
from vhostuser.virtq.ring import DESC_F_NEXT, DESC_F_WRITE

F = FrontendReq
OK = 0


def send(sock: socket.socket, code: int, flags: int = 1, payload: bytes = b"",
         fds: list[int] | None = None, size: int | None = None) -> None:
    data = struct.pack("=III", code, flags, len(payload) if size is None else size) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def reply(sock: socket.socket) -> tuple[int, int, bytes]:
    sock.settimeout(10)
    head = sock.recv(12, socket.MSG_WAITALL)
    assert len(head) == 12, "connection closed instead of a reply"
    code, flags, size = struct.unpack("=III", head)
    return code, flags, sock.recv(size, socket.MSG_WAITALL)


def assert_dropped(sock: socket.socket) -> None:
    sock.settimeout(10)
    try:
        assert sock.recv(1) == b"", "connection still open"
    except ConnectionResetError:
        pass
    sock.close()


def still_serves(d: Daemon) -> None:
    assert d.alive()
    fe, (blk,) = blk_session(d.sock)
    with fe:
        assert blk.read(1, 512)[0] == OK


def acked_connection(d: Daemon) -> socket.socket:
    """A raw connection with REPLY_ACK negotiated."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.sock)
    send(s, F.SET_PROTOCOL_FEATURES, payload=struct.pack("=Q", ProtocolFeature.REPLY_ACK))
    return s


def nack(s: socket.socket, code: int) -> None:
    rcode, rflags, body = reply(s)
    assert (rcode, rflags & 4) == (code, 4)
    assert struct.unpack("=Q", body)[0] != 0, "expected a NACK"


@pytest.mark.parametrize(("header", "log"), [
    (struct.pack("=III", F.GET_FEATURES, 0, 0), "version 0"),
    (struct.pack("=III", F.GET_FEATURES, 2, 0), "version 2"),
    (struct.pack("=III", F.GET_FEATURES, 1 | 0x40, 0), "reserved header flags"),
    (struct.pack("=III", F.SET_FEATURES, 1, 4097), "exceeds 4096"),
    (struct.pack("=III", F.SET_FEATURES, 1, 0xFFFFFFFF), "exceeds 4096"),
    (struct.pack("=III", F.GET_FEATURES, 1 | 4, 0), "REPLY flag set on a request"),
], ids=["version0", "version2", "reserved", "size4097", "size4G", "reply-flag"])
def test_bad_headers_drop_the_connection(blk_daemon: Callable[..., Daemon], header: bytes,
                                         log: str) -> None:
    d = blk_daemon()
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.sock)
    s.sendall(header)
    assert_dropped(s)
    d.wait_log(log)
    still_serves(d)


@pytest.mark.parametrize(("code", "payload", "nfds", "log"), [
    (F.SET_FEATURES, b"\0" * 4, 0, "must be 8 bytes"),
    (F.SET_VRING_NUM, b"\0" * 12, 0, "must be 8 bytes"),
    (F.SET_MEM_TABLE, struct.pack("=II", 1, 0) + bytes(32), 0, "carries 0 fds, expected 1"),
    (F.SET_FEATURES, bytes(8), 1, "carries 1 fds, expected 0"),
    (F.SET_VRING_CALL, struct.pack("=Q", 0), 0, "carries 0 fds"),
    (99, b"", 0, "unknown frontend request 99"),
], ids=["short-u64", "long-state", "table-no-fd", "stray-fd", "call-no-fd", "unknown"])
def test_bad_payloads_get_a_nack_with_reply_ack(blk_daemon: Callable[..., Daemon], code: int,
                                                payload: bytes, nfds: int, log: str) -> None:
    d = blk_daemon()
    s = acked_connection(d)
    fds = [os.eventfd(0) for _ in range(nfds)]
    send(s, code, 1 | 8, payload, fds)
    nack(s, code)
    for fd in fds:
        os.close(fd)
    # the connection is still in sync: a good request gets its answer
    send(s, F.GET_FEATURES)
    assert reply(s)[0] == F.GET_FEATURES
    s.close()
    d.wait_log(log)
    still_serves(d)


@pytest.mark.parametrize(("code", "payload", "nfds"), [
    (F.SET_FEATURES, b"\0" * 4, 0),
    (99, b"", 0),
    (F.GET_CONFIG, struct.pack("=III", 0, 300, 0) + bytes(300), 0),  # needs its own reply
    (F.SET_FEATURES, bytes(8), 9),  # more fds than any message may carry
])
def test_bad_payloads_without_ack_drop_the_connection(blk_daemon: Callable[..., Daemon],
                                                      code: int, payload: bytes,
                                                      nfds: int) -> None:
    d = blk_daemon()
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.sock)
    fds = [os.eventfd(0) for _ in range(nfds)]
    send(s, code, 1, payload, fds)
    assert_dropped(s)
    for fd in fds:
        os.close(fd)
    still_serves(d)
    assert len(os.listdir(f"/proc/{d.proc.pid}/fd")) < 20, "fds leaked in the daemon"


def test_truncated_message_then_hang_up(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.sock)
    send(s, F.SET_VRING_ADDR, payload=bytes(10), size=40)  # promises 40, sends 10
    s.close()
    d.wait_log("front-end disconnected")
    still_serves(d)


def frontend(d: Daemon) -> Frontend:
    fe = Frontend(d.sock)
    fe.negotiate(BLK_FEATURES)
    return fe


def test_bad_memory_tables_are_refused(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    with frontend(d) as fe:
        ram = fe.ram
        r = ram.region()
        overlap = p.MemTable((r, p.MemRegion(r.guest_addr + 4096, 4096, r.user_addr + (1 << 40),
                                             0)))
        with pytest.raises(BackendError):
            fe.call(F.SET_MEM_TABLE, overlap, fds=(ram.fd, ram.fd))
        too_big = p.MemTable((p.MemRegion(0, ram.size * 2, r.user_addr, 0),))
        with pytest.raises(BackendError):  # larger than the memfd: would SIGBUS
            fe.call(F.SET_MEM_TABLE, too_big, fds=(ram.fd,))
        rd, wr = os.pipe()
        with pytest.raises(BackendError):  # not mappable
            fe.call(F.SET_MEM_TABLE, p.MemTable((r,)), fds=(rd,))
        os.close(rd)
        os.close(wr)
        with pytest.raises(BackendError):
            fe.call(F.SET_MEM_TABLE, p.MemTable((p.MemRegion(0, 0, r.user_addr, 0),)),
                    fds=(ram.fd,))
        fe.set_mem_table()  # a good one still works afterwards
        fe.setup_queue(0)
        from vhostuser.frontend.blk import BlkClient

        assert BlkClient(fe).read(0, 512)[0] == OK
    d.wait_log("overlaps")
    d.wait_log("runs past the end of its file")


def test_vring_index_out_of_range(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    with frontend(d) as fe:
        for code, payload in ((F.SET_VRING_NUM, p.VringState(1, 128)),
                              (F.SET_VRING_BASE, p.VringState(200, 0)),
                              (F.SET_VRING_ENABLE, p.VringState(7, 1)),
                              (F.SET_VRING_NUM, p.VringState(0, 100)),  # not a power of 2
                              (F.SET_VRING_NUM, p.VringState(0, 65536)),
                              (F.SET_VRING_BASE, p.VringState(0, 1 << 20))):
            with pytest.raises(BackendError):
                fe.call(code, payload)
        kick = os.eventfd(0)
        with pytest.raises(BackendError):
            fe.call(F.SET_VRING_KICK, p.VringFile.make(9), fds=(kick,))
        os.close(kick)
        # GET_VRING_BASE must answer with a payload: an impossible one drops the connection
        fe.sock.send(request(F.GET_VRING_BASE, p.VringState(9, 0)))
        assert_dropped(fe.sock.sock)
    d.wait_log("vring index 9 out of range")
    still_serves(d)


def test_ring_set_up_before_the_memory_table(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    with frontend(d) as fe:
        fe.setup_queue(0)  # NUM, BASE, ADDR, KICK, CALL, ENABLE: no memory yet
        from vhostuser.frontend.blk import BlkClient

        blk = BlkClient(fe)
        head = blk.submit(0, 2, in_len=512)
        with pytest.raises(TimeoutError):
            fe.wait_used(0, timeout=0.5)
        assert d.children() == []
        fe.set_mem_table()  # now the ring can start
        fe.kick(0)
        assert blk.complete()[head][0] == OK


def test_ring_addresses_outside_memory(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    with frontend(d) as fe:
        fe.set_mem_table()
        fe.setup_queue(0)
        fe.call(F.SET_VRING_ADDR, p.VringAddr(0, 0, 0xDEAD0000, 0xDEAD8000, 0xDEAD4000, 0))
        d.wait_log("ring outside guest memory")
        with pytest.raises(BackendError):  # an unknown flag (1 is LOG)
            fe.call(F.SET_VRING_ADDR, p.VringAddr(0, 2, 0, 0, 0, 0))
    assert "vring address flags 0x2: only LOG is known" in d.log()
    still_serves(d)


def malicious(d: Daemon, build: Callable[[Frontend], None], log: str) -> None:
    fe, _ = blk_session(d.sock)
    with fe:
        build(fe)
        fe.kick(0)
        with pytest.raises(TimeoutError):  # the queue stopped: nothing completes
            fe.wait_used(0, timeout=1.0)
        d.wait_log(log)
        assert d.alive()
    still_serves(d)


def test_descriptor_loop_stops_the_queue(blk_daemon: Callable[..., Daemon]) -> None:
    def build(fe: Frontend) -> None:
        ring = fe.queues[0].ring
        hdr = fe.ram.alloc(16)
        ring.write_desc(0, hdr, 16, DESC_F_NEXT, 1)
        ring.write_desc(1, hdr, 16, DESC_F_NEXT, 0)
        ring.publish(0)
    malicious(blk_daemon(), build, "a loop")


def test_buffer_outside_guest_memory_stops_the_queue(blk_daemon: Callable[..., Daemon],
                                                     image: Path) -> None:
    before = image.read_bytes()

    def build(fe: Frontend) -> None:
        ring = fe.queues[0].ring
        hdr = fe.ram.alloc(16)
        fe.ram.at(hdr, 16)[:] = struct.pack("<IIQ", 1, 0, 0)  # a write...
        ring.write_desc(0, hdr, 16, DESC_F_NEXT, 1)
        ring.write_desc(1, 0x7FFF_0000_0000, 4096, DESC_F_NEXT, 2)  # ...from outside RAM
        ring.write_desc(2, fe.ram.alloc(1), 1, DESC_F_WRITE, 0)
        ring.publish(0)
    malicious(blk_daemon(), build, "is not mapped")
    assert image.read_bytes() == before


def test_request_without_status_byte_is_returned_unanswered(
        blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    fe, _ = blk_session(d.sock)
    with fe:
        hdr = fe.ram.alloc(16)
        fe.ram.at(hdr, 16)[:] = struct.pack("<IIQ", 0, 0, 0)
        fe.queues[0].ring.add([(hdr, 16, False)])  # nowhere to put data or status
        fe.kick(0)
        assert [n for _, n in fe.wait_used(0)] == [0]
    d.wait_log("no room for header or status")
    still_serves(d)


def test_random_garbage(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    rng = random.Random(1234)
    for i in range(40):
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.sock)
        code = rng.choice([rng.randrange(0, 50), rng.randrange(1 << 32)])
        flags = rng.choice([1, 5, 9, rng.randrange(1 << 32)])
        body = rng.randbytes(rng.choice([0, 4, 8, 12, 40, 72, 300]))
        try:
            s.sendall(struct.pack("=III", code, flags, len(body)) + body)
            if i % 2:
                s.sendall(rng.randbytes(rng.randrange(1, 64)))
        except OSError:
            pass
        time.sleep(0.01)
        s.close()
    still_serves(d)
