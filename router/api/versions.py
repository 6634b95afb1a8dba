"""/v1/functions/{id}/versions: numbered snapshots of a package function's code."""

from __future__ import annotations

import logging

from aiohttp import web

from router import builds
from router.api.common import ctx, format_time, hw, parse_bool, parse_int, store
from router.api.errors import BadRequest, NotAllowed, json_body
from router.api.functions import detach_version, function_for_admin, scale_version
from router.plugins import PackageRef
from router.store import NotFound

log = logging.getLogger(__name__)

MAX_VERSIONS = 10  # Qinling's MAX_VERSION_NUMBER


def serialize(row) -> dict:
    return {"id": row.id, "function_id": row.function_id, "description": row.description,
            "version_number": row.version_number, "count": row.count, "project_id": row.project_id,
            "created_at": format_time(row.created_at), "updated_at": format_time(row.updated_at)}


async def _function(request: web.Request, *, owner_only: bool = False):
    c = ctx(request)
    function = await store(request).functions.get(request.match_info["id"], project_id=c.get_scope)
    if owner_only and function.project_id != c.project_id:
        # Qinling: an admin acting on another project's function gets 404, not the function.
        raise NotFound(f"Function not found [id={function.id}]")
    return function


def _number(request: web.Request) -> int:
    number = parse_int(request.match_info["version"], "version")
    if number is None or number < 0:
        raise BadRequest("Invalid input, version must be a non-negative integer.")
    return number


async def create(request: web.Request) -> web.Response:
    app = hw(request)
    function = await _function(request, owner_only=True)
    body = await json_body(request)
    description = body.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 255):
        raise BadRequest("Invalid input, description must be a string of at most 255 characters.")
    if function.code.get("source") != "package":
        raise NotAllowed("Function versioning only allowed for package type function.")
    md5 = function.code.get("md5sum")
    artifact = builds.artifact_ref(function, 0)
    if builds.build_state(function.code) is not None and artifact is None:
        raise BadRequest(f"Function {function.id} is {builds.status(function.code)}: a version of a compiled function "
                         "snapshots its built artifact, so create it once the function is available.", status=409)
    existing = await store(request).versions.for_function(function.id)
    if len(existing) >= MAX_VERSIONS:
        raise NotAllowed(f"Can not exceed maximum number({MAX_VERSIONS}) of versions")
    if existing and existing[-1].md5sum == md5:
        raise NotAllowed(f"Function package not changed since the latest version {existing[-1].version_number}.")
    row = await store(request).versions.add_next(function.id, project_id=function.project_id, description=description,
                                            md5sum=md5, max_versions=MAX_VERSIONS)
    try:
        await app.packages.copy(PackageRef(function.project_id, function.id, 0, md5), row.version_number)
        if artifact is not None:
            await app.packages.copy(artifact, row.version_number)
            await store(request).functions.update(function.id, {"code": builds.with_version(function.code, row.version_number, artifact.md5sum)})
    except Exception:
        await store(request).versions.delete(row.id)
        raise
    log.info("function version created", extra={"function_id": function.id, "function_version": row.version_number})
    return web.json_response(serialize(row), status=201)


async def index(request: web.Request) -> web.Response:
    function = await _function(request)
    rows = await store(request).versions.for_function(function.id)
    return web.json_response({"function_versions": [serialize(r) for r in rows]})


async def show(request: web.Request) -> web.StreamResponse:
    app = hw(request)
    function = await _function(request)
    number = _number(request)
    row = await store(request).versions.get_number(function.id, number)
    if parse_bool(request.query.get("download"), "download"):
        ref = PackageRef(function.project_id, function.id, number, row.md5sum)
        if parse_bool(request.query.get("artifact"), "artifact"):
            # What an engine's pod runs for a compiled runtime: the version's built artifact.
            ref = builds.artifact_ref(function, number)
            if ref is None:
                raise BadRequest(f"Function {function.id} version {number} has no built artifact.", status=404)
        data = await app.packages.get(ref)
        return web.Response(body=data, content_type="application/zip",
                            headers={"Content-Disposition": f'attachment; filename="{function.id}_{number}"'})
    return web.json_response(serialize(row))


async def delete(request: web.Request) -> web.Response:
    app = hw(request)
    function = await _function(request, owner_only=True)
    number = _number(request)
    row = await store(request).versions.get_number(function.id, number)
    if await store(request).subscriptions.using_function(function.id, version=number, kind="job", active_only=True):
        raise NotAllowed("The function version is still associated with running job(s).")
    if await store(request).subscriptions.using_function(function.id, version=number, kind="webhook"):
        raise NotAllowed("The function version is still associated with webhook(s).")
    if await store(request).aliases.list(filters={"function_id": function.id, "function_version": number}, limit=1):
        raise NotAllowed("The function version is still associated with function alias(es).")
    if await store(request).subscriptions.using_function(function.id, version=number, kind="subscription"):
        raise NotAllowed("The function version is still associated with subscription(s).")
    await app.engine.release(function.id, number)
    await store(request).versions.delete(row.id)
    await app.packages.delete(PackageRef(function.project_id, function.id, number, row.md5sum))
    artifact = builds.artifact_ref(function, number)
    if artifact is not None:
        await app.packages.delete(artifact)
        await store(request).functions.update(function.id, {"code": builds.with_version(function.code, number, None)})
    log.info("function version deleted", extra={"function_id": function.id, "function_version": number})
    return web.Response(status=204)


async def _admin_version(request: web.Request):
    function = await function_for_admin(request)
    number = _number(request)
    if number:
        await store(request).versions.get_number(function.id, number)
    return function, number


async def detach(request: web.Request) -> web.Response:
    function, number = await _admin_version(request)
    return await detach_version(request, function.id, number)


async def scale_up(request: web.Request) -> web.Response:
    function, number = await _admin_version(request)
    return await scale_version(request, function, number, "up")


async def scale_down(request: web.Request) -> web.Response:
    function, number = await _admin_version(request)
    return await scale_version(request, function, number, "down")


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/functions/{id}/versions", create)
    app.router.add_get("/v1/functions/{id}/versions", index)
    app.router.add_get("/v1/functions/{id}/versions/{version}", show)
    app.router.add_delete("/v1/functions/{id}/versions/{version}", delete)
    app.router.add_post("/v1/functions/{id}/versions/{version}/detach", detach)
    app.router.add_post("/v1/functions/{id}/versions/{version}/scale_up", scale_up)
    app.router.add_post("/v1/functions/{id}/versions/{version}/scale_down", scale_down)
