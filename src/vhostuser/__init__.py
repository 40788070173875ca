"""vhost-user back-ends and virtio-vhost-user, in Python."""
