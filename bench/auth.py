"""Authentication cost: API requests under noauth (the baseline, same run) and under Keystone with the
token cache warm and with it off (every request validated at Keystone). Needs a running Keystone
(tests/integration/keystone/keystone.sh up). Prints a table, writes JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from router.app import Headwater  # noqa: E402
from router.config import Config  # noqa: E402
from tests.integration.keystone import conftest as keystone  # noqa: E402


async def run(label: str, overrides: dict, headers: dict, n: int) -> dict:
    with tempfile.TemporaryDirectory() as data_dir:
        app = Headwater(Config.load(overrides={"DEFAULT": {"data_dir": data_dir}, "engine": {"backend": "null"},
                                               **overrides}))
        await app.start()
        client = TestClient(TestServer(app.web))
        await client.start_server()
        try:
            assert (await client.get("/v1/functions", headers=headers)).status == 200  # warm up (and the cache)
            latencies = []
            started = time.perf_counter()
            for _ in range(n):
                t0 = time.perf_counter()
                resp = await client.get("/v1/functions", headers=headers)
                await resp.read()
                assert resp.status == 200, resp.status
                latencies.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
        finally:
            await client.close()
            await app.stop()
    ordered = sorted(latencies)
    return {"scenario": label, "requests": n, "requests_per_s": n / elapsed,
            "p50_ms": statistics.median(latencies) * 1000, "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "auth.json"))
    args = parser.parse_args()
    if not keystone._reachable(keystone.KEYSTONE_URL):
        sys.exit(f"Keystone is not reachable at {keystone.KEYSTONE_URL}: bash tests/integration/keystone/keystone.sh up")
    ids = keystone.make_identities()
    headers = {"X-Auth-Token": ids.alice.token()}
    sections = keystone.keystone_sections(ids)
    cached = {**sections, "keystone_authtoken": {**sections["keystone_authtoken"], "token_cache_time": "300"}}
    rows = [await run("noauth (baseline)", {}, {}, args.requests),
            await run("keystone, token cache warm", cached, headers, args.requests),
            await run("keystone, no cache (validate every request)", sections, headers, max(20, args.requests // 5))]
    base = rows[0]["requests_per_s"]
    print(f"{'scenario':<46} {'requests':>8} {'req/s':>9} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for row in rows:
        row["ratio"] = row["requests_per_s"] / base
        print(f"{row['scenario']:<46} {row['requests']:>8} {row['requests_per_s']:>9.0f} {row['ratio']:>7.3f} "
              f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
