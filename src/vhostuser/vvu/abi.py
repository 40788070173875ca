"""The virtio-vhost-user device's ABI, as the device model and the driver both use it: the
vendor capabilities it adds to virtio-pci, its status bits, and the vfio-user regions and
capability that carry the consumer's memory files (docs/vvu-design.md)."""

from __future__ import annotations

from ..protocol.constants import BackendReq, VirtioFeature
from ..protocol.virtio_pci import VirtioCfgType

VIRTIO_ID = 63  # virtio device id of virtio-vhost-user
PCI_VENDOR, PCI_DEVICE = 0x1AF4, 0x1040 + VIRTIO_ID

# the device's features: those of its own two queues (rxq, txq)
FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
            | VirtioFeature.RING_EVENT_IDX)

# virtio-pci vendor capability cfg_types beyond the standard 1..5, and the window: virtio's
# shared memory capability
CFG_DOORBELL, CFG_NOTIFICATION = 6, 7
CFG_SHARED_MEMORY = VirtioCfgType.SHARED_MEMORY

# the notification structure: a vring's vector may be KICK_FD_VECTOR, "the driver reads
# the consumer's kick eventfd itself" (a vfio-user client: GET_REGION_IO_FDS on the
# structure's BAR then lists vring i's kick eventfd at KICK_FDS + 4 * i from the structure)
KICK_FD_VECTOR = 0xFFFE
KICK_FDS = 0x800
# with MSI-X disabled (INTx), the vrings kicked since the driver last looked: a bit per
# vring in le32 words from KICKS on, each word cleared by the read that returns it
KICKS = 0x400

# the device config space's status field
S_BACKEND_UP, S_FRONTEND_UP = 1, 2

# vfio-user regions 9, 10, ...: the window's memory files, one each; each carries a
# region-type capability and one giving the file's offset (u64) in the window
FIRST_FILE_REGION = 9
WINDOW_FILE_TYPE = 0x1AF40001
WINDOW_BASE_CAP = 0x1AF4

# the back-end requests that cross the device (the others need an fd to travel from the
# appliance, or a feature the device masks)
BACKEND_REQUESTS = frozenset({BackendReq.CONFIG_CHANGE_MSG})
