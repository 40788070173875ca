"""vhost-user-scsi's control socket: LUNs added and removed at run time. One JSON request
per connection, one JSON line back:

    {"cmd": "list"}                         -> {"luns": [{"lun": 0, "path": ..., ...}]}
    {"cmd": "add", "disk": "FILE[,read-only][,serial=S][,wwn=HEX]"} -> {"lun": N}
    {"cmd": "remove", "lun": N}             -> {"removed": N}
    anything wrong                          -> {"error": "..."}

Served in the engine's process about once a second while a front-end is connected (a
change then restarts the workers, which inherit the new LUN set, and the guest gets a
transport-reset event: rescan, or removed). A client that does not send its line in time
is dropped; nothing it sends can stop the daemon.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from ..ratelog import Limited
from ..transport.unix import listen

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
CLIENT_TIMEOUT = 1.0  # s a client has to send its request
MAX_CLIENTS = 8  # served per look


class ControlSocket:
    def __init__(self, path: str, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = path
        self.handle = handle
        self.sock = listen(path, backlog=16)
        self.sock.setblocking(False)
        self.bad = Limited(log)

    def fileno(self) -> int:
        return self.sock.fileno()

    def poll(self) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.bad.log(logging.ERROR, "control socket: cannot accept: %s", e)
                return
            with conn:
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        deadline = time.monotonic() + CLIENT_TIMEOUT
        data = b""
        try:
            while b"\n" not in data and len(data) <= MAX_REQUEST:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = conn.recv(MAX_REQUEST + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError:  # timed out, or gone
            self.bad.log(logging.WARNING, "control socket: a client sent no request in time")
            return
        try:
            request = json.loads(data.split(b"\n", 1)[0] or b"null")
            if not isinstance(request, dict):
                raise ValueError("a JSON object is expected")
            reply = self.handle(request)
        except ValueError as e:  # JSON errors too
            reply = {"error": str(e)}
        except OSError as e:
            reply = {"error": e.strerror or str(e)}
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a control socket; its reply (the daemon answers within about
    a second while a front-end is connected)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data or b"{}")
    return reply
