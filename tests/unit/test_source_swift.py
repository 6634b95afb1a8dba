"""The Swift source without servers: real ceilometermiddleware captures in, events and dead letters out."""

from __future__ import annotations

import asyncio
import copy
import datetime as _dt
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from router.config import Config
from router.events import Event
from router.index import SubscriptionIndex
from router.plugins import Subscription, SubscriptionInvalid
from sources.swift import SwiftSource, object_suffix, to_event, unwrap

FIXTURES = Path(__file__).parent / "fixtures"


class FakeContext:
    """A SourceContext that records what a source publishes and dead-letters."""

    def __init__(self, config: Config, *, durable: bool = False, fail: BaseException | None = None):
        self.config = config
        self.durable = durable
        self.fail = fail
        self.published: list[tuple[Event, bool]] = []
        self.dead: list[dict[str, Any]] = []
        self.routes: list[tuple[str, str, Any]] = []
        self.log: list[str] = []  # the order of publishes and other side effects tests care about

    async def publish(self, event: Event, *, expect=(), settle: bool = False) -> dict[str, str]:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        self.published.append((event, settle))
        self.log.append(f"publish {event.id}")
        return {}

    async def dead_letter(self, *, source: str, reason: str, payload: Any, event_id: str | None = None,
                          project_id: str = "default") -> None:
        self.dead.append({"source": source, "reason": reason, "payload": payload, "event_id": event_id,
                          "project_id": project_id})
        self.log.append(f"dead {event_id}")

    def add_route(self, method: str, path: str, handler, *, public: bool = False) -> None:
        self.routes.append((method, path, handler))

    def caller_project(self, request) -> tuple[str, bool]:
        return "default", True

    def app(self) -> web.Application:
        app = web.Application()
        for method, path, handler in self.routes:
            app.router.add_route(method, path, handler)
        return app

    def subscriptions(self, source: str):
        return []

    def subscription(self, subscription_id: str):
        return None

    def on_subscriptions_changed(self, callback) -> None:
        pass


def captures() -> list[dict[str, Any]]:
    return [record["message"] for record in json.loads((FIXTURES / "sample-swift-notifications.json").read_text())]


def amqp_body(notification: dict[str, Any]) -> bytes:
    """The AMQP body oslo.messaging's messagingv2 driver sends (the capture holds the unwrapped form)."""
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(notification)}).encode()


def by_path_and_action(path: str, action: str) -> dict[str, Any]:
    return next(n for n in captures() if n["payload"]["target"]["metadata"]["path"] == path and n["payload"]["target"]["action"] == action)


ALL_METHODS = frozenset({"PUT", "POST", "DELETE", "COPY", "GET", "HEAD"})


@pytest.fixture
def config(tmp_path) -> Config:
    return Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}})


def test_unwrap_accepts_v2_envelope_and_bare_v1():
    notification = captures()[2]
    assert unwrap(amqp_body(notification)) == notification
    assert unwrap(json.dumps(notification).encode()) == notification


def test_object_put_becomes_an_event_with_container_object_and_size():
    notification = by_path_and_action("v1/AUTH_test/demo/hello.txt", "put")
    event = to_event(notification, methods=ALL_METHODS, container_events=False)
    assert event is not None
    assert event.id == notification["message_id"] == "c5d209b1-b4a4-4981-a795-9175355de2fa"
    assert event.type == "org.openstack.swift.object.put"
    assert event.subject == "demo/hello.txt"
    assert event.source == "/swift/AUTH_test/demo"
    assert event.time == _dt.datetime(2026, 11, 24, 3, 1, 7, 843285, tzinfo=_dt.timezone.utc)
    assert event.extensions == {"projectid": "test", "account": "AUTH_test", "container": "demo", "object": "hello.txt",
                                "objectsuffix": "txt", "method": "put", "partitionkey": "AUTH_test/demo/hello.txt"}
    data = event.data
    assert (data["account"], data["container"], data["object"], data["method"], data["size"]) == ("AUTH_test", "demo", "hello.txt", "PUT", 11)
    assert data["etag"] is None and data["project_id"] == "test"


def test_project_is_the_accounts_owner_not_the_writer_and_etag_from_metadata_headers():
    # A user of project `demo` writing into AUTH_test (an ACL allows it): the event is test's,
    # so only test's subscriptions see it.
    notification = copy.deepcopy(by_path_and_action("v1/AUTH_test/demo/hello.txt", "put"))
    notification["payload"]["initiator"]["project_id"] = "demo"
    notification["payload"]["target"]["metadata"]["http_header_etag"] = '"5a105e8b9d40e1329780d62ea2265d8a"'
    notification["payload"]["target"]["metadata"]["http_header_content_type"] = "text/plain"
    event = to_event(notification, methods=ALL_METHODS, container_events=False)
    assert event.project_id == "test"
    assert event.data["etag"] == "5a105e8b9d40e1329780d62ea2265d8a" and event.data["content_type"] == "text/plain"


def test_reads_and_container_requests_are_skipped_by_default(config):
    source = SwiftSource(config)
    kept = [to_event(n, methods=source.methods, container_events=source.container_events) for n in captures()]
    # of container PUT, object HEAD/PUT/GET(container)x2/HEAD/DELETE only the object PUT and DELETE are events
    assert [e.type for e in kept if e is not None] == ["org.openstack.swift.object.put", "org.openstack.swift.object.delete"]


def test_container_events_when_asked():
    notification = by_path_and_action("v1/AUTH_test/demo", "put")
    event = to_event(notification, methods=ALL_METHODS, container_events=True)
    assert event.type == "org.openstack.swift.container.put" and event.subject == "demo"
    assert "object" not in event.extensions and event.extensions["container"] == "demo"


def test_failed_request_is_not_an_event():
    notification = copy.deepcopy(by_path_and_action("v1/AUTH_test/demo/hello.txt", "put"))
    notification["payload"]["outcome"] = "failure"
    assert to_event(notification, methods=ALL_METHODS, container_events=False) is None


@pytest.mark.parametrize("name, suffix", [("cat.jpg", "jpg"), ("a/b/Cat.JPG", "jpg"), ("notes", None), (".hidden", None),
                                          ("dir.d/file", None), ("x.tar.gz", "gz")])
def test_object_suffix(name, suffix):
    assert object_suffix(name) == suffix


def test_filters_express_container_plus_suffix():
    """`photos` + `*.jpg` with today's exact-match index: {"container": "photos", "objectsuffix": "jpg"}."""
    index = SubscriptionIndex([Subscription(id="s1", project_id="test", source="swift", filters={"container": "photos", "objectsuffix": "jpg"})])
    base = by_path_and_action("v1/AUTH_test/demo/hello.txt", "put")

    def event_for(container: str, obj: str) -> Event:
        n = copy.deepcopy(base)
        n["message_id"] = f"{container}/{obj}"
        n["payload"]["target"]["metadata"].update(container=container, object=obj, path=f"v1/AUTH_test/{container}/{obj}")
        event = to_event(n, methods=ALL_METHODS, container_events=False)
        event.extensions["sourcekind"] = "swift"
        return event

    assert [s.id for s in index.match(event_for("photos", "cat.jpg"))] == ["s1"]
    assert [s.id for s in index.match(event_for("photos", "holiday/Beach.JPG"))] == ["s1"]
    assert index.match(event_for("photos", "notes.txt")) == []
    assert index.match(event_for("docs", "cat.jpg")) == []


async def test_handle_publishes_settled_on_the_memory_bus_and_unsettled_on_a_durable_one(config):
    source = SwiftSource(config)
    body = amqp_body(by_path_and_action("v1/AUTH_test/demo/hello.txt", "put"))
    for durable in (False, True):
        source._ctx = ctx = FakeContext(config, durable=durable)
        event = await source.handle(body)
        assert ctx.published == [(event, not durable)]


@pytest.mark.parametrize("body, reason", [
    (b"not json", "body is not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"oslo.version": "2.0", "oslo.message": "{broken"}).encode(), "oslo.message is not a JSON document"),
    (amqp_body({"event_type": "compute.instance.create.end", "message_id": "m", "payload": {}}), "event_type is 'compute.instance.create.end'"),
    (amqp_body({"event_type": "objectstore.http.request", "payload": {}}), "no message_id"),
    (amqp_body({"event_type": "objectstore.http.request", "message_id": "m", "payload": {"target": {}}}), "target.metadata is missing"),
])
async def test_malformed_notifications_are_dead_lettered_and_the_source_goes_on(config, body, reason):
    source = SwiftSource(config)
    source._ctx = ctx = FakeContext(config)
    assert await source.handle(body) is None
    assert len(ctx.dead) == 1 and ctx.dead[0]["source"] == "swift" and reason in ctx.dead[0]["reason"]
    # the next good notification still goes through
    await source.handle(amqp_body(by_path_and_action("v1/AUTH_test/demo/hello.txt", "put")))
    assert len(ctx.published) == 1


async def test_a_refused_publish_raises_so_the_message_is_requeued(config):
    source = SwiftSource(config)
    source._ctx = FakeContext(config, fail=RuntimeError("bus down"))

    class Message:
        body = amqp_body(by_path_and_action("v1/AUTH_test/demo/hello.txt", "put"))
        acked = nacked = False

        async def ack(self):
            self.acked = True

        async def nack(self, requeue=True):
            self.nacked = requeue

    message = Message()
    import sources.swift as swift_module

    swift_module._REQUEUE_DELAY, saved = 0, swift_module._REQUEUE_DELAY
    try:
        await source._on_message(message)
    finally:
        swift_module._REQUEUE_DELAY = saved
    assert message.nacked and not message.acked


@pytest.mark.parametrize("filters, fault", [
    ({"containr": "photos"}, "no attribute 'containr'"),
    ({"objectsuffix": ".jpg"}, "without '*.'"),
    ({"objectsuffix": "*.jpg"}, "without '*.'"),
])
def test_subscription_validation(config, filters, fault):
    with pytest.raises(SubscriptionInvalid, match=fault.replace("*", r"\*").replace(".", r"\.")):
        SwiftSource(config).validate_subscription({"source": "swift", "filters": filters}, _dt.datetime.now(_dt.timezone.utc))
    assert SwiftSource(config).validate_subscription({"filters": {"container": "photos", "objectsuffix": "jpg", "type": "x"}}, None) == {}
