"""/v1/aliases: project-scoped names for a function version, resolved whenever they are used."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from router.api.common import ctx, format_time, parse_int, store
from router.api.errors import BadRequest, json_body

log = logging.getLogger(__name__)


def serialize(row) -> dict:
    return {"id": row.id, "name": row.name, "function_id": row.function_id, "function_version": row.function_version,
            "description": row.description, "project_id": row.project_id, "created_at": format_time(row.created_at),
            "updated_at": format_time(row.updated_at)}


def _text(body: dict, field: str, limit: int = 255) -> str | None:
    value = body.get(field)
    if value is not None and (not isinstance(value, str) or len(value) > limit):
        raise BadRequest(f"Invalid input, {field} must be a string of at most {limit} characters.")
    return value


async def _check_target(request: web.Request, function_id: Any, version: Any) -> tuple[str, int]:
    """Qinling stored aliases to functions and versions that do not exist; Headwater checks both."""
    if not isinstance(function_id, str):
        raise BadRequest("Invalid input, function_id must be a string.")
    number = parse_int(version, "function_version", 0)
    if number < 0:
        raise BadRequest("function_version must not be negative.")
    function = await store(request).functions.get(function_id, project_id=ctx(request).project_id)
    if number:
        await store(request).versions.get_number(function.id, number)
    return function.id, number


async def create(request: web.Request) -> web.Response:
    body = await json_body(request)
    missing = {f for f in ("name", "function_id") if not body.get(f)}
    if missing:
        raise BadRequest(f"Required param is missing. Required: {missing}")
    name = _text(body, "name")
    description = _text(body, "description")
    function_id, version = await _check_target(request, body["function_id"], body.get("function_version"))
    row = await store(request).aliases.add(name=name, function_id=function_id, function_version=version,
                                              description=description, project_id=ctx(request).project_id)
    log.info("alias created", extra={"alias": name, "function_id": function_id, "function_version": version})
    return web.json_response(serialize(row), status=201)


async def index(request: web.Request) -> web.Response:
    # Qinling let any caller list every project's aliases (a policy-name typo); here only admins can.
    scope = ctx(request).list_scope(request)
    allowed = ("name", "function_id", "function_version", "description")
    filters = {k: v for k, v in request.query.items() if k not in ("all_projects", "project_id")}
    unknown = set(filters) - set(allowed)
    if unknown:
        raise BadRequest(f"Unknown argument: {sorted(unknown)[0]!r}. Accepted filters: {', '.join(allowed)}.")
    rows = await store(request).aliases.list(project_id=scope, filters=filters)
    return web.json_response({"function_aliases": [serialize(r) for r in rows]})


async def _get(request: web.Request):
    # Names are unique per project only, so a name is always looked up in the caller's project.
    return await store(request).aliases.by_name(request.match_info["name"], project_id=ctx(request).project_id)


async def show(request: web.Request) -> web.Response:
    return web.json_response(serialize(await _get(request)))


async def update(request: web.Request) -> web.Response:
    row = await _get(request)
    body = await json_body(request)
    values: dict[str, Any] = {}
    if body.get("description") is not None:
        values["description"] = _text(body, "description")
    # The CLI sends every key, unset ones as null: nulls keep the current value.
    if body.get("function_id") is not None or body.get("function_version") is not None:
        function_id = body.get("function_id") if body.get("function_id") is not None else row.function_id
        version = body.get("function_version")
        if version is None:
            version = row.function_version if function_id == row.function_id else 0
        values["function_id"], values["function_version"] = await _check_target(request, function_id, version)
    if values:
        row = await store(request).aliases.update(row.id, values)
        log.info("alias updated", extra={"alias": row.name, "function_id": row.function_id,
                                          "function_version": row.function_version})
    return web.json_response(serialize(row))


async def delete(request: web.Request) -> web.Response:
    row = await _get(request)
    await store(request).aliases.delete(row.id)
    return web.Response(status=204)


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/aliases", create)
    app.router.add_get("/v1/aliases", index)
    app.router.add_get("/v1/aliases/{name}", show)
    app.router.add_put("/v1/aliases/{name}", update)
    app.router.add_delete("/v1/aliases/{name}", delete)
