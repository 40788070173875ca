"""The VERSION handshake: the payload (major, minor, then optional NUL-terminated JSON
capabilities), the capability objects with the spec's defaults filled in by
`Capabilities.limits`, and `negotiate_version`, which builds a server's reply to a
client's proposal.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from typing import ClassVar

from .constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES,
    VERSION_MAJOR,
    VERSION_MINOR,
)
from .errors import BadPayload, Unsupported
from .payloads import _at_least


@dataclass(frozen=True)
class TwinSocket:
    supported: bool = False
    fd_index: int | None = None  # only in a reply


@dataclass(frozen=True)
class MigrationCaps:
    """QEMU's "migration" capability object (not in the spec's table)."""

    pgsize: int | None = None
    max_bitmap_size: int | None = None


@dataclass(frozen=True)
class Limits:
    """Capabilities with the spec's defaults filled in."""

    max_msg_fds: int
    max_data_xfer_size: int
    max_dma_maps: int
    pgsizes: int
    write_multiple: bool
    twin_socket: bool


def _json_uint(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadPayload(f"VERSION: {where} must be a non-negative integer, got {value!r}")
    return value


def _json_bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise BadPayload(f"VERSION: {where} must be a boolean, got {value!r}")
    return value


def _json_obj(where: str, value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise BadPayload(f"VERSION: {where} must be an object, got {value!r}")
    return value


@dataclass(frozen=True)
class Capabilities:
    """The ``capabilities`` object of VERSION. None means "absent" (the default applies);
    unknown members are kept, as JSON text, in ``extra``."""

    max_msg_fds: int | None = None
    max_data_xfer_size: int | None = None
    max_dma_maps: int | None = None
    pgsizes: int | None = None
    twin_socket: TwinSocket | None = None
    write_multiple: bool | None = None
    migration: MigrationCaps | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def limits(self) -> Limits:
        return Limits(
            max_msg_fds=_pick(self.max_msg_fds, DEFAULT_MAX_MSG_FDS),
            max_data_xfer_size=_pick(self.max_data_xfer_size, DEFAULT_MAX_DATA_XFER_SIZE),
            max_dma_maps=_pick(self.max_dma_maps, DEFAULT_MAX_DMA_MAPS),
            pgsizes=_pick(self.pgsizes, DEFAULT_PGSIZES),
            write_multiple=bool(self.write_multiple),
            twin_socket=bool(self.twin_socket and self.twin_socket.supported),
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            if (v := getattr(self, name)) is not None:
                out[name] = v
        if self.twin_socket is not None:
            twin: dict[str, object] = {"supported": self.twin_socket.supported}
            if self.twin_socket.fd_index is not None:
                twin["fd_index"] = self.twin_socket.fd_index
            out["twin_socket"] = twin
        if self.write_multiple is not None:
            out["write_multiple"] = self.write_multiple
        if self.migration is not None:
            mig: dict[str, object] = {}
            if self.migration.pgsize is not None:
                mig["pgsize"] = self.migration.pgsize
            if self.migration.max_bitmap_size is not None:
                mig["max_bitmap_size"] = self.migration.max_bitmap_size
            out["migration"] = mig
        for name, text in self.extra:
            out[name] = json.loads(text)
        return out

    @classmethod
    def from_json(cls, obj: object) -> Capabilities:
        caps = dict(_json_obj("capabilities", obj))
        kw: dict[str, object] = {}
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            if name in caps:
                kw[name] = _json_uint(name, caps.pop(name))
        if "twin_socket" in caps:
            twin = dict(_json_obj("twin_socket", caps.pop("twin_socket")))
            supported = _json_bool("twin_socket.supported", twin.get("supported", False))
            fd_index = twin.get("fd_index")
            kw["twin_socket"] = TwinSocket(
                supported, None if fd_index is None else _json_uint("fd_index", fd_index)
            )
        if "write_multiple" in caps:
            kw["write_multiple"] = _json_bool("write_multiple", caps.pop("write_multiple"))
        if "migration" in caps:
            mig = _json_obj("migration", caps.pop("migration"))
            kw["migration"] = MigrationCaps(
                *(
                    None if mig.get(k) is None else _json_uint(f"migration.{k}", mig[k])
                    for k in ("pgsize", "max_bitmap_size")
                )
            )
        kw["extra"] = tuple((k, json.dumps(v, separators=(",", ":"))) for k, v in caps.items())
        return cls(**kw)  # type: ignore[arg-type]


def _pick(value: int | None, default: int) -> int:
    return default if value is None else value


@dataclass(frozen=True)
class Version:
    """VERSION request and reply: major, minor, then optional NUL-terminated JSON
    ``{"capabilities": {...}}``. ``capabilities`` None means no JSON at all (QEMU rejects
    such a reply: a server should always send at least ``Capabilities()``)."""

    major: int
    minor: int
    capabilities: Capabilities | None = None
    extra: tuple[tuple[str, str], ...] = ()  # unknown top-level members (JSON text)
    HEAD: ClassVar[struct.Struct] = struct.Struct("<HH")

    def json_text(self) -> str | None:
        if self.capabilities is None and not self.extra:
            return None
        obj: dict[str, object] = {}
        if self.capabilities is not None:
            obj["capabilities"] = self.capabilities.to_json()
        for name, text in self.extra:
            obj[name] = json.loads(text)
        return json.dumps(obj, separators=(",", ":"))

    def pack(self) -> bytes:
        text = self.json_text()
        data = b"" if text is None else text.encode() + b"\0"
        return self.HEAD.pack(self.major, self.minor) + data

    @classmethod
    def unpack(cls, data: bytes) -> Version:
        _at_least(cls, data, cls.HEAD.size)
        major, minor = cls.HEAD.unpack_from(data)
        raw = bytes(data[cls.HEAD.size :])
        if not raw:
            return cls(major, minor)
        if raw[-1] != 0:
            raise BadPayload("VERSION: capability data is not NUL-terminated")
        if 0 in raw[:-1]:
            raise BadPayload("VERSION: NUL byte inside the capability data")
        try:
            obj = json.loads(raw[:-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadPayload(f"VERSION: capability data is not UTF-8 JSON: {e}") from e
        top = dict(_json_obj("version data", obj))
        caps = Capabilities.from_json(top.pop("capabilities")) if "capabilities" in top else None
        extra = tuple((k, json.dumps(v, separators=(",", ":"))) for k, v in top.items())
        return cls(major, minor, caps, extra)


def negotiate_version(
    proposal: Version, caps: Capabilities, *, major: int = VERSION_MAJOR, minor: int = VERSION_MINOR
) -> Version:
    """The server's VERSION reply to ``proposal``: same major (else `Unsupported`: the
    spec says the server closes the connection), the lower minor, and the members of
    ``caps`` that the client proposed too (the reply must be a subset). Twin-socket mode
    is only kept if the client supports it. Always carries a capabilities object."""
    if proposal.major != major:
        raise Unsupported(f"VERSION: client major {proposal.major}, server speaks {major}")
    offered = proposal.capabilities or Capabilities()
    kept: dict[str, object] = {}
    for name in (
        "max_msg_fds",
        "max_data_xfer_size",
        "max_dma_maps",
        "pgsizes",
        "write_multiple",
        "migration",
    ):
        if getattr(offered, name) is not None and getattr(caps, name) is not None:
            kept[name] = getattr(caps, name)
    if kept.get("write_multiple") and not offered.write_multiple:
        kept["write_multiple"] = False
    if caps.twin_socket is not None and offered.twin_socket and offered.twin_socket.supported:
        kept["twin_socket"] = caps.twin_socket
    return Version(major, min(minor, proposal.minor), replace(Capabilities(), **kept))  # type: ignore[arg-type]
