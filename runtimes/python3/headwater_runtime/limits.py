"""Resource limits a child sets on itself before the function loads (rlimits)."""

from __future__ import annotations

import os
import resource

from headwater_runtime import sandbox

DEFAULT_NOFILE = 1024
DEFAULT_NPROC = 128  # processes (and threads) a function may have beside its own interpreter; Qinling's value
DEFAULT_FSIZE = 524288000  # largest file a function may write (bytes); Qinling's value


def apply(limits: dict, footprint: int | None = None, threads: int = 0) -> None:
    """The execution's rlimits on this process. `footprint` (bytes) replaces the measured data size
    and `threads` adds room for the runtime's own threads, for a child that next execs another
    language's worker (Go, PHP): what the function may add is the same for every runtime."""
    def cap(kind, value):
        value = int(value)
        soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))

    cap(resource.RLIMIT_NOFILE, limits.get("files") or DEFAULT_NOFILE)
    if os.geteuid() != 0:
        # RLIMIT_NPROC counts every task (process or thread) of the uid. With a sandbox uid that is
        # exactly this child's tree, so the limit is what the function may add to what runs now.
        # Without one (a container's single uid) the server's own tasks count too: same formula.
        cap(resource.RLIMIT_NPROC, _uid_tasks() + threads + int(limits.get("processes") or DEFAULT_NPROC))
    cap(resource.RLIMIT_FSIZE, limits.get("file_size") or DEFAULT_FSIZE)
    if limits.get("memory_size"):
        # The limit is what the function may allocate on top of the interpreter's own footprint:
        # an absolute 32 MiB cap would leave a Python process no room at all.
        cap(resource.RLIMIT_DATA, (_vm_data() if footprint is None else footprint) + int(limits["memory_size"]))


def _uid_tasks() -> int:
    """Tasks of this process's real uid: this process's threads when it has a sandbox uid of its own."""
    if sandbox.SANDBOX_UID:
        try:
            return len(os.listdir("/proc/self/task"))
        except OSError:
            return 1
    uid = os.getuid()
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return count


def _vm_data() -> int:
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
