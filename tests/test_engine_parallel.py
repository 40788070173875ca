"""Queues run concurrently: each queue's handler, once inside, signals the other and
waits for the other's signal. Only if both handlers are running at the same moment do
both see the other; served one queue at a time, the first would time out.

The device here is a test device; the engine, transport and front-end are the real ones.
"""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

from vhostuser.engine.device import Device, Events, InOrderService
from vhostuser.engine.queue import DeviceQueue
from vhostuser.engine.session import serve_connection
from vhostuser.frontend.client import Frontend
from vhostuser.protocol import VirtioFeature
from vhostuser.sockets import PeerClosed
from vhostuser.transport.unix import UnixResources, connections
from vhostuser.unix_channel import UnixChannel
from vhostuser.virtq.ring import Chain


class Rendezvous(Device):
    name = "rendezvous"
    num_queues = 2

    def __init__(self) -> None:
        self.pipes = (os.pipe(), os.pipe())  # pipes[i]: queue i signals the other

    def features(self) -> int:
        return 0

    def worker_fds(self, indices: list[int]) -> list[int]:
        return [fd for pair in self.pipes for fd in pair]

    def serve(self, queues: dict[int, DeviceQueue], events: Events) -> Handler:
        return Handler(self)


class Handler(InOrderService):
    def __init__(self, dev: Rendezvous) -> None:
        self.dev = dev

    def handle(self, index: int, chains: list[Chain]) -> list[int]:
        mine, other = self.dev.pipes[index][1], self.dev.pipes[1 - index][0]
        for chain in chains:
            os.write(mine, b"x")  # I am inside my handler...
            ready, _, _ = select.select([other], [], [], 5)  # ...is the other one too?
            chain.writable[0][:1] = b"P" if ready and os.read(other, 1) else b"T"
        return [1] * len(chains)


def serve_once(path: str) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            for sock in connections(path=path, once=True):
                serve_connection(UnixChannel(sock), UnixResources(), Rendezvous(),
                                 closed=(PeerClosed,))
        finally:
            os._exit(0)
    return pid


def test_two_queues_progress_at_the_same_time(tmp_path: Path) -> None:
    path = str(tmp_path / "rv.sock")
    pid = serve_once(path)
    try:
        fe = Frontend(path)
        with fe:
            fe.negotiate(VirtioFeature.VERSION_1)
            fe.set_mem_table()
            rings = [fe.setup_queue(i, 8).ring for i in range(2)]
            bufs = [fe.ram.alloc(1) for _ in range(2)]
            for i in range(2):
                rings[i].add([(bufs[i], 1, True)])
                fe.kick(i)
            fe.wait_used(0, timeout=15)
            fe.wait_used(1, timeout=15)
            verdicts = [bytes(fe.ram.at(b, 1)) for b in bufs]
            assert verdicts == [b"P", b"P"], "the queues did not run at the same time"
    finally:
        os.waitpid(pid, 0)
    assert not os.path.exists(path)
    with socket.socket(socket.AF_UNIX) as s:  # the server really is gone
        assert s.connect_ex(path) != 0
