"""One worker process per running queue.

The GIL rules out threads for a parallel data path, so each started, enabled queue is
served by a forked child. Guest memory is inherited (MAP_SHARED mappings stay shared
across fork), as are the kick fd, the call notifier and the device. The parent talks to
the child over a SEQPACKET pair: it sends STOP, the child finishes the batch in hand
(so nothing is in flight), answers with its last avail index and exits.

A worker's configuration never changes while it runs: any change (memory table, call fd,
enable, features) is a stop and a fresh start from the returned index.

However the back-end ends, the front-end must not see the connection close while any of
its processes can still store into a used ring: the front-end then reads the used index as
its resume point, and a completion after that would be replayed by the next back-end (a
duplicate completion, a stale block). So a worker keeps the connection open: the kernel
closes it only when the last process holding it is gone. The parent stops its workers
before any orderly close; if the parent dies, the kernel kills its workers (PDEATHSIG), and
a worker that finds its parent gone anyway (no PDEATHSIG, or it came late) stops before its
next store into the used ring. Workers ignore SIGTERM and SIGINT: the parent stops them in
order, each finishing the batch in hand.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..memory import GuestMemory
from ..virtq.split import RingError, RingLayout, SplitQueue
from .device import Device, QueueHandler
from .notify import Notifier

log = logging.getLogger(__name__)

_STOP = b"S"
_REPORT = struct.Struct("<HB")  # last avail index, broken flag
_PR_SET_PDEATHSIG = 1
_POLL_IDLE_ROUNDS = 200  # poll mode: empty rounds before napping 1 ms between looks
DEFAULT_SPIN_US = 200  # look for more work this long after the ring empties
CTRL_LOOK = 0.001  # s between looks at the control channel while the ring stays busy

# fds of the parent's that a worker must not hold open: a listening socket (a restarted
# back-end binds the path anew), the stop-signal pipe. Never the connection: see above.
parent_only_fds: set[int] = set()


class ParentGone(Exception):
    """The worker's parent died: nothing more may reach the used ring."""


@dataclass(frozen=True)
class QueueParams:
    index: int
    layout: RingLayout
    last_avail: int
    event_idx: bool
    indirect: bool
    spin_us: int = DEFAULT_SPIN_US


class Running(Protocol):
    """A running queue, however it is run."""

    def stop(self) -> tuple[int | None, bool]:
        """Stop serving; returns (last avail index, or None if unknown; broken)."""
        ...


# Starts serving a queue: (params, memory, device, kick fd or None to poll, call, err).
Runner = Callable[[QueueParams, GuestMemory, Device, "int | None", Notifier, Notifier], Running]


class Worker:
    """Parent-side handle of a worker process."""

    def __init__(self, pid: int, ctrl: socket.socket, index: int) -> None:
        self.pid = pid
        self.ctrl = ctrl
        self.index = index

    def stop(self, timeout: float = 10.0) -> tuple[int | None, bool]:
        """Stop the worker; returns (last avail index or None if it died, broken)."""
        report = None
        try:
            self.ctrl.send(_STOP)
            self.ctrl.settimeout(timeout)
            data = self.ctrl.recv(16)
            if len(data) == _REPORT.size:
                report = _REPORT.unpack(data)
        except OSError as e:
            log.error("queue %d: worker %d did not answer STOP: %s", self.index, self.pid, e)
        finally:
            self.ctrl.close()
        if report is None:
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        if report is None:
            return None, True
        return report[0], bool(report[1])


def start_worker(params: QueueParams, mem: GuestMemory, device: Device, kick_fd: int | None,
                 call: Notifier, err: Notifier) -> Worker:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ppid = os.getpid()
    pid = os.fork()
    if pid:
        child.close()
        return Worker(pid, parent, params.index)
    status = 1
    try:
        parent.close()
        _become_worker(ppid)
        status = _serve(params, mem, device, kick_fd, call, err, child, ppid)
    except BaseException:  # never let a child unwind into the parent's stack
        traceback.print_exc()
    finally:
        os._exit(status)


def _become_worker(ppid: int) -> None:
    for fd in parent_only_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    signal.set_wakeup_fd(-1)  # the parent's stop pipe is the parent's
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent stops us, in order
    try:  # die with the parent
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != ppid:  # it died before PDEATHSIG was armed
        os._exit(0)


def _serve(params: QueueParams, mem: GuestMemory, device: Device, kick_fd: int | None,
           call: Notifier, err: Notifier, ctrl: socket.socket, ppid: int) -> int:
    name = f"{device.name} queue {params.index}"
    broken = False
    q: SplitQueue | None = None
    try:
        q = SplitQueue(mem, params.layout, params.last_avail, params.event_idx,
                       params.indirect)
    except RingError as e:
        log.error("%s: cannot start: %s", name, e)
        broken = True
        err.notify()
    handler = device.queue_handler(params.index)
    poller = select.poll()
    poller.register(ctrl, select.POLLIN)
    if kick_fd is not None:
        poller.register(kick_fd, select.POLLIN)
    spin = params.spin_us / 1e6
    idle = 0
    ctrl_poll = select.poll()
    ctrl_poll.register(ctrl, select.POLLIN)

    def stop_asked() -> bool:  # a STOP (or the parent's end) waits on the control channel
        return bool(ctrl_poll.poll(0))

    while True:
        if kick_fd is None and not broken:  # poll mode: nobody kicks, look again soon
            events = poller.poll(0 if idle < _POLL_IDLE_ROUNDS else 1)
        else:
            events = poller.poll()
        for fd, _ev in events:
            if fd == kick_fd:
                try:
                    os.read(kick_fd, 8)
                except BlockingIOError:
                    pass
            else:
                if not ctrl.recv(16):
                    return 0  # the parent is gone
                last = q.last_avail if q is not None else params.last_avail
                try:
                    ctrl.send(_REPORT.pack(last, broken))
                except OSError:
                    pass
                return 0
        if broken or q is None:
            continue
        try:
            idle = 0 if _drain(q, handler, call, spin, ppid, stop_asked) else idle + 1
        except ParentGone:
            log.error("%s: the back-end's main process is gone; stopping", name)
            return 1
        except RingError as e:
            log.error("%s: stopped: %s", name, e)
            broken = True
            err.notify()
        except Exception:
            log.exception("%s: device failed; queue stopped", name)
            broken = True
            err.notify()


def _drain(q: SplitQueue, handler: QueueHandler, call: Notifier, spin: float,
           ppid: int, stop_asked: Callable[[], bool] = lambda: False) -> bool:
    """Serve every available chain, a batch at a time: one used-index update and at most
    one notification per batch. Once the ring is empty, keep looking for `spin` seconds
    with kicks still suppressed (as QEMU's AioContext polling does) before asking for
    kicks again. Returns whether there was any work. Raises ParentGone, before storing
    anything into the used ring, once the parent is gone. Between batches, at most every
    CTRL_LOOK seconds, it returns early if `stop_asked()`: a STOP is answered within a
    batch even while the guest keeps the ring full."""
    handle, available, clock = handler.handle, q.available, time.perf_counter
    getppid = os.getppid
    next_look = clock() + CTRL_LOOK
    did = False
    idle_since = 0.0
    q.disable_kicks()
    while True:
        n = available()
        if n:
            did = True
            idle_since = 0.0
            chains, error = q.pop_batch(n)
            if chains:
                lengths = handle(chains)
                if getppid() != ppid:
                    raise ParentGone()
                q.push_batch(chains, lengths)
                if q.publish():
                    call.notify()
            if error is not None:
                raise error
            now = clock()
            if now >= next_look:
                next_look = now + CTRL_LOOK
                if stop_asked():
                    return True
            continue
        if spin:
            now = clock()
            if not idle_since:
                idle_since = now
                continue
            if now - idle_since < spin:
                continue
        if not q.enable_kicks():
            return did
        q.disable_kicks()
        idle_since = 0.0
