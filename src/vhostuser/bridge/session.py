"""One consumer session bridged to an unmodified vhost-user back-end.

The bridge is the back-end's front-end: every message the device puts into rxq goes to the
back-end's socket, every reply comes back through txq, unchanged but for what carried an
fd, which the device consumed on its way in (docs/vvu-design.md, "The bridge"):

- memory regions: the fd of the window file that holds the region (the consumer's memory
  file that the device offers as a vfio-user region; inside the appliance VM, the window
  BAR's sysfs file), `mmap_offset` rewritten to the region's offset in that file;
- a kick: the MSI-X vector's eventfd, which the device signals when the consumer kicks
  (interrupt mode), or an eventfd of ours that we signal when the vring's avail index moves
  (poll mode: `kicks.py`);
- a call or err: the doorbell's ioeventfd, which is the consumer's own eventfd (vfio-user),
  or an eventfd of ours that we turn into a doorbell write (inside the appliance VM);
- the back-end channel: one end of a socket pair; its requests go on txq if the device
  can carry them (no fd, a feature it lets through) and are refused here otherwise, and the
  consumer's acks, which come through rxq with REPLY set, go back to it.

Nothing here waits on the back-end: its socket is non-blocking and framed incrementally,
and a back-end that stops reading or answering ends the session after the message timeout.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from ..appliance.vvu_link import V_FIRST_VRING, LinkError, VvuLink
from ..engine.notify import Notifier
from ..framer import close_fds
from ..memory import MemoryTableError
from ..protocol import (
    Channel,
    FrontendReq,
    Header,
    HeaderFlag,
    Message,
    ProtocolError,
    ProtocolFeature,
    decode_request,
    encode,
    encode_raw,
    expected_fds,
    expects_reply,
    reply_to,
)
from ..protocol import payloads as p
from ..protocol.constants import LOG_ALL
from ..protocol.virtio_pci import NO_VECTOR
from ..shutdown import StopSignal
from ..sockets import PeerClosed
from ..transport.vvu import split_message
from ..unix_channel import UnixChannel
from ..vfio_user.client import DeviceError
from ..vfio_user.errors import VfioUserError
from ..vvu.abi import BACKEND_REQUESTS
from .kicks import F_RING_PACKED, Mapped, RingWatch

log = logging.getLogger(__name__)

F = FrontendReq
IDLE_WAIT = 1.0  # s between looks at deadlines with interrupts and nothing happening
REPLY_WAIT = 60.0  # s a back-end may take to answer a request (it may drain I/O first)
MAX_QUEUED_REQUESTS = 64  # back-end requests waiting for the one before to be acked
POLL_PAUSE = 20e-6  # s: poll mode's pause between looks, once spin_us passed with no work
CONTROL_EVERY = 0.001  # s of ring watching in poll mode between looks at everything else


def _signal(fd: int) -> None:
    """One kick on eventfd `fd`; a saturated counter already has one pending."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


def _fine_timer_slack() -> None:
    """Sleep as long as asked (the default slack, 50 µs, would more than double a
    POLL_PAUSE): prctl(PR_SET_TIMERSLACK, 1 ns)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


_PR_SET_TIMERSLACK = 29


class SessionEnded(Exception):
    """The session is over (the reason is the message)."""


class BridgeSession:
    def __init__(self, link: VvuLink, sock: socket.socket, stop: StopSignal, *,
                 poll: bool = False, spin_us: int = 200, kick_fds: bool = True,
                 reply_wait: float = REPLY_WAIT) -> None:
        """`kick_fds`: give the back-end the consumer's own kick eventfds where the device
        hands them over (vfio-user); without, the bridge raises kicks itself (poll mode:
        watching the vrings, as in an appliance VM; else the MSI-X vectors)."""
        self.link = link
        self.stop = stop
        self.poll = poll or not link.interrupts
        self.kick_fds = kick_fds
        self.reply_wait = reply_wait
        self.spin = spin_us / 1e6
        self.backend = UnixChannel(sock)
        self.backend_req: UnixChannel | None = None
        self.requests: deque[tuple[Message, bytes]] = deque()  # back-end requests waiting
        self.awaiting_ack = False
        self.protocol_features = 0
        self.replies: deque[tuple[int, float]] = deque()  # (request, deadline) unanswered
        self.rings = RingWatch()
        self.region_fds: dict[tuple[int, int], tuple[int, int]] = {}  # (gpa, size) -> fd, off
        self.calls: dict[int, Notifier] = {}  # our eventfd -> its doorbell
        self.call_of: dict[tuple[str, int], int] = {}  # (kind, vring) -> our eventfd
        self.handlers: dict[int, Callable[[], None]] = {}
        self.poller = select.poll()
        self._watch(self.backend.fileno(), self._from_backend)
        for fd in link.event_fds():
            self._watch(fd, self._from_device)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Relay until the session ends (SessionEnded) or a stop signal comes (Shutdown)."""
        if self.poll:
            _fine_timer_slack()
        while True:
            # the loop polls while it has vrings to watch (the consumer's own kick eventfds
            # went to the back-end where the device could hand them over) or no interrupts
            polling = bool(self.rings.kicks) or not self.link.interrupts
            if polling:
                self._watch_rings(CONTROL_EVERY)
            for fd, _ev in self.poller.poll(0 if polling else IDLE_WAIT * 1000):
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler()
            self.stop.check()
            if not self.link.interrupts:
                self._take_rx()
                if not self.link.in_session():  # read every STATUS_POLL seconds
                    raise SessionEnded("the consumer's session ended")
            self._check_peers()

    def _check_peers(self) -> None:
        """A back-end that leaves a message half sent, stops reading, or does not answer
        ends the session (its request channel: only that channel)."""
        self._flush(self.backend)
        try:
            self.backend.check()
        except (OSError, PeerClosed) as e:
            raise SessionEnded(f"the back-end: {e}") from e
        if self.replies and time.monotonic() > self.replies[0][1]:
            raise SessionEnded(f"the back-end did not answer "
                               f"{Channel.FRONTEND.name_of(self.replies[0][0])} within "
                               f"{self.reply_wait:g} s")
        ch = self.backend_req
        if ch is not None:
            try:
                ch.flush()
                ch.check()
            except (OSError, PeerClosed) as e:
                self._end_backend_channel(f"{e}")

    def _watch_rings(self, seconds: float) -> None:
        """Poll mode's data path for `seconds`: kick the back-end when a vring's avail
        index moves; spin `spin_us` after the last move, then look every POLL_PAUSE.
        (Everything else — messages, calls to relay, deadlines — is looked at between
        two such rounds: a message waits at most that long.)"""
        now = time.monotonic()
        end, last = now + seconds, now
        look, sleep, spin = self.rings.look, time.sleep, self.spin
        while now < end:
            if look():
                last = now
            elif now - last >= spin:
                sleep(POLL_PAUSE)
            now = time.monotonic()

    def _watch(self, fd: int, fn: Callable[[], None]) -> None:
        self.poller.register(fd, select.POLLIN)
        self.handlers[fd] = fn

    def _unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def _flush(self, ch: UnixChannel) -> None:
        try:
            ch.flush()
        except (OSError, PeerClosed) as e:
            raise SessionEnded(f"the back-end stopped reading: {e}") from e

    # -- consumer -> back-end ---------------------------------------------------------------

    def _from_device(self) -> None:
        self._take_rx()
        if not self.link.in_session():
            raise SessionEnded("the consumer's session ended")

    def _take_rx(self) -> bool:
        messages = self.link.take_messages()
        for data in messages:
            self._from_consumer(data)
        return bool(messages)

    def _from_consumer(self, data: bytes) -> None:
        try:
            header, body, _ = split_message(data)
            if header.is_reply:  # the consumer's ack to a back-end request
                self._ack(header, body)
                return
            msg = decode_request(Channel.FRONTEND, header, body, None)
        except ProtocolError as e:  # the device validated it: something is badly wrong
            raise SessionEnded(f"rxq: {e}") from e
        fds: list[int] = []  # ours until sent (the stream sends duplicates)
        name = Channel.FRONTEND.name_of(msg.request)
        try:
            msg = self._rewrite(msg, fds)
            log.debug("consumer -> back-end: %s%s", name, f" ({len(fds)} fds)" if fds else "")
            self.backend.stream.send(encode(msg), fds)
        except (OSError, PeerClosed, MemoryTableError, LinkError, DeviceError, ProtocolError,
                VfioUserError) as e:
            raise SessionEnded(f"{name}: {e}") from e
        finally:
            close_fds(fds)
        if expects_reply(Channel.FRONTEND, msg, self.protocol_features):
            self.replies.append((msg.request, time.monotonic() + self.reply_wait))

    def _rewrite(self, msg: Message, fds: list[int]) -> Message:
        """The message as the back-end must get it; the fds to go with it are appended to
        `fds` as they are made (the caller closes them, whatever happens)."""
        pl, req = msg.payload, msg.request
        if req == F.SET_PROTOCOL_FEATURES:
            assert isinstance(pl, p.U64)
            self.protocol_features = pl.value
        elif req == F.SET_MEM_TABLE:
            assert isinstance(pl, p.MemTable)
            self._forget_regions()
            regions = [self._region(r, fds) for r in pl.regions]
            if self.poll:
                self.rings.set_table([Mapped(r, self.link.window_view(r)) for r in pl.regions])
            return replace(msg, payload=p.MemTable(tuple(regions)))
        elif req in (F.ADD_MEM_REG, F.REM_MEM_REG):
            assert isinstance(pl, p.SingleMemRegion)
            if req == F.ADD_MEM_REG:
                out = self._region(pl.region, fds)
                if self.poll:
                    self.rings.add(Mapped(pl.region, self.link.window_view(pl.region)))
            else:  # the file may have left the window already: the fd we gave for it
                key = (pl.region.guest_addr, pl.region.size)
                known = self.region_fds.pop(key, None)
                if known is None:
                    raise SessionEnded(f"REM_MEM_REG of a region never added: {pl.region}")
                fds.append(known[0])
                out = replace(pl.region, mmap_offset=known[1])
                self.rings.remove(pl.region)
            return replace(msg, payload=p.SingleMemRegion(out))
        elif req == F.SET_FEATURES:
            assert isinstance(pl, p.U64)
            self.rings.set_features(pl.value)
        elif req == F.SET_VRING_NUM:
            assert isinstance(pl, p.VringState)
            self.rings.set_num(pl.index, pl.num)
        elif req == F.SET_VRING_ADDR:
            assert isinstance(pl, p.VringAddr)
            self.rings.set_addr(pl.index, pl.avail, pl.used)
        elif req in (F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR):
            assert isinstance(pl, p.VringFile)
            if pl.nofd:
                if req == F.SET_VRING_KICK:
                    self.rings.unwatch(pl.index)
                return msg
            if req == F.SET_VRING_KICK:
                self._kick(pl.index, fds)
            else:
                self._call("call" if req == F.SET_VRING_CALL else "err", pl.index, fds)
            return msg
        elif req == F.GET_VRING_BASE:  # the device drops the vring's eventfds
            assert isinstance(pl, p.VringState)
            self.rings.unwatch(pl.index)
            for kind in ("call", "err"):
                self._drop_call(kind, pl.index)
        elif req == F.SET_BACKEND_REQ_FD:
            fds.append(self._backend_channel())
        elif req == F.SET_LOG_BASE:  # the device placed the log in the window
            assert isinstance(pl, p.LogBase)
            fd, off = self.link.window_fd(p.MemRegion(0, pl.mmap_size, 0, pl.mmap_offset))
            fds.append(fd)
            return replace(msg, payload=p.LogBase(pl.mmap_size, off))
        elif req == F.SET_LOG_FD:  # the log doorbell rings SET_LOG_FD's eventfd
            self._call("log", 0, fds)
        elif expected_fds(Channel.FRONTEND, msg):
            raise SessionEnded(f"{Channel.FRONTEND.name_of(req)}: the device let through a "
                               "request with fds")
        return msg

    def _region(self, r: p.MemRegion, fds: list[int]) -> p.MemRegion:
        """Region `r` as the back-end maps it; its fd appended to `fds`."""
        fd, off = self.link.window_fd(r)
        key = (r.guest_addr, r.size)
        old = self.region_fds.pop(key, None)
        if old is not None:
            os.close(old[0])
        self.region_fds[key] = (fd, off)  # kept for REM_MEM_REG
        fds.append(os.dup(fd))
        return replace(r, mmap_offset=off)

    def _forget_regions(self) -> None:
        for fd, _ in self.region_fds.values():
            os.close(fd)
        self.region_fds.clear()

    def _watches_rings(self) -> bool:
        """Whether kicks will come from the ring watcher (poll mode with no kick
        eventfds handed over)."""
        return self.poll and not (self.kick_fds and self.link.access.hands_over_fds)

    def _kick(self, vring: int, fds: list[int]) -> None:
        """The back-end's kick eventfd for `vring`, appended to `fds`: the consumer's own
        where the device hands it over (vfio-user), else the vring's MSI-X vector, else
        (poll mode) one the bridge signals when the vring's avail index moves."""
        self.rings.unwatch(vring)
        own = self.link.kick_fd(vring) if self.kick_fds else None
        if own is not None:
            fds.append(own)
            log.debug("vring %d: the back-end reads the consumer's kick eventfd", vring)
            os.set_blocking(own, False)  # the consumer's: never wait on its counter
            _signal(own)  # a kick the device took before it handed the fd over
            return
        if vring < self.link.max_queues:
            vector = NO_VECTOR if self.poll else V_FIRST_VRING + vring
            self.link.notification_vector(vring, vector)
            if not self.poll:
                log.debug("vring %d: kicks raise MSI-X vector %d", vring, vector)
                fds.append(os.dup(self.link.pci.vectors[vector]))
                _signal(fds[-1])  # a kick the device took while the vring had no vector
                return
        log.debug("vring %d: the bridge watches its avail index", vring)
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds.append(os.dup(efd))
        self.rings.watch(vring, efd)

    def _call(self, kind: str, vring: int, fds: list[int]) -> None:
        """The back-end's call (err; "log": SET_LOG_FD's) eventfd for `vring`, appended to
        `fds`: the doorbell's own ioeventfd (vfio-user), or one of ours that rings the
        doorbell when signalled (MMIO, in the appliance VM). The device may have dropped
        that doorbell by now (it reads ahead of us: a GET_VRING_BASE came): then an
        eventfd nobody reads, as the device ignores a doorbell with no target."""
        if vring >= self.link.max_queues:
            raise LinkError(f"vring {vring}: the device has {self.link.max_queues}")
        n = self.link.max_queues
        offset = 4 * (vring if kind == "call" else n + vring if kind == "err" else 2 * n)
        self._drop_call(kind, vring)
        if self.link.access.hands_over_fds:
            fd = self.link.doorbell_fd(offset)
            fds.append(fd if fd is not None
                       else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            return
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            notifier = self.link.doorbell(offset)
        except BaseException:
            os.close(efd)
            raise
        self.calls[efd] = notifier
        self.call_of[(kind, vring)] = efd
        self._watch(efd, lambda: self._ring(efd))
        fds.append(os.dup(efd))

    def _ring(self, efd: int) -> None:
        try:
            os.eventfd_read(efd)
        except BlockingIOError:
            return
        self.calls[efd].notify()

    def _drop_call(self, kind: str, vring: int) -> None:
        efd = self.call_of.pop((kind, vring), None)
        if efd is not None:
            self._unwatch(efd)
            self.calls.pop(efd).close()
            os.close(efd)

    # -- back-end -> consumer ---------------------------------------------------------------

    def _from_backend(self) -> None:
        try:
            messages = self.backend.poll()
        except (OSError, PeerClosed, ProtocolError) as e:
            raise SessionEnded(f"the back-end's connection: {e or type(e).__name__}") from e
        for _, _, fds in messages:  # none of them can cross the device
            close_fds(fds)
        for header, body, fds in messages:
            if not header.is_reply:
                raise SessionEnded(f"the back-end sent request {header.request} on the "
                                   "front-end's channel")
            if fds:  # the device masks the features whose replies carry fds
                log.warning("the back-end's reply to %s carries %d fds, which cannot cross "
                            "the device: dropped", Channel.FRONTEND.name_of(header.request),
                            len(fds))
            log.debug("back-end -> consumer: reply to %s",
                      Channel.FRONTEND.name_of(header.request))
            if self.replies:
                self.replies.popleft()
            if header.request == F.GET_FEATURES and len(body) == 8:
                value = int.from_bytes(body, "little")
                if self._watches_rings():  # the watcher reads split rings only
                    value &= ~(1 << F_RING_PACKED)
                if not self.link.access.shared_log:
                    value &= ~LOG_ALL  # no dirty log in an appliance VM (vvu_access.py)
                body = value.to_bytes(8, "little")
            elif (header.request == F.GET_PROTOCOL_FEATURES and len(body) == 8
                  and not self.link.access.shared_log):
                value = int.from_bytes(body, "little") & ~int(ProtocolFeature.LOG_SHMFD)
                body = value.to_bytes(8, "little")
            self._to_txq(encode_raw(header, body))

    def _to_txq(self, data: bytes) -> None:
        try:
            self.link.send(data)
        except OSError as e:  # TxqFull among them
            raise SessionEnded(f"txq: {e}") from e

    def _backend_channel(self) -> int:
        """SET_BACKEND_REQ_FD: the back-end gets one end of a new pair (the consumer's
        channel stays with the device)."""
        if self.backend_req is not None:
            self._end_backend_channel("replaced")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend_req = UnixChannel(ours)
        self._watch(ours.fileno(), self._from_backend_req)
        return theirs.detach()

    def _end_backend_channel(self, why: str) -> None:
        """Only the back-end's request channel ends (as it would without us)."""
        ch = self.backend_req
        if ch is None:
            return
        log.info("the back-end's request channel ended: %s", why)
        self._unwatch(ch.fileno())
        ch.close()
        self.backend_req = None
        self.requests.clear()  # an ack still due is dropped when it comes (_ack)

    def _from_backend_req(self) -> None:
        ch = self.backend_req
        assert ch is not None
        try:
            messages = ch.poll()
        except (OSError, PeerClosed, ProtocolError) as e:
            self._end_backend_channel(str(e) or type(e).__name__)
            return
        for _, _, fds in messages:  # none of them can cross the device
            close_fds(fds)
        for header, body, fds in messages:
            if self.backend_req is not ch:
                return
            self._backend_request(ch, header, body, len(fds))

    def _backend_request(self, ch: UnixChannel, header: Header, body: bytes,
                         nfds: int) -> None:
        name = Channel.BACKEND.name_of(header.request)
        try:
            msg = decode_request(Channel.BACKEND, header, body, nfds)
        except ProtocolError as e:
            log.warning("back-end request refused: %s", e)
            if header.need_reply and self.protocol_features & ProtocolFeature.REPLY_ACK:
                self._refuse(ch, Message(header.request, p.Empty(), header.flags))
            return
        if msg.request not in BACKEND_REQUESTS or nfds:
            log.warning("back-end request %s refused: it cannot cross the virtio-vhost-user "
                        "device (it needs an fd to reach the consumer, or a feature the "
                        "device masks)", name)
            if expects_reply(Channel.BACKEND, msg, self.protocol_features):
                self._refuse(ch, msg)
            return
        if msg.need_reply and not self.protocol_features & ProtocolFeature.REPLY_ACK:
            msg = replace(msg, flags=msg.flags & ~HeaderFlag.NEED_REPLY)  # as the spec says
        if len(self.requests) >= MAX_QUEUED_REQUESTS:
            self._end_backend_channel(f"{len(self.requests)} requests wait for the "
                                      "consumer's ack of an earlier one")
            return
        self.requests.append((msg, encode(msg)))
        self._next_request()

    def _refuse(self, ch: UnixChannel, msg: Message) -> None:
        """Answer a back-end request that waits for an ack with a failure."""
        try:
            ch.stream.send(encode(reply_to(msg, p.U64(1))))
        except (OSError, PeerClosed) as e:
            self._end_backend_channel(str(e) or type(e).__name__)

    def _next_request(self) -> None:
        """Back-end requests go on txq one at a time: the device relays one, and the next
        only after the consumer's ack, when one is due."""
        while self.requests and not self.awaiting_ack:
            msg, data = self.requests.popleft()
            log.debug("back-end -> consumer: %s", Channel.BACKEND.name_of(msg.request))
            self._to_txq(data)
            self.awaiting_ack = expects_reply(Channel.BACKEND, msg, self.protocol_features)

    def _ack(self, header: Header, body: bytes) -> None:
        if not self.awaiting_ack:
            raise SessionEnded("rxq: an ack nobody waits for")
        self.awaiting_ack = False
        if self.backend_req is not None:
            try:
                self.backend_req.stream.send(encode_raw(header, body))
            except (OSError, PeerClosed) as e:
                self._end_backend_channel(str(e) or type(e).__name__)
        self._next_request()

    # -- the end ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close everything of the session: the back-end sees its front-end go."""
        self.rings.close()
        for kind, vring in list(self.call_of):
            self._drop_call(kind, vring)
        self._forget_regions()
        if self.backend_req is not None:
            self.backend_req.close()
            self.backend_req = None
        self.backend.close()
