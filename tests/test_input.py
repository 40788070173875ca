"""vhost-user-input driven by the Python front-end: the config space answers what Linux's
virtio_input driver asks, events sent as JSON lines reach the event queue, status events
(LEDs) come back to the sender, bad lines are refused one by one, and a guest that posts
no buffers cannot make the daemon hold more than a bounded backlog. Numbers are those of
<linux/input-event-codes.h> (KEY_A 30, REL_X 0, ABS_X 0, LED_CAPSL 1, BTN_LEFT 0x110); the
guest's view is in test_qemu_input.py."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.input import InputClient
from vhostuser.protocol import ProtocolFeature, VirtioFeature

FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX | VirtioFeature.PROTOCOL_FEATURES
PROTOCOL = ProtocolFeature.CONFIG | ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ
EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_REP, EV_LED = 0, 1, 2, 3, 0x14, 0x11
KEY_A, BTN_LEFT, LED_CAPSL = 30, 0x110, 1
SYN = (EV_SYN, 0, 0)


class Session:
    def __init__(self, tmp_path: Path, kind: str) -> None:
        self.events_path = str(tmp_path / "events.sock")
        sock = tmp_path / "input.sock"
        self.d = Daemon(["vhostuser.cli.input", "--socket-path", str(sock), "--events",
                         self.events_path, "--kind", kind], sock, tmp_path / "input.log")
        self.fe = Frontend(self.d.sock)
        self.fe.negotiate(FEATURES, PROTOCOL)
        self.fe.set_mem_table()
        self.fe.setup_queue(0, 64)
        self.fe.setup_queue(1, 64)
        self.input = InputClient(self.fe)
        self.client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.client.bind("")  # an address: status events come back to it
        self.client.settimeout(10)

    def send(self, *lines: object) -> None:
        self.client.sendto("\n".join(json.dumps(x) for x in lines).encode(), self.events_path)

    def close(self) -> None:
        self.client.close()
        self.fe.close()
        assert self.d.stop() == 0, self.d.log()
        assert "Traceback" not in self.d.log(), self.d.log()


@pytest.fixture
def keyboard(tmp_path: Path) -> Iterator[Session]:
    s = Session(tmp_path, "keyboard")
    yield s
    s.close()


def test_keyboard_config_space(keyboard: Session) -> None:
    cfg = keyboard.input.config
    assert cfg(0x01) == b"vhost-user keyboard"  # ID_NAME
    assert struct.unpack("<HHHH", cfg(0x03)) == (0x06, 0, 1, 1)  # ID_DEVIDS: BUS_VIRTUAL
    keys = cfg(0x11, EV_KEY)  # EV_BITS of EV_KEY
    assert keys[KEY_A // 8] >> (KEY_A % 8) & 1 and keys[0] & 1 == 0  # KEY_RESERVED is not
    assert cfg(0x11, EV_LED) == bytes([0b111])  # NUML, CAPSL, SCROLLL
    assert cfg(0x11, EV_REP) == b"\0"  # present, no codes: one byte
    assert cfg(0x11, EV_REL) == b""  # a keyboard has no relative axes
    assert cfg(0x12, 0) == b""  # nor absolute ones
    assert cfg(0x00) == b""  # UNSET


def test_key_events_reach_the_event_queue(keyboard: Session) -> None:
    keyboard.input.post(8)
    keyboard.send({"type": "EV_KEY", "code": "KEY_A", "value": 1})
    keyboard.send([{"type": 1, "code": 30, "value": 0}, {"type": "EV_SYN", "code": 0}])
    assert keyboard.input.events(4) == [(EV_KEY, KEY_A, 1), SYN, (EV_KEY, KEY_A, 0), SYN]


def test_events_wait_for_buffers(keyboard: Session) -> None:
    keyboard.send({"type": "EV_KEY", "code": "KEY_A", "value": 1})
    keyboard.input.post(2)  # posted after the events were sent
    assert keyboard.input.events(2) == [(EV_KEY, KEY_A, 1), SYN]


def test_led_status_goes_back_to_the_sender(keyboard: Session) -> None:
    keyboard.input.post(2)
    keyboard.send({"type": "EV_KEY", "code": "KEY_A", "value": 1})  # the sender is known now
    keyboard.input.events(2)
    keyboard.input.status(EV_LED, LED_CAPSL, 1)
    line = keyboard.client.recv(4096)
    assert json.loads(line) == {"type": EV_LED, "code": LED_CAPSL, "value": 1}


@pytest.mark.parametrize("bad, why", [
    (b"{not json", "not JSON"),
    (json.dumps({"type": "EV_KEY", "code": "KEY_NOPE", "value": 1}).encode(), "unknown code"),
    (json.dumps({"type": "EV_REL", "code": "REL_X", "value": 1}).encode(), "has no event type"),
    (json.dumps({"type": "EV_KEY", "code": 30, "value": 1 << 40}).encode(), "32-bit"),
    (json.dumps({"type": "EV_KEY", "code": 30, "extra": 1}).encode(), "an event is"),
    (json.dumps([]).encode(), "1 to 1024 events"),
])
def test_bad_lines_are_refused_one_by_one(keyboard: Session, bad: bytes, why: str) -> None:
    keyboard.input.post(2)
    good = json.dumps({"type": "EV_KEY", "code": "KEY_A", "value": 1}).encode()
    keyboard.client.sendto(bad + b"\n" + good, keyboard.events_path)
    assert keyboard.input.events(2) == [(EV_KEY, KEY_A, 1), SYN]
    log = keyboard.d.wait_log("refused")
    assert why in log, log


def test_a_guest_that_takes_no_events_costs_a_bounded_backlog(keyboard: Session) -> None:
    """Events wait for buffers up to 4096; beyond, whole frames (up to SYN_REPORT) are
    dropped, never part of one (a key-down kept without its key-up would repeat forever)."""
    burst = [{"type": "EV_KEY", "code": 30, "value": i % 2} for i in range(1000)]
    for _ in range(5):  # 5 frames of 1001 events: 4 fit in 4096, the 5th is dropped whole
        keyboard.send(burst)
    keyboard.d.wait_log("dropping them")
    kept = []
    for _ in range(4004 // 44):
        keyboard.input.post(44)
        kept += keyboard.input.events(44)
    frame = [(EV_KEY, KEY_A, i % 2) for i in range(1000)] + [SYN]
    assert kept == frame * 4
    keyboard.send({"type": "EV_KEY", "code": "KEY_B", "value": 1})
    keyboard.input.post(2)  # nothing else was kept: the next event is the new one
    assert keyboard.input.events(2) == [(EV_KEY, 48, 1), SYN]


def test_status_carries_leds_only(keyboard: Session) -> None:
    """Only LED (and sound) status goes back: a key sent on the status queue would be
    input injected into the host's device."""
    keyboard.input.post(2)
    keyboard.send({"type": "EV_KEY", "code": "KEY_A", "value": 1})  # the sender is known now
    keyboard.input.events(2)
    keyboard.input.status(EV_KEY, KEY_A, 1)
    keyboard.input.status(EV_LED, LED_CAPSL, 0)
    assert json.loads(keyboard.client.recv(4096)) == {"type": EV_LED, "code": LED_CAPSL,
                                                       "value": 0}


def test_a_flood_of_datagrams_leaves_the_queue_stoppable(keyboard: Session) -> None:
    """Junk faster than it can be parsed: a good event behind it still arrives, refusals
    are logged in summary (not line by line), and the worker answers GET_VRING_BASE."""
    keyboard.input.post(2)
    keyboard.client.setblocking(False)
    started = time.monotonic()
    junk = b"\n".join([b"{not json"] * 2000)
    sent = 0
    for _ in range(300):
        try:
            keyboard.client.sendto(junk, keyboard.events_path)
            sent += 2000
        except BlockingIOError:
            break
    keyboard.client.setblocking(True)
    keyboard.send({"type": "EV_KEY", "code": "KEY_A", "value": 1})  # behind the junk
    assert keyboard.input.events(2, timeout=60) == [(EV_KEY, KEY_A, 1), SYN]
    lines = keyboard.d.log().splitlines()
    one_by_one = [ln for ln in lines if "refused:" in ln and "times so far" not in ln]
    minutes = 1 + int((time.monotonic() - started) // 60)  # 10 a minute (ratelog.Limited)
    assert 10 <= len(one_by_one) <= 10 * minutes, lines[-20:]
    assert any("times so far)" in ln for ln in lines) and sent >= 2000, lines[-20:]
    assert keyboard.fe.get_vring_base(0) == 2


def test_mouse_relative_motion_is_signed(tmp_path: Path) -> None:
    s = Session(tmp_path, "mouse")
    try:
        assert s.input.config(0x11, EV_REL) == bytes([0b11, 0b1])  # REL_X, REL_Y, REL_WHEEL
        s.input.post(4)
        s.send([{"type": "EV_REL", "code": "REL_X", "value": -5},
                {"type": "EV_KEY", "code": "BTN_LEFT", "value": 1}])
        assert s.input.events(3) == [(EV_REL, 0, -5), (EV_KEY, BTN_LEFT, 1), SYN]
    finally:
        s.close()


def test_tablet_axes(tmp_path: Path) -> None:
    s = Session(tmp_path, "tablet")
    try:
        assert struct.unpack("<5I", s.input.config(0x12, 0)) == (0, 32767, 0, 0, 0)  # ABS_X
        s.input.post(2)
        s.send({"type": "EV_ABS", "code": "ABS_Y", "value": 16000})
        assert s.input.events(2) == [(EV_ABS, 1, 16000), SYN]
    finally:
        s.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostuser.cli.input", *args],
                          capture_output=True, text=True, timeout=30)


def test_print_capabilities() -> None:
    out = run_cli("--print-capabilities")
    assert out.returncode == 0
    assert json.loads(out.stdout) == {"type": "input", "features": ["evdev-path", "no-grab"]}


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --evdev-path and --events"),
    (["--events", "E", "--evdev-path", "/dev/null"], "exactly one of"),
    (["--events", "E", "--no-grab"], "--no-grab goes with --evdev-path"),
    (["--events", "E", "--kind", "joystick"], "invalid choice"),
])
def test_bad_arguments_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    out = run_cli("--socket-path", str(tmp_path / "s"), *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.parametrize("args, message", [
    (["--evdev-path", "/nonexistent/event0"], "No such file"),
    (["--evdev-path", "/dev/null"], "is not an evdev device"),
    (["--events", "/nonexistent/dir/events.sock"], "No such file"),
])
def test_unusable_sources_are_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    out = run_cli("--socket-path", str(tmp_path / "s"), *args)
    assert out.returncode == 1 and out.stderr.startswith("error: "), out.stderr
    assert message in out.stderr, out.stderr
