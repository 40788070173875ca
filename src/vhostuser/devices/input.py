"""virtio-input (virtio 1.x §5.8): an event queue the device fills with input events and a
status queue the driver sends events back on (LEDs). The config space answers one question
at a time: the driver writes `select`/`subsel`, then reads `size` and the answer (the name,
the serial, the device ids, the property bits, the codes of one event type, one axis's
range).

Events come from an `EventSource` (devices/input_sources.py: a host evdev, or a virtual
keyboard/mouse/tablet fed with JSON lines), watched in the queues' worker. Events wait for
buffers in a bounded queue: a guest that posts none loses events (counted and logged), it
cannot make us hold more.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ..engine.device import ConfigError, Device, Events, QueueService
from ..engine.queue import DeviceQueue
from ..protocol.constants import ProtocolFeature
from ..virtq.iov import iov_read, iov_write

log = logging.getLogger(__name__)

# config select values
CFG_UNSET, CFG_ID_NAME, CFG_ID_SERIAL, CFG_ID_DEVIDS = 0x00, 0x01, 0x02, 0x03
CFG_PROP_BITS, CFG_EV_BITS, CFG_ABS_INFO = 0x10, 0x11, 0x12
CONFIG_SIZE = 136  # select, subsel, size, reserved[5], union of 128 bytes
UNION_SIZE = 128

EVENT = struct.Struct("<HHI")  # virtio_input_event: type, code, value (le32)
DEVIDS = struct.Struct("<HHHH")  # bustype, vendor, product, version
ABSINFO = struct.Struct("<IIIII")  # min, max, fuzz, flat, res (le32 each)

EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_LED = 0x00, 0x01, 0x02, 0x03, 0x11
SYN_REPORT = 0
EVENTQ, STATUSQ = 0, 1
MAX_PENDING = 4096  # events waiting for buffers
MAX_FRAME = 1024  # events before a SYN_REPORT
EV_SND = 0x12
STATUS_TYPES = (EV_LED, EV_SND)  # what the status queue may carry back to the source


@dataclass
class InputCaps:
    """What the device says it is (the answers of its config space)."""

    name: str
    serial: str = ""
    ids: tuple[int, int, int, int] = (0x06, 0, 0, 1)  # BUS_VIRTUAL, vendor, product, version
    props: set[int] = field(default_factory=set)
    codes: dict[int, set[int]] = field(default_factory=dict)  # event type -> its codes
    absinfo: dict[int, tuple[int, int, int, int, int]] = field(default_factory=dict)

    def answer(self, select: int, subsel: int) -> bytes:
        """The union's bytes for (select, subsel); empty: no answer (size 0)."""
        if select == CFG_ID_NAME and subsel == 0:
            return self.name.encode()[:UNION_SIZE]
        if select == CFG_ID_SERIAL and subsel == 0:
            return self.serial.encode()[:UNION_SIZE]
        if select == CFG_ID_DEVIDS and subsel == 0:
            return DEVIDS.pack(*self.ids)
        if select == CFG_PROP_BITS and subsel == 0:
            return bitmap(self.props)
        if select == CFG_EV_BITS and subsel in self.codes:
            # a type with no codes (EV_REP) is still there: one zero byte says so
            return bitmap(self.codes[subsel]) or b"\0"
        if select == CFG_ABS_INFO and subsel in self.absinfo:
            return ABSINFO.pack(*(v & 0xFFFFFFFF for v in self.absinfo[subsel]))
        return b""

    def accepts(self, etype: int, code: int) -> bool:
        return etype == EV_SYN or code in self.codes.get(etype, ())


def bitmap(bits: set[int]) -> bytes:
    """Little-endian bit array, trimmed after the last byte set (as the config reports)."""
    if not bits:
        return b""
    out = bytearray(max(bits) // 8 + 1)
    for b in bits:
        out[b // 8] |= 1 << (b % 8)
    return bytes(out[:UNION_SIZE])


class EventSource(Protocol):
    """Where events come from (read in the worker), where status events go."""

    def close(self) -> None: ...

    def fileno(self) -> int: ...

    def read(self, limit: int) -> list[tuple[int, int, int]] | None:
        """Events that arrived (type, code, value), about `limit` at most; None once the
        source has ended."""
        ...

    def status(self, etype: int, code: int, value: int) -> None:
        """An event the guest sent on the status queue (an LED)."""
        ...


class InputDevice(Device):
    name = "vhost-user-input"
    num_queues = 2
    max_queue_size = 1024
    protocol_features = int(ProtocolFeature.CONFIG)

    def __init__(self, caps: InputCaps, source: EventSource) -> None:
        self.caps = caps
        self.source = source
        self.select = self.subsel = 0

    def features(self) -> int:
        return 0

    def queue_groups(self) -> list[list[int]]:
        return [[EVENTQ, STATUSQ]]  # one source feeds one and hears the other

    def get_config(self) -> bytes:
        data = self.caps.answer(self.select, self.subsel)
        head = bytes([self.select, self.subsel, len(data)]) + bytes(5)
        return head + data.ljust(UNION_SIZE, b"\0")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        # QEMU writes the whole config space (offset 0); a driver may write select alone
        if offset > 1 or not data or offset + len(data) > CONFIG_SIZE:
            raise ConfigError(f"only select and subsel are writable ({len(data)} bytes at "
                              f"offset {offset})")
        fields = [self.select, self.subsel]
        for i, b in enumerate(data[: 2 - offset]):
            fields[offset + i] = b
        self.select, self.subsel = fields

    def reset(self) -> None:
        self.select = self.subsel = 0

    def worker_fds(self, indices: list[int]) -> list[int]:
        return [self.source.fileno()]

    def close(self) -> None:
        self.source.close()

    def serve(self, queues: dict[int, DeviceQueue], events: Events) -> InputService:
        return InputService(self, queues, events)


class InputService(QueueService):
    """Moves events from the source to the event queue, status events back (in the
    worker)."""

    def __init__(self, dev: InputDevice, queues: dict[int, DeviceQueue],
                 events: Events) -> None:
        self.caps, self.source, self.events = dev.caps, dev.source, events
        self.eventq = queues.get(EVENTQ)
        self.pending: deque[tuple[int, int, int]] = deque()
        self.frame: list[tuple[int, int, int]] = []  # events since the last SYN_REPORT
        self.dropped = 0
        self.fd = dev.source.fileno()
        events.watch(self.fd, self.on_source)

    def on_source(self) -> None:
        got = self.source.read(MAX_PENDING)  # bounded: a flood cannot wedge the worker
        if got is None:
            log.error("input source ended: no more events for the guest")
            self.events.unwatch(self.fd)
            self.fd = -1
            return
        for ev in got:  # whole frames (up to SYN_REPORT) go to the guest, or none of them
            self.frame.append(ev)
            if ev[0] == EV_SYN and ev[1] == SYN_REPORT:
                if len(self.pending) + len(self.frame) <= MAX_PENDING:
                    self.pending.extend(self.frame)
                else:
                    if not self.dropped:
                        log.error("the guest takes no input events: dropping them")
                    self.dropped += len(self.frame)
                self.frame = []
            elif len(self.frame) > MAX_FRAME:  # no end in sight: not a frame
                self.dropped += len(self.frame)
                self.frame = []
        self.deliver()

    def deliver(self) -> None:
        q = self.eventq
        if q is None:
            return
        while self.pending:
            chain = q.pop()
            if chain is None:
                return  # the rest waits for buffers (kicked)
            etype, code, value = self.pending.popleft()
            q.complete(chain, iov_write(chain.writable,
                                        EVENT.pack(etype, code, value & 0xFFFFFFFF)))

    def kicked(self, q: DeviceQueue) -> None:
        if q.index == EVENTQ:
            self.deliver()
            return
        for chain in q.pop_batch():
            data = iov_read(chain.readable, EVENT.size)
            if len(data) == EVENT.size:
                etype, code, value = EVENT.unpack(data)
                if etype in STATUS_TYPES:  # anything else would be input injected into the
                    self.source.status(etype, code, value)  # host (keys, pointer moves)
            q.complete(chain, 0)

    def close(self) -> None:
        if self.fd >= 0:
            self.events.unwatch(self.fd)
