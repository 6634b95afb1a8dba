"""Result sinks: the result event, chaining with a depth limit, and the HMAC-signed HTTP callback
checked by a real receiver."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from router.bus.memory import MemoryBus
from router.config import Config
from router.events import Event
from router.results import ChainTooDeep, ResultSinks, SinkSpecError, chain_depth, result_event
from sinks.http import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from tests.conditions import eventually

SECRET = "s3cret-s3cret-s3cret"


@pytest.fixture
def config(tmp_path):
    return Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "events": {"max_chain_depth": "3"}})


def make_result(trigger=None, status="success"):
    return result_event(execution_id="ex-1", subscription_id="sub-1", project_id="p1", function_id="fn-1",
                        status=status, output={"thumb": "cat_small.jpg"}, duration=0.1, trigger=trigger)


def test_result_event_shape_and_depth():
    trigger = Event(id="e1", source="/s", type="t", extensions={"chaindepth": 2})
    event = make_result(trigger)
    assert event.type == "org.openstack.headwater.execution.success" and event.subject == "sub-1"
    assert event.data["output"] == {"thumb": "cat_small.jpg"} and event.data["event_id"] == "e1"
    assert chain_depth(event) == 3
    assert make_result(trigger).id == event.id, "a re-sent result is the same event"


@pytest.fixture
async def receiver():
    """A callback receiver that checks signatures the way a user's would."""
    got: list[dict] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify(SECRET, request.headers.get(TIMESTAMP_HEADER, ""), body, request.headers.get(SIGNATURE_HEADER, ""))
        got.append({"ok": ok, "event": json.loads(body), "headers": dict(request.headers)})
        return web.Response(status=204 if ok else 401)

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/hook", handle)
    app.router.add_post("/broken", fail)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", got
    await runner.cleanup()


async def test_signed_callback_is_verified_by_the_receiver(config, receiver):
    url, got = receiver
    sinks = ResultSinks(config, MemoryBus())
    specs = sinks.validate([{"kind": "http", "url": f"{url}/hook", "secret": SECRET}])
    await sinks.deliver(make_result(), specs)
    await sinks.close()
    assert len(got) == 1 and got[0]["ok"], got
    assert got[0]["event"]["data"]["output"] == {"thumb": "cat_small.jpg"}
    assert got[0]["headers"]["Content-Type"] == "application/cloudevents+json"


async def test_a_failing_receiver_raises_for_the_retry_policy(config, receiver):
    url, _ = receiver
    sinks = ResultSinks(config, MemoryBus())
    specs = sinks.validate([{"kind": "http", "url": f"{url}/broken"}])
    with pytest.raises(RuntimeError, match="answered 500"):
        await sinks.deliver(make_result(), specs)
    await sinks.close()


def test_signature_rejects_tampering_and_old_timestamps():
    body = b'{"a": 1}'
    signature = sign(SECRET, "1000", body)
    assert verify(SECRET, "1000", body, signature, now=1010)
    assert not verify(SECRET, "1000", b'{"a": 2}', signature, now=1010), "altered body"
    assert not verify("another-secret-value", "1000", body, signature, now=1010), "wrong secret"
    assert not verify(SECRET, "1000", body, signature, now=5000), "too old: a replay"
    assert not verify(SECRET, "soon", body, signature, now=1010)


async def test_event_sink_chains_and_the_loop_guard_stops_it(config):
    bus = MemoryBus()
    seen: list[Event] = []

    async def handler(delivery):
        seen.append(delivery.event)

    await bus.consume("events", "test", handler)
    sinks = ResultSinks(config, bus)
    specs = sinks.validate([{"kind": "event"}])
    await sinks.deliver(make_result(Event(id="e", source="/s", type="t", extensions={"chaindepth": 1})), specs)
    await eventually(lambda: seen)
    assert len(seen) == 1 and seen[0].extensions["sourcekind"] == "result" and chain_depth(seen[0]) == 2
    with pytest.raises(ChainTooDeep, match="depth 4 exceeds"):
        await sinks.deliver(make_result(Event(id="e", source="/s", type="t", extensions={"chaindepth": 3})), specs)


@pytest.mark.parametrize("specs, fault", [
    ({"kind": "event"}, "sinks must be a list"),
    ([{"url": "x"}], r"sinks\[0\] must be an object with a kind"),
    ([{"kind": "pigeon"}], "no sink plugin named 'pigeon'"),
    ([{"kind": "event", "x": 1}], "takes no options"),
    ([{"kind": "http", "url": "ftp://x"}], r"sinks\[0\] \(http\): url must be an absolute http"),
    ([{"kind": "http", "url": "http://x", "secret": "short"}], "at least 16 characters"),
    ([{"kind": "http", "url": "http://x", "colour": "red"}], "unknown http target fields"),
])
def test_invalid_sinks_name_the_fault(config, specs, fault):
    with pytest.raises(SinkSpecError, match=fault):
        ResultSinks(config, MemoryBus()).validate(specs)
