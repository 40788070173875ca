"""The vhost-user protocol with no I/O: constants, payloads, codec and errors."""

from . import payloads
from .codec import (
    BACKEND_SPECS,
    FRONTEND_SPECS,
    Channel,
    Header,
    Message,
    decode_header,
    decode_reply,
    decode_request,
    encode,
    expected_fds,
    expects_reply,
    has_own_reply,
    reply_to,
    request,
)
from .constants import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    BackendReq,
    DeviceStatus,
    FrontendReq,
    HeaderFlag,
    ProtocolFeature,
    VirtioFeature,
)
from .errors import ProtocolError

__all__ = [
    "BACKEND_SPECS",
    "FRONTEND_SPECS",
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "BackendReq",
    "Channel",
    "DeviceStatus",
    "FrontendReq",
    "Header",
    "HeaderFlag",
    "Message",
    "ProtocolError",
    "ProtocolFeature",
    "VirtioFeature",
    "decode_header",
    "decode_reply",
    "decode_request",
    "encode",
    "expected_fds",
    "expects_reply",
    "has_own_reply",
    "payloads",
    "reply_to",
    "request",
]
