"""Encode, decode and validate vhost-user messages. No I/O here.

A reader takes the 12-byte header (with any fds), calls `decode_header`, reads
exactly `header.size` more bytes and calls `decode_request` or `decode_reply`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from . import payloads as p
from .constants import (
    HEADER_SIZE,
    KNOWN_HEADER_FLAGS,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    BackendReq,
    FrontendReq,
    HeaderFlag,
    ProtocolFeature,
)
from .errors import (
    BadFdCount,
    BadVersion,
    PayloadTooLarge,
    ProtocolError,
    ReservedFlags,
    UnexpectedReply,
    UnknownRequest,
)

_HEADER = struct.Struct("<III")


class Fds(Enum):
    """How many file descriptors a message carries."""

    NONE = auto()
    ONE = auto()
    PER_REGION = auto()  # SET_MEM_TABLE: one per region
    VRING = auto()  # one unless the NOFD bit is set in the payload
    TOLERATED = auto()  # REM_MEM_REG: none expected, one tolerated (and closed)
    OPTIONAL = auto()  # zero or one (SET_DEVICE_STATE_FD reply)


class Reply(Enum):
    """When the receiver of a request answers it."""

    ACK = auto()  # only when REPLY_ACK is negotiated and NEED_REPLY is set
    ALWAYS = auto()
    IF_LOG_SHMFD = auto()  # SET_LOG_BASE


@dataclass(frozen=True)
class Spec:
    payload: Any  # a payload class (its unpack makes one from bytes)
    reply: Any = None  # the reply's payload class; None: answered only by an ack (u64)
    fds: Fds = Fds.NONE
    reply_fds: Fds = Fds.NONE
    when: Reply = Reply.ACK


F = FrontendReq
B = BackendReq
FRONTEND_SPECS: dict[int, Spec] = {
    F.GET_FEATURES: Spec(p.Empty, p.U64, when=Reply.ALWAYS),
    F.SET_FEATURES: Spec(p.U64),
    F.SET_OWNER: Spec(p.Empty),
    F.RESET_OWNER: Spec(p.Empty),
    F.SET_MEM_TABLE: Spec(p.MemTable, fds=Fds.PER_REGION),
    F.SET_LOG_BASE: Spec(p.LogBase, p.U64, Fds.ONE, when=Reply.IF_LOG_SHMFD),
    F.SET_LOG_FD: Spec(p.Empty, fds=Fds.ONE),
    F.SET_VRING_NUM: Spec(p.VringState),
    F.SET_VRING_ADDR: Spec(p.VringAddr),
    F.SET_VRING_BASE: Spec(p.VringState),
    F.GET_VRING_BASE: Spec(p.VringState, p.VringState, when=Reply.ALWAYS),
    F.SET_VRING_KICK: Spec(p.VringFile, fds=Fds.VRING),
    F.SET_VRING_CALL: Spec(p.VringFile, fds=Fds.VRING),
    F.SET_VRING_ERR: Spec(p.VringFile, fds=Fds.VRING),
    F.GET_PROTOCOL_FEATURES: Spec(p.Empty, p.U64, when=Reply.ALWAYS),
    F.SET_PROTOCOL_FEATURES: Spec(p.U64),
    F.GET_QUEUE_NUM: Spec(p.Empty, p.U64, when=Reply.ALWAYS),
    F.SET_VRING_ENABLE: Spec(p.VringState),
    F.SEND_RARP: Spec(p.U64),
    F.NET_SET_MTU: Spec(p.U64),
    F.SET_BACKEND_REQ_FD: Spec(p.Empty, fds=Fds.ONE),
    F.IOTLB_MSG: Spec(p.IotlbMsg, p.U64, when=Reply.ALWAYS),
    F.SET_VRING_ENDIAN: Spec(p.VringState),
    F.GET_CONFIG: Spec(p.Config, p.Config, when=Reply.ALWAYS),
    F.SET_CONFIG: Spec(p.Config),
    F.CREATE_CRYPTO_SESSION: Spec(p.Raw, p.Raw, when=Reply.ALWAYS),
    F.CLOSE_CRYPTO_SESSION: Spec(p.U64),
    F.POSTCOPY_ADVISE: Spec(p.Empty, p.Empty, reply_fds=Fds.ONE, when=Reply.ALWAYS),
    F.POSTCOPY_LISTEN: Spec(p.Empty),
    F.POSTCOPY_END: Spec(p.Empty, p.U64, when=Reply.ALWAYS),
    F.GET_INFLIGHT_FD: Spec(p.Inflight, p.Inflight, reply_fds=Fds.OPTIONAL, when=Reply.ALWAYS),
    F.SET_INFLIGHT_FD: Spec(p.Inflight, fds=Fds.ONE),
    F.GPU_SET_SOCKET: Spec(p.Empty, fds=Fds.ONE),
    F.RESET_DEVICE: Spec(p.Empty),
    F.VRING_KICK: Spec(p.VringState),
    F.GET_MAX_MEM_SLOTS: Spec(p.Empty, p.U64, when=Reply.ALWAYS),
    F.ADD_MEM_REG: Spec(p.SingleMemRegion, fds=Fds.ONE),
    F.REM_MEM_REG: Spec(p.SingleMemRegion, fds=Fds.TOLERATED),
    F.SET_STATUS: Spec(p.U64),
    F.GET_STATUS: Spec(p.Empty, p.U64, when=Reply.ALWAYS),
    F.GET_SHARED_OBJECT: Spec(p.SharedObject, p.U64, reply_fds=Fds.ONE, when=Reply.ALWAYS),
    F.SET_DEVICE_STATE_FD: Spec(p.DeviceStateParams, p.U64, Fds.ONE, Fds.OPTIONAL, Reply.ALWAYS),
    F.CHECK_DEVICE_STATE: Spec(p.Empty, p.U64, when=Reply.ALWAYS),
    F.GET_SHMEM_CONFIG: Spec(p.Empty, p.ShmemConfig, when=Reply.ALWAYS),
}

BACKEND_SPECS: dict[int, Spec] = {
    B.IOTLB_MSG: Spec(p.IotlbMsg),
    B.CONFIG_CHANGE_MSG: Spec(p.Empty),
    B.VRING_HOST_NOTIFIER_MSG: Spec(p.VringArea, fds=Fds.VRING),
    B.VRING_CALL: Spec(p.VringState),
    B.VRING_ERR: Spec(p.VringState),
    B.SHARED_OBJECT_ADD: Spec(p.SharedObject),
    B.SHARED_OBJECT_REMOVE: Spec(p.SharedObject),
    B.SHARED_OBJECT_LOOKUP: Spec(p.SharedObject, p.U64, reply_fds=Fds.ONE, when=Reply.ALWAYS),
    B.SHMEM_MAP: Spec(p.ShmemMap, fds=Fds.ONE),
    B.SHMEM_UNMAP: Spec(p.ShmemMap),
}


class Channel(Enum):
    """Which request namespace a socket carries."""

    FRONTEND = auto()  # the main socket: front-end requests, back-end replies
    BACKEND = auto()  # the SET_BACKEND_REQ_FD socket: back-end requests

    @property
    def specs(self) -> dict[int, Spec]:
        return FRONTEND_SPECS if self is Channel.FRONTEND else BACKEND_SPECS

    def name_of(self, request: int) -> str:
        enum = FrontendReq if self is Channel.FRONTEND else BackendReq
        try:
            return enum(request).name
        except ValueError:
            return f"request {request}"


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)


@dataclass(frozen=True)
class Message:
    request: int
    payload: p.Payload
    flags: int = VERSION
    fds: tuple[int, ...] = field(default=(), compare=False)  # sent with it (the sender's)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)


def decode_header(data: bytes | memoryview) -> Header:
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"truncated header: {len(data)} of {HEADER_SIZE} bytes")
    request, flags, size = _HEADER.unpack(data)
    if flags & HeaderFlag.VERSION_MASK != VERSION:
        raise BadVersion(f"version {flags & HeaderFlag.VERSION_MASK} (flags {flags:#x}), want 1")
    if flags & ~KNOWN_HEADER_FLAGS:
        raise ReservedFlags(f"reserved header flags set: {flags & ~KNOWN_HEADER_FLAGS:#x}")
    if size > MAX_PAYLOAD:
        raise PayloadTooLarge(f"payload size {size} exceeds {MAX_PAYLOAD}")
    return Header(request, flags, size)


def _spec(channel: Channel, request: int) -> Spec:
    spec = channel.specs.get(request)
    if spec is None:
        raise UnknownRequest(f"unknown {channel.name.lower()} request {request}")
    return spec


def _allowed_fds(rule: Fds, payload: p.Payload) -> tuple[int, ...]:
    if rule is Fds.PER_REGION:
        assert isinstance(payload, p.MemTable)
        want: tuple[int, ...] = (len(payload.regions),)
    elif rule is Fds.ONE:
        want = (1,)
    elif rule is Fds.VRING:
        want = (0,) if payload.nofd else (1,)  # type: ignore[attr-defined]
    elif rule in (Fds.TOLERATED, Fds.OPTIONAL):
        want = (0, 1)
    else:
        want = (0,)
    return want


def _check_fds(rule: Fds, payload: p.Payload, nfds: int, what: str) -> None:
    if nfds > MAX_FDS:
        raise BadFdCount(f"{what}: {nfds} fds, at most {MAX_FDS}")
    want = _allowed_fds(rule, payload)
    if nfds not in want:
        raise BadFdCount(f"{what} carries {nfds} fds, expected {' or '.join(map(str, want))}")


def decode_request(channel: Channel, header: Header, body: bytes,
                   nfds: int | None = 0) -> Message:
    """Validate and decode a request (REPLY clear) received on `channel`. `nfds=None`:
    the fds were consumed on the way (virtio-vhost-user), so their count is not checked;
    `expected_fds` tells how many there were."""
    spec = _spec(channel, header.request)
    what = channel.name_of(header.request)
    if header.is_reply:
        raise UnexpectedReply(f"{what}: REPLY flag set on a request")
    if len(body) != header.size:
        raise PayloadTooLarge(f"{what}: body is {len(body)} bytes, header says {header.size}")
    payload = spec.payload.unpack(body)
    if nfds is not None:
        _check_fds(spec.fds, payload, nfds, what)
    return Message(header.request, payload, header.flags)


def expected_fds(channel: Channel, msg: Message) -> int:
    """How many fds request `msg` carries (the smallest count its rule allows)."""
    return _allowed_fds(_spec(channel, msg.request).fds, msg.payload)[0]


def decode_reply(
    channel: Channel, request: int, header: Header, body: bytes, nfds: int = 0
) -> Message:
    """Validate and decode the reply to `request` sent on `channel`."""
    spec = _spec(channel, request)
    what = channel.name_of(request)
    if not header.is_reply:
        raise UnexpectedReply(f"{what}: expected a reply, REPLY flag clear")
    if header.request != request:
        raise UnexpectedReply(f"reply to {channel.name_of(header.request)}, expected {what}")
    kind = spec.reply or p.U64
    payload = kind.unpack(body)
    _check_fds(spec.reply_fds if spec.reply else Fds.NONE, payload, nfds, f"{what} reply")
    return Message(request, payload, header.flags)


def expects_reply(channel: Channel, msg: Message, protocol_features: int) -> bool:
    """Whether the receiver of request `msg` must answer it."""
    spec = _spec(channel, msg.request)
    if spec.when is Reply.ALWAYS:
        return True
    if spec.when is Reply.IF_LOG_SHMFD and protocol_features & ProtocolFeature.LOG_SHMFD:
        return True
    return bool(msg.need_reply and protocol_features & ProtocolFeature.REPLY_ACK)


def has_own_reply(channel: Channel, msg: Message, protocol_features: int) -> bool:
    """Whether `msg` is answered by a reply payload of its own rather than an ack."""
    spec = _spec(channel, msg.request)
    return spec.when is Reply.ALWAYS or (
        spec.when is Reply.IF_LOG_SHMFD and bool(protocol_features & ProtocolFeature.LOG_SHMFD)
    )


def encode(msg: Message) -> bytes:
    body = msg.payload.pack()
    if len(body) > MAX_PAYLOAD:
        raise PayloadTooLarge(f"payload of {len(body)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(msg.request, msg.flags, len(body)) + body


def encode_raw(header: Header, body: bytes) -> bytes:
    """A message as it came, header and body (relayed without decoding its payload)."""
    return _HEADER.pack(header.request, header.flags, header.size) + body


def reply_to(request: Message, payload: p.Payload, fds: tuple[int, ...] = ()) -> Message:
    return Message(request.request, payload, VERSION | HeaderFlag.REPLY, fds)


def request(code: int, payload: p.Payload | None = None, need_reply: bool = False) -> Message:
    flags = VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
    return Message(code, payload if payload is not None else p.Empty(), flags)
