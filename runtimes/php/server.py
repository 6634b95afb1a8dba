"""Headwater PHP runtime: the shared runtime server (runtimes/python3: server.py and its headwater_runtime package) with PHP CLI workers."""

# The server, its containment (sandbox uid, rlimits, clean environment, process-tree kills) and the
# protocol are python3's, loaded from beside this folder: a warm child is forked and contained as for
# Python, then execs `php worker.php`, which loads the function's file once and serves requests over
# the same framed-JSON pipes (runtimes/README.md).

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1024 * 1024


# The shared server's folder: runtimes/python3 beside this folder in the source tree, or
# /opt/headwater/python3 below it in the image (this file being /opt/headwater/server.py). Its package,
# headwater_runtime, is the containment every runtime keeps.
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "python3"), os.path.join(HERE, "python3")]

from headwater_runtime import language  # noqa: E402



class PHP:
    """How the shared server runs a PHP function."""

    # The PHP CLI's own data size at start (≈5 MiB measured with php 8.2) plus room for the Zend
    # allocator's 2 MiB chunks and extensions' own allocations: memory_limit (= memory_size) is what
    # stops a function, cleanly; RLIMIT_DATA is the backstop for what the Zend allocator does not count.
    footprint = 32 * MiB
    threads = 0  # single-threaded
    routes: dict = {}

    def __init__(self, php: str, worker: str):
        self.php = php
        # The sandbox uid may not traverse to this folder: the worker script reaches the child as fd 5.
        self.inherit = [os.open(worker, os.O_RDONLY)]
        self._root: str | None = None
        self._copies: dict[str, str] = {}

    def command(self, entry: str, limits: dict) -> tuple[list[str], dict]:
        memory = int(limits.get("memory_size") or 0)
        argv = [self.php, "-d", f"memory_limit={memory if memory else -1}", "-d", "display_errors=0",
                "-d", "log_errors=0", "-d", "html_errors=0", "-d", "error_reporting=-1", "-d", "opcache.enable_cli=0",
                "-d", "zend.assertions=1", "/proc/self/fd/5", entry]
        return argv, {}

    def prepare(self, pkg_dir: str, sandboxed: bool) -> str:
        """Where the worker runs the package. PHP opens files by absolute path (its cwd + name), which
        a sandbox uid cannot traverse to under the server's private packages dir; so a sandboxed
        worker gets a copy under a directory it may traverse but not list (0711), at an unguessable
        name: other functions cannot find it."""
        if not sandboxed:
            return pkg_dir
        copy = self._copies.get(pkg_dir)
        if copy is None:
            if self._root is None:
                self._root = tempfile.mkdtemp(prefix="headwater-php-")
                os.chmod(self._root, 0o711)
                atexit.register(shutil.rmtree, self._root, True)
            copy = os.path.join(self._root, secrets.token_hex(16))
            shutil.copytree(pkg_dir, copy, symlinks=True)
            self._copies[pkg_dir] = copy
        return copy

    def crash_reason(self, status: int, logs: str):
        if re.search(r"Allowed memory size of \d+ bytes exhausted|Out of memory", logs):
            return "memory", "Function exceeded its memory limit."
        return None


def main(argv: list[str] | None = None) -> None:
    php = os.environ.get("HEADWATER_PHP") or shutil.which("php")
    if php is None:
        sys.exit("php runtime: the PHP CLI (`php`) is not on PATH; install php-cli or set HEADWATER_PHP")
    language.serve(PHP(php, os.path.join(HERE, "worker.php")), "headwater.runtime.php", argv)

if __name__ == "__main__":
    main()
