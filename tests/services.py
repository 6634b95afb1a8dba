"""Find the external servers tests need; skip with a reason when one is absent, or fail when
HEADWATER_REQUIRE_SERVICES=1 (CI sets it, so CI never passes by skipping)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

REQUIRE = os.environ.get("HEADWATER_REQUIRE_SERVICES", "").lower() in ("1", "true", "yes")

POSTGRES_URL = os.environ.get("HEADWATER_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
RABBITMQ_URL = os.environ.get("HEADWATER_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("HEADWATER_TEST_NATS", "nats://127.0.0.1:4222")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_program(name: str, hint: str) -> str:
    """The path of program `name`; skip (or, under HEADWATER_REQUIRE_SERVICES=1, fail) when it is
    not on PATH, saying how to install it."""
    path = shutil.which(name)
    if path:
        return path
    message = f"`{name}` is not installed ({hint})"
    if REQUIRE:
        pytest.fail(f"{message} and HEADWATER_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(f"{message}; .ci/services.sh installs it")


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, under HEADWATER_REQUIRE_SERVICES=1, fail) unless host:port accepts connections."""
    if port_open(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if REQUIRE:
        pytest.fail(f"{message} and HEADWATER_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(f"{message} (start it, or see .ci/run)")
