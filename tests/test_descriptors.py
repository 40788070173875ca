"""QEMU's back-end conventions for every program (docs/interop/vhost-user.rst and
vhost-user.json): `--print-capabilities` answers whatever else is on the command line;
each back-end ships a vhost-user.json descriptor that follows the schema's rules, names a
type its program reports, and is installed with the package; `vhost-user-descriptors`
writes them with this installation's paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "share" / "qemu" / "vhost-user").glob("*.json"))
# QEMU's docs/interop/vhost-user.json: VHostUserBackendType and the features it defines
TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net", "rng",
         "rpmsg", "rproc-serial", "scsi", "vsock", "fs"}
FEATURES = {"block": {"read-only", "blk-file"}, "input": {"evdev-path", "no-grab"},
            "gpu": {"render-node", "virgl"}}
MODULES = {"vhost-user-blk": "blk", "vhost-user-fs": "fs", "vhost-user-input": "input",
           "vhost-user-net": "net", "vhost-user-rng": "rng", "vhost-user-scsi": "scsi",
           "vhost-user-vsock": "vsock", "vhost-user-switch": "switch"}


def capabilities(program: str, *extra: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", f"vhostuser.cli.{MODULES[program]}",
                          "--print-capabilities", *extra], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    caps: dict[str, object] = json.loads(out.stdout)
    return caps


def check_schema(d: object) -> None:
    """VhostUserBackend: description, type and binary; tags optional; nothing else."""
    assert isinstance(d, dict)
    assert set(d) - {"tags"} == {"description", "type", "binary"}, sorted(d)
    assert isinstance(d["description"], str) and d["description"]
    assert d["type"] in TYPES
    assert isinstance(d["binary"], str) and os.path.isabs(d["binary"])
    assert all(isinstance(t, str) for t in d.get("tags", []))


@pytest.mark.parametrize("program", sorted(MODULES))
def test_print_capabilities_ignores_the_other_options(program: str) -> None:
    caps = capabilities(program, "--no-such-option", "--socket-path")
    assert set(caps) == {"type", "features"} and caps["type"] in TYPES
    assert set(caps["features"]) <= FEATURES.get(str(caps["type"]), set())  # type: ignore[arg-type]
    assert caps == capabilities(program)


def test_each_backend_ships_a_descriptor_of_its_own_type() -> None:
    programs = {p for p in MODULES if p != "vhost-user-switch"}  # the switch takes --port
    assert [p.name for p in SHIPPED] == sorted(f"50-python-{p}.json" for p in programs)
    for path in SHIPPED:
        d = json.loads(path.read_text())
        check_schema(d)
        program = os.path.basename(d["binary"])
        assert path.name == f"50-python-{program}.json"
        assert d["type"] == capabilities(program)["type"], path.name


def test_the_descriptors_are_in_the_wheel(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = sorted(n.rsplit("/", 1)[1] for n in names if "/data/share/qemu/vhost-user/" in n)
    assert data == [p.name for p in SHIPPED]


def test_descriptors_for_this_installation(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vhostuser.cli.descriptors", "--dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    written = sorted(tmp_path.glob("*.json"))
    assert [p.name for p in written] == [p.name for p in SHIPPED]
    for path in written:
        d = json.loads(path.read_text())
        check_schema(d)
        # the binary is there and answers as the type it is listed under
        run = subprocess.run([d["binary"], "--print-capabilities"], capture_output=True,
                             text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["type"] == d["type"]
