"""The virtio-vhost-user device end to end, no VM: our Python front-end is the consumer,
our vfio-user client + virtio-pci driver is the appliance. Messages cross both ways, the
consumer's memory shows at the documented BAR offsets, doorbells signal the consumer's
call eventfd, kicks raise the chosen interrupt, either side can go and come back, and
malformed input gets a clean error. Then vhost-user-blk served through the device."""

from __future__ import annotations

import errno
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon import Program, blk_session

from vhostuser.appliance.vvu_link import VvuLink
from vhostuser.devices.blk import COMPILED
from vhostuser.protocol import FrontendReq, VirtioFeature, encode, reply_to, request
from vhostuser.protocol import payloads as p
from vhostuser.sockets import PeerClosed
from vhostuser.transport.vvu import Token, VvuChannel, VvuResources
from vhostuser.unix_channel import UnixChannel
from vhostuser.vfio_user import protocol as vp
from vhostuser.vfio_user.client import DeviceError, VfioUserClient
from vhostuser.vfio_user.socket import VfioUserChannel
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.vvu.abi import CFG_NOTIFICATION

F = FrontendReq
OK = 0


class Device:
    def __init__(self, tmp: Path, *extra: str, listener: socket.socket | None = None) -> None:
        """`listener`: the consumer's listening socket, handed over as --fd."""
        self.vfu, self.vhost = str(tmp / "vfu.sock"), str(tmp / "vhost.sock")
        self.log_path = tmp / "device.log"
        consumer = (["--socket-path", self.vhost] if listener is None
                    else ["--fd", str(listener.fileno())])
        self.proc = Program.python(["vhostuser.cli.vvu_device", "--vfio-user-socket",
                                    self.vfu, *consumer, "-vv", *extra], self.log_path,
                                   ready=[self.vhost, self.vfu],
                                   pass_fds=[listener.fileno()] if listener else [])

    def log(self) -> str:
        return self.proc.log()

    def connected(self, n: int = 1) -> bool:
        """Whether `n` appliances have connected so far."""
        return self.log().count("vfio-user client connected") >= n

    def stop(self) -> None:
        assert self.proc.stop() == 0, self.log()
        assert "Traceback" not in self.log(), self.log()


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    d = Device(tmp_path, "--max-queues", "8")
    yield d
    d.stop()


def consumer(path: str) -> UnixChannel:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    return UnixChannel(s)


def readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# -- the mechanics, with the appliance driven in-process -------------------------------------

def test_window_doorbell_and_kick(device: Device) -> None:
    link = VvuLink(device.vfu)
    res = VvuResources(link, kick_fds=False)  # kicks as MSI-X vectors
    fe = consumer(device.vhost)
    link.wait_frontend(None)
    assert link.status() == 3  # BACKEND_UP | FRONTEND_UP
    chan = VvuChannel(link)
    # memory: the consumer's bytes at window offset mmap_offset (the documented rule)
    ram = GuestRam(1 << 20)
    ram.at(0x30000, 8)[:] = b"CONSUMER"
    lo = p.MemRegion(0, 0x20000, 0x7F0000000000, 0)
    hi = p.MemRegion(0x4000_0000, 0xE0000, 0x7F0000020000, 0x20000)
    fe.send(request(F.SET_MEM_TABLE, p.MemTable((lo, hi))), (ram.fd, ram.fd))
    header, body, tokens = chan.recv_raw()
    assert header.request == F.SET_MEM_TABLE and tokens == [Token("memory")] * 2
    view = res.map_region(hi, tokens[1])
    assert bytes(view[0x10000:0x10008]) == b"CONSUMER"  # guest 0x40010000 = file 0x30000
    view[0x10000:0x10004] = b"APPL"  # and the appliance's writes land in the consumer's RAM
    assert bytes(ram.at(0x30000, 8)) == b"APPLUMER"
    view.release()
    # call: the doorbell's ioeventfd is the consumer's own call eventfd
    call = os.eventfd(0, os.EFD_NONBLOCK)
    fe.send(request(F.SET_VRING_CALL, p.VringFile.make(3)), (call,))
    _, _, tokens = chan.recv_raw()
    notifier = res.notifier(tokens[0])
    notifier.notify()
    assert readable(call) and os.eventfd_read(call) == 1
    notifier.close()
    # kick: the consumer's kick raises the MSI-X vector the driver chose for that vring
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    fe.send(request(F.SET_VRING_KICK, p.VringFile.make(3)), (kick,))
    _, _, tokens = chan.recv_raw()
    vector_fd = res.kick_fd(tokens[0])
    assert vector_fd is not None and not readable(vector_fd, 0.1)
    os.eventfd_write(kick, 1)
    assert readable(vector_fd) and os.eventfd_read(vector_fd) == 1
    # a reply crosses back
    fe.send(request(F.GET_FEATURES))
    header, _, _ = chan.recv_raw()
    chan.send(reply_to(request(F.GET_FEATURES), p.U64(1 << 32)))
    h, body, _ = fe.recv_raw()
    assert h.request == F.GET_FEATURES and struct.unpack("<Q", body)[0] == 1 << 32
    # the consumer goes: FRONTEND_UP drops, the channel reports the end of the session
    fe.close()
    with pytest.raises(PeerClosed):
        while True:
            chan.recv_raw()
    assert link.status() == 0  # session over: BACKEND_UP is the driver's to set again
    # ...and a new consumer is served on the same link
    fe2 = consumer(device.vhost)
    link.wait_frontend(None)
    fe2.send(request(F.GET_QUEUE_NUM))
    assert VvuChannel(link).recv_raw()[0].request == F.GET_QUEUE_NUM
    for fd in (call, kick):
        os.close(fd)
    fe2.close()
    link.close()
    ram.close()


def test_kick_eventfd_handed_to_the_driver(device: Device) -> None:
    """KICK_FD_VECTOR: the driver reads the consumer's own kick eventfd (GET_REGION_IO_FDS
    lists it beside the doorbells), the device stops reading it and raises no vector; a
    new SET_VRING_KICK brings the new fd, and a vector chosen again takes it back."""
    from vhostuser.vvu.abi import KICK_FD_VECTOR

    link = VvuLink(device.vfu)
    res = VvuResources(link, kick_fds=False)
    fe = consumer(device.vhost)
    link.wait_frontend(None)
    chan = VvuChannel(link)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    fe.send(request(F.SET_VRING_KICK, p.VringFile.make(2)), (kick,))
    _, _, tokens = chan.recv_raw()
    own = link.kick_fd(2)
    assert own is not None
    cap = link.pci.caps[CFG_NOTIFICATION]
    link.client.write(cap.bar, cap.offset, struct.pack("<H", 2))  # select vring 2
    assert struct.unpack("<H", link.client.read(cap.bar, cap.offset + 2, 2))[0] == \
        KICK_FD_VECTOR
    vector_fd = link.pci.vectors[3 + 2]
    os.eventfd_write(kick, 5)  # nobody but the driver reads it now
    assert readable(own) and os.eventfd_read(own) == 5
    assert not readable(vector_fd, 0.2)
    # a new kick eventfd from the consumer: the driver fetches that one
    kick2 = os.eventfd(0, os.EFD_NONBLOCK)
    fe.send(request(F.SET_VRING_KICK, p.VringFile.make(2)), (kick2,))
    chan.recv_raw()
    own2 = link.kick_fd(2)
    assert own2 is not None
    os.eventfd_write(kick2, 7)
    assert readable(own2) and os.eventfd_read(own2) == 7
    assert not readable(own, 0.1)  # the old one is not the new one
    # a vector again: the device reads the kick and raises it
    assert res.kick_fd(tokens[0]) == vector_fd
    os.eventfd_write(kick2, 1)
    assert readable(vector_fd) and os.eventfd_read(vector_fd) == 1
    assert not readable(own2, 0.1)  # the device consumed the kick
    for fd in (kick, kick2, own, own2):
        os.close(fd)
    fe.close()
    link.close()


def test_every_vring_eventfd_handed_over(device: Device) -> None:
    """Eight vrings with call, err and kick eventfds each (24 fds, more than the 16 a
    vfio-user message carries by QEMU's rule; our driver takes up to 253): every doorbell
    and every kick is found. When the session ends, the device reads the next consumer's
    kicks again until the driver asks for them."""
    link = VvuLink(device.vfu)
    fe = consumer(device.vhost)
    link.wait_frontend(None)
    chan = VvuChannel(link)
    mine = []
    for vring in range(8):
        fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        mine += fds
        for req, fd in zip((F.SET_VRING_CALL, F.SET_VRING_ERR, F.SET_VRING_KICK), fds,
                           strict=True):
            fe.send(request(req, p.VringFile.make(vring)), (fd,))
            chan.recv_raw()
    for vring in range(8):
        call, _err, kick = mine[3 * vring : 3 * vring + 3]
        own = link.kick_fd(vring)
        assert own is not None
        os.eventfd_write(kick, vring + 1)
        assert readable(own) and os.eventfd_read(own) == vring + 1
        os.close(own)
        bell = link.doorbell_fd(4 * vring)
        assert bell is not None
        os.eventfd_write(bell, 1)
        assert readable(call) and os.eventfd_read(call) == 1
        os.close(bell)
    fe.close()
    with pytest.raises(PeerClosed):
        while True:
            chan.recv_raw()
    fe2 = consumer(device.vhost)
    link.wait_frontend(None)
    cap = link.pci.caps[CFG_NOTIFICATION]
    link.client.write(cap.bar, cap.offset, struct.pack("<H", 3))  # select vring 3
    assert struct.unpack("<H", link.client.read(cap.bar, cap.offset + 2, 2))[0] == 0xFFFF
    for fd in mine:
        os.close(fd)
    fe2.close()
    link.close()


def test_malformed_vfio_user_input(device: Device) -> None:
    c = VfioUserClient(device.vfu)
    with pytest.raises(DeviceError) as e:
        c.read(0, 0x4000 - 2, 4)  # runs off BAR 0
    assert e.value.errno == errno.EINVAL
    with pytest.raises(DeviceError):
        c.read(3, 0, 4)  # BAR 3 does not exist
    with pytest.raises(DeviceError):
        c.write(7, 0x100, b"\0\0\0\0")  # beyond the 256-byte config space
    with pytest.raises(DeviceError):
        c.read(0, 0, 3)  # a 3-byte access
    with pytest.raises(DeviceError):
        c.dma_map(0x1000, 0x1000, os.open("/dev/null", os.O_RDONLY))  # cannot be mapped
    assert c.read(7, 0, 4) == bytes.fromhex("f41a7f10")  # still answering
    raw = VfioUserChannel(c.chan.sock)
    raw.send_bytes(struct.pack("=HHIII", 99, vp.Command.REGION_READ, 10, 0, 0))  # size < header
    c.close()
    deadline = time.monotonic() + 5
    while "vfio-user client disconnected" not in device.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    c2 = VfioUserClient(device.vfu)  # the next client is served
    assert c2.device_info().num_regions == 9
    c2.close()


def test_txq_message_without_request_ends_only_the_session(device: Device) -> None:
    link = VvuLink(device.vfu)
    fe = consumer(device.vhost)
    link.wait_frontend(None)
    link.send(encode(request(F.GET_FEATURES)))  # a request on txq: not a reply
    ready, _, _ = select.select([fe.sock], [], [], 5)
    assert ready and fe.sock.recv(1) == b""  # the consumer is disconnected...
    fe2 = consumer(device.vhost)  # ...and the next one is served
    link.wait_frontend(None)
    fe2.send(request(F.GET_FEATURES))
    assert VvuChannel(link).recv_raw()[0].request == F.GET_FEATURES
    fe2.close()
    link.close()


# -- vhost-user-blk served through the device ------------------------------------------------

@pytest.fixture
def appliance(device: Device, tmp_path: Path) -> Iterator[Callable[..., Program]]:
    procs: list[Program] = []

    def start(*extra: str) -> Program:
        n = device.log().count("vfio-user client connected")
        proc = Program.python(["vhostuser.cli.blk", "--vvu", device.vfu, "--blk-file",
                               str(tmp_path / "disk.img"), "-v", *extra],
                              tmp_path / f"appliance{len(procs)}.log",
                              ready=lambda _: device.connected(n + 1))
        procs.append(proc)
        return proc

    with open(tmp_path / "disk.img", "wb") as f:
        for s in range(8192):
            f.write(s.to_bytes(4, "little") * 128)
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) in (0, -signal.SIGKILL)  # 0 unless a test killed it


def sector(s: int) -> bytes:
    return s.to_bytes(4, "little") * 128


# poll mode with the compiled data path (VHOSTUSER_JIT=1): no kicks, the kernel serves
@pytest.mark.parametrize("mode", [["--poll-us", "0"], ["--poll"]], ids=["interrupt", "poll"])
def test_blk_through_the_device(device: Device, appliance: Callable[..., Program],
                                tmp_path: Path, mode: list[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    jit = "--poll" in mode
    monkeypatch.setenv("VHOSTUSER_JIT", "1" if jit else "0")
    proc = appliance(*mode)
    fe, (blk,) = blk_session(device.vhost)
    with fe:
        for i in range(5):  # spaced out: with no polling window, each needs its kick
            assert blk.read(100 + i, 512) == (OK, sector(100 + i))
            time.sleep(0.02)
        data = os.urandom(64 << 10)
        assert blk.write(1000, data) == OK and blk.flush() == OK
        assert blk.read(1000, len(data)) == (OK, data)
        assert blk.get_id() == (OK, b"disk.img".ljust(20, b"\0"))
    img = (tmp_path / "disk.img").read_bytes()
    assert img[1000 * 512 : 1000 * 512 + len(data)] == data
    assert any(line.endswith(COMPILED) for line in proc.log().splitlines()) == jit


def test_the_consumer_socket_inherited_as_an_fd(tmp_path: Path) -> None:
    """--fd: the consumer's listening socket made by whoever starts the device (a service
    manager) and handed over: a consumer is served through it, twice, and the device
    leaves the socket file in place when it exits (not its to remove)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "vhost.sock"))
    listener.listen()
    device = Device(tmp_path, listener=listener)
    listener.close()
    img = tmp_path / "disk.img"
    img.write_bytes(b"".join(sector(s) for s in range(2048)))
    proc = Program.python(["vhostuser.cli.blk", "--vvu", device.vfu, "--blk-file", str(img),
                           "-v"], tmp_path / "appliance.log",
                          ready=lambda _: device.connected())
    try:
        for rnd in range(2):
            fe, (blk,) = blk_session(device.vhost)
            with fe:
                assert blk.read(100 + rnd, 512) == (OK, sector(100 + rnd))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.log()
        device.stop()
    assert os.path.exists(device.vhost)
    assert device.log().count("consumer connected") == 2


def test_consumer_and_appliance_come_back(device: Device,
                                          appliance: Callable[..., subprocess.Popen]) -> None:
    proc = appliance()
    for rnd in range(2):  # the consumer goes and comes back
        fe, (blk,) = blk_session(device.vhost)
        with fe:
            assert blk.write(7, bytes([rnd + 1]) * 512) == OK
            assert blk.read(7, 512) == (OK, bytes([rnd + 1]) * 512)
    proc.send_signal(signal.SIGTERM)  # the appliance goes and comes back
    assert proc.wait(15) == 0
    appliance()
    fe, (blk,) = blk_session(device.vhost)
    with fe:
        assert blk.read(7, 512) == (OK, bytes([2]) * 512)


@pytest.mark.parametrize("mode", [[], ["--poll"]], ids=["interrupt", "poll"])
def test_killed_appliance_ends_the_session_after_its_last_worker(
        device: Device, appliance: Callable[..., subprocess.Popen], mode: list[str]) -> None:
    """SIGKILL to the appliance's main process while its two queues are busy: the device
    ends the consumer's session (the consumer's socket reads EOF) only once no process of
    the appliance maps the consumer's memory (its workers hold the vfio-user socket)."""
    from test_worker_lifetime import _eof, _mapping_guest_ram

    from vhostuser.frontend.blk import T_IN

    for _ in range(3):
        proc = appliance("--num-queues", "2", *mode)
        fe, clients = blk_session(device.vhost, queues=2, size=256)
        for blk in clients:
            for i in range(80):
                blk.submit(T_IN, 8 * i, in_len=4096, kick=False)
            fe.kick(blk.queue)
        assert _mapping_guest_ram(proc.pid), "the appliance does not map consumer memory"
        os.kill(proc.pid, signal.SIGKILL)
        _eof(fe)
        holders = _mapping_guest_ram(proc.pid)
        assert not holders, f"session ended while {holders} mapped its memory\n{device.log()}"
        fe.close()


def test_every_message_kind_crosses(device: Device) -> None:
    """Each request the device relays reaches the driver unchanged (protocol features
    masked), each reply reaches the consumer; the ones that need fds to travel further
    are refused. The consumer is a real socket, the appliance our driver."""
    from test_codec import SAMPLES

    from vhostuser.protocol import FRONTEND_SPECS, Channel, decode_request, expects_reply
    from vhostuser.protocol.codec import Fds, Reply
    from vhostuser.vvu.relay import ALLOWED_PROTOCOL_FEATURES, FORBIDDEN, LOG_PROTOCOL_FEATURES

    link = VvuLink(device.vfu)
    fe = consumer(device.vhost)
    link.wait_frontend(None)
    ram = GuestRam(1 << 20)
    region = p.MemRegion(0, 1 << 20, 0x7F0000000000, 0)
    payloads = {F.SET_MEM_TABLE: p.MemTable((region,)), F.ADD_MEM_REG: p.SingleMemRegion(region),
                F.REM_MEM_REG: p.SingleMemRegion(region),
                F.SET_LOG_BASE: p.LogBase(4096, 0)}  # in the memory's file: offset 0 again
    crossed = []
    # SET_PROTOCOL_FEATURES first: the dirty log's requests cross once LOG_SHMFD is set
    for code, spec in sorted(FRONTEND_SPECS.items(),
                             key=lambda kv: kv[0] != F.SET_PROTOCOL_FEATURES):
        if code in FORBIDDEN:
            continue
        payload = payloads.get(code, SAMPLES[spec.payload])
        if spec.fds is Fds.PER_REGION or code in (F.ADD_MEM_REG, F.SET_LOG_BASE):
            fds = [ram.fd]
        elif (spec.fds is Fds.VRING and not payload.nofd) or spec.fds is Fds.ONE:
            fds = [os.eventfd(0)]
        else:
            fds = []
        if code == F.SET_PROTOCOL_FEATURES:  # BACKEND_REQ, so that SET_BACKEND_REQ_FD may
            payload = p.U64(ALLOWED_PROTOCOL_FEATURES | LOG_PROTOCOL_FEATURES)  # (and logs)
        if code == F.SET_BACKEND_REQ_FD:  # the consumer's end of a back-end channel
            backend_ends = socket.socketpair()
            os.close(fds[0])
            fds = [backend_ends[1].detach()]
        msg = request(code, payload)
        fe.send(msg, fds)
        header, body, tokens = VvuChannel(link).recv_raw()
        got = decode_request(Channel.FRONTEND, header, body, None)
        if code == F.SET_PROTOCOL_FEATURES:
            assert got.payload == payload
        else:
            assert got == msg, F(code).name
        assert len(tokens) == len(fds)
        for fd in fds:
            if fd != ram.fd:
                os.close(fd)
        if expects_reply(Channel.FRONTEND, msg, ALLOWED_PROTOCOL_FEATURES | LOG_PROTOCOL_FEATURES):
            assert FRONTEND_SPECS[code].when in (Reply.ALWAYS, Reply.IF_LOG_SHMFD)
            answer = SAMPLES[spec.reply] if spec.reply else p.U64(0)
            VvuChannel(link).send(reply_to(msg, answer))
            h, rbody, _ = fe.recv_raw()
            assert h.request == code and h.is_reply
            if code not in (F.GET_PROTOCOL_FEATURES, F.GET_FEATURES):
                assert rbody == answer.pack(), F(code).name
        crossed.append(F(code).name)
    assert len(crossed) == len(FRONTEND_SPECS) - len(FORBIDDEN)
    for code in sorted(FORBIDDEN):  # each ends the session: reconnect for the next one
        spec = FRONTEND_SPECS[code]
        fds = [os.eventfd(0)] if spec.fds in (Fds.ONE,) else []
        fe.send(request(code, SAMPLES[spec.payload]), fds)
        for fd in fds:
            os.close(fd)
        ready, _, _ = select.select([fe.sock], [], [], 5)
        assert ready and fe.sock.recv(1) == b"", F(code).name
        fe = consumer(device.vhost)
        link.wait_frontend(None)
    fe.close()
    link.close()
    ram.close()


def test_doorbell_by_region_write(device: Device) -> None:
    """The trapped path, as QEMU would take it: a 16-bit write into the doorbell area
    signals that vring's call eventfd; err doorbells and the log doorbell likewise."""
    link = VvuLink(device.vfu)
    fe = consumer(device.vhost)
    link.wait_frontend(None)
    call, err = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    fe.send(request(F.SET_VRING_CALL, p.VringFile.make(2)), (call,))
    fe.send(request(F.SET_VRING_ERR, p.VringFile.make(2)), (err,))
    for _ in range(2):
        VvuChannel(link).recv_raw()
    bar = link.pci.caps[6].bar
    link.client.write(bar, 4 * 2, b"\x02\x00")
    assert readable(call) and os.eventfd_read(call) == 1
    link.client.write(bar, 4 * (8 + 2), b"\x02\x00")  # N = 8 vrings
    assert readable(err) and os.eventfd_read(err) == 1
    link.client.write(bar, 4 * 16, b"\x00\x00")  # the log doorbell: accepted, no effect
    assert not readable(call, 0.1) and not readable(err, 0.1)
    for fd in (call, err):
        os.close(fd)
    fe.close()
    link.close()


@pytest.mark.parametrize("opts", ["", ",poll"], ids=["interrupt", "poll"])
def test_switch_port_through_the_device(device: Device, tmp_path: Path, opts: str) -> None:
    """A switch port served through the virtio-vhost-user device talks to a plain port."""
    from test_switch import BCAST, MAC, NET, frame

    from vhostuser.frontend.client import Frontend
    from vhostuser.frontend.net import NetClient

    plain, ctl = str(tmp_path / "plain.sock"), str(tmp_path / "ctl")
    sw = Program.python(["vhostuser.cli.switch", "--control", ctl, "--port", plain, "--port",
                         f"vvu={device.vfu}{opts}", "-v"], tmp_path / "switch.log",
                        ready=lambda _: os.path.exists(plain) and device.connected())
    try:
        nets = []
        for path in (plain, device.vhost):
            fe = Frontend(path)
            fe.negotiate(NET)
            fe.set_mem_table()
            fe.setup_queue(0, 256)
            fe.setup_queue(1, 256)
            nets.append(NetClient(fe))
        a, b = nets
        for i in range(3):  # both directions, a few times, with pauses (kicks, not spins)
            a.send([frame(BCAST, MAC[1], bytes([i]) * 46)])
            assert b.recv(1)[0][1] == frame(BCAST, MAC[1], bytes([i]) * 46)
            b.send([frame(MAC[1], MAC[2], bytes([i]) * 46)])
            assert a.recv(1)[0][1] == frame(MAC[1], MAC[2], bytes([i]) * 46)
            time.sleep(0.05)
        for n in nets:
            n.fe.close()
    finally:
        sw.send_signal(signal.SIGTERM)
        assert sw.wait(15) == 0


def test_vhost_user_net_through_the_device(device: Device, tmp_path: Path) -> None:
    """vhost-user-net --vvu: a consumer's frames reach the port (its counters say so)."""
    from test_switch import BCAST, MAC, NET, frame

    from vhostuser.frontend.client import Frontend
    from vhostuser.frontend.net import NetClient

    ctl = str(tmp_path / "net.ctl")
    net = Program.python(["vhostuser.cli.net", "--vvu", device.vfu, "--control", ctl, "-v"],
                         tmp_path / "net.log",
                         ready=lambda _: os.path.exists(ctl) and device.connected())
    try:
        fe = Frontend(device.vhost)
        fe.negotiate(NET)
        fe.set_mem_table()
        fe.setup_queue(0, 256)
        fe.setup_queue(1, 256)
        n = NetClient(fe)
        n.send([frame(BCAST, MAC[1], bytes([i]) * 46) for i in range(10)])
        deadline = time.monotonic() + 10
        while True:
            out = subprocess.run([sys.executable, "-m", "vhostuser.cli.switch", "stats",
                                  "--control", ctl], capture_output=True, text=True).stdout
            port = json.loads(out)["ports"][0]
            if port["rx_packets"] >= 10 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert (port["rx_packets"], port["rx_bytes"]) == (10, 600), out
        fe.close()
    finally:
        net.send_signal(signal.SIGTERM)
        assert net.wait(15) == 0


@pytest.mark.parametrize("mode", [[], ["--poll"]], ids=["interrupt", "poll"])
def test_rng_through_the_device(device: Device, tmp_path: Path, mode: list[str]) -> None:
    """vhost-user-rng --vvu, unchanged: the consumer's buffers fill with the source's bytes."""
    from vhostuser.frontend.client import Frontend
    from vhostuser.frontend.rng import RngClient

    source = os.urandom(8192)
    (tmp_path / "source").write_bytes(source)
    n = device.log().count("vfio-user client connected")
    proc = Program.python(["vhostuser.cli.rng", "--vvu", device.vfu, "--source",
                           str(tmp_path / "source"), "-v", *mode], tmp_path / "appliance.log",
                          ready=lambda _: device.connected(n + 1))
    try:
        with Frontend(device.vhost) as fe:
            fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX)
            fe.set_mem_table()
            fe.setup_queue(0, 16)
            rng = RngClient(fe)
            assert rng.read(100) == source[:100]
            assert rng.read(4000) == source[100:4100]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_input_through_the_device(device: Device, tmp_path: Path) -> None:
    """vhost-user-input --vvu, unchanged: the config space answers through the device (the
    CONFIG protocol feature), injected events reach the consumer, its LED comes back."""
    from vhostuser.frontend.client import Frontend
    from vhostuser.frontend.input import InputClient
    from vhostuser.protocol import ProtocolFeature

    events = str(tmp_path / "events.sock")
    n = device.log().count("vfio-user client connected")
    proc = Program.python(["vhostuser.cli.input", "--vvu", device.vfu, "--events", events,
                           "--kind", "mouse", "-v"], tmp_path / "appliance.log",
                          ready=lambda _: device.connected(n + 1))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.bind("")
    client.settimeout(10)
    try:
        with Frontend(device.vhost) as fe:
            fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES,
                         ProtocolFeature.CONFIG | ProtocolFeature.REPLY_ACK)
            fe.set_mem_table()
            fe.setup_queue(0, 16)
            fe.setup_queue(1, 16)
            inp = InputClient(fe)
            assert inp.config(0x01) == b"vhost-user mouse"
            inp.post(4)
            client.sendto(b'[{"type": "EV_REL", "code": "REL_Y", "value": -3}]', events)
            assert inp.events(2) == [(2, 1, -3), (0, 0, 0)]  # EV_REL REL_Y, SYN_REPORT
            inp.status(0x11, 0, 1)  # EV_LED LED_NUML: back to the sender, as it is
            assert json.loads(client.recv(4096)) == {"type": 0x11, "code": 0, "value": 1}
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_vsock_through_the_device(device: Device, tmp_path: Path) -> None:
    """vhost-user-vsock --vvu, unchanged: the guest CID comes through GET_CONFIG, a stream
    to a host program opens and carries data both ways."""
    from vhostuser.frontend.client import Frontend
    from vhostuser.frontend.vsock import VsockClient
    from vhostuser.protocol import ProtocolFeature

    uds = str(tmp_path / "vm.vsock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_1234")
    lst.listen()
    lst.settimeout(10)
    n = device.log().count("vfio-user client connected")
    proc = Program.python(["vhostuser.cli.vsock", "--vvu", device.vfu, "--guest-cid", "7",
                           "--uds-path", uds, "-v"], tmp_path / "appliance.log",
                          ready=lambda _: device.connected(n + 1))
    try:
        with Frontend(device.vhost) as fe:
            fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES,
                         ProtocolFeature.CONFIG | ProtocolFeature.REPLY_ACK)
            assert struct.unpack("<Q", fe.get_config(8)) == (7,)
            fe.set_mem_table()
            fe.setup_queue(0, 64)
            fe.setup_queue(1, 64)
            g = VsockClient(fe, 7, rx_buffers=16)
            g.send(5000, 1234, 1)  # REQUEST
            (p,) = g.recv()
            assert (p.op, p.src_port, p.dst_port) == (2, 1234, 5000)  # RESPONSE
            host, _ = lst.accept()
            host.settimeout(10)
            g.send(5000, 1234, 5, b"through the device")  # RW
            assert host.recv(100) == b"through the device"
            host.sendall(b"and back")
            (p,) = g.recv()
            assert (p.op, p.data) == (5, b"and back")
            host.close()
    finally:
        lst.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_scsi_through_the_device(device: Device, tmp_path: Path) -> None:
    """vhost-user-scsi --vvu, unchanged: commands, data both ways and task management
    cross the device; the image on the host holds what the consumer wrote."""
    from vhostuser.frontend.client import Frontend
    from vhostuser.frontend.scsi import ScsiClient

    img = tmp_path / "lun0.img"
    img.write_bytes(bytes(4 << 20))
    n = device.log().count("vfio-user client connected")
    proc = Program.python(["vhostuser.cli.scsi", "--vvu", device.vfu, "--disk", str(img),
                           "-v"], tmp_path / "appliance.log",
                          ready=lambda _: device.connected(n + 1))
    try:
        with Frontend(device.vhost) as fe:
            fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX)
            fe.set_mem_table()
            for q in range(3):
                fe.setup_queue(q, 32)
            c = ScsiClient(fe)
            inq = c.command(bytes([0x12, 0, 0, 0, 36, 0]), data_in=36)
            assert (inq.status, inq.data[8:16]) == (0, b"VHOSTUSR")
            data = os.urandom(8192)
            write = struct.pack(">BBIBHB", 0x2A, 0, 64, 0, 16, 0)  # WRITE (10)
            assert c.command(write, data_out=data).status == 0
            read = struct.pack(">BBIBHB", 0x28, 0, 64, 0, 16, 0)  # READ (10)
            assert c.command(read, data_in=8192).data == data
            assert c.tmf(0) == 0  # ABORT TASK on the control queue
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert img.read_bytes()[64 * 512 : 64 * 512 + 8192] == data


def test_fs_through_the_device(device: Device, tmp_path: Path) -> None:
    """vhost-user-fs --vvu, unchanged and in its default sandbox (a mount namespace):
    FUSE requests and file data cross the device both ways; the host directory holds
    what the consumer wrote."""
    from vhostuser.frontend.client import Frontend
    from vhostuser.frontend.fs import FsClient

    share = tmp_path / "share"
    share.mkdir()
    (share / "in.bin").write_bytes(data_in := os.urandom(300_000))
    n = device.log().count("vfio-user client connected")
    proc = Program.python(["vhostuser.cli.fs", "--vvu", device.vfu, "--shared-dir",
                           str(share), "--tag", "vvu", "-v"], tmp_path / "appliance.log",
                          ready=lambda _: device.connected(n + 1))
    try:
        with Frontend(device.vhost) as fe:
            fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX)
            assert fe.get_config(40) == b"vvu".ljust(36, b"\0") + struct.pack("<I", 1)
            fe.set_mem_table()
            for q in range(2):
                fe.setup_queue(q, 32)
            c = FsClient(fe)
            c.init()
            e = c.lookup(1, b"in.bin")
            assert e.attr.size == len(data_in)
            fh = c.open(e.nodeid, os.O_RDONLY)
            assert c.read(e.nodeid, fh, 1000, 200_000) == data_in[1000:201_000]
            entry, wfh = c.create(1, b"out.bin")
            data_out = os.urandom(200_000)
            assert c.write(entry.nodeid, wfh, 0, data_out) == len(data_out)
            c.release(entry.nodeid, wfh)
            assert sorted(d.name for d in c.listdir(1)) == [b".", b"..", b"in.bin", b"out.bin"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert (share / "out.bin").read_bytes() == data_out


def test_consumer_memory_in_several_files(device: Device,
                                          appliance: Callable[..., subprocess.Popen]) -> None:
    """libblkio-style consumers keep rings and buffers in separate memfds: each file gets
    its own place in the window and the appliance maps each from its own region."""
    from vhostuser.virtq.guest_ram import GuestRam

    appliance()
    fe, (blk,) = blk_session(device.vhost)
    with fe:
        extra = GuestRam(1 << 20, guest_addr=0x2_0000_0000, user_addr=0x7E00_0000_0000)
        region = extra.region()
        fe.call(F.ADD_MEM_REG, p.SingleMemRegion(region), fds=(extra.fd,))
        hdr, status = fe.ram.alloc(16), fe.ram.alloc(1)
        fe.ram.at(hdr, 16)[:] = struct.pack("<IIQ", 0, 0, 9)  # read sector 9...
        fe.queues[0].ring.add([(hdr, 16, False), (region.guest_addr + 4096, 512, True),
                               (status, 1, True)])  # ...into the second file
        fe.kick(0)
        fe.wait_used(0)
        assert fe.ram.at(status, 1)[0] == OK
        assert bytes(extra.at(region.guest_addr + 4096, 512)) == sector(9)
        assert blk.read(3, 512) == (OK, sector(3))  # the first file still works
        extra.close()


def test_window_file_is_mapped_before_any_consumer(tmp_path: Path) -> None:
    """--window-file: BAR 4 is mmap-able from the first GET_REGION_INFO (what QEMU reads
    when it attaches the device), and a consumer whose RAM is in that file has its regions
    relayed at their own offsets: the mapping made before it came is its memory."""
    win = tmp_path / "window.mem"
    d = Device(tmp_path, "--max-queues", "4", "--window-size", "4M", "--window-file", str(win))
    try:
        assert win.stat().st_size == 4 << 20  # created, sparse
        link = VvuLink(d.vfu)
        bar4 = link.client.region(4)
        assert bar4.flags & vp.RegionFlag.MMAP and bar4.fd is not None
        assert bar4.mmap_areas == ((0, 4 << 20),)
        early = link.client.map_region(bar4)  # as the appliance's QEMU does at attach
        os.close(bar4.fd)
        fd = os.open(win, os.O_RDWR)  # the consumer's VMM: guest RAM in the window file
        ram = memoryview(mmap_file(fd, 4 << 20))
        ram[0x30000:0x30008] = b"CONSUMER"
        assert early[0x30000:0x30008] == b"CONSUMER"
        fe = consumer(d.vhost)
        link.wait_frontend(None)
        chan = VvuChannel(link)
        region = p.MemRegion(0x10000, 0x3F0000, 0x7F0000000000, 0x10000)
        fe.send(request(F.SET_MEM_TABLE, p.MemTable((region,))), (fd,))
        header, body, _ = chan.recv_raw()
        relayed = p.MemTable.unpack(body).regions
        assert header.request == F.SET_MEM_TABLE and relayed == (region,)  # offsets kept
        early[0x30000:0x30004] = b"APPL"  # the early mapping writes the consumer's RAM
        assert bytes(ram[0x30000:0x30008]) == b"APPLUMER"
        assert "window access trapped" not in d.log()
        ram.release()
        early.close()
        fe.close()
        link.close()
        os.close(fd)
    finally:
        d.stop()


def test_window_file_larger_than_the_window_is_refused(tmp_path: Path) -> None:
    win = tmp_path / "window.mem"
    with open(win, "wb") as f:
        f.truncate(8 << 20)
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.vvu_device", "--vfio-user-socket",
                        str(tmp_path / "vfu.sock"), "--socket-path", str(tmp_path / "v.sock"),
                        "--window-size", "4M", "--window-file", str(win)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "more than the window" in r.stderr, r.stderr


def mmap_file(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, mmap.MAP_SHARED)


def test_backend_request_through_the_device(device: Device) -> None:
    """A back-end request from the appliance (CONFIG_CHANGE_MSG on txq) reaches the
    consumer's back-end channel, and the consumer's ack comes back on rxq."""
    from vhostuser.protocol import BackendReq, Channel, decode_header, decode_reply
    from vhostuser.protocol.constants import ProtocolFeature as PF

    link = VvuLink(device.vfu)
    fe = consumer(device.vhost)
    link.wait_frontend(None)
    chan = VvuChannel(link)
    fe.send(request(F.SET_PROTOCOL_FEATURES, p.U64(PF.BACKEND_REQ | PF.REPLY_ACK)))
    assert chan.recv_raw()[0].request == F.SET_PROTOCOL_FEATURES
    ours, theirs = socket.socketpair()
    fe.send(request(F.SET_BACKEND_REQ_FD), (theirs.fileno(),))
    theirs.close()
    header, _, tokens = chan.recv_raw()
    assert header.request == F.SET_BACKEND_REQ_FD and tokens == [Token("backend")]
    link.send(encode(request(BackendReq.CONFIG_CHANGE_MSG, need_reply=True)))
    be = UnixChannel(ours)
    h, _, _ = be.recv_raw()
    assert h.request == BackendReq.CONFIG_CHANGE_MSG and h.need_reply
    be.send(reply_to(request(BackendReq.CONFIG_CHANGE_MSG), p.U64(0)))
    data = link.recv(None)
    ack = decode_header(data[:12])
    assert ack.is_reply and ack.request == BackendReq.CONFIG_CHANGE_MSG
    assert decode_reply(Channel.BACKEND, ack.request, ack, data[12:]).payload == p.U64(0)
    assert link.status() == 3  # the session goes on
    be.close()
    fe.close()
    link.close()


def test_a_consumer_fd_that_is_no_listening_socket_is_refused(tmp_path: Path) -> None:
    r_pipe, w_pipe = os.pipe()
    conn, peer = socket.socketpair()
    try:
        for fd, why in ((r_pipe, f"--fd {r_pipe}: Socket operation on non-socket"),
                        (conn.fileno(), "is not a listening UNIX stream socket")):
            r = subprocess.run([sys.executable, "-m", "vhostuser.cli.vvu_device",
                                "--vfio-user-socket", str(tmp_path / "vfu.sock"), "--fd",
                                str(fd)], pass_fds=[fd], capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 1 and why in r.stderr, r.stderr
        r = subprocess.run([sys.executable, "-m", "vhostuser.cli.vvu_device",
                            "--vfio-user-socket", "a", "--socket-path", "b", "--fd", "3"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "not allowed with" in r.stderr, r.stderr
        # a vfio-user socket that cannot be made: said, and the consumer's is not left
        vh = tmp_path / "vh.sock"
        r = subprocess.run([sys.executable, "-m", "vhostuser.cli.vvu_device",
                            "--vfio-user-socket", str(tmp_path / "no dir" / "vfu.sock"),
                            "--socket-path", str(vh)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 1 and "--vfio-user-socket" in r.stderr, r.stderr
        assert not vh.exists()
    finally:
        for fd in (r_pipe, w_pipe):
            os.close(fd)
        conn.close()
        peer.close()
