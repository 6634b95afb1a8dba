"""/v1/deadletters: events Headwater gave up on (or could not turn into events), with the reason."""

from __future__ import annotations

from aiohttp import web

from router.api.common import ctx, format_time, list_filters, parse_int, require_uuid, store

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


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/deadletters", index)
    app.router.add_get("/v1/deadletters/{id}", show)
