"""Runtime overhead benchmark: a no-op function through each runtime server (python3, nodejs, go, php), request →
response over keep-alive HTTP, next to a /ping round trip on the same connection. Prints a table, writes JSON."""

from __future__ import annotations

import argparse
import base64
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

def _server(runtime: str) -> list[str]:
    return [sys.executable, str(ROOT / "runtimes" / runtime / "server.py")]


# name → (server command, package file, its source, entry, compiled: built once with POST /build first)
RUNTIMES = {
    "python3": (_server("python3"), "noop.py", "def main(context=None):\n    return None\n", "noop.main", False),
    "nodejs": ([shutil.which("node") or "node", str(ROOT / "runtimes" / "nodejs" / "server.js")], "noop.js",
               "exports.main = () => null;\n", "noop.main", False),
    "go": (_server("go"), "noop.go", "package noop\n\nfunc Main() interface{} { return nil }\n", "noop.Main", True),
    "php": (_server("php"), "noop.php", "<?php\nfunction main($input, $context) { return null; }\n", "noop.main", False),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 3), "p90_ms": round(percentile(ms, 90), 3),
            "p99_ms": round(percentile(ms, 99), 3), "mean_ms": round(statistics.fmean(ms), 3)}


def bench_runtime(name: str, n: int, work: Path) -> dict:
    command, filename, source, entry, compiled = RUNTIMES[name]
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
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        build_ms = None
        if compiled:  # the build step, once per package: not on any execution's path
            started = time.perf_counter()
            conn.request("POST", "/build", json.dumps({"package": {"path": str(package), "function_id": "bench", "version": 0},
                                                       "timeout": 300}), headers)
            reply = json.loads(conn.getresponse().read())
            if not reply.get("success"):
                raise RuntimeError(f"{name}: build failed: {reply.get('output')}")
            build_ms = round((time.perf_counter() - started) * 1000, 1)
            package = work / f"{name}-artifact.zip"
            package.write_bytes(base64.b64decode(reply["artifact"]))
        body = json.dumps({"execution_id": "bench", "entry": entry, "timeout": 5,
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
        return {"runtime": name, "build_ms": build_ms, "cold_first_call_ms": round(cold * 1000, 3), "execute": summary(execute),
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
    print(f"{'runtime':<8} {'calls':>6} {'execute p50':>12} {'p90':>8} {'p99':>8} {'ping p50':>9} {'overhead p50':>13} {'cold 1st':>9} {'build':>9}")
    for r in results:
        e, p = r["execute"], r["ping"]
        build = f"{r['build_ms']:>7.0f}ms" if r["build_ms"] is not None else f"{'-':>9}"
        print(f"{r['runtime']:<8} {e['n']:>6} {e['p50_ms']:>10.3f}ms {e['p90_ms']:>6.3f}ms {e['p99_ms']:>6.3f}ms "
              f"{p['p50_ms']:>7.3f}ms {r['overhead_p50_ms']:>11.3f}ms {r['cold_first_call_ms']:>7.1f}ms {build}")
    by_name = {r["runtime"]: r for r in results}
    if "go" in by_name and "python3" in by_name:
        go, py = by_name["go"]["execute"]["p50_ms"], by_name["python3"]["execute"]["p50_ms"]
        print(f"go warm p50 {go:.3f} ms vs python3 {py:.3f} ms in this run: {'no worse' if go <= py else 'WORSE'}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "runtime", "cpus": os.cpu_count(), "sandbox_uids": os.geteuid() == 0,
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
