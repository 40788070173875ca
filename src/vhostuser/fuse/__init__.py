"""The FUSE protocol (virtio-fs): its ABI, shared by the file server and the driver."""
