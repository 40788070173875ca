"""A virtio-input driver over the Python front-end: ask the config space, post event
buffers, read events, send status events."""

from __future__ import annotations

import struct

from ..protocol import FrontendReq
from ..protocol import payloads as p
from .client import Frontend

CONFIG_SIZE = 136
_EVENT = struct.Struct("<HHI")


class InputClient:
    """The event queue (0) and status queue (1) of a vhost-user-input back-end set up by
    `fe` (with the CONFIG protocol feature)."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.posted: dict[int, int] = {}  # eventq head -> its buffer

    def config(self, select: int, subsel: int = 0) -> bytes:
        """The answer to (select, subsel): `size` bytes of the union."""
        head = bytes([select, subsel]) + bytes(CONFIG_SIZE - 2)
        self.fe.call(FrontendReq.SET_CONFIG, p.Config(0, CONFIG_SIZE, 0, head))
        cfg = self.fe.get_config(CONFIG_SIZE)
        return cfg[8 : 8 + cfg[2]]

    def post(self, n: int, size: int = 8) -> None:
        """Give the device `n` event buffers."""
        ring = self.fe.queues[0].ring
        for _ in range(n):
            gpa = self.fe.ram.alloc(size)
            self.posted[ring.add([(gpa, size, True)])] = gpa
        self.fe.kick(0)

    def events(self, count: int, timeout: float = 10.0) -> list[tuple[int, int, int]]:
        """The next `count` events (type, code, value as a signed 32-bit number)."""
        out = []
        for head, written in self.fe.wait_used(0, count, timeout):
            data = bytes(self.fe.ram.at(self.posted.pop(head), written))
            etype, code, value = _EVENT.unpack(data)
            out.append((etype, code, value - (1 << 32) if value >= 1 << 31 else value))
        return out

    def status(self, etype: int, code: int, value: int) -> None:
        """Send one status event and wait until the device has taken it."""
        gpa = self.fe.ram.alloc(8)
        self.fe.ram.at(gpa, 8)[:] = _EVENT.pack(etype, code, value & 0xFFFFFFFF)
        self.fe.queues[1].ring.add([(gpa, 8, False)])
        self.fe.kick(1)
        self.fe.wait_used(1)
