"""/v1/webhooks: Qinling webhooks, stored as `http` subscriptions (invoked through sources/http)."""

from __future__ import annotations

import logging

from aiohttp import web

from router.api.common import ctx, format_time, hw, list_filters, store
from router.api.errors import BadRequest, json_body
from router.api.targets import check_target, delete_subscription, get_subscription, shown_target, shown_targets
from router.store.models import new_id

log = logging.getLogger(__name__)


def serialize(row, target: dict, public_url: str) -> dict:
    """`target`: the function_id/function_version to show (shown_target: an alias's, resolved)."""
    return {"id": row.id, "function_id": target["function_id"], "function_alias": row.function_alias,
            "function_version": target["function_version"], "description": row.description,
            "project_id": row.project_id, "created_at": format_time(row.created_at),
            "updated_at": format_time(row.updated_at), "webhook_url": f"{public_url}/v1/webhooks/{row.id}/invoke",
            # The secret itself is never answered once stored; only whether there is one.
            "signed": bool((row.options or {}).get("secret"))}


def _secret(body: dict) -> str | None:
    """An optional signing secret: invoke then needs X-Hub-Signature-256 (HMAC-SHA256 of the body)."""
    secret = body.get("secret")
    if secret is None:
        return None
    # Printable ASCII, as the OpenAPI document says: what every signing client can type and send.
    if not isinstance(secret, str) or not 16 <= len(secret) <= 255 or not all(" " <= c <= "~" for c in secret):
        raise BadRequest("Invalid input, secret must be a string of 16 to 255 printable ASCII characters.")
    return secret


CREATE_FIELDS = ("function_id", "function_alias", "function_version", "description", "secret")


async def create(request: web.Request) -> web.Response:
    app = hw(request)
    body = await json_body(request)
    unknown = sorted(set(body) - set(CREATE_FIELDS))
    if unknown:  # as for functions: a misspelt field (say, "secrett") must not leave a webhook unsigned
        raise BadRequest(f"Unknown argument: {unknown[0][:50]!r}. Accepted: {', '.join(CREATE_FIELDS)}.")
    secret = _secret(body)  # the input is checked before anything is looked up
    target = await check_target(request, body)
    if body.get("description") is not None and len(str(body["description"])) > 255:
        raise BadRequest("Invalid input, description is longer than 255 characters.")
    webhook_id = new_id()
    row = await store(request).subscriptions.add(id=webhook_id, source="http", kind="webhook", filters={"subject": webhook_id},
                                                 description=body.get("description"), project_id=ctx(request).project_id,
                                                 options={"secret": secret} if secret else {}, **target)
    await app.reload_subscription(row.id)
    return web.json_response(serialize(row, await shown_target(request, row), app.config.api.public_url), status=201)


async def index(request: web.Request) -> web.Response:
    app = hw(request)
    filters = list_filters(request, ("function_id", "function_alias", "function_version", "description"))
    filters["kind"] = "webhook"
    rows = await store(request).subscriptions.list(project_id=ctx(request).list_scope(request), filters=filters)
    shown = await shown_targets(request, rows)
    return web.json_response({"webhooks": [serialize(r, shown[r.id], app.config.api.public_url) for r in rows]})


async def show(request: web.Request) -> web.Response:
    row = await get_subscription(request, "webhook", "Webhook")
    return web.json_response(serialize(row, await shown_target(request, row), hw(request).config.api.public_url))


async def update(request: web.Request) -> web.Response:
    """PUT: function_id, function_version, function_alias, description. Switching to an alias
    clears id and version; switching to an id or version clears the alias. Nulls keep values."""
    app = hw(request)
    row = await get_subscription(request, "webhook", "Webhook")
    body = await json_body(request)
    values: dict = {}
    if body.get("description") is not None:
        if not isinstance(body["description"], str) or len(body["description"]) > 255:
            raise BadRequest("Invalid input, description must be a string of at most 255 characters.")
        values["description"] = body["description"]
    if "secret" in body:  # a string sets or replaces the secret; null or "" removes it
        secret = _secret(body) if body["secret"] not in (None, "") else None
        options = {k: v for k, v in (row.options or {}).items() if k != "secret"}
        values["options"] = {**options, "secret": secret} if secret else options
    if body.get("function_alias"):
        values.update(await check_target(request, {"function_alias": body["function_alias"]}))
    elif body.get("function_id") is not None or body.get("function_version") is not None:
        function_id = body.get("function_id") or row.function_id
        if not function_id:
            raise BadRequest("Either function_alias or function_id must be provided.")
        version = body.get("function_version")
        if version is None:
            version = row.function_version if function_id == row.function_id else 0
        values.update(await check_target(request, {"function_id": function_id, "function_version": version}))
    if values:
        row = await store(request).subscriptions.update(row.id, values)
        await app.reload_subscription(row.id)
        log.info("webhook updated", extra={"subscription_id": row.id, "fields": sorted(values)})
    return web.json_response(serialize(row, await shown_target(request, row), app.config.api.public_url))


async def delete(request: web.Request) -> web.Response:
    return await delete_subscription(request, "webhook", "Webhook")


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/webhooks", create)
    app.router.add_get("/v1/webhooks", index)
    app.router.add_get("/v1/webhooks/{id}", show)
    app.router.add_put("/v1/webhooks/{id}", update)
    app.router.add_delete("/v1/webhooks/{id}", delete)
