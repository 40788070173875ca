"""vhost-user-scsi's control socket: LUNs added and removed at run time. One JSON request
per connection, one JSON line back:

    {"cmd": "list"}                         -> {"luns": [{"lun": 0, "path": ..., ...}]}
    {"cmd": "add", "disk": "FILE[,read-only][,serial=S][,wwn=HEX]"} -> {"lun": N}
    {"cmd": "remove", "lun": N}             -> {"removed": N}
    anything wrong                          -> {"error": "..."}

Looked at in the engine's process about once a second while a front-end is connected
and quiet, never waiting for a client (a request from a client that has given up waiting
is not carried out). A change is answered once it is in effect: the workers are
stopped, the LUN set changes, they start again (inheriting it), and the guest gets a
transport-reset event (rescan, or removed). A client that does not send its line within
a second is answered with an error; nothing it sends can stop or stall the daemon.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from ..ratelog import Limited
from ..sockets import listen

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
CLIENT_TIMEOUT = 1.0  # s a client has to send its request
MAX_CLIENTS = 8  # served per look


class Client:
    __slots__ = ("conn", "data", "deadline")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.data = b""
        self.deadline = time.monotonic() + CLIENT_TIMEOUT


class ControlSocket:
    """Never waits: each look accepts who is there, reads what they sent, and hands out
    the complete requests; a client has CLIENT_TIMEOUT seconds to send its line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = listen(path, backlog=16)
        self.sock.setblocking(False)
        self.clients: list[Client] = []
        self.bad = Limited(log)

    def fileno(self) -> int:
        return self.sock.fileno()

    def poll(self) -> list[tuple[socket.socket, dict[str, Any] | str]]:
        """Complete requests: (the client's connection, its JSON object, or what is wrong
        with it). The caller answers each with `reply`."""
        while len(self.clients) < MAX_CLIENTS:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.bad.log(logging.ERROR, "control socket: cannot accept: %s", e)
                break
            conn.setblocking(False)
            self.clients.append(Client(conn))
        ready: list[tuple[socket.socket, dict[str, Any] | str]] = []
        now = time.monotonic()
        for c in list(self.clients):
            eof = False
            try:
                while b"\n" not in c.data and len(c.data) <= MAX_REQUEST:
                    chunk = c.conn.recv(MAX_REQUEST + 1 - len(c.data))
                    if not chunk:
                        eof = True
                        break
                    c.data += chunk
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                eof = True
            line, newline, _ = c.data.partition(b"\n")
            if not newline and len(c.data) <= MAX_REQUEST and not eof and now < c.deadline:
                continue  # not all here yet
            self.clients.remove(c)
            if eof and not newline:  # gone (a client that timed out and left, say)
                c.conn.close()
                continue
            if not newline:
                self.bad.log(logging.WARNING, "control socket: a client sent no request "
                             "line in time")
                self.reply(c.conn, {"error": "no request line (one JSON object, then a "
                                             "newline, within a second)"})
                continue
            if _hung_up(c.conn):  # it gave up waiting (no front-end was connected, say)
                self.bad.log(logging.WARNING, "control socket: a request whose client is "
                             "gone: not carried out")
                c.conn.close()
                continue
            ready.append((c.conn, _parse(line)))
        return ready

    def reply(self, conn: socket.socket, reply: dict[str, Any]) -> None:
        """Answer and hang up (a client that does not read its answer loses it)."""
        try:
            conn.send(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        conn.close()

    def close(self) -> None:
        for c in self.clients:
            c.conn.close()
        self.clients = []
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _hung_up(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _parse(line: bytes) -> dict[str, Any] | str:
    try:
        if line.count(b"[") + line.count(b"{") > 32:
            return "too deeply nested"
        request = json.loads(line)
    except (ValueError, RecursionError) as e:
        return f"not JSON: {e}"
    if not isinstance(request, dict):
        return "a JSON object is expected"
    return request


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
    if not data:
        raise ValueError("the daemon closed the connection without answering")
    reply: dict[str, Any] = json.loads(data)
    return reply
