"""The virtio-vhost-user device (VMM side)."""
