"""vhost-user-trace: a transparent proxy that decodes every vhost-user message."""
