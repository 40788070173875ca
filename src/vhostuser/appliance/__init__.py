"""The appliance side: drive a virtio-vhost-user device, as a guest driver would."""
