"""What a traced message says, decoded with our codec: the request by name, its payload
field by field (feature bits by name, ring addresses, memory regions), its fds (what kind
of file each is, and its size), and for a reply the request it answers and how long the
answer took. One event is a dict (the JSON line); `text` renders it for people."""

from __future__ import annotations

import dataclasses
import os
import stat
from enum import IntFlag
from typing import Any

from ..procfs import fd_target
from ..protocol import BackendReq, FrontendReq, ProtocolFeature, VirtioFeature
from ..protocol import payloads as p
from ..protocol.codec import Channel, Header, decode_reply, decode_request
from ..protocol.constants import HeaderFlag
from ..protocol.errors import ProtocolError
from .device_bits import LOG_ALL_BIT

# which payload fields are feature masks, for which request
_FEATURE_FIELDS: dict[tuple[Channel, int], type[IntFlag]] = {
    (Channel.FRONTEND, FrontendReq.GET_FEATURES): VirtioFeature,
    (Channel.FRONTEND, FrontendReq.SET_FEATURES): VirtioFeature,
    (Channel.FRONTEND, FrontendReq.GET_PROTOCOL_FEATURES): ProtocolFeature,
    (Channel.FRONTEND, FrontendReq.SET_PROTOCOL_FEATURES): ProtocolFeature,
}


def feature_names(value: int, flags: type[IntFlag],
                  device: dict[int, str] | None = None) -> list[str]:
    """Set bits by name: the enum's, VHOST_F_LOG_ALL, and with `device` (a device type's
    table, device_bits.py) its bits; any other as `bit N`."""
    out = []
    for bit in range(64):
        if value >> bit & 1:
            try:
                name = flags(1 << bit).name
            except ValueError:
                name = None
            if name is None and flags is VirtioFeature:
                name = "LOG_ALL" if bit == LOG_ALL_BIT else (device or {}).get(bit)
            out.append(name or f"bit {bit}")
    return out


def fd_info(fd: int) -> dict[str, Any]:
    """What our copy of a passed fd is: eventfd, memfd, socket, a file (and its size)."""
    info: dict[str, Any] = {"fd": fd}
    try:
        target = fd_target(fd)
        st = os.fstat(fd)
    except OSError as e:
        info["kind"] = f"unreadable ({e.strerror})"
        return info
    if target.startswith("anon_inode:"):
        info["kind"] = target[len("anon_inode:") :].strip("[]")
    elif target.startswith("/memfd:"):
        info["kind"] = "memfd"
        info["name"] = target[len("/memfd:") :].removesuffix(" (deleted)")
    elif target.startswith("socket:"):
        info["kind"] = "socket"
    elif stat.S_ISREG(st.st_mode):
        info["kind"] = "file"
        info["path"] = target
    else:
        info["kind"] = target
    if stat.S_ISREG(st.st_mode):
        info["size"] = st.st_size
    return info


def _fields(payload: Any, channel: Channel, request: int,
            device: dict[int, str] | None) -> dict[str, Any]:
    if isinstance(payload, p.Raw | type) or not dataclasses.is_dataclass(payload):
        return {"raw": payload.pack().hex()} if hasattr(payload, "pack") else {}
    out: dict[str, Any] = dataclasses.asdict(payload)  # type: ignore[arg-type]
    flags = _FEATURE_FIELDS.get((channel, request))
    if flags is not None and "value" in out:
        out["names"] = feature_names(out["value"], flags, device)
    if isinstance(payload, p.VringFile):
        out = {"index": payload.index, "nofd": payload.nofd}
    if isinstance(payload, p.Config):
        out["data"] = payload.data.hex()
    for key, val in list(out.items()):
        if isinstance(val, bytes):
            out[key] = val.hex()
    return out


def request_event(channel: Channel, header: Header, body: bytes, fds: list[int],
                  device: dict[int, str] | None = None) -> dict[str, Any]:
    """A request as it passes (decoding errors are reported, the bytes pass anyway);
    `device`: the device type's feature bit names (device_bits.py)."""
    ev: dict[str, Any] = {"request": channel.name_of(header.request), "code": header.request,
                          "size": header.size}
    if header.need_reply:
        ev["need_reply"] = True
    try:
        msg = decode_request(channel, header, body, len(fds))
        ev["payload"] = _fields(msg.payload, channel, header.request, device)
    except ProtocolError as e:
        ev["error"] = str(e)
    if fds:
        ev["fds"] = [fd_info(fd) for fd in fds]
    return ev


def reply_event(channel: Channel, header: Header, body: bytes, fds: list[int],
                device: dict[int, str] | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"reply": channel.name_of(header.request), "code": header.request,
                          "size": header.size}
    try:
        msg = decode_reply(channel, header.request, header, body, len(fds))
        ev["payload"] = _fields(msg.payload, channel, header.request, device)
    except ProtocolError as e:
        ev["error"] = str(e)
    if fds:
        ev["fds"] = [fd_info(fd) for fd in fds]
    return ev


def is_reply(header: Header) -> bool:
    return bool(header.flags & HeaderFlag.REPLY)


def _value(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 4096:
        return hex(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def text(ev: dict[str, Any]) -> str:
    """One event as a line for people: `front-end > SET_VRING_ADDR index 0, ...`."""
    who = {"front": "front-end >", "back": "back-end  <", "backend-req": "back-end  >>",
           "backend-reply": "front-end <<"}[ev["dir"]]
    if "end" in ev:
        return f"{ev['t']:9.3f} {who} (connection ends: {ev['end']})"
    name = ev.get("request") or f"reply to {ev['reply']}"
    parts = [f"{ev['t']:9.3f} {who} {name}"]
    if ev.get("need_reply"):
        parts.append("(need reply)")
    payload = ev.get("payload")
    if payload:
        if "names" in payload:
            parts.append(f"{payload['value']:#x} " + "|".join(payload["names"]))
        else:
            parts.append(", ".join(f"{k} {_value(v)}" for k, v in payload.items()))
    if "fds" in ev:
        parts.append("fds: " + "; ".join(
            " ".join(f"{k} {_value(v)}" for k, v in f.items() if k != "fd") for f in ev["fds"]))
    if "ms" in ev:
        parts.append(f"[{ev['ms']:.2f} ms]")
    if "error" in ev:
        parts.append(f"!! {ev['error']}")
    return " ".join(parts)


__all__ = ["BackendReq", "fd_info", "feature_names", "is_reply", "reply_event",
           "request_event", "text"]
