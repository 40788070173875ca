"""The virtio-vhost-user relay: vhost-user messages between the consumer's socket and the
appliance driver's virtqueues, with the fds they carry turned into device resources.

It knows nothing of PCI or vfio-user: the device model gives it a `DriverSide` (put a
message in rxq, ring an interrupt) and feeds it txq messages, doorbell writes and kicks.
See docs/vvu-design.md for the rules implemented here.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from ..engine.notify import is_eventfd
from ..protocol import (
    HEADER_SIZE,
    Channel,
    FrontendReq,
    Header,
    HeaderFlag,
    Message,
    ProtocolError,
    ProtocolFeature,
    decode_header,
    decode_reply,
    decode_request,
    encode,
    expects_reply,
    has_own_reply,
    reply_to,
)
from ..protocol import payloads as p
from ..protocol.constants import LOG_ALL, VERSION
from ..sockets import PeerClosed, PeerStalled
from ..unix_channel import UnixChannel
from .abi import BACKEND_REQUESTS

log = logging.getLogger(__name__)

F = FrontendReq
PF = ProtocolFeature

# Protocol features that need no fd to cross the device, in either direction.
# BACKEND_REQ crosses: the device keeps the consumer's back-end channel (the fd of
# SET_BACKEND_REQ_FD) and relays the back-end requests that carry no fd.
ALLOWED_PROTOCOL_FEATURES = int(PF.MQ | PF.RARP | PF.REPLY_ACK | PF.MTU | PF.BACKEND_REQ
                                | PF.CROSS_ENDIAN | PF.CRYPTO_SESSION | PF.CONFIG
                                | PF.RESET_DEVICE | PF.CONFIGURE_MEM_SLOTS | PF.STATUS)
# The dirty log crosses too (live migration), where the window can take its file: the
# device places it in the window like a memory file (SET_LOG_BASE relayed with its window
# offset) and the log doorbell signals SET_LOG_FD's eventfd. Not with a pinned window file
# (an appliance VM's BAR): the log is a file of the consumer's own.
LOG_PROTOCOL_FEATURES = int(PF.LOG_SHMFD)

# Requests that would need fds to travel further than the device (or back).
FORBIDDEN = frozenset({
    F.POSTCOPY_ADVISE, F.POSTCOPY_LISTEN, F.POSTCOPY_END, F.GET_INFLIGHT_FD,
    F.SET_INFLIGHT_FD, F.GPU_SET_SOCKET, F.IOTLB_MSG, F.GET_SHARED_OBJECT,
    F.SET_DEVICE_STATE_FD, F.CHECK_DEVICE_STATE, F.GET_SHMEM_CONFIG,
})
LOG_REQUESTS = frozenset({F.SET_LOG_BASE, F.SET_LOG_FD})

class RxResult(Enum):
    OK = auto()
    NO_BUFFER = auto()  # nothing posted: try again when the driver posts buffers
    TOO_SMALL = auto()  # the posted buffer cannot hold the message: a device error


class DriverSide(Protocol):
    """What the device model provides to the relay."""

    def rx_put(self, message: bytes) -> RxResult: ...

    def kick_arrived(self, vring: int) -> None:
        """The consumer kicked `vring`: raise that vring's notification (if any)."""
        ...

    def frontend_changed(self) -> None:
        """FRONTEND_UP changed by the device: send a config-change interrupt."""
        ...

    def session_ended(self) -> None:
        """The consumer's session is over, however it ended: forget per-session state."""
        ...

    def discard_txq(self) -> None:
        """Consume what the driver has put in txq, unread (a session boundary)."""
        ...

    def device_error(self) -> None:
        """Set DEVICE_NEEDS_RESET and tell the driver."""
        ...


class RelayError(Exception):
    """A side broke the rules; the session ends."""


FILE_ALIGN = 2 << 20  # each memory file starts on a 2 MiB boundary of the window


@dataclass
class WindowFile:
    """One of the consumer's memory files, placed in the shared-memory window at `base`."""

    fd: int
    file_id: tuple[int, int]
    base: int
    size: int  # the file's size: all of it is placed, whatever the regions use


def _regular_file(fd: int, what: str) -> os.stat_result:
    """fstat of a file the consumer sent to be placed in the window: a regular file (a
    memfd), which a client can map; anything else is refused."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise RelayError(f"unusable {what} fd: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise RelayError(f"the {what} fd is not a regular file")
    return st


def _hung_up(fd: int) -> bool:
    """Whether the peer of socket `fd` has closed it (POLLHUP), without reading."""
    p = select.poll()
    p.register(fd, 0)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


MAX_FILES = 64  # memory files of one consumer (vfio-user regions 9, 10, ...)


class Relay:
    def __init__(self, driver: DriverSide, max_queues: int, window_size: int = 1 << 40,
                 pinned: WindowFile | None = None) -> None:
        self.driver = driver
        self.max_queues = max_queues
        self.window_size = window_size
        self.pinned = pinned  # the device's own window file (--window-file), at base 0
        self.conn: UnixChannel | None = None
        self.backend_up = False
        self.protocol_features = 0  # as the consumer set them (masked)
        self.regions: list[p.MemRegion] = []  # as relayed: mmap_offset = window offset
        self.files: list[WindowFile] = [pinned] if pinned is not None else []
        self.calls: dict[int, int] = {}
        self.errs: dict[int, int] = {}
        self.kicks: dict[int, int] = {}  # vring -> the consumer's kick eventfd
        self.parked: bytes | None = None  # a message waiting for an rxq buffer
        self.awaiting: int | None = None  # the request whose reply the consumer waits for
        self.backend: UnixChannel | None = None  # the consumer's back-end request channel
        self.backend_awaiting: int | None = None  # a back-end request awaiting its ack
        self.log_file: WindowFile | None = None  # SET_LOG_BASE's file, in the window
        self.log_fd: int | None = None  # SET_LOG_FD's eventfd: the log doorbell's target

    @property
    def allowed_protocol_features(self) -> int:
        """What may cross: the dirty log only where the window can hold its file."""
        return ALLOWED_PROTOCOL_FEATURES | (LOG_PROTOCOL_FEATURES if self.pinned is None
                                            else 0)

    # -- session ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.backend_up

    def status(self) -> int:
        return (1 if self.backend_up else 0) | (2 if self.connected else 0)

    def attach(self, sock: socket.socket) -> None:
        """A consumer connected (the device accepts only when none is)."""
        was = self.connected
        self.conn = UnixChannel(sock)
        log.info("consumer connected")
        if self.connected != was:
            self.driver.frontend_changed()

    def set_backend_up(self, up: bool) -> None:
        if up == self.backend_up:
            return
        log.info("driver %s BACKEND_UP", "set" if up else "cleared")
        if up:  # whatever the driver left in txq was for an earlier session
            self.driver.discard_txq()
        self.backend_up = up
        if up:
            if self.connected:  # a consumer was already waiting
                self.driver.frontend_changed()
        else:  # the driver's own action: no config interrupt
            self.end_session("the driver cleared BACKEND_UP", notify=False)

    def end_session(self, why: str, notify: bool = True) -> None:
        """End the consumer's session. Unless the driver ended it, status drops to 0
        (BACKEND_UP too, as in the prototypes' state machine), so the driver always sees
        the boundary and must set BACKEND_UP again before the next consumer is served."""
        was = self.connected
        if notify:
            self.backend_up = False
        if self.conn is not None:
            log.info("consumer session ended: %s", why)
            self.conn.close()
            self.conn = None
        for table in (self.calls, self.errs, self.kicks):
            for fd in table.values():
                os.close(fd)
            table.clear()
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None
        self.log_file = None  # closed with the other files below
        self.parked = None
        self.awaiting = None
        self._drop_backend()
        self.protocol_features = 0
        # The next consumer brings its own memory: forget this one's (the appliance's
        # mappings stay valid until it drops them; it re-reads the window on the next table).
        self._drop_files()
        self.driver.session_ended()
        if was and notify:
            self.driver.frontend_changed()

    def close(self) -> None:
        self.end_session("device closed", notify=False)
        self.backend_up = False
        if self.pinned is not None:
            os.close(self.pinned.fd)
            self.pinned = None
            self.files = []

    # -- consumer -> driver ----------------------------------------------------------------

    def wants_consumer(self) -> bool:
        """Whether the device should read the consumer's socket now."""
        return self.connected and self.parked is None and self.awaiting is None

    def channels(self) -> list[UnixChannel]:
        """The consumer's sockets (its connection, its back-end channel)."""
        return [c for c in (self.conn, self.backend) if c is not None]

    def check_peers(self) -> None:
        """End the session of a consumer that stalled (half a message, or ours unread, for
        longer than the message timeout)."""
        for chan in self.channels():
            reading = (self.wants_consumer() if chan is self.conn else self.wants_backend())
            try:
                chan.check(reading=reading)
            except PeerStalled as e:
                self.end_session(f"the consumer stalled: {e}")
                return

    def on_consumer(self) -> None:
        """The consumer's socket is ready: send what waits for it, then relay one message
        (or end the session). Never blocks on the consumer."""
        if self.conn is None:
            return  # the session ended earlier in this round of events
        try:
            self.conn.flush()
            if not self.wants_consumer():  # rxq is full, or a reply is due: the message
                if _hung_up(self.conn.fileno()):  # waits in the socket, unless the
                    raise PeerClosed()  # consumer has gone
                return
            got = self.conn.poll(limit=1)
        except PeerClosed:
            self.end_session("the consumer disconnected")
            return
        except (ProtocolError, OSError) as e:
            self.end_session(f"bad message from the consumer: {e}")
            return
        if not got:
            return
        ((header, body, fds),) = got
        try:
            data = self._from_consumer(header, body, fds)
        except (ProtocolError, RelayError) as e:
            for fd in fds:
                os.close(fd)
            self._refuse(header, str(e))
            return
        log.debug("consumer -> driver: %s (%d bytes)", Channel.FRONTEND.name_of(header.request),
                  len(data))
        self.parked = data
        self.retry_rx()

    def retry_rx(self) -> None:
        """Put the parked message into rxq if the driver has posted a buffer."""
        if self.parked is None:
            return
        result = self.driver.rx_put(self.parked)
        log.debug("rxq: %s", result.name)
        if result is RxResult.OK:
            self.parked = None
        elif result is RxResult.TOO_SMALL:
            log.error("rxq buffer too small for a %d-byte message", len(self.parked))
            self.driver.device_error()
            self.end_session("message larger than the rxq buffer")

    def _refuse(self, header: Header, why: str) -> None:
        """The device answers a request it will not relay: a NACK when the consumer asked
        for an ack and awaits nothing else, otherwise the session ends."""
        bare = Message(header.request, p.Empty(), header.flags)
        ack = header.need_reply and self.protocol_features & PF.REPLY_ACK
        own = False
        try:
            own = has_own_reply(Channel.FRONTEND, bare, self.protocol_features)
        except ProtocolError:
            pass
        if ack and not own and self.conn is not None:
            log.error("refused consumer request %d: %s", header.request, why)
            self._to_consumer(reply_to(bare, p.U64(1)))
            return
        self.end_session(f"consumer request {header.request} refused: {why}")

    def _from_consumer(self, header: Header, body: bytes, fds: list[int]) -> bytes:
        msg = decode_request(Channel.FRONTEND, header, body, len(fds))
        code = msg.request
        if code in FORBIDDEN or (code in LOG_REQUESTS and not self.protocol_features
                                 & LOG_PROTOCOL_FEATURES):
            raise RelayError(f"{F(code).name} cannot cross the device"
                             + (" (LOG_SHMFD not negotiated)" if code in LOG_REQUESTS else ""))
        if code == F.SET_PROTOCOL_FEATURES:
            assert isinstance(msg.payload, p.U64)
            masked = msg.payload.value & self.allowed_protocol_features
            self.protocol_features = masked
            msg = Message(code, p.U64(masked), msg.flags)
        elif code in (F.SET_MEM_TABLE, F.ADD_MEM_REG, F.REM_MEM_REG):
            msg = self._memory(msg, fds)
        elif code in (F.SET_VRING_CALL, F.SET_VRING_ERR, F.SET_VRING_KICK):
            self._vring_fd(msg, fds)
        elif code == F.SET_LOG_BASE:
            msg = self._log_base(msg, fds)
        elif code == F.SET_LOG_FD:
            self._log_fd(fds)
        elif code == F.GET_VRING_BASE:
            assert isinstance(msg.payload, p.VringState)
            self._drop_vring(msg.payload.index)
        elif code == F.SET_BACKEND_REQ_FD:
            if not self.protocol_features & PF.BACKEND_REQ:
                raise RelayError("SET_BACKEND_REQ_FD without BACKEND_REQ negotiated")
            self._drop_backend()
            fd = fds.pop()
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                os.close(fd)
                raise RelayError(f"the back-end channel is not a socket: {e}") from e
            self.backend = UnixChannel(sock)
        else:
            for fd in fds:  # only REM_MEM_REG may carry a stray one; it is handled above
                os.close(fd)
        if expects_reply(Channel.FRONTEND, msg, self.protocol_features):
            self.awaiting = code
        return encode(msg)

    def _vring_fd(self, msg: Message, fds: list[int]) -> None:
        pl = msg.payload
        assert isinstance(pl, p.VringFile)
        if pl.index >= self.max_queues:
            raise RelayError(f"vring {pl.index} beyond max_vhost_queues {self.max_queues}")
        table = {F.SET_VRING_CALL: self.calls, F.SET_VRING_ERR: self.errs,
                 F.SET_VRING_KICK: self.kicks}[FrontendReq(msg.request)]
        if fds and not is_eventfd(fds[0]):
            raise RelayError(f"the {F(msg.request).name} fd is not an eventfd")
        old = table.pop(pl.index, None)
        if old is not None:
            os.close(old)
        if fds:
            os.set_blocking(fds[0], False)
            table[pl.index] = fds.pop()

    def _log_base(self, msg: Message, fds: list[int]) -> Message:
        """Place the log's file in the window (it stays there across memory tables, as
        the log does) and relay SET_LOG_BASE with the log's window offset."""
        pl = msg.payload
        assert isinstance(pl, p.LogBase)
        fd = fds.pop()
        try:
            st = _regular_file(fd, "log")
            if not pl.mmap_size or pl.mmap_offset + pl.mmap_size > st.st_size:
                raise RelayError(f"a log of {pl.mmap_size} bytes at {pl.mmap_offset} in a "
                                 f"{st.st_size}-byte file")
            old = self.log_file
            if (old is not None and old.file_id != (st.st_dev, st.st_ino)
                    and old is not self.pinned and not any(
                        old.base <= r.mmap_offset < old.base + old.size
                        for r in self.regions)):
                self.files.remove(old)  # a log replaced (QEMU makes one per migration)
                os.close(old.fd)
                self.log_file = None
            f = self._file(fd, st)
        finally:
            os.close(fd)
        self.log_file = f
        return Message(msg.request, p.LogBase(pl.mmap_size, f.base + pl.mmap_offset),
                       msg.flags)

    def _log_fd(self, fds: list[int]) -> None:
        if not fds or not is_eventfd(fds[0]):
            raise RelayError("the SET_LOG_FD fd is not an eventfd")
        if self.log_fd is not None:
            os.close(self.log_fd)
        os.set_blocking(fds[0], False)
        self.log_fd = fds.pop()

    def _drop_vring(self, index: int) -> None:
        for table in (self.kicks, self.calls, self.errs):
            fd = table.pop(index, None)
            if fd is not None:
                os.close(fd)

    def _memory(self, msg: Message, fds: list[int]) -> Message:
        """Place the regions' files in the window and relay the regions with mmap_offset
        rewritten to their offset in the window (the fd it was relative to is gone)."""
        code = msg.request
        pl = msg.payload
        if code == F.REM_MEM_REG:
            for fd in fds:
                os.close(fd)
            fds.clear()
            assert isinstance(pl, p.SingleMemRegion)
            key = (pl.region.guest_addr, pl.region.user_addr, pl.region.size)
            placed = [x for x in self.regions if (x.guest_addr, x.user_addr, x.size) == key]
            self.regions = [x for x in self.regions if x not in placed]
            region = placed[0] if placed else pl.region
            return Message(code, p.SingleMemRegion(region), msg.flags)
        if code == F.SET_MEM_TABLE:
            assert isinstance(pl, p.MemTable)
            self._drop_files()
            wanted = list(pl.regions)
        else:
            assert isinstance(pl, p.SingleMemRegion)
            wanted = [pl.region]
        if len(fds) != len(wanted):
            raise RelayError("a memory region without a file descriptor")
        placed = [self._place(r, fd) for r, fd in zip(wanted, fds, strict=True)]
        for fd in fds:  # placed files hold dups; on an error the caller closes them
            os.close(fd)
        fds.clear()
        self.regions += placed
        if code == F.SET_MEM_TABLE:
            return Message(code, p.MemTable(tuple(placed)), msg.flags)
        return Message(code, p.SingleMemRegion(placed[0]), msg.flags)

    def _place(self, r: p.MemRegion, fd: int) -> p.MemRegion:
        st = _regular_file(fd, "memory")
        if r.mmap_offset + r.size > st.st_size:
            raise RelayError(f"region {r} runs past the end of its file")
        f = self._file(fd, st)
        return p.MemRegion(r.guest_addr, r.size, r.user_addr, f.base + r.mmap_offset)

    def _file(self, fd: int, st: os.stat_result) -> WindowFile:
        """File `fd`'s place in the window: where it already is, else the first gap
        (2 MiB aligned) that holds it between the files placed (`files` stays in window
        order: a log kept across memory tables leaves the memory its old place)."""
        fid = (st.st_dev, st.st_ino)
        f = next((x for x in self.files if x.file_id == fid), None)
        if f is not None:
            return f
        if len(self.files) >= MAX_FILES:
            raise RelayError(f"the consumer's memory is in more than {MAX_FILES} files")
        base, at = 0, len(self.files)
        for i, x in enumerate(self.files):
            if base + st.st_size <= x.base:
                at = i
                break
            base = -(-(x.base + x.size) // FILE_ALIGN) * FILE_ALIGN
        if base + st.st_size > self.window_size:
            raise RelayError(f"the consumer's memory needs {base + st.st_size:#x} bytes "
                             f"of window, the BAR has {self.window_size:#x} (--window-size)")
        try:
            dup = os.dup(fd)
        except OSError as e:
            raise RelayError(f"cannot keep the consumer's file: {e}") from e
        f = WindowFile(dup, fid, base, st.st_size)
        self.files.insert(at, f)
        return f

    def _drop_files(self) -> None:
        """Forget the memory files (a new table, or the session's end); the pinned window
        file and the log's stay (the log's until the session ends)."""
        keep = [f for f in (self.pinned, self.log_file) if f is not None]
        for f in self.files:
            if f not in keep:
                os.close(f.fd)
        self.files = keep
        self.regions = []

    def file_at(self, offset: int) -> WindowFile | None:
        """The memory file holding window byte `offset`."""
        for f in self.files:
            if f.base <= offset < f.base + f.size:
                return f
        return None

    # -- back-end requests ------------------------------------------------------------------

    def _drop_backend(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self.backend_awaiting = None

    def wants_backend(self) -> bool:
        """Whether the device should read the consumer's back-end channel (an ack is due
        and rxq has room for it)."""
        return (self.backend is not None and self.backend_awaiting is not None
                and self.connected and self.parked is None)

    def on_backend(self) -> None:
        """The consumer acknowledged a back-end request: the ack goes into rxq (REPLY set:
        the driver tells it from the consumer's requests, which never have it)."""
        if self.backend is None:
            return
        try:
            self.backend.flush()
            if not self.wants_backend():
                return
            awaited = self.backend_awaiting
            assert awaited is not None
            got = self.backend.poll(limit=1)
            if not got:
                return
            ((header, body, fds),) = got
            for fd in fds:
                os.close(fd)
            msg = decode_reply(Channel.BACKEND, awaited, header, body, len(fds))
        except (PeerClosed, ProtocolError, OSError) as e:
            self.end_session(f"the consumer's back-end channel failed: {str(e) or 'closed'}")
            return
        self.backend_awaiting = None
        log.debug("consumer -> driver: %s ack", Channel.BACKEND.name_of(awaited))
        self.parked = encode(msg)
        self.retry_rx()

    def _backend_request(self, header: Header, body: bytes) -> None:
        msg = decode_request(Channel.BACKEND, header, body, 0)
        if msg.request not in BACKEND_REQUESTS:
            raise ProtocolError(f"back-end request {Channel.BACKEND.name_of(msg.request)} "
                                "cannot cross the device")
        if self.backend is None:
            raise ProtocolError("a back-end request, but the consumer gave no back-end "
                                "channel (SET_BACKEND_REQ_FD)")
        if self.backend_awaiting is not None:
            raise ProtocolError("a back-end request while the last one awaits its ack")
        if header.need_reply:
            if not self.protocol_features & PF.REPLY_ACK:
                raise ProtocolError("a back-end request with NEED_REPLY, but REPLY_ACK was "
                                    "not negotiated")
            self.backend_awaiting = msg.request
        log.debug("driver -> consumer: %s", Channel.BACKEND.name_of(msg.request))
        try:
            self.backend.send_nowait(msg)
        except (OSError, PeerClosed) as e:
            self.end_session(f"cannot write to the consumer's back-end channel: {e}")

    # -- driver -> consumer ------------------------------------------------------------------

    def from_driver(self, data: bytes) -> None:
        """One txq message from the driver: a reply the consumer waits for, or a back-end
        request (no REPLY flag) for the consumer's back-end channel."""
        if not self.backend_up:  # the session it answered has ended: nobody waits for it
            log.debug("txq message after the session ended: dropped")
            return
        try:
            header = self._check_size(data)
            if not header.is_reply:
                self._backend_request(header, data[HEADER_SIZE:])
                return
            msg = self._check_reply(header, data)
        except ProtocolError as e:
            log.error("bad txq message from the driver: %s", e)
            self.end_session(f"driver protocol violation: {e}")
            return
        if self.conn is None:
            return  # the consumer has gone; nothing to answer
        log.debug("driver -> consumer: %s reply", Channel.FRONTEND.name_of(msg.request))
        self._to_consumer(msg)

    def _to_consumer(self, msg: Message) -> None:
        """Send to the consumer without waiting (what it does not take yet is flushed when
        its socket is writable; a consumer that stops reading stalls only its session)."""
        if self.conn is None:
            return
        try:
            self.conn.send_nowait(msg)
        except (OSError, PeerClosed) as e:
            self.end_session(f"cannot write to the consumer: {str(e) or 'it disconnected'}")

    @staticmethod
    def _check_size(data: bytes) -> Header:
        if len(data) < HEADER_SIZE:
            raise ProtocolError(f"txq message of {len(data)} bytes, shorter than a header")
        header = decode_header(data[:HEADER_SIZE])
        if HEADER_SIZE + header.size != len(data):
            raise ProtocolError(f"txq buffer holds {len(data)} bytes, the header says "
                                f"{HEADER_SIZE + header.size}")
        return header

    def _check_reply(self, header: Header, data: bytes) -> Message:
        if self.awaiting is None or header.request != self.awaiting:
            raise ProtocolError(f"reply to request {header.request}, but the consumer "
                                f"waits for {self.awaiting}")
        msg = decode_reply(Channel.FRONTEND, self.awaiting, header, data[HEADER_SIZE:])
        self.awaiting = None
        if msg.request == F.GET_PROTOCOL_FEATURES:
            assert isinstance(msg.payload, p.U64)
            msg = Message(msg.request,
                          p.U64(msg.payload.value & self.allowed_protocol_features),
                          VERSION | HeaderFlag.REPLY)
        elif msg.request == F.GET_FEATURES and self.pinned is not None:
            assert isinstance(msg.payload, p.U64)  # no dirty log: no VHOST_F_LOG_ALL
            msg = Message(msg.request, p.U64(msg.payload.value & ~LOG_ALL),
                          VERSION | HeaderFlag.REPLY)
        return msg

    # -- doorbells and kicks -----------------------------------------------------------------

    def doorbell(self, offset: int, multiplier: int = 4) -> None:
        """A driver write into the doorbell area at byte `offset`."""
        if offset % multiplier:
            return
        i, n = offset // multiplier, self.max_queues
        fd = (self.calls.get(i) if i < n else self.errs.get(i - n) if i < 2 * n
              else self.log_fd if i == 2 * n else None)
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except BlockingIOError:
                pass

    def on_kick(self, vring: int) -> None:
        fd = self.kicks.get(vring)
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.driver.kick_arrived(vring)
