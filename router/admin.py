"""Operator commands at a terminal: status, events tail, deadletters list|replay, upgrade-check and
db-upgrade with progress. Each returns an exit code and writes plain-text tables to `out`."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from typing import Any, TextIO

import aiohttp
import orjson

from router import __version__
from router.bus.sqlite import bus_path
from router.config import Config, ConfigError
from router.store import Database

# oslo.upgradecheck's exit codes (`<service>-status upgrade check`).
SUCCESS, WARNING, FAILURE = 0, 1, 2
_RESULT = {SUCCESS: "Success", WARNING: "Warning", FAILURE: "Failure"}
TOKEN_ENV = ("HEADWATER_TOKEN", "OS_AUTH_TOKEN")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell; cells on one line each."""
    cells = [[str(c) for c in header]] + [[" ".join(str("" if c is None else c).split()) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]]) + "\n"


def token(explicit: str | None) -> str | None:
    return explicit or next((os.environ[name] for name in TOKEN_ENV if os.environ.get(name)), None)


def _headers(auth_token: str | None) -> dict[str, str]:
    return {"X-Auth-Token": auth_token} if auth_token else {}


def _url(config: Config, explicit: str | None) -> str:
    return (explicit or config.api.public_url).rstrip("/")


# -- status -----------------------------------------------------------------------------------------

async def _check_database(config: Config) -> tuple[str, str]:
    db = Database(config.database.connection)
    try:
        current, pending = await db.pending_migrations()
    except Exception as exc:  # unreachable, wrong credentials, no such database
        return "FAIL", f"{db.url.render_as_string(hide_password=True)}: {type(exc).__name__}: {exc}"
    finally:
        await db.dispose()
    where = db.url.render_as_string(hide_password=True)
    if pending:
        return "FAIL", f"{where}: schema at {current}, {len(pending)} migration(s) pending (headwater db-upgrade)"
    return "ok", f"{where}: schema at {current}, up to date"


async def _reachable(url: str | None, default_port: int) -> tuple[bool, str]:
    parsed = urllib.parse.urlsplit(url or "")
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or default_port
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, asyncio.TimeoutError) as exc:
        return False, f"{host}:{port} not reachable ({exc or type(exc).__name__})"
    writer.close()
    return True, f"{host}:{port} reachable"


def _sqlite_bus(config: Config) -> tuple[str, str]:
    """The embedded bus is a file: say where, and whether this user can open it."""
    try:
        path = bus_path(config, config.bus.url)
    except ConfigError as exc:
        return "FAIL", str(exc)
    if not path.exists():
        return "ok", f"sqlite: {path} (created at the server's first start)"
    if not os.access(path, os.R_OK | os.W_OK):
        return "FAIL", f"sqlite: {path} is not readable and writable by this user"
    return "ok", f"sqlite: {path}"


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def status(config: Config, url: str | None, auth_token: str | None, out: TextIO) -> int:
    """What is configured and whether it answers: database, bus, engine, sources, the API, lag."""
    rows: list[tuple[str, str, str]] = [("config", "ok", ", ".join(config.files) or "embedded defaults")]
    rows.append(("database", *await _check_database(config)))
    backend = config.bus.backend
    if backend == "memory":
        rows.append(("bus", "ok", "memory (in the server's process; events are lost on a crash)"))
    elif backend == "sqlite":
        rows.append(("bus", *_sqlite_bus(config)))
    else:
        ok, detail = await _reachable(config.bus.url, {"rabbitmq": 5672, "nats": 4222}.get(backend, 0))
        rows.append(("bus", "ok" if ok else "FAIL", f"{backend}: {detail}"))
    rows.append(("engine", "-", config.engine.backend))
    rows.append(("sources", "-", ", ".join(config.sources.enabled) or "none"))
    base = _url(config, url)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=_headers(auth_token)) as http:
            async with http.get(base + "/healthz") as resp:
                health = await resp.json() if resp.status == 200 else {"status": f"HTTP {resp.status}"}
            async with http.get(base + "/metrics") as resp:
                metrics = await resp.text() if resp.status == 200 else ""
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        rows.append(("api", "FAIL", f"{base}: not answering ({exc or type(exc).__name__})"))
    else:
        up = health.get("status") == "ok"
        rows.append(("api", "ok" if up else "FAIL", f"{base}: {health.get('status')}, version {health.get('version', '?')}, "
                                                    f"{health.get('subscriptions', '?')} subscription(s)"))
        count = _metric_sum(metrics, "headwater_route_latency_seconds_count")
        total = _metric_sum(metrics, "headwater_route_latency_seconds_sum")
        running = _metric_sum(metrics, "headwater_executions_running")
        lag = f"mean {total / count:.3f} s from event to execution recorded over {count:.0f} execution(s)" if count \
            else "no event-driven execution yet"
        rows.append(("lag", "-", f"{lag}; {running:.0f} running now"))
    out.write(f"headwater {__version__}\n" + table(rows, ("component", "state", "detail")))
    return 1 if any(state == "FAIL" for _, state, _ in rows) else 0


# -- events tail ------------------------------------------------------------------------------------

async def events_tail(config: Config, url: str | None, auth_token: str | None, expression: str | None,
                      count: int | None, as_json: bool, all_projects: bool, out: TextIO) -> int:
    """Print events as they enter (the dashboard's tail), one line each, until interrupted or
    `count` were printed."""
    params = {k: v for k, v in (("filter", expression), ("all_projects", "true" if all_projects else None)) if v}
    base = _url(config, url)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout, headers=_headers(auth_token)) as http:
        try:
            resp = await http.get(base + "/dashboard/api/stream", params=params)
        except aiohttp.ClientError as exc:
            out.write(f"headwater: cannot reach {base}: {exc}\n")
            return 1
        async with resp:
            if resp.status != 200:
                body = await resp.json(content_type=None)
                out.write(f"headwater: {body.get('faultstring') if isinstance(body, dict) else body}\n")
                return 2 if resp.status == 400 else 1
            if not as_json:
                out.write(table([], ("time", "type", "source", "subject", "id")))
            out.flush()
            printed = 0
            kind = ""
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = orjson.loads(line[6:])
                    if kind == "missed":
                        out.write(f"... {data['count']} event(s) missed\n")
                    elif as_json:
                        out.write(line[6:] + "\n")
                        printed += 1
                    else:
                        out.write("  ".join(str(data.get(k) or "-") for k in ("time", "type", "source_kind", "subject", "id")) + "\n")
                        printed += 1
                    out.flush()
                    if count is not None and printed >= count:
                        return 0
    return 0


# -- dead letters -----------------------------------------------------------------------------------

async def deadletters_list(config: Config, url: str | None, auth_token: str | None, subscription_id: str | None,
                           out: TextIO) -> int:
    base = _url(config, url)
    params = {"subscription_id": subscription_id} if subscription_id else {}
    async with aiohttp.ClientSession(headers=_headers(auth_token)) as http:
        async with http.get(base + "/v1/deadletters", params=params) as resp:
            body = await resp.json(content_type=None)
    if resp.status != 200:
        out.write(f"headwater: {body.get('faultstring') if isinstance(body, dict) else body}\n")
        return 1
    rows = [(d["id"], d["created_at"], d["source"], d["event_id"] or "-", d["subscription_id"] or "-", d["reason"][:80])
            for d in body["deadletters"]]
    out.write(table(rows, ("id", "recorded", "source", "event", "subscription", "reason")))
    out.write(f"{len(rows)} dead letter(s)\n")
    return 0


async def deadletters_replay(config: Config, url: str | None, auth_token: str | None, letter_ids: Sequence[str],
                             out: TextIO) -> int:
    """Replay each letter; a letter that cannot be replayed is reported and the rest go on."""
    base = _url(config, url)
    failed = 0
    async with aiohttp.ClientSession(headers=_headers(auth_token)) as http:
        for i, letter_id in enumerate(letter_ids, 1):
            try:
                letter_id = str(uuid.UUID(letter_id))  # never a path of the caller's making
            except ValueError:
                failed += 1
                out.write(f"[{i}/{len(letter_ids)}] {letter_id}: not a dead letter id (a UUID)\n")
                continue
            async with http.post(f"{base}/v1/deadletters/{letter_id}/replay") as resp:
                body = await resp.json(content_type=None)
            if resp.status == 202:
                out.write(f"[{i}/{len(letter_ids)}] {letter_id}: replayed as event {body['event_id']}\n")
            else:
                failed += 1
                out.write(f"[{i}/{len(letter_ids)}] {letter_id}: not replayed: {body.get('faultstring') if isinstance(body, dict) else body}\n")
    return 1 if failed else 0


# -- upgrade check and upgrade ----------------------------------------------------------------------

async def upgrade_check(config: Config, out: TextIO) -> int:
    """OpenStack's upgrade check: each check Success, Warning or Failure; the exit code is the worst."""
    results: list[tuple[str, int, str]] = []
    db = Database(config.database.connection)
    try:
        current, pending = await db.pending_migrations()
    except Exception as exc:
        results.append(("Database migrations", FAILURE, f"cannot read the schema version: {type(exc).__name__}: {exc}"))
    else:
        if pending:
            names = ", ".join(f"{rev} ({doc})" for rev, doc in pending)
            results.append(("Database migrations", FAILURE,
                            f"schema at {current}; {len(pending)} pending: {names}. Run `headwater db-upgrade`."))
        else:
            results.append(("Database migrations", SUCCESS, f"schema at {current}, the newest"))
    finally:
        await db.dispose()
    if config.bus.backend == "memory":
        results.append(("Event bus", WARNING, "[bus] backend = memory keeps events in one process and loses them on a "
                                              "crash; use sqlite (the default), rabbitmq or nats in production"))
    else:
        results.append(("Event bus", SUCCESS, f"[bus] backend = {config.bus.backend}"))
    out.write(table([(name, _RESULT[code], details) for name, code, details in results], ("Check", "Result", "Details")))
    return max(code for _, code, _ in results)


async def db_upgrade(config: Config, out: TextIO) -> int:
    """Apply pending migrations one at a time, a progress line each."""
    db = Database(config.database.connection)
    try:
        current, pending = await db.pending_migrations()
        if not pending:
            out.write(f"database schema at {current}: nothing to do\n")
            return 0
        for i, (revision, doc) in enumerate(pending, 1):
            out.write(f"[{i}/{len(pending)}] {revision} {doc} ... ")
            out.flush()
            started = time.monotonic()
            await db.migrate(revision)
            out.write(f"done ({time.monotonic() - started:.1f} s)\n")
        out.write(f"database schema at {pending[-1][0]}\n")
        return 0
    finally:
        await db.dispose()
