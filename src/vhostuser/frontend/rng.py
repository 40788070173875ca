"""A virtio-rng driver over the Python front-end: post buffers, read what came back."""

from __future__ import annotations

from .client import Frontend


class RngClient:
    """Requests on the request queue of a vhost-user-rng back-end set up by `fe`."""

    def __init__(self, fe: Frontend, queue: int = 0) -> None:
        self.fe = fe
        self.queue = queue
        self.ring = fe.queues[queue].ring
        self.inflight: dict[int, list[tuple[int, int]]] = {}  # head -> its buffers

    def submit(self, *sizes: int, kick: bool = True) -> int:
        """One request of device-writable buffers of `sizes` bytes (none: an empty,
        readable-only request); returns its head."""
        ram = self.fe.ram
        if sizes:
            bufs = [(ram.alloc(n), n) for n in sizes]
            head = self.ring.add([(gpa, n, True) for gpa, n in bufs])
        else:
            bufs = []
            head = self.ring.add([(ram.alloc(8), 8, False)])
        self.inflight[head] = bufs
        if kick:
            self.fe.kick(self.queue)
        return head

    def complete(self, count: int = 1, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        """Wait for `count` completions, in completion order: (head, the bytes written)."""
        out = []
        for head, written in self.fe.wait_used(self.queue, count, timeout):
            data = b"".join(bytes(self.fe.ram.at(gpa, n)) for gpa, n in self.inflight.pop(head))
            out.append((head, data[:written] if written <= len(data) else data + b"?"))
        return out

    def read(self, n: int) -> bytes:
        self.submit(n)
        return self.complete()[0][1]
