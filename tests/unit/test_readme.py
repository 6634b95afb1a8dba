"""The README's code is run, not just read: each block marked `<!-- readme-check: name -->` works as written."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from router.config import Config
from router.events import Event
from sinks.http import HttpCallbackSink

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(name: str) -> str:
    """The fenced block right after `<!-- readme-check: name -->`."""
    match = re.search(rf"<!-- readme-check: {re.escape(name)} -->\n```\w*\n(.*?)\n```", README.read_text(), re.S)
    assert match, f"README has no block marked readme-check: {name}"
    return match.group(1)


async def test_the_readme_verification_snippet_accepts_real_callbacks_and_nothing_else(tmp_path):
    # Regression: the README said "HMAC-SHA256 in X-Headwater-Signature"; a receiver built from that
    # (HMAC of the body, no prefix) refused every callback. The documented snippet must accept them.
    namespace: dict = {}
    exec(compile(readme_block("http-callback-verify"), "README.md", "exec"), namespace)
    verify = namespace["verify_headwater_callback"]
    received = []

    async def receive(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = TestServer(app)
    await server.start_server()
    sink = HttpCallbackSink(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}}))
    secret = "s3cret-s3cret-s3cret"
    try:
        event = Event(id="r1", source="/headwater/executions/e1", type="org.openstack.headwater.execution.success",
                      data={"output": 42})
        await sink.send(event, {"url": str(server.make_url("/hook")), "secret": secret})
    finally:
        await sink.close()
        await server.close()
    (headers, body), = received
    assert verify(secret, headers, body)
    assert not verify("another-secret-value", headers, body)
    assert not verify(secret, headers, body.replace(b"42", b"43"))
    assert not verify(secret, {**headers, "X-Headwater-Timestamp": str(int(headers["X-Headwater-Timestamp"]) - 1)}, body)
    assert not verify(secret, {**headers, "X-Headwater-Timestamp": "1000"}, body)  # too old
    assert not verify(secret, {}, body)


# -- "OpenStack sources": each block is what the code reads or produces ------------------------


def test_the_openstack_configuration_block_loads(tmp_path):
    conf = tmp_path / "headwater.conf"
    conf.write_text(readme_block("openstack-conf"))
    config = Config.load([str(conf)], overrides={"DEFAULT": {"data_dir": str(tmp_path)}})
    assert {"swift", "zaqar", "aodh"} <= set(config.sources.enabled)
    assert config.zaqar.url == "http://zaqar.example:8888" and config.aodh.endpoint == "http://aodh.example:8042"
    from router import plugins
    for kind in ("swift", "zaqar", "aodh"):
        plugins.load("source", kind)(config)


def test_the_swift_proxy_lines_are_the_ones_the_harness_runs():
    from sources.swift_middleware import METADATA_HEADERS

    block = readme_block("swift-proxy")
    harness = (README.parent / "tests/integration/openstack/harness/openstack.sh").read_text()
    for line in block.splitlines():
        if line.startswith(("pipeline =", "[filter:headwater]", "paste.filter_factory = sources", "metadata_headers",
                            "driver", "topic", "control_exchange")):
            assert line in harness, line
    listed = next(line for line in block.splitlines() if line.startswith("metadata_headers"))
    assert tuple(h.strip() for h in listed.split("=", 1)[1].split(",")) == METADATA_HEADERS


def test_the_sample_events_are_what_the_sources_produce():
    import copy
    import json

    from sources.aodh import alarm_event
    from sources.swift import to_event
    from sources.zaqar import message_event
    from tests.unit.test_source_swift import ALL_METHODS, by_path_and_action

    notification = copy.deepcopy(by_path_and_action("v1/AUTH_test/demo/hello.txt", "put"))
    notification["payload"]["target"]["metadata"].update({
        "http_header_x_headwater_status": "201", "http_header_x_headwater_etag": "5a105e8b9d40e1329780d62ea2265d8a",
        "http_header_x_headwater_content_type": "text/plain", "http_header_x_headwater_size": "11"})
    swift = to_event(notification, methods=ALL_METHODS, container_events=False).to_dict()
    assert json.loads(readme_block("swift-event")) == swift

    zaqar = message_event(queue="orders", project_id="demo", message_id="6c3e1b0e-93a3-4f4b-a0b5-0f6b54d0d9a1",
                          body={"order": 42}, age=2).to_dict()
    shown = json.loads(readme_block("zaqar-event"))
    assert {k: v for k, v in shown.items() if k != "time"} == {k: v for k, v in zaqar.items() if k != "time"}

    post = json.loads((README.parent / "tests/unit/fixtures/sample-aodh-post-full-chain.jsonl").read_text().splitlines()[0])
    body = json.loads(post["body"]) if isinstance(post["body"], str) else post["body"]
    aodh = alarm_event(body, project_id="demo", request_id=post["headers"].get("x-openstack-request-id")).to_dict()
    shown = json.loads(readme_block("aodh-event"))
    assert {k: v for k, v in shown.items() if k != "data"} == {k: v for k, v in aodh.items() if k != "data"}
    assert shown["data"].keys() == aodh["data"].keys()
    assert {k: shown["data"][k] for k in ("alarm_name", "alarm_id", "severity", "previous", "current")} == \
        {k: aodh["data"][k] for k in ("alarm_name", "alarm_id", "severity", "previous", "current")}


async def test_the_subscription_examples_are_accepted(make_headwater):
    import json

    from tests.unit.test_router_flow import make_function

    hw = await make_headwater("null")
    function_id = await make_function(hw)
    for name in ("swift-subscription", "zaqar-subscription"):
        body = json.loads(readme_block(name).replace("FUNCTION_ID", function_id))
        resp = await hw.client.post("/v1/subscriptions", json=body)
        assert resp.status == 201, (name, await resp.text())
    zaqar = await resp.json()
    assert zaqar["batch"] == {"size": 10, "window": 5.0} and zaqar["filters"] == {"queue": "orders"}
