"""The virtio 1.x PCI transport's ABI (virtio 1.x §4.1), as the device model (vvu/) and
the driver (appliance/) both use it: PCI capability ids, the cfg_types of virtio's vendor
capabilities, the common configuration structure's offsets, "no MSI-X vector"."""

from __future__ import annotations

from enum import IntEnum

NO_VECTOR = 0xFFFF  # VIRTIO_MSI_NO_VECTOR


class CapId(IntEnum):
    """PCI capability ids."""

    VENDOR = 0x09  # virtio's structures are vendor-specific capabilities
    MSIX = 0x11


class VirtioCfgType(IntEnum):
    """``cfg_type`` of a virtio vendor capability (virtio 1.x §4.1.4)."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5
    SHARED_MEMORY = 8
    VENDOR = 9


class Common(IntEnum):
    """Byte offsets in ``struct virtio_pci_common_cfg``."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30
    QUEUE_NOTIFY_DATA = 0x38
    QUEUE_RESET = 0x3A
    ADMIN_QUEUE_INDEX = 0x3C
    ADMIN_QUEUE_NUM = 0x3E
