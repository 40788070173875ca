"""Where a vhost-user-input device's events come from.

`EvdevSource` passes a host evdev device through: its name, serial, ids, property and event
bits and axis ranges become the config space, its events go to the guest, and the guest's
status events (LEDs) are written back to it. `VirtualSource` is a keyboard, mouse or tablet
fed by a datagram socket: each datagram holds JSON lines, each line one event or a list of
them, e.g. ``{"type": "EV_KEY", "code": "KEY_A", "value": 1}`` (names as in
<linux/input-event-codes.h>, or numbers); a SYN_REPORT ends each line unless it ends with
one. Status events go back, as JSON lines of numbers, to the last sender that has an address.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct

from ..ratelog import Limited
from . import input_codes as codes
from .input import EV_ABS, EV_KEY, EV_LED, EV_REL, EV_SYN, SYN_REPORT, InputCaps

log = logging.getLogger(__name__)

_INPUT_EVENT = struct.Struct("@llHHi")  # struct input_event: timeval, type, code, value
# event types whose codes EVIOCGBIT reports: KEY REL ABS MSC SW LED SND
_CODED = {codes.EV[n] for n in ("EV_KEY", "EV_REL", "EV_ABS", "EV_MSC", "EV_SW", "EV_LED",
                                "EV_SND")}
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("E") << 8 | nr


def _ioctl_read(fd: int, nr: int, size: int) -> bytes:
    buf = bytearray(size)
    fcntl.ioctl(fd, _ioc(_IOC_READ, nr, size), buf)
    return bytes(buf)


def _bits(data: bytes) -> set[int]:
    return {8 * i + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


class EvdevSource:
    """A host evdev device (/dev/input/eventN), passed through."""

    def __init__(self, path: str, grab: bool = False) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            self.writable = True
        except PermissionError:  # read-only: events pass, LEDs do not go back
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self.writable = False
        try:
            self.caps = self._read_caps(path)
            if grab:
                fcntl.ioctl(self.fd, _ioc(_IOC_WRITE, 0x90, 4), 1)  # EVIOCGRAB
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                raise ValueError(f"{path} is not an evdev device") from e
            raise

    def _read_caps(self, path: str) -> InputCaps:
        fd = self.fd
        name = _ioctl_read(fd, 0x06, 128).split(b"\0", 1)[0].decode(errors="replace")
        try:
            serial = _ioctl_read(fd, 0x08, 128).split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            serial = ""
        ids = struct.unpack("<HHHH", _ioctl_read(fd, 0x02, 8))
        props = _bits(_ioctl_read(fd, 0x09, 8))
        type_codes: dict[int, set[int]] = {}
        for etype in _bits(_ioctl_read(fd, 0x20, 4)):
            if etype in _CODED:
                type_codes[etype] = _bits(_ioctl_read(fd, 0x20 + etype, 96))
            elif etype == codes.EV["EV_REP"]:  # present, no codes (EVIOCGBIT refuses it)
                type_codes[etype] = set()
        absinfo = {}
        for axis in type_codes.get(EV_ABS, ()):
            _value, lo, hi, fuzz, flat, res = struct.unpack(
                "<6i", _ioctl_read(fd, 0x40 + axis, 24))
            absinfo[axis] = (lo, hi, fuzz, flat, res)
        log.info("%s: %r, event types %s", path, name, sorted(type_codes))
        return InputCaps(name, serial, ids, props, type_codes, absinfo)

    def fileno(self) -> int:
        return self.fd

    def read(self, limit: int) -> list[tuple[int, int, int]] | None:
        out: list[tuple[int, int, int]] = []
        while len(out) < limit:
            try:
                data = os.read(self.fd, 64 * _INPUT_EVENT.size)
            except BlockingIOError:
                return out
            except OSError as e:
                log.error("evdev: %s", e)  # ENODEV: unplugged
                return out or None
            if not data:
                return out or None
            for _s, _us, etype, code, value in _INPUT_EVENT.iter_unpack(
                    data[: len(data) - len(data) % _INPUT_EVENT.size]):
                out.append((etype, code, value))
        return out

    def status(self, etype: int, code: int, value: int) -> None:
        if not self.writable or not self.caps.accepts(etype, code):
            return
        try:  # with a SYN_REPORT, which makes the change take (and other readers see it)
            os.write(self.fd, _INPUT_EVENT.pack(0, 0, etype, code, _signed(value))
                     + _INPUT_EVENT.pack(0, 0, EV_SYN, SYN_REPORT, 0))
        except OSError as e:
            log.error("evdev: cannot pass a status event back: %s", e)

    def close(self) -> None:
        os.close(self.fd)


# -- virtual devices ---------------------------------------------------------------------------

def _keyboard() -> InputCaps:
    keys = {c for n, c in codes.KEY.items() if n.startswith("KEY_") and 0 < c < 256}
    leds = {codes.LED["LED_NUML"], codes.LED["LED_CAPSL"], codes.LED["LED_SCROLLL"]}
    return InputCaps("vhost-user keyboard", "", (0x06, 0, 1, 1), set(),
                     {EV_KEY: keys, EV_LED: leds, codes.EV["EV_REP"]: set()})


def _buttons() -> set[int]:
    return {codes.KEY[n] for n in ("BTN_LEFT", "BTN_RIGHT", "BTN_MIDDLE", "BTN_SIDE",
                                   "BTN_EXTRA")}


def _mouse() -> InputCaps:
    rel = {codes.REL[n] for n in ("REL_X", "REL_Y", "REL_WHEEL")}
    return InputCaps("vhost-user mouse", "", (0x06, 0, 2, 1), set(),
                     {EV_KEY: _buttons(), EV_REL: rel})


def _tablet() -> InputCaps:
    axes = {codes.ABS["ABS_X"]: (0, 32767, 0, 0, 0), codes.ABS["ABS_Y"]: (0, 32767, 0, 0, 0)}
    return InputCaps("vhost-user tablet", "", (0x06, 0, 3, 1), set(),
                     {EV_KEY: _buttons(), EV_ABS: set(axes), EV_REL: {codes.REL["REL_WHEEL"]}},
                     axes)


KINDS = {"keyboard": _keyboard, "mouse": _mouse, "tablet": _tablet}
_CODE_TABLES = {EV_SYN: codes.SYN, EV_KEY: codes.KEY, EV_REL: codes.REL, EV_ABS: codes.ABS,
                EV_LED: codes.LED, codes.EV["EV_MSC"]: codes.MSC, codes.EV["EV_SW"]: codes.SW,
                codes.EV["EV_REP"]: codes.REP}
MAX_DATAGRAM = 1 << 16


class EventError(ValueError):
    """A JSON event line that does not describe an event of this device."""


class VirtualSource:
    """A virtual keyboard, mouse or tablet fed with JSON lines over a datagram socket."""

    def __init__(self, path: str, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
        self.caps = KINDS[kind]()
        self.path = path
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(path)
        except OSError:
            self.sock.close()
            raise
        self.peer: str | bytes | None = None
        self.refusals = Limited(log)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, limit: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        for _ in range(64):  # datagrams per call: the rest waits for the next one
            if len(out) >= limit:
                break
            try:
                data, peer = self.sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                break
            if peer:
                self.peer = peer
            for n, line in enumerate(data.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    events = self.parse(line)
                except EventError as e:
                    self.refusals.log(logging.ERROR, "event line %d from %s refused: %s", n,
                                      peer or "a client", e)
                    continue
                out += events
        return out

    def parse(self, line: bytes) -> list[tuple[int, int, int]]:
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise EventError(f"not JSON: {e}") from None
        items = doc if isinstance(doc, list) else [doc]
        if not items or len(items) > 1024:
            raise EventError("a line holds 1 to 1024 events")
        events = [self._event(item) for item in items]
        if events[-1][:2] != (EV_SYN, SYN_REPORT):
            events.append((EV_SYN, SYN_REPORT, 0))
        return events

    def _event(self, item: object) -> tuple[int, int, int]:
        if not isinstance(item, dict) or set(item) - {"type", "code", "value"}:
            raise EventError(f"an event is {{\"type\", \"code\", \"value\"}}, not {item!r:.80}")
        etype = _number(item.get("type"), codes.EV, "type", 0xFFFF)
        code = _number(item.get("code", 0), _CODE_TABLES.get(etype, {}), "code", 0xFFFF)
        value = item.get("value", 0)
        if (not isinstance(value, int) or isinstance(value, bool)
                or not -(1 << 31) <= value < 1 << 31):
            raise EventError(f"value {value!r:.40} is not a 32-bit integer")
        if not self.caps.accepts(etype, code):
            raise EventError(f"this {self.caps.name} has no event type {etype} code {code}")
        return etype, code, value

    def status(self, etype: int, code: int, value: int) -> None:
        if self.peer is None:
            return
        line = json.dumps({"type": etype, "code": code, "value": _signed(value)}) + "\n"
        try:
            self.sock.sendto(line.encode(), self.peer)
        except OSError:  # gone, or not reading: status is a courtesy
            pass

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _number(value: object, names: dict[str, int], what: str, limit: int) -> int:
    if isinstance(value, str):
        if value not in names:
            raise EventError(f"unknown {what} {value!r:.40}")
        return names[value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit:
        return value
    raise EventError(f"{what} {value!r:.40} is neither a name nor a number up to {limit}")


def _signed(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value
