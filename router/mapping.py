"""Input mapping: what a subscription's function receives for an event — the event's data (the
default), the whole event, a fixed input, or a template of event fields and constants.

A template is any JSON value in which a string starting with `$.` (or the string `$`) is a path
into the event as a CloudEvents document: `$.subject`, `$.data.container`, `$.data.items.0`,
`$.projectid`, `$` for the whole event. Other values are constants; `$$` at the start of a string
stands for a literal `$`. A path that finds nothing gives null."""

from __future__ import annotations

import json
import re
from typing import Any

from router.events import Event
from router.plugins import Subscription

_SEGMENT = re.compile(r"^[A-Za-z0-9_\-]+$")
MODES = ("data", "event")


class MappingError(ValueError):
    """An input mapping that cannot be used; the message names the fault (the API answers 400)."""


def parse_qinling_input(raw: Any) -> Any:
    """Qinling's input rules: a JSON document is used as parsed, except that an integer (and any
    text that is not JSON) stays the raw string, passed as one positional argument."""
    if raw is None or not isinstance(raw, str):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, int) and not isinstance(value, bool):
        return raw
    return value


def validate(mapping: Any, where: str = "input_mapping") -> Any:
    """Check a mapping (mode name or template) once, at creation; returns it unchanged."""
    if mapping is None or mapping in MODES:
        return mapping
    if isinstance(mapping, str) and not mapping.startswith("$"):
        raise MappingError(f"{where}: {mapping!r} is not a mode ({', '.join(MODES)}) or a template")
    _check_template(mapping, where)
    return mapping


def _check_template(node: Any, where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _check_template(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_template(value, f"{where}[{i}]")
    elif isinstance(node, str) and _is_path(node):
        segments = node[2:].split(".") if node != "$" else []
        if any(not _SEGMENT.match(s) for s in segments):
            raise MappingError(f"{where}: {node!r} is not a path like $.data.field")


def _is_path(text: str) -> bool:
    return text == "$" or text.startswith("$.")


def _resolve(document: dict, path: str) -> Any:
    if path == "$":
        return document
    value: Any = document
    for segment in path[2:].split("."):
        if isinstance(value, dict) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            return None
    return value


def _render(node: Any, document: dict) -> Any:
    if isinstance(node, dict):
        return {key: _render(value, document) for key, value in node.items()}
    if isinstance(node, list):
        return [_render(value, document) for value in node]
    if isinstance(node, str):
        if _is_path(node):
            return _resolve(document, node)
        if node.startswith("$$"):
            return node[1:]
    return node


def event_input(event: Event, sub: Subscription) -> Any:
    """The input a subscription's function receives for an event."""
    if sub.function_input is not None:  # a job's (or subscription's) fixed input
        return parse_qinling_input(sub.function_input)
    mapping = (sub.options or {}).get("input_mapping")
    if mapping is None or mapping == "data":
        return event.data
    if mapping == "event":
        return event.to_dict()
    return _render(mapping, event.to_dict())
