"""The operator's commands as an operator runs them: `headwater upgrade-check`, `db-upgrade`,
`status`, `events tail` and `deadletters list|replay` against a real `headwater serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.e2e.server import Server, free_port, make_zip

FAILING = '''
def main(**kwargs):
    raise ValueError("always fails")
'''


def headwater(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("admin-cli")) as srv:
        yield srv


def test_upgrade_check_fails_while_migrations_are_pending_and_db_upgrade_applies_them(tmp_path):
    data = str(tmp_path / "fresh")
    check = headwater("upgrade-check", "--data-dir", data)
    assert check.returncode == 2, check.stdout + check.stderr
    assert "Database migrations  Failure  schema at base; 5 pending: 0001 (initial schema)" in check.stdout
    assert "Run `headwater db-upgrade`." in check.stdout

    upgrade = headwater("db-upgrade", "--data-dir", data)
    assert upgrade.returncode == 0, upgrade.stderr
    lines = upgrade.stdout.splitlines()
    assert lines[0].startswith("[1/5] 0001 initial schema ... done (") and lines[4].startswith("[5/5] 0005 ")
    assert lines[-1] == "database schema at 0005"
    assert headwater("db-upgrade", "--data-dir", data).stdout == "database schema at 0005: nothing to do\n"

    # Migrated; the default (durable sqlite) bus passes, the memory bus is worth a warning (exit 1).
    check = headwater("upgrade-check", "--data-dir", data)
    assert check.returncode == 0 and "Database migrations  Success  schema at 0005, the newest" in check.stdout
    assert "Event bus            Success  [bus] backend = sqlite" in check.stdout
    conf = tmp_path / "memory.conf"
    conf.write_text(f"[DEFAULT]\ndata_dir = {data}\n[bus]\nbackend = memory\n")
    check = headwater("upgrade-check", "--config-file", str(conf))
    assert check.returncode == 1, check.stdout
    assert "Event bus            Warning  [bus] backend = memory" in check.stdout
    conf = tmp_path / "rabbit.conf"
    conf.write_text(f"[DEFAULT]\ndata_dir = {data}\n[bus]\nbackend = rabbitmq\n")
    check = headwater("upgrade-check", "--config-file", str(conf))
    assert check.returncode == 0, check.stdout
    assert "Event bus            Success  [bus] backend = rabbitmq" in check.stdout


def test_status_names_each_part_and_fails_when_one_does_not_answer(server, tmp_path):
    ok = headwater("status", "--data-dir", str(server.data_dir), "--url", server.url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = {line.split()[0]: line for line in ok.stdout.splitlines()[3:]}
    assert set(rows) == {"config", "database", "bus", "engine", "sources", "api", "lag"}
    assert "schema at 0005, up to date" in rows["database"]
    assert rows["bus"].split()[1:3] == ["ok", "sqlite:"] and str(server.data_dir / "bus.db") in rows["bus"]
    assert rows["engine"].split()[-1] == "local" and "http, cron" in rows["sources"]
    assert f"{server.url}: ok, version" in rows["api"] and "running now" in rows["lag"]

    conf = tmp_path / "nats.conf"
    conf.write_text(f"[DEFAULT]\ndata_dir = {server.data_dir}\n[bus]\nbackend = nats\nurl = nats://127.0.0.1:{free_port()}\n")
    down = headwater("status", "--config-file", str(conf), "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    rows = {line.split()[0]: line for line in down.stdout.splitlines()[3:]}
    assert "FAIL" in rows["bus"] and "not reachable" in rows["bus"]
    assert "FAIL" in rows["api"] and "not answering" in rows["api"]

    conf = tmp_path / "bad-sqlite.conf"
    conf.write_text(f"[DEFAULT]\ndata_dir = {server.data_dir}\n[bus]\nbackend = sqlite\nurl = nats://127.0.0.1:1\n")
    bad = headwater("status", "--config-file", str(conf), "--url", server.url)
    assert bad.returncode == 1
    rows = {line.split()[0]: line for line in bad.stdout.splitlines()[3:]}
    assert "FAIL" in rows["bus"] and "sqlite:///<path to the bus file>" in rows["bus"]


def test_events_tail_prints_the_events_that_pass_its_filter(server):
    tail = subprocess.Popen([sys.executable, "-m", "router.cli", "events", "tail", "--url", server.url, "--count", "1",
                             "--filter", "type = 'cli.wanted'", "--data-dir", str(server.data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        header = tail.stdout.readline()  # printed once the stream is open
        assert header.split() == ["time", "type", "source", "subject", "id"], header + tail.stderr.read()
        tail.stdout.readline()  # the rule under the header
        for event_id, type_ in (("cli-1", "cli.other"), ("cli-2", "cli.wanted")):
            resp = server.request("POST", "/v1/events", {"specversion": "1.0", "id": event_id, "source": "/cli",
                                                         "type": type_, "subject": "s/1"})
            assert resp.status == 202
        out, err = tail.communicate(timeout=60)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert tail.returncode == 0, err
    (line,) = out.splitlines()
    assert line.split()[1:] == ["cli.wanted", "http", "s/1", "cli-2"]

    bad = headwater("events", "tail", "--url", server.url, "--filter", "type ==", "--data-dir", str(server.data_dir))
    assert bad.returncode == 2 and "filter" in bad.stdout


def test_deadletters_list_and_replay(server):
    runtime = server.request("POST", "/v1/runtimes", {"image": "python3"}).json()
    fn = server.multipart("/v1/functions", {"runtime_id": runtime["id"], "entry": "fail.main",
                                            "code": json.dumps({"source": "package"})},
                          {"package": make_zip({"fail.py": FAILING})}).json()
    sub = server.request("POST", "/v1/subscriptions", {
        "source": "http", "types": ["cli.broken"], "function_id": fn["id"],
        "options": {"delivery": {"max_attempts": 1, "retry_on": ["failed"]}}}).json()
    server.request("POST", "/v1/events", {"specversion": "1.0", "id": "cli-dead", "source": "/cli", "type": "cli.broken"})
    deadline = time.monotonic() + 60
    while not (letters := server.request("GET", "/v1/deadletters?event_id=cli-dead").json()["deadletters"]):
        assert time.monotonic() < deadline, "no dead letter recorded"
        time.sleep(0.1)
    letter = letters[0]

    listed = headwater("deadletters", "list", "--url", server.url, "--subscription-id", sub["id"],
                       "--data-dir", str(server.data_dir))
    assert listed.returncode == 0, listed.stderr
    header, _, row, total = listed.stdout.splitlines()
    assert header.split() == ["id", "recorded", "source", "event", "subscription", "reason"]
    assert row.split()[:1] + row.split()[2:5] == [letter["id"], "http", "cli-dead", sub["id"]]
    assert "always fails" in row and total == "1 dead letter(s)"

    replayed = headwater("deadletters", "replay", letter["id"], "not-an-id", "--url", server.url,
                         "--data-dir", str(server.data_dir))
    assert replayed.returncode == 1  # one of the two could not be replayed
    first, second = replayed.stdout.splitlines()
    assert first.startswith(f"[1/2] {letter['id']}: replayed as event cli-dead:replay:")
    assert second == "[2/2] not-an-id: not a dead letter id (a UUID)"
    event_id = first.rsplit(" ", 1)[1]
    deadline = time.monotonic() + 60
    while not server.request("GET", f"/v1/executions?event_id={event_id}").json()["executions"]:
        assert time.monotonic() < deadline, "the replayed event ran nothing"
        time.sleep(0.1)
