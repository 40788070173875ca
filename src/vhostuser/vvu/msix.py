"""The MSI-X table and pending-bit array of a PCI function (PCI Local Bus 3.0 §6.8.2), as a
register model with no I/O.

Each vector has a 16-byte table entry: le32 message address low, le32 message address
high, le32 message data, le32 vector control (bit 0: mask; the other bits read as 0). The
PBA has one bit per vector, in little-endian qwords. Both must be accessed with aligned
dword or qword accesses; anything else raises `PciAccessError`. The PBA is read-only:
writes are accepted and ignored, as the spec only says software must not write it.

Delivery: `fire(vector, signal)` calls `signal(vector)` when the message may be sent (MSI-X
enabled, function not masked, vector not masked), else it sets the vector's pending bit and
keeps `signal`. The pending message is sent, and the bit cleared, as soon as the vector
becomes deliverable: the driver unmasks the vector, sets MSI-X Enable or clears Function
Mask. The capability's message-control bits live in `PciConfig`, which passes them on with
`set_control`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

MSIX_ENTRY_SIZE = 16
MSIX_MAX_VECTORS = 2048
VECTOR_CTRL_MASKBIT = 1

_ADDR_LO, _ADDR_HI, _DATA, _CTRL = range(4)
_DWORD = struct.Struct("<I")

Signal = Callable[[int], None]


class PciAccessError(Exception):
    """An access the register model refuses: bad size, alignment or range."""


def check_access(what: str, offset: int, size: int, limit: int, sizes: tuple[int, ...],
                 *, aligned: bool) -> None:
    """Raise PciAccessError unless `size` is one of `sizes` and [offset, offset + size)
    lies inside [0, limit) (and is naturally aligned if `aligned`)."""
    if size not in sizes:
        raise PciAccessError(f"{what}: access size {size} (allowed: {sizes})")
    if offset < 0 or offset + size > limit:
        raise PciAccessError(f"{what}: access [{offset:#x}, +{size}) outside [0, {limit:#x})")
    if aligned and offset % size:
        raise PciAccessError(f"{what}: unaligned {size}-byte access at {offset:#x}")


class MsixTable:
    """The table and PBA of `nvec` vectors. After reset every vector is masked and its
    entry zero; MSI-X is disabled until `set_control` says otherwise."""

    def __init__(self, nvec: int) -> None:
        if not 1 <= nvec <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X table size {nvec} not in 1..{MSIX_MAX_VECTORS}")
        self.nvec = nvec
        self._entries = [[0, 0, 0, VECTOR_CTRL_MASKBIT] for _ in range(nvec)]
        self._pending: dict[int, Signal] = {}
        self.enabled = False
        self.function_masked = False

    @property
    def table_size(self) -> int:
        """Bytes of the table region."""
        return self.nvec * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        """Bytes of the PBA region (whole qwords)."""
        return (self.nvec + 63) // 64 * 8

    def reset(self) -> None:
        for entry in self._entries:
            entry[:] = [0, 0, 0, VECTOR_CTRL_MASKBIT]
        self._pending.clear()
        self.enabled = False
        self.function_masked = False

    # ---------------------------------------------------------------- per-vector state

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self.nvec:
            raise ValueError(f"MSI-X vector {vector} not in 0..{self.nvec - 1}")

    def masked(self, vector: int) -> bool:
        """The vector's own mask bit (the function mask and enable are not included)."""
        self._check_vector(vector)
        return bool(self._entries[vector][_CTRL] & VECTOR_CTRL_MASKBIT)

    def pending(self, vector: int) -> bool:
        self._check_vector(vector)
        return vector in self._pending

    def message(self, vector: int) -> tuple[int, int]:
        """The programmed (address, data) of a vector."""
        self._check_vector(vector)
        lo, hi, data, _ = self._entries[vector]
        return hi << 32 | lo, data

    def deliverable(self, vector: int) -> bool:
        return self.enabled and not self.function_masked and not self.masked(vector)

    # ---------------------------------------------------------------- delivery

    def fire(self, vector: int, signal: Signal) -> bool:
        """Send `vector` now (`signal(vector)`) or mark it pending; True if sent."""
        self._check_vector(vector)
        if self.deliverable(vector):
            signal(vector)
            return True
        self._pending[vector] = signal
        return False

    def set_control(self, enabled: bool, function_masked: bool) -> None:
        """The capability's MSI-X Enable and Function Mask bits changed."""
        self.enabled = enabled
        self.function_masked = function_masked
        for vector in sorted(self._pending):
            self._flush(vector)

    def _flush(self, vector: int) -> None:
        if vector in self._pending and self.deliverable(vector):
            self._pending.pop(vector)(vector)

    # ---------------------------------------------------------------- table region

    def read(self, offset: int, size: int) -> bytes:
        check_access("MSI-X table", offset, size, self.table_size, (4, 8), aligned=True)
        out = bytearray()
        for dw in range(offset // 4, (offset + size) // 4):
            out += _DWORD.pack(self._entries[dw // 4][dw % 4])
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        check_access("MSI-X table", offset, len(data), self.table_size, (4, 8), aligned=True)
        for i in range(0, len(data), 4):
            dw = (offset + i) // 4
            vector, field = divmod(dw, 4)
            (value,) = _DWORD.unpack_from(data, i)
            if field == _ADDR_LO:
                value &= ~3  # the address is dword aligned: bits 1:0 read as 0
            elif field == _CTRL:
                value &= VECTOR_CTRL_MASKBIT
            self._entries[vector][field] = value
            if field == _CTRL:
                self._flush(vector)

    # ---------------------------------------------------------------- PBA region

    def read_pba(self, offset: int, size: int) -> bytes:
        check_access("MSI-X PBA", offset, size, self.pba_size, (4, 8), aligned=True)
        bits = 0
        for vector in self._pending:
            bits |= 1 << vector
        return (bits >> (8 * offset) & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def write_pba(self, offset: int, data: bytes) -> None:
        """Checked like a read, then ignored: the PBA is read-only."""
        check_access("MSI-X PBA", offset, len(data), self.pba_size, (4, 8), aligned=True)
