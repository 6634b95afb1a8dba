"""Delivery policy per subscription: attempts, backoff with cap and jitter, event age, dead letters."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import random
import re
from collections.abc import Mapping
from typing import Any

import orjson

from router.batching import ITEM_FAILED
from router.bus import Bus
from router.config import Config, ConfigError
from router.events import Event, derived_id, execution_id_for, utcnow
from router.metrics import Metrics
from router.plugins import ExecutionResult, Subscription
from router.store import Conflict, Store

log = logging.getLogger(__name__)

# Retries travel on their own topic, so a retry reaches only the subscription that failed instead of
# being matched again against every subscription.
RETRY_TOPIC = "events.retry"

# Extension attributes a retry copy of an event carries (CloudEvents names: lower-case alphanumeric).
RETRY_SUBSCRIPTION_EXT = "hwretrysub"
RETRY_ATTEMPT_EXT = "hwattempt"
RETRY_LAST_STATUS_EXT = "hwlaststatus"
_RETRY_EXTENSIONS = (RETRY_SUBSCRIPTION_EXT, RETRY_ATTEMPT_EXT, RETRY_LAST_STATUS_EXT)

# Outcomes a policy can retry: a platform `error`, a function `timeout`, and any other function `failed`.
RETRYABLE = ("error", "timeout", "failed")
_FIELDS = ("max_attempts", "backoff_initial", "backoff_multiplier", "backoff_max", "jitter", "max_age",
           "retry_on", "dead_letter_topic")
MAX_ATTEMPTS_LIMIT = 100
_TOPIC = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How hard Headwater tries to run one (event, subscription).

    Attempt n+1 waits min(backoff_max, backoff_initial * backoff_multiplier**(n-1)) seconds, less a
    random share of up to `jitter` of it (so retries of many events spread out, never past the cap).
    An event older than `max_age` seconds (by its `time`) is not run again but dead-lettered."""

    max_attempts: int = 3
    backoff_initial: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max: float = 60.0
    jitter: float = 0.2
    max_age: float | None = None
    retry_on: frozenset[str] = frozenset(RETRYABLE)
    dead_letter_topic: str | None = None

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after attempt number `attempt` (1-based) failed."""
        base = min(self.backoff_max, self.backoff_initial * self.backoff_multiplier ** max(attempt - 1, 0))
        return base * (1.0 - self.jitter * (rng or random).random())

    def retries(self, result: ExecutionResult) -> bool:
        """Whether this outcome is worth another attempt under the policy."""
        if result.status == "success":
            return False
        if result.reason in ("replaced", "cancelled"):
            # Stopped on purpose (a newer cron tick replaced the run, overlap=replace), not a
            # failure: another attempt would undo the replacement, whatever retry_on says.
            return False
        if result.reason == "build_failed":
            return False  # the same package fails the same way until a new one is uploaded
        if result.reason == ITEM_FAILED:
            return True  # the function itself named this event of its batch as failed: it asks for a retry
        if result.reason == "timeout":
            return "timeout" in self.retry_on or "failed" in self.retry_on
        return result.status in self.retry_on

    def expires_at(self, event: Event) -> _dt.datetime | None:
        if self.max_age is None or event.time is None:
            return None
        return event.time + _dt.timedelta(seconds=self.max_age)

    def expired(self, event: Event, now: _dt.datetime | None = None) -> bool:
        limit = self.expires_at(event)
        return limit is not None and (now or utcnow()) >= limit

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["retry_on"] = sorted(self.retry_on)
        return out


def _number(name: str, value: Any, *, integer: bool = False, minimum: float | None = None,
            maximum: float | None = None) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"delivery.{name} must be {'an integer' if integer else 'a number'}, not {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"delivery.{name} must be a finite number, not {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"delivery.{name} must be at least {minimum:g}, not {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"delivery.{name} must be at most {maximum:g}, not {value!r}")
    return value


def validate_delivery_policy(raw: Any) -> dict[str, Any]:
    """Check a subscription's options["delivery"] and return it normalised (only the given fields;
    the rest come from [delivery] in the configuration). Raises ValueError naming the fault."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"delivery must be an object, not {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValueError(f"delivery has unknown field(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    out: dict[str, Any] = {}
    if "max_attempts" in raw:
        out["max_attempts"] = _number("max_attempts", raw["max_attempts"], integer=True, minimum=1, maximum=MAX_ATTEMPTS_LIMIT)
    if "backoff_initial" in raw:
        out["backoff_initial"] = float(_number("backoff_initial", raw["backoff_initial"], minimum=0, maximum=86400))
    if "backoff_multiplier" in raw:
        out["backoff_multiplier"] = float(_number("backoff_multiplier", raw["backoff_multiplier"], minimum=1, maximum=100))
    if "backoff_max" in raw:
        out["backoff_max"] = float(_number("backoff_max", raw["backoff_max"], minimum=0, maximum=86400))
    if "jitter" in raw:
        out["jitter"] = float(_number("jitter", raw["jitter"], minimum=0, maximum=1))
    if "max_age" in raw:
        out["max_age"] = None if raw["max_age"] is None else float(_number("max_age", raw["max_age"], minimum=0.001))
    if "retry_on" in raw:
        value = raw["retry_on"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"delivery.retry_on must be a list of outcomes ({', '.join(RETRYABLE)}), not {raw['retry_on']!r}")
        bad = sorted(set(value) - set(RETRYABLE))
        if bad:
            raise ValueError(f"delivery.retry_on has unknown outcome(s) {', '.join(bad)}; known: {', '.join(RETRYABLE)}")
        out["retry_on"] = sorted(set(value))
    if "dead_letter_topic" in raw:
        topic = raw["dead_letter_topic"]
        if topic is not None and not (isinstance(topic, str) and _TOPIC.match(topic) and len(topic) <= 200):
            raise ValueError(f"delivery.dead_letter_topic must be a topic name (letters, digits, _ - separated by dots), not {topic!r}")
        if topic in ("events", RETRY_TOPIC):
            raise ValueError(f"delivery.dead_letter_topic cannot be the router's own topic {topic!r}")
        out["dead_letter_topic"] = topic
    initial = out.get("backoff_initial")
    cap = out.get("backoff_max")
    if initial is not None and cap is not None and cap < initial:
        raise ValueError(f"delivery.backoff_max ({cap:g}) must not be below delivery.backoff_initial ({initial:g})")
    return out


def default_policy(config: Config) -> DeliveryPolicy:
    """The policy of subscriptions that set none: [delivery] in the configuration."""
    d = config.delivery
    bad = sorted(set(d.retry_on) - set(RETRYABLE))
    if bad:
        raise ConfigError(f"[delivery] retry_on has unknown outcome(s) {', '.join(bad)}; known: {', '.join(RETRYABLE)}")
    return DeliveryPolicy(max_attempts=d.max_attempts, backoff_initial=d.backoff_initial,
                          backoff_multiplier=d.backoff_multiplier, backoff_max=max(d.backoff_max, d.backoff_initial),
                          jitter=d.jitter, max_age=d.max_event_age or None, retry_on=frozenset(d.retry_on),
                          dead_letter_topic=d.dead_letter_topic)


def cap_payload(payload: Any, limit: int) -> tuple[Any, str | None]:
    """A dead letter's payload as kept: whole when its JSON is at most `limit` bytes, else a marked
    cut (`{"truncated": true, "size": n, "head": first bytes as text}`) and a note for the reason.
    A junk notification of megabytes must not become a row (and a list response) of megabytes."""
    try:
        encoded = orjson.dumps(payload, default=str)
    except TypeError:
        encoded = repr(payload).encode()
    if len(encoded) <= limit:
        return payload, None
    head = encoded[:limit].decode("utf-8", "ignore")
    note = f"payload of {len(encoded)} bytes truncated to {limit} ([delivery] dead_letter_payload_max)"
    return {"truncated": True, "size": len(encoded), "head": head}, note


def retry_copy(event: Event, subscription_id: str, attempt: int, last_status: str | None) -> Event:
    """The event as it travels to its next attempt (or to a limited subscription's parking
    topic): same id (same execution record), marked for one subscription and numbered."""
    extensions = {**event.extensions, RETRY_SUBSCRIPTION_EXT: subscription_id, RETRY_ATTEMPT_EXT: attempt}
    if last_status is not None:
        extensions[RETRY_LAST_STATUS_EXT] = last_status
    return dataclasses.replace(event, extensions=extensions)


def retry_marks(event: Event) -> tuple[str | None, int, str | None]:
    """(subscription id, attempt number, last status) of a retry copy, and strips the marks off."""
    sub_id = event.extensions.pop(RETRY_SUBSCRIPTION_EXT, None)
    try:
        attempt = int(event.extensions.pop(RETRY_ATTEMPT_EXT, 1))
    except (TypeError, ValueError):
        attempt = 1
    last_status = event.extensions.pop(RETRY_LAST_STATUS_EXT, None)
    return sub_id, attempt, last_status


def clean(event: Event) -> dict[str, Any]:
    """The event as a dead letter keeps it: without Headwater's retry marks."""
    doc = event.to_dict()
    for name in _RETRY_EXTENSIONS:
        doc.pop(name, None)
    return doc


class DeliveryService:
    """Applies the policies: schedules retries on the bus and writes dead letters."""

    def __init__(self, config: Config, store: Store, metrics: Metrics, bus: Bus | None = None):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.bus = bus
        self.default = default_policy(config)
        # subscription id → (the options dict it was built from, policy): views are immutable and
        # replaced on reload, so identity of the options dict tells whether the policy is current.
        self._policies: dict[str, tuple[dict, DeliveryPolicy]] = {}
        self.rng = random.Random()
        self.payload_max = getattr(getattr(config, "delivery", None), "dead_letter_payload_max", 65536)

    def policy(self, sub: Subscription) -> DeliveryPolicy:
        cached = self._policies.get(sub.id)
        if cached is not None and cached[0] is sub.options:
            return cached[1]
        raw = sub.options.get("delivery") if sub.options else None
        policy = self.default
        if raw:
            try:
                fields = validate_delivery_policy(raw)
            except ValueError as exc:
                # Validated on create; a row edited behind the API's back keeps the defaults.
                log.warning("invalid delivery policy; using the defaults", extra={"subscription_id": sub.id, "reason": str(exc)})
                fields = {}
            if "retry_on" in fields:
                fields["retry_on"] = frozenset(fields["retry_on"])
            policy = dataclasses.replace(self.default, **fields)
            if policy.backoff_max < policy.backoff_initial:
                policy = dataclasses.replace(policy, backoff_max=policy.backoff_initial)
        self._policies[sub.id] = (sub.options, policy)
        return policy

    async def schedule_retry(self, event: Event, sub: Subscription, next_attempt: int, delay: float, last_status: str) -> None:
        """Put the event back on the bus for attempt `next_attempt`, visible after `delay` seconds.
        Returns once the bus holds it: the caller may then let go of the current delivery."""
        if self.bus is None:
            raise RuntimeError("the delivery service has no bus to schedule retries on")
        copy = retry_copy(event, sub.id, next_attempt, last_status)
        key = f"{execution_id_for(event.source, event.id, sub.id)}/{next_attempt}"  # an event is its source + id
        await self.bus.publish(copy, topic=RETRY_TOPIC, delay=delay, key=key)
        log.info("retry scheduled", extra={"event_id": event.id, "subscription_id": sub.id, "attempt": next_attempt,
                                           "delay": round(delay, 3), "reason": last_status})

    async def dead_letter(self, event: Event, sub: Subscription, reason: str, *, policy: DeliveryPolicy | None = None) -> bool:
        """Record a dead letter for (event, subscription) once, however often it is redelivered, and
        publish it to the policy's dead-letter topic. Returns False if it was recorded already."""
        payload = clean(event)
        created = await self.record_dead_letter(
            letter_id=derived_id("dead-letter", event.id, sub.id), source=sub.source, reason=reason, payload=payload,
            event_id=event.id, subscription_id=sub.id, project_id=sub.project_id)
        topic = (policy or self.policy(sub)).dead_letter_topic
        if topic and self.bus is not None:
            letter = Event.from_dict(payload)
            letter.extensions["deadletterreason"] = reason[:1000]
            letter.extensions["deadlettersub"] = sub.id
            # Published on every redelivery too (a consumer of the topic sees at-least-once, by id).
            await self.bus.publish(letter, topic=topic, key=f"{event.id}/{sub.id}")
        return created

    async def record_dead_letter(self, *, source: str, reason: str, payload: Any, event_id: str | None,
                                 project_id: str, subscription_id: str | None = None,
                                 letter_id: str | None = None) -> bool:
        """Write one dead-letter record, counted and logged. With `letter_id` (derived from what
        failed) a second try records nothing and returns False: redeliveries do not multiply it."""
        payload, note = cap_payload(payload, self.payload_max)
        if note:
            reason = f"{reason[:3800]} [{note}]"
        try:
            await self.store.dead_letters.add(**({"id": letter_id} if letter_id else {}), source=source,
                                              reason=reason[:4000], event_id=event_id, subscription_id=subscription_id,
                                              payload=payload, project_id=project_id)
        except Conflict:
            if letter_id is None:
                raise
            return False
        self.metrics.dead_letters.labels(source).inc()
        log.warning("dead letter recorded", extra={"event_id": event_id, "subscription_id": subscription_id,
                                            "source": source, "reason": reason})
        return True
