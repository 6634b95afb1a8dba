"""/v1/executions: run a function now (sync or async), read results and logs."""

from __future__ import annotations

import json
import uuid

from aiohttp import web

from router.api.common import ctx, format_time, format_time_ms, hw, list_filters, parse_bool, parse_int, store
from router.api.errors import BadRequest, json_body
from router.executions import FINISHED, render_input
from router.mapping import parse_qinling_input
from router.store import NotFound


def serialize(row) -> dict:
    return {"id": row.id, "function_id": row.function_id, "function_alias": row.function_alias,
            "function_version": row.function_version, "description": row.description, "status": row.status,
            "sync": row.sync, "input": render_input(row.input),
            # Qinling returns `result` as a JSON-encoded string; the CLI prints it as such.
            "result": json.dumps(row.result) if row.result is not None else None,
            "reason": row.reason, "event_id": row.event_id, "subscription_id": row.subscription_id,
            "project_id": row.project_id, "created_at": format_time(row.created_at),
            "updated_at": format_time(row.updated_at),
            # Headwater's additions: how many attempts ran (retries), and when, to the millisecond.
            "attempts": row.attempts, "started_at": format_time_ms(row.created_at),
            "finished_at": format_time_ms(row.updated_at) if row.status in FINISHED else None}


async def create(request: web.Request) -> web.Response:
    body = await json_body(request)
    if not body.get("function_id") and not body.get("function_alias"):
        raise BadRequest("Either function_alias or function_id must be provided.")
    for name in ("function_id", "function_alias", "description"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise BadRequest(f"Invalid input, {name} must be a string.")
    raw_input = body.get("input")
    # The CLI sends input as a string; a JSON client may send the value itself.
    value = parse_qinling_input(raw_input) if isinstance(raw_input, str) else raw_input
    description = body.get("description")
    if description is not None and len(str(description)) > 255:
        raise BadRequest("Invalid input, description is longer than 255 characters.")
    row = await hw(request).executions.create(
        project_id=ctx(request).project_id, function_id=body.get("function_id"),
        version=parse_int(body.get("function_version"), "function_version", 0), alias=body.get("function_alias"),
        input=value, sync=parse_bool(body.get("sync"), "sync", True), description=description)
    return web.json_response(serialize(row), status=201)


# A page of GET /v1/executions: `limit` rows (at most MAX_PAGE; DEFAULT_PAGE when not given), oldest
# first, the next page from `marker` (the last id of this one), as OpenStack APIs page.
DEFAULT_PAGE = 100
MAX_PAGE = 1000


async def _marker(request: web.Request, value: str | None):
    if value is None:
        return None
    try:
        uuid.UUID(value)
    except ValueError:
        raise BadRequest(f"Invalid value for marker: {value[:40]!r} is not an execution id.") from None
    row = await store(request).executions.find(value)  # only the caller's own: another project's id is unknown
    if row is None:
        # Well-formed but unknown (or another project's): as GET /v1/executions/{id} answers, 404.
        raise NotFound(f"Invalid value for marker: no execution {value} (a marker is the last id of the previous page).")
    return row


async def index(request: web.Request) -> web.Response:
    filters = list_filters(request, ("function_id", "function_alias", "function_version", "status", "description",
                                     "subscription_id", "event_id", "created_at", "updated_at", "limit", "marker"))
    limit = parse_int(filters.pop("limit", None), "limit", DEFAULT_PAGE)
    if limit < 1:
        raise BadRequest(f"Invalid value for limit: {limit} (a page holds 1 to {MAX_PAGE} executions).")
    limit = min(limit, MAX_PAGE)
    marker = await _marker(request, filters.pop("marker", None))
    rows = await store(request).executions.list(project_id=ctx(request).list_scope(request), filters=filters,
                                                limit=limit, after=marker)
    body: dict = {"executions": [serialize(r) for r in rows]}
    if len(rows) == limit:  # maybe more: where the next page starts
        body["next"] = str(request.rel_url.update_query(limit=str(limit), marker=rows[-1].id))
    return web.json_response(body)


async def show(request: web.Request) -> web.Response:
    row = await store(request).executions.get(request.match_info["id"], project_id=ctx(request).get_scope)
    return web.json_response(serialize(row))


async def logs(request: web.Request) -> web.Response:
    row = await store(request).executions.get(request.match_info["id"], project_id=ctx(request).get_scope)
    return web.Response(text=row.logs or "", content_type="text/plain")


async def delete(request: web.Request) -> web.Response:
    await store(request).executions.delete(request.match_info["id"], project_id=ctx(request).get_scope)
    return web.Response(status=204)


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/executions", create)
    app.router.add_get("/v1/executions", index)
    app.router.add_get("/v1/executions/{id}", show)
    app.router.add_get("/v1/executions/{id}/log", logs)
    app.router.add_delete("/v1/executions/{id}", delete)
