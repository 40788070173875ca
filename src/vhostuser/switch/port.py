"""What every switch port has: a name, counters, and a way to take frames out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Counters:
    """Seen from the switch: `rx` is what the port sent into the switch, `tx` what the
    switch delivered to it; drops are counted by reason."""

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {"rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
                "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
                "drops": dict(self.drops)}


class Port(ABC):
    def __init__(self, name: str) -> None:
        self.name = name
        self.counters = Counters()

    @abstractmethod
    def deliver(self, frames: list[bytes]) -> None:
        """Send `frames` out of this port (dropping, and counting, what cannot go)."""

    def disconnect(self) -> None:  # noqa: B027 - a port with no peer has nothing to end
        """End this port's connection to its peer (after an internal error on its path)."""

    def status(self) -> dict[str, object]:
        return {"name": self.name, **self.counters.as_dict()}
