"""The virtio-vhost-user device as a vfio-user server, plus its vhost-user socket.

One loop serves: the vfio-user client (the appliance's VMM, or our Python driver), the
consumer's vhost-user connection, the consumer's kick eventfds, and the stop signal.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

from ..memory import MemoryTableError
from ..shutdown import Shutdown, StopSignal, Watch
from ..sockets import PeerClosed, connect, inherited, listen
from ..vfio_user import protocol as vp
from ..vfio_user.socket import PeerStalled, VfioUserChannel, close_fds
from .abi import FIRST_FILE_REGION, WINDOW_BASE_CAP, WINDOW_FILE_TYPE
from .device import BAR_DOORBELL, BAR_WINDOW, DmaError, VvuDevice
from .pci import PciAccessError

log = logging.getLogger(__name__)
SCM_MAX_FD = 253  # the most fds one sendmsg carries

C = vp.Command
NUM_REGIONS = 9  # BAR0-5, ROM, config, VGA: the VFIO PCI layout
NUM_IRQS = 5  # INTx, MSI, MSI-X, ERR, REQ
MAX_DATA = 1 << 20
ACCEPT_PAUSE = 0.1  # s: out of fds, the listener stays readable; pause between tries


def _listen(path: str, what: str) -> socket.socket:
    try:
        return listen(path)
    except OSError as e:
        raise OSError(e.errno, f"{what} {path}: {e.strerror}") from e


class VvuServer:
    def __init__(self, device: VvuDevice, vfio_path: str, vhost: str | int,
                 consumer_client: bool = False) -> None:
        """`vhost`: the consumer's vhost-user socket path, or an inherited listening
        socket's fd."""
        self.dev = device
        self.vfio_path = vfio_path
        self.vhost_path = vhost if isinstance(vhost, str) else None
        self.vhost_fd = vhost if isinstance(vhost, int) else None
        self.consumer_client = consumer_client
        self.vfio_listener: socket.socket | None = None
        self.vhost_listener: socket.socket | None = None
        self.client: VfioUserChannel | None = None
        self.client_max_fds = vp.DEFAULT_MAX_MSG_FDS  # what the client takes per message

    # -- vfio-user commands --------------------------------------------------------------------

    def handle(self, msg: vp.Message, fds: list[int]) -> tuple[vp.Message, list[int]]:
        """Serve one command; returns the reply and the fds to send with it."""
        vp.check_supported(msg)
        pl = msg.payload
        dev = self.dev
        if msg.command == C.VERSION:
            assert isinstance(pl, vp.Version)
            caps = vp.Capabilities(max_msg_fds=8, max_data_xfer_size=MAX_DATA, pgsizes=4096,
                                   max_dma_maps=1024)
            offered = pl.capabilities.max_msg_fds if pl.capabilities is not None else None
            self.client_max_fds = min(offered or vp.DEFAULT_MAX_MSG_FDS, SCM_MAX_FD)
            if self.client is not None:
                self.client.max_send_fds = self.client_max_fds
            return vp.reply_to(msg, vp.negotiate_version(pl, caps)), []
        if msg.command == C.DMA_MAP:
            assert isinstance(pl, vp.DmaMap)
            writable = bool(pl.flags & vp.DmaMapFlag.WRITE)
            dev.dma_map(pl.address, pl.size, fds.pop() if fds else None, pl.offset, writable)
            return vp.reply_to(msg), []
        if msg.command == C.DMA_UNMAP:
            assert isinstance(pl, vp.DmaUnmap)
            everything = bool(pl.flags & vp.DmaUnmapFlag.ALL)
            dev.dma_unmap(pl.address, pl.size, everything)
            return vp.reply_to(msg, pl), []
        if msg.command == C.DEVICE_GET_INFO:
            flags = vp.DeviceFlag.PCI | vp.DeviceFlag.RESET
            return vp.reply_to(msg, vp.DeviceInfo.reply(flags, NUM_REGIONS,
                                                                  NUM_IRQS)), []
        if msg.command == C.DEVICE_GET_REGION_INFO:
            return self._region_info(msg)
        if msg.command == C.DEVICE_GET_REGION_IO_FDS:
            return self._io_fds(msg)
        if msg.command == C.DEVICE_GET_IRQ_INFO:
            assert isinstance(pl, vp.IrqInfo)
            count, irq_flags = 0, 0
            if pl.index == vp.PciIrq.MSIX:
                count, irq_flags = dev.nvec, vp.IrqInfoFlag.EVENTFD | vp.IrqInfoFlag.NORESIZE
            elif pl.index == vp.PciIrq.INTX:  # level-triggered: masked when signalled
                count, irq_flags = 1, (vp.IrqInfoFlag.EVENTFD | vp.IrqInfoFlag.MASKABLE
                                       | vp.IrqInfoFlag.AUTOMASKED)
            return vp.reply_to(msg, vp.IrqInfo.reply(pl.index, irq_flags, count)), []
        if msg.command == C.DEVICE_SET_IRQS:
            self._set_irqs(pl, fds)  # type: ignore[arg-type]
            return vp.reply_to(msg), []
        if msg.command == C.REGION_READ:
            assert isinstance(pl, vp.RegionAccess)
            data = dev.region_read(pl.region, pl.offset, pl.count)
            return vp.reply_to(msg, vp.RegionAccess(pl.offset, pl.region, pl.count,
                                                            data)), []
        if msg.command == C.REGION_WRITE:
            assert isinstance(pl, vp.RegionAccess)
            dev.region_write(pl.region, pl.offset, pl.data)
            return vp.reply_to(msg, vp.RegionAccess(pl.offset, pl.region,
                                                            pl.count)), []
        if msg.command == C.DEVICE_RESET:
            dev.reset()
            return vp.reply_to(msg), []
        return vp.error_reply(msg, errno.ENOTSUP), []

    def _region_info(self, msg: vp.Message) -> tuple[vp.Message, list[int]]:
        pl = msg.payload
        assert isinstance(pl, vp.RegionInfo)
        size = self.dev.region_size(pl.index)
        flags = vp.RegionFlag.READ | vp.RegionFlag.WRITE if size else 0
        caps: tuple[vp.RegionCap, ...] = ()
        fds: list[int] = []
        f = self.dev.window_file(pl.index) if pl.index in (BAR_WINDOW,) or (
            pl.index >= FIRST_FILE_REGION) else None
        if f is not None:  # mmap-able: the consumer's file, as far as it goes
            flags |= vp.RegionFlag.MMAP
            caps = (vp.SparseMmapCap(((0, f.size),)),)
            if pl.index >= FIRST_FILE_REGION:  # where this file sits in the window
                caps += (vp.RegionTypeCap(WINDOW_FILE_TYPE, 1),
                         vp.RawCap(WINDOW_BASE_CAP, 1, struct.pack("<Q", f.base)))
            fds = [f.fd]
        info = vp.RegionInfo.reply(pl.index, flags, size, 0, caps, max_argsz=pl.argsz)
        return vp.reply_to(msg, info), fds if info.caps or not caps else []

    def _io_fds(self, msg: vp.Message) -> tuple[vp.Message, list[int]]:
        """The doorbells as ioeventfds: each one is the consumer's own call (or err)
        eventfd, so a driver's doorbell write signals the consumer with no hop through
        this process (what KVM ioeventfds gave the 2019 prototype); and the kick eventfds
        the driver chose to read itself (KICK_FD_VECTOR): the consumer's own too."""
        pl = msg.payload
        assert isinstance(pl, vp.RegionIoFds)
        doorbells = self.dev.doorbell_fds() if pl.index == BAR_DOORBELL else []
        subs = tuple(vp.IoFdSubRegion(offset, 2, i, 0, 0, 0)
                     for i, (offset, _fd) in enumerate(doorbells))
        if len(doorbells) > self.client_max_fds:
            raise vp.VfioUserError(f"GET_REGION_IO_FDS: {len(doorbells)} doorbell eventfds, "
                                   f"the client takes {self.client_max_fds} per message")
        need = vp.RegionIoFds.HEAD.size + len(subs) * vp.IoFdSubRegion.FMT.size
        if pl.argsz < need:  # the client asks again with room for them
            return vp.reply_to(msg, vp.RegionIoFds(need, 0, pl.index, len(subs))), []
        return (vp.reply_to(msg, vp.RegionIoFds(need, 0, pl.index, len(subs), subs)),
                [fd for _, fd in doorbells])

    def _set_irqs(self, pl: vp.IrqSet, fds: list[int]) -> None:
        F = vp.IrqSetFlag
        if pl.index == vp.PciIrq.INTX:
            self._set_intx(pl, fds)
            return
        if pl.index != vp.PciIrq.MSIX:
            if pl.count:
                raise vp.BadPayload(f"irq index {pl.index} has no vectors")
            return
        if pl.flags & F.ACTION_TRIGGER and pl.flags & F.DATA_EVENTFD:
            self.dev.set_irqs(pl.start, [fd if fd >= 0 else None for fd in fds])
            fds.clear()
        elif pl.flags & F.ACTION_TRIGGER and pl.flags & F.DATA_NONE:
            if pl.count == 0:
                self.dev.set_irqs(0, [None] * self.dev.nvec)
            for v in range(pl.start, pl.start + pl.count):
                self.dev.fire(v)
        # MASK / UNMASK: the client (QEMU) emulates the MSI-X table itself

    def _set_intx(self, pl: vp.IrqSet, fds: list[int]) -> None:
        """INTx: one trigger eventfd; MASK and UNMASK (QEMU's end of interrupt) with no
        data. An unmask eventfd (KVM's resampling) is not supported."""
        F, intx = vp.IrqSetFlag, self.dev.intx
        if pl.start != 0 or pl.count > 1:
            raise vp.BadPayload(f"INTx has one vector, not {pl.start}+{pl.count}")
        if pl.action == F.ACTION_TRIGGER and pl.data_type == F.DATA_EVENTFD:
            fd = fds.pop(0) if pl.count and fds else None
            intx.set_fd(fd if fd is not None and fd >= 0 else None)
        elif pl.data_type != F.DATA_NONE:
            raise vp.BadPayload(f"INTx {pl.action.name} with {pl.data_type.name} data")
        elif pl.action == F.ACTION_TRIGGER:
            if pl.count == 0:
                intx.set_fd(None)
            else:  # a test of the eventfd
                intx.signal()
        elif pl.count and pl.action == F.ACTION_UNMASK:
            intx.unmask()
        elif pl.count and pl.action == F.ACTION_MASK:
            intx.mask()

    # -- the loop ------------------------------------------------------------------------------

    def serve_client(self) -> None:
        """The vfio-user client's socket is ready: send what waits for it, then serve one
        command (or its departure). Never blocks on the client."""
        client = self.client
        if client is None:
            return  # dropped earlier in this round of events
        try:
            client.flush()
            got = client.poll()
        except PeerClosed:
            log.info("vfio-user client disconnected")
            self._drop_client()
            return
        except vp.VfioUserError as e:  # a bad header: the stream cannot be followed further
            log.error("bad vfio-user message header, dropping the client: %s", e)
            if e.header is not None:
                self._reply(vp.error_reply(e.header, e.errno), [])
            self._drop_client()
            return
        except OSError as e:
            log.error("vfio-user connection failed: %s", e)
            self._drop_client()
            return
        if got is None:
            return
        header, body, fds = got
        try:
            msg = vp.decode_command(header, body, len(fds), sender=vp.Peer.CLIENT,
                                    max_data_xfer_size=MAX_DATA)
        except vp.VfioUserError as e:
            close_fds(fds)
            log.error("bad vfio-user message: %s", e)
            self._reply(vp.error_reply(header, e.errno), [])
            return
        try:
            reply, rfds = self.handle(msg, fds)
        except vp.VfioUserError as e:
            log.error("%s refused: %s", msg.name, e)
            reply, rfds = vp.error_reply(msg, e.errno), []
        except (PciAccessError, DmaError, MemoryTableError, ValueError) as e:
            log.error("%s failed: %s", msg.name, e)
            reply, rfds = vp.error_reply(msg, errno.EINVAL), []
        except Exception:  # a bug must not take the device down with the client's VM
            log.exception("%s failed", msg.name)
            reply, rfds = vp.error_reply(msg, errno.EIO), []
        finally:
            close_fds(fds)
        if not msg.no_reply:
            self._reply(reply, rfds)

    def _reply(self, reply: vp.Message, fds: list[int]) -> None:
        if self.client is None:
            return
        try:
            self.client.send_nowait(reply, fds)
        except (OSError, PeerClosed) as e:  # gone meanwhile, or does not read (PeerStalled)
            log.error("cannot answer the vfio-user client: %s", str(e) or "it disconnected")
            self._drop_client()

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.client_max_fds = vp.DEFAULT_MAX_MSG_FDS
        self.dev.reset()
        self.dev.dma_unmap(0, 0, everything=True)
        self.dev.set_irqs(0, [None] * self.dev.nvec)
        self.dev.intx.set_fd(None)

    def _accept_client(self) -> None:
        assert self.vfio_listener is not None
        try:
            sock, _ = self.vfio_listener.accept()
        except OSError as e:  # out of fds: the client waits in the backlog
            log.error("cannot accept a vfio-user client: %s", e)
            time.sleep(ACCEPT_PAUSE)
            return
        self.client = VfioUserChannel(sock)
        log.info("vfio-user client connected")

    def _accept_consumer(self) -> None:
        assert self.vhost_listener is not None
        try:
            sock, _ = self.vhost_listener.accept()
        except OSError as e:
            log.error("cannot accept a consumer: %s", e)
            time.sleep(ACCEPT_PAUSE)
            return
        self.dev.relay.attach(sock)

    def open(self) -> None:
        if self.vhost_fd is not None:
            sock, listening = inherited(self.vhost_fd, f"--fd {self.vhost_fd}")
            if not listening:
                sock.detach()
                raise OSError(f"--fd {self.vhost_fd} is not a listening UNIX stream socket")
            sock.setblocking(False)
            self.vhost_listener = sock
        elif not self.consumer_client:
            assert self.vhost_path is not None
            self.vhost_listener = _listen(self.vhost_path, "--socket-path")
        self.vfio_listener = _listen(self.vfio_path, "--vfio-user-socket")

    def run(self, stop: StopSignal) -> None:
        next_connect = 0.0
        try:
            self.open()  # (in the try: what it made is removed if the rest fails)
            while True:
                timeout = 500 if self.consumer_client and self.dev.relay.conn is None else -1
                deadline = self._deadline()
                if deadline is not None:
                    wait = max(0, int((deadline - time.monotonic()) * 1000) + 1)
                    timeout = wait if timeout < 0 else min(timeout, wait)
                self._watch(stop).dispatch(timeout)
                self._guard(self._check_peers)()
                if (self.consumer_client and self.dev.relay.conn is None
                        and time.monotonic() >= next_connect):
                    try:
                        assert self.vhost_path is not None
                        self.dev.relay.attach(connect(self.vhost_path, retry_for=0))
                    except ConnectionError:
                        next_connect = time.monotonic() + 0.5
        finally:
            self.close()

    def _deadline(self) -> float | None:
        """The earliest moment a peer's half message or unread backlog times out."""
        times = [c.deadline() for c in (self.client, *self.dev.relay.channels())
                 if c is not None]
        return min((t for t in times if t is not None), default=None)

    def _check_peers(self) -> None:
        """Drop a peer that stalled (half a message, or ours unread, for too long)."""
        if self.client is not None:
            try:
                self.client.check()
            except PeerStalled as e:
                log.error("vfio-user client: %s; dropping it", e)
                self._drop_client()
        self.dev.relay.check_peers()

    def _guard(self, handler: Callable[[], None], client: bool = False) -> Callable[[], None]:
        """`handler`, but an error it did not expect (a bug, or out of fds) ends the
        consumer's session — and drops the vfio-user client if `client` (its handler
        failed) — with the traceback logged: the device goes on."""
        def guarded() -> None:
            try:
                handler()
            except Shutdown:
                raise
            except Exception:
                log.exception("internal error: ending the session")
                self.dev.relay.end_session("internal error")
                if client and self.client is not None:
                    self._drop_client()
        return guarded

    def _watch(self, stop: StopSignal) -> Watch:
        w = Watch(stop)
        if self.client is None and self.vfio_listener is not None:
            w.add(self.vfio_listener.fileno(), self._guard(self._accept_client))
        if self.client is not None:
            w.add(self.client.fileno(), self._guard(self.serve_client, client=True),
                  self.client.wants_write)
        relay = self.dev.relay
        if relay.conn is None and self.vhost_listener is not None:
            w.add(self.vhost_listener.fileno(), self._guard(self._accept_consumer))
        if relay.conn is not None:  # hang-ups are reported even when it is not read
            w.add(relay.conn.fileno(), self._guard(relay.on_consumer), relay.conn.wants_write,
                  read=relay.wants_consumer())
        if relay.backend is not None and (relay.wants_backend() or relay.backend.wants_write):
            w.add(relay.backend.fileno(), self._guard(relay.on_backend),
                  relay.backend.wants_write,
                  read=relay.wants_backend())
        for vring, fd in self.dev.watched_kicks().items():
            w.add(fd, self._guard(functools.partial(relay.on_kick, vring)))
        return w

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.dev.close()
        for sock, path in ((self.vfio_listener, self.vfio_path),
                           (self.vhost_listener, self.vhost_path)):
            if sock is not None:
                sock.close()
                try:
                    if path is not None:  # (an inherited socket's path is not ours)
                        os.unlink(path)
                except OSError:
                    pass
