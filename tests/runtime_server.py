"""Start a runtime server as a subprocess and drive it over HTTP (the per-runtime unit tests share this)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.processes import RUNTIME_HEADERS, runtime_env

RUNTIMES = Path(__file__).resolve().parents[1] / "runtimes"


@contextlib.contextmanager
def runtime_server(runtime: str, work: Path) -> Iterator[str]:
    """runtimes/<runtime>/server.py (or server.js, with node) on a free port, with the test credential
    and `work`'s parent as the one directory packages may come from; yields its base URL."""
    script = RUNTIMES / runtime / "server.py"
    command = [sys.executable, str(script)] if script.is_file() else [shutil.which("node") or "node", str(RUNTIMES / runtime / "server.js")]
    proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", "0", "--work-dir", str(work),
                             "--package-dir", str(work.parent)],
                            stdout=subprocess.PIPE, stderr=None, start_new_session=True, env=runtime_env())
    try:
        line = proc.stdout.readline().decode().strip()
        assert line.startswith("LISTENING 127.0.0.1:"), line
        yield f"http://{line.split()[1]}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def post(url: str, body: dict, path: str = "/execute", timeout: float = 60) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=RUNTIME_HEADERS)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        assert resp.status == 200
        return json.loads(resp.read())
