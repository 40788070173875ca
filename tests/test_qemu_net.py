"""End-to-end tests of ``vhost-user-switch`` with QEMU guests (and a TAP uplink).

Each test starts the switch as a subprocess (``-vv``, log in tmp_path, counters read with
``vhost-user-switch stats``), boots TCG guests (testbed.guest) with a virtio-net-pci NIC on
its ports, and checks what the guests saw and what the switch counted. The switch is
always stopped with SIGTERM at the end and must exit 0.

Addresses: 192.0.2.0/24 only (RFC 5737), in the guests and in a network namespace the TAP
test creates and deletes; the host's own namespace is never touched.

Needs qemu-system-x86, linux-image-amd64, busybox-static, iproute2 and ethtool (copied
into the multi-queue guest for its per-queue counters); the tests fail (never skip) if
those are missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from qemu_net_helpers import (
    NET_MODULES,
    Netns,
    SwitchDaemon,
    ethtool_files,
    ethtool_stats,
    format_drops,
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

from testbed.guest import GuestError, GuestResult, GuestVM, find_busybox

MiB = 1 << 20
GUEST_TIMEOUT = 120  # boots take 6-9 s under TCG, more with two guests on 2 CPUs


@pytest.fixture(scope="module", autouse=True)
def prerequisites() -> None:
    require_net_prerequisites()


def guest(script: str, sock: Path, guest_mac: str, queues: int = 1, packed: bool = False,
          **kw: Any) -> GuestVM:
    return GuestVM(script, modules=NET_MODULES, timeout=GUEST_TIMEOUT,
                   qemu_args=net_qemu_args(sock, guest_mac, queues, packed), **kw)


def finish(vm: GuestVM, name: str, switch: SwitchDaemon) -> GuestResult:
    """Wait for the guest's script; it must exit 0."""
    try:
        result = vm.wait()
    except GuestError as e:
        pytest.fail(f"guest {name}: {e}\n{switch.describe()}")
    assert result.status == 0, (f"guest {name} script failed ({result.status}):\n"
                                f"{result.output}\n{switch.describe()}")
    return result


def wait_up(vm: GuestVM, name: str, switch: SwitchDaemon, timeout: float = 90) -> None:
    try:
        vm.wait_for("\nUP\n", timeout)
    except GuestError as e:
        pytest.fail(f"guest {name}: {e}\n{switch.describe()}")


def stop_switch(switch: SwitchDaemon) -> None:
    rc = switch.stop()
    assert rc == 0, f"the switch exited {rc} on SIGTERM\n{switch.describe()}"
    assert "Traceback" not in switch.log, switch.describe()


def check_ping(lines: list[str], tag: str, count: int) -> None:
    sent, got, loss = ping_result(tagged(lines, tag))
    assert (sent, got, loss) == (count, count, 0), (
        f"{tag}: {sent} sent, {got} received, {loss}% loss:\n" + "\n".join(lines))


# --------------------------------------------------------------------------- two guests


A_IP, B_IP = "192.0.2.10", "192.0.2.11"
FILE_MIB = 2

SENDER = guest_net_setup(A_IP) + f"""
dd if=/dev/urandom of=/tmp/f bs=64k count={FILE_MIB * 16} 2>/dev/null
echo "SRC $(sha256sum < /tmp/f)"
echo "SRCSIZE $(wc -c < /tmp/f)"
{wait_reachable(B_IP)}
ping -c 3 {B_IP} > /tmp/ping.out
echo "PING_RC $?"
echo "PING $(grep 'packet loss' /tmp/ping.out)"
# B listens once it has booted: retry until nc connects and the whole file went through.
{retry(f"nc {B_IP} 5000 < /tmp/f", 150)}
echo "SEND_RETRIES $i"
"""

RECEIVER = guest_net_setup(B_IP) + """
timeout 100 nc -l -p 5000 > /tmp/f
echo "NC_RC $?"
echo "DST $(sha256sum < /tmp/f)"
echo "DSTSIZE $(wc -c < /tmp/f)"
"""


def test_two_guests_ping_and_file_transfer(tmp_path: Path) -> None:
    sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
    mac_a, mac_b = mac(1), mac(2)
    t0 = time.monotonic()
    with SwitchDaemon(tmp_path, [f"{sock_a},mac={mac_a}", f"{sock_b},mac={mac_b}"]) as switch:
        # A's NIC has packed rings, B's split ones: both layouts, and frames between them
        with (guest(SENDER, sock_a, mac_a, packed=True) as vm_a,
              guest(RECEIVER, sock_b, mac_b) as vm_b):
            vm_a.start()
            vm_b.start()
            wait_up(vm_a, "A", switch)
            wait_up(vm_b, "B", switch)
            # Both NICs are up: each port must be connected and run its rx/tx pair.
            switch.wait_queues({"port0": [0, 1], "port1": [0, 1]})
            live = switch.stats()
            res_b = finish(vm_b, "B", switch)
            res_a = finish(vm_a, "A", switch)
        stats = switch.stats()
        stop_switch(switch)
    a, b = res_a.lines, res_b.lines
    ctx = (f"\n--- A ---\n{res_a.output}--- B ---\n{res_b.output}"
           f"--- stats ---\n{json.dumps(stats, indent=1)}\n{switch.describe()}")

    assert tagged(a, "MAC") == mac_a and tagged(b, "MAC") == mac_b, ctx
    assert tagged(a, "REACHABLE").startswith(B_IP), ctx
    assert tagged(a, "PING_RC") == "0", ctx
    check_ping(a, "PING", 3)
    assert tagged(b, "NC_RC") == "0", ctx
    assert int(tagged(a, "SRCSIZE")) == FILE_MIB * MiB, ctx
    assert tagged(b, "DSTSIZE") == tagged(a, "SRCSIZE"), ctx
    assert tagged(b, "DST") == tagged(a, "SRC"), "file arrived damaged" + ctx

    # The switch saw the traffic both ways: > FILE_MIB MiB of frames from A to B (the file
    # in GSO frames of up to 64 KiB: both NICs negotiated TSO, and A's packed ring carried
    # them), the ACKs back, and learned each MAC at its own port.
    pa, pb = port_stats(stats, "port0"), port_stats(stats, "port1")
    packed = 1 << 34  # VIRTIO_F_RING_PACKED, as the guests' drivers negotiated it
    la, lb = port_stats(live, "port0"), port_stats(live, "port1")
    assert int(la["features"], 16) & packed and not int(lb["features"], 16) & packed, ctx
    assert pa["rx_bytes"] > FILE_MIB * MiB and pb["tx_bytes"] > FILE_MIB * MiB, ctx
    assert pa["offloads"].get("rx_gso", 0) > 0 and pb["offloads"].get("tx_gso", 0) > 0, ctx
    assert pb["rx_packets"] > 20 and pa["tx_packets"] > 20, ctx
    assert not format_drops(pa) and not format_drops(pb), ctx
    macs = learned(stats)
    assert macs.get(mac_a) == "port0" and macs.get(mac_b) == "port1", ctx
    print(f"two guests: {time.monotonic() - t0:.1f}s; A->switch {pa['rx_packets']} frames, "
          f"switch->B {pb['tx_packets']}; drops {pa['drops']} {pb['drops']}")


# --------------------------------------------------------------------------- TAP uplink


TAP, TAP_IP, G_IP = "vut0", "192.0.2.1", "192.0.2.10"

TAP_GUEST = guest_net_setup(G_IP) + f"""
{wait_reachable(TAP_IP, tries=30)}
ping -c 3 {TAP_IP} > /tmp/ping.out
echo "PING_RC $?"
echo "PING $(grep 'packet loss' /tmp/ping.out)"
echo PINGED
# Stay up until the namespace side has pinged us 3 times (ICMP InEchos, /proc/net/snmp).
inechos() {{
    awk '/^Icmp:/ {{ if (!c) {{ for (i = 2; i <= NF; i++) if ($i == "InEchos") c = i }}
                    else {{ print $c; exit }} }}' /proc/net/snmp
}}
t=0
while [ "$(inechos)" -lt 3 ] && [ $t -lt 300 ]; do sleep 0.1; t=$((t + 1)); done
sleep 0.5
echo "INECHOS $(inechos)"
"""


def test_tap_uplink_in_netns(tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    gmac = mac(0x10)
    with Netns() as ns:
        for key in ("all", "default"):  # only what the test sends: no IPv6 chatter
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
        ns.run("ip", "addr", "add", f"{TAP_IP}/24", "dev", TAP)
        ns.run("ip", "link", "set", TAP, "up")
        tap_mac = ns.run("cat", f"/sys/class/net/{TAP}/address").stdout.strip()

        with SwitchDaemon(tmp_path, [f"{sock},mac={gmac}"], tap=TAP, netns=ns.name) as switch:
            with guest(TAP_GUEST, sock, gmac) as vm:
                vm.start()
                wait_up(vm, "G", switch)
                switch.wait_queues({"port0": [0, 1]})
                try:
                    vm.wait_for("\nPINGED\n", 90)
                except GuestError as e:
                    pytest.fail(f"guest: {e}\n{switch.describe()}")
                # The host may have no ping of its own: busybox's (static) will do.
                host_ping = ns.run(str(find_busybox()), "ping", "-c", "3", "-W", "5", G_IP,
                                   check=False, timeout=60)
                res = finish(vm, "G", switch)
            stats = switch.stats()
            stop_switch(switch)
        addrs = ns.run("ip", "-o", "addr", "show", "dev", TAP).stdout
    assert ns.name not in ns.list(), f"netns {ns.name} left behind"

    out = res.lines
    ctx = (f"\n--- guest ---\n{res.output}--- netns ping ---\n{host_ping.stdout}"
           f"{host_ping.stderr}--- stats ---\n{json.dumps(stats, indent=1)}\n"
           f"{switch.describe()}")
    assert f"{TAP_IP}/24" in addrs, addrs
    assert tagged(out, "MAC") == gmac, ctx
    assert tagged(out, "PING_RC") == "0", ctx
    check_ping(out, "PING", 3)
    assert host_ping.returncode == 0, "ping from the namespace failed" + ctx
    assert ping_result(host_ping.stdout) == (3, 3, 0), ctx
    assert int(tagged(out, "INECHOS")) >= 3, ctx

    # 3 echo requests + 3 replies each way, plus ARP, crossed the TAP port.
    tap, port = port_stats(stats, f"tap:{TAP}"), port_stats(stats, "port0")
    assert tap["rx_packets"] >= 6 and tap["tx_packets"] >= 6, ctx
    assert port["rx_packets"] >= 6 and port["tx_packets"] >= 6, ctx
    assert not format_drops(tap) and not format_drops(port), ctx
    macs = learned(stats)
    assert macs.get(gmac) == "port0" and macs.get(tap_mac) == f"tap:{TAP}", ctx


# --------------------------------------------------------------------------- multi-queue


M_IPS = [f"192.0.2.{i}" for i in range(20, 36)]  # 16 flows to spread over M's rx queues
P_IP = "192.0.2.40"

MQ_GUEST = guest_net_setup(*M_IPS) + f"""
echo "QUEUES $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
echo "CPUS $(nproc)"
echo "XPS $(cat /sys/class/net/eth0/queues/tx-0/xps_cpus) \
$(cat /sys/class/net/eth0/queues/tx-1/xps_cpus)"
{wait_reachable(P_IP)}
# One pinger on each vCPU: XPS sends CPU0's frames on tx-0 and CPU1's on tx-1.
taskset 1 ping -c 5 -i 0.2 {P_IP} > /tmp/p0 &
taskset 2 ping -c 5 -i 0.2 {P_IP} > /tmp/p1 &
wait
echo "PING0 $(grep 'packet loss' /tmp/p0)"
echo "PING1 $(grep 'packet loss' /tmp/p1)"
# Tell P we are done (it waits for this before powering off), then read the counters.
{retry(f"echo done | nc {P_IP} 5001", 300)}
sleep 1
echo ETHTOOL
ethtool -S eth0
echo ETHTOOL_END
"""

PEER_GUEST = guest_net_setup(P_IP) + f"""
{wait_reachable(M_IPS[0])}
# One prober per address, all at once, each up to 4 one-shot pings with a 5 s window. A
# loaded TCG guest loses more than busybox ping's reply window: in two CI runs one ping
# of 16 (2 packets each, then 1 packet with 15 s) went unanswered with the switch
# counting every frame delivered both ways (M's driver got all the switch gave it, and P
# all M sent): the guests' ARP, not the data path, which the counters below check.
for a in {" ".join(M_IPS)}; do
    (n=0
     until ping -c 1 -W 5 $a >/dev/null 2>&1; do
         n=$((n + 1))
         if [ $n -ge 4 ]; then echo "PEER_FAIL $a"; exit 1; fi
     done
     echo "$a $n" > /tmp/ok-$a) &
done
wait
echo "PEER_OK $(cat /tmp/ok-* | wc -l)"
echo "PEER_RETRIES $(cat /tmp/ok-* | awk '{{s += $2}} END {{print s}}')"
timeout 100 nc -l -p 5001 > /tmp/done
echo "DONE $(cat /tmp/done)"
"""


def test_multiqueue_port(tmp_path: Path) -> None:
    files = ethtool_files()
    sock_m, sock_p = tmp_path / "m.sock", tmp_path / "p.sock"
    mac_m, mac_p = mac(0x20), mac(0x21)
    with SwitchDaemon(tmp_path, [f"{sock_m},mac={mac_m},queues=2",
                                 f"{sock_p},mac={mac_p}"]) as switch:
        with (guest(MQ_GUEST, sock_m, mac_m, queues=2, files=files) as vm_m,
              guest(PEER_GUEST, sock_p, mac_p) as vm_p):
            vm_m.start()
            vm_p.start()
            wait_up(vm_m, "M", switch)
            wait_up(vm_p, "P", switch)
            running = switch.wait_queues({"port0": [0, 1, 2, 3], "port1": [0, 1]})
            res_m = finish(vm_m, "M", switch)
            res_p = finish(vm_p, "P", switch)
        stats = switch.stats()
        stop_switch(switch)
    m, p = res_m.lines, res_p.lines
    ctx = (f"\n--- M ---\n{res_m.output}--- P ---\n{res_p.output}"
           f"--- stats ---\n{json.dumps(stats, indent=1)}\n{switch.describe()}")

    assert tagged(m, "QUEUES").split() == ["rx-0", "rx-1", "tx-0", "tx-1"], ctx
    assert tagged(m, "CPUS") == "2", ctx
    assert tagged(m, "XPS").split() == ["1", "2"], ctx
    check_ping(m, "PING0", 5)
    check_ping(m, "PING1", 5)
    assert tagged(p, "PEER_OK") == str(len(M_IPS)), ctx
    assert tagged(p, "DONE") == "done", ctx

    # The switch ran all four queues of M's port while the guests were up ...
    assert port_stats(running, "port0")["queues"] == [0, 1, 2, 3]
    # ... and both pairs carried frames, as M's virtio-net driver counted them.
    eth = ethtool_stats(res_m.between("ETHTOOL", "ETHTOOL_END"))
    per_queue = {k: eth.get(k) for k in ("rx_queue_0_packets", "rx_queue_1_packets",
                                         "tx_queue_0_packets", "tx_queue_1_packets")}
    assert all(v is not None for v in per_queue.values()), f"ethtool -S: {eth}" + ctx
    assert per_queue["tx_queue_0_packets"] >= 5, f"tx-0 (CPU0) unused: {per_queue}" + ctx
    assert per_queue["tx_queue_1_packets"] >= 5, f"tx-1 (CPU1) unused: {per_queue}" + ctx
    # rx queue = the switch's per-flow hash; 16 addresses on M make 16+ flows.
    assert per_queue["rx_queue_0_packets"] > 0, f"rx-0 unused: {per_queue}" + ctx
    assert per_queue["rx_queue_1_packets"] > 0, f"rx-1 unused: {per_queue}" + ctx

    pm, pp = port_stats(stats, "port0"), port_stats(stats, "port1")
    tx_sum = per_queue["tx_queue_0_packets"] + per_queue["tx_queue_1_packets"]
    rx_sum = per_queue["rx_queue_0_packets"] + per_queue["rx_queue_1_packets"]
    # Everything M sent on either tx queue reached the switch; everything M's rx queues
    # got came from it.
    assert pm["rx_packets"] >= tx_sum, f"switch took {pm['rx_packets']} < {tx_sum}" + ctx
    assert pm["tx_packets"] >= rx_sum, f"switch gave {pm['tx_packets']} < {rx_sum}" + ctx
    assert pp["rx_packets"] > 0 and pp["tx_packets"] > 0, ctx
    assert not format_drops(pm) and not format_drops(pp), ctx
    # With two ports every frame one takes goes to the other or is counted as dropped
    # (here: a port that went down first): the data path lost none, whatever the guests'
    # pings saw.
    for src, dst in ((pm, pp), (pp, pm)):
        assert src["rx_packets"] == dst["tx_packets"] + sum(dst["drops"].values()), ctx
    macs = learned(stats)
    assert macs.get(mac_m) == "port0" and macs.get(mac_p) == "port1", ctx
    print(f"multi-queue evidence: port0 queues while up {port_stats(running, 'port0')['queues']}"
          f"; guest per-queue {per_queue}; peer ping retries {tagged(p, 'PEER_RETRIES')}"
          f"; switch port0 rx {pm['rx_packets']} "
          f"tx {pm['tx_packets']}")


def test_helpers_sanity() -> None:
    """The parsers the tests rely on (cheap; no guest)."""
    assert ping_result("3 packets transmitted, 3 packets received, 0% packet loss") == (3, 3, 0)
    assert ethtool_stats(["NIC statistics:", "     rx_queue_0_packets: 20"]) == {
        "rx_queue_0_packets": 20}
    assert "vectors=0" in " ".join(net_qemu_args(Path("/x"), mac(1)))
