"""List bodies from raw rows: each row's JSON is remembered by its column values, so a row that has
not changed is never converted or serialised again."""

# The body of GET /v1/functions is a pure function of the rows' column values: the same values, the
# same JSON. Keyed by the values themselves (not by id and updated_at), a remembered fragment can
# never be stale, whichever process or replica changed the row, and nothing has to invalidate it.

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
import sqlalchemy as sa
from aiohttp import web

from router.store import reader


def _dumps(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc)
    except TypeError:  # what orjson refuses (integers past 64 bits) the json module writes
        return json.dumps(doc).encode()


class RowBodies:
    """Serialised rows of one table, remembered by their raw column values."""

    def __init__(self, table: sa.Table, serialize: Callable[[Any], dict], max_rows: int = 10_000):
        self.convert = reader.converters(table)
        self.serialize = serialize
        self.max_rows = max_rows  # then the table starts afresh: old rows' fragments are not kept forever
        self._fragments: dict[tuple, bytes] = {}
        # The last rows answered and their body: requests that shared one read (router.store.reader
        # joins identical concurrent reads) share the same list object, and then the same body.
        self._last: tuple[list[tuple], str, bytes] | None = None

    def fragment(self, raw: tuple) -> bytes:
        fragment = self._fragments.get(raw)
        if fragment is None:
            fragment = _dumps(self.serialize(reader.record(self.convert, raw)))
            if len(self._fragments) >= self.max_rows:
                self._fragments.clear()
            self._fragments[raw] = fragment
        return fragment

    def response(self, name: str, rows: list[tuple]) -> web.Response:
        """`{"<name>": [row, ...]}` as a JSON response."""
        last = self._last
        if last is not None and last[0] is rows and last[1] == name:
            body = last[2]
        else:
            body = b'{"' + name.encode() + b'":[' + b",".join([self.fragment(raw) for raw in rows]) + b"]}"
            self._last = (rows, name, body)
        return web.Response(body=body, content_type="application/json", charset="utf-8")
