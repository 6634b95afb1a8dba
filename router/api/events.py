"""/v1/events: the event history (list, show) and replays of past events to one subscription.
(POST /v1/events, ingesting a CloudEvent, belongs to the http source.)"""

from __future__ import annotations

import datetime as _dt
import uuid

from aiohttp import web

from router.api.common import ctx, format_time, hw, parse_bool, parse_int, store
from router.api.errors import BadRequest, json_body
from router.events import Event, execution_id_for
from router.filters import FilterError, compile_filter
from router.index import REPLAY_FOR_EXTENSION as REPLAY_FOR, compile_subscription, source_kind, why_not
from router.store import NotFound

REPLAY_OF = "replayof"
MAX_REPLAY = 10_000


def _time(value, name: str) -> _dt.datetime | None:
    if value in (None, ""):
        return None
    try:
        parsed = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 time, got {value!r}.") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)


def serialize(row) -> dict:
    return {"id": row.id, "source_kind": row.source_kind, "source": row.source, "type": row.type,
            "subject": row.subject, "time": format_time(row.time), "received_at": format_time(row.received_at),
            "project_id": row.project_id, "size": row.size, "event": row.document}


async def index(request: web.Request) -> web.Response:
    q = request.query
    known = {"source_kind", "type", "subject", "since", "until", "limit", "all_projects", "project_id"}
    unknown = set(q) - known
    if unknown:
        raise BadRequest(f"Unknown argument: {', '.join(sorted(unknown))!r}. Accepted: {', '.join(sorted(known))}.")
    limit = parse_int(q.get("limit"), "limit", 100)
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be from 1 to 1000.")
    # The request's own scope (store(request).scope: None for admins only) wins over any filter.
    project = store(request).scope or ctx(request).list_scope(request)
    rows = await hw(request).history.query(
        project_id=project, source_kind=q.get("source_kind"),
        types=q.get("type", "").split(",") if q.get("type") else None, subject=q.get("subject"),
        since=_time(q.get("since"), "since"), until=_time(q.get("until"), "until"), limit=limit)
    return web.json_response({"events": [serialize(r) for r in rows]})


MAX_EXPLAINED = 50  # subscriptions of the event's source explained on one trace


def _brief(sub) -> dict:
    return {"subscription_id": sub.id, "name": sub.name, "function_id": sub.function_id,
            "function_alias": sub.function_alias, "function_version": sub.function_version}


def routing_decision(app, event: Event, subscription_id: str | None, scope: str | None) -> dict:
    """What the router decides for this event with today's subscriptions: those it matches, the
    others of its source with the reasons they do not (at most MAX_EXPLAINED), and for
    `subscription_id` the verdict and the conditions that failed."""
    matched = [s for s in app.index.match_or_target(event) if scope is None or s.project_id == scope]
    matched_ids = {s.id for s in matched}
    others = [s for s in app.index.of_source(source_kind(event) or "")
              if s.id not in matched_ids and (scope is None or s.project_id == scope)]
    decision = {"matched": [_brief(s) for s in matched],
                "not_matched": [{**_brief(s), "reasons": why_not(s, event) or ["not matched"]}
                                for s in others[:MAX_EXPLAINED]],
                "not_matched_total": len(others)}
    if subscription_id is not None:
        sub = app.index.get(subscription_id)
        if sub is None or (scope is not None and sub.project_id != scope):
            raise NotFound(f"Subscription not found [id={subscription_id}]")
        hit = sub.id in matched_ids
        decision["subscription"] = {**_brief(sub), "matched": hit, "reasons": [] if hit else (why_not(sub, event) or ["not matched"])}
    return decision


async def show(request: web.Request) -> web.Response:
    """GET /v1/events/{id}[?subscription_id=]: the recorded event and the routing decision for it."""
    unknown = set(request.query) - {"subscription_id"}
    if unknown:
        raise BadRequest(f"Unknown argument: {', '.join(sorted(unknown))!r}. Accepted: subscription_id.")
    scope = store(request).scope
    row = await hw(request).history.get(request.match_info["id"], scope)
    if row is None:
        raise NotFound(f"Event not found [id={request.match_info['id']}]")
    body = serialize(row)
    try:
        event = Event.from_dict(row.document)
    except Exception:  # a document recorded by an older version: show it without a decision
        return web.json_response(body)
    body["routing"] = routing_decision(hw(request), event, request.query.get("subscription_id") or None,
                                       None if scope is None else row.project_id)
    return web.json_response(body)


async def replay(request: web.Request) -> web.Response:
    """POST /v1/events/replay {subscription_id, since, until?, filter?, execution_status?, force?, limit?}:
    publish again, for that subscription only, the past events it matches (and `filter` picks),
    optionally only those whose execution for it ended with `execution_status` (e.g. failed).
    A replay is recorded as its own execution (event id `<id>:replay`), so replaying twice runs
    nothing the second time unless `force` is set: the answer counts those as `skipped`."""
    app = hw(request)
    body = await json_body(request)
    sub_id = body.get("subscription_id")
    if not sub_id:
        raise BadRequest("Required param is missing. Required: {'subscription_id'}")
    if not isinstance(sub_id, str):
        raise BadRequest("Invalid input, subscription_id must be a string.")
    await store(request).subscriptions.get(sub_id)  # another project's subscription: 404
    sub = app.index.get(sub_id)
    if sub is None:
        raise NotFound(f"Subscription not found [id={sub_id}]")
    since = _time(body.get("since"), "since")
    if since is None:
        raise BadRequest("Required param is missing. Required: {'since'}")
    until = _time(body.get("until"), "until")
    limit = parse_int(body.get("limit"), "limit", 1000)
    if not 1 <= limit <= MAX_REPLAY:
        raise BadRequest(f"limit must be from 1 to {MAX_REPLAY}.")
    force = parse_bool(body.get("force"), "force", False)
    try:
        extra = compile_filter(None, body.get("filter")) if body.get("filter") else None
    except FilterError as exc:
        raise BadRequest(str(exc)) from None
    statuses = body.get("execution_status")
    if isinstance(statuses, str):
        statuses = [statuses]
    if statuses is not None and (not isinstance(statuses, list) or not set(statuses) <= {"success", "failed", "error", "running"}):
        raise BadRequest("execution_status must be one or more of success, failed, error, running.")

    # With projects (Keystone) a subscription receives only its project's events, and so replays
    # only those; with auth off (one tenant) also those it received whatever project a source stamped.
    rows = await app.history.received_by(subscription_id=sub.id, project_id=sub.project_id, source_kind=sub.source,
                                         since=since, until=until, limit=limit,
                                         other_projects=not app.index.per_project)
    own = compile_subscription(sub)
    wanted: list[Event] = []
    for row in rows:
        event = Event.from_dict(row.document)
        if event.extensions.get(REPLAY_OF):
            continue  # replays are not replayed again; their originals are
        if sub.types and event.type not in sub.types:
            continue
        if not own.matches(event) or (extra is not None and not extra.matches(event)):
            continue
        wanted.append(event)
    if statuses is not None and wanted:
        executions = await store(request).executions.list(filters={"subscription_id": sub.id, "status": "in:" + ",".join(statuses)})
        chosen = {e.event_id for e in executions}
        wanted = [e for e in wanted if e.id in chosen]
    nonce = uuid.uuid4().hex[:12] if force else None
    copies = []
    for event in wanted:
        copy = Event.from_dict(event.to_dict())
        copy.id = f"{event.id}:replay" + (f":{nonce}" if nonce else "")
        copy.extensions[REPLAY_OF] = event.id
        copy.extensions[REPLAY_FOR] = sub.id
        copies.append(copy)
    # A replay recorded already would be de-duplicated by the router: it is not published, and the
    # answer counts it as skipped rather than replayed (nothing runs for it).
    done = await app.history.executed([execution_id_for(c.source, c.id, sub.id) for c in copies]) if not force else set()
    replayed, skipped = [], []
    for copy in copies:
        if execution_id_for(copy.source, copy.id, sub.id) in done:
            skipped.append(copy.id)
            continue
        await app.bus.publish(copy)
        replayed.append(copy.id)
    return web.json_response({"subscription_id": sub.id, "replayed": len(replayed), "events": replayed,
                              "skipped": len(skipped)}, status=202)


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/events", index)
    app.router.add_post("/v1/events/replay", replay)
    # Not "replay": GET /v1/events/replay would otherwise show an event of that id, and a 405 on it
    # would list GET beside POST in its Allow header.
    app.router.add_get("/v1/events/{id:(?!replay$)[^{}/]+}", show)
