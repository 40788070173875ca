"""Run beside vhost-user-input --events PATH (inside the appliance VM in
test_vvu_appliance_vm.py): press and release KEY_A every 0.2 s until the guest's status
(an LED) comes back, print ``STATUS <json>``, then press KEY_B once as the answer."""

from __future__ import annotations

import json
import socket
import sys
import time

path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path + ".injector")
s.settimeout(0.1)
deadline = time.monotonic() + 240
value = 1
while time.monotonic() < deadline:
    try:
        s.sendto(json.dumps({"type": "EV_KEY", "code": "KEY_A", "value": value}).encode(), path)
    except OSError:  # the back-end is not there yet
        pass
    value ^= 1
    try:
        status = s.recv(4096)
    except TimeoutError:
        continue
    print(f"STATUS {status.decode().strip()}", flush=True)
    if value == 0:  # leave KEY_A released
        s.sendto(b'{"type": "EV_KEY", "code": "KEY_A", "value": 0}', path)
    s.sendto(b'{"type": "EV_KEY", "code": "KEY_B", "value": 1}', path)
    break
