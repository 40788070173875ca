"""Numbers of the vfio-user protocol: header size and version, message and transfer
limits, commands, header flags, and the ``<linux/vfio.h>`` enums and flag sets (device,
region, irq, DMA, dirty pages, device features, migration states) that payloads carry.
Plain values only: no behaviour, no I/O.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

HEADER_SIZE = 16
VERSION_MAJOR = 0  # what QEMU 10.1+ and libvfio-user speak
VERSION_MINOR = 0

#: Defaults of the VERSION capabilities, used when the peer leaves them out.
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096

#: QEMU never sends or accepts more than 16 fds in one message (VFIO_USER_MAX_MAX_FDS);
#: the spec itself sets no limit. A reader leaves room for this many.
MAX_MSG_FDS = 16
#: QEMU accepts max_data_xfer_size up to 64 MiB.
MAX_DATA_XFER_SIZE = 64 << 20
#: Room for the fixed part of the largest data-carrying payload plus data.
DATA_OVERHEAD = 64
#: Default bound on a whole message, checked by decode_header before a body is read.
DEFAULT_MAX_MESSAGE_SIZE = HEADER_SIZE + DATA_OVERHEAD + DEFAULT_MAX_DATA_XFER_SIZE + 65536


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11  # server -> client
    DMA_WRITE = 12  # server -> client
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # dropped from the spec; still in QEMU's protocol.h
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class Peer(IntEnum):
    """Who sends a command."""

    CLIENT = 0  # the VMM (QEMU)
    SERVER = 1  # the device


class MsgType(IntEnum):
    COMMAND = 0
    REPLY = 1


class HeaderFlag(IntFlag):
    TYPE_MASK = 0xF
    NO_REPLY = 0x10
    ERROR = 0x20


# Plain ints: `~` on an IntFlag only complements the bits the flag defines.
KNOWN_HEADER_FLAGS = int(HeaderFlag.TYPE_MASK | HeaderFlag.NO_REPLY | HeaderFlag.ERROR)


class PciRegion(IntEnum):
    """VFIO_PCI_*_REGION_INDEX."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9


class PciIrq(IntEnum):
    """VFIO_PCI_*_IRQ_INDEX."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5


class DeviceFlag(IntFlag):
    """VFIO_DEVICE_FLAGS_*."""

    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7
    CDX = 1 << 8


class RegionFlag(IntFlag):
    """VFIO_REGION_INFO_FLAG_*."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(IntEnum):
    """VFIO_REGION_INFO_CAP_*."""

    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3
    NVLINK2_SSATGT = 4
    NVLINK2_LNKSPD = 5


class RegionType(IntEnum):
    """VFIO_REGION_TYPE_* (the ``type`` of a TYPE capability)."""

    GFX = 1
    CCW = 2
    MIGRATION_DEPRECATED = 3
    PCI_VENDOR_TYPE = 1 << 31  # or'ed with a 16-bit PCI vendor id


REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF


class IrqInfoFlag(IntFlag):
    """VFIO_IRQ_INFO_*."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(IntFlag):
    """VFIO_IRQ_SET_*: exactly one DATA_* and one ACTION_* bit."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_MASK = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
IRQ_SET_ACTION_MASK = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER


class DmaMapFlag(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlag(IntFlag):
    GET_DIRTY_BITMAP = 1 << 0  # from older spec versions: rejected by check_supported
    ALL = 1 << 1  # QEMU sends it (address 0, size 0) to drop every mapping


class DirtyPagesFlag(IntFlag):
    START = 1 << 0
    STOP = 1 << 1
    GET_BITMAP = 1 << 2


class IoFdType(IntEnum):
    IOEVENTFD = 0
    IOREGIONFD = 1


class DeviceFeatureFlag(IntFlag):
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


DEVICE_FEATURE_MASK = 0xFFFF


class DeviceFeatureIndex(IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigState(IntEnum):
    """vfio_device_mig_state."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7
