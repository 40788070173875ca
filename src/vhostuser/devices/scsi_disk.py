"""A SCSI direct-access block device (SPC-4, SBC-3) over a raw image: the commands Linux's
sd and other real initiators send, with the sense data they expect for everything else.

`Lun.execute(cdb, data_out, data_in)` runs one command synchronously and returns its
status, sense data and the bytes it put into `data_in` (guest memory: reads go straight
there with preadv). State a LUN shares with the other queues' workers (capacity, write
cache, a pending unit attention) lives in `LunState`, a slice of a MAP_SHARED page.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import struct
from dataclasses import dataclass

from ..fileio import punch, read_into, write_from, zero
from ..virtq.iov import iov_len, iov_read, iov_slice, iov_write

log = logging.getLogger(__name__)

BLOCK = 512
GOOD, CHECK_CONDITION, BUSY = 0x00, 0x02, 0x08
# sense keys
NO_SENSE, NOT_READY, MEDIUM_ERROR, HARDWARE_ERROR, ILLEGAL_REQUEST = 0x0, 0x2, 0x3, 0x4, 0x5
UNIT_ATTENTION, DATA_PROTECT, ABORTED_COMMAND, MISCOMPARE = 0x6, 0x7, 0xB, 0xE
# (asc, ascq)
INVALID_OPCODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LUN_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMS = (0x26, 0x00)
PARAM_LIST_LENGTH_ERROR = (0x1A, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
SAVING_NOT_SUPPORTED = (0x39, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
WRITE_ERROR = (0x0C, 0x00)
CAPACITY_CHANGED = (0x2A, 0x09)
SPACE_ALLOCATION_FAILED = (0x27, 0x07)
MEDIUM_NOT_PRESENT = (0x3A, 0x00)
INTERNAL_TARGET_FAILURE = (0x44, 0x00)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
RESET_OCCURRED = (0x29, 0x00)

VENDOR = b"VHOSTUSR"
PRODUCT = b"Python SCSI disk"
REVISION = b"0001"
MAX_XFER_BLOCKS = 1 << 16  # per command (Block Limits), and the guest's max_sectors
MAX_UNMAP_BLOCKS = 1 << 22
MAX_UNMAP_DESCRIPTORS = 256
MAX_WRITE_SAME_BLOCKS = 1 << 22  # zeros or unmap: no data moves
MAX_WRITE_SAME_PATTERN = 1 << 13  # a non-zero pattern: 4 MiB written
MAX_PARAMS = 1 << 20  # bytes of a parameter list we read


class Sense(Exception):
    """CHECK CONDITION with this sense (fixed format)."""

    def __init__(self, key: int, code: tuple[int, int], info: int | None = None,
                 field: int | None = None, in_cdb: bool = True) -> None:
        super().__init__(f"sense {key:#x}/{code[0]:#04x}/{code[1]:#04x}")
        self.key, self.asc, self.ascq = key, code[0], code[1]
        self.info, self.field, self.in_cdb = info, field, in_cdb

    def data(self) -> bytes:
        sense = bytearray(18)
        sense[0] = 0x70 | (0x80 if self.info is not None else 0)  # current, VALID
        sense[2] = self.key
        if self.info is not None:
            struct.pack_into(">I", sense, 3, self.info & 0xFFFFFFFF)
        sense[7] = 10
        sense[12], sense[13] = self.asc, self.ascq
        if self.field is not None:  # sense-key specific: field pointer
            sense[15] = 0x80 | (0x40 if self.in_cdb else 0)
            struct.pack_into(">H", sense, 16, self.field)
        return bytes(sense)


def bad_field(byte: int, in_cdb: bool = True) -> Sense:
    return Sense(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB if in_cdb else INVALID_FIELD_IN_PARAMS,
                 field=byte, in_cdb=in_cdb)


@dataclass(frozen=True)
class LunOptions:
    path: str
    read_only: bool = False
    serial: str | None = None
    wwn: int | None = None  # a 64-bit NAA identifier

    @classmethod
    def parse(cls, spec: str) -> LunOptions:
        """FILE[,read-only][,serial=S][,wwn=HEX]; ValueError says what is wrong."""
        path, *opts = spec.split(",")
        if not path:
            raise ValueError(f"{spec!r}: no image file")
        read_only, serial, wwn = False, None, None
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "read-only" and not value:
                read_only = True
            elif key == "serial" and value:
                if len(value.encode()) > 32 or not value.isascii() or not value.isprintable():
                    raise ValueError(f"serial {value!r}: up to 32 printable ASCII characters")
                serial = value
            elif key == "wwn" and value:
                try:
                    wwn = int(value.removeprefix("0x"), 16)
                except ValueError:
                    wwn = -1
                if not 0 < wwn < 1 << 64:
                    raise ValueError(f"wwn {value!r}: a 64-bit NAA identifier in hex")
            else:
                raise ValueError(f"{opt!r}: not read-only, serial=S or wwn=HEX")
        return cls(path, read_only, serial, wwn)


def report_luns(cdb: bytes, din: list[memoryview], numbers: list[int]) -> int:
    """REPORT LUNS (answered alike on every LUN, present or not)."""
    alloc = _u32(cdb, 6)
    if alloc < 16:
        raise bad_field(6)
    if cdb[2] not in (0x00, 0x01, 0x02):
        raise bad_field(2)
    # SELECT REPORT 1: well-known LUNs only (there are none)
    luns = b"" if cdb[2] == 0x01 else b"".join(_lun_entry(i) for i in numbers)
    data = len(luns).to_bytes(4, "big") + bytes(4) + luns
    return iov_write(din, data[:alloc])


def check_image(path: str) -> None:
    """An image must be a regular file or a block device (a FIFO would block its opener,
    a terminal become its controlling tty)."""
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ValueError(f"{path}: not a regular file or a block device")


def open_image(path: str, read_only: bool) -> int:
    """Open an image without ever waiting (O_NONBLOCK until it is known to be one)."""
    fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NONBLOCK
                 | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ValueError(f"{path}: not a regular file or a block device")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LunState:
    """What every process serving a LUN must see alike: [capacity in blocks, write cache
    enabled, pending unit attention (asc << 8 | ascq, 0 for none), a parameter-change
    event owed to the guest (until an event buffer takes it)]."""

    SLOTS = 4

    def __init__(self, cells: memoryview) -> None:
        self.cells = cells  # a 'q' view of SLOTS slots

    @property
    def capacity(self) -> int:
        return int(self.cells[0])

    @capacity.setter
    def capacity(self, blocks: int) -> None:
        self.cells[0] = blocks

    @property
    def wce(self) -> bool:
        return bool(self.cells[1])

    @wce.setter
    def wce(self, on: bool) -> None:
        self.cells[1] = int(on)

    def raise_ua(self, code: tuple[int, int]) -> None:
        self.cells[2] = code[0] << 8 | code[1]

    @property
    def event_owed(self) -> bool:
        return bool(self.cells[3])

    @event_owed.setter
    def event_owed(self, owed: bool) -> None:
        self.cells[3] = int(owed)

    def take_ua(self) -> tuple[int, int] | None:
        ua = self.cells[2]
        if not ua:
            return None
        self.cells[2] = 0
        return ua >> 8, ua & 0xFF


def _u16(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 2], "big")


def _u32(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 4], "big")


def _u64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 8], "big")


class Lun:
    """One logical unit over an image file (opened by the caller's process; workers
    inherit it)."""

    def __init__(self, index: int, opts: LunOptions, state: LunState) -> None:
        self.index, self.opts, self.state = index, opts, state
        self.read_only = opts.read_only
        self.fd = open_image(opts.path, opts.read_only)
        try:
            size = _size(self.fd)
            if size < BLOCK:
                raise ValueError(f"{opts.path}: {size} bytes, less than one {BLOCK}-byte block")
        except BaseException:
            os.close(self.fd)
            raise
        digest = hashlib.sha256(os.path.abspath(opts.path).encode()).digest()
        self.serial = (opts.serial if opts.serial is not None
                       else digest[:10].hex()).encode()[:32]
        # NAA 3 (locally assigned, 64 bits) from the image's path, unless given (any
        # 64-bit NAA identifier, as QEMU's scsi-disk wwn)
        self.naa = (opts.wwn if opts.wwn is not None
                    else 0x3 << 60 | int.from_bytes(digest[10:18], "big") >> 4)
        state.capacity = size // BLOCK
        state.wce = True

    def check_resize(self) -> bool:
        """Take a changed image size; True (and a unit attention) if it changed."""
        blocks = _size(self.fd) // BLOCK
        if blocks == self.state.capacity:
            return False
        log.info("LUN %d: image resized: %d -> %d blocks", self.index, self.state.capacity,
                 blocks)
        self.state.capacity = blocks
        self.state.raise_ua(CAPACITY_CHANGED)
        self.state.event_owed = True
        return True

    def reset(self) -> None:
        """A new front-end, or RESET_DEVICE: the write cache as at start, nothing pending."""
        self.state.wce = True
        self.state.take_ua()

    def close(self) -> None:
        os.close(self.fd)

    # -- dispatch ---------------------------------------------------------------------------

    def execute(self, cdb: bytes, data_out: list[memoryview],
                data_in: list[memoryview]) -> tuple[int, bytes, int]:
        """Run one command: (status, sense data, bytes written into data_in)."""
        op = cdb[0]
        handler = _COMMANDS.get(op)
        try:
            if handler is None:
                raise Sense(ILLEGAL_REQUEST, INVALID_OPCODE, field=0)
            if op not in (0x12, 0xA0, 0x03):  # INQUIRY, REPORT LUNS, REQUEST SENSE: no UA
                ua = self.state.take_ua()
                if ua is not None:
                    raise Sense(UNIT_ATTENTION, ua)
                if self.state.capacity == 0:  # the image was cut below one block
                    raise Sense(NOT_READY, MEDIUM_NOT_PRESENT)
            return GOOD, b"", handler(self, cdb, data_out, data_in)
        except Sense as s:
            return CHECK_CONDITION, s.data(), 0
        except Busy:
            return BUSY, b"", 0
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # thin provisioning ran out
                return CHECK_CONDITION, Sense(DATA_PROTECT, SPACE_ALLOCATION_FAILED).data(), 0
            log.error("LUN %d: command %#04x: %s", self.index, op, e)
            code = WRITE_ERROR if op in _WRITES else UNRECOVERED_READ_ERROR
            return CHECK_CONDITION, Sense(MEDIUM_ERROR, code).data(), 0

    # -- helpers ----------------------------------------------------------------------------

    def _range(self, lba: int, blocks: int, lba_field: int = 2) -> None:
        if lba + blocks > self.state.capacity:
            raise Sense(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE, field=lba_field)

    def _writable(self) -> None:
        if self.read_only:
            raise Sense(DATA_PROTECT, WRITE_PROTECTED)

    @staticmethod
    def _answer(data: bytes, alloc: int, data_in: list[memoryview]) -> int:
        return iov_write(data_in, data[:alloc])

    def _sync_if(self, fua: bool) -> None:
        if fua or not self.state.wce:
            os.fdatasync(self.fd)

    # -- commands -----------------------------------------------------------------------------

    def test_unit_ready(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        return 0

    def request_sense(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        if cdb[1] & 0x01:  # DESC: descriptor format not supported
            raise bad_field(1)
        ua = self.state.take_ua()
        sense = (Sense(UNIT_ATTENTION, ua) if ua else Sense(NO_SENSE, (0, 0))).data()
        return self._answer(sense, cdb[4], din)

    def inquiry(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        alloc = _u16(cdb, 3)
        if cdb[1] & 0x01:
            return self._answer(self._vpd(cdb[2]), alloc, din)
        if cdb[2]:
            raise bad_field(2)
        std = bytearray(96)
        std[0] = 0x00  # connected, direct-access block device
        std[2] = 0x06  # SPC-4
        std[3] = 0x12  # HiSup, response data format 2
        std[4] = len(std) - 5
        std[7] = 0x02  # CmdQue
        std[8:16] = VENDOR
        std[16:32] = PRODUCT.ljust(16)
        std[32:36] = REVISION
        std[36:56] = self.serial[:20].ljust(20)  # vendor specific
        return self._answer(bytes(std), alloc, din)

    def _vpd(self, page: int) -> bytes:
        body: bytes | bytearray
        if page == 0x00:
            body = bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
        elif page == 0x80:
            body = self.serial
        elif page == 0x83:
            naa = bytes([0x01, 0x03, 0x00, 0x08]) + self.naa.to_bytes(8, "big")  # binary, NAA
            t10 = VENDOR + self.serial
            vendor = bytes([0x02, 0x01, 0x00, len(t10)]) + t10  # ASCII, T10 vendor id
            body = naa + vendor
        elif page == 0xB0:  # block limits
            body = bytearray(0x3C)
            # WSNZ (a WRITE SAME of 0 blocks is refused), the longest COMPARE AND WRITE,
            # granularity 8 (4 KiB), maximum, and no optimal length: Linux would take an
            # optimal length as its largest I/O
            body[0], body[1] = 0x01, 255
            struct.pack_into(">HII", body, 2, 8, MAX_XFER_BLOCKS, 0)
            struct.pack_into(">II", body, 16, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS)
            struct.pack_into(">I", body, 24, 8)  # unmap granularity: 4 KiB
            struct.pack_into(">Q", body, 32, MAX_WRITE_SAME_BLOCKS)
        elif page == 0xB1:  # block device characteristics: non-rotating
            body = bytes([0x00, 0x01]) + bytes(0x3A)
        elif page == 0xB2:  # logical block provisioning: UNMAP, WRITE SAME 10/16, zeros
            body = (bytes([0x00, 0xE4, 0x02, 0x00]) if not self.read_only  # thin
                    else bytes(4))  # read-only: fully provisioned, nothing to unmap
        else:
            raise bad_field(2)
        return bytes([0x00, page]) + len(body).to_bytes(2, "big") + bytes(body)

    def report_luns(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        return report_luns(cdb, din, self.lun_numbers)

    lun_numbers: list[int] = [0]  # set by the device: the LUNs target 0 has now

    def read_capacity10(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        last = self.state.capacity - 1
        return self._answer(struct.pack(">II", min(last, 0xFFFFFFFF), BLOCK), 8, din)

    def service_action_in(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        if cdb[1] & 0x1F != 0x10:  # READ CAPACITY (16) only
            raise bad_field(1)
        data = bytearray(32)
        struct.pack_into(">QI", data, 0, self.state.capacity - 1, BLOCK)
        data[13] = 3  # 8 logical blocks per physical block exponent: 4 KiB
        data[14] = 0xC0 if not self.read_only else 0  # LBPME, LBPRZ
        return self._answer(bytes(data), _u32(cdb, 10), din)

    def _rw(self, cdb: bytes, din: list[memoryview], out: list[memoryview], write: bool) -> int:
        op = cdb[0]
        if op in (0x08, 0x0A):  # 6-byte
            lba = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF
            blocks = cdb[4] or 256
            fua = False
        elif op in (0x28, 0x2A):
            lba, blocks, fua = _u32(cdb, 2), _u16(cdb, 7), bool(cdb[1] & 0x08)
        elif op in (0xA8, 0xAA):
            lba, blocks, fua = _u32(cdb, 2), _u32(cdb, 6), bool(cdb[1] & 0x08)
        else:  # 16-byte
            lba, blocks, fua = _u64(cdb, 2), _u32(cdb, 10), bool(cdb[1] & 0x08)
        if write:
            self._writable()
        if blocks > MAX_XFER_BLOCKS:
            raise bad_field(7 if op in (0x28, 0x2A) else 6 if op in (0xA8, 0xAA) else 10)
        self._range(lba, blocks)
        n = blocks * BLOCK
        if not n:
            return 0
        if write:
            if iov_len(out) < n:
                raise Overrun()
            write_from(self.fd, _first(out, n), lba * BLOCK, n)
            self._sync_if(fua)
            return 0
        if iov_len(din) < n:
            raise Overrun()
        bufs = _first(din, n)
        got = read_into(self.fd, bufs, lba * BLOCK, n)
        if got < n:  # the file shrank under us: never hand stale guest bytes back
            iov_write(bufs, bytes(n - got), got)
        return n

    def read(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        return self._rw(cdb, din, out, write=False)

    def write(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        return self._rw(cdb, din, out, write=True)

    def verify(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        if cdb[0] == 0x2F:
            lba, blocks = _u32(cdb, 2), _u16(cdb, 7)
        else:
            lba, blocks = _u64(cdb, 2), _u32(cdb, 10)
        bytchk = (cdb[1] >> 1) & 0x3
        if bytchk not in (0, 1):
            raise bad_field(1)
        self._range(lba, blocks)
        if bytchk and blocks:
            if blocks > MAX_XFER_BLOCKS:
                raise bad_field(7 if cdb[0] == 0x2F else 10)
            n = blocks * BLOCK
            if iov_len(out) < n:
                raise Overrun()
            self._compare(lba, iov_read(out, n), n)
        return 0

    def _compare(self, lba: int, want: bytes, n: int) -> None:
        have = os.pread(self.fd, n, lba * BLOCK).ljust(n, b"\0")
        if have != want:  # the first byte that differs: 4 KiB slices, then that slice
            at = next(o for o in range(0, n, 4096) if have[o : o + 4096] != want[o : o + 4096])
            first = next(i for i in range(at, min(at + 4096, n)) if have[i] != want[i])
            raise Sense(MISCOMPARE, MISCOMPARE_DURING_VERIFY, info=first)

    def write_same(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        self._writable()
        if cdb[0] == 0x41:
            lba, blocks, ndob = _u32(cdb, 2), _u16(cdb, 7), False
        else:
            lba, blocks, ndob = _u64(cdb, 2), _u32(cdb, 10), bool(cdb[1] & 0x01)
        unmap = bool(cdb[1] & 0x08)
        if cdb[1] & 0x16 or (not blocks) or blocks > MAX_WRITE_SAME_BLOCKS:  # 0x10: ANCHOR
            raise bad_field(1 if cdb[1] & 0x16 else 7 if cdb[0] == 0x41 else 10)
        self._range(lba, blocks)
        off, length = lba * BLOCK, blocks * BLOCK
        block = bytes(BLOCK) if ndob else iov_read(out, BLOCK)
        if len(block) < BLOCK:
            raise Overrun()
        if block == bytes(BLOCK):
            if unmap:
                punch(self.fd, off, length, required=True)
            else:
                zero(self.fd, off, length)
        else:  # a pattern is written out, so its length has a lower limit (Block Limits)
            if blocks > MAX_WRITE_SAME_PATTERN:
                raise bad_field(7 if cdb[0] == 0x41 else 10)
            chunk = block * min(blocks, 256)
            done = 0
            while done < length:
                done += os.pwrite(self.fd, chunk[: length - done], off + done)
        self._sync_if(False)
        return 0

    def unmap(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        self._writable()
        n = _u16(cdb, 7)
        if cdb[1] & 0x01:  # ANCHOR
            raise bad_field(1)
        if not n:
            return 0
        params = iov_read(out, min(n, MAX_PARAMS))
        if len(params) < 8 or n < 8:
            raise Sense(ILLEGAL_REQUEST, PARAM_LIST_LENGTH_ERROR)
        desc_len = min(_u16(params, 2), len(params) - 8) // 16 * 16  # a partial one: ignored
        ranges = [(_u64(params, o), _u32(params, o + 8)) for o in range(8, 8 + desc_len, 16)]
        if len(ranges) > MAX_UNMAP_DESCRIPTORS:
            raise bad_field(2, in_cdb=False)
        if sum(blocks for _, blocks in ranges) > MAX_UNMAP_BLOCKS:  # a limit per command
            raise bad_field(2, in_cdb=False)
        for i, (lba, blocks) in enumerate(ranges):
            if lba + blocks > self.state.capacity:
                raise Sense(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE, field=8 + 16 * i, in_cdb=False)
        for lba, blocks in ranges:
            if blocks:
                punch(self.fd, lba * BLOCK, blocks * BLOCK, required=True)
        self._sync_if(False)
        return 0

    def synchronize_cache(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        lba, blocks = (_u32(cdb, 2), _u16(cdb, 7)) if cdb[0] == 0x35 else (_u64(cdb, 2),
                                                                          _u32(cdb, 10))
        self._range(lba, blocks)
        if not self.read_only:
            os.fdatasync(self.fd)
        return 0

    def start_stop_unit(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        return 0

    # -- mode pages -------------------------------------------------------------------------------

    def _pages(self, page: int, pc: int) -> bytes:
        caching = bytearray(20)
        caching[0], caching[1] = 0x08, 18
        # WCE: changeable (pc 1), on by default (pc 2), as it is now (pc 0)
        caching[2] = 0x04 if pc in (1, 2) or self.state.wce else 0
        control = bytearray(12)
        control[0], control[1] = 0x0A, 10
        if pc != 1:  # nothing changeable; TST 0, D_SENSE 0 (fixed-format sense)
            control[8:10] = b"\xff\xff"  # busy timeout period: unlimited
        if page == 0x08:
            return bytes(caching)
        if page == 0x0A:
            return bytes(control)
        if page == 0x3F:
            return bytes(caching) + bytes(control)
        raise bad_field(2)

    def mode_sense(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        six = cdb[0] == 0x1A
        dbd = bool(cdb[1] & 0x08)
        pc, page = cdb[2] >> 6, cdb[2] & 0x3F
        if pc == 3:
            raise Sense(ILLEGAL_REQUEST, SAVING_NOT_SUPPORTED)
        if cdb[3] not in (0x00, 0xFF):  # subpages: none
            raise bad_field(3)
        pages = self._pages(page, pc)
        blockdesc = b"" if dbd else (min(self.state.capacity, 0xFFFFFFFF).to_bytes(4, "big")
                                     + b"\0" + BLOCK.to_bytes(3, "big"))
        wp = 0x80 if self.read_only else 0
        if six:
            header = bytes([3 + len(blockdesc) + len(pages), 0, wp | 0x10, len(blockdesc)])
            alloc = cdb[4]
        else:
            header = struct.pack(">HBBBBH", 6 + len(blockdesc) + len(pages), 0, wp | 0x10, 0,
                                 0, len(blockdesc))
            alloc = _u16(cdb, 7)
        return self._answer(header + blockdesc + pages, alloc, din)

    def mode_select(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        six = cdb[0] == 0x15
        if not cdb[1] & 0x10:  # PF: page format required
            raise bad_field(1)
        if cdb[1] & 0x01:  # SP: saving not supported
            raise Sense(ILLEGAL_REQUEST, SAVING_NOT_SUPPORTED)
        n = cdb[4] if six else _u16(cdb, 7)
        params = iov_read(out, min(n, MAX_PARAMS))
        if len(params) < n:
            raise Overrun()
        hlen = 4 if six else 8
        if not n:
            return 0
        if n < hlen:
            raise Sense(ILLEGAL_REQUEST, PARAM_LIST_LENGTH_ERROR)
        bdlen = params[3] if six else _u16(params, 6)
        pos = hlen + bdlen
        if bdlen not in (0, 8) or pos > n:
            raise bad_field(3 if six else 6, in_cdb=False)
        if bdlen and int.from_bytes(params[hlen + 5 : hlen + 8], "big") not in (0, BLOCK):
            raise bad_field(hlen + 5, in_cdb=False)
        wce = None
        while pos < n:
            if pos + 2 > n:
                raise Sense(ILLEGAL_REQUEST, PARAM_LIST_LENGTH_ERROR)
            code, plen = params[pos] & 0x3F, params[pos + 1]
            if params[pos] & 0x40 or pos + 2 + plen > n:  # SPF (subpage format): none
                raise bad_field(pos, in_cdb=False)
            page = params[pos : pos + 2 + plen]
            current = self._pages(code, 0) if code in (0x08, 0x0A) else None
            if current is None or plen != len(current) - 2:
                raise bad_field(pos, in_cdb=False)
            if code == 0x08:
                wce = bool(page[2] & 0x04)
                if (page[2] & ~0x04) != (current[2] & ~0x04) or page[3:] != current[3:]:
                    raise bad_field(pos + 2, in_cdb=False)
            elif page[2:] != current[2:]:
                raise bad_field(pos + 2, in_cdb=False)
            pos += 2 + plen
        if wce is not None and wce != self.state.wce:
            self.state.wce = wce
            log.info("LUN %d: write cache %s", self.index, "on" if wce else "off")
        return 0

    def maintenance_in(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        if cdb[1] & 0x1F != 0x0C:  # REPORT SUPPORTED OPERATION CODES only
            raise bad_field(1)
        options, alloc = cdb[2] & 0x07, _u32(cdb, 6)
        if cdb[2] & 0x80:  # RCTD: timeout descriptors not supported
            raise bad_field(2)
        if options == 0:  # all commands
            descs = b"".join(struct.pack(">BxHxBH", op, sa, 0x01 if sa_used else 0, _cdb_len(op))
                             for op, sa, sa_used in _supported())
            return self._answer(len(descs).to_bytes(4, "big") + descs, alloc, din)
        if options not in (1, 2, 3):
            raise bad_field(2)
        op, sa = cdb[3], _u16(cdb, 4)
        has_sa = op in {o for o, _, u in _supported() if u}
        if (options == 1 and has_sa) or (options == 2 and not has_sa):
            raise bad_field(2)  # 1: an opcode without service actions; 2: one with them
        entry = next(((o, s, u) for o, s, u in _supported()
                      if o == op and (not u or s == sa)), None)
        if entry is None:
            return self._answer(bytes([0, 0x01, 0, 0]), alloc, din)  # not supported
        length = _cdb_len(op)
        usage = bytes([op]) + b"\xff" * (length - 2) + b"\x00"  # all but the control byte
        return self._answer(bytes([0, 0x03, 0, length]) + bytes(usage), alloc, din)

    def compare_and_write(self, cdb: bytes, out: list[memoryview], din: list[memoryview]) -> int:
        self._writable()
        lba, blocks = _u64(cdb, 2), cdb[13]
        if not blocks:
            return 0
        if blocks > 255:
            raise bad_field(13)
        self._range(lba, blocks)
        n = blocks * BLOCK
        data = iov_read(out, 2 * n)
        if len(data) < 2 * n:
            raise Overrun()
        # atomic against other COMPARE AND WRITEs on any queue (each queue is a process);
        # plain writes from other queues do not take the lock. Never wait for it: whoever
        # holds it (another queue, or any process that can read the image) gets BUSY back
        # to the initiator, which retries
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, n, lba * BLOCK, os.SEEK_SET)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise Busy() from None
        try:
            self._compare(lba, data[:n], n)
            done = 0
            while done < n:
                done += os.pwrite(self.fd, data[n + done : 2 * n], lba * BLOCK + done)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, n, lba * BLOCK, os.SEEK_SET)
        self._sync_if(bool(cdb[1] & 0x08))
        return 0


def _first(iov: list[memoryview], n: int) -> list[memoryview]:
    """The first `n` bytes of `iov` (the list itself when it is exactly that)."""
    return iov if len(iov) == 1 and len(iov[0]) == n else iov_slice(iov, 0, n)


def _size(fd: int) -> int:
    """The image's size (a regular file or a block device)."""
    return os.lseek(fd, 0, os.SEEK_END)


class Busy(Exception):
    """The command cannot run now (status BUSY: the initiator retries)."""


class Overrun(Exception):
    """The buffers do not hold the transfer the CDB describes (a transport error)."""


def _lun_entry(lun: int) -> bytes:
    """SAM single-level LUN: peripheral device addressing up to 255, flat above."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | lun >> 8, lun & 0xFF]) + bytes(6)


def _cdb_len(op: int) -> int:
    return 6 if op < 0x20 else 10 if op < 0x60 else 16 if 0x80 <= op < 0xA0 else 12


_COMMANDS = {
    0x00: Lun.test_unit_ready, 0x03: Lun.request_sense, 0x12: Lun.inquiry,
    0xA0: Lun.report_luns, 0x25: Lun.read_capacity10, 0x9E: Lun.service_action_in,
    0x08: Lun.read, 0x28: Lun.read, 0xA8: Lun.read, 0x88: Lun.read,
    0x0A: Lun.write, 0x2A: Lun.write, 0xAA: Lun.write, 0x8A: Lun.write,
    0x2F: Lun.verify, 0x8F: Lun.verify, 0x41: Lun.write_same, 0x93: Lun.write_same,
    0x42: Lun.unmap, 0x35: Lun.synchronize_cache, 0x91: Lun.synchronize_cache,
    0x1A: Lun.mode_sense, 0x5A: Lun.mode_sense, 0x15: Lun.mode_select, 0x55: Lun.mode_select,
    0x1B: Lun.start_stop_unit, 0xA3: Lun.maintenance_in, 0x89: Lun.compare_and_write,
}
_WRITES = {0x0A, 0x2A, 0xAA, 0x8A, 0x41, 0x93, 0x42, 0x89}


def _supported() -> list[tuple[int, int, bool]]:
    """(opcode, service action, whether it has service actions), for RSOC."""
    out = [(op, 0, False) for op in sorted(_COMMANDS) if op not in (0x9E, 0xA3)]
    return [*out, (0x9E, 0x10, True), (0xA3, 0x0C, True)]
