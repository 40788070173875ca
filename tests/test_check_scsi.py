"""vhost-user-check --type scsi against ours (vhost-user-scsi, two LUNs): every check
passes, and the scsi-io check's report is the disk as the image makes it. (Debian ships
no C vhost-user-scsi back-end to hold it against.)"""

from __future__ import annotations

from pathlib import Path

from daemon import Daemon
from test_check import check

from vhostuser.check.checks import checks_for

SCSI = [name for name, _, _ in checks_for("scsi")]
BLOCKS = 2048  # of 512 bytes: a 1 MiB image


def test_ours_passes_every_scsi_check(tmp_path: Path) -> None:
    images = []
    for i in range(2):
        img = tmp_path / f"lun{i}.img"
        img.write_bytes(bytes([i + 1]) * (BLOCKS * 512))
        images.append(img)
    sock = tmp_path / "scsi.sock"
    d = Daemon(["vhostuser.cli.scsi", "--socket-path", str(sock),
                *(a for img in images for a in ("--disk", str(img)))], sock,
               tmp_path / "scsi.log")
    try:
        results = check(sock, kind="scsi")
        assert [r["check"] for r in results] == SCSI
        assert {"scsi-io", "scsi-bad-target", "desc-loop", "ring-crosses-region"} <= set(SCSI)
        bad = [r for r in results if r["status"] != "PASS"]
        assert bad == [], bad
        [io] = [r["detail"] for r in results if r["check"] == "scsi-io"]
        assert io == (f"device type 0x0, {BLOCKS} blocks of 512 bytes, block 0 read, "
                      "2 LUN(s) reported")
        assert d.alive()
    finally:
        assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log()
