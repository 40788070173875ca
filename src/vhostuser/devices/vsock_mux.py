"""The vsock streams of one guest (in the rx/tx queues' worker): guest packets to host UNIX
sockets and back, with virtio-vsock's credit flow control.

Bounded everywhere: from the guest we hold at most BUF_ALLOC bytes per connection that the
host has not taken (the credit we advertise; a guest that sends more is reset); to the guest
we read from a host socket only as much as the guest's credit and its rx buffers allow (a
guest that stops reading stops the host side, whose socket buffer fills). Packets we owe the
guest wait for rx buffers in a queue of at most MAX_CTRL; while it is that long we take no
more tx packets (back-pressure, as the kernel's vhost-vsock does), so nothing is dropped.
Data moves between guest memory and the host sockets with scatter-gather calls, no copy in
Python unless a host socket is full.

Callbacks only queue packets; each entry point fills rx buffers once at its end, so nothing
recurses however many streams end at once.

A connection lives in the worker that runs the rx/tx queues. When the front-end stops
those queues (GET_VRING_BASE: a VM pause, a memory-table change) the streams go on in the
next worker: the muxer hands its sockets and their state (counters, bytes not yet taken
by the host, packets owed to the guest) to the engine (`carry`), and the next muxer takes
them up, as kernel vhost-vsock keeps its streams across a pause. A reset or a disconnect
drops them: host programs see EOF.
"""

from __future__ import annotations

import base64
import errno
import functools
import json
import logging
import socket
from collections import deque
from typing import Any

from ..engine.device import Carried, Events, QueueService, Timer
from ..engine.queue import DeviceQueue
from ..ratelog import Limited
from ..virtq.iov import iov_read, iov_slice, iov_write
from ..virtq.ring import Chain
from .vsock import (
    HDR,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    RXQ,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TXQ,
    TYPE_STREAM,
    VsockDevice,
)

log = logging.getLogger(__name__)

BUF_ALLOC = 256 << 10  # bytes from the guest we hold per connection (our credit)
MAX_PKT = 64 << 10  # payload per packet to the guest
MAX_CONNS = 1024
MAX_LINES = 64  # host connections that have not said CONNECT yet
MAX_CTRL = 1024  # packets owed to the guest; at this many we take no more tx packets
CONNECT_TIMEOUT = 10.0  # s for a host program's CONNECT line, and for the guest's answer
ACCEPT_RETRY = 0.5  # s before accepting again after running out of fds
MAX_LINE = 64
FIRST_LOCAL_PORT = 1024


class Conn:
    """One stream: a host socket and the guest's (cid, port)."""

    __slots__ = ("fwd_cnt", "fwd_sent", "line", "local_port", "out", "peer_buf_alloc",
                 "peer_fwd_cnt", "peer_no_recv", "peer_no_send", "peer_port", "rd_closed",
                 "reading", "skip", "sock", "state", "timer", "tx_cnt", "wr_closed", "writing")

    def __init__(self, sock: socket.socket, local_port: int, peer_port: int, state: str) -> None:
        self.sock = sock
        self.local_port, self.peer_port = local_port, peer_port
        self.state = state  # "line" (reading CONNECT), "requested", "open"
        self.line = b""  # the CONNECT line so far
        self.peer_buf_alloc = self.peer_fwd_cnt = self.tx_cnt = 0
        self.fwd_cnt = self.fwd_sent = 0
        self.out = bytearray()  # for the host socket, not yet taken by it
        self.skip = 0  # bytes at the head of `out` that are ours (the OK line), not the guest's
        self.rd_closed = False  # the host sent EOF (we told the guest: SHUTDOWN SEND)
        self.wr_closed = False  # we shut the host socket's write side
        self.peer_no_send = self.peer_no_recv = False  # the guest's SHUTDOWN flags
        self.reading = self.writing = False
        self.timer: Timer | None = None

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def credit(self) -> int:
        """Bytes the guest can take now."""
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)


class EventQueue(QueueService):
    """The event queue: nothing to say (no transport reset events are sent)."""

    def kicked(self, q: DeviceQueue) -> None:
        pass


class Muxer(QueueService):
    def __init__(self, dev: VsockDevice, queues: dict[int, DeviceQueue], events: Events) -> None:
        self.cid, self.uds = dev.guest_cid, dev.uds_path
        self.rxq, self.txq = queues.get(RXQ), queues.get(TXQ)
        self.events = events
        self.conns: dict[tuple[int, int], Conn] = {}  # (host port, guest port)
        self.lines: dict[int, Conn] = {}  # host programs that have not said CONNECT yet
        # owed to the guest: (connection, op, flags), its header made when it is written
        # (so the credit it carries is current), or (None, a ready RST)
        self.ctrl: deque[tuple[Conn | None, int, int | bytes]] = deque()
        self.waiting: dict[tuple[int, int], Conn] = {}  # host data waiting for rx buffers
        self.next_port = FIRST_LOCAL_PORT
        self.listener = dev.listener
        self.accepting = True
        self.stopping = False  # quiesce: take no new tx packets
        self.refusals = Limited(log)
        events.watch(self.listener.fileno(), self.accept)
        adopted = dev.take_adopted()
        if adopted is not None:
            self.restore(*adopted)

    # -- packets to the guest -----------------------------------------------------------

    def header(self, c: Conn, op: int, length: int = 0, flags: int = 0) -> bytes:
        c.fwd_sent = c.fwd_cnt
        return HDR.pack(HOST_CID, self.cid, c.local_port, c.peer_port, length, TYPE_STREAM, op,
                        flags, BUF_ALLOC, c.fwd_cnt & 0xFFFFFFFF)

    def owe(self, c: Conn, op: int, flags: int = 0) -> None:
        """Queue a packet for the guest (written by the next `flush_rx`)."""
        self.ctrl.append((c, op, flags))

    def reply_rst(self, src_port: int, dst_port: int) -> None:
        """RST for a guest packet that belongs to no connection."""
        self.ctrl.append((None, 0, HDR.pack(HOST_CID, self.cid, dst_port, src_port, 0,
                                            TYPE_STREAM, OP_RST, 0, 0, 0)))

    def flush_rx(self) -> None:
        """Fill rx buffers: owed packets first, then host data, connection by connection;
        then take the tx packets held back while too many were owed."""
        q = self.rxq
        while True:
            while q is not None and self.ctrl:
                chain = q.pop()
                if chain is None:
                    break
                c, op, extra = self.ctrl.popleft()
                pkt = extra if c is None else self.header(c, op, flags=extra)  # type: ignore[arg-type]
                q.complete(chain, iov_write(chain.writable, pkt))  # type: ignore[arg-type]
            if q is not None and not self.ctrl:
                for c in list(self.waiting.values()):
                    if not self.pump(c):
                        break
            if (self.stopping or len(self.ctrl) >= MAX_CTRL // 2 or self.txq is None
                    or not self.txq.waiting()):
                return
            self.take_tx(self.txq)  # held back, or arrived meanwhile: then flush again

    def pump(self, c: Conn) -> bool:
        """Move host data of `c` into rx buffers while the guest's credit allows; False
        when the rx buffers ran out (c waits for more)."""
        q = self.rxq
        self.waiting.pop(c.key, None)
        if self.conns.get(c.key) is not c:
            return True
        while True:
            credit = min(c.credit(), MAX_PKT)
            if credit <= 0 or c.peer_no_recv or c.rd_closed or c.state != "open":
                self.stop_reading(c)  # a credit update (or nothing) wakes it
                return True
            chain = q.pop() if q is not None and not self.ctrl else None
            if chain is None:
                self.waiting[c.key] = c
                self.stop_reading(c)
                return False
            assert q is not None
            room = min(sum(map(len, chain.writable)) - HDR.size, credit)
            if room <= 0:  # a buffer that cannot hold a header: returned empty
                q.complete(chain, 0)
                continue
            try:
                n = c.sock.recvmsg_into(iov_slice(chain.writable, HDR.size, HDR.size + room))[0]
            except BlockingIOError:
                q.unpop()
                self.start_reading(c)
                return True
            except OSError as e:
                q.unpop()
                log.info("vsock %d->%d: host socket failed: %s", c.local_port, c.peer_port, e)
                self.end(c)
                return True
            if not n:  # EOF: the host will send nothing more
                q.unpop()
                c.rd_closed = True
                self.stop_reading(c)
                self.owe(c, OP_SHUTDOWN, SHUTDOWN_SEND)
                self.maybe_done(c)
                return True
            iov_write(chain.writable, self.header(c, OP_RW, n))
            q.complete(chain, HDR.size + n)
            c.tx_cnt += n

    def on_readable(self, c: Conn) -> None:
        if c.state == "line":
            self.read_line(c)
        elif self.conns.get(c.key) is not c:  # ended: never watched again
            self.stop_reading(c)
        elif self.ctrl:
            self.waiting[c.key] = c
            self.stop_reading(c)
        else:
            self.pump(c)
        self.flush_rx()

    def start_reading(self, c: Conn) -> None:
        if not c.reading:
            c.reading = True
            self.events.watch(c.sock.fileno(), functools.partial(self.on_readable, c))

    def stop_reading(self, c: Conn) -> None:
        if c.reading:
            c.reading = False
            self.events.unwatch(c.sock.fileno())

    # -- packets from the guest ---------------------------------------------------------

    def kicked(self, q: DeviceQueue) -> None:
        if q is self.txq:
            self.take_tx(q)
        self.flush_rx()

    def take_tx(self, q: DeviceQueue) -> None:
        while len(self.ctrl) < MAX_CTRL:  # else back-pressure: flush_rx resumes us
            chain = q.pop()
            if chain is None:
                return
            self.from_guest(chain)
            q.complete(chain, 0)

    def from_guest(self, chain: Chain) -> None:
        hdr = iov_read(chain.readable, HDR.size)
        if len(hdr) < HDR.size:
            log.debug("vsock: a tx packet shorter than its header: dropped")
            return
        (src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack(hdr)
        if src_cid != self.cid or dst_cid != HOST_CID:
            log.debug("vsock: packet from cid %d to cid %d dropped", src_cid, dst_cid)
            return
        if ptype != TYPE_STREAM:
            if op != OP_RST:
                self.reply_rst(src_port, dst_port)
            return
        c = self.conns.get((dst_port, src_port))
        if op == OP_REQUEST:
            if c is None:
                self.connect_host(src_port, dst_port, buf_alloc, fwd_cnt)
            else:  # a second REQUEST on a live connection: the guest lost track of it
                self.end(c)
            return
        if c is None:
            if op != OP_RST:
                self.reply_rst(src_port, dst_port)
            return
        c.peer_buf_alloc, c.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_RW:
            data = iov_slice(chain.readable, HDR.size, HDR.size + length)
            if (c.state != "open" or c.peer_no_send or sum(map(len, data)) != length
                    or len(c.out) - c.skip + length > BUF_ALLOC):
                log.info("vsock %d->%d: data the connection cannot take: reset",
                         c.local_port, c.peer_port)
                self.end(c)
                return
            self.to_host(c, data)
        elif op == OP_RESPONSE:
            if c.state != "requested":
                self.end(c)
                return
            c.state = "open"
            if c.timer is not None:
                c.timer.cancel()
            self.to_host(c, [memoryview(f"OK {c.local_port}\n".encode())], ours=True)
            if self.conns.get(c.key) is not c:  # the host program hung up meanwhile
                return
            self.start_reading(c)
        elif op == OP_CREDIT_REQUEST:
            self.owe(c, OP_CREDIT_UPDATE)
        elif op == OP_SHUTDOWN:
            if flags & SHUTDOWN_RCV and not c.peer_no_recv:
                c.peer_no_recv = True
                self.stop_reading(c)
                self.waiting.pop(c.key, None)
                try:  # the host program's further writes fail, as the guest asked
                    c.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            c.peer_no_send |= bool(flags & SHUTDOWN_SEND)
            self.maybe_done(c)
        elif op == OP_RST:
            self.end(c, rst=False)
        elif op != OP_CREDIT_UPDATE:
            self.end(c)
            return
        if self.conns.get(c.key) is c and c.state == "open" and c.credit() > 0 and not (
                c.reading or c.rd_closed or c.peer_no_recv or c.key in self.waiting):
            self.start_reading(c)  # credit came back

    def connect_host(self, guest_port: int, host_port: int, buf_alloc: int,
                     fwd_cnt: int) -> None:
        if len(self.conns) + len(self.lines) >= MAX_CONNS:
            self.refusals.log(logging.ERROR, "vsock: %d connections: refusing more", MAX_CONNS)
            self.reply_rst(guest_port, host_port)
            return
        path = f"{self.uds}_{host_port}"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
        except OSError as e:  # out of fds
            self.refusals.log(logging.ERROR, "vsock: guest port %d -> %s: %s", guest_port,
                              path, e)
            self.reply_rst(guest_port, host_port)
            return
        try:
            sock.connect(path)
        except OSError as e:  # nobody listening there (EAGAIN: its backlog is full)
            log.info("vsock: guest port %d -> %s: %s", guest_port, path,
                     e.strerror or errno.errorcode.get(e.errno or 0, e))
            sock.close()
            self.reply_rst(guest_port, host_port)
            return
        c = Conn(sock, host_port, guest_port, "open")
        c.peer_buf_alloc, c.peer_fwd_cnt = buf_alloc, fwd_cnt
        self.conns[c.key] = c
        self.owe(c, OP_RESPONSE)
        self.start_reading(c)

    # -- the host side ------------------------------------------------------------------

    def to_host(self, c: Conn, data: list[memoryview], ours: bool = False) -> None:
        """Send `data` (guest memory) to the host socket, keeping what it does not take.
        `ours`: bytes of our own (the OK line), not counted as forwarded."""
        n = sum(map(len, data))
        sent = 0
        if not c.out:
            try:
                sent = c.sock.sendmsg(data)
            except BlockingIOError:
                pass
            except OSError as e:
                log.info("vsock %d->%d: host socket failed: %s", c.local_port, c.peer_port, e)
                self.end(c)
                return
        if sent < n:
            c.out += b"".join(bytes(v) for v in iov_slice(data, sent))
            if ours:
                c.skip += n - sent
            if not c.writing:
                c.writing = True
                self.events.watch_write(c.sock.fileno(), functools.partial(self.on_writable, c))
        if not ours:
            c.fwd_cnt += sent
            self.credit_update(c)

    def on_writable(self, c: Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError as e:
            log.info("vsock %d->%d: host socket failed: %s", c.local_port, c.peer_port, e)
            self.end(c)
            self.flush_rx()
            return
        del c.out[:n]
        ours = min(n, c.skip)
        c.skip -= ours
        c.fwd_cnt += n - ours
        if not c.out:
            c.writing = False
            self.events.unwatch_write(c.sock.fileno())
            self.maybe_done(c)
        self.credit_update(c)
        self.flush_rx()

    def credit_update(self, c: Conn) -> None:
        """Tell the guest what the host took once a quarter of its send window is unsaid
        (its window is the smaller of our credit and its own buffer, as Linux sends)."""
        window = max(min(BUF_ALLOC, c.peer_buf_alloc), 4)
        if self.conns.get(c.key) is c and c.fwd_cnt - c.fwd_sent >= window // 4:
            self.owe(c, OP_CREDIT_UPDATE)
            c.fwd_sent = c.fwd_cnt  # the header is made later, with the count then

    def maybe_done(self, c: Conn) -> None:
        """Shut the host socket's write side once the guest will send no more and all it
        sent is out; end the connection once both directions are done."""
        if c.out or self.conns.get(c.key) is not c:
            return
        if c.peer_no_send and not c.wr_closed:
            c.wr_closed = True
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if c.peer_no_send and (c.peer_no_recv or c.rd_closed):
            self.end(c)  # RST: the close handshake the guest waits for

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                break
            except OSError as e:  # out of fds: look again later (the listener stays ready)
                log.error("vsock: cannot accept a host connection: %s; retrying in %g s", e,
                          ACCEPT_RETRY)
                self.events.unwatch(self.listener.fileno())
                self.accepting = False
                self.events.call_later(ACCEPT_RETRY, self.resume_accepting)
                break
            if len(self.conns) + len(self.lines) >= MAX_CONNS or len(self.lines) >= MAX_LINES:
                self.refusals.log(logging.ERROR, "vsock: too many host connections: "
                                  "refusing more")
                sock.close()
                continue
            sock.setblocking(False)
            c = Conn(sock, self.local_port(), 0, "line")
            self.lines[sock.fileno()] = c
            c.timer = self.events.call_later(CONNECT_TIMEOUT, functools.partial(self.timed_out, c))
            self.start_reading(c)
        self.flush_rx()

    def resume_accepting(self) -> None:
        if not self.accepting:
            self.accepting = True
            self.events.watch(self.listener.fileno(), self.accept)

    def local_port(self) -> int:
        used = {c.local_port for c in (*self.conns.values(), *self.lines.values())}
        while self.next_port in used:
            self.next_port = self.next_port + 1 if self.next_port < 0xFFFFFFFE else 1024
        port = self.next_port
        self.next_port = port + 1 if port < 0xFFFFFFFE else FIRST_LOCAL_PORT
        return port

    def read_line(self, c: Conn) -> None:
        """``CONNECT <port>\\n`` from a host program, a byte at a time up to the newline
        (what follows is stream data, read once the guest has accepted)."""
        while not c.line.endswith(b"\n"):
            try:
                byte = c.sock.recv(1)
            except BlockingIOError:
                return
            except OSError:
                byte = b""
            if not byte:
                self.drop_line(c, "closed before a CONNECT line")
                return
            c.line += byte
            if len(c.line) > MAX_LINE:
                self.drop_line(c, "no CONNECT line")
                return
        words = c.line.split()
        if (len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit()
                or int(words[1]) > 0xFFFFFFFF):
            self.drop_line(c, f"bad line {c.line!r}")
            return
        c.peer_port = int(words[1])
        if c.key in self.conns:  # the guest took that port pair meanwhile
            self.drop_line(c, f"port pair {c.key} in use")
            return
        self.stop_reading(c)
        del self.lines[c.sock.fileno()]
        c.state = "requested"
        self.conns[c.key] = c
        self.owe(c, OP_REQUEST)

    def drop_line(self, c: Conn, why: str) -> None:
        log.info("vsock: host connection dropped: %s", why)
        self.lines.pop(c.sock.fileno(), None)
        self.stop_reading(c)
        if c.timer is not None:
            c.timer.cancel()
        c.sock.close()

    def timed_out(self, c: Conn) -> None:
        if c.state == "line" and self.lines.get(c.sock.fileno()) is c:
            self.drop_line(c, f"no CONNECT line within {CONNECT_TIMEOUT:g} s")
        elif c.state == "requested" and self.conns.get(c.key) is c:
            log.info("vsock: the guest did not answer a connection to port %d", c.peer_port)
            self.end(c)
            self.flush_rx()

    def end(self, c: Conn, rst: bool = True) -> None:
        """End a connection: its host socket is closed, the guest gets RST."""
        if self.conns.get(c.key) is not c:
            return
        del self.conns[c.key]
        self.waiting.pop(c.key, None)
        self.stop_reading(c)
        if c.writing:
            self.events.unwatch_write(c.sock.fileno())
            c.writing = False
        if c.timer is not None:
            c.timer.cancel()
        c.sock.close()
        if rst:
            self.owe(c, OP_RST)

    def quiesce(self) -> None:
        """The queues stop: take no more tx packets, give the guest what its rx buffers
        take; the rest is carried to the next worker."""
        self.stopping = True
        self.flush_rx()

    # -- across workers ----------------------------------------------------------------

    _FIELDS = ("local_port", "peer_port", "state", "peer_buf_alloc", "peer_fwd_cnt", "tx_cnt",
               "fwd_cnt", "fwd_sent", "skip", "rd_closed", "wr_closed", "peer_no_send",
               "peer_no_recv")

    def carry(self) -> Carried:
        """Every stream and host connection, with its socket, for the next worker; the
        packets owed to the guest are made now (with the counts they carry now)."""
        conns: list[dict[str, Any]] = []
        fds: list[int] = []
        for c in [*self.conns.values(), *self.lines.values()]:
            rec = {f: getattr(c, f) for f in self._FIELDS}
            rec.update(line=c.line.hex(), out=base64.b64encode(c.out).decode(), fd=len(fds),
                       waiting=c.key in self.waiting)
            conns.append(rec)
            fds.append(c.sock.detach())  # the socket is the engine's now
        ctrl = []
        for owner, op, extra in self.ctrl:
            if owner is None:
                assert isinstance(extra, bytes)
                ctrl.append(extra.hex())
            else:
                assert isinstance(extra, int)
                ctrl.append(self.header(owner, op, flags=extra).hex())
        self.conns.clear()
        self.lines.clear()
        self.waiting.clear()
        self.ctrl.clear()
        state = {"conns": conns, "ctrl": ctrl, "next_port": self.next_port}
        return Carried(json.dumps(state).encode(), fds)

    def restore(self, state: dict[str, Any], fds: list[int]) -> None:
        """Take up what the last worker's muxer carried."""
        self.next_port = state["next_port"]
        for hexed in state["ctrl"]:
            self.ctrl.append((None, 0, bytes.fromhex(hexed)))
        for rec in state["conns"]:
            sock = socket.socket(fileno=fds[rec["fd"]])
            sock.setblocking(False)
            c = Conn(sock, rec["local_port"], rec["peer_port"], rec["state"])
            for f in self._FIELDS:
                setattr(c, f, rec[f])
            c.line, c.out = bytes.fromhex(rec["line"]), bytearray(base64.b64decode(rec["out"]))
            timed = functools.partial(self.timed_out, c)
            if c.state == "line":
                self.lines[sock.fileno()] = c
                c.timer = self.events.call_later(CONNECT_TIMEOUT, timed)
                self.start_reading(c)
                continue
            self.conns[c.key] = c
            if c.state == "requested":
                c.timer = self.events.call_later(CONNECT_TIMEOUT, timed)
            if c.out:
                c.writing = True
                self.events.watch_write(sock.fileno(), functools.partial(self.on_writable, c))
            if rec["waiting"]:
                self.waiting[c.key] = c
            elif c.state == "open" and not (c.rd_closed or c.peer_no_recv):
                self.start_reading(c)  # pump() stops again if there is no credit

    def close(self) -> None:
        """The worker ends: host sockets close (host programs see EOF)."""
        for c in [*self.conns.values(), *self.lines.values()]:
            c.sock.close()
        self.conns.clear()
        self.lines.clear()
