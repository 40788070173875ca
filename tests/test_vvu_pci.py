"""Register models of the vvu device: PCI config space, MSI-X, virtio-pci transport."""

from __future__ import annotations

import struct

import pytest

from vhostuser.protocol.constants import DeviceStatus
from vhostuser.protocol.virtio_pci import NO_VECTOR, CapId, Common, VirtioCfgType
from vhostuser.vvu.pci import (
    Bar,
    Capability,
    MsixTable,
    PciAccessError,
    PciConfig,
    msix_cap,
    virtio_cap,
    virtio_cap64,
)
from vhostuser.vvu.virtio_pci import (
    VirtioPciBar,
    VirtioPciState,
)

VIRTIO_F_VERSION_1, VIRTIO_F_RING_RESET = 32, 40  # virtio 1.x §6: bit numbers
V1 = 1 << VIRTIO_F_VERSION_1
NVEC = 5


def u16(b: bytes) -> int:
    return struct.unpack("<H", b)[0]


def u32(b: bytes) -> int:
    return struct.unpack("<I", b)[0]


class FakeConfig:
    def __init__(self, size: int = 24) -> None:
        self.data = bytearray(range(size))
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []

    def kw(self) -> dict:
        return {
            "on_reset": lambda: self.log.append(("reset", -1)),
            "on_queue_enable": lambda i: self.log.append(("enable", i)),
            "on_queue_reset": lambda i: self.log.append(("qreset", i)),
            "on_notify": lambda i: self.log.append(("notify", i)),
        }


def make_state(features: int = V1 | 0b101, num_queues: int = 2, max_size: int = 256,
               events: Events | None = None) -> VirtioPciState:
    return VirtioPciState(features, num_queues, max_size, FakeConfig(), nvec=NVEC,
                          **(events.kw() if events else {}))


def vvu_like(msix: MsixTable | None = None) -> tuple[PciConfig, VirtioPciState]:
    """The layout of docs/vvu-design.md."""
    state = make_state()
    vbar = VirtioPciBar(state, 0, 24)
    caps = [*vbar.capabilities(),
            virtio_cap(6, 2, 0, 0x1000, extra=struct.pack("<I", 4)),  # doorbells
            virtio_cap(7, 2, 0x1000, 4),  # notification structure
            virtio_cap64(VirtioCfgType.SHARED_MEMORY, 4, 0, 1 << 36, id=0),
            msix_cap(NVEC, 1, 0, 1, 0x800)]
    bars = [Bar(0, 0x4000, mem64=False), Bar(1, 0x1000, mem64=False),
            Bar(2, 0x2000, mem64=False), Bar(4, 1 << 36, prefetch=True)]
    cfg = PciConfig(0x1AF4, 0x107F, subsys_vendor=0x1AF4, subsys_id=0x40,
                    class_code=0xFF0000, revision=1, bars=bars, caps=caps, msix=msix)
    return cfg, state


def walk(cfg: PciConfig) -> list[tuple[int, int]]:
    """(offset, cap id) of every capability, following next pointers as a driver does."""
    assert u16(cfg.read(6, 2)) & 0x10
    out, at, seen = [], cfg.read(0x34, 1)[0], set()
    while at:
        assert at % 4 == 0 and at >= 0x40 and at not in seen
        seen.add(at)
        out.append((at, cfg.read(at, 1)[0]))
        at = cfg.read(at + 1, 1)[0]
    return out


def virtio_caps(cfg: PciConfig) -> dict[int, list[tuple[int, int, int, int, bytes]]]:
    """cfg_type -> [(bar, id, offset, length, extra)] parsed from config reads."""
    found: dict[int, list] = {}
    for at, cap_id in walk(cfg):
        if cap_id != CapId.VENDOR:
            continue
        cap_len, cfg_type, bar, ident = cfg.read(at + 2, 4)
        offset, length = u32(cfg.read(at + 8, 4)), u32(cfg.read(at + 12, 4))
        extra = b"".join(cfg.read(at + i, 1) for i in range(16, cap_len))
        found.setdefault(cfg_type, []).append((bar, ident, offset, length, extra))
    return found


# ------------------------------------------------------------------------- PCI header


def test_header_fields():
    cfg, _ = vvu_like()
    assert u16(cfg.read(0, 2)) == 0x1AF4 and u16(cfg.read(2, 2)) == 0x107F
    assert u32(cfg.read(8, 4)) == 0xFF000001  # class code << 8 | revision
    assert u32(cfg.read(0x2C, 4)) == 0x0040_1AF4
    assert cfg.read(0x0E, 1) == b"\0"  # header type 0, single function
    assert cfg.read(0x3D, 1) == b"\0"  # no INTx by default
    assert cfg.read(0x34, 1) == b"\x40"
    assert len(cfg.dump()) == 256


def test_bar_sizing_32bit():
    cfg, _ = vvu_like()
    cfg.write(0x10, b"\xff" * 4)
    assert u32(cfg.read(0x10, 4)) == 0xFFFFC000  # 16 KiB, 32-bit, not prefetchable
    cfg.write(0x10, struct.pack("<I", 0xFEB00000))
    assert cfg.bar_address(0) == 0xFEB00000
    assert u32(cfg.read(0x10, 4)) == 0xFEB00000
    cfg.write(0x10, struct.pack("<I", 0xFEB01234))  # bits below the size are hardwired
    assert cfg.bar_address(0) == 0xFEB00000


def test_bar_sizing_64bit_prefetch():
    cfg, _ = vvu_like()
    cfg.write(0x20, b"\xff" * 4)
    cfg.write(0x24, b"\xff" * 4)
    assert u32(cfg.read(0x20, 4)) == 0x0000000C  # 64-bit, prefetchable, all low bits size
    assert u32(cfg.read(0x24, 4)) == 0xFFFFFFF0  # 2^36
    cfg.write(0x20, struct.pack("<I", 0))
    cfg.write(0x24, struct.pack("<I", 0x80))
    assert cfg.bar_address(4) == 0x80_0000_0000
    small = PciConfig(1, 2, subsys_vendor=0, subsys_id=0, class_code=0, revision=0,
                      bars=[Bar(0, 0x1000, prefetch=True), Bar(2, 0x100, mem64=False,
                                                               prefetch=True)], caps=[])
    small.write(0x10, b"\xff" * 4)
    small.write(0x14, b"\xff" * 4)
    small.write(0x18, b"\xff" * 4)
    assert u32(small.read(0x10, 4)) == 0xFFFFF00C
    assert u32(small.read(0x14, 4)) == 0xFFFFFFFF
    assert u32(small.read(0x18, 4)) == 0xFFFFFF08
    assert small.bar_address(0) == 0xFFFFFFFF_FFFFF000
    assert small.read(0x34, 1) == b"\0" and not u16(small.read(6, 2)) & 0x10


def test_unused_bars_and_rom_read_zero():
    cfg, _ = vvu_like()
    for off in (0x1C, 0x30):  # BAR3 (unused), expansion ROM
        cfg.write(off, b"\xff" * 4)
        assert cfg.read(off, 4) == bytes(4)
    with pytest.raises(ValueError):
        cfg.bar_address(3)
    with pytest.raises(ValueError):
        cfg.bar_address(5)  # upper half of BAR4


@pytest.mark.parametrize("kwargs", [
    {"index": 0, "size": 0x1800}, {"index": 0, "size": 8}, {"index": 5, "size": 0x1000},
    {"index": 6, "size": 0x1000, "mem64": False},
    {"index": 0, "size": 1 << 32, "mem64": False},
])
def test_bad_bars(kwargs):
    with pytest.raises(ValueError):
        Bar(**kwargs)


def test_overlapping_bars():
    with pytest.raises(ValueError):
        PciConfig(1, 2, subsys_vendor=0, subsys_id=0, class_code=0, revision=0,
                  bars=[Bar(0, 0x1000), Bar(1, 0x1000, mem64=False)], caps=[])


def test_command_status_and_read_only():
    cfg, _ = vvu_like()
    cfg.write(4, b"\xff\xff")
    assert u16(cfg.read(4, 2)) == 0x0406
    assert cfg.memory_enabled and cfg.bus_master and cfg.intx_disabled
    cfg.write(4, b"\x02")
    assert cfg.memory_enabled and not cfg.bus_master
    cfg.write(6, b"\xff\xff")  # write-1-to-clear bits: nothing set, capability bit stays
    assert u16(cfg.read(6, 2)) == 0x0010
    cfg.set_interrupt_status(True)
    assert u16(cfg.read(6, 2)) == 0x0018
    before = cfg.dump()
    cfg.write(0, b"\0\0\0\0")  # ids
    cfg.write(0x08, b"\0\0\0\0")  # class, revision
    cfg.write(0x40, b"\0\0\0\0")  # a capability header
    cfg.write(0x3D, b"\x01")  # interrupt pin
    assert cfg.dump() == before
    cfg.write(0x3C, b"\x0b")  # interrupt line: scratch
    cfg.write(0x0C, b"\x10")  # cache line size: scratch
    assert cfg.read(0x3C, 1) == b"\x0b" and cfg.read(0x0C, 1) == b"\x10"


def test_reset_restores_power_on_image():
    msix = MsixTable(NVEC)
    cfg, _ = vvu_like(msix)
    image = cfg.dump()
    cfg.write(4, b"\x06\x00")
    cfg.write(0x10, b"\xff\xff\xff\xff")
    at = dict((cid, off) for off, cid in walk(cfg))[CapId.MSIX]
    cfg.write(at + 3, b"\x80")
    msix.write(12, b"\0\0\0\0")
    cfg.reset()
    assert cfg.dump() == image and not msix.enabled and msix.masked(0)


@pytest.mark.parametrize("offset,size", [(0, 3), (0, 8), (0, 0), (255, 2), (256, 1), (-1, 1)])
def test_config_access_errors(offset, size):
    cfg, _ = vvu_like()
    with pytest.raises(PciAccessError):
        cfg.read(offset, size)
    with pytest.raises(PciAccessError):
        cfg.write(offset, b"\0" * size if size >= 0 else b"")


def test_unaligned_access_allowed():
    cfg, _ = vvu_like()
    assert cfg.read(1, 2) == bytes([0x1A, 0x7F])
    assert cfg.read(254, 2) == b"\0\0"


# --------------------------------------------------------------------- capability chain


def test_capability_chain_walk():
    cfg, state = vvu_like()
    chain = walk(cfg)
    assert [cid for _, cid in chain] == [9] * 7 + [CapId.MSIX]
    caps = virtio_caps(cfg)
    assert caps[VirtioCfgType.COMMON] == [(0, 0, 0x0000, 0x40, b"")]
    assert caps[VirtioCfgType.ISR] == [(0, 0, 0x1000, 4, b"")]
    assert caps[VirtioCfgType.DEVICE] == [(0, 0, 0x2000, 24, b"")]
    assert caps[VirtioCfgType.NOTIFY] == [(0, 0, 0x3000, state.notify_size,
                                           struct.pack("<I", 4))]
    assert caps[6] == [(2, 0, 0, 0x1000, struct.pack("<I", 4))]
    assert caps[7] == [(2, 0, 0x1000, 4, b"")]
    [(bar, ident, off_lo, len_lo, extra)] = caps[VirtioCfgType.SHARED_MEMORY]
    off_hi, len_hi = struct.unpack("<II", extra)
    assert (bar, ident, off_hi << 32 | off_lo, len_hi << 32 | len_lo) == (4, 0, 0, 1 << 36)

    at = dict((cid, off) for off, cid in walk(cfg))[CapId.MSIX]
    ctrl, table, pba = struct.unpack("<HII", cfg.read(at + 2, 2) + cfg.read(at + 4, 4)
                                     + cfg.read(at + 8, 4))
    assert (ctrl & 0x7FF) + 1 == NVEC and not ctrl & 0xC000
    assert (table & 7, table & ~7, pba & 7, pba & ~7) == (1, 0, 1, 0x800)


def test_capability_builders_validate():
    with pytest.raises(ValueError):
        msix_cap(NVEC, 1, 4, 1, 0x800)  # table offset not 8-aligned
    with pytest.raises(ValueError):
        msix_cap(0, 1, 0, 1, 0x800)
    with pytest.raises(ValueError):
        virtio_cap(1, 6, 0, 0x40)
    with pytest.raises(ValueError):
        PciConfig(1, 2, subsys_vendor=0, subsys_id=0, class_code=0, revision=0, bars=[],
                  caps=[Capability(0x09, bytes(60))] * 4)  # 4 * 64 bytes > 192
    with pytest.raises(ValueError):  # the MSI-X table lies outside its BAR
        PciConfig(1, 2, subsys_vendor=0, subsys_id=0, class_code=0, revision=0,
                  bars=[Bar(1, 0x40, mem64=False)], caps=[msix_cap(NVEC, 1, 0, 1, 0x800)])
    with pytest.raises(ValueError):  # table and capability disagree
        vvu_like(MsixTable(NVEC + 1))


# --------------------------------------------------------------------------- MSI-X


def msix_setup() -> tuple[PciConfig, MsixTable, int, list[int]]:
    msix = MsixTable(NVEC)
    cfg, _ = vvu_like(msix)
    at = dict((cid, off) for off, cid in walk(cfg))[CapId.MSIX]
    return cfg, msix, at + 2, []


def test_msix_control_bits_via_config():
    cfg, msix, ctrl, _ = msix_setup()
    cfg.write(ctrl, b"\xff\xff")
    assert u16(cfg.read(ctrl, 2)) == 0xC000 | (NVEC - 1)  # table size is read-only
    assert cfg.msix_enabled and cfg.msix_masked and msix.enabled and msix.function_masked
    cfg.write(ctrl + 1, b"\x80")
    assert cfg.msix_enabled and not cfg.msix_masked and not msix.function_masked


def test_msix_table_registers():
    msix = MsixTable(NVEC)
    assert msix.table_size == 80 and msix.pba_size == 8
    assert all(msix.masked(v) for v in range(NVEC))
    msix.write(16, struct.pack("<II", 0xFEE00003, 0x1))
    msix.write(24, struct.pack("<II", 0x4021, 0xFFFFFFFE))
    assert msix.read(16, 8) == struct.pack("<II", 0xFEE00000, 1)  # low address bits are 0
    assert u32(msix.read(28, 4)) == 0 and not msix.masked(1)  # reserved control bits are 0
    assert msix.message(1) == (0x1_FEE00000, 0x4021)
    for offset, size in ((2, 4), (4, 8), (0, 2), (0, 16), (80, 4), (-4, 4)):
        with pytest.raises(PciAccessError):
            msix.read(offset, size)
    with pytest.raises(PciAccessError):
        msix.write(1, b"\0\0\0\0")
    with pytest.raises(ValueError):
        msix.masked(NVEC)


def test_msix_fire_pending_and_unmask():
    cfg, msix, ctrl, sent = msix_setup()
    msix.write(3 * 16 + 12, b"\0\0\0\0")  # unmask vector 3
    assert not msix.fire(3, sent.append)  # MSI-X disabled: pending
    assert msix.pending(3) and u32(msix.read_pba(0, 4)) == 1 << 3 and sent == []
    cfg.write(ctrl + 1, b"\xc0")  # enable, function masked
    assert sent == [] and msix.pending(3)
    cfg.write(ctrl + 1, b"\x80")  # function unmasked: the pending message goes out
    assert sent == [3] and not msix.pending(3) and msix.read_pba(0, 8) == bytes(8)

    assert msix.fire(3, sent.append) and sent == [3, 3]
    assert not msix.fire(0, sent.append)  # vector 0 is masked
    assert msix.pending(0) and sent == [3, 3]
    msix.write(12, struct.pack("<I", 1))  # still masked: stays pending
    assert msix.pending(0)
    msix.write(8, struct.pack("<II", 0x55, 0))  # data + control in one qword: unmask
    assert sent == [3, 3, 0] and not msix.pending(0)
    msix.write_pba(0, b"\xff" * 8)  # read-only
    assert msix.read_pba(0, 8) == bytes(8)
    with pytest.raises(PciAccessError):
        msix.read_pba(8, 4)


def test_msix_function_mask_holds_all():
    cfg, msix, ctrl, sent = msix_setup()
    for v in range(NVEC):
        msix.write(16 * v + 12, b"\0\0\0\0")
    cfg.write(ctrl + 1, b"\xc0")
    for v in (4, 1):
        msix.fire(v, sent.append)
    assert sent == [] and u32(msix.read_pba(0, 4)) == 0b10010
    cfg.write(ctrl + 1, b"\x80")
    assert sent == [1, 4]


# ------------------------------------------------------------------- virtio common cfg


def cr(state: VirtioPciState, reg: int, size: int) -> int:
    return int.from_bytes(state.common_read(reg, size), "little")


def cw(state: VirtioPciState, reg: int, size: int, value: int) -> None:
    state.common_write(reg, value.to_bytes(size, "little"))


def negotiate(state: VirtioPciState, features: int) -> int:
    for sel in (0, 1):
        cw(state, Common.DRIVER_FEATURE_SELECT, 4, sel)
        cw(state, Common.DRIVER_FEATURE, 4, features >> 32 * sel & 0xFFFFFFFF)
    cw(state, Common.DEVICE_STATUS, 1, 1 | 2 | 8)
    return cr(state, Common.DEVICE_STATUS, 1)


def test_feature_select_windows():
    state = make_state(features=V1 | 0xF00D | 1 << 40)
    assert cr(state, Common.DEVICE_FEATURE, 4) == 0xF00D
    cw(state, Common.DEVICE_FEATURE_SELECT, 4, 1)
    assert cr(state, Common.DEVICE_FEATURE_SELECT, 4) == 1
    assert cr(state, Common.DEVICE_FEATURE, 4) == 0x101
    cw(state, Common.DEVICE_FEATURE_SELECT, 4, 7)
    assert cr(state, Common.DEVICE_FEATURE, 4) == 0
    cw(state, Common.DRIVER_FEATURE_SELECT, 4, 1)
    cw(state, Common.DRIVER_FEATURE, 4, 1)
    cw(state, Common.DRIVER_FEATURE_SELECT, 4, 0)
    cw(state, Common.DRIVER_FEATURE, 4, 0xD)
    assert state.driver_features == V1 | 0xD
    assert cr(state, Common.DRIVER_FEATURE, 4) == 0xD
    cw(state, Common.DRIVER_FEATURE_SELECT, 4, 1000)  # beyond the kept windows: dropped
    cw(state, Common.DRIVER_FEATURE, 4, 0xFFFFFFFF)
    assert state.driver_features == V1 | 0xD and cr(state, Common.DRIVER_FEATURE, 4) == 0
    assert cr(state, Common.NUM_QUEUES, 2) == 2


def test_features_ok_accepted_and_frozen():
    state = make_state()
    assert negotiate(state, V1 | 0b100) == 0xB and state.features_ok
    cw(state, Common.DRIVER_FEATURE_SELECT, 4, 0)
    cw(state, Common.DRIVER_FEATURE, 4, 0b001)  # after FEATURES_OK: ignored
    assert state.driver_features == V1 | 0b100


@pytest.mark.parametrize("features", [V1 | 0b10, 0b1, V1 | 1 << 63])
def test_features_ok_refused(features):
    state = make_state()  # offers V1 | 0b101
    assert negotiate(state, features) == 0x3 and not state.features_ok
    assert negotiate(state, V1 | 0b1) == 0xB  # a corrected set is accepted


def test_reset_clears_everything():
    ev = Events()
    state = make_state(events=ev)
    negotiate(state, V1)
    cw(state, Common.CONFIG_MSIX_VECTOR, 2, 0)
    cw(state, Common.QUEUE_SELECT, 2, 1)
    cw(state, Common.QUEUE_SIZE, 2, 64)
    cw(state, Common.QUEUE_MSIX_VECTOR, 2, 2)
    cw(state, Common.QUEUE_DESC, 8, 0x1000)
    cw(state, Common.QUEUE_ENABLE, 2, 1)
    cw(state, Common.DEVICE_FEATURE_SELECT, 4, 1)
    state.config_changed()
    gen = state.config_generation
    cw(state, Common.DEVICE_STATUS, 1, 0)
    assert ev.log == [("enable", 1), ("reset", -1)]
    assert state.status == 0 and state.driver_features == 0 and state.isr == 0
    assert cr(state, Common.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    assert cr(state, Common.QUEUE_SELECT, 2) == 0
    assert cr(state, Common.DEVICE_FEATURE_SELECT, 4) == 0
    for q in state.queues:
        assert (q.size, q.enabled, q.desc, q.driver, q.device, q.msix_vector) == \
            (256, False, 0, 0, 0, NO_VECTOR)
    assert state.config_generation == gen  # not reset


def test_queue_setup_and_enable():
    ev = Events()
    state = make_state(events=ev)
    cw(state, Common.QUEUE_SELECT, 2, 1)
    assert cr(state, Common.QUEUE_SIZE, 2) == 256
    assert cr(state, Common.QUEUE_NOTIFY_OFF, 2) == 1
    assert cr(state, Common.QUEUE_NOTIFY_DATA, 2) == 1
    for bad in (0, 3, 100, 512):
        cw(state, Common.QUEUE_SIZE, 2, bad)
        assert cr(state, Common.QUEUE_SIZE, 2) == 256
    cw(state, Common.QUEUE_SIZE, 2, 128)
    cw(state, Common.QUEUE_DESC, 4, 0x1000)  # lo/hi halves
    cw(state, Common.QUEUE_DESC + 4, 4, 0x2)
    cw(state, Common.QUEUE_DRIVER, 8, 0x3_0000_2000)  # one qword
    cw(state, Common.QUEUE_DEVICE, 4, 0x3000)
    cw(state, Common.QUEUE_DEVICE + 2, 2, 0xFFFF)  # half a dword: ignored
    assert cr(state, Common.QUEUE_DESC, 8) == 0x2_0000_1000
    assert cr(state, Common.QUEUE_DRIVER + 4, 4) == 3
    cw(state, Common.QUEUE_ENABLE, 2, 2)  # not 1: ignored
    assert ev.log == [] and cr(state, Common.QUEUE_ENABLE, 2) == 0
    cw(state, Common.QUEUE_ENABLE, 2, 1)
    cw(state, Common.QUEUE_ENABLE, 2, 1)
    assert ev.log == [("enable", 1)] and cr(state, Common.QUEUE_ENABLE, 2) == 1
    cw(state, Common.QUEUE_SIZE, 2, 64)  # frozen once enabled
    cw(state, Common.QUEUE_DESC, 4, 0x9000)
    q = state.queues[1]
    assert (q.size, q.enabled, q.desc, q.driver, q.device) == \
        (128, True, 0x2_0000_1000, 0x3_0000_2000, 0x3000)
    assert not state.queues[0].enabled and state.queues[0].size == 256


def test_nonexistent_queue_selected():
    state = make_state()
    cw(state, Common.QUEUE_SELECT, 2, 5)
    assert cr(state, Common.QUEUE_SELECT, 2) == 5
    assert cr(state, Common.QUEUE_SIZE, 2) == 0 and cr(state, Common.QUEUE_ENABLE, 2) == 0
    assert cr(state, Common.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    cw(state, Common.QUEUE_ENABLE, 2, 1)
    cw(state, Common.QUEUE_DESC, 8, 0x1000)
    assert not any(q.enabled or q.desc for q in state.queues)


def test_vector_validation():
    state = make_state()
    cw(state, Common.CONFIG_MSIX_VECTOR, 2, NVEC - 1)
    assert cr(state, Common.CONFIG_MSIX_VECTOR, 2) == NVEC - 1
    cw(state, Common.CONFIG_MSIX_VECTOR, 2, NVEC)
    assert cr(state, Common.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    cw(state, Common.QUEUE_MSIX_VECTOR, 2, 2)
    assert cr(state, Common.QUEUE_MSIX_VECTOR, 2) == 2 and state.queues[0].msix_vector == 2
    cw(state, Common.QUEUE_MSIX_VECTOR, 2, 0x8000)
    assert cr(state, Common.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    cw(state, Common.QUEUE_MSIX_VECTOR, 2, NO_VECTOR)
    assert cr(state, Common.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    no_msix = VirtioPciState(V1, 1, 8, FakeConfig(), nvec=0)
    cw(no_msix, Common.CONFIG_MSIX_VECTOR, 2, 0)
    assert cr(no_msix, Common.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR


def common_image(state: VirtioPciState) -> bytes:
    return b"".join(state.common_read(off, 8) for off in range(0, 0x40, 8))


def test_read_only_and_partial_writes_ignored():
    state = make_state()
    before = common_image(state)
    cw(state, Common.DEVICE_FEATURE, 4, 0)
    cw(state, Common.NUM_QUEUES, 2, 9)
    cw(state, Common.CONFIG_GENERATION, 1, 9)
    cw(state, Common.QUEUE_NOTIFY_OFF, 2, 9)
    cw(state, Common.DEVICE_STATUS, 2, 0x0F)  # status is one byte
    cw(state, Common.QUEUE_SELECT, 4, 0x10001)
    assert common_image(state) == before
    for offset, size in ((0, 3), (0x3E, 4), (0x40, 1), (-1, 1)):
        with pytest.raises(PciAccessError):
            state.common_read(offset, size)


def test_queue_reset_only_when_negotiated():
    ev = Events()
    state = make_state(features=V1 | 1 << VIRTIO_F_RING_RESET, events=ev)
    cw(state, Common.QUEUE_DESC, 8, 0x1000)
    cw(state, Common.QUEUE_ENABLE, 2, 1)
    cw(state, Common.QUEUE_RESET, 2, 1)  # not negotiated yet: ignored
    assert state.queues[0].enabled and ev.log == [("enable", 0)]
    assert negotiate(state, V1 | 1 << VIRTIO_F_RING_RESET) == 0xB
    cw(state, Common.QUEUE_MSIX_VECTOR, 2, 1)
    cw(state, Common.QUEUE_RESET, 2, 1)
    assert ev.log[-1] == ("qreset", 0)
    assert cr(state, Common.QUEUE_RESET, 2) == 0 and cr(state, Common.QUEUE_ENABLE, 2) == 0
    q = state.queues[0]
    assert (q.desc, q.size, q.msix_vector) == (0, 256, NO_VECTOR)
    cw(state, Common.QUEUE_ENABLE, 2, 1)  # re-enable after the reset
    assert ev.log[-1] == ("enable", 0)


def test_config_changed_and_needs_reset():
    state = make_state()
    cw(state, Common.CONFIG_MSIX_VECTOR, 2, 4)
    gen = cr(state, Common.CONFIG_GENERATION, 1)
    assert state.config_changed() == 4
    assert cr(state, Common.CONFIG_GENERATION, 1) == (gen + 1) & 0xFF
    assert state.isr_read(0, 1) == b"\x02"
    assert state.set_needs_reset() is None  # before DRIVER_OK: no notification
    assert state.status & DeviceStatus.DEVICE_NEEDS_RESET
    cw(state, Common.DEVICE_STATUS, 1, 0x0F)
    assert cr(state, Common.DEVICE_STATUS, 1) == 0x47  # FEATURES_OK refused, NEEDS_RESET kept
    assert state.set_needs_reset() == 4 and state.isr == 2
    cw(state, Common.DEVICE_STATUS, 1, 0)
    assert state.status == 0


def test_isr_read_to_clear():
    state = make_state()
    cw(state, Common.QUEUE_MSIX_VECTOR, 2, 3)
    assert state.queue_interrupt(0) == 3
    state.config_changed()
    assert state.isr_read(1, 1) == b"\0" and state.isr == 3  # only offset 0 clears
    assert state.isr_read(0, 4) == b"\x03\0\0\0"
    assert state.isr_read(0, 1) == b"\0"
    state.isr_write(0, b"\x03")  # read-only
    assert state.isr == 0
    with pytest.raises(PciAccessError):
        state.isr_read(4, 1)


def test_notify_dispatch():
    ev = Events()
    state = make_state(num_queues=3, events=ev)
    for index in (0, 2):
        cw(state, Common.QUEUE_SELECT, 2, index)
        cw(state, Common.QUEUE_ENABLE, 2, 1)
    ev.log.clear()
    state.notify_write(8, struct.pack("<H", 2))
    state.notify_write(4, struct.pack("<H", 1))  # queue 1 not enabled: ignored
    state.notify_write(0, struct.pack("<I", 0x1234_0000))  # NOTIFICATION_DATA form
    state.notify_write(2, struct.pack("<H", 0))  # not at a queue's offset
    assert ev.log == [("notify", 2), ("notify", 0)]
    assert state.notify_read(0, 2) == b"\0\0"
    with pytest.raises(PciAccessError):
        state.notify_write(12, b"\0\0")
    with pytest.raises(PciAccessError):
        state.notify_write(0, b"\0")


def test_virtio_bar_routing():
    ev = Events()
    state = make_state(events=ev)
    vbar = VirtioPciBar(state, 0, 24)
    assert vbar.read(VirtioPciBar.COMMON + Common.NUM_QUEUES, 2) == b"\x02\0"
    vbar.write(VirtioPciBar.COMMON + Common.QUEUE_ENABLE, b"\x01\0")
    vbar.write(VirtioPciBar.NOTIFY, b"\0\0")
    assert ev.log == [("enable", 0), ("notify", 0)]
    state.config_changed()
    assert vbar.read(VirtioPciBar.ISR, 1) == b"\x02" and state.isr == 0
    assert vbar.read(VirtioPciBar.DEVICE + 4, 4) == bytes([4, 5, 6, 7])
    vbar.write(VirtioPciBar.DEVICE + 0, b"\x01\0\0\0")
    assert state.config.writes == [(0, b"\x01\0\0\0")]
    assert vbar.read(VirtioPciBar.DEVICE + 24, 4) == bytes(4)  # past the structure
    assert vbar.read(VirtioPciBar.COMMON + 0x800, 4) == bytes(4)
    vbar.write(VirtioPciBar.NOTIFY + 0x100, b"\0\0")  # past the queues: ignored
    assert ev.log == [("enable", 0), ("notify", 0)]
    with pytest.raises(PciAccessError):
        vbar.read(VirtioPciBar.SIZE, 4)
    with pytest.raises(PciAccessError):
        vbar.read(0, 3)


def test_state_validation():
    with pytest.raises(ValueError):
        VirtioPciState(0, 1, 8, FakeConfig(), nvec=1)  # no VERSION_1
    with pytest.raises(ValueError):
        VirtioPciState(V1, 1, 100, FakeConfig(), nvec=1)
    with pytest.raises(ValueError):
        VirtioPciState(V1, 0, 8, FakeConfig(), nvec=1)
