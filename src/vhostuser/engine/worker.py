"""One worker process per running queue group.

The GIL rules out threads for a parallel data path, so each group of queues (one queue,
unless the device groups them: engine/device.py) with started, enabled queues is served by
a forked child. Guest memory is inherited (MAP_SHARED mappings stay shared across fork), as
are the kick fds, the call notifiers and the device. The parent talks to the child over a
SEQPACKET pair: it sends STOP, the child has the device finish what it holds (`quiesce`),
hands over what the group's next worker takes up (`carry`: state and fds, in messages of
their own), answers with each queue's last avail index and exits.

A worker's configuration never changes while it runs: any change (memory table, call fd,
enable, features) is a stop and a fresh start from the returned indices.

However the back-end ends, the front-end must not see the connection close while any of
its processes can still store into a used ring: the front-end then reads the used index as
its resume point, and a completion after that would be replayed by the next back-end (a
duplicate completion, a stale block). So a worker keeps the connection open: the kernel
closes it only when the last process holding it is gone. The parent stops its workers
before any orderly close; if the parent dies, the kernel kills its workers (PDEATHSIG), and
a worker that finds its parent gone anyway (no PDEATHSIG, or it came late) stops before its
next store into the used ring (`DeviceQueue.notify`). Workers ignore SIGTERM and SIGINT:
the parent stops them in order, each finishing what it holds.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import itertools
import logging
import os
import resource
import select
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..memory import Buffer, GuestMemory
from ..procfs import PROC_FD, own_fds
from ..sockets import is_listening
from ..virtq.dirtylog import DirtyLog
from ..virtq.inflight import InflightRecord, SplitInflight, queue_region_bytes
from ..virtq.inflight_packed import PackedInflight
from ..virtq.inflight_packed import queue_region_bytes as packed_region_bytes
from ..virtq.packed import PackedQueue
from ..virtq.ring import DeviceRing, RingError, RingLayout
from ..virtq.split import SplitQueue
from .device import Carried, Device, QueueService
from .notify import Notifier
from .queue import DeviceQueue, ParentGone, open_ring

log = logging.getLogger(__name__)

__all__ = ["CTRL_LOOK", "DEFAULT_SPIN_US", "DRAINED", "IDLE", "MORE", "ParentGone",
           "QueueParams", "QueueSpec", "Runner", "Running", "Stopped", "Worker",
           "run_queue", "start_worker"]

_STOP = b"S"
_SUSPEND = b"P"  # STOP, but requests not started may stay in the in-flight areas
_REPORT = b"R"  # + an entry per queue: the child's last message
_CARRY = b"C"  # + a piece of the carried state, with some of its fds
_CARRY_FAILED = b"F"  # the pieces sent so far are no good
_WAITING = b"W"  # still quiescing: the device waits for requests in flight on the host
_WAITING_EVERY = 2.0  # s between those
QUIESCE_PATIENCE = 120.0  # s a stopping worker may keep saying it is waiting
MAX_CARRIED = 256 << 20  # bytes of state a worker may hand over
_ENTRY = struct.Struct("<HIB")  # per queue: index, base (GET_VRING_BASE), broken flag
_CARRY_BYTES = 32768  # state bytes per message
_CARRY_FDS = 200  # fds per message (SCM_MAX_FD is 253)
_PR_SET_PDEATHSIG = 1
_POLL_IDLE_ROUNDS = 200  # poll mode: empty rounds before napping 1 ms between looks
DEFAULT_SPIN_US = 200  # look for more work this long after the ring empties
CTRL_LOOK = 0.001  # s a queue is served before the worker looks at everything else
_GONE = object()  # the parent is gone

@dataclass(frozen=True)
class QueueParams:
    index: int
    layout: RingLayout
    base: int  # where the ring resumes (SET_VRING_BASE)
    event_idx: bool
    indirect: bool
    spin_us: int = DEFAULT_SPIN_US
    log_used: int | None = None  # the used ring's guest-physical address, to log its writes
    packed: bool = False  # VIRTIO_F_RING_PACKED


@dataclass(frozen=True)
class QueueSpec:
    """One queue to run: its ring and the front-end's kick (None: poll), call and err;
    `inflight`: its region of the front-end's in-flight area (the area's mapping, the
    region's offset in it), if the front-end gave one."""

    params: QueueParams
    kick_fd: int | None
    call: Notifier
    err: Notifier
    inflight: tuple[Buffer, int] | None = None
    log: DirtyLog | None = None  # writes are logged there (live migration)


# index -> (last avail index, or None if unknown; broken)
Stopped = dict[int, tuple[int | None, bool]]


class Running(Protocol):
    """A running queue group, however it is run."""

    carried: Carried | None  # after stop: what the group's next run takes up

    def stop(self, suspend: bool = False) -> Stopped:
        """Stop serving; `suspend`: requests not started yet may stay in flight, recorded
        in the in-flight areas (GET_VRING_BASE_INFLIGHT)."""
        ...


# Starts serving a group of queues, with what its last run left (if anything) and the fds
# of the session it serves that its processes must hold (the connection: see above).
Runner = Callable[[list[QueueSpec], GuestMemory, Device, Carried | None, Sequence[int]],
                  Running]


class Worker:
    """Parent-side handle of a worker process."""

    def __init__(self, pid: int, ctrl: socket.socket, indices: list[int]) -> None:
        self.pid = pid
        self.ctrl = ctrl
        self.indices = indices
        self.carried: Carried | None = None

    def stop(self, suspend: bool = False, timeout: float = 10.0,
             patience: float = QUIESCE_PATIENCE) -> Stopped:
        """Stop the worker; a queue's index is None if it died without answering. The
        worker has `timeout` seconds between messages; while it says it is still waiting
        for its device (requests in flight on the host), up to `patience` in all."""
        report: Stopped | None = None
        pieces: list[bytes] = []
        fds: list[int] = []
        poisoned = False
        deadline = time.monotonic() + patience
        try:
            self.ctrl.send(_SUSPEND if suspend else _STOP)
            self.ctrl.settimeout(timeout)
            size = 1 + _ENTRY.size * len(self.indices)
            while True:
                data, got, truncated = _recv_with_fds(self.ctrl, max(size, _CARRY_BYTES + 1))
                fds += got
                if data[:1] == _WAITING and time.monotonic() < deadline:
                    continue
                if data[:1] == _CARRY:
                    pieces.append(data[1:])
                    if truncated and not poisoned:  # fds lost on the way: no good
                        log.error("queues %s: the state handed over lost fds (the fd "
                                  "limit?): dropped", self.indices)
                        poisoned = True
                    continue
                if data[:1] == _CARRY_FAILED:
                    poisoned = True
                    continue
                if len(data) == size and data[:1] == _REPORT:
                    report = {i: (last, bool(broken))
                              for i, last, broken in _ENTRY.iter_unpack(data[1:])}
                break
        except OSError as e:
            log.error("queues %s: worker %d did not answer STOP: %s", self.indices, self.pid, e)
        finally:
            self.ctrl.close()
        if report is None or set(report) != set(self.indices):
            os.kill(self.pid, signal.SIGKILL)
            report = None
        carried = Carried(b"".join(pieces), fds)
        if report is not None and not poisoned and (carried.data or carried.fds):
            self.carried = carried
        else:
            carried.close()
        os.waitpid(self.pid, 0)
        if report is None:
            return {i: (None, True) for i in self.indices}
        return report


def _recv_with_fds(sock: socket.socket, size: int) -> tuple[bytes, list[int], bool]:
    """One message and the fds that came with it (and whether some were cut off)."""
    space = socket.CMSG_SPACE(_CARRY_FDS * 4)
    data, anc, flags, _ = sock.recvmsg(size, space)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += struct.unpack(f"{usable // 4}i", payload[:usable])
    return data, fds, bool(flags & socket.MSG_CTRUNC)


def start_worker(specs: list[QueueSpec], mem: GuestMemory, device: Device,
                 carried: Carried | None = None, hold: Sequence[int] = ()) -> Worker:
    """Fork a worker for `specs`. `carried` (what the group's last worker left) goes to
    the child, which takes it up; the parent's copies are closed once it has forked. If
    the fork fails, `carried` is untouched (the caller keeps it). `hold`: the session's
    fds the worker keeps open (the connection); of the parent's other fds it keeps only
    those `kept_fds` names."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keep = kept_fds(specs, device, carried, hold) | {child.fileno()}
    ppid = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        parent.close()
        child.close()
        raise
    if pid:
        child.close()
        if carried is not None:  # the child has them now
            carried.close()
        return Worker(pid, parent, [s.params.index for s in specs])
    status = 1
    try:
        parent.close()
        _become_worker(ppid, keep)
        status = _Group(specs, mem, device, child, ppid, carried).serve()
    except BaseException:  # never let a child unwind into the parent's stack
        traceback.print_exc()
    finally:
        os._exit(status)


def kept_fds(specs: list[QueueSpec], device: Device, carried: Carried | None,
             hold: Sequence[int]) -> set[int]:
    """The fds a worker keeps of its parent's: the standard streams (unless one is the
    listening socket: `--fd 0` from inetd) and /proc (procfs.py), the session's (`hold`),
    its queues' kick, call and err fds and the dirty log's signal, what the group's last
    worker left, and what the device says its workers use."""
    indices = [s.params.index for s in specs]
    keep = {fd for fd in (0, 1, 2) if not is_listening(fd)}
    keep.update((PROC_FD, *hold, *device.worker_fds(indices)))
    for s in specs:
        if s.kick_fd is not None:
            keep.add(s.kick_fd)
        keep.update(s.call.fds(), s.err.fds())
        if s.log is not None and s.log.signal is not None:
            keep.update(s.log.signal.fds())
    if carried is not None:
        keep.update(carried.fds)
    return keep


def _release_parent_fds(keep: set[int]) -> None:
    """Let go of every fd but `keep`: the parent's listening socket (a restarted back-end
    binds the path anew), its stop pipe, the other workers' control sockets, what other
    groups' workers left (a host socket would never see EOF), other sessions' fds. Each is
    made a copy of one dead fd (a pipe's write end that nobody reads) rather than closed:
    its file is let go all the same, and a number some object still holds cannot reach
    the next file to take it: a write fails with EPIPE, a read with EBADF."""
    try:
        fds = own_fds()
        reader, dead = os.pipe()
    except OSError:  # no fd left for the listing or the pipe: plain closes, then
        _close_all_but(keep)
        return
    os.close(reader)
    for fd in fds:
        if fd not in keep and fd != dead:
            os.dup2(dead, fd, inheritable=False)


def _close_all_but(keep: set[int]) -> None:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    low = 0
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, limit if limit != resource.RLIM_INFINITY else 1 << 20)


def _become_worker(ppid: int, keep: set[int]) -> None:
    signal.set_wakeup_fd(-1)  # the parent's stop pipe is the parent's
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent stops us, in order
    _release_parent_fds(keep)
    try:  # die with the parent
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != ppid:  # it died before PDEATHSIG was armed
        os._exit(0)


class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Events:
    """The worker's `Events`: device fds and timers beside the kicks."""

    def __init__(self, poller: select.poll) -> None:
        self.poller = poller
        self.fds: dict[int, Callable[[], None]] = {}  # read callbacks
        self.writers: dict[int, Callable[[], None]] = {}  # write callbacks
        self.timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()

    @staticmethod
    def _check(fd: int) -> None:
        if fd < 0:
            raise ValueError(f"cannot watch fd {fd}")

    def _update(self, fd: int, was: bool) -> None:
        mask = (select.POLLIN if fd in self.fds else 0) | (
            select.POLLOUT if fd in self.writers else 0)
        if not mask:
            self.poller.unregister(fd)
        elif was:
            self.poller.modify(fd, mask)
        else:
            self.poller.register(fd, mask)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._check(fd)
        was = fd in self.fds or fd in self.writers
        self.fds[fd] = callback
        self._update(fd, was)

    def unwatch(self, fd: int) -> None:
        if self.fds.pop(fd, None) is not None:
            self._update(fd, True)

    def watch_write(self, fd: int, callback: Callable[[], None]) -> None:
        self._check(fd)
        was = fd in self.fds or fd in self.writers
        self.writers[fd] = callback
        self._update(fd, was)

    def unwatch_write(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self._update(fd, True)

    def dispatch(self, fd: int, ev: int) -> Iterator[Callable[[], None]]:
        """The callbacks an event on a device fd calls (a hang-up or error calls both),
        each looked up when its turn comes (the first may unwatch the fd)."""
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and fd in self.fds:
            yield self.fds[fd]
        if ev & (select.POLLOUT | select.POLLHUP | select.POLLERR) and fd in self.writers:
            yield self.writers[fd]

    def clear(self) -> None:
        for fd in set(self.fds) | set(self.writers):
            try:
                self.poller.unregister(fd)
            except (KeyError, ValueError):  # never registered: nothing to undo
                pass
        self.fds.clear()
        self.writers.clear()
        self.timers.clear()

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        if len(self.timers) > 1024:  # drop cancelled ones now and then
            self.timers = [e for e in self.timers if not e[2].cancelled]
            heapq.heapify(self.timers)
        t = _Timer(callback)
        heapq.heappush(self.timers, (time.monotonic() + max(delay, 0.0), next(self._seq), t))
        return t

    def next_timeout(self) -> float | None:
        while self.timers and self.timers[0][2].cancelled:
            heapq.heappop(self.timers)
        return self.timers[0][0] - time.monotonic() if self.timers else None

    def due(self) -> list[_Timer]:
        """Timers that are due (the caller skips those cancelled meanwhile)."""
        now, out = time.monotonic(), []
        while self.timers and self.timers[0][0] <= now:
            _, _, t = heapq.heappop(self.timers)
            if not t.cancelled:
                out.append(t)
        return out


def _track(spec: QueueSpec, ring: DeviceRing) -> tuple[InflightRecord | None, list[int]]:
    """The queue's in-flight record, recovered against its ring, and the chains to serve
    again (RingError if the record and the ring disagree)."""
    if spec.inflight is None:
        return None, []
    area, offset = spec.inflight
    with memoryview(area) as whole:
        if isinstance(ring, PackedQueue):
            packed = PackedInflight(whole[offset : offset + packed_region_bytes(ring.size)],
                                    ring.size)
            return packed, _recovered(packed, lambda: packed.recover(ring))
        assert isinstance(ring, SplitQueue)
        split = SplitInflight(whole[offset : offset + queue_region_bytes(ring.size)], ring.size)
        return split, _recovered(split, lambda: split.recover(ring))


def _recovered(tracker: InflightRecord, recover: Callable[[], list[int]]) -> list[int]:
    """What `recover` returns; the record released if it raises."""
    try:
        return recover()
    except RingError:
        tracker.release()
        raise


class _Group:
    """The worker's side: serve a group of queues until STOP."""

    def __init__(self, specs: list[QueueSpec], mem: GuestMemory, device: Device,
                 ctrl: socket.socket, ppid: int, carried: Carried | None = None) -> None:
        self.specs, self.device, self.ctrl = specs, device, ctrl
        self.unadopted: Carried | None = None  # handed back as it came if nothing runs
        self.name = device.name
        self.queues: dict[int, DeviceQueue] = {}  # running
        self.started: dict[int, DeviceQueue] = {}  # running or stopped broken
        self.broken: set[int] = set()
        self.poller = select.poll()
        self.poller.register(ctrl, select.POLLIN)
        self.kicks: dict[int, DeviceQueue] = {}
        self.polled: list[DeviceQueue] = []
        self.spin = specs[0].params.spin_us / 1e6 if specs else 0.0
        for s in specs:
            i = s.params.index
            try:
                ring = open_ring(mem, s.params.layout, s.params.base, s.params.packed,
                                 s.params.event_idx, s.params.indirect, s.log,
                                 s.params.log_used)
            except RingError as e:
                log.error("%s queue %d: cannot start: %s", self.name, i, e)
                self.broken.add(i)
                s.err.notify()
                continue
            base = ring.base()
            try:
                tracker, again = _track(s, ring)
            except RingError as e:
                log.error("%s queue %d: cannot start: %s", self.name, i, e)
                ring.release()
                self.broken.add(i)
                s.err.notify()
                continue
            if ring.base() != base:
                log.info("%s queue %d: resumes at %#x, where the in-flight area says it stood "
                         "(the front-end said %#x)", self.name, i, ring.base(), base)
            q = self.queues[i] = self.started[i] = DeviceQueue(ring, i, s.call, ppid, tracker)
            if again:
                log.info("%s queue %d: %d request(s) left in flight by the last back-end: "
                         "served again", self.name, i, len(again))
                q.resubmit(again)
            if s.kick_fd is None:
                self.polled.append(q)
            else:
                self.kicks[s.kick_fd] = q
                self.poller.register(s.kick_fd, select.POLLIN)
        self.events = _Events(self.poller)
        self.service: QueueService | None = None
        if not self.queues:
            self.unadopted = carried
        elif carried is not None:
            try:
                device.adopt(carried)
            except Exception:
                log.exception("%s queues %s: the state the last worker left could not be "
                              "taken up", self.name, sorted(self.queues))
                carried.close()
        if self.queues:
            try:
                self.service = device.serve(dict(self.queues), self.events)
            except Exception:
                log.exception("%s queues %s: device failed to start them", self.name,
                              sorted(self.queues))
                self._fail_all()

    def serve(self) -> int:
        idle = 0
        ctrl_fd = self.ctrl.fileno()
        # Look at every queue once first: chains whose kick an earlier worker took (it was
        # stopped before it had served them all) must not wait for the next kick.
        again: dict[int, DeviceQueue] = dict(self.queues)  # run these next round
        spinning: dict[int, DeviceQueue] = {}  # drained lately, kicks still off
        last_work = 0.0
        clock = time.perf_counter
        while True:
            timeout = self.events.next_timeout()
            if self.polled:  # poll mode: nobody kicks, look again soon
                nap = 0.0 if idle < _POLL_IDLE_ROUNDS else 0.001
                timeout = nap if timeout is None else min(timeout, nap)
            if again or spinning:
                timeout = 0.0
            ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
            pending = {**again, **{q.index: q for q in self.polled}}
            again = {}
            popped = {i: q.popped for i, q in self.queues.items()}
            for fd, ev in self.poller.poll(ms):
                if fd == ctrl_fd:
                    return self._stop()
                q = self.kicks.get(fd)
                if q is not None:
                    try:
                        os.read(fd, 8)
                    except BlockingIOError:
                        pass
                    pending[q.index] = q
                else:
                    for callback in self.events.dispatch(fd, ev):
                        if self._run(callback) is _GONE:
                            return 1
            for timer in self.events.due():
                if not timer.cancelled and self._run(timer.callback) is _GONE:
                    return 1
            # A queue the device took chains from on its own events: its kick point
            # (avail_event) is behind; run it, which moves the point and looks again.
            for i, q in self.queues.items():
                if q.popped != popped.get(i, q.popped) or (i in spinning and q.waiting()):
                    pending[i] = q
            did = False
            for i, q in pending.items():
                if i not in self.queues or self.service is None:
                    continue
                r = self._run(run_queue, q, self.service.kicked)
                if r is _GONE:
                    return 1
                if r == MORE:
                    again[i] = q
                if r in (MORE, DRAINED):
                    did = True
                    spinning[i] = q
                    last_work = clock()
                else:
                    spinning.pop(i, None)
            if spinning and not again and (clock() - last_work >= self.spin or (
                    self.service is not None and self.service.offloaded())):
                for i, q in list(spinning.items()):  # quiet for the polling window
                    del spinning[i]
                    if i in self.queues and q.enable_kicks():
                        again[i] = q  # chains came meanwhile
            idle = 0 if did else idle + 1

    def _run(self, fn: Callable[..., object], *args: object) -> object:
        """Call into the device, then publish what it completed. Returns what `fn` did, or
        _GONE once the parent is gone (nothing more may be stored)."""
        try:
            result = fn(*args)
            for q in self.queues.values():
                q.notify()
        except ParentGone:
            log.error("%s: the back-end's main process is gone; stopping", self.name)
            return _GONE
        except Exception:
            log.exception("%s queues %s: device failed; queues stopped", self.name,
                          sorted(self.queues))
            self._fail_all()
            return None
        for q in list(self.queues.values()):
            if q.error is not None:
                self._fail(q, str(q.error))
        return result

    def _fail(self, q: DeviceQueue, why: str) -> None:
        log.error("%s queue %d: stopped: %s", self.name, q.index, why)
        self.broken.add(q.index)
        for fd, kq in list(self.kicks.items()):
            if kq is q:
                del self.kicks[fd]
                self.poller.unregister(fd)
        if q in self.polled:
            self.polled.remove(q)
        self.queues.pop(q.index, None)
        for s in self.specs:
            if s.params.index == q.index:
                s.err.notify()

    def _fail_all(self) -> None:
        for s in self.specs:
            if s.params.index not in self.broken:
                self.broken.add(s.params.index)
                s.err.notify()
        for fd in self.kicks:
            self.poller.unregister(fd)
        self.kicks.clear()
        self.polled.clear()
        self.queues.clear()
        self.events.clear()

    def _stop(self) -> int:
        msg = self.ctrl.recv(16)
        if not msg:
            return 0  # the parent is gone
        live = dict(self.queues)
        # suspend only where every queue's area keeps what is left in flight
        suspend = msg[:1] == _SUSPEND and all(q.tracker is not None for q in live.values())
        carried = self.unadopted
        if self.service is not None and not suspend and self._serve_left() is _GONE:
            return 1
        if self.service is not None:
            # even with every queue broken: the service's threads must be done before
            # its state is handed over
            with _Heartbeat(self.ctrl):
                stop = self.service.suspend if suspend else self.service.quiesce
                if self._run(stop) is _GONE:
                    return 1
            try:
                carried = self.service.carry()
            except Exception:
                log.exception("%s: the queue service could not hand over its state",
                              self.name)
            try:
                self.service.close()
            except Exception:
                log.exception("%s: closing the queue service failed", self.name)
        for q in live.values():
            if q.inflight and suspend:
                log.info("%s queue %d: %d request(s) suspended, kept in the in-flight area",
                         self.name, q.index, q.inflight)
            elif q.inflight:
                log.error("%s queue %d: stopped with %d requests not completed", self.name,
                          q.index, q.inflight)
            if q.unserved and suspend:
                log.info("%s queue %d: %d request(s) the last back-end left in flight stay "
                         "in the in-flight area", self.name, q.index, q.unserved)
            elif q.unserved:
                log.error("%s queue %d: stopped with %d requests the last back-end left in "
                          "flight not served yet (still marked in the in-flight area)",
                          self.name, q.index, q.unserved)
        entries = []
        for s in self.specs:
            i = s.params.index
            sq = self.started.get(i)  # a queue that broke reports where it stopped
            last = sq.ring.base() if sq is not None else s.params.base
            entries.append(_ENTRY.pack(i, last, i in self.broken))
        if carried is not None:
            try:
                self._send_carried(carried)
            except OSError as e:
                log.error("%s: the state for the next worker could not be handed over: %s",
                          self.name, e)
                try:
                    self.ctrl.send(_CARRY_FAILED)
                except OSError:
                    pass
        try:
            self.ctrl.send(_REPORT + b"".join(entries))
        except OSError:
            pass
        return 0

    def _serve_left(self) -> object:
        """Before stopping: hand the device the chains a dead back-end left in flight that
        it has not had yet (the stop report counts them as taken; only the in-flight area
        remembers them, and the next start may come with another one)."""
        assert self.service is not None
        for q in list(self.queues.values()):
            while q.unserved and q.error is None and q.index in self.queues:
                before = q.unserved
                if self._run(self.service.kicked, q) is _GONE:
                    return _GONE
                if q.unserved == before:
                    break  # the device takes none now (no room): the area keeps them
        return None

    def _send_carried(self, carried: Carried) -> None:
        if len(carried.data) > MAX_CARRIED:
            raise OSError(errno.EMSGSIZE, f"{len(carried.data)} bytes of state, at most "
                          f"{MAX_CARRIED}")
        data, fds = memoryview(carried.data), carried.fds
        at = fd_at = 0
        while True:
            piece = data[at : at + _CARRY_BYTES]
            some = fds[fd_at : fd_at + _CARRY_FDS]
            at += len(piece)
            fd_at += len(some)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(some)}i", *some))]
            self.ctrl.sendmsg([_CARRY, piece], anc if some else [])
            if at >= len(data) and fd_at >= len(fds):
                return


class _Heartbeat:
    """While the service quiesces (it may wait for requests in flight on the host), tell
    the parent now and then that the worker is still at it."""

    def __init__(self, ctrl: socket.socket) -> None:
        self.ctrl = ctrl
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.done.wait(_WAITING_EVERY):
            try:
                self.ctrl.send(_WAITING)
            except OSError:
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


IDLE, DRAINED, MORE = 0, 1, 2  # what run_queue did


def run_queue(q: DeviceQueue, kicked: Callable[[DeviceQueue], None],
              budget: float = CTRL_LOOK) -> int:
    """Have the device serve `q`, publishing completions batch by batch, until the ring is
    empty (DRAINED: kicks stay off, the caller keeps looking for its polling window, as
    QEMU's AioContext polling does, then asks for kicks) or `budget` seconds have passed
    (MORE: the caller comes back after a look at its other queues, its own events and its
    control channel, so a guest that keeps the ring full starves none of them and a STOP
    is answered within a batch). IDLE: nothing was there, or the device took nothing
    although chains are there (buffers for data it does not have yet); kicks are on again.
    ParentGone comes out of `q.notify` (or, for a kernel that publishes at once, out of
    `kicked`: DeviceQueue.run_kernel) before anything is stored once the parent is gone."""
    clock = time.perf_counter
    end = clock() + budget
    did = False
    q.disable_kicks()
    while True:
        if q.waiting():
            before = q.popped
            kicked(q)
            q.notify()
            if q.popped == before:
                q.enable_kicks()
                return IDLE
            did = True
            if clock() >= end:
                return MORE
            continue
        if q.error is not None:
            return IDLE
        if did:
            return DRAINED
        if not q.enable_kicks():
            return IDLE
        q.disable_kicks()
