"""Device-type feature bits by name (virtio 1.x, §5: each device's "Feature bits"), for
`vhost-user-trace --type`: vhost-user carries no device type, so the tracer names these
bits only when told which device it sits in front of. VHOST_F_LOG_ALL (26) is vhost's,
whatever the type."""

from __future__ import annotations

from ..protocol.constants import LOG_ALL

LOG_ALL_BIT = LOG_ALL.bit_length() - 1

DEVICE_BITS: dict[str, dict[int, str]] = {
    "blk": {0: "BLK_BARRIER", 1: "BLK_SIZE_MAX", 2: "BLK_SEG_MAX", 4: "BLK_GEOMETRY",
            5: "BLK_RO", 6: "BLK_BLK_SIZE", 7: "BLK_SCSI", 9: "BLK_FLUSH",
            10: "BLK_TOPOLOGY", 11: "BLK_CONFIG_WCE", 12: "BLK_MQ", 13: "BLK_DISCARD",
            14: "BLK_WRITE_ZEROES", 15: "BLK_LIFETIME", 16: "BLK_SECURE_ERASE",
            17: "BLK_ZONED"},
    "net": {0: "NET_CSUM", 1: "NET_GUEST_CSUM", 2: "NET_CTRL_GUEST_OFFLOADS", 3: "NET_MTU",
            5: "NET_MAC", 6: "NET_GSO", 7: "NET_GUEST_TSO4", 8: "NET_GUEST_TSO6",
            9: "NET_GUEST_ECN", 10: "NET_GUEST_UFO", 11: "NET_HOST_TSO4",
            12: "NET_HOST_TSO6", 13: "NET_HOST_ECN", 14: "NET_HOST_UFO",
            15: "NET_MRG_RXBUF", 16: "NET_STATUS", 17: "NET_CTRL_VQ", 18: "NET_CTRL_RX",
            19: "NET_CTRL_VLAN", 20: "NET_CTRL_RX_EXTRA", 21: "NET_GUEST_ANNOUNCE",
            22: "NET_MQ", 23: "NET_CTRL_MAC_ADDR", 50: "NET_DEVICE_STATS",
            51: "NET_HASH_TUNNEL",
            52: "NET_VQ_NOTF_COAL", 53: "NET_NOTF_COAL", 54: "NET_GUEST_USO4",
            55: "NET_GUEST_USO6", 56: "NET_HOST_USO", 57: "NET_HASH_REPORT",
            59: "NET_GUEST_HDRLEN", 60: "NET_RSS", 61: "NET_RSC_EXT", 62: "NET_STANDBY",
            63: "NET_SPEED_DUPLEX"},
    "scsi": {0: "SCSI_INOUT", 1: "SCSI_HOTPLUG", 2: "SCSI_CHANGE", 3: "SCSI_T10_PI"},
    "fs": {0: "FS_NOTIFICATION"},
    "vsock": {0: "VSOCK_STREAM", 1: "VSOCK_SEQPACKET", 2: "VSOCK_NO_IMPLIED_STREAM"},
    "input": {},
    "rng": {},
    "gpio": {0: "GPIO_IRQ"},
    "i2c": {0: "I2C_ZERO_LENGTH_REQUEST"},
    "gpu": {0: "GPU_VIRGL", 1: "GPU_EDID", 2: "GPU_RESOURCE_UUID", 3: "GPU_RESOURCE_BLOB",
            4: "GPU_CONTEXT_INIT"},
    "snd": {0: "SND_CTLS"},
    "scmi": {0: "SCMI_P2A_CHANNELS", 1: "SCMI_SHARED_MEMORY"},
}
