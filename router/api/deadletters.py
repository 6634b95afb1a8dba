"""/v1/deadletters: events Headwater gave up on (or could not turn into events), with the reason;
an operator replays one (its event goes back to the bus) or discards it."""

from __future__ import annotations

import uuid

from aiohttp import web

from router.api.common import ctx, format_time, hw, list_filters, parse_int, require_uuid, store
from router.api.errors import ApiError
from router.api.events import REPLAY_OF
from router.events import Event, InvalidEvent
from router.index import REPLAY_FOR_EXTENSION

_FILTERS = ("source", "subscription_id", "event_id", "created_at")


def serialize(row) -> dict:
    return {"id": row.id, "source": row.source, "reason": row.reason, "event_id": row.event_id,
            "subscription_id": row.subscription_id, "payload": row.payload, "project_id": row.project_id,
            "created_at": format_time(row.created_at)}


async def index(request: web.Request) -> web.Response:
    """Filters as on other lists (`?subscription_id=…`, `?created_at=gt:2024-01-01T00:00:00`), plus
    `limit`; oldest first."""
    filters = list_filters(request, (*_FILTERS, "limit"))
    filters.pop("limit", None)
    limit = parse_int(request.query.get("limit"), "limit")
    rows = await store(request).dead_letters.list(project_id=ctx(request).list_scope(request), filters=filters,
                                                     limit=limit)
    return web.json_response({"deadletters": [serialize(r) for r in rows]})


async def show(request: web.Request) -> web.Response:
    letter_id = require_uuid(request.match_info["id"])
    row = await store(request).dead_letters.get(letter_id, project_id=ctx(request).get_scope)
    return web.json_response(serialize(row))


def replay_copy(row) -> Event:
    """The dead letter's event under a new id (so that it runs again, not as a duplicate), aimed
    at the subscription that gave up on it when there was one. Raises InvalidEvent when the
    letter holds no event (a source's input that never became one)."""
    if not isinstance(row.payload, dict):
        raise InvalidEvent("the dead letter holds no event")
    original = Event.from_dict(row.payload)
    copy = Event.from_dict(original.to_dict())
    copy.id = f"{original.id}:replay:{uuid.uuid4().hex[:12]}"
    copy.extensions[REPLAY_OF] = original.id
    if row.subscription_id:
        copy.extensions[REPLAY_FOR_EXTENSION] = row.subscription_id
    return copy


async def replay(request: web.Request) -> web.Response:
    """POST /v1/deadletters/{id}/replay: publish the letter's event again (to its subscription
    only, when it names one) and remove the letter; 409 when it holds no event."""
    app = hw(request)
    letter_id = require_uuid(request.match_info["id"])
    row = await store(request).dead_letters.get(letter_id)  # another project's letter: 404
    try:
        event = replay_copy(row)
    except InvalidEvent as exc:
        raise ApiError(f"Dead letter {letter_id} cannot be replayed: {exc}.", status=409) from None
    # In the history before the answer: the dashboard opens the replay's trace straight away.
    await app.history.record_now(event)
    await app.bus.publish(event)
    app.feed.offer(event)
    await store(request).dead_letters.delete(letter_id)
    return web.json_response({"deadletter_id": letter_id, "event_id": event.id,
                              "subscription_id": row.subscription_id}, status=202)


async def discard(request: web.Request) -> web.Response:
    letter_id = require_uuid(request.match_info["id"])
    await store(request).dead_letters.delete(letter_id)  # another project's letter: 404
    return web.Response(status=204)


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/deadletters", index)
    app.router.add_get("/v1/deadletters/{id}", show)
    app.router.add_delete("/v1/deadletters/{id}", discard)
    app.router.add_post("/v1/deadletters/{id}/replay", replay)
