"""Run inside a test guest (test_qemu_input.py): a real kernel evdev device, made with
uinput, passed through by vhost-user-input --evdev-path and driven by the Python front-end.
Prints ``CHECK name: ok`` or ``CHECK name: FAILED ...`` lines and exits 0 when all pass.

Numbers are those of <linux/input-event-codes.h> and <linux/uinput.h>."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.input import InputClient
from vhostuser.protocol import ProtocolFeature, VirtioFeature

EV_SYN, EV_KEY, EV_ABS, EV_LED, EV_REP = 0, 1, 3, 0x11, 0x14
KEY_A, KEY_B, BTN_LEFT, ABS_X, LED_CAPSL = 30, 48, 0x110, 0, 1
NAME = b"evdev-check device"
EVENT = struct.Struct("@llHHi")


def _iow(nr: int, size: int) -> int:
    return 1 << 30 | size << 16 | ord("U") << 8 | nr


def make_uinput() -> int:
    fd = os.open("/dev/uinput", os.O_RDWR | os.O_NONBLOCK)
    for ev in (EV_KEY, EV_ABS, EV_LED, EV_REP):  # EV_REP: as every real keyboard
        fcntl.ioctl(fd, _iow(100, 4), ev)  # UI_SET_EVBIT
    for key in (KEY_A, KEY_B, BTN_LEFT):
        fcntl.ioctl(fd, _iow(101, 4), key)  # UI_SET_KEYBIT
    fcntl.ioctl(fd, _iow(103, 4), ABS_X)  # UI_SET_ABSBIT
    fcntl.ioctl(fd, _iow(105, 4), LED_CAPSL)  # UI_SET_LEDBIT
    # UI_ABS_SETUP: code, pad, absinfo (value, min, max, fuzz, flat, resolution)
    fcntl.ioctl(fd, _iow(4, 28), struct.pack("<HH6i", ABS_X, 0, 0, -100, 1000, 2, 3, 7))
    # UI_DEV_SETUP: input_id (bustype USB, vendor, product, version), name[80], ff max
    fcntl.ioctl(fd, _iow(3, 92), struct.pack("<HHHH80sI", 0x03, 0x1234, 0x5678, 2, NAME, 0))
    fcntl.ioctl(fd, ord("U") << 8 | 1)  # UI_DEV_CREATE
    return fd


def find_event_node() -> str:
    for d in Path("/sys/class/input").glob("event*"):  # made by UI_DEV_CREATE
        if (d / "device" / "name").read_bytes().strip() == NAME:
            return f"/dev/input/{d.name}"
    raise SystemExit("no event node for the uinput device")


def main() -> int:
    failures = 0

    def check(name: str, ok: bool, detail: object = "") -> None:
        nonlocal failures
        print(f"CHECK {name}: ok" if ok else f"CHECK {name}: FAILED {detail}", flush=True)
        failures += not ok

    ufd = make_uinput()
    node = find_event_node()
    sock = "/run/input.sock"
    backend = subprocess.Popen([sys.executable, "-m", "vhostuser.cli.input", "--socket-path",
                                sock, "--evdev-path", node, "--no-grab", "-v"])
    try:
        fe = Frontend(sock, connect_timeout=60)
        fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES,
                     ProtocolFeature.CONFIG | ProtocolFeature.REPLY_ACK)
        fe.set_mem_table()
        fe.setup_queue(0, 16)
        fe.setup_queue(1, 16)
        inp = InputClient(fe)
        check("name", inp.config(0x01) == NAME, inp.config(0x01))
        check("ids", struct.unpack("<HHHH", inp.config(0x03)) == (0x03, 0x1234, 0x5678, 2),
              inp.config(0x03))
        keys = inp.config(0x11, EV_KEY)
        have = {8 * i + b for i, byte in enumerate(keys) for b in range(8) if byte >> b & 1}
        check("key bits", have == {KEY_A, KEY_B, BTN_LEFT}, sorted(have))
        check("led bits", inp.config(0x11, EV_LED) == b"\x02", inp.config(0x11, EV_LED))
        check("autorepeat", inp.config(0x11, EV_REP) == b"\x00", inp.config(0x11, EV_REP))
        absx = struct.unpack("<5i", inp.config(0x12, ABS_X))
        check("abs info", absx == (-100, 1000, 2, 3, 7), absx)  # min max fuzz flat res

        inp.post(8)
        for etype, code, value in ((EV_KEY, KEY_A, 1), (EV_ABS, ABS_X, -42), (EV_SYN, 0, 0)):
            os.write(ufd, EVENT.pack(0, 0, etype, code, value))
        got = inp.events(3)
        check("events", got == [(EV_KEY, KEY_A, 1), (EV_ABS, ABS_X, -42), (EV_SYN, 0, 0)], got)

        reader = os.open(node, os.O_RDONLY | os.O_NONBLOCK)  # another reader of the device
        inp.status(EV_KEY, KEY_B, 1)  # not an LED: must not reach the host's readers
        inp.status(EV_LED, LED_CAPSL, 1)  # the guest turns caps lock on: back to the device
        deadline, led = time.monotonic() + 10, None
        while led is None and select.select([ufd], [], [], deadline - time.monotonic())[0]:
            for _s, _us, t, c, v in EVENT.iter_unpack(os.read(ufd, 24 * 16)):
                if t == EV_LED:
                    led = (t, c, v)
        check("led back to the evdev", led == (EV_LED, LED_CAPSL, 1), led)
        seen = [(t, c, v) for _s, _us, t, c, v in EVENT.iter_unpack(os.read(reader, 24 * 64))]
        check("no key injected into the host", (EV_KEY, KEY_B, 1) not in seen
              and (EV_LED, LED_CAPSL, 1) in seen, seen)
        fe.close()
    finally:
        backend.terminate()
        check("back-end exit status", backend.wait(30) == 0, backend.returncode)
    print(f"RESULT {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
