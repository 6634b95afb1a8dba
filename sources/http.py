"""HTTP source: Qinling webhook invocations and CloudEvents posted to /v1/events become events."""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import logging
import uuid
from typing import Any, ClassVar

from aiohttp import web

from router import safejson
from router.config import Config
from router.events import Event, InvalidEvent, derived_id
from router.plugins import PublishRefused, SourceContext, SubscriptionInvalid

log = logging.getLogger(__name__)

WEBHOOK_TYPE = "org.openstack.headwater.webhook.invoked"
_IDEMPOTENCY_HEADERS = ("Idempotency-Key", "X-Idempotency-Key")


SIGNATURE_HEADER = "X-Hub-Signature-256"


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    """GitHub's webhook signature: `sha256=` + hex HMAC-SHA256 of the raw body, compared in constant time."""
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header[len("sha256="):].strip().lower(), expected)


def _fault(status: int, message: str) -> web.Response:
    return web.json_response({"faultcode": "Client" if status < 500 else "Server", "faultstring": message, "debuginfo": None},
                             status=status)


class HttpSource:
    kind: ClassVar[str] = "http"
    # Its events arrive as API requests: it runs with the API (the `api` role), not with the pollers.
    part_of_api: ClassVar[bool] = True

    def __init__(self, config: Config):
        self.config = config
        self._ctx: SourceContext | None = None

    def validate_subscription(self, params: dict[str, Any], now: _dt.datetime) -> dict[str, Any]:
        for field in ("pattern", "first_execution_time", "count"):
            if params.get(field) is not None:
                raise SubscriptionInvalid(f"{field} is a cron option; http subscriptions take types and filters.")
        return {}

    async def start(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        ctx.add_route("POST", "/v1/webhooks/{id}/invoke", self.invoke, public=True)
        ctx.add_route("POST", "/v1/events", self.ingest)

    async def stop(self) -> None:
        self._ctx = None

    # -- Qinling webhooks ---------------------------------------------------------------------

    async def invoke(self, request: web.Request) -> web.Response:
        """POST /v1/webhooks/{id}/invoke: unauthenticated; query, form and JSON body merge into
        the input (Qinling); answers 202 with the execution id, recorded before the answer."""
        assert self._ctx is not None
        webhook_id = request.match_info["id"]
        sub = self._ctx.subscription(webhook_id)
        if sub is None or sub.source != self.kind:
            return _fault(404, f"Webhook not found [id={webhook_id}]")
        secret = sub.options.get("secret")
        if secret and not signature_ok(secret, await request.read(), request.headers.get(SIGNATURE_HEADER)):
            log.warning("webhook invoke refused: missing or wrong signature", extra={"subscription_id": sub.id})
            return _fault(401, f"Missing or wrong {SIGNATURE_HEADER}: this webhook accepts only requests signed "
                               "with its secret (sha256=<hex HMAC-SHA256 of the body>).")
        try:
            data = await self._webhook_input(request)
        except ValueError as exc:
            return _fault(400, str(exc))
        key = next((request.headers[h] for h in _IDEMPOTENCY_HEADERS if h in request.headers), None)
        # A caller-supplied idempotency key makes a retried POST the same event (run once).
        event_id = derived_id("webhook", webhook_id, key) if key else str(uuid.uuid4())
        event = Event(id=event_id, source=f"/headwater/webhooks/{webhook_id}", type=WEBHOOK_TYPE, subject=webhook_id,
                      data=data, extensions={"projectid": sub.project_id})
        try:
            executions = await self._ctx.publish(event, expect=[sub.id])
        except PublishRefused as exc:  # the webhook's function or alias is gone, or cannot run
            return _fault(exc.status, str(exc))
        except Exception as exc:
            log.exception("webhook event could not be published", extra={"event_id": event.id})
            return _fault(503, f"Event could not be accepted: {type(exc).__name__}")
        return web.json_response({"execution_id": executions[sub.id], "event_id": event.id}, status=202)

    async def _webhook_input(self, request: web.Request) -> Any:
        params: dict[str, Any] = dict(request.query)
        if not request.can_read_body:
            return params
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
            return params
        raw = await request.read()
        if not raw.strip():
            return params
        # Checked whole before the event is published: what the store or a bus cannot carry (300
        # levels deep, a 70-bit integer, a lone surrogate) used to fail after the execution was recorded.
        body = safejson.loads(raw)
        if isinstance(body, dict):
            params.update(body)
            return params
        if params:
            raise ValueError("A JSON body that is not an object cannot be merged with query parameters.")
        return body  # a list or scalar reaches the function as one positional argument

    # -- CloudEvents ingress ------------------------------------------------------------------

    async def ingest(self, request: web.Request) -> web.Response:
        """POST /v1/events: a CloudEvent in structured mode (JSON body with specversion) or binary
        mode (ce-* headers, body = data). Answers 202 with the event id."""
        assert self._ctx is not None
        try:
            event = await self._read_cloudevent(request)
        except (InvalidEvent, ValueError) as exc:
            return _fault(400, f"Invalid CloudEvent: {exc}")
        project, may_any = self._ctx.caller_project(request)
        if not (may_any and event.project_id):
            # The caller's project, whatever projectid the event names: only admins and services
            # post for other projects.
            event.extensions["projectid"] = project
        await self._ctx.publish(event)
        return web.json_response({"event_id": event.id}, status=202)

    async def _read_cloudevent(self, request: web.Request) -> Event:
        raw = await request.read()
        if "ce-specversion" in request.headers:
            attrs: dict[str, Any] = {k[3:].lower(): v for k, v in request.headers.items() if k.lower().startswith("ce-")}
            attrs["datacontenttype"] = request.content_type
            if raw:
                if request.content_type.endswith("json"):
                    try:
                        attrs["data"] = safejson.loads(raw, "data")
                    except safejson.UnsafeJSON as exc:
                        raise InvalidEvent(str(exc)) from None
                else:
                    attrs["data"] = raw.decode("utf-8", "replace")
            return Event.from_dict(attrs)
        event = Event.from_json(raw)
        try:
            safejson.check(event.data, "data")
        except safejson.UnsafeJSON as exc:
            raise InvalidEvent(str(exc)) from None
        return event
