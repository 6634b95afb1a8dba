"""Both runtimes cap the children running one function at once and queue the rest: a burst neither
forks a child per request nor loses one, and queueing does not count against the timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.processes import RUNTIME_HEADERS, runtime_env
from tests.services import require_program

ROOT = Path(__file__).resolve().parents[2]
SERVERS = {
    "python3": ([sys.executable, str(ROOT / "runtimes" / "python3" / "server.py")], "nap.py",
                "import time\ndef main(ms=300, **kw):\n    start = time.time()\n    time.sleep(ms / 1000)\n    return [start, time.time()]\n"),
    "nodejs": (["node", str(ROOT / "runtimes" / "nodejs" / "server.js")], "nap.js",
               "exports.handler = async (context, input) => { const start = Date.now() / 1000;"
               " await new Promise((r) => setTimeout(r, input.ms)); return [start, Date.now() / 1000]; };"),
}


@pytest.mark.parametrize("runtime", list(SERVERS))
def test_a_burst_is_queued_behind_the_child_cap(runtime, tmp_path):
    command, filename, source = SERVERS[runtime]
    if runtime == "nodejs":
        require_program("node", "the nodejs runtime needs Node.js 18 or newer: apt-get install nodejs")
    package = tmp_path / "pkg.zip"
    with zipfile.ZipFile(package, "w") as zf:
        zf.writestr(filename, source)
    os.chmod(tmp_path, 0o755)
    os.chmod(package, 0o644)
    work = tmp_path / "work"
    proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", "0", "--work-dir", str(work), "--package-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, env=runtime_env(HEADWATER_RUNTIME_MAX_CHILDREN="2"),
                            start_new_session=True)
    try:
        line = proc.stdout.readline().decode().strip()
        assert line.startswith("LISTENING"), line
        url = f"http://{line.split()[1]}/execute"

        def call(i):
            body = {"execution_id": f"e{i}", "entry": "nap.main" if runtime == "python3" else "nap.handler",
                    "timeout": 1, "input": {"ms": 300}, "package": {"path": str(package), "function_id": "fn", "version": 0}}
            req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=RUNTIME_HEADERS)
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())

        call(0)  # warm
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(call, range(1, 9)))
        elapsed = time.monotonic() - started
        assert all(r["status"] == "success" for r in replies), replies
        spans = sorted(tuple(r["output"]) for r in replies)
        points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda p: (p[0], p[1]))
        running = peak = 0
        for _, step in points:
            running += step
            peak = max(peak, running)
        assert peak <= 2, f"{peak} ran at once with a cap of 2"
        # 8 naps of 0.3 s, two at a time: about 1.2 s in all. The last ones waited ~0.9 s and ran
        # 0.3 s, past their 1 s timeout had the wait counted: it does not, so all succeeded.
        assert elapsed >= 1.1
    finally:
        proc.terminate()
        proc.wait(10)
