"""Events of the OpenStack sources (from captured wire formats) reach only their project's
subscriptions: a Swift upload in P2's account, a Zaqar message of a P2 queue, an Aodh alarm of P2
never run P1's subscription with the same filter."""

from __future__ import annotations

import copy
import json

from router.index import SubscriptionIndex
from router.plugins import Subscription
from sources.aodh import alarm_event
from sources.swift import to_event
from sources.zaqar import message_event
from tests.unit.test_source_aodh import captured
from tests.unit.test_source_swift import ALL_METHODS, by_path_and_action


def _twins(source: str, filters: dict) -> SubscriptionIndex:
    return SubscriptionIndex([Subscription(id=f"{p}-sub", project_id=p, source=source, filters=filters) for p in ("P1", "P2")])


def _route(index: SubscriptionIndex, event, kind: str) -> list[str]:
    event.extensions["sourcekind"] = kind
    return sorted(s.id for s in index.match(event))


def test_swift_upload_in_p2s_account_runs_only_p2s_subscription():
    n = copy.deepcopy(by_path_and_action("v1/AUTH_test/demo/hello.txt", "put"))
    n["payload"]["target"]["metadata"]["path"] = "v1/AUTH_P2/demo/hello.txt"
    n["payload"]["initiator"]["project_id"] = "P1"  # a P1 user writing there through an ACL
    event = to_event(n, methods=ALL_METHODS, container_events=False)
    assert event.project_id == "P2"
    assert _route(_twins("swift", {"container": "demo"}), event, "swift") == ["P2-sub"]


def test_zaqar_message_of_a_p2_queue_runs_only_p2s_subscription():
    event = message_event(queue="orders", project_id="P2", message_id="m1", body={"n": 1})
    assert _route(_twins("zaqar", {"queue": "orders"}), event, "zaqar") == ["P2-sub"]


def test_aodh_alarm_of_p2_runs_only_p2s_subscription():
    body = json.loads(captured("sample-aodh-rest-notifier-post.jsonl")["body"])
    event = alarm_event(body, project_id="P2")
    assert _route(_twins("aodh", {"alarmname": body["alarm_name"]}), event, "aodh") == ["P2-sub"]
