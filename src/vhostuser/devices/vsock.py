"""virtio-vsock (virtio 1.x §5.10): stream sockets between the guest and host programs, in
the hybrid convention of Firecracker and rust-vmm's vhost-device-vsock (host programs use
UNIX sockets):

- a host program connects to the UNIX socket `uds_path` and writes ``CONNECT <port>\\n``;
  once the guest has accepted it reads ``OK <host port>\\n`` and the stream follows;
- a guest connection to CID 2 (the host) port P is connected to the UNIX socket
  ``<uds_path>_<P>``.

Queues: rx (0, to the guest), tx (1, from the guest), event (2, unused: QEMU keeps it). The
config space is the guest's CID. Streams are served by devices/vsock_mux.py.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from typing import Any

from ..engine.device import Carried, ConfigError, Device, Events, QueueService
from ..engine.queue import DeviceQueue
from ..protocol.constants import ProtocolFeature
from ..sockets import listen

log = logging.getLogger(__name__)

# struct virtio_vsock_hdr (packed, little-endian)
HDR = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags
#                                     buf_alloc fwd_cnt
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW = 1, 2, 3, 4, 5
OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 6, 7
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
HOST_CID = 2
RXQ, TXQ, EVENTQ = 0, 1, 2
_CONFIG = struct.Struct("<Q")  # guest_cid


class VsockDevice(Device):
    name = "vhost-user-vsock"
    num_queues = 3
    max_queue_size = 1024
    protocol_features = int(ProtocolFeature.CONFIG)

    def __init__(self, guest_cid: int, uds_path: str) -> None:
        if not 3 <= guest_cid < 0xFFFFFFFF:
            raise ValueError(f"guest CID must be 3..4294967294, not {guest_cid}")
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.listener = listen(uds_path, backlog=128)  # replaces a stale socket file
        self.listener.setblocking(False)

    def features(self) -> int:
        return 0  # streams only (SEQPACKET not offered)

    def queue_groups(self) -> list[list[int]]:
        return [[RXQ, TXQ], [EVENTQ]]

    def get_config(self) -> bytes:
        return _CONFIG.pack(self.guest_cid)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise ConfigError("the vsock config space (the guest CID) is read-only")

    def adopt(self, carried: Carried) -> None:
        """In the rx/tx queues' new worker: the streams the last one carried (taken up by
        the next muxer, `take_adopted`)."""
        try:
            self._adopted: tuple[dict[str, Any], list[int]] | None = (
                json.loads(carried.data), carried.fds)
        except ValueError:
            log.error("vsock: the streams of the last worker could not be taken up")
            carried.close()

    def take_adopted(self) -> tuple[dict[str, Any], list[int]] | None:
        adopted, self._adopted = getattr(self, "_adopted", None), None
        return adopted

    def serve(self, queues: dict[int, DeviceQueue], events: Events) -> QueueService:
        from .vsock_mux import EventQueue, Muxer  # it imports this module's ABI

        if RXQ in queues or TXQ in queues:
            return Muxer(self, queues, events)
        return EventQueue()

    def worker_fds(self, indices: list[int]) -> list[int]:
        muxer = RXQ in indices or TXQ in indices  # it accepts there (`serve`)
        return [self.listener.fileno()] if muxer else []

    def close(self) -> None:
        self.listener.close()
        try:
            os.unlink(self.uds_path)
        except OSError:
            pass
