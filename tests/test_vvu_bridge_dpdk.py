"""DPDK's testpmd with its vhost PMD (net_vhost), unmodified, serves a consumer guest's NIC
through the virtio-vhost-user device behind vhost-user-vvu-bridge (process appliance):

    consumer guest --virtio-net--> QEMU 7.2 --vhost-user--> vhost-user-vvu-device
        --> vhost-user-vvu-bridge --vhost-user--> dpdk-testpmd (net_vhost, icmpecho)

testpmd answers the guest's pings (and anything else the guest sends: a gratuitous ARP
when its link comes up) and counts every frame; its counts must equal the guest's own.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from dpdk import Testpmd
from qemu_helpers import CHECKOUT
from qemu_net_helpers import NET_MODULES, guest_net_setup, net_qemu_args, ping_result, tagged
from test_qemu_vvu import start, start_device, wait_for

from testbed.guest import GuestVM

PINGS = 5
SCRIPT = guest_net_setup("192.0.2.1") + f"""
# testpmd's icmpecho mode answers the ARP request and the pings (busybox's ip has no
# "neigh add" for a static entry)
ping -c {PINGS} -W 5 192.0.2.2 > /tmp/ping.out
echo "PING $(grep 'packet loss' /tmp/ping.out)"
echo "SENT $(cat /sys/class/net/eth0/statistics/tx_packets)"
echo "RECEIVED $(cat /sys/class/net/eth0/statistics/rx_packets)"
"""


def test_testpmd_answers_the_consumer_through_the_bridge(tmp_path: Path) -> None:
    vfu, vhost, sock = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "dpdk.sock"
    dev = start_device(tmp_path)
    bridge = None
    with Testpmd.vhost(sock, forward_mode="icmpecho", log_path=tmp_path / "testpmd.log") as tp:
        try:
            tp.start()
            bridge = start(["vhostuser.cli.vvu_bridge", "--vvu", str(vfu), "--backend-socket",
                            str(sock), "-v"], tmp_path / "bridge.log")
            wait_for(tmp_path / "device.log", "vfio-user client connected", dev)
            with GuestVM(SCRIPT, modules=NET_MODULES, timeout=180,
                         qemu_args=net_qemu_args(vhost, "52:54:00:00:00:01")) as vm:
                result = vm.run()
            assert result.status == 0, result.console[-3000:]
            stats = tp.port_stats()[0]
        finally:
            for proc in (bridge, dev):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            codes = [p.wait(15) for p in (bridge, dev) if p is not None]
    log = (tmp_path / "bridge.log").read_text()
    assert codes == [0] * len(codes), log[-4000:]
    assert ping_result(tagged(result.lines, "PING")) == (PINGS, PINGS, 0), result.output
    sent, received = int(tagged(result.lines, "SENT")), int(tagged(result.lines, "RECEIVED"))
    assert PINGS <= sent <= PINGS + 2, result.output  # the pings, and at most the ARPs
    assert (stats.rx_packets, stats.tx_packets) == (sent, received), stats
    assert stats.rx_errors == 0 and stats.tx_errors == 0, stats
    assert "Traceback" not in log, log


def test_the_demo_with_dpdk(tmp_path: Path) -> None:
    """`scripts/demo --backend dpdk --appliance process`: testpmd behind the bridge answers
    the demo guest's pings, and the demo checks testpmd's counts against the guest's (the
    VM appliance runs the same bridge and testpmd in test_vvu_appliance_vm.py)."""
    r = subprocess.run([sys.executable, "-m", "testbed.demo", "--backend", "dpdk",
                        "--appliance", "process", "--keep", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    loss = [ln for ln in r.stdout.splitlines() if "packet loss" in ln]
    assert loss and ping_result(loss[0].strip()) == (5, 5, 0), r.stdout
    counted = [ln for ln in r.stdout.splitlines() if "testpmd: (RX-packets, TX-packets)" in ln]
    sent = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("guest: sent")]
    assert counted and sent, r.stdout
    words = sent[0].split()
    guest = (int(words[words.index("sent") + 1]), int(words[words.index("received") + 1]))
    shown = counted[0].split("=", 1)[1].strip(" ()").split(",")
    assert (int(shown[0]), int(shown[1])) == guest, r.stdout
    assert guest[0] >= 5 and guest[1] >= 5
    assert "testpmd counted exactly the frames the guest sent and received" in r.stdout
