"""The host programs of a vsock test, run where the back-end runs (inside the appliance
VM in test_vvu_appliance_vm.py): connect to the guest's port 5000 through the hybrid
socket (retrying until the guest listens), send SIZE random bytes and check the echo; and
echo STREAMS streams the guest opens to port 6000. Prints ``HOST sent <sha256>`` and
``HOST echoed <n> streams``."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time

UDS, SIZE, STREAMS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def echo_streams() -> None:
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{UDS}_6000")
    lst.listen(64)
    done = []

    def serve(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(1 << 20):
            data += chunk
        conn.sendall(data)
        conn.close()
        done.append(1)

    threads = []
    for _ in range(STREAMS):
        conn, _ = lst.accept()
        t = threading.Thread(target=serve, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    print(f"HOST echoed {len(done)} streams", flush=True)


def main() -> None:
    server = threading.Thread(target=echo_streams)
    server.start()
    data = os.urandom(SIZE)
    while True:  # until the guest listens on port 5000
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(UDS)
        except OSError:
            time.sleep(0.5)
            continue
        s.sendall(b"CONNECT 5000\n")
        line = b""
        while not line.endswith(b"\n") and (c := s.recv(1)):
            line += c
        if line.startswith(b"OK "):
            break
        s.close()
        time.sleep(0.5)

    def send() -> None:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    back = b""
    while len(back) < SIZE and (chunk := s.recv(1 << 20)):
        back += chunk
    sender.join()
    s.close()
    ok = hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    print(f"HOST sent {hashlib.sha256(data).hexdigest()} echo {'ok' if ok else 'BAD'}",
          flush=True)
    server.join()


if __name__ == "__main__":
    main()
