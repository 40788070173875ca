"""What every switch port has: a name, counters, and a way to take frames out."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..devices.net_frames import Frames
from ..devices.net_rings import Counters


class Port(ABC):
    def __init__(self, name: str) -> None:
        self.name = name
        self.counters = Counters()

    @abstractmethod
    def deliver(self, frames: Frames) -> None:
        """Send `frames` out of this port (dropping, and counting, what cannot go)."""

    def disconnect(self) -> None:  # noqa: B027 - a port with no peer has nothing to end
        """End this port's connection to its peer (after an internal error on its path)."""

    def status(self) -> dict[str, object]:
        return {"name": self.name, **self.counters.as_dict()}
