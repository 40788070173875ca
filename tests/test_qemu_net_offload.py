"""Checksum and segmentation offloads through ``vhost-user-switch``, with two QEMU guests
whose Linux drivers use them, and through ``vhost-user-net --tap`` to a network namespace.

Guest A's NIC has every offload: it sends TCP in 64 KiB GSO frames and takes them whole.
Guest B's NIC sends GSO frames too, but takes neither checksums nor GSO frames
(``guest_csum=off,guest_tso4=off,...``): what A sends B must be segmented and checksummed
by the switch, in software, and B's TCP stack checks every checksum (a wrong one is
counted in InCsumErrors and the segment dropped, so the transfer would stall). Both send
64 MiB to each other at the same time; the data (64 copies of a seeded 1 MiB file put in
both initramfs) is known to the test, which compares the sha256 each receiver prints.
The switch's counters say which way each frame went (carried whole or cut).

With ``--tap``, the TAP is opened with IFF_VNET_HDR: the guest's GSO frames go to the
namespace's kernel whole, and the kernel's come to the guest whole, as the pair's
counters show.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
from daemon import Daemon
from qemu_net_helpers import (
    NET_MODULES,
    Netns,
    SwitchDaemon,
    format_drops,
    guest_net_setup,
    mac,
    net_qemu_args,
    port_stats,
    retry,
    tagged,
    wait_reachable,
)

from testbed.guest import GuestError, GuestVM, find_busybox

A_IP, B_IP = "192.0.2.50", "192.0.2.51"
COPIES = 64  # of the 1 MiB file: 64 MiB each way
NO_GUEST_OFFLOADS = "guest_csum=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off"


def script(me: str, peer: str, copies: int = COPIES) -> str:
    """Receive on port 5000 into sha256sum while sending the data to the peer's."""
    return guest_net_setup(me) + f"""
# nc's stdin: a FIFO this shell holds open, so it never ends (at the end of its stdin,
# busybox nc shuts its sending side down, and the sending nc stops at that)
mkfifo /tmp/hold
exec 3<>/tmp/hold
(timeout 250 nc -l -p 5000 <&3 | sha256sum > /tmp/rx.sha) &
echo LISTENING
{wait_reachable(peer)}
send() {{ i=0; while [ $i -lt {copies} ]; do cat /data; i=$((i + 1)); done; }}
{retry(f"send | nc {peer} 5000", 300)}
echo "SEND_RETRIES $i"
wait
echo "RX $(cut -d' ' -f1 /tmp/rx.sha)"
awk '/^Tcp:/ {{ if (!c) {{ for (i = 2; i <= NF; i++) if ($i == "InCsumErrors") c = i }}
               else {{ print "CSUM_ERRORS " $c; exit }} }}' /proc/net/snmp
"""


@pytest.fixture(scope="module")
def data() -> bytes:
    return random.Random(0x7509).randbytes(1 << 20)


def test_tso_both_ways_segmented_and_carried(tmp_path: Path, data: bytes) -> None:
    sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
    mac_a, mac_b = mac(0x50), mac(0x51)
    want = hashlib.sha256(data * COPIES).hexdigest()
    files: dict[str, bytes | Path] = {"data": data}
    with SwitchDaemon(tmp_path, [f"{sock_a},mac={mac_a}", f"{sock_b},mac={mac_b}"]) as switch:
        vm_a = GuestVM(script(A_IP, B_IP), modules=NET_MODULES, timeout=300, files=files,
                       qemu_args=net_qemu_args(sock_a, mac_a))
        vm_b = GuestVM(script(B_IP, A_IP), modules=NET_MODULES, timeout=300, files=files,
                       qemu_args=net_qemu_args(sock_b, mac_b, props=NO_GUEST_OFFLOADS))
        with vm_a, vm_b:
            vm_a.start()
            vm_b.start()
            try:
                res_a, res_b = vm_a.wait(), vm_b.wait()
            except GuestError as e:
                pytest.fail(f"{e}\n{switch.describe()}")
        stats = switch.stats()
        rc = switch.stop()
    ctx = (f"\n--- A ---\n{res_a.output}--- B ---\n{res_b.output}"
           f"--- stats ---\n{json.dumps(stats, indent=1)}\n{switch.describe()}")
    assert rc == 0 and "Traceback" not in switch.log, ctx
    assert res_a.status == 0 and res_b.status == 0, ctx
    assert tagged(res_a.lines, "RX") == want, "B -> A (GSO carried) damaged" + ctx
    assert tagged(res_b.lines, "RX") == want, "A -> B (segmented) damaged" + ctx
    assert tagged(res_a.lines, "CSUM_ERRORS") == "0", ctx
    assert tagged(res_b.lines, "CSUM_ERRORS") == "0", ctx

    pa, pb = port_stats(stats, "port0"), port_stats(stats, "port1")
    oa, ob = pa["offloads"], pb["offloads"]
    # both guests sent GSO frames; A's were cut for B, B's went to A whole
    assert oa.get("rx_gso", 0) > 100 and ob.get("rx_gso", 0) > 100, ctx
    assert ob.get("segmented", 0) > 100, ctx
    assert ob["segments"] > 2 * ob["segmented"], ctx
    assert oa.get("tx_gso", 0) > 100 and not oa.get("segmented"), ctx
    # 64 MiB in frames of at most 1514 bytes can only reach B as 45,000+ frames; A's
    # frames (with B's ACKs among them) average more than any MTU-sized frame could
    assert pb["tx_packets"] > COPIES * (1 << 20) // 1514, ctx
    assert pa["tx_bytes"] > COPIES << 20, ctx
    assert pa["tx_bytes"] / pa["tx_packets"] > 1514, ctx
    assert not format_drops(pa) and not format_drops(pb), ctx
    print(f"offloads: A {oa}, B {ob}; frames to A {pa['tx_packets']}, to B {pb['tx_packets']}")


TAP, NS_IP, G_IP = "vuo0", "192.0.2.1", "192.0.2.60"
TAP_COPIES = 16


def test_tso_through_a_tap_both_ways(tmp_path: Path, data: bytes) -> None:
    want = hashlib.sha256(data * TAP_COPIES).hexdigest()
    sock = tmp_path / "net.sock"
    busybox = str(find_busybox())
    with Netns("-tso") as ns:
        for key in ("all", "default"):
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
        ns.run("ip", "addr", "add", f"{NS_IP}/24", "dev", TAP)
        ns.run("ip", "link", "set", TAP, "up")
        exec_ns = ("ip", "netns", "exec", ns.name)
        d = Daemon(["vhostuser.cli.net", "--socket-path", str(sock), "--tap", TAP], sock,
                   tmp_path / "net.log", prefix=exec_ns)
        # the namespace's side: a receiver whose stdin stays open, and later a sender
        rx = subprocess.Popen([*exec_ns, "sh", "-c", f"{busybox} nc -l -p 5000 | sha256sum"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            vm = GuestVM(script(G_IP, NS_IP, TAP_COPIES), modules=NET_MODULES, timeout=240,
                         files={"data": data}, qemu_args=net_qemu_args(sock, mac(0x60)))
            with vm:
                vm.start()
                try:
                    vm.wait_for("\nLISTENING\n", 120)
                except GuestError as e:
                    pytest.fail(f"{e}\n{d.log()}")
                sent = send_to_guest(exec_ns, busybox, data * TAP_COPIES)
                res = vm.wait()
            try:
                got, _ = rx.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the namespace's receiver did not finish:\n{res.output}\n"
                            f"{d.log()[-3000:]}")
        finally:
            if rx.poll() is None:
                rx.kill()
            assert d.stop() == 0, d.log()
        stats = json.loads(ns.run("ip", "-j", "-s", "link", "show", TAP).stdout)[0]["stats64"]
    ctx = f"\n{res.output}\n{stats}\n{d.log()[-3000:]}"
    assert sent, "the namespace could not send to the guest" + ctx
    assert res.status == 0 and "Traceback" not in d.log(), ctx
    assert tagged(res.lines, "RX") == want, "namespace -> guest damaged" + ctx
    assert got.split()[0] == want, "guest -> namespace damaged" + ctx
    assert tagged(res.lines, "CSUM_ERRORS") == "0", ctx
    # GSO frames went whole both ways: the pair's counters (logged as its worker ends)
    # count the guest's ("rx") and the kernel's ("tx"); the TAP's own counters say every
    # byte crossed it
    found = [json.loads(c) for c in re.findall(r"pair 0 counters: (\{.*\})", d.log())]
    assert found, ctx  # (one line per worker: the one that ran the transfer)
    offloads = max(found, key=lambda c: c["rx_packets"])["offloads"]
    assert offloads.get("rx_gso", 0) > 10 and offloads.get("tx_gso", 0) > 10, ctx
    assert not {"segmented", "checksummed"} & offloads.keys(), ctx  # none finished by us
    for way in ("rx", "tx"):
        assert stats[way]["bytes"] > TAP_COPIES << 20, ctx


def send_to_guest(exec_ns: tuple[str, ...], busybox: str, payload: bytes) -> bool:
    """Stream `payload` to the guest's port 5000 from the namespace (the guest said it
    listens; its nc may take a moment to bind: a refused connection is tried again)."""
    for _ in range(50):
        tx = subprocess.Popen([*exec_ns, busybox, "nc", G_IP, "5000"], stdin=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        try:
            assert tx.stdin is not None
            tx.stdin.write(payload)
            tx.stdin.close()
        except BrokenPipeError:  # refused: nc is gone
            pass
        if tx.wait(120) == 0:
            return True
        time.sleep(0.2)
    return False
