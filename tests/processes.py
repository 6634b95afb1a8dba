"""Process helpers for tests that check a function's process really ended (timeouts, cancels)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable

# The credential test runtimes are started with (HEADWATER_RUNTIME_TOKEN) and every request to them carries.
RUNTIME_TOKEN = "test-runtime-credential"
RUNTIME_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {RUNTIME_TOKEN}"}


def runtime_env(**extra: str) -> dict[str, str]:
    """The environment to start a runtime server with in tests: the test credential, plus extra."""
    return {**os.environ, "HEADWATER_RUNTIME_TOKEN": RUNTIME_TOKEN, **extra}


def gone(pid: int) -> bool:
    """True when the process no longer runs (a zombie waiting for init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # (ESRCH: it exited while /proc was read)
        return True


def wait_gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return gone(pid)


def shared_dir(prefix: str) -> str:
    """A directory a test shares with its functions: writable even by a sandbox uid (the tests' tmp
    dirs are root's), and outside /tmp, which a root runtime replaces with a private one per child."""
    folder = tempfile.mkdtemp(prefix=prefix, dir="/run" if os.geteuid() == 0 else None)
    os.chmod(folder, 0o777)
    atexit.register(shutil.rmtree, folder, True)  # /run is a small shared tmpfs; the suite leaves no headwater-cancel-* behind
    return folder


def pid_path() -> str:
    """Where a test function writes its pid."""
    return os.path.join(shared_dir("headwater-cancel-"), "pid")


def wait_for_pid(path: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return int(text)
        time.sleep(0.02)
    raise AssertionError("the function never started")


def check_post_cancel(url: str, body: dict, path: str, post: Callable[[str, dict], dict]) -> None:
    """The runtime protocol's POST /cancel: it answers how many runs it stopped, the run answers
    `failed`/`cancelled`, and the function's process is gone. `body` runs a function that writes its
    pid to `path` and then sleeps, under execution id "to-cancel"."""
    replies: list[dict] = []
    thread = threading.Thread(target=lambda: replies.append(post(url, body)))
    thread.start()
    child = wait_for_pid(path)
    request = urllib.request.Request(url + "/cancel", data=json.dumps({"execution_id": "to-cancel"}).encode(),
                                     headers=RUNTIME_HEADERS)
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert json.loads(resp.read()) == {"cancelled": 1}
    thread.join(5)
    assert replies and (replies[0]["status"], replies[0]["reason"]) == ("failed", "cancelled"), replies
    assert replies[0]["output"] == "Function execution cancelled."
    assert wait_gone(child)
    with urllib.request.urlopen(urllib.request.Request(url + "/cancel", data=b'{"execution_id": "nobody"}', headers=RUNTIME_HEADERS), timeout=5) as resp:
        assert json.loads(resp.read()) == {"cancelled": 0}


def check_hangup_cancels(url: str, body: dict, path: str) -> int:
    """A client that closes its /execute connection (what an engine's HTTP client does when its
    call is cancelled) gets the function killed (`body` must sleep far longer than wait_gone waits).
    Returns the killed child's pid."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {RUNTIME_TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    child = wait_for_pid(path)
    assert not gone(child)
    sock.close()
    assert wait_gone(child), "the function kept running after its client hung up"
    return child
