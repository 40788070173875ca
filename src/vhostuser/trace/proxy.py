"""The tracing proxy: a front-end connects to us, we connect to the back-end, and every
message passes through unchanged — the same bytes, the same fds (our copies are closed
once passed on) — while it is decoded and reported. The back-end channel of
SET_BACKEND_REQ_FD is interposed too: the back-end gets our end of a fresh socket pair,
and its requests and the front-end's replies are relayed and reported alike.

Each direction is a thread that waits on its source, so a slow peer delays only the
traffic that waits for it, as without us.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..framer import close_fds
from ..protocol import FrontendReq, ProtocolFeature
from ..protocol.codec import Channel, Header, decode_request, encode_raw, expects_reply
from ..protocol.errors import ProtocolError
from ..shutdown import StopSignal
from ..unix_channel import UnixChannel
from .describe import is_reply, reply_event, request_event

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]


class TraceSession:
    """One front-end connection and its back-end connection, traced until either ends."""

    def __init__(self, front: socket.socket, back: socket.socket, emit: Emit,
                 frames: bool = False, device: dict[int, str] | None = None) -> None:
        """`frames`: each event also carries the message's bytes ("frame", hex) and its
        number of fds ("nfds"); `device`: the device type's feature bits by name."""
        self.emit_raw = emit
        self.frames = frames
        self.device = device
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.protocol_features = 0
        self.pending: dict[tuple[Channel, int], deque[float]] = {}
        self.channels: list[UnixChannel] = []
        self.threads: list[threading.Thread] = []
        self.done = threading.Event()
        self.front = self._channel(front)
        self.back = self._channel(back)

    def _channel(self, sock: socket.socket) -> UnixChannel:
        ch = UnixChannel(sock, message_timeout=3600.0)
        self.channels.append(ch)
        return ch

    def run(self, stop: StopSignal | None = None) -> None:
        """Relay until either peer goes (or a stop signal comes: Shutdown)."""
        self._pump(self.front, self.back, Channel.FRONTEND, "front")
        self._pump(self.back, self.front, Channel.FRONTEND, "back")
        try:
            while not self.done.wait(0.2):
                if stop is not None:
                    stop.check()
        finally:
            self._close()
            for t in self.threads:
                t.join(5)

    def _pump(self, src: UnixChannel, dst: UnixChannel, channel: Channel, way: str) -> None:
        t = threading.Thread(target=self._relay, args=(src, dst, channel, way), daemon=True,
                             name=f"trace-{way}")
        with self.lock:
            if self.done.is_set():  # the session is over: nothing more to relay
                return
        self.threads.append(t)
        t.start()

    def _relay(self, src: UnixChannel, dst: UnixChannel, channel: Channel, way: str) -> None:
        try:
            while not self.done.is_set():
                header, body, fds = src.recv_raw()
                out_fds = fds
                try:
                    self._report(channel, way, header, body, fds)
                    if (channel is Channel.FRONTEND and not is_reply(header)
                            and header.request == FrontendReq.SET_BACKEND_REQ_FD
                            and len(fds) == 1):
                        out_fds = [self._interpose(fds[0])]
                        close_fds(fds)
                    raw = encode_raw(header, body)
                    dst.send_bytes(raw, out_fds)
                finally:
                    close_fds(out_fds)
        except (OSError, ConnectionError, ProtocolError) as e:
            self._event({"dir": way, "end": f"{type(e).__name__}: {e}" if str(e)
                         else type(e).__name__})
        finally:
            if channel is Channel.FRONTEND:  # the main connection: the session ends
                self.done.set()
            else:  # a back-end channel: only it ends, as it would without us
                for ch in (src, dst):
                    try:
                        ch.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def _interpose(self, frontend_end: int) -> int:
        """SET_BACKEND_REQ_FD: the back-end gets one end of a new pair; we relay between
        the other end and the front-end's socket (an fd that is not a stream socket is
        passed on as it came)."""
        try:
            front_sock = socket.socket(fileno=os.dup(frontend_end))
        except OSError:
            return os.dup(frontend_end)
        if front_sock.type != socket.SOCK_STREAM:
            front_sock.close()
            return os.dup(frontend_end)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        front_side = self._channel(front_sock)
        back_side = self._channel(ours)
        self._pump(back_side, front_side, Channel.BACKEND, "backend-req")
        self._pump(front_side, back_side, Channel.BACKEND, "backend-reply")
        return theirs.detach()

    def _report(self, channel: Channel, way: str, header: Header, body: bytes,
                fds: list[int]) -> None:
        now = time.monotonic()
        if is_reply(header):
            ev = reply_event(channel, header, body, fds, self.device)
            with self.lock:
                waiting = self.pending.get((channel, header.request))
                if waiting:
                    ev["ms"] = (now - waiting.popleft()) * 1000
        else:
            ev = request_event(channel, header, body, fds, self.device)
            try:
                msg = decode_request(channel, header, body, None)
            except ProtocolError:
                msg = None
            if msg is not None:
                if (channel is Channel.FRONTEND
                        and header.request == FrontendReq.SET_PROTOCOL_FEATURES):
                    self.protocol_features = ev.get("payload", {}).get("value", 0)
                try:
                    replies = expects_reply(channel, msg, self.protocol_features
                                            | (ProtocolFeature.REPLY_ACK
                                               if channel is Channel.BACKEND else 0))
                except ProtocolError:
                    replies = False
                if replies:
                    with self.lock:
                        self.pending.setdefault((channel, header.request), deque()).append(now)
        ev["dir"] = way
        if self.frames:
            ev["frame"] = encode_raw(header, body).hex()
            ev["nfds"] = len(fds)
        self._event(ev, now)

    def _event(self, ev: dict[str, Any], now: float | None = None) -> None:
        """Hand an event to the writer (never waits: a slow reader of the trace must not
        hold up the connection; what does not fit is counted and dropped)."""
        ev["t"] = round((time.monotonic() if now is None else now) - self.t0, 6)
        self.emit_raw(ev)

    def _close(self) -> None:
        for ch in self.channels:
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(5)
        for ch in self.channels:
            ch.close()


class Writer:
    """Writes events on a thread of its own through a bounded queue: `emit` never waits;
    events that find the queue full are dropped and counted (said at the end)."""

    def __init__(self, write: Callable[[dict[str, Any]], None], size: int = 10000) -> None:
        self.write = write
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(size)
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="trace-writer")
        self.thread.start()

    def emit(self, ev: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(ev)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (ev := self.queue.get()) is not None:
            try:
                self.write(ev)
            except Exception:  # a broken output must not stop the relaying
                log.exception("cannot write a traced message")

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued, for `timeout` seconds at most (a reader that never reads
        must not keep us from exiting)."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)
        if self.dropped:
            log.warning("%d traced messages dropped (the trace's reader was too slow)",
                        self.dropped)
