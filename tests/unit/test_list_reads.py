"""The raw list reads (router.store.reader, router.api.listing) answer exactly what the ORM path
answers, on SQLite and PostgreSQL: same rows, same scope, same JSON; shared reads never hide a
write committed before a request arrived."""

from __future__ import annotations

import asyncio
import json
import threading

from router.api import functions as functions_api
from router.api import runtimes as runtimes_api
from router.api.listing import RowBodies
from router.store import models


async def _rows(store, projects=("p1", "p2")):
    runtimes = {}
    for project in projects:
        runtimes[project] = await store.runtimes.add(image="python3", status="available", project_id=project, is_public=False)
    public = await store.runtimes.add(image="nodejs", name="shared é ✓", status="available", project_id="admin")
    await store.runtimes.share(runtimes["p2"].id, ["p1"])
    builds = [None, {"status": "building"}, {"status": "error", "message": "no main.go: \"x\""},
              {"status": "available", "md5sum": "a" * 32, "versions": {"1": "b" * 32}}]
    for i, build in enumerate(builds * 2):
        code = {"source": "package", "md5sum": "m" * 32}
        if build is not None:
            code["build"] = build
        await store.functions.add(runtime_id=runtimes[projects[i % 2]].id, code=code, entry="main.main", cpu=100,
                                  memory_size=33554432, timeout=5, project_id=projects[i % 2],
                                  name=f"fn-{i} ünïcode", description=None if i % 3 else "d\n\"q\"")
    await store.functions.add(code={"source": "image", "image": "alpine", "big": 2 ** 70}, cpu=1, memory_size=1,
                              timeout=1, project_id="p1", runtime_id=None)
    return public


def _body(response) -> dict:
    return json.loads(response.body)


async def test_function_lists_match_the_orm_serialisation_in_every_scope(store):
    await _rows(store)
    bodies = RowBodies(models.Function.__table__, functions_api.serialize)
    for scope, project in ((None, None), (None, "p1"), ("p1", "p1"), ("p2", "p2"), ("p1", "p2"), ("p3", "p3")):
        view = store.scoped(scope)
        expected = [functions_api.serialize(r) for r in await view.functions.list(project_id=project)]
        got = _body(bodies.response("functions", await view.functions.rows(project_id=project)))
        assert got == {"functions": expected}, (scope, project)
    assert len(_body(bodies.response("functions", await store.functions.rows()))["functions"]) == 9


async def test_runtime_lists_match_the_orm_serialisation_with_public_and_shared_ones(store):
    public = await _rows(store)
    bodies = RowBodies(models.Runtime.__table__, runtimes_api.serialize)
    for scope, project in ((None, None), (None, "p1"), ("p1", "p1"), ("p2", "p2"), ("p3", "p3")):
        view = store.scoped(scope)
        expected = [runtimes_api.serialize(r) for r in await view.runtimes.visible(project)]
        got = _body(bodies.response("runtimes", await view.runtimes.rows(project_id=project)))
        assert got == {"runtimes": expected}, (scope, project)
    p3 = _body(bodies.response("runtimes", await store.scoped("p3").runtimes.rows(project_id="p3")))
    assert [r["id"] for r in p3["runtimes"]] == [public.id]  # only the public one
    assert [r["is_public"] for r in p3["runtimes"]] == [True]


async def test_a_changed_row_is_served_changed(store):
    """Fragments are remembered by the row's values: a count bumped by any writer shows at once."""
    await _rows(store)
    bodies = RowBodies(models.Function.__table__, functions_api.serialize)
    before = _body(bodies.response("functions", await store.functions.rows()))["functions"]
    await store.functions.bump_count(before[0]["id"], 0, 3)
    after = _body(bodies.response("functions", await store.functions.rows()))["functions"]
    assert after[0]["count"] == before[0]["count"] + 3
    assert after[1:] == before[1:]


async def test_concurrent_identical_reads_share_one_statement(store):
    await _rows(store)
    reader = store.db.reader
    started = []
    original = reader._started

    def counting(read, result):
        started.append(read)
        original(read, result)

    reader._started = counting
    results = await asyncio.gather(*(store.functions.rows() for _ in range(16)))
    assert all(r == results[0] for r in results) and len(results[0]) == 9
    assert 1 <= len(started) < 16


async def test_a_read_that_has_started_is_not_joined_by_a_later_request(store, tmp_path):
    """A request arriving while a read is under way runs its own: it sees a write committed
    before it arrived, which the earlier read may not. (On SQLite the earlier read is held inside
    the reader's thread; on PostgreSQL it is in flight on its connection.)"""
    await _rows(store)
    reader = store.db.reader
    entered, release = threading.Event(), threading.Event()
    original = reader._started
    calls = 0

    def hold_first(read, result):
        nonlocal calls
        original(read, result)
        calls += 1
        if calls == 1:  # the first read has started: keep it from finishing until the write is done
            entered.set()
            if threading.current_thread() is not threading.main_thread():  # SQLite's reader thread
                release.wait(30)

    reader._started = hold_first
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(store.functions.rows())
    if store.db.is_sqlite:
        await loop.run_in_executor(None, entered.wait, 30)  # the reader's thread is inside the read
    else:
        while not entered.is_set():
            await asyncio.sleep(0.01)
    added = await store.functions.add(code={"source": "image", "image": "late"}, cpu=1, memory_size=1, timeout=1,
                                      project_id="p1", runtime_id=None)
    second = asyncio.ensure_future(store.functions.rows())
    release.set()
    first_rows, second_rows = await asyncio.gather(first, second)
    id_at = [c.name for c in models.Function.__table__.columns].index("id")
    assert added.id in {r[id_at] for r in second_rows}
    assert len(second_rows) == 10


async def test_a_request_that_goes_away_does_not_cancel_the_shared_read(store):
    await _rows(store)
    one = asyncio.ensure_future(store.functions.rows())
    two = asyncio.ensure_future(store.functions.rows())
    await asyncio.sleep(0)
    one.cancel()
    assert len(await two) == 9
