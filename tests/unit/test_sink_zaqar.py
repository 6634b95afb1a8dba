"""The Zaqar sink without a Zaqar: target validation, message shape, failures raise for the delivery policy."""

from __future__ import annotations

import logging

import pytest

from router.config import Config
from router.events import Event
from router.plugins import Sink, load
from sinks.zaqar import SinkFailed, ZaqarSink
from sources.zaqar import message_event
from tests.unit.test_source_zaqar import FakeZaqar


def result_event() -> Event:
    return Event(id="res-1", source="/headwater/executions/e1", type="org.openstack.headwater.execution.success",
                 subject="e1", data={"thumbnail": "photos-thumbs/cat.jpg"}, extensions={"projectid": "demo"})


def sink_config(tmp_path, url: str) -> Config:
    return Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "zaqar": {"url": url, "project_id": "demo", "message_ttl": "120"}})


def test_registered_and_a_sink(tmp_path):
    assert load("sink", "zaqar") is ZaqarSink
    assert isinstance(ZaqarSink(sink_config(tmp_path, "http://x")), Sink)


@pytest.mark.parametrize("target, fault", [
    ({}, "queue must be"), ({"queue": "bad name"}, "queue must be"), ({"queue": "q", "ttl": 59}, "ttl must be"),
    ({"queue": "q", "format": "xml"}, "format must be"), ({"queue": "q", "colour": 1}, "unknown zaqar target fields"),
])
def test_validate_target(tmp_path, target, fault):
    with pytest.raises(ValueError, match=fault):
        ZaqarSink(sink_config(tmp_path, "http://x")).validate_target(target)
    assert ZaqarSink(sink_config(tmp_path, "http://x")).validate_target({"queue": "results"}) == {"queue": "results", "ttl": 120, "format": "cloudevent"}


async def test_send_posts_the_event_as_a_cloudevent_that_the_source_reads_back(tmp_path):
    async with FakeZaqar() as zaqar:
        sink = ZaqarSink(sink_config(tmp_path, zaqar.url))
        try:
            await sink.send(result_event(), {"queue": "results"})
            await sink.send(result_event(), {"queue": "plain", "format": "data", "ttl": 600})
        finally:
            await sink.close()
    by_queue = {m["queue"]: m for m in zaqar.messages.values()}
    assert by_queue["results"]["ttl"] == 120 and by_queue["results"]["body"]["id"] == "res-1"
    assert by_queue["plain"] == {"body": {"thumbnail": "photos-thumbs/cat.jpg"}, "ttl": 600, "queue": "plain", "claim": None}
    assert zaqar.headers[0]["X-Project-ID"] == "demo"
    # chaining: a Zaqar source on that queue gets the same event back (same id → runs once)
    again = message_event(queue="results", project_id="demo", message_id="zaqar-msg", body=by_queue["results"]["body"])
    assert (again.id, again.type, again.data) == ("res-1", result_event().type, result_event().data)


async def test_send_raises_when_zaqar_is_away(tmp_path):
    sink = ZaqarSink(sink_config(tmp_path, "http://127.0.0.1:9"))
    try:
        with pytest.raises(SinkFailed, match="unreachable"):
            await sink.send(result_event(), {"queue": "results"})
    finally:
        await sink.close()


async def test_send_logs_without_raising_after_the_post(tmp_path, caplog):
    # Regression: the log line named an extra "message" (a reserved LogRecord attribute), so with
    # INFO logging on, send() raised KeyError after Zaqar had taken the result: a false dead letter.
    async with FakeZaqar() as zaqar:
        sink = ZaqarSink(sink_config(tmp_path, zaqar.url))
        try:
            with caplog.at_level(logging.INFO, logger="sinks.zaqar"):
                await sink.send(result_event(), {"queue": "results"})
        finally:
            await sink.close()
    assert len(zaqar.messages) == 1
    record = next(r for r in caplog.records if r.getMessage() == "result posted to zaqar")
    assert record.message_href.startswith("/v2/queues/results/messages/")


async def test_under_keystone_a_result_is_posted_as_its_subscriptions_creator_into_its_project(tmp_path):
    """With Keystone credentials the sink posts with the token of the result's subscription (its
    trust), so the message lands in that project's queue; a refused token is replaced once; a
    subscription without a trust gets no fallback to Headwater's own project."""
    from router.plugins import Subscription
    from tests.unit.test_source_swift import FakeCredentials

    async with FakeZaqar() as zaqar:
        zaqar.tokens = {"tok-p2": "p2"}
        sink = ZaqarSink(sink_config(tmp_path, zaqar.url))
        credentials = FakeCredentials({"s-p2": "stale"}, renewed={"s-p2": "tok-p2"})
        subs = {"s-p2": Subscription(id="s-p2", project_id="p2", source="http", options={"trust_id": "t2"}),
                "s-none": Subscription(id="s-none", project_id="p1", source="http")}
        sink.use_credentials(credentials, subs.get)
        try:
            event = result_event()
            event.subject, event.extensions["projectid"] = "s-p2", "p2"
            await sink.send(event, {"queue": "results"})
            (message,) = zaqar.messages.values()
            assert message["project"] == "p2" and message["body"]["id"] == "res-1"
            assert zaqar.headers[-1]["X-Auth-Token"] == "tok-p2" and "X-Project-ID" not in zaqar.headers[-1]
            assert credentials.fresh == ["s-p2"]  # "stale" was refused once, then replaced

            orphan = result_event()
            orphan.subject = "s-none"
            with pytest.raises(SinkFailed, match="subscription s-none has no delegated identity"):
                await sink.send(orphan, {"queue": "results"})
            assert len(zaqar.messages) == 1
        finally:
            await sink.close()
