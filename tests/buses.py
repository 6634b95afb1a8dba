"""Bus settings for tests that run a whole Headwater on each bus backend: a corner of the broker
of their own, and how to clean it up."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from tests.services import NATS_URL, RABBITMQ_URL, require_service

BUSES = ["sqlite", "memory", "rabbitmq", "nats"]


def bus_settings(backend: str) -> tuple[dict[str, str], Callable[[object], Awaitable[None]] | None]:
    """([bus] overrides, cleanup(bus) or None) for `backend`; skips (or fails under
    HEADWATER_REQUIRE_SERVICES=1) when its broker is absent."""
    from tests.contract.test_bus_contract import _cleanup_nats, _cleanup_rabbitmq

    run = uuid.uuid4().hex[:8]
    if backend == "rabbitmq":
        require_service("RabbitMQ", "127.0.0.1", 5672)
        return {"backend": backend, "url": f"{RABBITMQ_URL}?prefix=hwbus-{run}"}, _cleanup_rabbitmq
    if backend == "nats":
        require_service("NATS", "127.0.0.1", 4222)
        return {"backend": backend, "url": f"{NATS_URL}?stream=HWBUS_{run}&subject_prefix=hwbus{run}"}, _cleanup_nats
    return {"backend": backend}, None
