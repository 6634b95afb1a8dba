"""CloudEvents envelope: round trips, validation, deterministic ids."""

import datetime as dt

import pytest

from router.events import Event, InvalidEvent, derived_id, execution_id_for


def test_round_trip_keeps_every_attribute():
    event = Event(id="m-1", source="/swift/AUTH_p", type="org.openstack.swift.object.put", subject="photos/cat.jpg",
                  time=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), data={"size": 3},
                  extensions={"projectid": "p1", "partitionkey": "photos/cat.jpg"})
    doc = event.to_dict()
    assert doc["specversion"] == "1.0" and doc["time"] == "2026-01-02T03:04:05Z" and doc["projectid"] == "p1"
    again = Event.from_json(event.to_json())
    assert again == event
    assert again.project_id == "p1" and again.partition_key == "photos/cat.jpg"
    assert again.attribute("subject") == "photos/cat.jpg" and again.attribute("nope") is None


@pytest.mark.parametrize("doc, fault", [
    ({"id": "1", "source": "s", "type": "t"}, "specversion"),
    ({"specversion": "0.3", "id": "1", "source": "s", "type": "t"}, "specversion"),
    ({"specversion": "1.0", "source": "s", "type": "t"}, "'id'"),
    ({"specversion": "1.0", "id": "1", "source": "", "type": "t"}, "'source'"),
    ({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "time": "yesterday"}, "time"),
    ({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "Bad-Name": 1}, "Bad-Name"),
    ([1, 2], "JSON object"),
])
def test_invalid_documents_are_refused_with_the_fault_named(doc, fault):
    with pytest.raises(InvalidEvent, match=fault):
        Event.from_dict(doc)


def test_not_json():
    with pytest.raises(InvalidEvent, match="not JSON"):
        Event.from_json(b"{nope")


def test_ids_are_deterministic_and_distinct():
    assert derived_id("cron", "s1", "t") == derived_id("cron", "s1", "t")
    assert derived_id("cron", "s1", "t") != derived_id("cron", "s2", "t")
    # parts are separated, so ("ab", "c") and ("a", "bc") differ
    assert derived_id("ab", "c") != derived_id("a", "bc")
    assert execution_id_for("/a", "e", "s") == execution_id_for("/a", "e", "s") != execution_id_for("/a", "e", "s2")
    assert execution_id_for("/a", "e", "s") != execution_id_for("/b", "e", "s")


@pytest.mark.parametrize("parts", [("execution", "e", "s"), ("cron", "sub", "2026-03-29T02:30:00+01:00"),
                                   ("webhook", "ünïcödé", ""), ("x" * 500,)])
def test_derived_ids_are_uuid5_of_the_joined_parts(parts):
    # Ids persist in the store and on the bus: they must stay uuid5 values across versions.
    import uuid

    from router.events import HEADWATER_NAMESPACE
    assert derived_id(*parts) == str(uuid.uuid5(HEADWATER_NAMESPACE, "\x1f".join(parts)))
