"""Swift source: ceilometermiddleware's object-request notifications from RabbitMQ become events."""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import posixpath
from typing import Any, ClassVar

from router.config import Config
from router.events import Event
from router.plugins import SourceContext, SubscriptionInvalid

log = logging.getLogger(__name__)

KIND = "swift"
OBJECT_TYPE = "org.openstack.swift.object."  # + lower-case HTTP method: put, post, delete, copy, get, head
CONTAINER_TYPE = "org.openstack.swift.container."
NOTIFICATION_EVENT_TYPE = "objectstore.http.request"

# Extension attributes this source sets; subscriptions filter on them with exact matches, e.g.
# {"container": "photos", "objectsuffix": "jpg"} = "*.jpg in photos".
EXTENSIONS = ("projectid", "account", "container", "object", "objectsuffix", "objectdir", "method", "partitionkey")
_CORE = ("id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "specversion", "sourcekind")
_RESELLER_PREFIX = "AUTH_"
# ceilometermiddleware's name for the X-Headwater-* request headers the proxy filter sets.
_HEADER = "http_header_x_headwater_"
# Wait before taking a notification back after the router refused it, so a router outage is not a hot loop.
_REQUEUE_DELAY = 1.0


class MalformedNotification(ValueError):
    """A message on the exchange that is not a ceilometermiddleware notification Headwater can read."""


def unwrap(body: bytes | str) -> dict[str, Any]:
    """The notification inside an AMQP body: oslo.messaging v2 wraps it as a JSON string under
    `oslo.message`; the v1 `messaging` driver sends it bare. Both are accepted."""
    try:
        outer = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedNotification(f"body is not JSON: {exc}") from None
    if not isinstance(outer, dict):
        raise MalformedNotification("body is not a JSON object")
    if "oslo.message" in outer:
        try:
            inner = json.loads(outer["oslo.message"])
        except (TypeError, ValueError) as exc:
            raise MalformedNotification(f"oslo.message is not a JSON document: {exc}") from None
        if not isinstance(inner, dict):
            raise MalformedNotification("oslo.message is not a JSON object")
        return inner
    return outer


def _parse_time(value: Any) -> _dt.datetime | None:
    # CADF eventTime is UTC without a zone ("2026-11-24T03:01:07.843285"); oslo's timestamp uses a space.
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = _dt.datetime.fromisoformat(value.replace(" ", "T").replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)


def _measure(payload: dict[str, Any], name: str) -> int | None:
    for item in payload.get("measurements") or ():
        metric = item.get("metric") if isinstance(item, dict) else None
        if isinstance(metric, dict) and metric.get("name") == name:
            result = item.get("result")
            if isinstance(result, (int, float)) and not isinstance(result, bool):
                return int(result)
    return None


def object_suffix(name: str) -> str | None:
    """The extension after the last dot of the object's base name, lower-cased (`a/Cat.JPG` → `jpg`)."""
    base = posixpath.basename(name)
    stem, dot, ext = base.rpartition(".")
    return ext.lower() if dot and stem and ext else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_warned_no_status = False


def _warn_no_status() -> None:
    global _warned_no_status
    if not _warned_no_status:
        _warned_no_status = True
        log.error("swift notifications carry no X-Headwater-Status: put the headwater filter "
                  "(sources.swift_middleware) after ceilometer in the proxy pipeline and name its headers in "
                  "ceilometer's metadata_headers; until then no swift events are published ([swift] require_status)")


def to_event(notification: dict[str, Any], *, methods: frozenset[str], container_events: bool,
             require_status: bool = True) -> Event | None:
    """The event for one notification, None when it is not one Headwater publishes (a read, an
    account request, a request that failed inside Swift). Raises MalformedNotification."""
    event_type = notification.get("event_type")
    if event_type != NOTIFICATION_EVENT_TYPE:
        raise MalformedNotification(f"event_type is {event_type!r}, not {NOTIFICATION_EVENT_TYPE!r}")
    message_id = notification.get("message_id")
    payload = notification.get("payload")
    if not isinstance(message_id, str) or not message_id:
        raise MalformedNotification("no message_id")
    if not isinstance(payload, dict):
        raise MalformedNotification("payload is not an object")
    target = payload.get("target")
    metadata = target.get("metadata") if isinstance(target, dict) else None
    if not isinstance(metadata, dict):
        raise MalformedNotification("payload.target.metadata is missing")
    method = target.get("action")
    path = metadata.get("path")
    if not isinstance(method, str) or not isinstance(path, str):
        raise MalformedNotification("payload.target.action or target.metadata.path is missing")
    method = method.upper()
    container = metadata.get("container")
    obj = metadata.get("object")

    # ceilometermiddleware reports outcome "failure" only when the proxy raised; such a request
    # changed nothing Headwater can name, so it is not an event.
    if payload.get("outcome") not in (None, "success"):
        log.info("swift request did not succeed; no event", extra={"event_id": message_id, "outcome": payload.get("outcome")})
        return None
    # What Swift answered, from Headwater's proxy filter (sources.swift_middleware): only a 2xx is
    # an event, as in S3. Without the filter the outcome is unknown (ceilometermiddleware says
    # `success` for a 401 too), and `require_status` decides.
    status = metadata.get(_HEADER + "status")
    if status is None:
        if require_status:
            _warn_no_status()
            return None
    elif not (isinstance(status, str) and status.startswith("2")):
        log.info("swift refused the request (%s); no event", status, extra={"event_id": message_id})
        return None
    source_path = metadata.get(_HEADER + "copy_from") or None
    if source_path and method == "PUT":
        method = "COPY"  # a server-side copy (COPY, or PUT + X-Copy-From) of source_path to this path
    if method not in methods or not container or (not obj and not container_events):
        return None
    destination = metadata.get(_HEADER + "destination")
    if method == "COPY" and not source_path:
        # A COPY seen before Swift's copy middleware names its source in the path and the object it
        # creates in the Destination header.
        dest = destination.strip("/").split("/", 2) if isinstance(destination, str) else []
        if len(dest) < 3 or not all(dest):  # <account>/<container>/<object>
            log.info("swift COPY without a destination in the notification; no event", extra={"event_id": message_id})
            return None
        source_path = f"{container}/{obj}"
        path = "v1/" + "/".join(dest)
        container, obj = dest[1], dest[2]

    # path = "v1/AUTH_test/photos/cat.jpg"; the account keeps its reseller prefix there.
    parts = path.split("/", 3)
    account = parts[1] if len(parts) > 1 else str(target.get("id") or "")
    initiator = payload.get("initiator") if isinstance(payload.get("initiator"), dict) else {}
    # The event belongs to the account's project (AUTH_<project id> under Keystone), not to whoever
    # wrote into it (an ACL can let another project's user upload): only the owner's subscriptions
    # may see it. An account without the prefix falls back to the requester's project.
    if account.startswith(_RESELLER_PREFIX):
        project_id = account[len(_RESELLER_PREFIX):]
    else:
        project_id = initiator.get("project_id") or account
    verb = method.lower()
    extensions: dict[str, Any] = {"projectid": project_id, "account": account, "container": container, "method": verb}
    data: dict[str, Any] = {
        "account": account, "container": container, "object": obj, "method": method, "path": path,
        "project_id": project_id, "user_id": initiator.get("id"), "notification_id": message_id,
        "event_time": payload.get("eventTime"),
    }
    if obj:
        extensions["object"] = obj
        extensions["partitionkey"] = f"{account}/{container}/{obj}"
        suffix = object_suffix(obj)
        if suffix:
            extensions["objectsuffix"] = suffix
        if "/" in obj:
            extensions["objectdir"] = obj.split("/", 1)[0]
        # The stored object's etag, type and size come from Headwater's proxy filter; without it
        # only request headers named in metadata_headers (ETag, Content-Type) can stand in.
        data["etag"] = (metadata.get(_HEADER + "etag") or metadata.get("http_header_etag") or "").strip('"') or None
        data["content_type"] = metadata.get(_HEADER + "content_type") or metadata.get("http_header_content_type")
        large = metadata.get(_HEADER + "large_object")
        if large in ("slo", "dlo"):
            # One event for the manifest: the object users see. Its size is the segments' sum, which
            # the manifest request does not tell.
            data["large_object"] = large
            data["size"] = None
        elif method == "PUT":
            data["size"] = _int(metadata.get(_HEADER + "size")) or _measure(payload, "storage.objects.incoming.bytes")
        elif method == "COPY":
            data["size"] = None  # the request had no body; the copy is as large as its source
        else:
            data["size"] = None
        if source_path:
            data["copy_from"] = source_path
        subject = f"{container}/{obj}"
        type_ = OBJECT_TYPE + verb
    else:
        extensions["partitionkey"] = f"{account}/{container}"
        subject = container
        type_ = CONTAINER_TYPE + verb
    if metadata.get("policy_name"):
        data["storage_policy"] = metadata["policy_name"]
    return Event(
        # The notification's message_id is fixed when the proxy sends it, so a redelivered
        # notification is the same event and runs once.
        id=message_id,
        source=f"/swift/{account}/{container}",
        type=type_,
        subject=subject,
        time=_parse_time(payload.get("eventTime")) or _parse_time(notification.get("timestamp")),
        data=data,
        extensions=extensions,
    )


def _amqp_url(url: str) -> str:
    # Swift's filter takes an oslo transport URL (rabbit://); aio-pika wants amqp://.
    return "amqp://" + url[len("rabbit://"):] if url.startswith("rabbit://") else url


def _check_filters(kind: str, params: dict[str, Any], extensions: tuple[str, ...]) -> None:
    filters = params.get("filters") or {}
    if not isinstance(filters, dict):
        return  # the API reports the shape itself
    for name, value in filters.items():
        if name not in extensions and name not in _CORE:
            raise SubscriptionInvalid(f"{kind} events have no attribute {name!r}; filter on one of: {', '.join(extensions)}.")
    suffix = filters.get("objectsuffix")
    if isinstance(suffix, str) and (suffix.startswith(".") or suffix.startswith("*") or suffix != suffix.lower()):
        raise SubscriptionInvalid(f"objectsuffix is the extension alone, lower-case, without '*.' (e.g. 'jpg', not {suffix!r}).")


class SwiftSource:
    """Consumes ceilometermiddleware's `objectstore.http.request` notifications from Headwater's own
    queue bound to the `swift` exchange, and publishes one event per object request.

    ceilometermiddleware reports `success` for every request the proxy answered, 401s and 404s
    included; Headwater's proxy filter (sources.swift_middleware) adds Swift's status, the stored
    object's etag, content type and size, so only requests Swift carried out become events."""

    kind: ClassVar[str] = KIND

    def __init__(self, config: Config):
        self.config = config
        section = config.swift
        self.methods = frozenset(m.upper() for m in section.methods)
        self.container_events = bool(section.container_events)
        self.require_status = bool(section.require_status)
        self._connection: Any = None
        self._ctx: SourceContext | None = None

    def validate_subscription(self, params: dict[str, Any], now: _dt.datetime) -> dict[str, Any]:
        for field in ("pattern", "first_execution_time", "count"):
            if params.get(field) is not None:
                raise SubscriptionInvalid(f"{field} is a cron option; swift subscriptions take types and filters.")
        _check_filters(KIND, params, EXTENSIONS)
        return {}

    async def start(self, ctx: SourceContext) -> None:
        try:
            import aio_pika
        except ImportError as exc:  # the rabbitmq extra
            raise RuntimeError("the swift source needs aio-pika: pip install 'headwater[rabbitmq]'") from exc
        self._ctx = ctx
        section = self.config.swift
        # connect_robust reconnects and re-declares the queue and its consumer after a broker restart.
        self._connection = await aio_pika.connect_robust(_amqp_url(section.transport_url))
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=section.prefetch)
        exchange = await channel.declare_exchange(section.exchange, aio_pika.ExchangeType.TOPIC,
                                                  durable=section.exchange_durable, auto_delete=False)
        # Durable, so notifications sent while Headwater is down wait for it.
        queue = await channel.declare_queue(section.queue, durable=True)
        await queue.bind(exchange, routing_key=section.routing_key)
        await queue.consume(self._on_message)
        log.info("swift source consuming", extra={"exchange": section.exchange, "routing_key": section.routing_key,
                                                  "queue": section.queue})

    async def stop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def _on_message(self, message: Any) -> None:
        try:
            await self.handle(message.body)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("swift notification not taken by the router; requeued")
            await asyncio.sleep(_REQUEUE_DELAY)
            await message.nack(requeue=True)
            return
        await message.ack()

    async def handle(self, body: bytes) -> Event | None:
        """Turn one AMQP body into an event and publish it; returns only once it is safe, so the
        caller may acknowledge the AMQP message. Malformed input is dead-lettered, not raised."""
        assert self._ctx is not None
        ctx = self._ctx
        try:
            notification = unwrap(body)
            event = to_event(notification, methods=self.methods, container_events=self.container_events,
                             require_status=self.require_status)
        except MalformedNotification as exc:
            await ctx.dead_letter(source=KIND, reason=f"malformed swift notification: {exc}", payload=_printable(body))
            return None
        if event is None:
            return None
        # On the memory bus, wait until the execution is recorded: the ack to RabbitMQ is the
        # last copy of the notification.
        await ctx.publish(event, settle=not ctx.durable)
        log.info("swift %s %s", event.type, event.subject, extra={"event_id": event.id})
        return event


def _printable(body: bytes | str) -> Any:
    if isinstance(body, bytes):
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return body.decode("utf-8", "replace")
    return body
