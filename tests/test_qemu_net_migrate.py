"""Live migration of a guest on a vhost-user-switch port (issue 9): guest G, pinged
five times a second by guest P on another port, migrates (QMP `migrate`, QEMU 7.2) to a
second QEMU on a third port of the same switch. The source port logs its writes into G's
memory (LOG_SHMFD, VHOST_F_LOG_ALL). The ports offer GUEST_ANNOUNCE, so the destination
QEMU has G announce itself (a gratuitous ARP from the new port, which the switch learns)
instead of sending SEND_RARP (the switch's RARP is tests/test_switch.py's). P's pings go
on: at most a handful lost around the switch-over, and G answers from its new port."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemu_helpers import migrate, wait_until
from qemu_net_helpers import (
    NET_MODULES,
    SwitchDaemon,
    guest_net_setup,
    learned,
    mac,
    net_qemu_args,
    ping_result,
    port_stats,
    require_net_prerequisites,
    retry,
    tagged,
    wait_reachable,
)

from testbed.guest import GuestError, GuestVM

G_IP, P_IP = "192.0.2.50", "192.0.2.51"
PINGS = 150  # at 0.2 s: 30 s, across the migration

G_SCRIPT = guest_net_setup(G_IP) + """
timeout 200 nc -l -p 5001 > /tmp/done
echo "DONE $(cat /tmp/done)"
"""

P_SCRIPT = guest_net_setup(P_IP) + wait_reachable(G_IP) + f"""
echo PINGING
ping -c {PINGS} -i 0.2 -W 1 {G_IP} > /tmp/ping
echo "PING $(grep 'packet loss' /tmp/ping)"
{retry(f"echo done | nc {G_IP} 5001", 150)}
"""


@pytest.fixture(scope="module", autouse=True)
def _prerequisites() -> None:
    require_net_prerequisites()


def test_a_pinged_guest_migrates_between_switch_ports(tmp_path: Path) -> None:
    src_sock, dst_sock, p_sock = (tmp_path / f"{n}.sock" for n in ("src", "dst", "p"))
    src_qmp, mig = tmp_path / "src.qmp", tmp_path / "mig.sock"
    gmac, pmac = mac(0x50), mac(0x51)
    ports = [f"{src_sock},mac={gmac}", f"{dst_sock},mac={gmac}", f"{p_sock},mac={pmac}"]
    with SwitchDaemon(tmp_path, ports) as switch:
        src = GuestVM(G_SCRIPT, modules=NET_MODULES, timeout=300,
                      qemu_args=[*net_qemu_args(src_sock, gmac),
                                 "-qmp", f"unix:{src_qmp},server=on,wait=off"])
        dst = GuestVM(G_SCRIPT, modules=NET_MODULES, timeout=300,
                      qemu_args=[*net_qemu_args(dst_sock, gmac), "-incoming", f"unix:{mig}"])
        peer = GuestVM(P_SCRIPT, modules=NET_MODULES, timeout=300,
                       qemu_args=net_qemu_args(p_sock, pmac))

        def context() -> str:
            return (f"--- G source ---\n{src.console[-2000:]}\n--- G destination ---\n"
                    f"{dst.console[-2000:]}\n--- P ---\n{peer.console[-2000:]}\n"
                    f"{switch.describe()}")

        try:
            src.start()
            peer.start()
            peer.wait_for("\nPINGING\n", 180)
            dst.start()
            # some pings before: P's port has had a few through
            if not wait_until(lambda: port_stats(switch.stats(), "port2")["rx_packets"] >= 15,
                              30):
                pytest.fail(f"P does not ping G\n{context()}")
            migrate(src_qmp, mig, context, timeout=120)
            src.close()  # QEMU's part ends here: the source is paused for good
            p_result = peer.wait()
            g_result = dst.wait()
        except GuestError as e:
            pytest.fail(f"{e}\n{context()}")
        finally:
            for vm in (src, dst, peer):
                vm.close()
        stats = switch.stats()
        rc = switch.stop()
    ctx = f"{context()}\n--- stats ---\n{json.dumps(stats, indent=1)}"
    sent, got, _ = ping_result(tagged(p_result.lines, "PING"))
    assert sent == PINGS and got >= PINGS - 10, ctx
    assert "DONE done" in g_result.lines, ctx  # G, now on the destination, heard P
    assert learned(stats).get(gmac) == "port1", ctx  # the destination's port
    assert "SEND_RARP" not in switch.log, ctx  # (GUEST_ANNOUNCE: the guest announced)
    assert "dirty logging on" in switch.log, ctx
    assert rc == 0, ctx
