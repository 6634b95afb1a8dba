"""/v1/functions: function code (zip package, Swift object or image), limits, download, workers."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from router import builds
from router.api.common import ctx, format_time, hw, list_filters, parse_bool, parse_int, require_uuid, store
from router.api import listing
from router.api.errors import BadRequest, NotAllowed, json_body
from router import safejson
from router.plugins import PackageRef
from router.store import models
from router.store.models import new_id

log = logging.getLogger(__name__)

CODE_SOURCES = ("package", "swift", "image")


def serialize(row) -> dict:
    # `code` is always an object (Qinling's list endpoint sent a JSON string: a fixed defect). The
    # build state is shown as the function's `status` (and `status_reason` for an error) instead.
    build = builds.build_state(row.code)
    return {"id": row.id, "name": row.name, "description": row.description, "runtime_id": row.runtime_id,
            "code": {k: v for k, v in row.code.items() if k != "build"}, "status": builds.status(row.code),
            "status_reason": build.get("message") if build else None, "entry": row.entry, "cpu": row.cpu, "memory_size": row.memory_size,
            "timeout": row.timeout, "count": row.count, "latest_version": row.latest_version,
            "project_id": row.project_id, "created_at": format_time(row.created_at),
            "updated_at": format_time(row.updated_at)}


CREATE_FIELDS = ("code", "runtime_id", "name", "description", "entry", "cpu", "memory_size", "timeout", "package")


async def _form(request: web.Request, known: tuple[str, ...] | None = None) -> tuple[dict[str, Any], bytes | None]:
    """Fields and the package bytes from a multipart/form-data or JSON request; a form field that
    is not `known` is refused (what the OpenAPI document promises)."""
    if request.content_type.startswith("multipart/") or request.content_type == "application/x-www-form-urlencoded":
        try:
            form = await request.post()
        except (ValueError, AssertionError) as exc:  # e.g. multipart without a boundary
            raise BadRequest(f"Malformed form body: {exc}") from None
        fields: dict[str, Any] = {}
        package = None
        for key, value in form.items():
            if known is not None and key not in known:
                raise BadRequest(f"Unknown argument: {key[:50]!r}. Accepted: {', '.join(known)}.")
            if hasattr(value, "file"):
                if key == "package":
                    package = value.file.read()
            else:
                fields[key] = value
        return fields, package
    body = await json_body(request)
    for key in body:
        if known is not None and key not in known:
            raise BadRequest(f"Unknown argument: {key[:50]!r}. Accepted: {', '.join(known)}.")
    return body, None


def _parse_code(raw: Any) -> dict:
    if raw is None:
        raise BadRequest("Required param is missing. Required: {'code'}")
    if isinstance(raw, str):
        try:
            raw = safejson.loads(raw, "code")
        except safejson.UnsafeJSON:
            raise BadRequest("Invalid input, code must be a JSON object.") from None
    if not isinstance(raw, dict):
        raise BadRequest("Invalid input, code must be a JSON object.")
    if raw.get("source") not in CODE_SOURCES:
        raise BadRequest("Invalid code source specified, available sources: package, swift, image")
    swift = raw.get("swift")
    if (raw.get("image") is not None and not isinstance(raw["image"], str)) or \
            (raw.get("md5sum") is not None and not isinstance(raw["md5sum"], str)) or \
            (swift is not None and (not isinstance(swift, dict)
                                    or not all(isinstance(swift.get(k, ""), str) for k in ("container", "object")))):
        raise BadRequest("Invalid input, code.image, code.md5sum, code.swift.container and code.swift.object are strings.")
    return raw


def _limit(request: web.Request, fields: dict, name: str, kind: str, unit: str, label: str | None = None) -> int:
    limits = hw(request).config.resource_limits
    value = parse_int(fields.get(name), name, getattr(limits, f"default_{kind}"))
    low, high = getattr(limits, f"min_{kind}"), getattr(limits, f"max_{kind}")
    if not low <= value <= high:
        raise BadRequest(f"{label or kind} resource limitation not within the allowable range: {low} ~ {high}({unit}).")
    return value


async def create(request: web.Request) -> web.Response:
    app = hw(request)
    c = ctx(request)
    fields, package = await _form(request, CREATE_FIELDS)
    for name in ("runtime_id", "name", "description", "entry"):
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise BadRequest(f"Invalid input, {name} must be a string.")
    code = _parse_code(fields.get("code"))
    source = code["source"]
    cpu = _limit(request, fields, "cpu", "cpu", "millicpu")
    memory = _limit(request, fields, "memory_size", "memory", "bytes")
    timeout = _limit(request, fields, "timeout", "timeout", "seconds")
    runtime_id = fields.get("runtime_id") or None
    if runtime_id is not None:
        require_uuid(runtime_id, "runtime_id")
    compiled = False
    if source in ("package", "swift"):
        if not runtime_id:
            raise BadRequest('"runtime_id" must be specified.')
        runtime = await store(request).runtimes.get(runtime_id)  # found only if visible to the caller's project
        compiled = builds.needs_build(app.config, runtime.image)
        if compiled and source == "swift":
            raise BadRequest(f"Runtime {runtime_id} compiles its functions: upload a package (code source 'package'), not a Swift object.")
        if runtime.status != "available":
            raise BadRequest(f"Runtime {runtime_id} is not available.")
    else:
        runtime_id = None
    for field in ("name", "description"):
        if fields.get(field) is not None and len(str(fields[field])) > 255:
            raise BadRequest(f"Invalid input, {field} is longer than 255 characters.")
    entry = None if source == "image" else (fields.get("entry") or "main.main")
    values = dict(name=fields.get("name"), description=fields.get("description"), runtime_id=runtime_id, cpu=cpu,
                  memory_size=memory, timeout=timeout, entry=entry, project_id=c.project_id)
    if source == "package":
        if not package:
            raise BadRequest("Package is required for package type function.")
        function_id = new_id()
        md5 = await app.packages.put(c.project_id, function_id, 0, package, code.get("md5sum"))
        code = {"source": "package", "md5sum": md5}
        if compiled:
            code["build"] = {"status": builds.BUILDING}
        try:
            row = await store(request).functions.add(id=function_id, code=code, **values)
        except Exception:
            await app.packages.delete(PackageRef(c.project_id, function_id, 0, md5))
            raise
        if compiled:
            app.builds.start(row, runtime.image)
    elif source == "swift":
        swift = code.get("swift") or {}
        if not swift.get("container") or not swift.get("object"):
            raise BadRequest("Both container and object must be provided for swift type function.")
        if not app.packages.swift_enabled:
            raise BadRequest("Swift object not supported: no Swift store is configured ([storage] swift_url).")
        await app.packages.check_swift(c.project_id, str(swift["container"]), str(swift["object"]))
        row = await store(request).functions.add(
            code={"source": "swift", "swift": {"container": str(swift["container"]), "object": str(swift["object"])}}, **values)
    else:
        if not code.get("image"):
            raise BadRequest("Image must be provided for image type function.")
        row = await store(request).functions.add(code={"source": "image", "image": code["image"]}, **values)
    return web.json_response(serialize(row), status=201)


_BODIES = listing.RowBodies(models.Function.__table__, serialize)


async def index(request: web.Request) -> web.Response:
    c = ctx(request)
    filters = list_filters(request, ("name", "runtime_id", "description", "entry"))
    if not filters:  # the common read: raw rows, each serialised once (router.api.listing)
        return _BODIES.response("functions", await store(request).functions.rows(project_id=c.list_scope(request)))
    rows = await store(request).functions.list(project_id=c.list_scope(request), filters=filters)
    return web.json_response({"functions": [serialize(r) for r in rows]})


async def show(request: web.Request) -> web.StreamResponse:
    app = hw(request)
    row = await store(request).functions.get(request.match_info["id"], project_id=ctx(request).get_scope)
    if request.query.get("download", "").lower() in ("true", "1", "yes"):
        if row.code.get("source") == "image":
            raise BadRequest("Download image function is not allowed.", status=405)
        if row.code.get("source") == "swift":
            swift = row.code.get("swift") or {}
            ref = await app.packages.fetch_swift(row.project_id, row.id, swift.get("container", ""), swift.get("object", ""))
        elif parse_bool(request.query.get("artifact"), "artifact"):
            # What an engine's pod runs for a compiled runtime: the built artifact.
            ref = builds.artifact_ref(row, 0)
            if ref is None:
                raise BadRequest(f"Function {row.id} has no built artifact (status: {builds.status(row.code)}).", status=404)
        else:
            ref = PackageRef(row.project_id, row.id, 0, row.code.get("md5sum"))
        data = await app.packages.get(ref)
        return web.Response(body=data, content_type="application/zip",
                            headers={"Content-Disposition": f'attachment; filename="{row.id}"'})
    return web.json_response(serialize(row))


# What PUT may change. Anything else a client sends (read-only fields echoed back) is ignored,
# as Qinling does; `source`/`swift` are what python-qinlingclient sends instead of `code`.
UPDATABLE = ("name", "description", "code", "entry", "cpu", "memory_size", "timeout")
# Changes that leave the running code alone: no need to drop warm workers.
METADATA_ONLY = {"name", "description", "timeout"}


def _update_code(fields: dict[str, Any], package: bytes | None) -> dict | None:
    """The code object an update asks for, from `code` (JSON), the CLI's merged `source`/`swift`
    form keys, or just an uploaded package."""
    if fields.get("code") is not None:
        return _parse_code(fields["code"])
    if fields.get("source") is not None:
        code: dict[str, Any] = {"source": fields["source"]}
        if fields.get("swift") is not None:
            code["swift"] = fields["swift"]
        if fields.get("md5sum") is not None:
            code["md5sum"] = fields["md5sum"]
        return _parse_code(code)
    if package is not None:
        return {"source": "package"}
    return None


async def update(request: web.Request) -> web.Response:
    app = hw(request)
    c = ctx(request)
    row = old_row = await store(request).functions.get(request.match_info["id"], project_id=c.get_scope)
    fields, package = await _form(request)
    code = _update_code(fields, package)
    values: dict[str, Any] = {}
    for field in ("name", "description"):
        if fields.get(field) is not None:
            if len(str(fields[field])) > 255:
                raise BadRequest(f"Invalid input, {field} is longer than 255 characters.")
            values[field] = str(fields[field])
    if fields.get("timeout") is not None:
        values["timeout"] = _limit(request, fields, "timeout", "timeout", "seconds")
    if fields.get("entry") is not None:
        if row.code.get("source") == "image":
            raise BadRequest("The image type function has no entry.")
        if not str(fields["entry"]).strip() or len(str(fields["entry"])) > 80:
            raise BadRequest("Invalid input, entry must look like <module>.<function> (at most 80 characters).")
        values["entry"] = str(fields["entry"])
    if fields.get("cpu") is not None:
        values["cpu"] = _limit(request, fields, "cpu", "cpu", "millicpu")
    if fields.get("memory_size") is not None:
        values["memory_size"] = _limit(request, fields, "memory_size", "memory", "bytes")
    changes_code = code is not None or bool(set(values) - METADATA_ONLY)
    old_md5 = row.code.get("md5sum")
    new_md5 = None
    if changes_code:
        if await store(request).subscriptions.using_function(row.id, kind="job", active_only=True):
            raise NotAllowed("The function is still associated with running job(s).")
    if code is not None:
        source = row.code.get("source")
        if code["source"] != source:
            raise BadRequest("The function code type can not be changed.")
        if source == "image":
            raise BadRequest("The image type function code can not be changed.")
    if code is not None and source == "swift":
        # Merge the new container/object into the old, as Qinling does; re-validate the object.
        given = code.get("swift") or {}
        if not given.get("container") and not given.get("object"):
            raise BadRequest("Either container or object must be provided for swift type function update.")
        merged = {**row.code.get("swift", {}), **{k: str(v) for k, v in given.items() if k in ("container", "object") and v}}
        if not app.packages.swift_enabled:
            raise BadRequest("Swift object not supported: no Swift store is configured ([storage] swift_url).")
        await app.packages.check_swift(row.project_id, merged["container"], merged["object"])
        values["code"] = {"source": "swift", "swift": merged}
    elif code is not None:
        if package is None:
            raise BadRequest("Package is required for package type function.")
        if code.get("md5sum") and code["md5sum"] == old_md5:
            raise BadRequest("The function code checksum is not changed.")
        # Same path when the content is unchanged (the name carries the md5): then nothing to delete.
        new_md5 = await app.packages.put(row.project_id, row.id, 0, package, code.get("md5sum"))
        values["code"] = {"source": "package", "md5sum": new_md5}
        if builds.build_state(row.code) is not None:
            values["code"]["build"] = builds.rebuilding(row.code)
    if not values:
        return web.json_response(serialize(row))
    try:
        row = await store(request).functions.update(row.id, values)
    except Exception:
        if new_md5 and new_md5 != old_md5:
            await app.packages.delete(PackageRef(row.project_id, row.id, 0, new_md5))
        raise
    if new_md5 and old_md5 and new_md5 != old_md5:
        await app.packages.delete(PackageRef(row.project_id, row.id, 0, old_md5))
    if builds.build_state(values.get("code")) is not None:
        await _delete_artifact(app, old_row)
        app.builds.start(row, (await store(request).runtimes.get(row.runtime_id)).image)
    if changes_code:
        # The next execution must start a worker with the new code, entry and limits.
        await app.engine.release(row.id, 0)
    log.info("function updated", extra={"function_id": row.id, "fields": sorted(values)})
    return web.json_response(serialize(row))


def _count(body: dict) -> int:
    count = parse_int(body.get("count"), "count")
    if count is None:
        raise BadRequest("Required param is missing. Required: {'count'}")
    if count < 1:
        raise BadRequest("count must be a positive integer.")
    return count


async def function_for_admin(request: web.Request):
    if not ctx(request).is_admin:
        raise NotAllowed()
    return await store(request).functions.get(request.match_info["id"])


async def detach_version(request: web.Request, function_id: str, version: int) -> web.Response:
    await hw(request).engine.release(function_id, version)
    log.info("function detached", extra={"function_id": function_id, "function_version": version})
    return web.Response(status=202)


async def scale_version(request: web.Request, function, version: int, direction: str) -> web.Response:
    """Scale warm workers where the engine can (an optional `scale_up`/`scale_down` of the engine);
    the local engine starts workers on demand and keeps `local_workers_per_function` at most, so
    for it the request is accepted and has no effect."""
    count = _count(await json_body(request))
    app = hw(request)
    scaler = getattr(app.engine, f"scale_{direction}", None)
    if scaler is not None and direction == "up":
        await scaler(await app.executions.function_spec(function, version), count)
    elif scaler is not None:
        await scaler(function.id, version, count)
    log.info("function scale %s", direction, extra={"function_id": function.id, "function_version": version,
                                                     "count": count, "supported": scaler is not None})
    return web.Response(status=202)


async def detach(request: web.Request) -> web.Response:
    function = await function_for_admin(request)
    return await detach_version(request, function.id, 0)


async def scale_up(request: web.Request) -> web.Response:
    return await scale_version(request, await function_for_admin(request), 0, "up")


async def scale_down(request: web.Request) -> web.Response:
    return await scale_version(request, await function_for_admin(request), 0, "down")


async def workers(request: web.Request) -> web.Response:
    function = await function_for_admin(request)
    version = parse_int(request.query.get("function_version"), "function_version", 0)
    names = await hw(request).engine.workers(function.id, version)
    return web.json_response({"workers": [{"function_id": function.id, "function_version": version, "worker_name": n}
                                          for n in names]})


async def delete(request: web.Request) -> web.Response:
    app = hw(request)
    c = ctx(request)
    row = await store(request).functions.get(request.match_info["id"], project_id=c.get_scope)
    if row.project_id != c.project_id:
        raise NotAllowed("Function can only be deleted by its owner.")
    if await store(request).subscriptions.using_function(row.id, kind="job", active_only=True):
        raise NotAllowed("The function is still associated with running job(s).")
    if await store(request).subscriptions.using_function(row.id, kind="webhook"):
        raise NotAllowed("The function is still associated with webhook(s).")
    if await store(request).aliases.list(filters={"function_id": row.id}, limit=1):
        raise NotAllowed("The function is still associated with function alias(es).")
    if await store(request).subscriptions.using_function(row.id, kind="subscription"):
        raise NotAllowed("The function is still associated with subscription(s).")
    await app.engine.release(row.id)
    versions = await store(request).versions.for_function(row.id)
    # Finished jobs go with the function (Qinling allowed the delete; a foreign key would refuse it).
    for job_id in await store(request).functions.delete_with_finished_jobs(row.id):
        await app.reload_subscription(job_id)
    if row.code.get("source") == "package":
        await app.packages.delete(PackageRef(row.project_id, row.id, 0, row.code.get("md5sum")))
        await _delete_artifact(app, row)
        for version in versions:
            await app.packages.delete(PackageRef(row.project_id, row.id, version.version_number, version.md5sum))
            artifact = builds.artifact_ref(row, version.version_number)
            if artifact is not None:
                await app.packages.delete(artifact)
    return web.Response(status=204)


async def _delete_artifact(app, row) -> None:
    """Remove a function's built artifact (stored beside its package)."""
    ref = builds.artifact_ref(row, 0)
    if ref is not None and ref.md5sum != row.code.get("md5sum"):
        await app.packages.delete(ref)


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/functions", create)
    app.router.add_get("/v1/functions", index)
    app.router.add_get("/v1/functions/{id}", show)
    app.router.add_put("/v1/functions/{id}", update)
    app.router.add_delete("/v1/functions/{id}", delete)
    app.router.add_post("/v1/functions/{id}/detach", detach)
    app.router.add_post("/v1/functions/{id}/scale_up", scale_up)
    app.router.add_post("/v1/functions/{id}/scale_down", scale_down)
    app.router.add_get("/v1/functions/{id}/workers", workers)
