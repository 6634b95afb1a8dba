"""Kernel namespaces for a child (as root): a network of its own, and private size-limited /tmp and /dev/shm."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import sys

from headwater_runtime import sandbox

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x20, 0x1000, 0x4000, 0x40000
SCRATCH = ("/tmp/", "/var/tmp/")
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
NETWORKS = ("none", "host")  # --network: a namespace of its own (loopback only), or the host's

# Set by main() (--network, --scratch-size); used in each child before it drops to its uid.
SETTINGS = {"network": "none", "scratch_size": 64 * 1024 * 1024}


class IsolationError(OSError):
    """The kernel refused a namespace the child must have: the child fails closed."""


def available() -> bool:
    """Namespaces need root (CAP_SYS_ADMIN); without it the child runs in the server's namespaces."""
    return os.geteuid() == 0 and sandbox.LIBC is not None


def isolate(keep: tuple[str, ...] = ()) -> None:
    """In a forked child, before any user code and before the uid switch: apply SETTINGS. The
    directories in `keep` stay reachable at their paths even if a scratch mount covers them."""
    isolate_network()
    isolate_mounts(keep)


def isolate_network() -> None:
    """The network part of isolate(): a namespace of its own with its loopback up (--network none).
    The costly part, and independent of the package: a spare child does it before it has one."""
    if available() and SETTINGS["network"] == "none":
        _check(sandbox.LIBC.unshare(CLONE_NEWNET), "unshare")
        _loopback_up()


def isolate_mounts(keep: tuple[str, ...] = ()) -> None:
    """The mount part of isolate(): private, size-limited /tmp, /var/tmp and /dev/shm. After the
    current directory is the package (a directory opened in the old namespace is then reachable
    from the new one only as the current directory, and through its descriptor)."""
    if not available():
        return
    _check(sandbox.LIBC.unshare(CLONE_NEWNS), "unshare")
    # Mounts made below must not propagate back to the host's namespace.
    _check(sandbox.LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    # Opened in the new namespace (a bind mount's source must be in it), before anything is covered:
    # directories the caller needs (`keep`, writable) and what this program itself runs from (read-only).
    # The read-only ones first: a writable `keep` directory inside one of them is bound over it.
    kept = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY), True) for path in kept_under_scratch() if path not in keep]
    kept += [(path, os.open(path, os.O_PATH | os.O_DIRECTORY), False) for path in keep]
    size = int(SETTINGS["scratch_size"])
    for target in (b"/tmp", b"/dev/shm"):
        if os.path.isdir(target):
            # A fresh tmpfs per child: private to its processes, capped at size, and gone with the
            # namespace when the last of them exits.
            options = f"size={size},mode=1777,nr_inodes=16384".encode()
            _check(sandbox.LIBC.mount(b"tmpfs", target, b"tmpfs", MS_NOSUID | MS_NODEV, options), f"mount tmpfs {target.decode()}")
    if os.path.isdir(b"/var/tmp"):
        # The other world-writable scratch directory: the same private /tmp, not the host's.
        _check(sandbox.LIBC.mount(b"/tmp", b"/var/tmp", None, MS_BIND, None), "mount --bind /tmp /var/tmp")
    for path, fd, read_only in kept:
        _uncover(path, fd, read_only)
        os.close(fd)


def _uncover(path: str, fd: int, read_only: bool) -> None:
    """Bind the directory open as `fd` back onto `path` if a scratch mount now hides it there: only
    this directory comes back, not its covered siblings (other functions' packages, builds)."""
    with contextlib.suppress(OSError):
        here, there = os.stat(path), os.fstat(fd)
        if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
            return  # not covered
    os.makedirs(path, mode=0o755, exist_ok=True)
    _check(sandbox.LIBC.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None),
           f"mount --bind {path}")
    if read_only:
        _check(sandbox.LIBC.mount(None, path.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None), f"mount -o remount,ro {path}")


def kept_under_scratch() -> list[str]:
    """Directories the runtime and its interpreter load from that lie under /tmp or /var/tmp (a
    checkout or virtualenv there, as in a CI clone): the private scratch would hide them from the
    child. The outermost of them, to be shown again read-only."""
    found = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, *sys.path) if p and os.path.isdir(p)})
    found = [p for p in found if p.startswith(SCRATCH)]  # below /tmp, never /tmp itself
    return [p for p in found if not any(p.startswith(other + "/") for other in found if other != p)]


def _loopback_up() -> None:
    """A new network namespace has only `lo`, down: bring it up so the function may talk to itself."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise IsolationError(err, f"{what}: {os.strerror(err)}")
