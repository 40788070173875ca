"""virtio-fs (virtio 1.2 §5.11): a host directory shared with the guest over FUSE.

Queue 0 is the high-priority queue (FORGETs: served at once, in the worker's thread),
queues 1.. carry requests. Requests that may wait on the host (data, syncs, opens) run on
a pool of threads, so a slow READ or FSYNC does not hold up a GETATTR behind it; each
completes when it is done (out of order). Every queue is in one group, so one worker
holds the session's inode and handle tables (fuse/server.py).

The tables outlive the worker: when its queues stop (the VM pauses, the memory table
changes), the worker hands them to the engine (`carry`) and the next worker takes them
up, so the guest's node ids and open files stay valid. A new INIT, a reset or a new
connection starts a fresh session.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from dataclasses import dataclass, field

from ..engine.device import Carried, Device, Events, StateError
from ..engine.pool import PooledService
from ..engine.queue import DeviceQueue
from ..fuse import abi, migration
from ..fuse.abi import Op
from ..fuse.server import FileServer, ServerOptions
from ..procfs import PROC_FD
from ..protocol import ProtocolFeature
from ..ratelog import Limited
from ..virtq.iov import iov_read
from ..virtq.ring import Chain

log = logging.getLogger(__name__)

MAX_REQUEST_QUEUES = 16
DEFAULT_THREADS = 8


@dataclass(frozen=True)
class FsOptions:
    shared_dir: str
    tag: str
    request_queues: int = 1
    threads: int = DEFAULT_THREADS
    server: ServerOptions = field(default_factory=ServerOptions)


class FsDevice(Device):
    name = "vhost-user-fs"
    protocol_features = int(ProtocolFeature.CONFIG | ProtocolFeature.MQ
                            | ProtocolFeature.DEVICE_STATE)

    def __init__(self, opts: FsOptions) -> None:
        tag = opts.tag.encode()
        if not 0 < len(tag) <= abi.TAG_SIZE:
            raise ValueError(f"the tag must be 1 to {abi.TAG_SIZE} bytes, not {len(tag)}")
        if not 1 <= opts.request_queues <= MAX_REQUEST_QUEUES:
            raise ValueError(f"request queues must be 1 to {MAX_REQUEST_QUEUES}")
        if not 1 <= opts.threads <= 256:
            raise ValueError("threads must be 1 to 256")
        self.opts = opts
        self.tag = tag
        self.num_queues = 1 + opts.request_queues
        self.root_fd = os.open(opts.shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # Whether a FUSE session is on, its minor version, the next node id and handle, as
        # workers last set them (shared with them): a worker that starts without the last
        # one's state (it died, or could not hand it over) serves the session on, its node
        # ids stale and new ones past them, rather than answering EIO to a guest that will
        # never send INIT again.
        self._shared = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED)
        self.session = memoryview(self._shared).cast("q")
        self._counters = self.session[2:4]
        self.server = FileServer(self.root_fd, PROC_FD, opts.server, self._counters)
        self.server.on_session = self._session_changed
        self.adopted = False

    def _session_changed(self, on: bool, minor: int) -> None:
        self.session[1] = minor
        self.session[0] = int(on)

    def features(self) -> int:
        return 0  # VIRTIO_FS_F_NOTIFICATION is not offered

    def queue_groups(self) -> list[list[int]]:
        return [list(range(self.num_queues))]

    def get_config(self) -> bytes:
        return abi.CONFIG.pack(self.tag, self.opts.request_queues)

    def serve(self, queues: dict[int, DeviceQueue], events: Events) -> FsService:
        if not self.adopted and self.session[0] and not self.server.initialized:
            log.error("the FUSE session's state did not reach this worker (the last one "
                      "died or could not hand it over): serving on, the guest's node ids "
                      "and open files are stale (ESTALE, EBADF) until it looks them up again")
            self.server.resume_lost(int(self.session[1]))
        return FsService(self.server, queues, events, self.opts.threads)

    def adopt(self, carried: Carried) -> None:
        try:
            state = json.loads(carried.data)
            self.server.restore(state, carried.fds)
            self.adopted = True
        except (ValueError, KeyError, TypeError, IndexError):
            log.exception("the last worker's FUSE session could not be taken up")
            self.server.abandon()
            carried.close()

    def save_state(self, carried: dict[int, Carried]) -> bytes:
        """The FUSE session by paths (fuse/migration.py), from what the worker handed over;
        a session whose worker died meanwhile goes as one whose tables are lost."""
        c = carried.get(0)
        try:
            if c is not None:
                data = migration.save(json.loads(c.data), c.fds, self.root_fd)
            elif not self.session[0]:
                data = migration.save(None, [], self.root_fd)
            else:
                lost = {"initialized": True, "minor": int(self.session[1]),
                        "tables": {"next_node": max(2, self.session[2]),
                                   "next_fh": max(1, self.session[3]), "inodes": [],
                                   "handles": []}}
                data = migration.save(lost, [], self.root_fd)
            migration.check_size(data, self.server.tables.limit)  # or no destination takes it
        except (migration.MigrationError, OSError) as e:
            raise StateError(f"the FUSE session cannot be saved: {e}") from e
        return data

    def load_state(self, data: bytes) -> dict[int, Carried]:
        try:
            state, fds = migration.load(data, self.root_fd, self.server.reopen,
                                        self.server.tables.limit)
        except migration.MigrationError as e:
            raise StateError(f"the FUSE session cannot be taken up: {e}") from e
        if state is None:
            self._session_changed(False, 0)
            return {}
        self._session_changed(state["initialized"], state["minor"])
        self.session[2] = state["tables"]["next_node"]  # if the first worker dies before
        self.session[3] = state["tables"]["next_fh"]  # it takes the session up
        log.info("FUSE session taken up: %d nodes, %d open files",
                 len(state["tables"]["inodes"]), len(state["tables"]["handles"]))
        return {0: Carried(json.dumps(state).encode(), fds)}

    def reset(self) -> None:
        self.server.reset()
        self._session_changed(False, 0)

    def worker_fds(self, indices: list[int]) -> list[int]:
        return [self.root_fd]

    def close(self) -> None:
        os.close(self.root_fd)
        self._counters.release()
        self.session.release()
        self._shared.close()


# Requests that may wait on the host for long (data, syncs, opens: a lease, a slow
# device) run on the pool's threads; the others (names and attributes, answered from the
# host's caches) at once in the worker's thread, which costs far less than a hand-off.
POOLED = frozenset({Op.OPEN, Op.CREATE, Op.READ, Op.WRITE, Op.RELEASE, Op.FLUSH, Op.FSYNC,
                    Op.FSYNCDIR, Op.FALLOCATE, Op.COPY_FILE_RANGE, Op.SETATTR, Op.LSEEK,
                    Op.SYNCFS})
HIPRIO = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})  # what the hiprio queue takes
_OPCODE = struct.Struct("<I")


def _opcode(chain: Chain) -> int:
    first = chain.readable[0] if chain.readable else b""
    if len(first) >= 8:
        return int(_OPCODE.unpack_from(first, 4)[0])
    head = iov_read(chain.readable, 8)
    return int(_OPCODE.unpack_from(head, 4)[0]) if len(head) == 8 else 0


class FsService(PooledService):
    """Serves the hiprio and request queues (in their worker): requests that may wait on
    the host go to the pool, the others are answered at once."""

    def __init__(self, server: FileServer, queues: dict[int, DeviceQueue], events: Events,
                 threads: int) -> None:
        self.server = server
        self.bad = Limited(log)
        super().__init__(queues, threads, "fuse")

    def kicked(self, q: DeviceQueue) -> None:
        handle = self.server.handle
        for chain in q.pop_batch():
            op = _opcode(chain)
            if not q.index and op not in HIPRIO:  # it must never wait on the host here
                self.bad.log(logging.WARNING, "FUSE opcode %d on the hiprio queue: dropped",
                             op)
                q.complete(chain, 0)
            elif op in POOLED:
                self.submit(q, chain)
            else:
                q.complete(chain, handle(chain.readable, chain.writable))

    def serve_chain(self, chain: Chain) -> int:
        return self.server.handle(chain.readable, chain.writable)

    def carry(self) -> Carried:
        state, fds = self.server.export()
        return Carried(json.dumps(state).encode(), fds)

