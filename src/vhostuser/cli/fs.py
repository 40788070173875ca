"""vhost-user-fs: share a host directory with a guest (virtio-fs; the guest mounts it with
`mount -t virtiofs TAG /mnt`)."""

from __future__ import annotations

import argparse
import os
import resource
import stat

from ..devices.fs import DEFAULT_THREADS, MAX_REQUEST_QUEUES, FsDevice, FsOptions
from ..fuse import abi
from ..fuse.sandbox import Sandbox, SandboxError, enter
from ..fuse.server import ServerOptions
from .common import add_transport_args, capabilities_first, check_transport_args, run, setup_logging


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhost-user-fs", description=__doc__)
    add_transport_args(ap)
    ap.add_argument("--shared-dir", metavar="DIR", help="the directory the guest sees")
    ap.add_argument("--tag", help="the name the guest mounts it by (up to 36 bytes)")
    ap.add_argument("--readonly", action="store_true", help="refuse every change")
    ap.add_argument("--cache", choices=("auto", "always", "never"), default="auto",
                    help="how long the guest may cache names, attributes and data: auto "
                         "(1 s, data kept while unchanged), always (a day: nothing else "
                         "changes the directory), never (no caching; direct I/O)")
    ap.add_argument("--sandbox", choices=("namespace", "chroot", "none"), default=None,
                    help="confine the process to DIR: a mount namespace (default as root), "
                         "a chroot, or none (default otherwise; every access is still "
                         "resolved beneath DIR)")
    ap.add_argument("--xattr", action="store_true", help="serve extended attributes")
    ap.add_argument("--announce-submounts", action="store_true",
                    help="tell the guest where other file systems are mounted under DIR "
                         "(each becomes a submount in the guest)")
    ap.add_argument("--request-queues", type=int, default=1, metavar="N",
                    help=f"request queues offered (default 1, at most {MAX_REQUEST_QUEUES})")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                    help=f"requests served at once (default {DEFAULT_THREADS})")
    return ap


def raise_fd_limit(want: int = 1_000_000) -> None:
    """Every inode the guest knows holds an fd: take up to `want` fds (as virtiofsd does),
    or all we are allowed without privilege."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
    except (OSError, ValueError):  # no CAP_SYS_RESOURCE, or above fs.nr_open
        pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    capabilities_first(argv, "fs", [])
    ap = parser()
    args = ap.parse_args(argv)
    check_transport_args(ap, args)
    if args.shared_dir is None or args.tag is None:
        ap.error("--shared-dir and --tag are required")
    try:
        if not stat.S_ISDIR(os.stat(args.shared_dir).st_mode):
            ap.error(f"--shared-dir {args.shared_dir}: not a directory")
    except OSError as e:
        ap.error(f"--shared-dir {args.shared_dir}: {e.strerror}")
    if not 0 < len(args.tag.encode()) <= abi.TAG_SIZE:
        ap.error(f"--tag must be 1 to {abi.TAG_SIZE} bytes")
    if not 1 <= args.request_queues <= MAX_REQUEST_QUEUES:
        ap.error(f"--request-queues must be between 1 and {MAX_REQUEST_QUEUES}")
    if not 1 <= args.threads <= 256:
        ap.error("--threads must be between 1 and 256")
    sandbox: Sandbox = args.sandbox or ("namespace" if os.geteuid() == 0 else "none")
    if sandbox != "none" and args.client:
        ap.error("--client reconnects by path, out of reach in a sandbox: add --sandbox none")
    setup_logging(args.verbose)
    raise_fd_limit()
    opts = FsOptions(args.shared_dir, args.tag, args.request_queues, args.threads,
                     ServerOptions(args.readonly, args.cache, args.xattr,
                                   args.announce_submounts))

    def confine() -> None:
        try:
            enter(sandbox, args.shared_dir)
        except SandboxError as e:
            raise ValueError(str(e)) from e

    return run(args, lambda: FsDevice(opts), None if sandbox == "none" else confine)


if __name__ == "__main__":
    raise SystemExit(main())
