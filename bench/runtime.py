"""Runtime overhead benchmark: a no-op function through each runtime server (python3, nodejs), request →
response over keep-alive HTTP, next to a /ping round trip on the same connection. Prints a table, writes JSON."""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNTIMES = {
    "python3": ([sys.executable, str(ROOT / "runtimes" / "python3" / "server.py")], "noop.py", "def main(context=None):\n    return None\n"),
    "nodejs": ([shutil.which("node") or "node", str(ROOT / "runtimes" / "nodejs" / "server.js")], "noop.js",
               "exports.main = () => null;\n"),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 3), "p90_ms": round(percentile(ms, 90), 3),
            "p99_ms": round(percentile(ms, 99), 3), "mean_ms": round(statistics.fmean(ms), 3)}


def bench_runtime(name: str, n: int, work: Path) -> dict:
    command, filename, source = RUNTIMES[name]
    package = work / f"{name}.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(filename, source)
    package.write_bytes(buf.getvalue())
    proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", "0", "--work-dir", str(work / name),
                             "--package-dir", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"{name} runtime did not start: {line!r}")
        host, port = line.split()[1].rsplit(":", 1)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {line.split()[2]}"}  # its own credential
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = json.dumps({"execution_id": "bench", "entry": f"{filename.split('.')[0]}.main", "timeout": 5,
                           "package": {"path": str(package), "function_id": "bench", "version": 0},
                           "limits": {"memory_size": 128 * 1024 * 1024}})

        def call(path: str, payload: str | None) -> float:
            started = time.perf_counter()
            conn.request("POST" if payload else "GET", path, payload, headers)
            resp = conn.getresponse()
            data = resp.read()
            elapsed = time.perf_counter() - started
            if resp.status != 200 or (payload and not json.loads(data)["success"]):
                raise RuntimeError(f"{name}: {resp.status} {data[:200]!r}")
            return elapsed

        cold = call("/execute", body)  # unpacks the package and starts the first warm child
        for _ in range(min(50, n)):
            call("/execute", body)
        execute = [call("/execute", body) for _ in range(n)]
        ping = [call("/ping", None) for _ in range(n)]
        return {"runtime": name, "cold_first_call_ms": round(cold * 1000, 3), "execute": summary(execute),
                "ping": summary(ping), "overhead_p50_ms": round((percentile(execute, 50) - percentile(ping, 50)) * 1000, 3)}
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="calls per runtime")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "runtime.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="hw-bench-runtime-") as tmp:
        os.chmod(tmp, 0o755)
        for name in args.runtimes.split(","):
            results.append(bench_runtime(name, args.n, Path(tmp)))
    print(f"{'runtime':<8} {'calls':>6} {'execute p50':>12} {'p90':>8} {'p99':>8} {'ping p50':>9} {'overhead p50':>13} {'cold 1st':>9}")
    for r in results:
        e, p = r["execute"], r["ping"]
        print(f"{r['runtime']:<8} {e['n']:>6} {e['p50_ms']:>10.3f}ms {e['p90_ms']:>6.3f}ms {e['p99_ms']:>6.3f}ms "
              f"{p['p50_ms']:>7.3f}ms {r['overhead_p50_ms']:>11.3f}ms {r['cold_first_call_ms']:>7.1f}ms")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "runtime", "cpus": os.cpu_count(), "sandbox_uids": os.geteuid() == 0,
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
