"""A software Ethernet switch whose ports are vhost-user net devices (and a TAP uplink)."""
