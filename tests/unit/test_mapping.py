"""Input mapping: modes, templates, constants, escapes, fixed inputs, and validation faults."""

import pytest

from router.events import Event
from router.mapping import MappingError, event_input, parse_qinling_input, validate
from router.plugins import Subscription

EVENT = Event(id="e1", source="/swift", type="org.openstack.swift.object.put", subject="photos/cat.jpg",
              data={"container": "photos", "object": "cat.jpg", "sizes": [1, 2]}, extensions={"projectid": "p1"})


def sub(mapping=None, function_input=None):
    return Subscription(id="s", project_id="p", source="swift", function_input=function_input,
                        options={"input_mapping": mapping} if mapping is not None else {})


@pytest.mark.parametrize("mapping, expected", [
    (None, {"container": "photos", "object": "cat.jpg", "sizes": [1, 2]}),
    ("data", {"container": "photos", "object": "cat.jpg", "sizes": [1, 2]}),
    ({"container": "$.data.container", "object": "$.subject", "size": "$.data.sizes.1", "kind": "thumbnail"},
     {"container": "photos", "object": "photos/cat.jpg", "size": 2, "kind": "thumbnail"}),
    ({"nested": {"project": "$.projectid", "list": ["$.id", 3]}}, {"nested": {"project": "p1", "list": ["e1", 3]}}),
    ({"missing": "$.data.nope.deeper"}, {"missing": None}),
    ({"price": "$$5"}, {"price": "$5"}),
    ("$.data.object", "cat.jpg"),
])
def test_templates(mapping, expected):
    assert validate(mapping) == mapping
    assert event_input(EVENT, sub(mapping)) == expected


def test_whole_event():
    doc = event_input(EVENT, sub("event"))
    assert doc["id"] == "e1" and doc["specversion"] == "1.0" and doc["data"]["object"] == "cat.jpg"


def test_whole_event_by_path():
    assert event_input(EVENT, sub({"e": "$"}))["e"]["subject"] == "photos/cat.jpg"


@pytest.mark.parametrize("raw, expected", [
    ('{"a": 1}', {"a": 1}), ("Qinling", "Qinling"), ("5", "5"), ("[1, 2]", [1, 2]), ("1.5", 1.5), (None, None)])
def test_fixed_input_follows_qinling_rules(raw, expected):
    assert parse_qinling_input(raw) == expected
    assert event_input(EVENT, sub(function_input=raw)) == (expected if raw is not None else EVENT.data)


@pytest.mark.parametrize("mapping, fault", [
    ("everything", "'everything' is not a mode"),
    ({"a": "$.data..x"}, r"input_mapping.a: '\$.data..x' is not a path"),
    ({"a": ["$.ok", "$.bad path"]}, r"input_mapping.a\[1\]"),
])
def test_invalid_mappings_name_the_fault(mapping, fault):
    with pytest.raises(MappingError, match=fault):
        validate(mapping)
