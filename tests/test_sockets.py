"""The incremental framer and the non-blocking framed socket, over real socket pairs:
fds go with the message whose first byte they came with, whatever the split; messages
that came before an end (EOF or reset) are served; a queued fd is the file it was when
queued; one message of any size is taken, a peer that does not read is found out."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from vhostuser.framer import Framer
from vhostuser.protocol import FrontendReq, ProtocolError, encode, request
from vhostuser.protocol import payloads as p
from vhostuser.sockets import FramedSocket, PeerClosed, PeerStalled, send_with_fds
from vhostuser.unix_channel import vhost_user_framer

F = FrontendReq


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_framer_attributes_fds_to_the_message_in_progress_for_any_split() -> None:
    msgs = [encode(request(F.SET_FEATURES, p.U64(i))) for i in range(6)]
    stream = b"".join(msgs)
    rng = random.Random(7)
    for _ in range(200):
        fr = vhost_user_framer()
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randrange(1, 12)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        starts = {sum(len(m) for m in msgs[:i]): i for i in range(len(msgs))}
        owner: dict[int, int] = {}  # fd -> the message it came with
        at = 0
        for piece in pieces:
            fds = []
            if at in starts:  # a sender attaches fds to a message's first byte
                fd = os.eventfd(0)
                owner[fd] = starts[at]
                fds = [fd]
            fr.feed(piece, fds)
            at += len(piece)
        got = []
        while (frame := fr.pop()) is not None:
            got.append(frame)
        assert [f.body for f in got] == [struct.pack("<Q", i) for i in range(6)]
        for i, frame in enumerate(got):
            for fd in frame.fds:
                assert owner.pop(fd) == i
                os.close(fd)
        for fd in owner:  # fds that came mid-message (the split put a start elsewhere)
            os.close(fd)


def test_framer_bad_header_closes_everything_and_stays_broken() -> None:
    fr = vhost_user_framer()
    a = os.eventfd(0)
    fr.feed(encode(request(F.SET_OWNER))[:4], [a])
    with pytest.raises(ProtocolError):
        fr.feed(b"\x00" * 8)  # version 0 in the flags
    with pytest.raises(OSError):
        os.fstat(a)  # closed with the broken stream
    b = os.eventfd(0)
    with pytest.raises(ProtocolError):
        fr.feed(b"x", [b])
    with pytest.raises(OSError):
        os.fstat(b)


def test_framer_refuses_more_fds_than_a_message_may_carry() -> None:
    fr: Framer = vhost_user_framer()
    fds = [os.eventfd(0) for _ in range(9)]
    with pytest.raises(ProtocolError, match="more than 8 fds"):
        fr.feed(encode(request(F.SET_OWNER))[:4], fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_messages_before_the_end_are_served() -> None:
    for end in ("close", "reset"):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fs = FramedSocket(a, vhost_user_framer())
        b.sendall(encode(request(F.SET_OWNER)) + encode(request(F.GET_FEATURES)))
        if end == "reset":  # unread data on close makes the peer's end a reset
            fs.send(encode(request(F.GET_FEATURES)))
            b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()
        assert fs.read() == 2
        assert fs.pop().header.request == F.SET_OWNER  # type: ignore[union-attr]
        assert fs.pop().header.request == F.GET_FEATURES  # type: ignore[union-attr]
        with pytest.raises(PeerClosed):
            fs.read()
        fs.close()


def test_a_queued_fd_is_the_file_it_was_when_queued() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fs = FramedSocket(a, vhost_user_framer(), max_backlog=1 << 30)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    while True:  # fill the socket: what follows waits in the backlog
        fs.send(encode(request(F.GET_FEATURES)) * 64)
        if fs.wants_write:
            break
    original = os.eventfd(0)
    want = _inode(original)
    fs.send(encode(request(F.SET_VRING_CALL, p.VringFile.make(0))), [original])
    os.close(original)
    impostor = os.open("/dev/null", os.O_RDONLY)  # likely the same number
    b.setblocking(False)
    got_fds: list[int] = []
    for _ in range(10_000):
        try:
            _, anc, _, _ = b.recvmsg(1 << 16, socket.CMSG_SPACE(8 * 4))
        except BlockingIOError:
            fs.flush()
            if not fs.wants_write:
                b.setblocking(True)
                b.settimeout(1)
            continue
        except TimeoutError:
            break
        for _lvl, _kind, payload in anc:
            got_fds += struct.unpack(f"{len(payload) // 4}i", payload)
        if got_fds:
            break
    assert len(got_fds) == 1 and _inode(got_fds[0]) == want
    os.close(got_fds[0])
    os.close(impostor)
    fs.close()
    b.close()


def test_one_large_message_is_taken_but_a_peer_that_does_not_read_is_found_out() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fs = FramedSocket(a, vhost_user_framer(), max_backlog=64 << 10, message_timeout=0.05)
    fs.send(bytes(1 << 20))  # more than the backlog, with nothing waiting: taken
    assert fs.wants_write
    with pytest.raises(PeerStalled, match="does not read"):
        fs.send(bytes(16))
    deadline = fs.deadline()
    assert deadline is not None
    with pytest.raises(PeerStalled, match="has not read"):
        fs.check(deadline + 0.01)
    fs.close()
    b.close()


def test_half_a_message_times_out_only_while_being_read() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fs = FramedSocket(a, vhost_user_framer(), message_timeout=0.05)
    b.sendall(encode(request(F.SET_FEATURES, p.U64(1)))[:14])
    assert fs.read() == 0
    deadline = fs.deadline()
    assert deadline is not None
    fs.check(deadline + 1, reading=False)  # not our reader's turn: not the peer's fault
    with pytest.raises(PeerStalled, match="incomplete"):
        fs.check(fs.deadline() + 0.01)  # type: ignore[operator]
    fs.close()
    b.close()


def test_send_with_fds_attaches_them_to_the_first_byte() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.eventfd(0)
    assert send_with_fds(a, b"abc", [fd]) == 3
    data, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4))
    assert data == b"a" and len(anc) == 1
    os.close(struct.unpack("i", anc[0][2])[0])
    os.close(fd)
    a.close()
    b.close()
