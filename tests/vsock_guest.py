"""Run inside a test guest (test_qemu_vsock.py) with the host's Python: Linux AF_VSOCK
sockets over our vhost-user-vsock. Echoes one stream the host opens to port 5000, then
opens STREAMS streams to the host (CID 2) port 6000 at once, each sending its own bytes
and checking the host's echo. Prints ``ECHOED <bytes> <sha256>`` and ``STREAMS <n> ok``."""

from __future__ import annotations

import hashlib
import os
import selectors
import socket
import sys

STREAMS = int(sys.argv[1]) if len(sys.argv) > 1 else 32
PER_STREAM = int(sys.argv[2]) if len(sys.argv) > 2 else 256 << 10


def echo_one(port: int) -> None:
    lst = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    lst.bind((socket.VMADDR_CID_ANY, port))
    lst.listen()
    print("READY", flush=True)
    conn, _ = lst.accept()
    total, digest = 0, hashlib.sha256()
    while chunk := conn.recv(256 << 10):
        conn.sendall(chunk)
        total += len(chunk)
        digest.update(chunk)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)  # the host closes once it has the echo
    conn.close()
    print(f"ECHOED {total} {digest.hexdigest()}", flush=True)


def many(port: int) -> None:
    sel = selectors.DefaultSelector()
    want = {}
    for i in range(STREAMS):
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.connect((2, port))
        data = hashlib.sha256(bytes([i])).digest() * (PER_STREAM // 32)
        want[s] = data
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, [memoryview(data), b""])
    done = 0
    while done < STREAMS:
        for key, ev in sel.select(30):
            s, (out, got) = key.fileobj, key.data
            if ev & selectors.EVENT_WRITE and out:
                n = s.send(out[: 64 << 10])
                key.data[0] = out = out[n:]
                if not out:
                    s.shutdown(socket.SHUT_WR)
                    sel.modify(s, selectors.EVENT_READ, key.data)
            if ev & selectors.EVENT_READ:
                chunk = s.recv(256 << 10)
                if chunk:
                    key.data[1] = got + chunk
                else:
                    sel.unregister(s)
                    if key.data[1] != want[s]:
                        print(f"STREAMS mismatch on a stream: {len(key.data[1])} bytes")
                        sys.exit(1)
                    s.close()
                    done += 1
    print(f"STREAMS {STREAMS} ok", flush=True)


if __name__ == "__main__":
    echo_one(5000)
    many(6000)
    os.sync()
