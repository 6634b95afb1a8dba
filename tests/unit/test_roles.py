"""`headwater serve --roles` / `[DEFAULT] roles`: a process runs only the parts it is given (api, router,
engine, sources), still answers its probes, and refuses a split that cannot work."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.app import Headwater
from router.cli import _parser, load_config
from router.config import Config, ConfigError


def _config(tmp_path, roles: str | None = None) -> Config:
    default = {"data_dir": str(tmp_path)}
    if roles is not None:
        default["roles"] = roles
    return Config.load(overrides={"DEFAULT": default, "sources": {"enabled": "http,cron"}})


@pytest.fixture
async def running(tmp_path):
    started: list[tuple[Headwater, TestClient]] = []

    async def start(roles: str | None) -> tuple[Headwater, TestClient]:
        app = Headwater(_config(tmp_path / str(len(started)), roles))
        await app.start()
        client = TestClient(TestServer(app.web))
        await client.start_server()
        started.append((app, client))
        return app, client

    yield start
    for app, client in reversed(started):
        await client.close()
        await app.stop()


def test_the_flag_overrides_the_option_and_the_default_is_everything(tmp_path):
    assert _config(tmp_path).default.roles == ["api", "router", "engine", "sources"]
    args = _parser().parse_args(["serve", "--data-dir", str(tmp_path), "--roles", "sources"])
    assert load_config(args).default.roles == ["sources"]


@pytest.mark.parametrize("roles,named", [
    ("api,cooking", "cooking"),        # a role that does not exist is named
    ("router", "needs engine"),       # executions run where they are dispatched
    ("api,sources", "needs engine"),  # a sync POST /v1/executions runs in the API's process
    ("", "(empty)"),
])
def test_a_split_that_cannot_work_stops_start_up_naming_the_role(tmp_path, roles, named):
    with pytest.raises(ConfigError, match=r"\[DEFAULT\] roles") as raised:
        _config(tmp_path, roles)
    assert named in str(raised.value)


async def test_everything_runs_by_default(running):
    app, client = await running(None)
    assert set(app.sources) == {"http", "cron"}
    assert app.dispatcher._consumer is not None and app.engine._reaper is not None
    assert (await client.get("/v1/functions")).status == 200


async def test_a_sources_only_process_starts_no_api_router_or_engine(running):
    app, client = await running("sources")
    assert set(app.sources) == {"cron"}  # webhooks and POST /v1/events are the API's
    assert app.dispatcher._consumer is None, "a sources-only process must not consume the bus"
    assert app.engine._reaper is None, "a sources-only process must not start the engine"
    # Its probes still answer, and say what it runs; the API does not.
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json())["roles"] == ["sources"]
    assert (await client.get("/metrics")).status == 200
    for path in ("/v1/functions", "/v1", "/dashboard/"):
        assert (await client.get(path)).status == 404, path
    assert (await client.post("/v1/events", json={})).status == 404


async def test_an_api_process_serves_but_neither_consumes_nor_polls(running):
    app, client = await running("api,engine")
    assert set(app.sources) == {"http"}
    assert app.dispatcher._consumer is None
    assert app.engine._reaper is not None  # sync executions run here
    assert (await client.get("/v1/functions")).status == 200
    assert (await (await client.get("/healthz")).json())["roles"] == ["api", "engine"]


async def test_a_router_process_consumes_without_serving_the_api(running):
    app, client = await running("router,engine")
    assert app.sources == {}
    assert app.dispatcher._consumer is not None and app.engine._reaper is not None
    assert (await client.get("/v1/functions")).status == 404
    assert (await client.get("/healthz")).status == 200
