"""A burst of Ethernet frames as switch ports hand them on: one byte array and each frame's
offset and length in it. A port's take fills it, the switch reads the MAC addresses of the
whole burst at once and picks which frames go where, and a port's deliver copies frames
out of it (the compiled receive path straight from the array into guest buffers).

Frames that ask for an offload (a checksum to finish, a packet to segment: net_offload.py)
carry their virtio-net header in `vnet`, a row of 10 bytes per frame (zeros for a complete
frame); a burst of complete frames, the usual case, has none.

Frames a port took stay valid until that port takes again: the compiled transmit path
reuses its array (devices/net_kernel.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

_ADDRS = np.arange(12)

# A burst's context for the compiled kernels (virtq/views_jit.py): the addresses of its
# arrays and the data's length. Frame count and whether headers are there go with it.
FX_DATA, FX_DATA_LEN, FX_OFFS, FX_LENS, FX_VNET = range(5)


def frames_ctx(data: np.ndarray, offs: np.ndarray, lens: np.ndarray,
               vnet: np.ndarray | None) -> np.ndarray:
    """The context of these arrays (C-contiguous: uint8, int64, int64, (n, 10) uint8); the
    caller keeps them while it is used."""
    return np.array([data.ctypes.data, len(data), offs.ctypes.data, lens.ctypes.data,
                     0 if vnet is None else vnet.ctypes.data], np.uint64)


class Frames:
    """Frame i is `data[offs[i] : offs[i] + lens[i]]`, its header `vnet[i]` if any."""

    __slots__ = ("_ctx", "data", "lens", "offs", "vnet")

    def __init__(self, data: np.ndarray, offs: np.ndarray, lens: np.ndarray,
                 vnet: np.ndarray | None = None, ctx: np.ndarray | None = None) -> None:
        self.data = data  # uint8
        self.offs = offs  # int64
        self.lens = lens  # int64
        self.vnet = vnet  # (n, 10) uint8, or None: every frame complete
        self._ctx = ctx  # `kernel_ctx`, if made: a port's arena makes it once for its
        # frames (whose offs, lens and vnet start where the arena's do). The arrays are
        # not replaced once it is made (nothing here does: `pick` makes new Frames).

    @classmethod
    def of(cls, frames: Iterable[bytes], headers: list[bytes] | None = None) -> Frames:
        """Frames copied from byte strings (into a writable array, as a port's are: the
        compiled kernels then have one version to load), with their virtio-net headers
        (10 bytes each) if any asks for an offload."""
        frames = list(frames)
        lens = np.fromiter(map(len, frames), np.int64, len(frames))
        offs = np.zeros(len(frames), np.int64)
        np.cumsum(lens[:-1], out=offs[1:])
        vnet = None
        if headers is not None and any(h[0] or h[1] for h in headers):
            vnet = np.frombuffer(bytearray(b"".join(headers)), np.uint8).reshape(-1, 10)
        return cls(np.frombuffer(bytearray(b"".join(frames)), np.uint8), offs, lens, vnet)

    def __len__(self) -> int:
        return len(self.lens)

    def __getitem__(self, i: int) -> bytes:
        o = int(self.offs[i])
        return self.data[o : o + int(self.lens[i])].tobytes()

    def __iter__(self) -> Iterator[bytes]:
        view = self.data.data
        for o, n in zip(self.offs.tolist(), self.lens.tolist(), strict=True):
            yield bytes(view[o : o + n])

    def pick(self, which: np.ndarray | slice) -> Frames:
        """The frames at indices (or where a boolean mask is true), in that order."""
        return Frames(self.data, self.offs[which], self.lens[which],
                      None if self.vnet is None else self.vnet[which])

    def kernel_ctx(self) -> np.ndarray:
        """The burst's context for the compiled kernels (`frames_ctx`), made on first use:
        its arrays are made C-contiguous first, and kept by this object."""
        if self._ctx is None:
            self.data = np.ascontiguousarray(self.data, np.uint8)
            self.offs = np.ascontiguousarray(self.offs, np.int64)
            self.lens = np.ascontiguousarray(self.lens, np.int64)
            if self.vnet is not None:
                self.vnet = np.ascontiguousarray(self.vnet, np.uint8)
            self._ctx = frames_ctx(self.data, self.offs, self.lens, self.vnet)
        return self._ctx

    def addresses(self) -> np.ndarray:
        """Each frame's destination and source MAC: an (n, 12) uint8 array (every frame a
        port hands on is at least an Ethernet header long)."""
        return self.data[self.offs[:, None] + _ADDRS]

    def nbytes(self) -> int:
        return int(self.lens.sum())


EMPTY = Frames(np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
