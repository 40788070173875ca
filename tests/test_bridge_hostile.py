"""vhost-user-vvu-bridge against a hostile back-end: one that leaves a message half sent,
never answers, or sends back-end requests the device cannot carry. Each ends only its own
session (or only its request channel), with a log line; the bridge keeps serving, and the
next consumer is served by a back-end that behaves. The consumer is our Python front-end,
through the real device (a process appliance: the device over vfio-user)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_qemu_vvu import start, start_device, wait_for

from vhostuser.frontend.client import Frontend
from vhostuser.protocol import (
    BackendReq,
    Channel,
    FrontendReq,
    HeaderFlag,
    ProtocolFeature,
    VirtioFeature,
    decode_request,
    reply_to,
    request,
)
from vhostuser.protocol import payloads as p
from vhostuser.unix_channel import UnixChannel

F = FrontendReq
FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
PROTOCOL = ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ


class FakeBackend:
    """A vhost-user back-end on `path` that answers what a front-end asks at set-up, and
    misbehaves at `when` (a request code) as `act` says; one connection after another."""

    def __init__(self, path: Path, act: Callable[[FakeBackend, UnixChannel, int], bool]):
        self.act = act
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.connections = 0
        self.backend_channel: UnixChannel | None = None
        self.kick_fds: list[int] = []  # the kick eventfds it was given (dups)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            ch = UnixChannel(sock, timeout=30)
            try:
                while True:
                    header, body, fds = ch.recv_raw()
                    msg = decode_request(Channel.FRONTEND, header, body, len(fds))
                    if self.act(self, ch, msg.request) is False:
                        # it misbehaved: it stays silent, the connection open, until the
                        # bridge hangs up
                        ch.sock.setblocking(True)
                        while ch.sock.recv(4096):
                            pass
                        break
                    if msg.request == F.SET_VRING_KICK and fds:
                        self.kick_fds.append(os.dup(fds[0]))
                    if msg.request == F.SET_BACKEND_REQ_FD:
                        self.backend_channel = UnixChannel(socket.socket(fileno=fds.pop()),
                                                           timeout=10)
                    for fd in fds:
                        os.close(fd)
                    value = {F.GET_FEATURES: FEATURES,
                             F.GET_PROTOCOL_FEATURES: PROTOCOL}.get(F(msg.request))
                    if value is not None:
                        ch.send(reply_to(msg, p.U64(value)))
                    elif msg.need_reply:
                        ch.send(reply_to(msg, p.U64(0)))
            except Exception:  # the bridge hung up: the next connection
                pass
            finally:
                ch.close()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., tuple[FakeBackend, Path]]]:
    procs = []

    def make(act: Callable[[FakeBackend, UnixChannel, int], bool],
             *extra: str) -> tuple[FakeBackend, Path]:
        backend = FakeBackend(tmp_path / "backend.sock", act)
        dev = start_device(tmp_path)
        bridge = start(["vhostuser.cli.vvu_bridge", "--vvu", str(tmp_path / "vfu.sock"),
                        "--backend-socket", str(tmp_path / "backend.sock"),
                        "--message-timeout", "1", *extra, "-v"], tmp_path / "bridge.log")
        procs.extend([bridge, dev])
        wait_for(tmp_path / "device.log", "driver set BACKEND_UP", dev)
        return backend, tmp_path / "vhost.sock"

    yield make
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    codes = [proc.wait(15) for proc in procs]
    log = (tmp_path / "bridge.log").read_text()
    assert codes == [0] * len(codes), log
    assert "Traceback" not in log, log


def behaves_next_time(misbehave: Callable[[UnixChannel], None], at: int
                      ) -> Callable[[FakeBackend, UnixChannel, int], bool]:
    """Misbehave at request `at` on the first connection only."""
    def act(backend: FakeBackend, ch: UnixChannel, req: int) -> bool:
        if backend.connections == 1 and req == at:
            misbehave(ch)
            return False
        return True
    return act


def served(vhost: Path) -> int:
    """A consumer that asks for the features: what it got."""
    fe = Frontend(str(vhost), reply_timeout=20)
    try:
        return fe.get_u64(F.GET_FEATURES)
    finally:
        fe.close()


def refused(vhost: Path) -> None:
    """A consumer whose session ends before its GET_FEATURES is answered."""
    fe = Frontend(str(vhost), reply_timeout=20)
    try:
        with pytest.raises(ConnectionError):
            fe.get_u64(F.GET_FEATURES)
    finally:
        fe.close()


def test_a_message_left_half_sent_ends_only_its_session(
        rig: Callable[..., tuple[FakeBackend, Path]], tmp_path: Path) -> None:
    backend, vhost = rig(behaves_next_time(lambda ch: ch.sock.send(b"\x01\x00\x00"),
                                           F.GET_FEATURES))
    refused(vhost)
    assert served(vhost) == FEATURES
    log = (tmp_path / "bridge.log").read_text()
    assert "session ended: the back-end: the peer left a message incomplete" in log, log
    backend.close()


def test_a_backend_that_never_answers_ends_only_its_session(
        rig: Callable[..., tuple[FakeBackend, Path]], tmp_path: Path) -> None:
    backend, vhost = rig(behaves_next_time(lambda ch: None, F.GET_FEATURES),
                         "--reply-timeout", "1")
    refused(vhost)
    assert served(vhost) == FEATURES
    log = (tmp_path / "bridge.log").read_text()
    assert "the back-end did not answer GET_FEATURES within 1 s" in log, log
    backend.close()


def test_backend_requests_the_device_cannot_carry_are_refused(
        rig: Callable[..., tuple[FakeBackend, Path]], tmp_path: Path) -> None:
    """VRING_HOST_NOTIFIER_MSG needs an fd to reach the consumer: NACKed to the back-end
    that waits for the ack; a request of an unknown number too; CONFIG_CHANGE_MSG crosses
    and the consumer's ack comes back."""
    backend, vhost = rig(lambda b, ch, req: True)
    fe = Frontend(str(vhost), reply_timeout=20)
    ours, theirs = socket.socketpair()
    try:
        fe.negotiate(VirtioFeature.VERSION_1, PROTOCOL)
        assert fe.protocol_features == PROTOCOL
        fe.call(F.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),))
        chan = backend.backend_channel
        assert chan is not None
        need = HeaderFlag.NEED_REPLY
        notifier = request(BackendReq.VRING_HOST_NOTIFIER_MSG,
                           p.VringArea(0, 0x1000, 0), need_reply=True)
        area = os.memfd_create("notifier")
        chan.send(notifier, (area,))
        os.close(area)
        header, body, _ = chan.recv_raw()
        assert (header.request, header.flags & HeaderFlag.REPLY) == (
            BackendReq.VRING_HOST_NOTIFIER_MSG, HeaderFlag.REPLY)
        assert struct.unpack("<Q", body)[0] != 0  # NACK
        chan.send_bytes(struct.pack("<III", 999, 1 | need, 0))  # an unknown request
        header, body, _ = chan.recv_raw()
        assert header.request == 999 and struct.unpack("<Q", body)[0] != 0
        # CONFIG_CHANGE_MSG crosses to the consumer, which acks it
        chan.send(request(BackendReq.CONFIG_CHANGE_MSG, need_reply=True))
        consumer_side = UnixChannel(ours, timeout=10)
        header, _, _ = consumer_side.recv_raw()
        assert header.request == BackendReq.CONFIG_CHANGE_MSG
        consumer_side.send(reply_to(request(BackendReq.CONFIG_CHANGE_MSG), p.U64(0)))
        header, body, _ = chan.recv_raw()
        assert header.request == BackendReq.CONFIG_CHANGE_MSG
        assert struct.unpack("<Q", body)[0] == 0
    finally:
        fe.close()
        theirs.close()
        backend.close()
    log = (tmp_path / "bridge.log").read_text()
    assert "back-end request VRING_HOST_NOTIFIER_MSG refused" in log, log


def test_a_backend_that_saturates_its_kick_eventfd(
        rig: Callable[..., tuple[FakeBackend, Path]], tmp_path: Path) -> None:
    """Poll mode, the bridge watching the rings: a back-end that fills its kick eventfd's
    counter (so the bridge's next kick cannot be written) does not stop the bridge; the
    session goes on."""
    backend, vhost = rig(lambda b, ch, req: True, "--watch-rings", "-vv")
    fe = Frontend(str(vhost), reply_timeout=20)
    try:
        fe.negotiate(VirtioFeature.VERSION_1)
        fe.set_mem_table()
        q = fe.setup_queue(0, 8)
        assert fe.get_u64(F.GET_FEATURES) == FEATURES  # the watcher has looked by now
        kick = backend.kick_fds[-1]
        assert os.eventfd_read(kick) == 1  # the first look kicks
        os.eventfd_write(kick, 0xFFFF_FFFF_FFFF_FFFE)  # full
        q.ring.add([(fe.ram.alloc(512), 512, True)])  # avail moves: the bridge kicks
        assert fe.get_u64(F.GET_FEATURES) == FEATURES
        assert os.eventfd_read(kick) == 0xFFFF_FFFF_FFFF_FFFE
    finally:
        fe.close()
        backend.close()
    log = (tmp_path / "bridge.log").read_text()
    assert "vring 0: the bridge watches its avail index" in log, log
    assert "session ended" not in log, log
