"""The Swift source without servers: real ceilometermiddleware captures in, events and dead letters out."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
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


class FakeCredentials:
    """router.plugins.Credentials with a token per subscription id; records the fresh ones asked for,
    and hands out `renewed[id]` from then on (as Keystone gives a new token for a trust)."""

    def __init__(self, tokens: dict[str, str] | None = None, *, active: bool | None = None,
                 renewed: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})
        self.renewed = dict(renewed or {})
        self.active = bool(tokens) if active is None else active
        self.fresh: list[str] = []

    async def token(self, subscription: Subscription, *, fresh: bool = False) -> str | None:
        if fresh:
            self.fresh.append(subscription.id)
            self.tokens[subscription.id] = self.renewed.get(subscription.id, self.tokens.get(subscription.id))
        return self.tokens.get(subscription.id) if self.active else None


class FakeContext:
    """A SourceContext that records what a source publishes and dead-letters."""

    def __init__(self, config: Config, *, durable: bool = False, fail: BaseException | None = None,
                 subscriptions: list[Subscription] = (), kind: str = "zaqar", coordination=None,
                 credentials: FakeCredentials | None = None):
        from engine.coordination import MemoryCoordinator

        self.config = config
        self.credentials = credentials or FakeCredentials()
        # One replica on its own unless a test shares a coordination between several contexts.
        self.coordination = coordination or MemoryCoordinator("this-replica")
        self.kind = kind
        self.index = SubscriptionIndex(list(subscriptions))
        self.listeners: list = []
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
        return self.index.of_source(source)

    def subscription(self, subscription_id: str):
        return self.index.get(subscription_id)

    def matching(self, event: Event):
        return self.index.match(dataclasses.replace(event, extensions={**event.extensions, "sourcekind": self.kind}))

    def on_subscriptions_changed(self, callback) -> None:
        self.listeners.append(callback)

    def put(self, sub: Subscription) -> None:
        """A subscription created (or changed) through the API."""
        self.index.put(sub)
        for callback in self.listeners:
            callback()

    def remove(self, subscription_id: str) -> None:
        self.index.remove(subscription_id)
        for callback in self.listeners:
            callback()


def captures(status: str | None = "200") -> list[dict[str, Any]]:
    """Real ceilometermiddleware notifications. They were captured before the headwater proxy filter
    existed; `status` adds the X-Headwater-Status it would have set (None: as captured, without it)."""
    out = [record["message"] for record in json.loads((FIXTURES / "sample-swift-notifications.json").read_text())]
    if status is not None:
        for notification in out:
            notification["payload"]["target"]["metadata"]["http_header_x_headwater_status"] = status
    return out


def amqp_body(notification: dict[str, Any]) -> bytes:
    """The AMQP body oslo.messaging's messagingv2 driver sends (the capture holds the unwrapped form)."""
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(notification)}).encode()


def by_path_and_action(path: str, action: str, status: str | None = "201") -> dict[str, Any]:
    return next(n for n in captures(status) if n["payload"]["target"]["metadata"]["path"] == path and n["payload"]["target"]["action"] == action)


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


@pytest.mark.parametrize("action, status", [("put", "401"), ("put", "404"), ("put", "503"), ("delete", "404"),
                                            ("put", "413"), ("put", "")])
def test_a_request_swift_refused_is_not_an_event(action, status):
    # Regression: ceilometermiddleware says `success` for a 401; an anonymous PUT answered 401 ran
    # the photos/*.jpg function for an object that does not exist. Only 2xx answers are events.
    notification = by_path_and_action("v1/AUTH_test/demo/hello.txt", action, status=status)
    assert to_event(notification, methods=ALL_METHODS, container_events=False) is None
    ok = by_path_and_action("v1/AUTH_test/demo/hello.txt", action, status="204" if action == "delete" else "201")
    assert to_event(ok, methods=ALL_METHODS, container_events=False) is not None


def test_without_the_proxy_filter_nothing_is_published_unless_require_status_is_off():
    notification = by_path_and_action("v1/AUTH_test/demo/hello.txt", "put", status=None)
    assert to_event(notification, methods=ALL_METHODS, container_events=False) is None
    event = to_event(notification, methods=ALL_METHODS, container_events=False, require_status=False)
    assert event is not None and event.subject == "demo/hello.txt"


def filtered(path: str, action: str, **headers: str) -> dict[str, Any]:
    notification = copy.deepcopy(by_path_and_action("v1/AUTH_test/demo/hello.txt", "put"))
    target = notification["payload"]["target"]
    target["action"] = action
    _version, _account, container, obj = path.split("/", 3)
    target["metadata"].update(path=path, container=container, object=obj)
    target["metadata"].update({f"http_header_x_headwater_{k}": v for k, v in headers.items()})
    return notification


def test_the_proxy_filter_headers_give_etag_content_type_and_size():
    event = to_event(filtered("v1/AUTH_test/photos/cat.jpg", "put", status="201", etag="d41d8cd98f00b204e9800998ecf8427e",
                              content_type="image/jpeg", size="5120"), methods=ALL_METHODS, container_events=False)
    assert (event.data["etag"], event.data["content_type"], event.data["size"]) == (
        "d41d8cd98f00b204e9800998ecf8427e", "image/jpeg", 5120)


def test_a_large_object_manifest_is_one_event_marked_as_such():
    event = to_event(filtered("v1/AUTH_test/videos/film.mp4", "put", status="201", large_object="slo", etag="abc"),
                     methods=ALL_METHODS, container_events=False)
    assert event.subject == "videos/film.mp4" and event.data["large_object"] == "slo" and event.data["size"] is None


def test_copy_is_an_event_for_the_destination_object():
    event = to_event(filtered("v1/AUTH_test/photos/cat.jpg", "copy", status="201", destination="AUTH_test/archive/2026/cat.jpg"),
                     methods=ALL_METHODS, container_events=False)
    assert event.type == "org.openstack.swift.object.copy" and event.subject == "archive/2026/cat.jpg"
    assert event.extensions["container"] == "archive" and event.extensions["object"] == "2026/cat.jpg"
    assert event.data["copy_from"] == "photos/cat.jpg" and event.data["path"] == "v1/AUTH_test/archive/2026/cat.jpg"
    other_account = to_event(filtered("v1/AUTH_test/photos/cat.jpg", "copy", status="201", destination="AUTH_b/archive/cat.jpg"),
                             methods=ALL_METHODS, container_events=False)
    assert other_account.data["path"] == "v1/AUTH_b/archive/cat.jpg" and other_account.subject == "archive/cat.jpg"
    # After Swift's copy middleware (the documented pipeline) a COPY arrives as a PUT of the destination.
    event = to_event(filtered("v1/AUTH_test/archive/cat.jpg", "put", status="201", copy_from="photos/cat.jpg"),
                     methods=ALL_METHODS, container_events=False)
    assert (event.type, event.subject, event.data["copy_from"], event.data["size"]) == (
        "org.openstack.swift.object.copy", "archive/cat.jpg", "photos/cat.jpg", None)
    assert to_event(filtered("v1/AUTH_test/archive/cat.jpg", "put", status="201", copy_from="photos/cat.jpg"),
                    methods=frozenset({"PUT"}), container_events=False) is None
    for bad in ({}, {"destination": "AUTH_test/archive"}, {"destination": "AUTH_test//x"}):
        assert to_event(filtered("v1/AUTH_test/photos/cat.jpg", "copy", status="201", **bad), methods=ALL_METHODS,
                        container_events=False) is None


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


# -- the proxy filter (sources.swift_middleware), as a WSGI app around a stand-in proxy ---------


def run_filter(env_extra: dict[str, str], status: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
    from sources.swift_middleware import filter_factory

    def proxy(env, start_response):
        start_response(status, headers)
        return [b""]

    env = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/v1/AUTH_test/photos/cat.jpg", "QUERY_STRING": "", **env_extra}
    seen = []
    body = filter_factory({})(proxy)(env, lambda s, h, exc_info=None: seen.append(s))
    list(body)
    assert seen == [status]
    return {k[len("HTTP_X_HEADWATER_"):].lower(): v for k, v in env.items() if k.startswith("HTTP_X_HEADWATER_")}


def test_filter_reports_the_answer_and_drops_what_the_client_claimed():
    assert run_filter({"HTTP_X_HEADWATER_STATUS": "201", "HTTP_X_HEADWATER_ETAG": "forged"}, "401 Unauthorized", []) == {"status": "401"}
    assert run_filter({"CONTENT_TYPE": "image/jpeg", "CONTENT_LENGTH": "4"}, "201 Created",
                      [("Etag", '"abcd"'), ("Content-Type", "text/html")]) == {
        "status": "201", "etag": "abcd", "content_type": "image/jpeg", "size": "4"}
    assert run_filter({"QUERY_STRING": "multipart-manifest=put", "CONTENT_LENGTH": "300"}, "201 Created",
                      [("Etag", '"m"')]) == {"status": "201", "etag": "m", "large_object": "slo"}
    assert run_filter({"HTTP_X_OBJECT_MANIFEST": "segs/film"}, "201 Created", [])["large_object"] == "dlo"
    assert run_filter({"HTTP_X_COPY_FROM": "/photos/cat.jpg", "CONTENT_LENGTH": "0"}, "201 Created", []) == {
        "status": "201", "copy_from": "photos/cat.jpg"}
    assert run_filter({"REQUEST_METHOD": "COPY", "HTTP_DESTINATION": "/archive/cat.jpg"}, "201 Created", [])["destination"] == \
        "AUTH_test/archive/cat.jpg"
    assert run_filter({"REQUEST_METHOD": "COPY", "HTTP_DESTINATION": "archive/cat.jpg", "HTTP_DESTINATION_ACCOUNT": "AUTH_b"},
                      "201 Created", [])["destination"] == "AUTH_b/archive/cat.jpg"
