"""A TAP device as a switch port: the uplink to the host's network stack."""

from __future__ import annotations

import os

from ..devices.net_frames import Frames
from ..devices.net_offload import PLAIN, OffloadError, finish
from ..devices.tap import open_tap
from .port import Port

MAX_BURST = 256


class TapPort(Port):
    def __init__(self, ifname: str, mtu: int = 1500) -> None:
        super().__init__(f"tap:{ifname}")
        (self.fd,) = open_tap(ifname)
        self.ifname = ifname
        self.max_frame = mtu + 18

    def fileno(self) -> int:
        return self.fd

    def take(self) -> Frames:
        """Frames the host sent (a burst at most)."""
        frames = []
        c = self.counters
        for _ in range(MAX_BURST):
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if len(frame) < 14:
                c.drops["runt"] += 1
                continue
            if frame[6] & 1:
                c.drops["bad_source_mac"] += 1
                continue
            frames.append(frame)
            c.rx_bytes += len(frame)
        c.rx_packets += len(frames)
        return Frames.of(frames)

    def deliver(self, frames: Frames) -> None:
        """Frames to the host, complete: a checksum a guest left to us is filled in, a GSO
        frame segmented (the TAP is opened without IFF_VNET_HDR)."""
        c = self.counters
        for f in self._complete(frames):
            if len(f) > self.max_frame:
                c.drops["oversize"] += 1
                continue
            try:
                os.write(self.fd, f)
            except BlockingIOError:
                c.drops["tap_full"] += 1
                continue
            except OSError:  # e.g. the interface is down
                c.drops["tap_error"] += 1
                continue
            c.tx_packets += 1
            c.tx_bytes += len(f)

    def _complete(self, frames: Frames) -> list[bytes]:
        if frames.vnet is None:
            return list(frames)
        out = []
        for f, vnet in zip(frames, frames.vnet.tolist(), strict=True):
            hdr = bytes(vnet)
            if hdr == PLAIN:
                out.append(f)
                continue
            try:
                done = finish(f, hdr)
            except OffloadError:  # more pieces than the switch cuts a frame into
                self.counters.drops["bad_offload"] += 1
                continue
            if hdr[1]:
                self.counters.offloads["segmented"] += 1
                self.counters.offloads["segments"] += len(done)
            else:
                self.counters.offloads["checksummed"] += 1
            out.extend(done)
        return out

    def close(self) -> None:
        os.close(self.fd)
