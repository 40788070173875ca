"""Numbers of the vhost-user protocol: request codes, header flags and feature bits.

Names follow QEMU's docs/interop/vhost-user.rst, with "slave"/"master" spelled
"backend"/"frontend" as the current text does.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

VERSION = 1
HEADER_SIZE = 12
MAX_PAYLOAD = 4096  # rust-vmm's cap; the largest real payload (SHMEM config) is 2056
MAX_FDS = 8
MAX_MEM_REGIONS = 8  # regions in one SET_MEM_TABLE
MAX_CONFIG_SIZE = 256  # QEMU's VHOST_USER_MAX_CONFIG_SIZE


class HeaderFlag(IntFlag):
    VERSION_MASK = 0x3
    REPLY = 0x4
    NEED_REPLY = 0x8


# Plain int: in Python 3.11, ~ on an IntFlag inverts only the defined bits.
KNOWN_HEADER_FLAGS = int(HeaderFlag.VERSION_MASK | HeaderFlag.REPLY | HeaderFlag.NEED_REPLY)


class FrontendReq(IntEnum):
    """Requests sent by the front-end (the VMM) on the main socket."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44  # provisional (SHMEM series)


class BackendReq(IntEnum):
    """Requests sent by the back-end on the SET_BACKEND_REQ_FD channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20
    SHMEM = 1 << 21


class VirtioFeature(IntFlag):
    """Transport-level virtio feature bits (device-type bits live with each device)."""

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40


LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL

# Payload u64 of SET_VRING_KICK / CALL / ERR.
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

VRING_F_LOG = 0x1  # vring addr flags


class DeviceStatus(IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128

# SET_DEVICE_STATE_FD: the transfer's direction and phase, and the reply's "no fd" flag.
DEVICE_STATE_SAVE = 0  # back-end to front-end (the source)
DEVICE_STATE_LOAD = 1  # front-end to back-end (the destination)
DEVICE_STATE_PHASE_STOPPED = 0  # the only phase: every ring stopped
DEVICE_STATE_NO_FD = 0x100
