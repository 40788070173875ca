"""vhost-user-check: a conformance and robustness checker for vhost-user back-ends."""
