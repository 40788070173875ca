"""The virtio-vhost-user relay, step by step: a consumer on a real socket, a recording
driver side. Messages cross both ways, fds become resources, features are masked, and
every rule violation ends the session cleanly."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from vhostuser.protocol import (
    HEADER_SIZE,
    Channel,
    FrontendReq,
    ProtocolFeature,
    decode_header,
    decode_reply,
    decode_request,
    encode,
    reply_to,
    request,
)
from vhostuser.protocol import payloads as p
from vhostuser.unix_channel import UnixChannel
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.vvu.relay import ALLOWED_PROTOCOL_FEATURES, Relay, RxResult, WindowFile

F = FrontendReq
PF = ProtocolFeature


class Driver:
    """A fake driver side that records what the device does."""

    def __init__(self) -> None:
        self.discards = 0
        self.rx: list[bytes] = []
        self.buffers = 8
        self.buffer_size = 1024
        self.kicks: list[int] = []
        self.config_irqs = 0
        self.sessions_ended = 0
        self.errors = 0

    def rx_put(self, message: bytes) -> RxResult:
        if not self.buffers:
            return RxResult.NO_BUFFER
        if len(message) > self.buffer_size:
            return RxResult.TOO_SMALL
        self.buffers -= 1
        self.rx.append(message)
        return RxResult.OK

    def kick_arrived(self, vring: int) -> None:
        self.kicks.append(vring)

    def discard_txq(self) -> None:
        self.discards += 1

    def frontend_changed(self) -> None:
        self.config_irqs += 1

    def session_ended(self) -> None:
        self.sessions_ended += 1

    def device_error(self) -> None:
        self.errors += 1


@pytest.fixture
def setup() -> Iterator[tuple[Relay, Driver, UnixChannel]]:
    drv = Driver()
    relay = Relay(drv, max_queues=4)
    dev_sock, fe_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    relay.set_backend_up(True)
    relay.attach(dev_sock)
    yield relay, drv, UnixChannel(fe_sock)
    relay.close()
    fe_sock.close()


def send(fe: UnixChannel, relay: Relay, msg: object, fds: tuple[int, ...] = ()) -> None:
    fe.send(msg, fds)  # type: ignore[arg-type]
    relay.on_consumer()


def delivered(drv: Driver) -> object:
    data = drv.rx.pop(0)
    h = decode_header(data[:HEADER_SIZE])
    assert HEADER_SIZE + h.size == len(data)
    return decode_request(Channel.FRONTEND, h, data[HEADER_SIZE:], None)  # fds consumed


def consumer_gets(fe: UnixChannel, code: int) -> object:
    h, body, fds = fe.recv_raw()
    return decode_reply(Channel.FRONTEND, code, h, body, len(fds))


def closed(fe: UnixChannel) -> bool:
    ready, _, _ = select.select([fe.sock], [], [], 2)
    return bool(ready) and fe.sock.recv(1) == b""


def test_status_and_config_interrupts(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    assert relay.status() == 3 and drv.config_irqs == 1  # FRONTEND_UP set by the device
    relay.set_backend_up(False)  # the driver's own action: no interrupt, session over
    assert relay.status() == 0 and drv.config_irqs == 1 and closed(fe)


def test_request_and_reply_cross(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    send(fe, relay, request(F.GET_FEATURES))
    assert delivered(drv) == request(F.GET_FEATURES)
    relay.from_driver(encode(reply_to(request(F.GET_FEATURES), p.U64((1 << 32) | (1 << 26)))))
    got = consumer_gets(fe, F.GET_FEATURES)
    assert got.payload == p.U64((1 << 32) | (1 << 26))  # LOG_ALL crosses: the log does


def test_protocol_features_masked_both_ways(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    everything = (1 << 22) - 1
    send(fe, relay, request(F.GET_PROTOCOL_FEATURES))
    delivered(drv)
    relay.from_driver(encode(reply_to(request(F.GET_PROTOCOL_FEATURES), p.U64(everything))))
    offered = consumer_gets(fe, F.GET_PROTOCOL_FEATURES).payload.value
    assert offered == ALLOWED_PROTOCOL_FEATURES | PF.LOG_SHMFD
    for bad in (PF.BACKEND_SEND_FD, PF.INFLIGHT_SHMFD, PF.HOST_NOTIFIER,
                PF.PAGEFAULT, PF.DEVICE_STATE, PF.SHARED_OBJECT, PF.INBAND_NOTIFICATIONS):
        assert not offered & bad
    for good in (PF.MQ, PF.REPLY_ACK, PF.CONFIG, PF.STATUS, PF.RESET_DEVICE,
                 PF.CONFIGURE_MEM_SLOTS, PF.BACKEND_REQ, PF.LOG_SHMFD):
        assert offered & good
    send(fe, relay, request(F.SET_PROTOCOL_FEATURES, p.U64(everything)))
    assert delivered(drv).payload == p.U64(ALLOWED_PROTOCOL_FEATURES | PF.LOG_SHMFD)


def test_no_dirty_log_with_a_pinned_window() -> None:
    """An appliance VM's BAR is the device's own window file: the consumer's log file
    cannot be placed in it, so neither LOG_SHMFD nor VHOST_F_LOG_ALL is offered."""
    drv = Driver()
    ram = GuestRam(1 << 20)
    pinned = WindowFile(os.dup(ram.fd), (0, 0), 0, 1 << 20)
    relay = Relay(drv, max_queues=4, pinned=pinned)
    dev_sock, fe_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    relay.set_backend_up(True)
    relay.attach(dev_sock)
    fe = UnixChannel(fe_sock)
    try:
        send(fe, relay, request(F.GET_PROTOCOL_FEATURES))
        delivered(drv)
        relay.from_driver(encode(reply_to(request(F.GET_PROTOCOL_FEATURES),
                                          p.U64((1 << 22) - 1))))
        assert consumer_gets(fe, F.GET_PROTOCOL_FEATURES).payload.value \
            == ALLOWED_PROTOCOL_FEATURES
        send(fe, relay, request(F.GET_FEATURES))
        delivered(drv)
        relay.from_driver(encode(reply_to(request(F.GET_FEATURES),
                                          p.U64((1 << 32) | (1 << 26)))))
        assert consumer_gets(fe, F.GET_FEATURES).payload == p.U64(1 << 32)
    finally:
        relay.close()
        fe_sock.close()
        ram.close()


def test_the_dirty_log_crosses_in_the_window(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    """SET_LOG_BASE: the log's file is placed in the window after the memory (and stays
    there across a new memory table) and the request is relayed with its window offset;
    SET_LOG_FD: the log doorbell (4 x 2N) signals its eventfd."""
    relay, drv, fe = setup
    send(fe, relay, request(F.SET_PROTOCOL_FEATURES, p.U64(PF.LOG_SHMFD)))
    delivered(drv)
    ram = GuestRam(1 << 20)
    send(fe, relay, request(F.SET_MEM_TABLE, p.MemTable((ram.region(),))), (ram.fd,))
    delivered(drv)
    log = GuestRam(64 << 10)  # a memfd of its own, as QEMU's log is
    log.at(0x1000 + 7, 1)[0] = 0x5A
    send(fe, relay, request(F.SET_LOG_BASE, p.LogBase(0x8000, 0x1000)), (log.fd,))
    relayed = delivered(drv).payload
    assert relayed == p.LogBase(0x8000, (2 << 20) + 0x1000)  # the next 2 MiB boundary
    f = relay.file_at(relayed.mmap_offset + 7)
    assert f is relay.log_file and os.pread(f.fd, 1, 0x1000 + 7) == b"\x5a"
    relay.from_driver(encode(reply_to(request(F.SET_LOG_BASE), p.U64(0))))
    assert consumer_gets(fe, F.SET_LOG_BASE).payload == p.U64(0)
    send(fe, relay, request(F.SET_MEM_TABLE, p.MemTable((ram.region(),))), (ram.fd,))
    delivered(drv)
    assert relay.log_file in relay.files  # a new table leaves the log where it was
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    send(fe, relay, request(F.SET_LOG_FD), (efd,))
    assert delivered(drv) == request(F.SET_LOG_FD)  # relayed without its fd
    relay.doorbell(4 * 2 * relay.max_queues)
    assert os.eventfd_read(efd) == 1
    os.close(efd)
    ram.close()
    log.close()


def test_memory_goes_back_to_its_place_before_a_kept_log(
        setup: tuple[Relay, Driver, UnixChannel]) -> None:
    """A new memory table after the log: the log keeps its place, the memory goes back to
    the gap below it (not after it: the window would need twice the guest's memory); a
    log replaced by another (QEMU makes one per migration) leaves the window."""
    relay, drv, fe = setup
    relay.window_size = 8 << 20
    send(fe, relay, request(F.SET_PROTOCOL_FEATURES, p.U64(PF.LOG_SHMFD)))
    delivered(drv)
    ram = GuestRam(3 << 20)
    table = request(F.SET_MEM_TABLE, p.MemTable((ram.region(),)))
    send(fe, relay, table, (ram.fd,))
    assert delivered(drv).payload.regions[0].mmap_offset == 0
    logs = []
    for _ in range(70):  # more than the 64 files a consumer may have placed
        log = GuestRam(64 << 10)
        logs.append(log)
        drv.buffers = 8  # the driver posts rxq buffers again
        send(fe, relay, request(F.SET_LOG_BASE, p.LogBase(4096, 0)), (log.fd,))
        assert delivered(drv).payload == p.LogBase(4096, 4 << 20)  # after the memory
        relay.from_driver(encode(reply_to(request(F.SET_LOG_BASE), p.U64(0))))
        consumer_gets(fe, F.SET_LOG_BASE)
        assert len(relay.files) == 2
    drv.buffers = 8
    send(fe, relay, table, (ram.fd,))  # the same memory again: back at 0
    assert delivered(drv).payload.regions[0].mmap_offset == 0
    assert [(f.base, f.size) for f in relay.files] == [(0, 3 << 20), (4 << 20, 64 << 10)]
    for x in (ram, *logs):
        x.close()


@pytest.mark.parametrize("bad", ["not-negotiated", "past-the-file", "not-an-eventfd",
                                 "not-a-file", "zero-size"])
def test_bad_dirty_log_requests_end_the_session(setup: tuple[Relay, Driver, UnixChannel],
                                                bad: str) -> None:
    relay, drv, fe = setup
    if bad != "not-negotiated":
        send(fe, relay, request(F.SET_PROTOCOL_FEATURES, p.U64(PF.LOG_SHMFD)))
        delivered(drv)
    log = GuestRam(64 << 10)
    if bad in ("not-an-eventfd", "not-a-file"):
        r, w = os.pipe()
        if bad == "not-a-file":
            send(fe, relay, request(F.SET_LOG_BASE, p.LogBase(0, 0)), (r,))
        else:
            send(fe, relay, request(F.SET_LOG_FD), (r,))
        os.close(w)
    else:
        size = 0 if bad == "zero-size" else 64 << 10
        send(fe, relay, request(F.SET_LOG_BASE, p.LogBase(size, 4096)), (log.fd,))
    assert not drv.rx and closed(fe)  # nothing reached the driver
    assert relay.log_file is None and relay.log_fd is None
    log.close()


def test_memory_table_becomes_the_window(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    ram = GuestRam(1 << 20)
    lo = p.MemRegion(0, 0x40000, 0x7F0000000000, 0)
    hi = p.MemRegion(0x100000000, 0x80000, 0x7F0000040000, 0x40000)  # same file, further on
    table = p.MemTable((lo, hi))
    send(fe, relay, request(F.SET_MEM_TABLE, table), (ram.fd, ram.fd))
    assert delivered(drv).payload == table  # one file at window offset 0: offsets as sent
    (w,) = relay.files
    assert (w.base, w.size) == (0, 1 << 20)  # the whole file is placed
    ram.at(0x40000 + 5, 4)[:] = b"VVU!"  # guest address 0x100000005 lives at window 0x40005
    assert relay.file_at(hi.mmap_offset + 5) is w
    with open(f"/proc/self/fd/{w.fd}", "rb") as f:
        f.seek(hi.mmap_offset + 5)
        assert f.read(4) == b"VVU!"


def test_memory_in_several_files_is_placed(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    """Each file gets its own 2 MiB-aligned place in the window; the relayed regions say
    where (mmap_offset rewritten), as libblkio's separate memfds need."""
    relay, drv, fe = setup
    a, b = GuestRam(1 << 16), GuestRam(3 << 20)
    table = p.MemTable((p.MemRegion(0, 1 << 16, 0x1000000, 0),
                        p.MemRegion(1 << 20, 1 << 20, 0x2000000, 1 << 20)))
    send(fe, relay, request(F.SET_MEM_TABLE, table), (a.fd, b.fd))
    placed = delivered(drv).payload.regions
    assert [r.mmap_offset for r in placed] == [0, (2 << 20) + (1 << 20)]
    assert [(f.base, f.size) for f in relay.files] == [(0, 1 << 16), (2 << 20, 3 << 20)]
    b.at(1 << 20, 4)[:] = b"FILE"
    f = relay.file_at(placed[1].mmap_offset)
    assert f is relay.files[1] and os.pread(f.fd, 4, 1 << 20) == b"FILE"
    add = p.SingleMemRegion(p.MemRegion(8 << 20, 1 << 16, 0x3000000, 0))
    send(fe, relay, request(F.ADD_MEM_REG, add), (a.fd,))  # a known file keeps its place
    assert delivered(drv).payload.region.mmap_offset == 0 and len(relay.files) == 2
    rem = p.SingleMemRegion(p.MemRegion(1 << 20, 1 << 20, 0x2000000, 1 << 20))
    send(fe, relay, request(F.REM_MEM_REG, rem))  # relayed with the window offset too
    assert delivered(drv).payload.region.mmap_offset == (2 << 20) + (1 << 20)


def test_memory_beyond_the_window_is_refused(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    relay.window_size = 1 << 20
    big = GuestRam(2 << 20)
    send(fe, relay, request(F.SET_MEM_TABLE, p.MemTable((big.region(),))), (big.fd,))
    assert not drv.rx and closed(fe)  # no REPLY_ACK negotiated: the session ends


def test_refusals_are_nacked_with_reply_ack(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    send(fe, relay, request(F.SET_PROTOCOL_FEATURES, p.U64(PF.REPLY_ACK)))
    delivered(drv)
    r, w = os.pipe()
    send(fe, relay, request(F.SET_INFLIGHT_FD, p.Inflight(4096, 0, 1, 64),
                            need_reply=True), (r,))  # needs an fd to cross
    assert consumer_gets(fe, F.SET_INFLIGHT_FD).payload == p.U64(1)
    send(fe, relay, request(F.SET_VRING_CALL, p.VringFile.make(9), need_reply=True), (w,))
    assert consumer_gets(fe, F.SET_VRING_CALL).payload == p.U64(1)  # beyond max queues
    assert not drv.rx and relay.connected  # still in session
    os.close(r)
    os.close(w)


def test_call_err_doorbells_and_kick_notifications(
        setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    call, err, kick = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
    send(fe, relay, request(F.SET_VRING_CALL, p.VringFile.make(1)), (call,))
    send(fe, relay, request(F.SET_VRING_ERR, p.VringFile.make(1)), (err,))
    send(fe, relay, request(F.SET_VRING_KICK, p.VringFile.make(2)), (kick,))
    assert [delivered(drv).request for _ in range(3)] == [F.SET_VRING_CALL, F.SET_VRING_ERR,
                                                          F.SET_VRING_KICK]
    relay.doorbell(4 * 1)  # call doorbell of vring 1
    assert os.eventfd_read(call) == 1
    relay.doorbell(4 * (4 + 1))  # err doorbell of vring 1 (N = 4)
    assert os.eventfd_read(err) == 1
    relay.doorbell(4 * 8)  # the log doorbell: accepted, nothing to do
    relay.doorbell(4 * 3)  # no call fd for vring 3: ignored
    relay.doorbell(5)  # misaligned: ignored
    os.eventfd_write(kick, 1)
    relay.on_kick(2)
    assert drv.kicks == [2]
    relay.on_kick(2)  # nothing pending: no spurious notification
    assert drv.kicks == [2]
    send(fe, relay, request(F.GET_VRING_BASE, p.VringState(1, 0)))
    assert 1 not in relay.calls and 1 not in relay.errs  # dropped at GET_VRING_BASE
    for fd in (call, err, kick):
        os.close(fd)


def test_no_rx_buffer_parks_the_message(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    drv.buffers = 0
    send(fe, relay, request(F.GET_FEATURES))
    assert not drv.rx and not relay.wants_consumer()  # parked; the socket is not read
    drv.buffers = 1
    relay.retry_rx()
    assert delivered(drv) == request(F.GET_FEATURES)
    # the consumer waits for the reply: nothing more is read from it until it crosses
    assert not relay.wants_consumer()
    relay.from_driver(encode(reply_to(request(F.GET_FEATURES), p.U64(0))))
    assert relay.wants_consumer()


def test_message_larger_than_the_rx_buffer(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    drv.buffer_size = 16
    send(fe, relay, request(F.SET_VRING_ADDR, p.VringAddr(0, 0, 0, 0, 0, 0)))
    assert drv.errors == 1 and closed(fe) and drv.config_irqs == 2


@pytest.mark.parametrize("bad", [
    b"\x01\x00",  # shorter than a header
    encode(reply_to(request(F.GET_FEATURES), p.U64(0)))[:-1],  # size disagrees with buffer
    encode(reply_to(request(F.GET_QUEUE_NUM), p.U64(0))),  # not the awaited request
    encode(request(F.GET_FEATURES)),  # a request, not a reply
    encode(reply_to(request(F.GET_FEATURES), p.VringState(0, 0)))[:12].replace(
        b"\x05\x00\x00\x00", b"\x06\x00\x00\x00") + bytes(8),  # version 2
])
def test_bad_txq_messages_end_the_session(setup: tuple[Relay, Driver, UnixChannel],
                                          bad: bytes) -> None:
    relay, drv, fe = setup
    send(fe, relay, request(F.GET_FEATURES))
    delivered(drv)
    relay.from_driver(bad)
    assert closed(fe) and not relay.connected


def test_unsolicited_reply_ends_the_session(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, _, fe = setup
    relay.from_driver(encode(reply_to(request(F.GET_FEATURES), p.U64(0))))
    assert closed(fe)


def test_malformed_consumer_message(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    fe.sock.sendall(b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # version 0
    relay.on_consumer()
    assert closed(fe) and not drv.rx and drv.config_irqs == 2


def test_consumer_disconnect_and_reconnect(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, drv, fe = setup
    call = os.eventfd(0)
    send(fe, relay, request(F.SET_VRING_CALL, p.VringFile.make(0)), (call,))
    assert delivered(drv).request == F.SET_VRING_CALL
    fe.close()
    relay.on_consumer()
    assert relay.status() == 0 and relay.calls == {} and drv.config_irqs == 2
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    relay.attach(a)  # a new consumer waits until the driver is ready again
    assert relay.status() == 0 and not relay.wants_consumer() and drv.config_irqs == 2
    relay.set_backend_up(True)  # FRONTEND_UP again, with an interrupt
    assert relay.status() == 3 and drv.config_irqs == 3
    fe2 = UnixChannel(b)
    send(fe2, relay, request(F.GET_FEATURES))
    assert delivered(drv).request == F.GET_FEATURES
    os.close(call)
    b.close()


def backend_channel(fe: UnixChannel, relay: Relay, drv: Driver,
                    features: int = PF.BACKEND_REQ | PF.REPLY_ACK) -> UnixChannel:
    """Negotiate `features`, hand the device a back-end channel; returns the consumer's
    end of it."""
    send(fe, relay, request(F.SET_PROTOCOL_FEATURES, p.U64(features)))
    delivered(drv)
    ours, theirs = socket.socketpair()
    send(fe, relay, request(F.SET_BACKEND_REQ_FD), (theirs.fileno(),))
    theirs.close()
    assert delivered(drv).request == F.SET_BACKEND_REQ_FD and relay.backend is not None
    return UnixChannel(ours)


def test_backend_requests_cross_over_txq(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    """BACKEND_REQ crosses: the device keeps the consumer's back-end channel, relays a
    back-end request the driver puts on txq (no REPLY flag) and the consumer's ack back
    into rxq (REPLY set)."""
    from vhostuser.protocol import BackendReq

    relay, drv, fe = setup
    be = backend_channel(fe, relay, drv)
    relay.from_driver(encode(request(BackendReq.CONFIG_CHANGE_MSG, need_reply=True)))
    h, body, fds = be.recv_raw()
    msg = decode_request(Channel.BACKEND, h, body, len(fds))
    assert msg.request == BackendReq.CONFIG_CHANGE_MSG and h.need_reply
    assert relay.wants_backend() and not drv.rx
    be.send(reply_to(msg, p.U64(0)))
    relay.on_backend()
    data = drv.rx.pop(0)
    ack = decode_header(data[:HEADER_SIZE])
    assert ack.is_reply and ack.request == BackendReq.CONFIG_CHANGE_MSG
    assert decode_reply(Channel.BACKEND, ack.request, ack, data[HEADER_SIZE:]).payload == \
        p.U64(0)
    assert not relay.wants_backend()
    relay.from_driver(encode(request(BackendReq.CONFIG_CHANGE_MSG)))  # no ack wanted
    h, _, _ = be.recv_raw()
    assert h.request == BackendReq.CONFIG_CHANGE_MSG and not relay.wants_backend()
    assert relay.connected


@pytest.mark.parametrize("case", ["needs an fd", "masked feature", "no channel", "two acks",
                                  "ack without REPLY_ACK"])
def test_bad_backend_requests_end_the_session(setup: tuple[Relay, Driver, UnixChannel],
                                              case: str) -> None:
    from vhostuser.protocol import BackendReq

    relay, drv, fe = setup
    if case == "ack without REPLY_ACK":
        be = backend_channel(fe, relay, drv, PF.BACKEND_REQ)
    elif case != "no channel":
        be = backend_channel(fe, relay, drv)
    if case == "ack without REPLY_ACK":
        bad = request(BackendReq.CONFIG_CHANGE_MSG, need_reply=True)
    elif case == "needs an fd":
        bad = request(BackendReq.VRING_HOST_NOTIFIER_MSG, p.VringArea(0, 0x1000, 0))
    elif case == "masked feature":
        bad = request(BackendReq.IOTLB_MSG, p.IotlbMsg(0, 0x1000, 0, 3, 2))
    elif case == "two acks":
        relay.from_driver(encode(request(BackendReq.CONFIG_CHANGE_MSG, need_reply=True)))
        bad = request(BackendReq.CONFIG_CHANGE_MSG, need_reply=True)
    else:
        bad = request(BackendReq.CONFIG_CHANGE_MSG)
    relay.from_driver(encode(bad))
    assert closed(fe) and relay.backend is None and not relay.connected
    if case != "no channel":
        be.close()


def test_backend_channel_needs_backend_req(setup: tuple[Relay, Driver, UnixChannel]) -> None:
    relay, _, fe = setup
    ours, theirs = socket.socketpair()
    send(fe, relay, request(F.SET_BACKEND_REQ_FD), (theirs.fileno(),))
    theirs.close()
    ours.close()
    assert closed(fe) and relay.backend is None


@pytest.mark.parametrize("code", [F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR])
def test_vring_fd_that_is_not_an_eventfd_is_refused(setup: tuple[Relay, Driver, UnixChannel],
                                                    code: int) -> None:
    """A pipe in place of an eventfd could be readable forever (a busy device) or be
    handed to the appliance's VMM as a doorbell: the device refuses it, and keeps none."""
    relay, drv, fe = setup
    r, w = os.pipe()
    os.close(w)  # a kick that hangs up forever
    send(fe, relay, request(code, p.VringFile.make(1)), (r,))
    os.close(r)
    assert not drv.rx and closed(fe)  # no REPLY_ACK: the session ends
    assert not relay.kicks and not relay.calls and not relay.errs
