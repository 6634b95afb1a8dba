"""Fixtures for the tests against real Zaqar, Swift + ceilometermiddleware and Aodh (see harness/openstack.sh)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer

from router.app import Headwater
from router.config import Config
from tests.services import REQUIRE, require_service

HARNESS = Path(__file__).parent / "harness" / "openstack.sh"
DIR = Path(os.environ.get("HEADWATER_OPENSTACK_DIR", "/var/tmp/headwater-openstack"))
PROJECT = "demo"

# Opt-in, because CI runs every test with HEADWATER_REQUIRE_SERVICES=1 and does not start these
# servers: "1" = the harness is already up; "up" = the tests install/start it and stop it after.
MODE = os.environ.get("HEADWATER_OPENSTACK", "").lower()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _harness_ports() -> dict[str, int]:
    """The ports of the harness run: from the environment (`eval "$(openstack.sh env)"`), else
    asked of the harness (a run already up), else free ones for the run these tests start."""
    names = ("HEADWATER_ZAQAR_PORT", "HEADWATER_SWIFT_PORT", "HEADWATER_AODH_PORT")
    if all(os.environ.get(n) for n in names):
        return {n: int(os.environ[n]) for n in names}
    if MODE == "up":
        return {n: free_port() for n in names}
    if MODE in ("1", "true", "yes"):
        out = subprocess.run(["bash", str(HARNESS), "env"], capture_output=True, text=True, timeout=30).stdout
        found = dict(word.split("=", 1) for word in out.split() if "=" in word)
        if all(n in found for n in names):
            return {n: int(found[n]) for n in names}
    return {n: 0 for n in names}  # not running: the fixture skips or fails before any test uses them


PORTS = _harness_ports()
ZAQAR_PORT, SWIFT_PORT, AODH_PORT = (PORTS[n] for n in ("HEADWATER_ZAQAR_PORT", "HEADWATER_SWIFT_PORT", "HEADWATER_AODH_PORT"))
# This run's aodh-listener topic (harness/openstack.sh names it after the Aodh port: runs share RabbitMQ).
AODH_EVENT_TOPIC = f"alarm.all.{AODH_PORT}"


async def aodh_listener_consumers() -> int:
    """Consumers on this run's aodh-listener queue (0 while it does not exist yet). A notification
    sent before the listener has its queue is dropped by RabbitMQ, and the harness waits only for
    aodh-api (a loaded machine starts the listener much later): tests wait for this first."""
    import aio_pika

    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    try:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(f"{AODH_EVENT_TOPIC}.sample", passive=True)
        except aio_pika.exceptions.ChannelClosed:  # not declared yet
            return 0
        return declared.declaration_result.consumer_count
    finally:
        await connection.close()
ZAQAR_URL = f"http://127.0.0.1:{ZAQAR_PORT}"
SWIFT_URL = f"http://127.0.0.1:{SWIFT_PORT}"
AODH_URL = f"http://127.0.0.1:{AODH_PORT}"


def _keystone_ports() -> dict[str, int]:
    """The ports of the harness's Keystone-auth servers (run when Keystone was given at `start`)."""
    names = ("HEADWATER_ZAQAR_KEYSTONE_PORT", "HEADWATER_SWIFT_KEYSTONE_PORT", "HEADWATER_AODH_KEYSTONE_PORT")
    if all(os.environ.get(n) for n in names):
        return {n: int(os.environ[n]) for n in names}
    if MODE == "up" and os.environ.get("HEADWATER_KEYSTONE_URL"):
        return {n: free_port() for n in names}
    if MODE in ("1", "true", "yes"):
        out = subprocess.run(["bash", str(HARNESS), "env"], capture_output=True, text=True, timeout=30).stdout
        found = dict(word.split("=", 1) for word in out.split() if "=" in word)
        if all(n in found for n in names):
            return {n: int(found[n]) for n in names}
    return {n: 0 for n in names}


KEYSTONE_PORTS = _keystone_ports()
ZAQAR_KS_URL, SWIFT_KS_URL, AODH_KS_URL = (f"http://127.0.0.1:{KEYSTONE_PORTS[n]}" for n in (
    "HEADWATER_ZAQAR_KEYSTONE_PORT", "HEADWATER_SWIFT_KEYSTONE_PORT", "HEADWATER_AODH_KEYSTONE_PORT"))


@pytest.fixture(scope="session")
def openstack() -> Any:
    if MODE not in ("1", "true", "yes", "up"):
        if REQUIRE:  # CI: a skipped integration test must not pass for a run of it
            pytest.fail("HEADWATER_REQUIRE_SERVICES=1 but HEADWATER_OPENSTACK is not set: start the services with "
                        "tests/integration/openstack/harness/openstack.sh up and set HEADWATER_OPENSTACK=1", pytrace=False)
        pytest.skip("real OpenStack services not requested: run `tests/integration/openstack/harness/openstack.sh up` "
                    "and set HEADWATER_OPENSTACK=1 (or HEADWATER_OPENSTACK=up to let the tests start them)")
    started = False
    env = {**os.environ, **{n: str(p) for n, p in {**PORTS, **KEYSTONE_PORTS}.items() if p}}
    if MODE == "up":
        # With a Keystone given (keystone.sh env), the harness runs its Keystone-auth servers too.
        # A run of its own (ports, Redis database, state directory); still take the machine's
        # harness lock around the whole test run, as the README says.
        env.setdefault("HEADWATER_OPENSTACK_RUN", tempfile.mkdtemp(prefix="headwater-openstack-run-"))
        subprocess.run(["bash", str(HARNESS), "up"], check=True, timeout=900, env=env)
        started = True
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_service("Zaqar", "127.0.0.1", ZAQAR_PORT)
    require_service("Swift proxy", "127.0.0.1", SWIFT_PORT)
    require_service("Aodh API", "127.0.0.1", AODH_PORT)
    yield DIR
    if started:
        subprocess.run(["bash", str(HARNESS), "stop"], check=False, timeout=60, env=env)


class Router:
    """A whole Headwater (null engine: the function's output is its input) on a real TCP port, so
    Aodh and Zaqar can reach it."""

    def __init__(self, data_dir: Path, overrides: dict[str, dict[str, Any]]):
        self.port = free_port()
        base = {"DEFAULT": {"data_dir": str(data_dir)}, "engine": {"backend": "null"},
                "api": {"host": "127.0.0.1", "port": str(self.port), "public_url": f"http://127.0.0.1:{self.port}"}}
        for section, options in overrides.items():
            base.setdefault(section, {}).update(options)
        self.config = Config.load(overrides=base)
        self.app = Headwater(self.config)
        self.client: TestClient | None = None

    async def start(self) -> Router:
        await self.app.start()
        self.client = TestClient(TestServer(self.app.web, host="127.0.0.1", port=self.port))
        await self.client.start_server()
        return self

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        await self.app.stop()

    async def make_function(self) -> str:
        resp = await self.client.post("/v1/runtimes", json={"image": "python3"})
        runtime_id = (await resp.json())["id"]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("main.py", "def main(**kw):\n    return kw\n")
        form = FormData()
        form.add_field("runtime_id", runtime_id)
        form.add_field("code", json.dumps({"source": "package"}))
        form.add_field("package", buf.getvalue(), filename="p.zip")
        resp = await self.client.post("/v1/functions", data=form)
        assert resp.status == 201, await resp.text()
        return (await resp.json())["id"]

    async def subscribe(self, source: str, function_id: str, **fields) -> dict:
        resp = await self.client.post("/v1/subscriptions", json={"source": source, "function_id": function_id, **fields})
        assert resp.status == 201, await resp.text()
        return await resp.json()

    async def executions(self, *, done: bool = True) -> list:
        rows = await self.app.store.executions.list()
        return [r for r in rows if r.status != "running"] if done else rows

    async def dead_letters(self) -> list:
        return await self.app.store.dead_letters.list()


@pytest.fixture
async def router(openstack, tmp_path):
    """Factory: `await router(sources, **section overrides)`; every router started is stopped."""
    started: list[Router] = []

    async def make(sources: list[str], **overrides: dict[str, Any]) -> Router:
        overrides.setdefault("sources", {})["enabled"] = ",".join(["http", *sources])
        r = await Router(tmp_path, overrides).start()
        started.append(r)
        return r

    yield make
    for r in reversed(started):
        try:
            await r.stop()
        except Exception:  # already stopped by the test
            pass


ZAQAR_HEADERS = {"Client-ID": "6d6a7a3e-9f0a-4d53-9c6c-0f4b2d8a1c11", "X-Project-ID": PROJECT, "Content-Type": "application/json"}


async def zaqar(method: str, path: str, **kw) -> tuple[int, Any]:
    """One call to the real Zaqar as a test producer/observer (its own Client-ID)."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{ZAQAR_URL}{path}", headers=ZAQAR_HEADERS, **kw) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
