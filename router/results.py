"""Result delivery: after an execution finishes, its result becomes a CloudEvent and goes to the
subscription's sinks — back onto the bus as a new event (chaining functions, with a depth limit
against loops) or to a sink plugin (http callback, zaqar, …)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from router import plugins
from router.bus import Bus
from router.config import Config
from router.events import Event, derived_id, utcnow
from router.index import SOURCE_KIND_EXTENSION

log = logging.getLogger(__name__)

RESULT_SOURCE_KIND = "result"
RESULT_TYPE_PREFIX = "org.openstack.headwater.execution."
CHAIN_DEPTH_EXTENSION = "chaindepth"
CHAIN_SINK = "event"  # the sink kind that puts the result back on the bus


class SinkSpecError(ValueError):
    """A sinks list that cannot be used; the message names the fault (the API answers 400)."""


class ChainTooDeep(RuntimeError):
    """A result would start a chain longer than the limit: a loop, most likely. Not retried."""


def chain_depth(event: Event | None) -> int:
    try:
        return int((event.extensions.get(CHAIN_DEPTH_EXTENSION) if event else 0) or 0)
    except (TypeError, ValueError):
        return 0


def result_event(*, execution_id: str, subscription_id: str, project_id: str, function_id: str | None,
                 status: str, output: Any, duration: float, trigger: Event | None) -> Event:
    """The result of one execution as an event: id derived from the execution (a re-sent result is
    the same event), depth one more than the event that caused it."""
    return Event(
        id=derived_id("result", execution_id),
        source=f"/headwater/executions/{execution_id}",
        type=RESULT_TYPE_PREFIX + status,
        subject=subscription_id,
        time=utcnow(),
        data={"execution_id": execution_id, "subscription_id": subscription_id, "function_id": function_id,
              "status": status, "output": output, "duration": duration,
              "event_id": trigger.id if trigger else None},
        extensions={"projectid": project_id, CHAIN_DEPTH_EXTENSION: chain_depth(trigger) + 1},
    )


class ResultSinks:
    def __init__(self, config: Config, bus: Bus, *, credentials: plugins.Credentials | None = None,
                 subscription: Callable[[str], plugins.Subscription | None] | None = None):
        self.config = config
        self.bus = bus
        # Given to sinks that call OpenStack services as the subscription's creator (use_credentials).
        self.credentials = credentials
        self.subscription = subscription or (lambda _id: None)
        self.max_depth = config.events.max_chain_depth
        self._sinks: dict[str, plugins.Sink] = {}

    def _sink(self, kind: str) -> plugins.Sink:
        sink = self._sinks.get(kind)
        if sink is None:
            try:
                sink = self._sinks[kind] = plugins.load("sink", kind)(self.config)
            except plugins.PluginNotFound as exc:
                raise SinkSpecError(f"sinks: {exc}") from None
            if self.credentials is not None and hasattr(sink, "use_credentials"):
                sink.use_credentials(self.credentials, self.subscription)
        return sink

    def validate(self, specs: Any) -> list[dict[str, Any]]:
        """`[{"kind": "event"}, {"kind": "http", "url": …, "secret": …}, {"kind": "zaqar", "queue": …}]`."""
        if specs is None:
            return []
        if not isinstance(specs, list):
            raise SinkSpecError("sinks must be a list of objects with a kind")
        out = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
                raise SinkSpecError(f"sinks[{i}] must be an object with a kind")
            kind = spec["kind"]
            target = {k: v for k, v in spec.items() if k != "kind"}
            if kind == CHAIN_SINK:
                if target:
                    raise SinkSpecError(f"sinks[{i}]: the event sink takes no options")
                out.append({"kind": kind})
                continue
            try:
                out.append({"kind": kind, **self._sink(kind).validate_target(target)})
            except SinkSpecError as exc:
                raise SinkSpecError(f"sinks[{i}]: {exc}".replace("sinks: ", "")) from None
            except ValueError as exc:
                raise SinkSpecError(f"sinks[{i}] ({kind}): {exc}") from None
        return out

    async def deliver(self, event: Event, specs: list[dict[str, Any]]) -> None:
        """Send a result event to every sink; raises on the first failure (the caller's delivery
        policy decides about retries), ChainTooDeep when the chain is too long."""
        if not specs:
            return
        depth = chain_depth(event)
        for spec in specs:
            kind = spec["kind"]
            if kind == CHAIN_SINK:
                if depth > self.max_depth:
                    raise ChainTooDeep(f"result chain depth {depth} exceeds [events] max_chain_depth = {self.max_depth}")
                chained = Event.from_dict(event.to_dict())
                chained.extensions[SOURCE_KIND_EXTENSION] = RESULT_SOURCE_KIND
                await self.bus.publish(chained)
            else:
                await self._sink(kind).send(event, {k: v for k, v in spec.items() if k != "kind"})
        log.info("result delivered", extra={"event_id": event.id, "sinks": [s["kind"] for s in specs]})

    async def close(self) -> None:
        for sink in self._sinks.values():
            close = getattr(sink, "close", None)
            if close is not None:
                await close()
