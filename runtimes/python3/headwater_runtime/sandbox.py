"""Containment of a child: its own uid, a clean environment, parent-death signal, and killing all it started."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time

from headwater_runtime import namespaces, pipes


try:  # loaded once here so each forked child need not (prctl for parent-death signals)
    import ctypes

    LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except (ImportError, OSError):
    LIBC = None

# Sandbox uids (used when the server runs as root): every child gets its own uid so RLIMIT_NPROC
# counts exactly that child's processes and one kill(-1) as that uid ends all of them. The uid is
# derived from the server's pid and a per-server slot, so concurrent servers never share one.
SANDBOX_UID_BASE = 2 ** 30  # below 2**31: Node takes uids as int32
SANDBOX_UID_SLOTS = 256
# The environment a function sees: the server's own (which may hold the engine's credentials) is
# never passed on.
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONIOENCODING", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36

SANDBOX = {"uids": False}  # set by main(): --sandbox


def prctl(option: int, value: int) -> None:
    if LIBC is None or LIBC.prctl(option, value, 0, 0, 0) != 0:
        raise OSError("prctl failed")


def die_with_parent(server_pid: int) -> None:
    """Ask Linux to SIGKILL this child if the server dies, so a killed server leaves no orphans."""
    try:
        # Called after any uid change: changing credentials clears the parent-death signal.
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: idle children still exit on end-of-file from the server
    if os.getppid() != server_pid:
        os._exit(0)  # the server died before the request above took effect


CHILD_PID = 0  # in a child: its own pid (a process the function forks has another)
SANDBOX_UID = 0  # in a child: the sandbox uid it runs as (0: none)
PKG_PREFIXES: list[str] = []  # in a child: path prefixes of the package, cut from tracebacks


def enter(pkg_dir: str, uid: int, keep: tuple[str, ...] = ()) -> str:
    """Drop to the sandbox uid (when given) and return the sys.path entry for the package. `keep`:
    directories the process reaches by absolute path (a PHP package, a build's tree) that stay
    visible at that path when private scratch space is mounted over their parent."""
    with contextlib.suppress(OSError):
        os.chdir(pkg_dir)
    dir_fd = os.open(pkg_dir, os.O_RDONLY | os.O_DIRECTORY)  # opened before /tmp is replaced below
    namespaces.isolate(keep)
    return enter_package(dir_fd, pkg_dir, uid)


def enter_package(dir_fd: int, pkg_dir: str, uid: int) -> str:
    """The rest of enter() for a child already in its namespaces and its package's directory, given
    the package as a descriptor opened before them (a spare child receives it from the server):
    clean environment, subreaper, the uid switch. Returns the sys.path entry for the package."""
    global SANDBOX_UID
    pipes.SERVER_FDS.discard(dir_fd)  # the package's descriptor stays open: own_stdio must not close it
    env = {k: v for k, v in os.environ.items() if k in SAFE_ENV or k.startswith("LC_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = tempfile.gettempdir() if uid else os.environ.get("HOME", tempfile.gettempdir())
    if namespaces.available():
        env["TMPDIR"] = env["HOME"] = "/tmp"  # the private scratch space
    os.environ.clear()
    os.environ.update(env)
    with contextlib.suppress(OSError):
        # Orphans of the function's processes come back to this child, so it sees (and the server
        # can kill) everything the function left running.
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    # The work dir is private to the server (root), and may sit under the /tmp just replaced: the
    # child reaches its package only through this open descriptor (and its cwd), never by path, so
    # the function cannot read other functions' packages.
    path_entry = f"/proc/self/fd/{dir_fd}" if uid or namespaces.available() else pkg_dir
    if uid:
        _keep_imports_reachable()
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        SANDBOX_UID = uid
        with contextlib.suppress(OSError):
            prctl(PR_SET_DUMPABLE, 1)  # so the function may read its own /proc entries as usual
    PKG_PREFIXES.extend({path_entry + os.sep, pkg_dir + os.sep})
    return path_entry


def _reachable_by_others(path: str) -> bool:
    """Whether a uid owning nothing can traverse to (and read) this directory."""
    path = os.path.abspath(path)
    try:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        while path != os.sep:
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & 0o001:
                return False
    except OSError:
        return False
    return True


def _keep_imports_reachable() -> None:
    """Before dropping to the sandbox uid: reach interpreter directories it could not traverse (an
    interpreter installed under /root, say) through open descriptors, so imports keep working."""
    moved: dict[str, str] = {}  # unreachable directory + "/" -> its descriptor path + "/"
    for i, entry in enumerate(list(sys.path)):
        if entry and os.path.isdir(entry) and not _reachable_by_others(entry):
            with contextlib.suppress(OSError):
                fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
                sys.path[i] = f"/proc/self/fd/{fd}"
                moved[entry.rstrip(os.sep) + os.sep] = sys.path[i] + os.sep
                PKG_PREFIXES.append(sys.path[i] + os.sep)
    # Packages imported already (encodings, email, ...) find their submodules through __path__, not
    # sys.path: without this, "x".encode("idna") (so every urllib request to a host name) failed
    # in the sandbox with "unknown encoding: idna".
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if not isinstance(paths, list):
            continue
        for j, entry in enumerate(paths):
            for old, new in moved.items():
                if isinstance(entry, str) and entry.startswith(old):
                    paths[j] = new + entry[len(old):]
                    break
    sys.path_importer_cache.clear()


def own_stdio(out: int, keep: set[int]) -> None:
    """In a child: close the server's descriptors (but `out` and `keep`), stdin from /dev/null,
    stdout and stderr to `out`."""
    for fd in pipes.SERVER_FDS - keep - {out}:
        with contextlib.suppress(OSError):
            os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)


def killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def kill_uid(uid: int) -> None:
    """SIGKILL every process of a sandbox uid, including any that left the child's process group.

    A helper process takes the uid and calls kill(-1): the kernel signals every process that uid may
    signal (all of its own, never the caller) in one pass that a fork bomb cannot outrun.
    """
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(20):
                os.kill(-1, signal.SIGKILL)
                time.sleep(0.001)
        except BaseException:  # noqa: BLE001 - ProcessLookupError: nothing (left) to kill
            pass
        os._exit(0)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


_uids_in_use: set[int] = set()  # slots of live children (released when a child is reaped)
_next_slot = 0


def allocate_uid() -> int:
    """A uid no other live child of any runtime server on this host uses (0 when not sandboxing).

    Slots are handed out round-robin but never one a live child still holds: a wrapped counter once
    gave a new child the uid of a live one, which would have shared its process limit and kill."""
    global _next_slot
    if not SANDBOX["uids"]:
        return 0
    for _ in range(SANDBOX_UID_SLOTS):
        slot, _next_slot = _next_slot, (_next_slot + 1) % SANDBOX_UID_SLOTS
        if slot not in _uids_in_use:
            _uids_in_use.add(slot)
            return SANDBOX_UID_BASE + (os.getpid() % (1 << 22)) * SANDBOX_UID_SLOTS + slot
    raise OSError(f"all {SANDBOX_UID_SLOTS} sandbox uids of this server are in use by live children")


def release_uid(uid: int) -> None:
    """The child holding uid has been reaped and its uid's processes killed: the slot is free again."""
    if uid:
        _uids_in_use.discard((uid - SANDBOX_UID_BASE) % SANDBOX_UID_SLOTS)
