"""vhost-user-check's checks that make requests of a virtio-scsi back-end: commands on the
first request queue, to target 0. What is checked: that a disk answers as initiators
expect (INQUIRY, READ CAPACITY, READ, REPORT LUNS); that what does not exist is said so
in the way Linux's scan relies on (a target that is not there: VIRTIO_SCSI_S_BAD_TARGET; a
LUN that is not there: peripheral qualifier 3; an opcode it does not know, a block past
the end: CHECK CONDITION with ILLEGAL REQUEST); and that requests no driver sends (a
request header cut short, no response buffer, one too small, a data-in buffer shorter
than the command asks for, each ending where the memory region ends) are answered or
dropped without writing outside memory or ending the service. The rules: virtio 1.x §5.6
(virtio-scsi: a request is virtio_scsi_cmd_req, then data-out; the device writes
virtio_scsi_cmd_resp, then data-in), SPC-4 and SBC-3 (sense keys and codes)."""

from __future__ import annotations

import struct

from ..devices.scsi import CONFIG, REQ, RESP_SIZE
from ..frontend.client import BackendError
from ..frontend.scsi import Result, ScsiClient, lun_field
from ..protocol import ProtocolFeature
from ..virtq.ring import DESC_F_NEXT, DESC_F_WRITE
from .checks import Failed, Skipped, _alive, _attack, _chain, check
from .rig import INQUIRY, Session, session

# virtio 1.x §5.6.6: response codes
S_OK, S_OVERRUN, S_BAD_TARGET = 0, 1, 3
# SPC-4: status, sense key, additional sense codes
GOOD, CHECK_CONDITION = 0x00, 0x02
ILLEGAL_REQUEST, UNIT_ATTENTION = 0x5, 0x6
TEST_UNIT_READY = bytes(6)
ASC_INVALID_OPCODE, ASC_LBA_OUT_OF_RANGE = 0x20, 0x21
NOT_A_SCSI_OPCODE = 0xFF  # vendor-specific: no SBC disk has it


def _read(lba: int, blocks: int) -> bytes:
    """READ(10), or READ(16) past what it addresses."""
    if lba + blocks <= 0xFFFFFFFF:
        return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def _sense(r: Result) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ), from fixed or descriptor format sense data (SPC-4 4.5)."""
    sense = r.sense
    if len(sense) >= 4 and sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0xF, sense[2], sense[3]
    if len(sense) >= 14 and sense[0] & 0x7F in (0x70, 0x71):
        return sense[2] & 0xF, sense[12], sense[13]
    raise Failed(f"CHECK CONDITION with sense data of no known format: {sense.hex()}")


def _ready(scsi: ScsiClient, lun: int = 0) -> None:
    """TEST UNIT READY while it reports a UNIT ATTENTION: a target may report one (power
    on, reset) on the first commands of a new initiator (SAM-5), as Linux's scan expects.
    Any other answer is left for the check's own command to meet."""
    for _ in range(4):
        r = scsi.command(TEST_UNIT_READY, lun=lun)
        if r.status != CHECK_CONDITION or _sense(r)[0] != UNIT_ATTENTION:
            return


def _capacity(scsi: ScsiClient) -> tuple[int, int]:
    """(blocks, block size) by READ CAPACITY(10), or (16) for a disk it cannot say."""
    r = scsi.command(bytes([0x25]) + bytes(9), data_in=8)
    if r.response != S_OK or r.status != GOOD or len(r.data) != 8:
        raise Failed(f"READ CAPACITY(10): response {r.response}, status {r.status}, "
                     f"{len(r.data)} bytes")
    last, size = struct.unpack(">II", r.data)
    if last == 0xFFFFFFFF:
        r = scsi.command(bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big")
                         + bytes(2), data_in=32)
        if r.response != S_OK or r.status != GOOD or len(r.data) < 12:
            raise Failed(f"READ CAPACITY(16): response {r.response}, status {r.status}")
        last, size = struct.unpack_from(">QI", r.data)
    return last + 1, size


def _illegal(r: Result, what: str, ascs: tuple[int, ...]) -> str:
    if r.response != S_OK or r.status != CHECK_CONDITION:
        raise Failed(f"{what}: response {r.response}, status {r.status:#x} (not CHECK "
                     "CONDITION)")
    key, asc, ascq = _sense(r)
    if key != ILLEGAL_REQUEST or asc not in ascs:
        raise Failed(f"{what}: sense {key:#x}/{asc:#04x}/{ascq:#04x}, not ILLEGAL REQUEST "
                     f"with ASC {' or '.join(f'{a:#04x}' for a in ascs)}")
    return f"ILLEGAL REQUEST {asc:#04x}/{ascq:#04x}"


@check("scsi-io", "INQUIRY, READ CAPACITY, READ of block 0 and REPORT LUNS of target 0 "
                  "answer", kinds=("scsi",))
def _scsi_io(path: str) -> str:
    with session(path) as s:
        scsi = s.setup_scsi()
        r = scsi.command(INQUIRY, data_in=96)
        if r.response != S_OK or r.status != GOOD or len(r.data) < 36:
            raise Failed(f"INQUIRY: response {r.response}, status {r.status}, "
                         f"{len(r.data)} bytes")
        kind = r.data[0] & 0x1F
        _ready(scsi)
        blocks, size = _capacity(scsi)
        r = scsi.command(_read(0, 1), data_in=size)
        if r.response != S_OK or r.status != GOOD or len(r.data) != size:
            raise Failed(f"READ(10) of block 0: response {r.response}, status {r.status}, "
                         f"{len(r.data)} bytes of {size}")
        r = scsi.command(bytes([0xA0, 0, 0, 0, 0, 0]) + (8 + 8 * 256).to_bytes(4, "big")
                         + bytes(2), data_in=8 + 8 * 256)
        if r.response != S_OK or r.status != GOOD or len(r.data) < 16:
            raise Failed(f"REPORT LUNS: response {r.response}, status {r.status}")
        listed = int.from_bytes(r.data[:4], "big") // 8
        return (f"device type {kind:#x}, {blocks} blocks of {size} bytes, block 0 read, "
                f"{listed} LUN(s) reported")


@check("scsi-bad-target", "a command to a target that does not exist (255, or past the "
                          "config's max_target): VIRTIO_SCSI_S_BAD_TARGET", kinds=("scsi",))
def _scsi_bad_target(path: str) -> str:
    """QEMU's vhost-user-scsi tells the guest max_target 255 whatever the back-end has, and
    Linux scans every target up to it: each that is not there must say BAD_TARGET."""
    with session(path) as s:
        scsi = s.setup_scsi()
        target, why = 255, "QEMU's max_target"
        if s.fe.protocol_features & ProtocolFeature.CONFIG:
            try:
                max_target = CONFIG.unpack(s.fe.get_config(CONFIG.size))[8]
            except BackendError as e:
                raise Failed(f"GET_CONFIG: {e}") from None
            if max_target >= 255:
                raise Skipped(f"max_target {max_target}: no target id past it")
            target, why = max_target + 1, f"past max_target {max_target}"
        r = scsi.command(INQUIRY, data_in=96, target=target)
        if r.response != S_BAD_TARGET:
            raise Failed(f"target {target}: response {r.response} (status {r.status}), not "
                         "BAD_TARGET: Linux would scan a target that is not there")
    _alive(path)
    return f"target {target} ({why}): BAD_TARGET"


@check("scsi-lun-absent", "INQUIRY of LUN 200, which is not there: peripheral qualifier 3",
       kinds=("scsi",))
def _scsi_lun_absent(path: str) -> str:
    with session(path) as s:
        r = s.setup_scsi().command(INQUIRY, lun=200, data_in=96)
        if r.response != S_OK or r.status != GOOD or not r.data:
            raise Failed(f"response {r.response}, status {r.status}, {len(r.data)} bytes")
        if r.data[0] >> 5 != 3 or r.data[0] & 0x1F != 0x1F:
            raise Failed(f"peripheral byte {r.data[0]:#04x}: not qualifier 3, type 1Fh "
                         "(no unit): Linux would attach a disk that is not there")
    _alive(path)
    return f"peripheral byte {r.data[0]:#04x}"


@check("scsi-unknown-opcode", f"a command of opcode {NOT_A_SCSI_OPCODE:#x}: CHECK CONDITION, "
                              "ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE",
       kinds=("scsi",))
def _scsi_unknown(path: str) -> str:
    with session(path) as s:
        scsi = s.setup_scsi()
        _ready(scsi)
        r = scsi.command(bytes([NOT_A_SCSI_OPCODE]) + bytes(9), data_in=512)
        outcome = _illegal(r, f"opcode {NOT_A_SCSI_OPCODE:#x}", (ASC_INVALID_OPCODE,))
    _alive(path)
    return outcome


@check("scsi-read-past-end", "READ of the block past the last: CHECK CONDITION, ILLEGAL "
                             "REQUEST, LBA OUT OF RANGE; nothing read", kinds=("scsi",))
def _scsi_past_end(path: str) -> str:
    with session(path) as s:
        scsi = s.setup_scsi()
        _ready(scsi)
        blocks, size = _capacity(scsi)
        r = scsi.command(_read(blocks, 1), data_in=size)
        outcome = _illegal(r, f"READ of block {blocks}", (ASC_LBA_OUT_OF_RANGE,))
        if r.data:
            raise Failed(f"{outcome}, yet {len(r.data)} bytes of data-in")
    _alive(path)
    return outcome


def _request(s: Session, cdb: bytes) -> int:
    """A virtio_scsi_cmd_req for LUN 0 of target 0 in guest memory: its address."""
    req = REQ.pack(lun_field(0), 7, 0, 0, 0, cdb.ljust(32, b"\0"))
    gpa = s.ram.alloc(len(req))
    s.ram.at(gpa, len(req))[:] = req
    return gpa


def _at_end(s: Session, n: int) -> int:
    """The guest address of the last `n` bytes of the memory region: a write past them
    lands in the guard zone."""
    return s.ram.guest_addr + s.ram.size - n


@check("scsi-short-request", "a request header of 10 bytes (virtio_scsi_cmd_req has "
                             f"{REQ.size}), then a response buffer", kinds=("scsi",))
def _scsi_short_request(path: str) -> str:
    def build(s: Session) -> None:
        req = _request(s, INQUIRY)
        _chain(s, [(req, 10, DESC_F_NEXT, 1),
                   (_at_end(s, RESP_SIZE), RESP_SIZE, DESC_F_WRITE, 0)])
    return _attack(path, build, "a short request")


@check("scsi-no-response", "a request with no device-writable buffer to answer in",
       kinds=("scsi",))
def _scsi_no_response(path: str) -> str:
    def build(s: Session) -> None:
        _chain(s, [(_request(s, INQUIRY), REQ.size, 0, 0)])
    return _attack(path, build, "no response buffer")


@check("scsi-response-too-small", "a response buffer of 8 bytes (virtio_scsi_cmd_resp has "
                                  f"{RESP_SIZE}) that ends where the region ends",
       kinds=("scsi",))
def _scsi_small_response(path: str) -> str:
    def build(s: Session) -> None:
        _chain(s, [(_request(s, INQUIRY), REQ.size, DESC_F_NEXT, 1),
                   (_at_end(s, 8), 8, DESC_F_WRITE, 0)])
    return _attack(path, build, "a response buffer of 8 bytes")


@check("scsi-data-in-short", "READ(10) of 8 blocks into a data-in buffer of 512 bytes that "
                             "ends where the region ends", kinds=("scsi",))
def _scsi_data_in_short(path: str) -> str:
    def build(s: Session) -> None:
        resp = s.ram.alloc(RESP_SIZE)
        _chain(s, [(_request(s, _read(0, 8)), REQ.size, DESC_F_NEXT, 1),
                   (resp, RESP_SIZE, DESC_F_WRITE | DESC_F_NEXT, 2),
                   (_at_end(s, 512), 512, DESC_F_WRITE, 0)])
    return _attack(path, build, "a data-in buffer shorter than the command's")
