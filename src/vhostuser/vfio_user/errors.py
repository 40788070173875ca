"""Errors raised while decoding or validating vfio-user messages: `VfioUserError` (a
`ProtocolError`) and one subclass per kind of fault, each with the errno that an error
reply to the offending message carries and, once known, that message's header.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING

from ..protocol.errors import ProtocolError

if TYPE_CHECKING:
    from .codec import Header


class VfioUserError(ProtocolError):
    """A message that breaks the vfio-user protocol.

    ``header`` is the offending message's header once it is known (so a server can send
    an error reply with the same msg_id); ``errno`` is what such a reply carries.
    """

    errno: int = _errno.EINVAL

    def __init__(self, message: str, header: Header | None = None) -> None:
        super().__init__(message)
        self.header = header


class Truncated(VfioUserError):
    """Fewer bytes than the header or the payload's fixed structure needs."""


class BadSize(VfioUserError):
    """The header's size field: below 16, above the limit, or not the bytes that came."""


class BadFlags(VfioUserError):
    """Unknown message type, reserved header bits, NO_REPLY on a reply, ERROR on a command."""


class UnknownCommand(VfioUserError):
    errno = _errno.ENOSYS


class WrongDirection(VfioUserError):
    """A server command (DMA_READ/WRITE) from the client, or a client command from the
    server."""

    errno = _errno.ENOSYS


class BadPayloadSize(VfioUserError):
    """The payload length does not fit the command (extra bytes, or data length not the
    count)."""


class BadArgsz(VfioUserError):
    """``argsz`` inconsistent with the payload (too small, or a reply bigger than it)."""


class BadPayload(VfioUserError):
    """Right size, wrong content: unknown flag bits, non-zero reserved fields, bad JSON,
    broken capability chain."""


class BadFdCount(VfioUserError):
    """The number of fds attached does not fit the command."""


class TransferTooLarge(VfioUserError):
    """A data count above the negotiated max_data_xfer_size."""

    errno = _errno.E2BIG


class Unsupported(VfioUserError):
    """Well-formed, but a feature this implementation refuses (see `check_supported`)."""

    errno = _errno.ENOTSUP


class UnexpectedReply(VfioUserError):
    """A reply where a command was expected, or the reverse, or a mismatched id/command."""
