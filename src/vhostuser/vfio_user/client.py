"""A vfio-user client: drive a vfio-user device from a process, as a VMM would, with no VM.

Guest RAM is a memfd that the client maps for itself and shares with the device by
DMA_MAP (iova = offset in that memfd); BARs are reached with REGION_READ/WRITE or, where
the device allows, mmap; interrupts arrive on eventfds given with SET_IRQS.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass

from ..sockets import connect
from . import protocol as vp
from .socket import VfioUserChannel, close_fds

MAX_FDS_PER_MESSAGE = vp.MAX_MSG_FDS  # what this client sends in one message
# what it proposes in VERSION and takes in one reply: as many as one sendmsg carries
# (SCM_MAX_FD), so that a device with many doorbells can list them all at once
RECV_MAX_FDS = 253


class DeviceError(Exception):
    """The device answered a command with an error."""

    def __init__(self, what: str, errno: int) -> None:
        super().__init__(f"{what}: {os.strerror(errno)} ({errno})")
        self.errno = errno


@dataclass
class Region:
    index: int
    size: int
    flags: int
    fd: int | None = None
    mmap_areas: tuple[tuple[int, int], ...] = ()
    offset: int = 0
    caps: tuple[object, ...] = ()


REPLY_TIMEOUT = 30.0  # s: a device that does not answer a command fails the caller


class VfioUserClient:
    def __init__(self, path: str, retry_for: float = 10.0,
                 reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.chan = VfioUserChannel(connect(path, retry_for=retry_for), timeout=reply_timeout,
                                    max_fds=RECV_MAX_FDS)
        self.version = self._call(vp.Command.VERSION, vp.Version(0, 0, vp.Capabilities(
            max_msg_fds=RECV_MAX_FDS, max_data_xfer_size=1 << 20)))

    def _call(self, cmd: int, payload: object = None, fds: tuple[int, ...] = ()
              ) -> object:
        msg = vp.command(cmd, payload, self.chan.next_msg_id())  # type: ignore[arg-type]
        self.chan.send(msg, fds)
        reply, rfds = self.chan.recv_reply(msg)
        self._last_fds = rfds
        if reply.is_error:
            close_fds(rfds)
            raise DeviceError(vp.command_name(cmd), reply.error)
        return reply.payload

    # -- device ----------------------------------------------------------------------------

    def device_info(self) -> vp.DeviceInfo:
        info = self._call(vp.Command.DEVICE_GET_INFO, vp.DeviceInfo.request())
        assert isinstance(info, vp.DeviceInfo)
        return info

    def region(self, index: int) -> Region:
        """GET_REGION_INFO (asking again with room for the capability chain if needed);
        the region's fd, if any, is the caller's to close."""
        argsz = 32
        for _ in range(4):  # a device that keeps asking for more room is refused below
            info = self._call(vp.Command.DEVICE_GET_REGION_INFO,
                              vp.RegionInfo.request(index, argsz))
            assert isinstance(info, vp.RegionInfo)
            if not info.caps_left_out:
                break
            close_fds(self._last_fds)
            argsz = info.argsz
        else:
            close_fds(self._last_fds)
            raise DeviceError(f"region {index}: the device keeps asking for more room for "
                              "its capabilities", errno.EPROTO)
        areas: tuple[tuple[int, int], ...] = ()
        for cap in info.caps:
            if isinstance(cap, vp.SparseMmapCap):
                areas = cap.areas
        fd = self._last_fds[0] if self._last_fds else None
        return Region(index, info.size, info.flags, fd, areas, info.offset, info.caps)

    def read(self, region: int, offset: int, count: int) -> bytes:
        acc = self._call(vp.Command.REGION_READ, vp.RegionAccess(offset, region, count))
        assert isinstance(acc, vp.RegionAccess)
        return acc.data

    def write(self, region: int, offset: int, data: bytes) -> None:
        self._call(vp.Command.REGION_WRITE, vp.RegionAccess(offset, region, len(data), data))

    def read_u(self, region: int, offset: int, size: int) -> int:
        return int.from_bytes(self.read(region, offset, size), "little")

    def write_u(self, region: int, offset: int, size: int, value: int) -> None:
        self.write(region, offset, value.to_bytes(size, "little"))

    def irq_info(self, index: int) -> vp.IrqInfo:
        info = self._call(vp.Command.DEVICE_GET_IRQ_INFO, vp.IrqInfo.request(index))
        assert isinstance(info, vp.IrqInfo)
        return info

    def irq_count(self, index: int) -> int:
        return self.irq_info(index).count

    def unmask_irq(self, index: int, start: int = 0, count: int = 1) -> None:
        """SET_IRQS UNMASK (what QEMU sends at the guest's end of an INTx interrupt)."""
        flags = vp.IrqSetFlag.DATA_NONE | vp.IrqSetFlag.ACTION_UNMASK
        self._call(vp.Command.DEVICE_SET_IRQS, vp.IrqSet.make(flags, index, start, count))

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        """Trigger eventfds for vectors start.., a few per message (the fd limit)."""
        flags = vp.IrqSetFlag.DATA_EVENTFD | vp.IrqSetFlag.ACTION_TRIGGER
        step = MAX_FDS_PER_MESSAGE
        for i in range(0, len(fds), step):
            part = fds[i : i + step]
            data = struct.pack(f"<{len(part)}i", *part)
            self._call(vp.Command.DEVICE_SET_IRQS,
                       vp.IrqSet.make(flags, index, start + i, len(part), data), tuple(part))

    def io_fds(self, index: int) -> list[tuple[int, int]]:
        """GET_REGION_IO_FDS: (offset in the region, eventfd) pairs; the fds are the
        caller's to close (one fd may stand in several pairs: close each once)."""
        # room for as many as one reply carries: the set may grow between two asks (a
        # device that serves a consumer meanwhile), so ask once with room for all
        argsz = vp.RegionIoFds.HEAD.size + RECV_MAX_FDS * vp.IoFdSubRegion.FMT.size
        for _ in range(4):
            reply = self._call(vp.Command.DEVICE_GET_REGION_IO_FDS,
                               vp.RegionIoFds.request(index, argsz))
            assert isinstance(reply, vp.RegionIoFds)
            if reply.subregions or not reply.count:
                break
            close_fds(self._last_fds)
            argsz = reply.argsz
        else:
            close_fds(self._last_fds)
            raise DeviceError(f"region {index}: the device keeps asking for more room for "
                              "its io fds", errno.EPROTO)
        fds = self._last_fds
        if any(s.fd_index >= len(fds) for s in reply.subregions):
            close_fds(fds)
            raise DeviceError(f"region {index}: an io fd index beyond the {len(fds)} fds sent",
                              errno.EPROTO)
        used = {s.fd_index for s in reply.subregions}
        close_fds([fd for i, fd in enumerate(fds) if i not in used])
        return [(s.offset, fds[s.fd_index]) for s in reply.subregions]

    def reset(self) -> None:
        self._call(vp.Command.DEVICE_RESET)

    # -- memory ----------------------------------------------------------------------------

    def dma_map(self, iova: int, size: int, fd: int, offset: int = 0) -> None:
        self._call(vp.Command.DMA_MAP, vp.DmaMap.make(iova, size, offset=offset), (fd,))

    def dma_unmap(self, iova: int, size: int) -> None:
        self._call(vp.Command.DMA_UNMAP, vp.DmaUnmap.make(iova, size))

    def map_region(self, region: Region) -> mmap.mmap:
        """mmap the region's first mappable area (the caller keeps the fd open or not)."""
        if region.fd is None or not region.mmap_areas:
            raise DeviceError(f"region {region.index} is not mappable", 22)
        off, size = region.mmap_areas[0]
        return mmap.mmap(region.fd, size, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=region.offset + off)

    def close(self) -> None:
        self.chan.close()
