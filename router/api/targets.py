"""Checks shared by webhooks, jobs and subscriptions: the function target and the subscription row."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from router import plugins
from router.api.common import ctx, hw, parse_int, store
from router.api.errors import ApiError, BadRequest
from router.keystone import KeystoneUnavailable
from router.store import NotFound

log = logging.getLogger(__name__)


async def check_target(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """Validate function_id/function_version/function_alias; returns the columns to store.
    With an alias, id and version are stored empty and resolved at every use."""
    project_id = ctx(request).project_id
    alias = body.get("function_alias") or None
    function_id = body.get("function_id") or None
    for name, value in (("function_alias", alias), ("function_id", function_id)):
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"Invalid input, {name} must be a string.")
    if not alias and not function_id:
        raise BadRequest("Either function_alias or function_id must be provided.")
    if alias:
        await store(request).aliases.by_name(alias, project_id=project_id)
        return {"function_alias": alias, "function_id": None, "function_version": None}
    # Qinling stored a missing version as null and crashed on every invoke; Headwater uses 0.
    version = parse_int(body.get("function_version"), "function_version", 0)
    if version < 0:
        raise BadRequest("function_version must not be negative.")
    function = await store(request).functions.get(function_id, project_id=project_id)
    if version:
        await store(request).versions.get_number(function.id, version)
    return {"function_alias": None, "function_id": function.id, "function_version": version}


async def shown_targets(request: web.Request, rows) -> dict[str, dict[str, Any]]:
    """The function_id/function_version a job or webhook shows, by row id: for an alias target the
    alias's current function and version (what a run would use now), not the empty stored columns."""
    aliases: dict[tuple[str, str], dict[str, Any]] = {}
    shown = {}
    for row in rows:
        if not row.function_alias:
            shown[row.id] = {"function_id": row.function_id, "function_version": row.function_version}
            continue
        key = (row.project_id, row.function_alias)
        if key not in aliases:
            try:
                alias = await store(request).aliases.by_name(row.function_alias, project_id=row.project_id)
                aliases[key] = {"function_id": alias.function_id, "function_version": alias.function_version}
            except NotFound:  # deleted since: nothing runs until it is back
                aliases[key] = {"function_id": None, "function_version": None}
        shown[row.id] = aliases[key]
    return shown


async def shown_target(request: web.Request, row) -> dict[str, Any]:
    return (await shown_targets(request, [row]))[row.id]


async def delegation(request: web.Request) -> dict[str, Any]:
    """Options that let later runs act as the caller: under Keystone (with [auth] delegation =
    trusts) a trust from the caller to Headwater's service user for the caller's project and
    roles. Trusts, not application credentials: a trust needs no secret stored by Headwater (only
    the service user can use it), and Keystone invalidates it with the user or the project."""
    app = hw(request)
    c = ctx(request)
    if app.keystone is None or app.config.auth.delegation != "trusts" or c.identity is None:
        return {}
    try:
        trust_id = await app.keystone.create_trust(c.token, c.identity)
    except KeystoneUnavailable as exc:
        raise ApiError(f"Identity service unavailable, try again later: {exc}", status=503) from None
    return {"trust_id": trust_id, "user_id": c.user_id}


def source_plugin(request: web.Request, kind: str) -> plugins.Source:
    app = hw(request)
    source = app.source(kind)
    if source is None:
        try:
            source = plugins.load("source", kind)(app.config)
        except plugins.PluginNotFound as exc:
            raise BadRequest(f"Unknown source {kind!r}; installed: {', '.join(plugins.available('source'))}") from exc
    return source


async def get_subscription(request: web.Request, kind: str | None, label: str):
    row = await store(request).subscriptions.get(request.match_info["id"], project_id=ctx(request).get_scope)
    if kind is not None and row.kind != kind:
        raise NotFound(f"{label} not found [id={row.id}]")
    return row


async def delete_subscription(request: web.Request, kind: str | None, label: str) -> web.Response:
    """DELETE of a job, webhook or subscription: one row of the subscriptions table."""
    app = hw(request)
    row = await get_subscription(request, kind, label)
    await store(request).subscriptions.delete(row.id)
    await app.reload_subscription(row.id)
    trust_id = (row.options or {}).get("trust_id")
    if trust_id and app.keystone is not None and ctx(request).token:
        try:  # nothing may act for the creator any more (Headwater never uses it again either way)
            deleted = await app.keystone.delete_trust(trust_id, ctx(request).token)
        except KeystoneUnavailable:
            deleted = False
        if not deleted:
            log.warning("trust of a deleted subscription left in Keystone", extra={"subscription_id": row.id,
                                                                                   "trust_id": trust_id})
    return web.Response(status=204)
