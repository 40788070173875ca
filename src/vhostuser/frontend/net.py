"""A virtio-net driver over the Python front-end: post receive buffers, send frames."""

from __future__ import annotations

import struct

from ..devices.net import F_MRG_RXBUF, header_size
from .client import Frontend

_HDR = struct.Struct("<BBHHHHH")


class NetClient:
    """Queue pair `pair` (rx = 2*pair, tx = 2*pair+1) of a vhost-user net back-end."""

    def __init__(self, fe: Frontend, pair: int = 0, rx_buffers: int = 64,
                 buf_size: int = 2048) -> None:
        self.fe = fe
        self.rxq, self.txq = 2 * pair, 2 * pair + 1
        self.hdr_len = header_size(fe.features)
        self.mrg = bool(fe.features & F_MRG_RXBUF)
        self.buf_size = buf_size
        self.rx_bufs: dict[int, int] = {}  # head -> gpa
        self.tx_bufs: list[int] = [fe.ram.alloc(buf_size) for _ in range(64)]
        self.tx_free = list(self.tx_bufs)
        self.tx_inflight: dict[int, int] = {}
        self.post_rx(rx_buffers)

    def post_rx(self, n: int) -> None:
        ring = self.fe.queues[self.rxq].ring
        for _ in range(n):
            gpa = self.fe.ram.alloc(self.buf_size)
            self.rx_bufs[ring.add([(gpa, self.buf_size, True)])] = gpa
        self.fe.kick(self.rxq)

    def send(self, frames: list[bytes], header: bytes | None = None) -> None:
        """Transmit frames (each with a no-offload header, or `header` as given)."""
        ring = self.fe.queues[self.txq].ring
        self.reap_tx()
        for f in frames:
            gpa = self.tx_free.pop()
            hdr = header if header is not None else bytes(self.hdr_len)
            data = hdr + f
            self.fe.ram.at(gpa, len(data))[:] = data
            self.tx_inflight[ring.add([(gpa, len(data), False)])] = gpa
        self.fe.kick(self.txq)

    def reap_tx(self) -> int:
        done = self.fe.queues[self.txq].ring.take_used()
        for head, _ in done:
            self.tx_free.append(self.tx_inflight.pop(head))
        return len(done)

    def recv(self, count: int = 1, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        """Wait for `count` frames; returns (header, frame) pairs. Buffers are reposted."""
        out: list[tuple[bytes, bytes]] = []
        pending: list[bytes] = []  # contents of used buffers not yet assembled into frames
        while len(out) < count:
            used = self.fe.wait_used(self.rxq, 1, timeout)
            # copy every buffer out before reposting any: their ids are free again
            pending += [bytes(self.fe.ram.at(self.rx_bufs[h], n)) for h, n in used]
            self._repost([h for h, _ in used])
            while pending:
                nbuf = _HDR.unpack_from(pending[0].ljust(12, b"\0"))[6] if self.mrg else 1
                if len(pending) < nbuf:
                    break  # the rest of a merged frame is not here yet
                whole = b"".join(pending[:nbuf])
                out.append((whole[: self.hdr_len], whole[self.hdr_len :]))
                pending = pending[nbuf:]
        return out

    def _repost(self, heads: list[int]) -> None:
        ring = self.fe.queues[self.rxq].ring
        # every buffer taken back before any is added: an add may reuse a head not yet popped
        for gpa in [self.rx_bufs.pop(h) for h in heads]:
            self.rx_bufs[ring.add([(gpa, self.buf_size, True)])] = gpa
        self.fe.kick(self.rxq)
