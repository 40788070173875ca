"""A queue service whose requests run on threads of its own: several requests in flight
per queue, each completed when it is done, so out of order.

The worker's thread takes chains (`kicked`) and hands them to the pool (`submit`); a pool
thread serves one (`serve_chain`, which may block on the host: the GIL is released in
the system call), completes it and notifies the driver itself, under the queue's lock,
without a hop through the worker's loop. If the back-end dies with requests in flight,
only in-flight tracking (virtq/inflight.py) lets the next one serve them again: the
front-end resumes a ring at its used index, which says nothing about which chains before
it are done.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import abstractmethod

from ..virtq.ring import Chain
from .device import QueueService
from .queue import DeviceQueue, ParentGone

log = logging.getLogger(__name__)


class PooledService(QueueService):
    """Serves a group's queues with `threads` threads (each queue gets a lock: completions
    come from any of them)."""

    def __init__(self, queues: dict[int, DeviceQueue], threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError(f"a pool needs at least one thread, not {threads}")
        self.jobs: queue.SimpleQueue[tuple[DeviceQueue, Chain] | None] = queue.SimpleQueue()
        self.pending = 0  # jobs given to the threads and not yet completed
        self.idle = threading.Condition()
        self.gone = False  # the engine's process died: nothing more may be completed
        for q in queues.values():
            q.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    @abstractmethod
    def serve_chain(self, chain: Chain) -> int:
        """Serve one request on a pool thread; the bytes written into the chain. It answers
        every error itself (an exception is a bug: the chain completes with 0 bytes)."""

    def submit(self, q: DeviceQueue, chain: Chain) -> None:
        with self.idle:
            self.pending += 1
        self.jobs.put((q, chain))

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            q, chain = job
            try:
                try:
                    written = self.serve_chain(chain)
                except Exception:
                    log.exception("a request failed")
                    written = 0
                if not self.gone:
                    q.complete(chain, written)
                    q.notify()
            except ParentGone:
                self.gone = True  # the worker's loop finds out too, and stops
            except Exception:
                log.exception("a completion failed")
            finally:
                with self.idle:
                    self.pending -= 1
                    if not self.pending:
                        self.idle.notify_all()

    def offloaded(self) -> bool:
        return self.pending > 0

    def quiesce(self) -> None:
        with self.idle:
            while self.pending:
                self.idle.wait()

    def suspend(self) -> None:
        """Requests no thread has started stay uncompleted (the in-flight area records
        them); those started end first."""
        dropped = 0
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:  # a close already asked for: keep it for the threads
                self.jobs.put(None)
                break
            dropped += 1
        with self.idle:
            self.pending -= dropped
        self.quiesce()

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()

