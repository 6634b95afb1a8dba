"""/v1/subscriptions: Headwater's own routing table — which events go to which function."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from router.api.common import ctx, format_time, hw, list_filters, store
from router.api.errors import ApiError, BadRequest, json_body
from router.api.targets import check_target, delegation, delete_subscription, get_subscription, source_plugin
from router.batching import BatchError, validate_batch
from router.delivery import validate_delivery_policy
from router import mapping
from router.events import Event, InvalidEvent, utcnow
from router.index import SOURCE_KIND_EXTENSION
from router.limits import LimitError, validate_limits
from router.results import SinkSpecError
from router.filters import FilterError, compile_filter
from router.plugins import SubscriptionInvalid
from router.store import NotFound
from router.store.models import new_id

# Sources whose events are aimed at one subscription: its id is the event's subject.
SELF_TARGETED = ("cron",)


# Options that are credentials: stored, used, never answered (a webhook's signing secret, a trust).
SECRET_OPTIONS = ("secret", "trust_id")


def public_options(options: dict | None) -> dict:
    """Options as shown to clients: no secret or trust, and the sinks inside them masked like
    `sinks` (they are the same list)."""
    shown = {k: v for k, v in (options or {}).items() if k not in SECRET_OPTIONS}
    if isinstance(shown.get("sinks"), list):
        shown["sinks"] = _public_sinks(shown["sinks"])
    return shown


def serialize(row) -> dict:
    return {"id": row.id, "name": row.name, "description": row.description, "source": row.source, "kind": row.kind,
            "types": list(row.types or ()), "filters": row.filters or {},
            "filter": (row.options or {}).get("filter"), "input_mapping": (row.options or {}).get("input_mapping"),
            "limits": (row.options or {}).get("limits") or {},
            "batch": (row.options or {}).get("batch"),
            "sinks": _public_sinks((row.options or {}).get("sinks") or []),
            "function_id": row.function_id,
            "function_version": row.function_version, "function_alias": row.function_alias,
            "input": row.function_input, "status": row.status, "pattern": row.pattern, "count": row.count,
            "next_execution_time": format_time(row.next_execution_time), "options": public_options(row.options),
            "project_id": row.project_id, "created_at": format_time(row.created_at),
            "updated_at": format_time(row.updated_at)}


def _public_sinks(sinks: list[dict]) -> list[dict]:
    """Sinks as listed to clients: a callback's shared secret is never shown again."""
    return [{k: ("***" if k == "secret" else v) for k, v in sink.items()} for sink in sinks]


def _posts_to_openstack(sinks: Any) -> bool:
    return isinstance(sinks, list) and any(isinstance(s, dict) and s.get("kind") == "zaqar" for s in sinks)


def _check_shape(body: dict) -> tuple[list[str], dict, Any]:
    """Types, filters and filter expression, validated and compiled once here (a 400 names the fault)."""
    types = body.get("types") or []
    if isinstance(types, str):
        types = [types]
    if not isinstance(types, list) or not all(isinstance(t, str) and t for t in types):
        raise BadRequest("types must be a list of event type strings.")
    filters = body.get("filters") or {}
    expression = body.get("filter")
    if expression is not None and not isinstance(expression, (str, dict)):
        raise BadRequest("filter must be an expression string or an all/any/not object.")
    try:
        compile_filter(filters, expression)
    except FilterError as exc:
        raise BadRequest(str(exc)) from None
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("options must be an object.")
    if "delivery" in options:
        try:
            options["delivery"] = validate_delivery_policy(options["delivery"])
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    input_ = body.get("input")
    if input_ is not None and not isinstance(input_, str):
        raise BadRequest("input must be a string (JSON text or a plain string).")
    if input_ is not None and body.get("input_mapping") is not None:
        raise BadRequest("input and input_mapping exclude each other: a fixed input or a mapping of the event.")
    try:
        mapping.validate(body.get("input_mapping"))
        validate_limits(body.get("limits"))
        validate_batch(body.get("batch"))
    except (mapping.MappingError, LimitError, BatchError) as exc:
        raise BadRequest(str(exc)) from None
    return types, filters, expression


async def _columns(request: web.Request, body: Any, targets: dict, delegated: list) -> dict[str, Any]:
    """One subscription to create, validated (a 400 names the fault), as the columns to insert.
    `targets` caches checked targets and `delegated` the caller's trust, shared by a batch."""
    app = hw(request)
    if not isinstance(body, dict):
        raise BadRequest("A subscription must be a JSON object.")
    kind = body.get("source")
    if not kind or not isinstance(kind, str):
        raise BadRequest("Required param is missing. Required: {'source'}")
    source = source_plugin(request, kind)
    types, filters, expression = _check_shape(body)
    key = tuple(repr(body.get(k)) for k in ("function_id", "function_version", "function_alias"))
    if key not in targets:
        targets[key] = await check_target(request, body)
    target = targets[key]
    specific = source.validate_subscription({k: v for k, v in body.items() if k not in ("function_id", "function_version", "function_alias")}, utcnow())
    subscription_id = new_id()
    if kind in SELF_TARGETED:
        filters = {**filters, "subject": subscription_id}
    columns = {k: specific[k] for k in ("pattern", "first_execution_time", "next_execution_time", "count") if k in specific}
    # Credentials are Headwater's to set: a client naming a trust could act as its trustor.
    options = {k: v for k, v in {**dict(body.get("options") or {}), **specific.get("options", {})}.items()
               if k not in (*SECRET_OPTIONS, "user_id")}
    if expression not in (None, ""):
        options["filter"] = expression
    if body.get("input_mapping") is not None:
        options["input_mapping"] = body["input_mapping"]
    if body.get("limits"):
        options["limits"] = validate_limits(body["limits"])
    if body.get("batch"):
        options["batch"] = validate_batch(body["batch"])
    if body.get("sinks"):
        try:
            options["sinks"] = app.results.validate(body["sinks"])
        except SinkSpecError as exc:
            raise BadRequest(str(exc)) from None
    if specific.get("timezone") not in (None, "UTC"):
        options["timezone"] = specific["timezone"]
    name, description = body.get("name"), body.get("description")
    for label, value in (("name", name), ("description", description)):
        if value is not None and (not isinstance(value, str) or len(value) > 255):
            raise BadRequest(f"Invalid input, {label} must be a string of at most 255 characters.")
    # Runs happen later, without the caller: they act through a trust. So do the results a Zaqar
    # sink posts (into the caller's project's queue), whatever the source. Made last, once this
    # subscription is known good (one trust per request, shared by a batch's items).
    if kind not in ("http",) or _posts_to_openstack(options.get("sinks")):
        if not delegated:
            delegated.append(await delegation(request))
        options.update(delegated[0])
    return dict(id=subscription_id, source=kind, types=types, filters=filters, name=name, description=description,
                function_input=body.get("input"), options=options, status="running",
                project_id=ctx(request).project_id, **columns, **target)


async def create(request: web.Request) -> web.Response:
    app = hw(request)
    columns = await _columns(request, await json_body(request), {}, [])
    # As a batch of one: a Core insert, and the index files the row as written (no read back).
    (row,), revision = await store(request).subscriptions.add_many([columns])
    await app.subscription_feed.apply_written(revision, [row])
    return web.json_response(serialize(row), status=201)


MAX_BATCH = 1000  # subscriptions per POST /v1/subscriptions/batch


async def create_batch(request: web.Request) -> web.Response:
    """POST /v1/subscriptions/batch {"subscriptions": [...]}: each as POST /v1/subscriptions takes
    it, all created in one transaction or none (the first bad one is named: subscriptions[i])."""
    app = hw(request)
    body = await json_body(request)
    items = body.get("subscriptions")
    if not isinstance(items, list) or not items:
        raise BadRequest("subscriptions must be a non-empty list of subscriptions.")
    if len(items) > MAX_BATCH:
        raise BadRequest(f"subscriptions holds {len(items)} items; at most {MAX_BATCH} per request.")
    targets: dict = {}
    delegated: list = []
    rows = []
    for i, item in enumerate(items):
        try:
            rows.append(await _columns(request, item, targets, delegated))
        except (ApiError, NotFound, SubscriptionInvalid) as exc:
            status = exc.status if isinstance(exc, ApiError) else 404 if isinstance(exc, NotFound) else 400
            raise ApiError(f"subscriptions[{i}]: {exc}", status=status) from None
    created, revision = await store(request).subscriptions.add_many(rows)
    await app.subscription_feed.apply_written(revision, created)
    return web.json_response({"subscriptions": [serialize(r) for r in created]}, status=201)


async def index(request: web.Request) -> web.Response:
    filters = list_filters(request, ("source", "kind", "name", "function_id", "function_alias", "status"))
    rows = await store(request).subscriptions.list(project_id=ctx(request).list_scope(request), filters=filters)
    return web.json_response({"subscriptions": [serialize(r) for r in rows]})


async def show(request: web.Request) -> web.Response:
    return web.json_response(serialize(await get_subscription(request, None, "Subscription")))


EDITABLE = ("name", "description", "types", "filters", "filter", "status")


async def update(request: web.Request) -> web.Response:
    """PUT: name, description, types, filters, filter, status (running or paused); the rest stays.
    The new filter is validated as on create and the index follows at once."""
    app = hw(request)
    row = await get_subscription(request, None, "Subscription")
    body = await json_body(request)
    unknown = set(body) - set(EDITABLE)
    if unknown:
        raise BadRequest(f"Cannot change {', '.join(sorted(unknown))}; editable: {', '.join(EDITABLE)}.")
    if row.source in SELF_TARGETED and ({"filters", "filter"} & set(body)):
        raise BadRequest(f"The filters of a {row.source} subscription are its schedule's; change the job instead.")
    options = dict(row.options or {})
    shape = {"types": body.get("types", row.types), "filters": body.get("filters", row.filters),
             "filter": body.get("filter", options.get("filter"))}
    types, filters, expression = _check_shape(shape)
    values: dict[str, Any] = {"types": types, "filters": filters}
    if expression in (None, ""):
        options.pop("filter", None)
    else:
        options["filter"] = expression
    values["options"] = options
    for name in ("name", "description"):
        if name in body:
            if body[name] is not None and (not isinstance(body[name], str) or len(body[name]) > 255):
                raise BadRequest(f"Invalid input, {name} must be a string of at most 255 characters.")
            values[name] = body[name]
    if "status" in body:
        if body["status"] not in ("running", "paused"):
            raise BadRequest("status must be running or paused.")
        values["status"] = body["status"]
    updated = await store(request).subscriptions.update(row.id, values)
    await app.reload_subscription(row.id)
    return web.json_response(serialize(updated))


async def delete(request: web.Request) -> web.Response:
    return await delete_subscription(request, None, "Subscription")


async def dry_run(request: web.Request) -> web.Response:
    """POST /v1/subscriptions/test: which subscriptions an event would match and the input each
    function would receive. Nothing is published or run. The event is a CloudEvent; its source kind
    comes from the `sourcekind` extension or the `source_kind` query parameter (default http)."""
    app = hw(request)
    body = await json_body(request)
    kind = request.query.get("source_kind") or body.get(SOURCE_KIND_EXTENSION) or "http"
    try:
        event = Event.from_dict({**body, SOURCE_KIND_EXTENSION: kind})
    except InvalidEvent as exc:
        raise BadRequest(f"Invalid CloudEvent: {exc}") from None
    project = ctx(request).list_scope(request)
    matches = [sub for sub in app.index.match(event) if project is None or sub.project_id == project]
    return web.json_response({"event_id": event.id, "source_kind": kind, "matches": [
        {"subscription_id": sub.id, "kind": sub.kind, "name": sub.name, "function_id": sub.function_id,
         "function_version": sub.function_version, "function_alias": sub.function_alias,
         "input": mapping.event_input(event, sub)} for sub in matches]})


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/subscriptions/test", dry_run)
    app.router.add_post("/v1/subscriptions/batch", create_batch)
    app.router.add_post("/v1/subscriptions", create)
    app.router.add_get("/v1/subscriptions", index)
    # Not "test" or "batch" (POST routes of their own), so each path has one resource and one Allow header.
    app.router.add_get("/v1/subscriptions/{id:(?!(?:test|batch)$)[^{}/]+}", show)
    app.router.add_put("/v1/subscriptions/{id:(?!(?:test|batch)$)[^{}/]+}", update)
    app.router.add_delete("/v1/subscriptions/{id:(?!(?:test|batch)$)[^{}/]+}", delete)
