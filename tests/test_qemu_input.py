"""vhost-user-input with a QEMU guest: a virtual keyboard fed with JSON lines. The guest's
input device has the name, ids and capability bits we describe, reads exactly the key
events we inject, and its LED change (written to the evdev node, as a desktop does for caps
lock) reaches us through the status queue. Numbers are those of <linux/input-event-codes.h>.

QEMU 11.1 (the sid chroot), because QEMU 7.2's vhost-user-input refuses to start without
KVM ("vhost initialization failed: requires kvm"), and guests here run under TCG."""

from __future__ import annotations

import json
import shlex
import socket
import struct
import sys
from pathlib import Path

import pytest
from qemu_helpers import BackendDaemon, require_guest_prerequisites, watchdog
from test_vvu_qemu import qemu11  # noqa: F401  (fixture)

from testbed.guest import GuestVM

SCRIPT = r"""
for e in /sys/class/input/event*; do
    [ "$(cat $e/device/name)" = "vhost-user keyboard" ] && ev=${e##*/}
done
d=/sys/class/input/$ev/device
echo "NAME $(cat $d/name)"
echo "IDS $(cat $d/id/bustype) $(cat $d/id/vendor) $(cat $d/id/product) $(cat $d/id/version)"
echo "EVBITS $(cat $d/capabilities/ev)"
echo "LEDBITS $(cat $d/capabilities/led)"
echo "KEYBITS $(cat $d/capabilities/key)"
exec 3</dev/input/$ev
echo READY
echo "EVENTS $(dd bs=24 count=4 <&3 2>/dev/null | od -An -tx1 -v | tr -d ' \n')"
exec 3<&-
z='\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0'  # the timeval
printf "$z\021\0\001\0\001\0\0\0$z\0\0\0\0\0\0\0\0" > /dev/input/$ev  # LED_CAPSL on, SYN
exec 3</dev/input/$ev
echo LED-SENT
echo "LAST $(dd bs=24 count=2 <&3 2>/dev/null | od -An -tx1 -v | tr -d ' \n')"
"""
MODULES = ["virtio_pci", "virtio_input", "evdev"]
EV_SYN, EV_KEY, EV_LED, EV_REP = 0, 1, 0x11, 0x14
KEY_ESC, KEY_A, KEY_B, LED_CAPSL = 1, 30, 48, 1


@pytest.fixture(scope="module", autouse=True)
def kver() -> str:
    return require_guest_prerequisites()


def events(hexdump: str) -> list[tuple[int, int, int]]:
    """struct input_event (x86-64: a 16-byte timeval, u16 type, u16 code, s32 value)."""
    data = bytes.fromhex(hexdump)
    return [(t, c, v) for _s, _us, t, c, v in struct.iter_unpack("<qqHHi", data)]


def bitmap_has(words: str, bit: int) -> bool:
    """A sysfs capability bitmap: hex longs, most significant first."""
    value = 0
    for w in words.split():
        value = value << 64 | int(w, 16)
    return bool(value >> bit & 1)


def test_guest_keyboard_from_json_lines(qemu11: str, tmp_path: Path) -> None:  # noqa: F811
    evsock = str(tmp_path / "events.sock")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.bind(str(tmp_path / "client.sock"))
    client.settimeout(60)

    def send(etype: str, code: str, value: int) -> None:
        client.sendto(json.dumps({"type": etype, "code": code, "value": value}).encode(), evsock)

    with BackendDaemon(tmp_path, "vhost-user-input", ["--events", evsock], name="input") as d:
        vm = GuestVM(SCRIPT, modules=MODULES, timeout=90, qemu_binary=qemu11,
                     qemu_args=["-chardev", f"socket,id=c0,path={d.sock}",
                                "-device", "vhost-user-input-pci,chardev=c0"])
        with vm, watchdog(d, vm):
            vm.start()
            vm.wait_for("READY", 60)
            send("EV_KEY", "KEY_A", 1)
            send("EV_KEY", "KEY_A", 0)
            status = json.loads(client.recv(4096))  # the guest's caps-lock LED
            vm.wait_for("LED-SENT", 30)
            send("EV_KEY", "KEY_B", 1)
            result = vm.wait()
        client.close()
        assert result.status == 0, f"{result.console}\n{d.describe()}"
        out = dict(line.split(" ", 1) for line in result.lines if " " in line)
        assert out["NAME"] == "vhost-user keyboard"
        assert out["IDS"].split() == ["0006", "0000", "0001", "0001"]
        assert int(out["EVBITS"], 16) == (1 << EV_SYN | 1 << EV_KEY | 1 << EV_LED | 1 << EV_REP)
        assert int(out["LEDBITS"], 16) == 0b111
        keybits = out["KEYBITS"]
        assert bitmap_has(keybits, KEY_A) and bitmap_has(keybits, KEY_ESC)
        assert not bitmap_has(keybits, 0)
        assert events(out["EVENTS"]) == [(EV_KEY, KEY_A, 1), (EV_SYN, 0, 0),
                                         (EV_KEY, KEY_A, 0), (EV_SYN, 0, 0)]
        assert status == {"type": EV_LED, "code": LED_CAPSL, "value": 1}
        assert events(out["LAST"]) == [(EV_KEY, KEY_B, 1), (EV_SYN, 0, 0)]
        assert d.stop() == 0, d.describe()
        assert "Traceback" not in d.log, d.describe()


EVDEV_SCRIPT = r"""
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs dev /host/dev
mount -t tmpfs run /host/run
TMPDIR=/run chroot /host @PYTHON@ @CHECK@
"""


def test_evdev_passthrough_in_a_guest(tmp_path: Path) -> None:
    """--evdev-path with a real kernel evdev device: this host has no uinput, so the check
    runs in a guest that has (tests/evdev_check.py: a uinput device passed through, driven
    by the Python front-end; the host's Python and this checkout over 9p)."""
    check = Path(__file__).with_name("evdev_check.py")
    script = (EVDEV_SCRIPT.replace("@PYTHON@", shlex.quote(sys.executable))
              .replace("@CHECK@", shlex.quote(str(check))))
    vm = GuestVM(script, modules=["virtio_pci", "9pnet_virtio", "9p", "uinput", "evdev"],
                 timeout=240, mem_mb=384, qemu_args=[
                     "-cpu", "max",  # numpy needs more than TCG's qemu64
                     "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on"])
    with vm:
        result = vm.run()
    checks = [line for line in result.lines if line.startswith("CHECK ")]
    assert result.status == 0 and "RESULT 0 failed" in result.lines, result.console[-4000:]
    assert len(checks) == 10 and all(c.endswith(": ok") for c in checks), checks
