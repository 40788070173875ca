"""Serve one front-end connection: read requests, let the engine answer, send replies."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from ..protocol import Header, Message, ProtocolError
from ..shutdown import Shutdown
from .backend import Backend, Resource, Resources
from .device import Device
from .worker import DEFAULT_SPIN_US

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between the engine's looks at the device while the front-end is quiet


class Channel(Protocol):
    """A transport's message stream (AF_UNIX socket, or virtio-vhost-user queues)."""

    def recv_raw(self, idle: tuple[float, Callable[[], None]] | None = None
                 ) -> tuple[Header, bytes, list[Resource]]:
        """The next message; while none comes, call idle[1] every idle[0] seconds."""
        ...

    def send(self, msg: Message) -> None: ...

    def fds(self) -> list[int]:
        """What the session's workers hold open: the front-end must see the session end
        only once none of them can store into a used ring (engine/worker.py)."""
        ...

    def close(self) -> None: ...


def serve_connection(channel: Channel, resources: Resources, device: Device,
                     closed: tuple[type[BaseException], ...] = (),
                     poll_us: int = DEFAULT_SPIN_US) -> None:
    """Serve until the front-end disconnects (`closed` exceptions) or breaks the protocol;
    either way every resource of the connection is released."""
    backend = Backend(device, resources, poll_us, hold=channel.fds())
    try:
        while True:
            header, body, fds = channel.recv_raw(idle=(TICK, backend.tick))
            reply = backend.receive(header, body, fds)
            if reply is not None:
                channel.send(reply)
    except closed:
        log.info("front-end disconnected")
    except ProtocolError as e:
        log.error("protocol error, dropping the connection: %s", e)
    except OSError as e:
        log.error("connection failed: %s", e)
    except Shutdown:
        raise
    except Exception:  # a bug ends this connection, not the daemon
        log.exception("internal error, dropping the connection")
    finally:
        backend.close()
        channel.close()
