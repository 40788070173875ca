"""What a device implements. Devices see chains of guest buffers and config bytes only:
never sockets, fds or the transport."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from ..virtq.split import Chain


class QueueHandler(Protocol):
    def handle(self, chains: list[Chain]) -> list[int]:
        """Serve a batch of chains in order; return the bytes written into each."""
        ...


class ConfigError(Exception):
    """A GET/SET_CONFIG the device refuses (the front-end gets a NACK or an empty reply)."""


class Device(ABC):
    """A virtio device type served by the engine."""

    name: str = "device"
    num_queues: int = 1
    max_queue_size: int = 1024
    protocol_features: int = 0  # device-specific extras (e.g. CONFIG, RARP, MTU)

    @abstractmethod
    def features(self) -> int:
        """Device-type feature bits offered (transport bits are the engine's)."""

    def set_features(self, features: int) -> None:  # noqa: B027 - optional hook
        """The negotiated features (all bits); called before any queue starts."""

    def queue_num(self) -> int:
        """What GET_QUEUE_NUM reports (net devices report queue pairs)."""
        return self.num_queues

    def get_config(self) -> bytes:
        return b""

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise ConfigError("device config space is read-only")

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (offered with the MTU protocol feature)."""
        raise ConfigError("this device has no MTU")

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: announce `mac` (offered with the RARP protocol feature)."""
        raise ConfigError("this device does not send RARP announcements")

    def config_changed(self) -> bool:
        """Whether the config space changed on the device's own account since last asked
        (e.g. a resized disk: the device takes the change as it answers); polled about once
        a second while the front-end is quiet and has given a back-end channel."""
        return False

    def reset(self) -> None:  # noqa: B027 - optional hook
        """RESET_DEVICE, or the front-end disconnected."""

    @abstractmethod
    def queue_handler(self, index: int) -> QueueHandler:
        """A handler for queue `index`; called in the worker process that serves it."""
