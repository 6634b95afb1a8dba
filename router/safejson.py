"""Untrusted JSON parsed within bounds: nesting depth, 64-bit integers, finite numbers, valid Unicode."""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # arrays/objects inside each other; deeper documents are refused, not recursed into
INT_MIN, INT_MAX = -(2 ** 63), 2 ** 63 - 1  # what the database and the bus encoders carry


class UnsafeJSON(ValueError):
    """The document is not JSON, or is JSON Headwater refuses to carry; the message says which."""


def _no_constant(name: str) -> Any:
    raise UnsafeJSON(f"{name} is not a JSON number")


def loads(raw: bytes | str, what: str = "JSON body") -> Any:
    """Parse raw and check the whole document before anyone stores or publishes any of it."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnsafeJSON(f"Malformed {what}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except UnsafeJSON as exc:
        raise UnsafeJSON(f"Malformed {what}: {exc}") from None
    except RecursionError:
        # The C decoder recurses per bracket and stops near 1,000 deep; check() bounds the rest.
        raise UnsafeJSON(f"Malformed {what}: nested deeper than {MAX_DEPTH}") from None
    except ValueError as exc:
        raise UnsafeJSON(f"Malformed {what}: {exc}") from None
    check(doc, what)
    return doc


def check(doc: Any, what: str = "JSON body") -> None:
    """Refuse integers outside 64 bits, non-finite floats and lone surrogates anywhere in doc."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UnsafeJSON(f"Malformed {what}: nested deeper than {MAX_DEPTH}")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                raise UnsafeJSON(f"Malformed {what}: the integer {str(value)[:30]} does not fit in 64 bits")
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise UnsafeJSON(f"Malformed {what}: numbers must be finite")
        elif isinstance(value, str):
            _check_text(value, what)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(str(key), what)
                stack.append((item, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1) for item in value)


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeJSON(f"Malformed {what}: a string holds a lone surrogate (not Unicode text)") from None
