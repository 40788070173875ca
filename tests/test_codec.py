"""The protocol layer: every message type round-trips; every error class is raised."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from vhostuser.protocol import (
    BACKEND_SPECS,
    FRONTEND_SPECS,
    BackendReq,
    Channel,
    FrontendReq,
    HeaderFlag,
    Message,
    ProtocolFeature,
    decode_header,
    decode_reply,
    decode_request,
    encode,
    expects_reply,
    reply_to,
    request,
)
from vhostuser.protocol import errors as e
from vhostuser.protocol import payloads as p

REGION = p.MemRegion(0x1000, 0x20000, 0x7F0000001000, 0x3000)

# One representative payload per payload type.
SAMPLES: dict[type, p.Payload] = {
    p.Empty: p.Empty(),
    p.U64: p.U64(0x1122334455667788),
    p.VringFile: p.VringFile.make(3),
    p.VringState: p.VringState(1, 256),
    p.VringAddr: p.VringAddr(2, 0, 0x1000, 0x3000, 0x2000, 0),
    p.MemTable: p.MemTable((REGION, p.MemRegion(0x100000000, 0x1000, 0x7F0010000000, 0))),
    p.SingleMemRegion: p.SingleMemRegion(REGION),
    p.LogBase: p.LogBase(0x4000, 0),
    p.IotlbMsg: p.IotlbMsg(0x1000, 0x2000, 0x7F00, 3, 2),
    p.Config: p.Config(32, 4, 0, b"\x01\x02\x03\x04"),
    p.VringArea: p.VringArea(1, 0x1000, 0),
    p.Inflight: p.Inflight(0x1000, 0, 2, 128),
    p.SharedObject: p.SharedObject(bytes(range(16))),
    p.DeviceStateParams: p.DeviceStateParams(0, 0),
    p.ShmemMap: p.ShmemMap(1, 0x1000, 0x2000, 0x3000, 3),
    p.ShmemConfig: p.ShmemConfig((0x1000, 0x2000)),
    p.Raw: p.Raw(b"crypto session params"),
}


def fd_count(spec_fds: object, payload: p.Payload) -> int:
    from vhostuser.protocol.codec import Fds

    if spec_fds is Fds.PER_REGION:
        assert isinstance(payload, p.MemTable)
        return len(payload.regions)
    if spec_fds is Fds.ONE:
        return 1
    if spec_fds is Fds.VRING:
        return 0 if payload.nofd else 1  # type: ignore[attr-defined]
    return 0


def roundtrip(channel: Channel, msg: Message, nfds: int) -> Message:
    wire = encode(msg)
    header = decode_header(wire[:12])
    assert header.size == len(wire) - 12
    return decode_request(channel, header, wire[12:], nfds)


@pytest.mark.parametrize(("channel", "code"),
                         [(Channel.FRONTEND, c) for c in FRONTEND_SPECS]
                         + [(Channel.BACKEND, c) for c in BACKEND_SPECS])
def test_every_request_round_trips(channel: Channel, code: int) -> None:
    spec = channel.specs[code]
    payload = SAMPLES[spec.payload]
    msg = request(code, payload, need_reply=True)
    back = roundtrip(channel, msg, fd_count(spec.fds, payload))
    assert back == msg
    assert back.need_reply and not back.is_reply


@pytest.mark.parametrize(("channel", "code"),
                         [(Channel.FRONTEND, c) for c in FRONTEND_SPECS]
                         + [(Channel.BACKEND, c) for c in BACKEND_SPECS])
def test_every_reply_round_trips(channel: Channel, code: int) -> None:
    spec = channel.specs[code]
    payload = SAMPLES[spec.reply or p.U64] if spec.reply else p.U64(0)
    reply = reply_to(request(code), payload)
    wire = encode(reply)
    header = decode_header(wire[:12])
    assert header.is_reply
    nfds = 1 if spec.reply_fds.name == "ONE" else 0
    assert decode_reply(channel, code, header, wire[12:], nfds) == reply


def test_wire_layout_is_the_specs() -> None:
    wire = encode(request(FrontendReq.SET_VRING_ADDR, SAMPLES[p.VringAddr]))
    assert wire[:12] == struct.pack("=III", 9, 1, 40)
    assert struct.unpack("=IIQQQQ", wire[12:]) == (2, 0, 0x1000, 0x3000, 0x2000, 0)
    table = encode(request(FrontendReq.SET_MEM_TABLE, p.MemTable((REGION,))))
    assert struct.unpack_from("=II4Q", table, 12) == (1, 0, 0x1000, 0x20000, 0x7F0000001000, 0x3000)


def test_qemu_style_full_memory_table_is_accepted() -> None:
    # QEMU sends all 8 region slots whatever nregions is.
    body = struct.pack("=II", 1, 0) + REGION.pack() + bytes(32 * 7)
    hdr = decode_header(struct.pack("=III", 5, 1, len(body)))
    assert decode_request(Channel.FRONTEND, hdr, body, 1).payload == p.MemTable((REGION,))


def test_nofd_vring_file_carries_no_fd() -> None:
    msg = request(FrontendReq.SET_VRING_KICK, p.VringFile.make(5, nofd=True))
    assert roundtrip(Channel.FRONTEND, msg, 0).payload.nofd  # type: ignore[attr-defined]
    with pytest.raises(e.BadFdCount):
        roundtrip(Channel.FRONTEND, msg, 1)


def test_reply_rules() -> None:
    ack = ProtocolFeature.REPLY_ACK
    get = request(FrontendReq.GET_FEATURES)
    assert expects_reply(Channel.FRONTEND, get, 0)
    plain = request(FrontendReq.SET_FEATURES, p.U64(0))
    asked = request(FrontendReq.SET_FEATURES, p.U64(0), need_reply=True)
    assert not expects_reply(Channel.FRONTEND, plain, ack)
    assert not expects_reply(Channel.FRONTEND, asked, 0)  # REPLY_ACK not negotiated
    assert expects_reply(Channel.FRONTEND, asked, ack)
    log = request(FrontendReq.SET_LOG_BASE, p.LogBase(0, 0))
    assert not expects_reply(Channel.FRONTEND, log, 0)
    assert expects_reply(Channel.FRONTEND, log, ProtocolFeature.LOG_SHMFD)


# -- every error class -------------------------------------------------------------------------

def hdr(request_code: int, flags: int = 1, size: int = 0) -> bytes:
    return struct.pack("=III", request_code, flags, size)


@pytest.mark.parametrize("flags", [0, 2, 3, 0x5 & ~1])
def test_bad_version(flags: int) -> None:
    with pytest.raises(e.BadVersion):
        decode_header(hdr(1, flags))


@pytest.mark.parametrize("bit", [0x10, 0x100, 0x80000000])
def test_reserved_flags(bit: int) -> None:
    with pytest.raises(e.ReservedFlags):
        decode_header(hdr(1, 1 | bit))


def test_size_over_4096() -> None:
    decode_header(hdr(1, 1, 4096))
    with pytest.raises(e.PayloadTooLarge):
        decode_header(hdr(1, 1, 4097))


def test_truncated_header() -> None:
    with pytest.raises(e.ProtocolError):
        decode_header(hdr(1)[:7])


@pytest.mark.parametrize(("code", "size"), [
    (FrontendReq.SET_FEATURES, 4),
    (FrontendReq.SET_FEATURES, 16),
    (FrontendReq.GET_FEATURES, 8),
    (FrontendReq.SET_VRING_ADDR, 32),
    (FrontendReq.SET_VRING_NUM, 12),
    (FrontendReq.SET_MEM_TABLE, 8 + 32 * 2 + 1),
    (FrontendReq.SET_MEM_TABLE, 4),
    (FrontendReq.ADD_MEM_REG, 32),
    (FrontendReq.GET_CONFIG, 8),
])
def test_wrong_payload_size(code: int, size: int) -> None:
    body = struct.pack("=II", 1, 0).ljust(size, b"\0")[:size]
    with pytest.raises(e.BadPayloadSize):
        decode_request(Channel.FRONTEND, decode_header(hdr(code, 1, size)), body, 1)


def test_config_size_field_must_match() -> None:
    body = struct.pack("=III", 0, 8, 0) + bytes(4)
    with pytest.raises(e.BadPayloadSize):
        decode_request(Channel.FRONTEND, decode_header(hdr(FrontendReq.SET_CONFIG, 1, 16)), body)
    body = struct.pack("=III", 0, 300, 0) + bytes(300)
    with pytest.raises(e.BadPayload):
        decode_request(Channel.FRONTEND, decode_header(hdr(FrontendReq.SET_CONFIG, 1, 312)), body)


def test_too_many_regions() -> None:
    body = struct.pack("=II", 9, 0) + bytes(32 * 9)
    with pytest.raises(e.BadPayload):
        decode_request(Channel.FRONTEND, decode_header(hdr(5, 1, len(body))), body, 9)


@pytest.mark.parametrize(("msg", "nfds"), [
    (request(FrontendReq.SET_MEM_TABLE, p.MemTable((REGION,))), 0),
    (request(FrontendReq.SET_MEM_TABLE, p.MemTable((REGION,))), 2),
    (request(FrontendReq.SET_VRING_CALL, p.VringFile.make(0)), 0),
    (request(FrontendReq.SET_FEATURES, p.U64(0)), 1),
    (request(FrontendReq.ADD_MEM_REG, p.SingleMemRegion(REGION)), 0),
    (request(FrontendReq.SET_BACKEND_REQ_FD), 0),
    (request(FrontendReq.GET_FEATURES), 9),
])
def test_wrong_fd_count(msg: Message, nfds: int) -> None:
    with pytest.raises(e.BadFdCount):
        roundtrip(Channel.FRONTEND, msg, nfds)


def test_rem_mem_reg_tolerates_one_fd() -> None:
    msg = request(FrontendReq.REM_MEM_REG, p.SingleMemRegion(REGION))
    assert roundtrip(Channel.FRONTEND, msg, 0) == roundtrip(Channel.FRONTEND, msg, 1)


@pytest.mark.parametrize("code", [0, 45, 1000, 0xFFFFFFFF])
def test_unknown_request(code: int) -> None:
    with pytest.raises(e.UnknownRequest):
        decode_request(Channel.FRONTEND, decode_header(hdr(code)), b"")


def test_unknown_backend_request() -> None:
    with pytest.raises(e.UnknownRequest):
        decode_request(Channel.BACKEND, decode_header(hdr(11)), b"")
    assert BackendReq.SHMEM_UNMAP == 10


def test_reply_flag_on_request_and_missing_on_reply() -> None:
    with pytest.raises(e.UnexpectedReply):
        decode_request(Channel.FRONTEND, decode_header(hdr(3, 1 | HeaderFlag.REPLY)), b"")
    with pytest.raises(e.UnexpectedReply):
        decode_reply(Channel.FRONTEND, 1, decode_header(hdr(1, 1, 8)), bytes(8))
    with pytest.raises(e.UnexpectedReply):  # reply to another request
        decode_reply(Channel.FRONTEND, 1, decode_header(hdr(15, 5, 8)), bytes(8))


# -- sessions recorded from real peers ------------------------------------------------------

RECORDED = sorted((Path(__file__).with_name("golden")).glob("frames_*.jsonl"))


def check_frames(events: list[dict[str, object]]) -> int:
    """Every message of a session a real front-end and back-end exchanged (vhost-user-trace
    --frames): it decodes with the fds it came with (the codec's fd rules agree with what
    the peers sent), and encodes back to the same bytes. Returns how many."""
    n = 0
    for ev in events:
        if "frame" not in ev:
            continue
        data = bytes.fromhex(str(ev["frame"]))
        nfds = int(str(ev["nfds"]))
        header = decode_header(data[:12])
        body = data[12:]
        assert len(body) == header.size, ev
        channel = Channel.FRONTEND if ev["dir"] in ("front", "back") else Channel.BACKEND
        if header.is_reply:
            msg = decode_reply(channel, header.request, header, body, nfds)
        else:
            msg = decode_request(channel, header, body, nfds)
        assert encode(msg) == data, ev
        n += 1
    return n


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_sessions_recorded_from_real_peers_decode_and_encode_back(path: Path) -> None:
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert check_frames(events) == len(events)
    # what the peers sent, not what our tables say: the fds each request came with
    fds = {(ev["dir"], ev.get("request")): ev["nfds"] for ev in events if "request" in ev}
    assert fds[("front", "SET_VRING_KICK")] == 1 and fds[("front", "SET_VRING_CALL")] == 1
    assert fds[("front", "GET_FEATURES")] == 0 and fds[("front", "SET_OWNER")] == 0
    regions = [ev for ev in events if ev.get("request") in ("SET_MEM_TABLE", "ADD_MEM_REG")]
    assert regions and all(ev["nfds"] == len(ev["payload"].get("regions", [0]))
                           for ev in regions)


def test_sessions_were_recorded() -> None:
    assert {p.stem for p in RECORDED} >= {"frames_qemu72_qsd72_blk", "frames_qemu11_ours_fs"}
