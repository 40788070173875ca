"""The DPDK testpmd harness (tests/dpdk.py), proven against DPDK itself: net_vhost (DPDK's
vhost-user back-end) and net_virtio_user (its front-end) over a real socket.

Accounting, all exact (NIC counters from ``show port stats``, after the order below):

- one-way, txonly -> rxonly: stop the sender first, wait until the back-end's counters stop
  moving (it has drained the ring), then stop the back-end. Then
  ``fe TX-packets == be RX-packets`` (and the bytes), ``be RX-missed == be RX-errors == 0``.
  The front-end's forward-stats TX-dropped are packets tx_burst refused (ring full): they
  never entered the ring and appear nowhere else.
- two-way, flowgen <-> macswap: stop flowgen, restart the front-end as rxonly so it drains
  its RX ring, wait for both to settle, stop both. Then ``fe TX == be RX``,
  ``be RX == be TX + be TX-dropped`` (forward stats: what the vhost enqueue refused because
  the front-end's RX ring was full; net_vhost 22.11 counts it in no NIC counter) and
  ``be TX == fe RX``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dpdk import (
    PortStats,
    Testpmd,
    TestpmdError,
    TestpmdMissing,
    find_testpmd,
    median_mpps,
    parse_fwd_stats,
    parse_port_stats,
    runtime_dir,
)

from vhostuser.protocol import VirtioFeature

VIRTIO_NET_F_MRG_RXBUF = 1 << 15
RUN_SECONDS = 3.0
QUEUE_SIZE = 256  # virtio_user's default ring size


@pytest.fixture
def testpmd(tmp_path: Path) -> Iterator[Callable[..., Testpmd]]:
    """Factory: ``testpmd("vhost" | "virtio_user", sock, **kw)``. All are closed at the end,
    newest first (front-ends before the back-end), and must exit 0 and leave no runtime
    directory behind."""
    try:
        find_testpmd()
    except TestpmdMissing as e:
        pytest.fail(str(e))
    started: list[Testpmd] = []

    def start(kind: str, sock: Path, **kw: object) -> Testpmd:
        kw.setdefault("log_path", tmp_path / f"{kind}{len(started)}.log")
        tp = Testpmd.vhost(sock, **kw) if kind == "vhost" else Testpmd.virtio_user(sock, **kw)
        started.append(tp)
        return tp

    yield start
    statuses = [(tp, tp.close()) for tp in reversed(started)]
    for tp, rc in statuses:
        assert rc == 0, f"{tp} exited {rc}:\n{tp.output[-3000:]}"
        assert not runtime_dir(tp.prefix).exists(), f"{runtime_dir(tp.prefix)} left behind"


def _pair(testpmd: Callable[..., Testpmd], tmp_path: Path, be_mode: str, fe_mode: str,
          devargs: str = "") -> tuple[Testpmd, Testpmd]:
    """A net_vhost back-end on CPU 0 and a virtio_user front-end on CPU 1, connected, link up
    on both, nothing forwarding yet."""
    sock = tmp_path / "vhost-net.sock"
    be = testpmd("vhost", sock, forward_mode=be_mode, cpu=0)
    fe = testpmd("virtio_user", sock, forward_mode=fe_mode, cpu=1, devargs=devargs,
                 testpmd_args=["--txpkts=64"])
    be.wait_link_up()
    assert fe.link_up()
    return be, fe


def _one_way(be: Testpmd, fe: Testpmd) -> tuple[PortStats, PortStats]:
    be.start()
    fe_fwd = fe.run_for(RUN_SECONDS).fwd[0]  # start, wait, stop: the sender stops first
    be.wait_settled()  # the back-end drains what is left in the ring
    be_fwd = be.stop()[0]
    b, f = be.port_stats()[0], fe.port_stats()[0]

    assert b.rx_packets > 0, f"back-end received nothing: {b}"
    assert f.tx_packets == b.rx_packets, (f, b)
    assert f.tx_bytes == b.rx_bytes == 64 * b.rx_packets, (f, b)
    assert (b.rx_missed, b.rx_errors, b.rx_nombuf, f.tx_errors) == (0, 0, 0, 0), (f, b)
    # Forward stats cover start..stop and agree with the NIC counters.
    assert be_fwd.rx_packets == b.rx_packets and be_fwd.rx_dropped == 0, be_fwd
    assert fe_fwd.tx_packets == f.tx_packets, fe_fwd
    assert fe_fwd.tx_total == fe_fwd.tx_packets + fe_fwd.tx_dropped, fe_fwd
    return b, f


def test_txonly_to_vhost_rxonly_counts_add_up(testpmd: Callable[..., Testpmd],
                                              tmp_path: Path) -> None:
    be, fe = _pair(testpmd, tmp_path, "rxonly", "txonly")
    features, protocol = be.negotiated()
    assert features is not None and features & VirtioFeature.VERSION_1
    assert features & VIRTIO_NET_F_MRG_RXBUF and features & VirtioFeature.IN_ORDER
    assert protocol is not None
    _one_way(be, fe)


def test_txonly_without_mrg_rxbuf_and_in_order(testpmd: Callable[..., Testpmd],
                                               tmp_path: Path) -> None:
    be, fe = _pair(testpmd, tmp_path, "rxonly", "txonly", devargs="in_order=0,mrg_rxbuf=0")
    features, _ = be.negotiated()
    assert features is not None and features & VirtioFeature.VERSION_1
    assert not features & VIRTIO_NET_F_MRG_RXBUF, hex(features)
    assert not features & VirtioFeature.IN_ORDER, hex(features)
    _one_way(be, fe)


def test_flowgen_macswap_both_directions(testpmd: Callable[..., Testpmd],
                                         tmp_path: Path) -> None:
    be, fe = _pair(testpmd, tmp_path, "macswap", "flowgen")
    be.start()
    fe.start()
    samples = be.sample(RUN_SECONDS)
    fe_fwd = fe.stop()[0]
    fe.set_forward_mode("rxonly")  # drain the front-end's RX ring, send nothing more
    fe.start()
    be.wait_settled()
    fe.wait_settled()
    be_fwd = be.stop()[0]
    fe.stop()
    b, f = be.port_stats()[0], fe.port_stats()[0]

    assert b.rx_packets > 0 and f.rx_packets > 0, (b, f)
    assert fe_fwd.rx_packets > 0, "flowgen received nothing while it ran"
    assert f.tx_packets == b.rx_packets, (f, b)  # front-end -> back-end
    assert b.tx_packets == f.rx_packets, (b, f)  # back-end -> front-end
    assert f.tx_bytes == b.rx_bytes and b.tx_bytes == f.rx_bytes, (b, f)
    # macswap sends back all it receives; refused packets are the engine's TX-dropped.
    assert b.rx_packets == b.tx_packets + be_fwd.tx_dropped, (b, be_fwd)
    assert b.tx_errors == 0 and f.rx_missed == 0, (b, f)
    assert median_mpps(samples) > 0 and median_mpps(samples, field_name="tx_pps") > 0


def test_stats_period_mode_and_median_rate(testpmd: Callable[..., Testpmd],
                                           tmp_path: Path) -> None:
    """Non-interactive ``--stats-period 1``: SIGINT stops it and prints final forward
    stats; the helper reads per-second rates from the periodic displays. The ring is not
    drained before the front-end quits, so the back-end may miss up to a ring's worth."""
    sock = tmp_path / "vhost-net.sock"
    be = testpmd("vhost", sock, forward_mode="rxonly", cpu=0)
    be.start()
    fe = testpmd("virtio_user", sock, forward_mode="txonly", cpu=1, stats_period=1,
                 testpmd_args=["--txpkts=64"])
    res = fe.run_for(RUN_SECONDS)
    b = be.wait_settled()[0]
    assert fe.returncode == 0, fe.output[-3000:]
    assert len(res.samples) >= 2, fe.output[-3000:]
    sent = res.fwd[0].tx_packets
    assert 0 < sent - QUEUE_SIZE <= b.rx_packets <= sent, (res.fwd, b)
    assert median_mpps(fe.output, field_name="tx_pps") > 0
    assert median_mpps(fe.output) == 0.0  # txonly receives nothing


STATS_PERIOD_OUTPUT = """\
\x1b[2J\x1b[1;1H
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 2624       TX-errors: 0          TX-bytes:  167936

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
\x1b[2J\x1b[1;1H
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: 20000000   RX-missed: 3          RX-bytes:  1280000000
  RX-errors: 1
  RX-nombuf:  2
  TX-packets: 4624       TX-errors: 5          TX-bytes:  295936

  Throughput (since last show)
  Rx-pps:     20000000          Rx-bps:  10240000000
  Tx-pps:         2000          Tx-bps:      1024000
  ############################################################################
  ######################## NIC statistics for port 1  ########################
  RX-packets: 7          RX-missed: 0          RX-bytes:  448
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 0          TX-errors: 0          TX-bytes:  0

  Throughput (since last show)
  Rx-pps:            7          Rx-bps:         3584
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
\x1b[2J\x1b[1;1H
  ######################## NIC statistics for port 0  ########################
  RX-packets: 42000000   RX-missed: 3          RX-bytes:  2688000000
  RX-errors: 1
  RX-nombuf:  2
  TX-packets: 4624       TX-errors: 5          TX-bytes:  295936

  Throughput (since last show)
  Rx-pps:     22000000          Rx-bps:  11264000000
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
\x1b[2J\x1b[1;1H
  ######################## NIC statistics for port 0  ########################
  RX-packets: 42000000   RX-missed: 3          RX-bytes:  2688000000
  RX-errors: 1
  RX-nombuf:  2
  TX-packets: 4624       TX-errors: 5          TX-bytes:  295936

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 42000000       RX-dropped: 3             RX-total: 42000003
  RX-error: 1
  RX-nombufs: 2
  TX-packets: 4624           TX-dropped: 9             TX-total: 4633
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 42000000       RX-dropped: 3             RX-total: 42000003
  TX-packets: 4624           TX-dropped: 9             TX-total: 4633
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
"""


def test_parsers_on_recorded_output() -> None:
    displays = parse_port_stats(STATS_PERIOD_OUTPUT)
    assert [sorted(d) for d in displays] == [[0], [0, 1], [0], [0]]
    p = displays[1][0]
    assert (p.rx_packets, p.rx_missed, p.rx_errors, p.rx_nombuf) == (20000000, 3, 1, 2)
    assert (p.tx_packets, p.tx_errors, p.tx_bytes, p.rx_pps, p.tx_pps) == (
        4624, 5, 295936, 20000000, 2000)
    assert displays[1][1].rx_pps == 7
    # Leading and trailing idle seconds are trimmed: median of [20e6, 22e6].
    assert median_mpps(STATS_PERIOD_OUTPUT) == pytest.approx(21.0)
    assert median_mpps(STATS_PERIOD_OUTPUT, trim_idle=False) == pytest.approx(10.0)
    assert median_mpps(STATS_PERIOD_OUTPUT, port=1) == pytest.approx(7e-6)
    assert median_mpps("") == 0.0
    fwd = parse_fwd_stats(STATS_PERIOD_OUTPUT)[0]
    assert (fwd.rx_packets, fwd.rx_dropped, fwd.rx_total, fwd.rx_error, fwd.rx_nombufs) == (
        42000000, 3, 42000003, 1, 2)
    assert (fwd.tx_packets, fwd.tx_dropped, fwd.tx_total) == (4624, 9, 4633)


def test_failed_start_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    """testpmd shows its prompt even when a vdev failed to probe (virtio_user with nobody
    listening) or its port failed to start (net_vhost cannot bind): both must raise, with
    testpmd's output, kill it and leave no runtime directory."""
    try:
        find_testpmd()
    except TestpmdMissing as e:
        pytest.fail(str(e))
    t0 = time.monotonic()
    with pytest.raises(TestpmdError, match="probe failed") as info:
        Testpmd.virtio_user(tmp_path / "nobody.sock", cpu=1, start_timeout=20)
    assert "virtio_user_dev_init fails" in str(info.value), str(info.value)
    with pytest.raises(TestpmdError, match="Start ports failed") as info:
        Testpmd.vhost(tmp_path / "no-such-dir" / "vhost.sock", cpu=0, start_timeout=20)
    assert "failed to bind" in str(info.value), str(info.value)
    assert time.monotonic() - t0 < 20
    leftovers = [d for d in os.listdir(runtime_dir("x").parent)
                 if d.startswith(f"vu{os.getpid()}-")] if runtime_dir("x").parent.exists() else []
    assert not leftovers, leftovers
