"""The switch's learned stations: MAC address -> (port index, expiry time), in numpy arrays
that the compiled forwarding kernel (route_jit.py) and Python share.

Open addressing with linear probing over 2^17 slots, at most half of them used (so a
probe always ends at a free slot), removal by backward shift (no tombstones). A key is the
48-bit address, most significant byte first, with bit 48 set (0 marks a free slot). The
hash is multiply-shift with a random odd multiplier drawn for each table: a guest cannot
choose source addresses that pile up in one run of slots (with a fixed multiplier it can,
and every look-up then walks the run); route_jit.py computes the same.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np

MAX_MACS = 65536
SLOTS_LOG2 = 17  # 2 * MAX_MACS slots
_MASK64 = (1 << 64) - 1
PRESENT = 1 << 48
AGE_AT_ONCE = 4096  # expired stations removed per `age` call at most (the rest: the next)


def key_of(mac: bytes) -> int:
    return int.from_bytes(mac, "big") | PRESENT


class MacTable:
    def __init__(self, limit: int = MAX_MACS) -> None:
        if not 0 < limit <= (1 << SLOTS_LOG2) // 2:
            raise ValueError(f"a MAC table holds 1..{(1 << SLOTS_LOG2) // 2} stations")
        self.limit = limit
        self.keys = np.zeros(1 << SLOTS_LOG2, np.uint64)
        self.ports = np.zeros(1 << SLOTS_LOG2, np.int32)
        self.expiry = np.zeros(1 << SLOTS_LOG2, np.float64)
        self.count = np.zeros(1, np.int64)  # an array: the kernel updates it in place
        self.multiplier = secrets.randbits(64) | 1
        # the compiled forwarding's view of it (route.py): the arrays' addresses, and
        # `multiplier` and `limit` copied (neither may change once it is made)
        self.kernel_ctx: Any = None

    def home(self, key: int) -> int:
        """A key's first slot."""
        return ((key * self.multiplier) & _MASK64) >> (64 - SLOTS_LOG2)

    def __len__(self) -> int:
        return int(self.count[0])

    def _slot(self, key: int) -> int:
        """The slot holding `key`, or the free slot where it would go."""
        mask = len(self.keys) - 1
        i = self.home(key)
        keys = self.keys
        while True:
            k = int(keys[i])
            if k == key or k == 0:
                return i
            i = (i + 1) & mask

    def get(self, mac: bytes) -> tuple[int, float] | None:
        """(port index, expiry) of a station, expired or not; None if not known."""
        i = self._slot(key_of(mac))
        if not self.keys[i]:
            return None
        return int(self.ports[i]), float(self.expiry[i])

    def learn(self, mac: bytes, port: int, expiry: float) -> bool:
        """Record a station (False: the table is full and it is new)."""
        key = key_of(mac)
        i = self._slot(key)
        if not self.keys[i]:
            if self.count[0] >= self.limit:
                return False
            self.keys[i] = key
            self.count[0] += 1
        self.ports[i] = port
        self.expiry[i] = expiry
        return True

    def items(self) -> Iterator[tuple[bytes, int, float]]:
        for i in np.flatnonzero(self.keys).tolist():
            mac = (int(self.keys[i]) & (PRESENT - 1)).to_bytes(6, "big")
            yield mac, int(self.ports[i]), float(self.expiry[i])

    def age(self, now: float) -> int:
        """Forget stations that expired before `now` (AGE_AT_ONCE at most: a flood of
        them costs the loop a bounded pause each second; until removed, an expired one
        is unknown to look-ups anyway); returns how many."""
        gone = self.keys[(self.keys != 0) & (self.expiry < now)][:AGE_AT_ONCE].tolist()
        for key in gone:
            self._remove(self._slot(int(key)))
        return len(gone)

    def _remove(self, i: int) -> None:
        """Empty slot `i`, moving back the entries after it that probed past it."""
        keys, mask = self.keys, len(self.keys) - 1
        j = i
        while True:
            j = (j + 1) & mask
            k = int(keys[j])
            if not k:
                break
            h = self.home(k)
            # the entry at j stays if its home lies cyclically in (i, j]
            if (i < j and i < h <= j) or (j < i and (h > i or h <= j)):
                continue
            keys[i], self.ports[i], self.expiry[i] = keys[j], self.ports[j], self.expiry[j]
            i = j
        keys[i] = 0
        self.count[0] -= 1
