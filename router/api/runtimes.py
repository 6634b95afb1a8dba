"""/v1/runtimes: the images functions run on."""

from __future__ import annotations

import logging

from aiohttp import web

from router.api.common import ctx, format_time, hw, list_filters, parse_bool, require_uuid, store
from router.api import listing
from router.api.errors import BadRequest, ConflictError, NotAllowed, json_body
from router.store import models

log = logging.getLogger(__name__)


def serialize(row, projects: list[str] | None = None) -> dict:
    doc = {"id": row.id, "name": row.name, "image": row.image, "description": row.description,
           "is_public": row.is_public, "trusted": row.trusted, "status": row.status, "project_id": row.project_id,
           "created_at": format_time(row.created_at), "updated_at": format_time(row.updated_at)}
    if projects is not None:  # who a private runtime is shared with: the admins' business only
        doc["projects"] = projects
    return doc


def _projects(body: dict) -> list[str] | None:
    """`projects`: the project ids a private runtime is shared with (Qinling's runtime access)."""
    value = body.get("projects")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > 1000 or not all(
            isinstance(p, str) and 0 < len(p) <= 80 and all("!" <= c <= "~" for c in p) for p in value):
        # Keystone project ids are visible ASCII; the OpenAPI document says the same.
        raise BadRequest("Invalid value for projects: a list of at most 1000 project ids (1 to 80 visible ASCII "
                         "characters each) is required.")
    return value


async def _serialize(request: web.Request, row) -> dict:
    return serialize(row, await store(request).runtimes.projects(row.id) if ctx(request).is_admin else None)


async def _visible(request: web.Request, runtime_id: str):
    require_uuid(runtime_id)
    # The scoped store finds public runtimes, the project's own and those shared with it only.
    return await store(request).runtimes.get(runtime_id)


async def create(request: web.Request) -> web.Response:
    c = ctx(request)
    if not c.is_admin:
        raise NotAllowed()
    body = await json_body(request)
    if not body.get("image"):
        raise BadRequest("Required param is missing. Required: {'image'}")
    for field in ("image", "name", "description"):
        if body.get(field) is not None and (not isinstance(body[field], str) or len(body[field]) > 255):
            raise BadRequest(f"Invalid value for {field}: a string of at most 255 characters is required.")
    projects = _projects(body)
    # Engines without runtime pools (local) can run a runtime at once; pool engines (kubernetes)
    # build one first: `creating` until the pool is ready, then `available` (or `error`).
    app = hw(request)
    create_pool = getattr(app.engine, "create_pool", None)
    trusted = parse_bool(body.get("trusted"), "trusted", True)
    row = await store(request).runtimes.add(
        image=body["image"], name=body.get("name"), description=body.get("description"),
        is_public=parse_bool(body.get("is_public"), "is_public", True), trusted=trusted,
        status="creating" if create_pool else "available", project_id=c.project_id)
    if projects:
        await store(request).runtimes.share(row.id, projects)
    if create_pool:
        app.executions.spawn(_build_pool(app, create_pool, row.id, row.image, trusted))
    return web.json_response(await _serialize(request, row), status=201)


async def _build_pool(app, create_pool, runtime_id: str, image: str, trusted: bool) -> None:
    try:
        await create_pool(runtime_id, image, trusted=trusted)
        wait_ready = getattr(app.engine, "wait_pool_ready", None)
        if wait_ready is not None:  # Qinling too waits for the pool before calling a runtime available
            await wait_ready(runtime_id, image)
        status = "available"
    except Exception:
        log.exception("runtime pool could not be created", extra={"runtime_id": runtime_id})
        status = "error"
    await app.store.runtimes.update(runtime_id, {"status": status})
    app.executions.targets.clear()


async def _rebuild_pool(app, update_pool, runtime_id: str, image: str, previous: str) -> None:
    """Roll the pool to a new image; on failure the engine rolls back and the old image returns
    (Qinling's behaviour)."""
    try:
        ok = await update_pool(runtime_id, image)
    except Exception:
        log.exception("runtime pool update failed", extra={"runtime_id": runtime_id})
        ok = False
    values = {"status": "available"} if ok else {"status": "available", "image": previous}
    await app.store.runtimes.update(runtime_id, values)
    app.executions.targets.clear()


_BODIES = listing.RowBodies(models.Runtime.__table__, serialize)


async def index(request: web.Request) -> web.Response:
    c = ctx(request)
    list_filters(request, ())  # no filters: unknown parameters are refused, as WSME does
    every = c.is_admin and parse_bool(request.query.get("all_projects"), "all_projects")
    # Raw rows, each serialised once (router.api.listing).
    return _BODIES.response("runtimes", await store(request).runtimes.rows(project_id=None if every else c.project_id))


async def show(request: web.Request) -> web.Response:
    return web.json_response(await _serialize(request, await _visible(request, request.match_info["id"])))


UPDATABLE = ("name", "description", "image")


async def update(request: web.Request) -> web.Response:
    """PUT: name, description, image. A new image is refused while functions of the runtime have
    warm workers (they run the old image); engines with runtime pools rebuild them."""
    if not ctx(request).is_admin:
        raise NotAllowed()
    app = hw(request)
    row = await _visible(request, request.match_info["id"])
    body = await json_body(request)
    projects = _projects(body)
    values = {}
    if body.get("is_public") is not None:
        is_public = parse_bool(body["is_public"], "is_public")
        if is_public != row.is_public:
            values["is_public"] = is_public
    for field in UPDATABLE:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > 255 or (field == "image" and not value.strip()):
            raise BadRequest(f"Invalid value for {field}: a string of at most 255 characters is required.")
        if value != getattr(row, field):
            values[field] = value
    if "image" in values:
        if row.status != "available":
            raise ConflictError(f"Runtime {row.id} is not available.")
        for function in await store(request).functions.list(filters={"runtime_id": row.id}):
            versions = [0] + [v.version_number for v in await store(request).versions.for_function(function.id)]
            for number in versions:
                if await app.engine.workers(function.id, number):
                    raise NotAllowed(f"Runtime {row.id} is still in use by functions.")
        log.info("runtime image changed", extra={"runtime_id": row.id, "image": values["image"], "previous": row.image})
    update_pool = getattr(app.engine, "update_pool", None)
    if "image" in values and update_pool is not None:
        values["status"] = "upgrading"
    previous = row.image
    if values:
        row = await store(request).runtimes.update(row.id, values)
    if projects is not None:
        await store(request).runtimes.share(row.id, projects)
    if "image" in values and update_pool is not None:
        app.executions.spawn(_rebuild_pool(app, update_pool, row.id, values["image"], previous))
    return web.json_response(await _serialize(request, row))


async def pool(request: web.Request) -> web.Response:
    """GET …/pool: the engine's capacity for this runtime. Engines with warm pools (kubernetes) report
    them through an optional `pool(runtime_id)`; the local engine starts workers on demand, so its
    total is the workers now warm for the runtime's functions and none sit idle unassigned."""
    if not ctx(request).is_admin:
        raise NotAllowed()
    app = hw(request)
    row = await _visible(request, request.match_info["id"])
    engine_pool = getattr(app.engine, "pool", None)
    if engine_pool is not None:
        total, available = await engine_pool(row.id)
    else:
        total = 0
        for function in await store(request).functions.list(filters={"runtime_id": row.id}):
            versions = [0] + [v.version_number for v in await store(request).versions.for_function(function.id)]
            for number in versions:
                total += len(await app.engine.workers(function.id, number))
        available = 0
    return web.json_response({"name": row.id, "capacity": {"total": total, "available": available}})


async def delete(request: web.Request) -> web.Response:
    if not ctx(request).is_admin:
        raise NotAllowed()
    row = await _visible(request, request.match_info["id"])
    app = hw(request)
    if await store(request).functions.list(filters={"runtime_id": row.id}, limit=1):
        raise NotAllowed(f"Runtime {row.id} is still in use.")
    delete_pool = getattr(app.engine, "delete_pool", None)
    if delete_pool is not None:
        await delete_pool(row.id)
    await store(request).runtimes.delete(row.id)
    return web.Response(status=204)


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/runtimes", create)
    app.router.add_get("/v1/runtimes", index)
    app.router.add_get("/v1/runtimes/{id}", show)
    app.router.add_put("/v1/runtimes/{id}", update)
    app.router.add_delete("/v1/runtimes/{id}", delete)
    app.router.add_get("/v1/runtimes/{id}/pool", pool)
