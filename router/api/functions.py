"""/v1/functions: function code (zip package, Swift object or image), limits, download, workers."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from router.api.common import ctx, format_time, hw, list_filters, parse_int
from router.api.errors import BadRequest, NotAllowed, json_body
from router.plugins import PackageRef

CODE_SOURCES = ("package", "swift", "image")


def serialize(row) -> dict:
    # `code` is always an object (Qinling's list endpoint sent a JSON string: a fixed defect).
    return {"id": row.id, "name": row.name, "description": row.description, "runtime_id": row.runtime_id,
            "code": row.code, "entry": row.entry, "cpu": row.cpu, "memory_size": row.memory_size,
            "timeout": row.timeout, "count": row.count, "latest_version": row.latest_version,
            "project_id": row.project_id, "created_at": format_time(row.created_at),
            "updated_at": format_time(row.updated_at)}


async def _form(request: web.Request) -> tuple[dict[str, Any], bytes | None]:
    """Fields and the package bytes from a multipart/form-data or JSON request."""
    if request.content_type.startswith("multipart/") or request.content_type == "application/x-www-form-urlencoded":
        form = await request.post()
        fields: dict[str, Any] = {}
        package = None
        for key, value in form.items():
            if hasattr(value, "file"):
                if key == "package":
                    package = value.file.read()
            else:
                fields[key] = value
        return fields, package
    return await json_body(request), None


def _parse_code(raw: Any) -> dict:
    if raw is None:
        raise BadRequest("Required param is missing. Required: {'code'}")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise BadRequest("Invalid input, code must be a JSON object.") from None
    if not isinstance(raw, dict):
        raise BadRequest("Invalid input, code must be a JSON object.")
    if raw.get("source") not in CODE_SOURCES:
        raise BadRequest("Invalid code source specified, available sources: package, swift, image")
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
    fields, package = await _form(request)
    code = _parse_code(fields.get("code"))
    source = code["source"]
    cpu = _limit(request, fields, "cpu", "cpu", "millicpu")
    memory = _limit(request, fields, "memory_size", "memory", "bytes")
    timeout = _limit(request, fields, "timeout", "timeout", "seconds")
    runtime_id = fields.get("runtime_id") or None
    if source in ("package", "swift"):
        if not runtime_id:
            raise BadRequest('"runtime_id" must be specified.')
        runtime = await app.store.runtimes.get(runtime_id)
        if not (c.is_admin or runtime.is_public or runtime.project_id == c.project_id):
            raise BadRequest(f"Runtime {runtime_id} not found.", status=404)
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
        from router.store.models import new_id

        function_id = new_id()
        md5 = await app.packages.put(c.project_id, function_id, 0, package, code.get("md5sum"))
        try:
            row = await app.store.functions.add(id=function_id, code={"source": "package", "md5sum": md5}, **values)
        except Exception:
            await app.packages.delete(PackageRef(c.project_id, function_id, 0, md5))
            raise
    elif source == "swift":
        swift = code.get("swift") or {}
        if not swift.get("container") or not swift.get("object"):
            raise BadRequest("Both container and object must be provided for swift type function.")
        raise BadRequest("Swift object not supported: no Swift store is configured.")
    else:
        if not code.get("image"):
            raise BadRequest("Image must be provided for image type function.")
        row = await app.store.functions.add(code={"source": "image", "image": code["image"]}, **values)
    return web.json_response(serialize(row), status=201)


async def index(request: web.Request) -> web.Response:
    c = ctx(request)
    filters = list_filters(request, ("name", "runtime_id", "description", "entry"))
    rows = await hw(request).store.functions.list(project_id=c.list_scope(request), filters=filters)
    return web.json_response({"functions": [serialize(r) for r in rows]})


async def show(request: web.Request) -> web.StreamResponse:
    app = hw(request)
    row = await app.store.functions.get(request.match_info["id"], project_id=ctx(request).get_scope)
    if request.query.get("download", "").lower() in ("true", "1", "yes"):
        if row.code.get("source") == "image":
            raise BadRequest("Download image function is not allowed.", status=405)
        data = await app.packages.get(PackageRef(row.project_id, row.id, 0, row.code.get("md5sum")))
        return web.Response(body=data, content_type="application/zip",
                            headers={"Content-Disposition": f'attachment; filename="{row.id}"'})
    return web.json_response(serialize(row))


async def delete(request: web.Request) -> web.Response:
    app = hw(request)
    c = ctx(request)
    row = await app.store.functions.get(request.match_info["id"], project_id=c.get_scope)
    if row.project_id != c.project_id:
        raise NotAllowed("Function can only be deleted by its owner.")
    if await app.store.subscriptions.using_function(row.id, kind="job", active_only=True):
        raise NotAllowed("The function is still associated with running job(s).")
    if await app.store.subscriptions.using_function(row.id, kind="webhook"):
        raise NotAllowed("The function is still associated with webhook(s).")
    if await app.store.aliases.list(filters={"function_id": row.id}, limit=1):
        raise NotAllowed("The function is still associated with function alias(es).")
    if await app.store.subscriptions.using_function(row.id, kind="subscription"):
        raise NotAllowed("The function is still associated with subscription(s).")
    await app.engine.release(row.id)
    versions = await app.store.versions.for_function(row.id)
    await app.store.functions.delete(row.id)
    if row.code.get("source") == "package":
        await app.packages.delete(PackageRef(row.project_id, row.id, 0, row.code.get("md5sum")))
        for version in versions:
            await app.packages.delete(PackageRef(row.project_id, row.id, version.version_number, version.md5sum))
    return web.Response(status=204)


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/functions", create)
    app.router.add_get("/v1/functions", index)
    app.router.add_get("/v1/functions/{id}", show)
    app.router.add_delete("/v1/functions/{id}", delete)
