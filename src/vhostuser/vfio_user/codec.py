"""Encode, decode and validate vfio-user messages; no I/O here. `Header` and
`decode_header` handle the 16-byte header; `Message` and `encode` a whole message;
`command`, `reply_to` and `error_reply` build one; `decode_command` and `decode_reply`
turn a header and its body into a checked `Message` by the rules in `specs.SPECS`; and
`check_supported` refuses what this project does not implement.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .constants import (
    DATA_OVERHEAD,
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    KNOWN_HEADER_FLAGS,
    Command,
    DmaUnmapFlag,
    HeaderFlag,
    MsgType,
    Peer,
)
from .errors import (
    BadFdCount,
    BadFlags,
    BadPayloadSize,
    BadSize,
    Truncated,
    UnexpectedReply,
    UnknownCommand,
    Unsupported,
    VfioUserError,
    WrongDirection,
)
from .payloads import DmaUnmap, Empty, Payload
from .specs import SPECS, _argsz_covers

# --------------------------------------------------------------------------- header


_HEADER = struct.Struct("<HHIII")


@dataclass(frozen=True)
class Header:
    msg_id: int
    command: int
    size: int  # the whole message, header included
    flags: int
    error: int = 0

    @property
    def body_size(self) -> int:
        return self.size - HEADER_SIZE

    @property
    def is_reply(self) -> bool:
        return int(self.flags & HeaderFlag.TYPE_MASK) == MsgType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & HeaderFlag.ERROR)

    def pack(self) -> bytes:
        return _HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)


def command_name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return f"command {cmd}"


def decode_header(data: bytes | memoryview, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Header:
    """Validate the 16-byte header. ``max_size`` bounds the whole message (see
    `max_message_size`)."""
    if len(data) < HEADER_SIZE:
        raise Truncated(f"truncated header: {len(data)} of {HEADER_SIZE} bytes")
    if len(data) > HEADER_SIZE:
        raise BadSize(f"header must be {HEADER_SIZE} bytes, got {len(data)}")
    h = Header(*_HEADER.unpack(data))
    what = f"{command_name(h.command)} (id {h.msg_id})"
    if h.size < HEADER_SIZE:
        raise BadSize(f"{what}: message size {h.size} is smaller than the header", h)
    if h.size > max_size:
        raise BadSize(f"{what}: message size {h.size} exceeds {max_size}", h)
    kind = int(h.flags & HeaderFlag.TYPE_MASK)
    if kind not in (MsgType.COMMAND, MsgType.REPLY):
        raise BadFlags(f"{what}: unknown message type {kind} (flags {h.flags:#x})", h)
    if h.flags & ~KNOWN_HEADER_FLAGS:
        raise BadFlags(f"{what}: reserved header flags set: {h.flags & ~KNOWN_HEADER_FLAGS:#x}", h)
    if kind == MsgType.REPLY and h.flags & HeaderFlag.NO_REPLY:
        raise BadFlags(f"{what}: NO_REPLY set on a reply", h)
    if kind == MsgType.COMMAND and h.flags & HeaderFlag.ERROR:
        raise BadFlags(f"{what}: ERROR set on a command", h)
    return h


def max_message_size(max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE) -> int:
    """A bound on any message when data transfers are at most ``max_data_xfer_size``."""
    return HEADER_SIZE + DATA_OVERHEAD + max_data_xfer_size + 65536


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    msg_id: int
    command: int
    payload: Payload
    flags: int = MsgType.COMMAND
    error: int = 0  # errno of an error reply

    @property
    def is_reply(self) -> bool:
        return int(self.flags & HeaderFlag.TYPE_MASK) == MsgType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & HeaderFlag.ERROR)

    @property
    def name(self) -> str:
        return command_name(self.command)


def encode(msg: Message) -> bytes:
    body = msg.payload.pack()
    if msg.is_error and body:
        raise ValueError("an error reply carries no payload")
    return (
        _HEADER.pack(msg.msg_id, msg.command, HEADER_SIZE + len(body), msg.flags, msg.error) + body
    )


def command(
    cmd: int, payload: Payload | None = None, msg_id: int = 0, no_reply: bool = False
) -> Message:
    flags = MsgType.COMMAND | (HeaderFlag.NO_REPLY if no_reply else 0)
    return Message(msg_id, cmd, payload if payload is not None else Empty(), flags)


def reply_to(request: Message | Header, payload: Payload | None = None) -> Message:
    return Message(
        request.msg_id, request.command, payload if payload is not None else Empty(), MsgType.REPLY
    )


def error_reply(request: Message | Header, errno: int) -> Message:
    """The reply that fails ``request`` with a (positive) errno; header only."""
    return Message(
        request.msg_id, request.command, Empty(), MsgType.REPLY | HeaderFlag.ERROR, errno
    )


# --------------------------------------------------------------------------- decoding


def _attach(e: VfioUserError, header: Header) -> VfioUserError:
    if e.header is None:
        e.header = header
    return e


def _body(header: Header, body: bytes | memoryview, what: str) -> None:
    if len(body) != header.body_size:
        raise BadSize(
            f"{what}: header says {header.size} bytes, got {HEADER_SIZE + len(body)}", header
        )


def decode_command(
    header: Header,
    body: bytes | memoryview,
    nfds: int = 0,
    *,
    sender: Peer = Peer.CLIENT,
    max_data_xfer_size: int | None = None,
) -> Message:
    """Validate and decode a command sent by ``sender`` (CLIENT: what a device server
    receives; SERVER: DMA_READ/WRITE, what a client receives). ``max_data_xfer_size`` is
    the receiver's advertised limit on data counts (None: not checked)."""
    what = f"{command_name(header.command)} (id {header.msg_id})"
    if header.is_reply:
        raise UnexpectedReply(f"{what}: a reply where a command was expected", header)
    _body(header, body, what)
    spec = SPECS.get(header.command)
    if spec is None:
        raise UnknownCommand(f"unknown command {header.command} (id {header.msg_id})", header)
    if spec.sender is not sender:
        raise WrongDirection(
            f"{what} is sent by the {spec.sender.name.lower()}, not the {sender.name.lower()}",
            header,
        )
    try:
        payload = spec.request(bytes(body))
        spec.check_request(payload, nfds, max_data_xfer_size)
    except VfioUserError as e:
        raise _attach(e, header) from None
    return Message(header.msg_id, header.command, payload, header.flags)  # type: ignore[arg-type]


def decode_reply(
    header: Header,
    body: bytes | memoryview,
    nfds: int = 0,
    *,
    request: Message | Header | None = None,
    command: int | None = None,
    max_data_xfer_size: int | None = None,
) -> Message:
    """Validate and decode a reply. Give the ``request`` it answers (its command and
    msg_id must match) or just the expected ``command``. An error reply decodes to a
    Message with ``is_error`` and ``error`` (errno) and an `Empty` payload."""
    expected = request.command if request is not None else command
    what = f"{command_name(header.command)} reply (id {header.msg_id})"
    if not header.is_reply:
        raise UnexpectedReply(f"{what}: a command where a reply was expected", header)
    if expected is not None and header.command != expected:
        raise UnexpectedReply(f"{what}: expected a reply to {command_name(expected)}", header)
    if request is not None and header.msg_id != request.msg_id:
        raise UnexpectedReply(f"{what}: expected msg_id {request.msg_id}", header)
    _body(header, body, what)
    spec = SPECS.get(header.command)
    if spec is None:
        raise UnknownCommand(f"reply to unknown command {header.command}", header)
    if header.is_error:
        if body:
            raise BadPayloadSize(f"{what}: error reply with {len(body)} payload bytes", header)
        if nfds:
            raise BadFdCount(f"{what}: error reply with {nfds} fds", header)
        return Message(header.msg_id, header.command, Empty(), header.flags, header.error)
    try:
        payload = spec.reply(bytes(body))
        if isinstance(argsz := getattr(payload, "argsz", None), int):
            _argsz_covers(what, argsz, len(body))
        spec.check_reply(payload, nfds, max_data_xfer_size)
    except VfioUserError as e:
        raise _attach(e, header) from None
    return Message(header.msg_id, header.command, payload, header.flags)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- policy helpers


def check_supported(msg: Message, refuse: Iterable[int] = ()) -> None:
    """Raise `Unsupported` (errno ENOTSUP) for what this project does not implement:
    dirty-page logging (DIRTY_PAGES, DMA_UNMAP with GET_DIRTY_BITMAP), migration
    (DEVICE_FEATURE, MIG_DATA_READ/WRITE), and any command listed in ``refuse``."""
    header = Header(msg.msg_id, msg.command, HEADER_SIZE, msg.flags)
    name = command_name(msg.command)
    if msg.command in (
        Command.DIRTY_PAGES,
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
        Command.MIG_DATA_WRITE,
    ) or msg.command in set(refuse):
        raise Unsupported(f"{name} is not supported", header)
    if isinstance(msg.payload, DmaUnmap) and msg.payload.flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
        raise Unsupported("DMA_UNMAP with GET_DIRTY_BITMAP is not supported", header)
