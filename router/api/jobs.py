"""/v1/jobs: Qinling cron jobs, stored as `cron` subscriptions (fired by sources/cron)."""

from __future__ import annotations

import logging

from aiohttp import web

from router.api.common import ctx, format_time, hw, list_filters, parse_bool, store
from router.api.errors import BadRequest, json_body
from router.api.targets import check_target, delegation, delete_subscription, get_subscription, shown_target, shown_targets, source_plugin
from router.events import utcnow
from router.store.models import new_id

log = logging.getLogger(__name__)


def serialize(row, target: dict) -> dict:
    """`target`: the function_id/function_version to show (shown_target: an alias's, resolved)."""
    return {"id": row.id, "name": row.name, "function_id": target["function_id"], "function_alias": row.function_alias,
            "function_version": target["function_version"], "function_input": row.function_input, "status": row.status,
            "pattern": row.pattern, "count": row.count,
            "first_execution_time": format_time(row.first_execution_time),
            "next_execution_time": format_time(row.next_execution_time), "project_id": row.project_id,
            "created_at": format_time(row.created_at), "updated_at": format_time(row.updated_at)}


async def create(request: web.Request) -> web.Response:
    app = hw(request)
    body = await json_body(request)
    target = await check_target(request, body)
    function_input = body.get("function_input")
    if function_input is not None and not isinstance(function_input, str):
        raise BadRequest("Invalid input, function_input must be a string.")
    if body.get("name") is not None and len(str(body["name"])) > 255:
        raise BadRequest("Invalid input, name is longer than 255 characters.")
    schedule = source_plugin(request, "cron").validate_subscription(
        {k: body.get(k) for k in ("pattern", "first_execution_time", "count", "timezone")}, utcnow())
    keystone_token = parse_bool(body.get("keystone_token"), "keystone_token", False)
    job_id = new_id()
    options = dict(schedule.get("options") or {})
    if keystone_token:  # runs get a token of the creator, scoped to the project, in their context
        options["keystone_token"] = True
    options.update(await delegation(request))
    if schedule.get("timezone") not in (None, "UTC"):
        options["timezone"] = schedule["timezone"]
    row = await store(request).subscriptions.add(
        id=job_id, source="cron", kind="job", filters={"subject": job_id}, name=body.get("name"), function_input=function_input,
        pattern=schedule.get("pattern"), first_execution_time=schedule.get("first_execution_time"),
        next_execution_time=schedule["next_execution_time"], count=schedule.get("count"), status="running",
        options=options, project_id=ctx(request).project_id, **target)
    await app.reload_subscription(row.id)
    return web.json_response(serialize(row, await shown_target(request, row)), status=201)


async def index(request: web.Request) -> web.Response:
    filters = list_filters(request, ("name", "function_id", "function_alias", "status", "pattern"))
    filters["kind"] = "job"
    rows = await store(request).subscriptions.list(project_id=ctx(request).list_scope(request), filters=filters)
    shown = await shown_targets(request, rows)
    return web.json_response({"jobs": [serialize(r, shown[r.id]) for r in rows]})


async def show(request: web.Request) -> web.Response:
    row = await get_subscription(request, "job", "Job")
    return web.json_response(serialize(row, await shown_target(request, row)))


JOB_STATUSES = ("running", "paused", "cancelled")  # what a client may set; `done` is the scheduler's


async def update(request: web.Request) -> web.Response:
    """PUT: name, function_input, status (pause/resume/cancel), pattern, next_execution_time."""
    app = hw(request)
    row = await get_subscription(request, "job", "Job")
    body = await json_body(request)
    status = body.get("status")
    if status is not None and status not in JOB_STATUSES:
        raise BadRequest("Invalid status.")
    if row.status in ("done", "cancelled"):
        raise BadRequest("Can not update a finished job.")
    values: dict = {}
    if body.get("name") is not None:
        if not isinstance(body["name"], str) or len(body["name"]) > 255:
            raise BadRequest("Invalid input, name must be a string of at most 255 characters.")
        values["name"] = body["name"]
    if body.get("function_input") is not None:
        if not isinstance(body["function_input"], str):
            raise BadRequest("Invalid input, function_input must be a string.")
        values["function_input"] = body["function_input"]
    cron = source_plugin(request, "cron")
    now = utcnow()
    timezone = (row.options or {}).get("timezone")
    pattern = body.get("pattern")
    next_time = None
    if body.get("next_execution_time") is not None:
        # The same check as a first execution time: parsed, and at least a minute ahead.
        next_time = cron.validate_subscription({"first_execution_time": body["next_execution_time"]}, now)["first_execution_time"]
    if pattern is not None:
        if not row.pattern or not str(pattern).strip():
            raise BadRequest("Can not change job type.")
        schedule = cron.validate_subscription({"pattern": pattern, "timezone": timezone}, now)
        values["pattern"] = schedule["pattern"]
        values["next_execution_time"] = schedule["next_execution_time"]
    elif row.pattern and row.status == "paused" and status == "running" and next_time is None:
        # Resuming a recurring job: the next tick counts from now, not from when it was paused.
        values["next_execution_time"] = cron.validate_subscription({"pattern": row.pattern, "timezone": timezone},
                                                                   now)["next_execution_time"]
    if next_time is not None:
        values["next_execution_time"] = next_time
    if status is not None:
        values["status"] = status
    if values:
        row = await store(request).subscriptions.update(row.id, values)
        await app.reload_subscription(row.id)
        log.info("job updated", extra={"subscription_id": row.id, "fields": sorted(values), "status": row.status})
    return web.json_response(serialize(row, await shown_target(request, row)))


async def delete(request: web.Request) -> web.Response:
    return await delete_subscription(request, "job", "Job")


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/jobs", create)
    app.router.add_get("/v1/jobs", index)
    app.router.add_get("/v1/jobs/{id}", show)
    app.router.add_put("/v1/jobs/{id}", update)
    app.router.add_delete("/v1/jobs/{id}", delete)
