"""The base both protocol layers (vhost-user, vfio-user) use for payloads with one fixed
struct layout. Each layer says how a wrong size is reported (its own error types)."""

from __future__ import annotations

import struct
from typing import Any, ClassVar


class FixedStruct:
    """A frozen dataclass whose fields, in declaration order, are `FMT`'s fields."""

    FMT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.FMT.pack(*self.__dict__.values())

    @classmethod
    def unpack(cls, data: bytes) -> Any:
        cls.check_size(data, cls.FMT.size)
        return cls(*cls.FMT.unpack(data))

    @classmethod
    def check_size(cls, data: bytes, size: int) -> None:
        """Raise the layer's error unless `data` is exactly `size` bytes."""
        raise NotImplementedError
