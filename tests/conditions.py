"""Waiting on conditions, not on the clock: poll until a probe holds (the deadline only turns a
hang into a clear failure; it is never what the test checks)."""

from __future__ import annotations

import asyncio
import inspect
import time


async def eventually(probe, timeout: float = 60.0, interval: float = 0.02):
    """Await probe() (sync or async) until it returns something truthy; return that value, or raise
    TimeoutError naming the probe."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{getattr(probe, '__name__', probe)} never became true within {timeout:g}s")
        await asyncio.sleep(interval)


def wait_until(probe, timeout: float = 60.0, interval: float = 0.1):
    """eventually() for synchronous tests: call probe() until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{getattr(probe, '__name__', probe)} never became true within {timeout:g}s")
        time.sleep(interval)
    return value


def counter_total(counter) -> float:
    """A prometheus_client counter's value summed over its labels."""
    return sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))
