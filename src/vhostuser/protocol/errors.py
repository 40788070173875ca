"""Errors raised while decoding or validating vhost-user messages."""

from __future__ import annotations


class ProtocolError(Exception):
    """A message that breaks the vhost-user protocol. The peer is at fault."""


class BadVersion(ProtocolError):
    pass


class ReservedFlags(ProtocolError):
    pass


class PayloadTooLarge(ProtocolError):
    pass


class BadPayloadSize(ProtocolError):
    pass


class BadPayload(ProtocolError):
    """Right size, wrong content (e.g. too many memory regions)."""


class BadFdCount(ProtocolError):
    pass


class UnknownRequest(ProtocolError):
    pass


class UnexpectedReply(ProtocolError):
    """REPLY flag where a request was expected, or the reverse, or a mismatched code."""
