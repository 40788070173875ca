"""Serve one front-end connection: read requests, let the engine answer, send replies."""

from __future__ import annotations

import logging
from typing import Protocol

from ..protocol import Header, Message, ProtocolError
from .backend import Backend, Resource, Resources
from .device import Device
from .worker import DEFAULT_SPIN_US

log = logging.getLogger(__name__)


class Channel(Protocol):
    """A transport's message stream (AF_UNIX socket, or virtio-vhost-user queues)."""

    def recv_raw(self) -> tuple[Header, bytes, list[Resource]]: ...

    def send(self, msg: Message) -> None: ...

    def close(self) -> None: ...


def serve_connection(channel: Channel, resources: Resources, device: Device,
                     closed: tuple[type[BaseException], ...] = (),
                     poll_us: int = DEFAULT_SPIN_US) -> None:
    """Serve until the front-end disconnects (`closed` exceptions) or breaks the protocol;
    either way every resource of the connection is released."""
    backend = Backend(device, resources, poll_us)
    try:
        while True:
            header, body, fds = channel.recv_raw()
            reply = backend.receive(header, body, fds)
            if reply is not None:
                channel.send(reply)
    except closed:
        log.info("front-end disconnected")
    except ProtocolError as e:
        log.error("protocol error, dropping the connection: %s", e)
    except OSError as e:
        log.error("connection failed: %s", e)
    finally:
        backend.close()
        channel.close()
