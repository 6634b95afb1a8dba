"""TargetCache: one load per key at a time, and a clear() is never undone by a load begun before it."""

from __future__ import annotations

import asyncio

from router.targets import TargetCache


async def test_concurrent_callers_share_one_load():
    cache = TargetCache(store=None)
    calls = 0

    async def load():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return "row"

    assert await asyncio.gather(*(cache.remember(("k",), load) for _ in range(20))) == ["row"] * 20
    assert calls == 1
    assert cache.peek(("k",)) == "row"


async def test_a_caller_after_clear_does_not_join_the_load_begun_before_it():
    cache = TargetCache(store=None)
    release = asyncio.Event()

    async def old_load():
        await release.wait()
        return "before the change"

    async def new_load():
        return "after the change"

    early = asyncio.ensure_future(cache.remember(("alias", "a"), old_load))
    await asyncio.sleep(0)  # the old load is under way
    cache.clear()  # e.g. the alias was updated through the API
    assert await cache.remember(("alias", "a"), new_load) == "after the change"
    release.set()
    assert await early == "before the change"  # its own caller gets its answer …
    assert cache.peek(("alias", "a")) == "after the change"  # … but it is not stored over the newer one
    assert await cache.remember(("alias", "a"), old_load) == "after the change"
