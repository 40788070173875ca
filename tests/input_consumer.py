"""Run in a consumer guest (test_vvu_appliance_vm.py) with the host's Python: read the
virtual keyboard's events until KEY_A is pressed, turn caps lock on (an LED status event
back to the device), then read until KEY_B is pressed. Prints ``NAME <name>``,
``GOT KEY_A``, ``GOT KEY_B``."""

from __future__ import annotations

import os
import struct
from pathlib import Path

EVENT = struct.Struct("@llHHi")
EV_SYN, EV_KEY, EV_LED = 0, 1, 0x11


def main() -> None:
    node = next(d.name for d in Path("/sys/class/input").glob("event*")
                if (d / "device" / "name").read_text().strip() == "vhost-user keyboard")
    print(f"NAME {(Path('/sys/class/input') / node / 'device' / 'name').read_text().strip()}",
          flush=True)
    fd = os.open(f"/dev/input/{node}", os.O_RDWR)

    def until(code: int) -> None:
        while True:
            data = os.read(fd, EVENT.size)
            _s, _us, t, c, v = EVENT.unpack(data)
            if (t, c, v) == (EV_KEY, code, 1):
                return

    until(30)
    print("GOT KEY_A", flush=True)
    os.write(fd, EVENT.pack(0, 0, EV_LED, 1, 1) + EVENT.pack(0, 0, EV_SYN, 0, 0))
    until(48)
    print("GOT KEY_B", flush=True)


if __name__ == "__main__":
    main()
