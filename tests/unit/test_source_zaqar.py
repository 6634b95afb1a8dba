"""The Zaqar source without a Zaqar: claim → publish → delete order, dead letters, and the push receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.config import Config
from router.plugins import Subscription
from sources.zaqar import PUSH_PATH, ZaqarClient, ZaqarSource, message_event
from tests.unit.test_source_swift import FakeContext

FIXTURES = Path(__file__).parent / "fixtures"


class FakeZaqar:
    """The slice of the Zaqar v2 API the source and sink use, answering as the real one does
    (claims: 201 + Location, 204 when empty; delete needs the claim id: 403 without it)."""

    def __init__(self, log: list[str] | None = None):
        self.messages: dict[str, dict[str, Any]] = {}  # id → {"body", "ttl", "queue", "claim", "project"?}
        # Keystone: token → its project; a token not here is refused 401, as by keystonemiddleware.
        self.tokens: dict[str, str] = {}
        self.headers: list[dict[str, str]] = []
        self.log = log if log is not None else []
        app = web.Application()
        app.router.add_post("/v2/queues/{q}/claims", self.claim)
        app.router.add_delete("/v2/queues/{q}/claims/{cid}", self.release)
        app.router.add_patch("/v2/queues/{q}/claims/{cid}", self.renew)
        self.renewals: list[tuple[str, dict]] = []
        app.router.add_delete("/v2/queues/{q}/messages/{mid}", self.delete)
        app.router.add_post("/v2/queues/{q}/messages", self.post)
        self.server = TestServer(app)

    async def __aenter__(self) -> FakeZaqar:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.close()

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def add(self, queue: str, body: Any, **extra) -> str:
        mid = str(uuid.uuid4())
        self.messages[mid] = {"body": body, "ttl": 300, "queue": queue, "claim": None, **extra}
        return mid

    def project(self, request: web.Request) -> str | None:
        token = request.headers.get("X-Auth-Token")
        if token is None:
            return request.headers.get("X-Project-ID")
        if token not in self.tokens:
            raise web.HTTPUnauthorized()
        return self.tokens[token]

    async def claim(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        project = self.project(request)
        body = await request.json()
        assert 60 <= body["ttl"] <= 43200 and 60 <= body["grace"] <= 43200
        queue, limit = request.match_info["q"], int(request.query.get("limit", 10))
        # A queue is its project's: another project's queue of the same name is another queue.
        free = [(mid, m) for mid, m in self.messages.items()
                if m["queue"] == queue and m["claim"] is None and m.get("project", project) == project][:limit]
        if not free:
            return web.Response(status=204)
        cid = str(uuid.uuid4())
        out = []
        for mid, m in free:
            m["claim"] = cid
            doc = {"id": mid, "href": f"/v2/queues/{queue}/messages/{mid}?claim_id={cid}", "ttl": m["ttl"], "age": 3}
            if "nobody" not in m:
                doc["body"] = m["body"]
            out.append(doc)
        self.log.append(f"claim {cid}")
        return web.json_response({"messages": out}, status=201, headers={"Location": f"/v2/queues/{queue}/claims/{cid}"})

    async def renew(self, request: web.Request) -> web.Response:
        self.renewals.append((request.match_info["cid"], await request.json()))
        return web.Response(status=204)

    async def release(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        for m in self.messages.values():
            if m["claim"] == cid:
                m["claim"] = None
        self.log.append(f"release {cid}")
        return web.Response(status=204)

    async def delete(self, request: web.Request) -> web.Response:
        mid = request.match_info["mid"]
        m = self.messages.get(mid)
        if m is None:
            return web.Response(status=204)
        if m["claim"] is not None and request.query.get("claim_id") != m["claim"]:
            return web.json_response({"title": "This message is claimed"}, status=403)
        del self.messages[mid]
        self.log.append(f"delete {mid}")
        return web.Response(status=204)

    async def post(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        project = self.project(request) if "X-Auth-Token" in request.headers else None
        owner = {"project": project} if project else {}
        body = await request.json()
        ids = [self.add(request.match_info["q"], m["body"], ttl=m.get("ttl", 3600), **owner) for m in body["messages"]]
        return web.json_response({"resources": [f"/v2/queues/{request.match_info['q']}/messages/{i}" for i in ids]}, status=201)


def on_queue(queue: str, sub_id: str = "s-jobs", **fields) -> Subscription:
    return Subscription(id=sub_id, project_id="demo", source="zaqar", filters={"queue": queue}, **fields)


JOBS = [on_queue("jobs")]


def zaqar_config(tmp_path, url: str, **zaqar) -> Config:
    return Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)},
                                  "zaqar": {"url": url, "queues": "jobs", "poll_interval": "0.05", "project_id": "demo", **zaqar}})


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.01)


async def test_claimed_message_is_published_then_deleted_with_its_claim_id(tmp_path):
    order: list[str] = []
    async with FakeZaqar(order) as zaqar:
        mid = zaqar.add("jobs", {"image": "cat.jpg"})
        config = zaqar_config(tmp_path, zaqar.url)
        ctx = FakeContext(config, subscriptions=JOBS)
        ctx.log = order
        source = ZaqarSource(config)
        await source.start(ctx)
        try:
            await wait_for(lambda: not zaqar.messages)
        finally:
            await source.stop()
    (event, settle), = ctx.published
    assert event.id == mid and event.data == {"image": "cat.jpg"} and settle is True  # memory bus: settle first
    assert event.type == "org.openstack.zaqar.message" and event.source == "/zaqar/demo/queues/jobs"
    assert event.extensions["queue"] == "jobs" and event.project_id == "demo" and event.extensions["messageage"] == 3
    assert order.index(f"publish {mid}") < order.index(f"delete {mid}")
    headers = zaqar.headers[0]
    assert headers["X-Project-ID"] == "demo" and uuid.UUID(headers["Client-ID"])


async def test_refused_publish_leaves_the_message_and_releases_the_claim(tmp_path):
    async with FakeZaqar() as zaqar:
        mid = zaqar.add("jobs", {"n": 1})
        config = zaqar_config(tmp_path, zaqar.url)
        ctx = FakeContext(config, fail=RuntimeError("router down"), subscriptions=JOBS)
        source = ZaqarSource(config)
        await source.start(ctx)
        try:
            await wait_for(lambda: any(line.startswith("release") for line in zaqar.log))
        finally:
            await source.stop()
        assert mid in zaqar.messages and not any(line.startswith("delete") for line in zaqar.log)


async def test_durable_bus_does_not_wait_for_settlement(tmp_path):
    async with FakeZaqar() as zaqar:
        zaqar.add("jobs", "plain text body")
        config = zaqar_config(tmp_path, zaqar.url)
        ctx = FakeContext(config, durable=True, subscriptions=JOBS)
        source = ZaqarSource(config)
        await source.start(ctx)
        try:
            await wait_for(lambda: not zaqar.messages)
        finally:
            await source.stop()
    (event, settle), = ctx.published
    assert settle is False and event.data == "plain text body"


async def test_malformed_messages_are_dead_lettered_deleted_and_consuming_goes_on(tmp_path):
    async with FakeZaqar() as zaqar:
        bad_ce = zaqar.add("jobs", {"specversion": "1.0", "type": "t"})  # no id/source: not a CloudEvent
        no_body = zaqar.add("jobs", None, nobody=True)
        good = zaqar.add("jobs", {"ok": True})
        config = zaqar_config(tmp_path, zaqar.url)
        ctx = FakeContext(config, subscriptions=JOBS)
        source = ZaqarSource(config)
        await source.start(ctx)
        try:
            await wait_for(lambda: not zaqar.messages)
        finally:
            await source.stop()
    assert [e.id for e, _ in ctx.published] == [good]
    reasons = {d["event_id"]: d["reason"] for d in ctx.dead}
    assert "claims to be a CloudEvent" in reasons[bad_ce] and "no body" in reasons[no_body]


async def run_source(tmp_path, zaqar: FakeZaqar, ctx_factory, until, **zaqar_options):
    """Start a source on the fake Zaqar, wait for `until()`, stop it; returns (source, ctx)."""
    config = zaqar_config(tmp_path, zaqar.url, **zaqar_options)
    ctx = ctx_factory(config)
    source = ZaqarSource(config)
    await source.start(ctx)
    try:
        await wait_for(lambda: until(source, ctx))
    finally:
        await source.stop()
    return source, ctx


async def test_queues_come_from_subscriptions_without_a_restart(tmp_path):
    async with FakeZaqar() as zaqar:
        config = zaqar_config(tmp_path, zaqar.url, queues="")
        ctx = FakeContext(config)
        source = ZaqarSource(config)
        await source.start(ctx)
        try:
            assert source.queues == []
            first = zaqar.add("orders", {"n": 1})
            ctx.put(on_queue("orders", "s-orders"))  # created through the API: consumed from now on
            assert source.queues == ["orders"]
            await wait_for(lambda: not zaqar.messages)
            assert [e.id for e, _ in ctx.published] == [first]
            ctx.put(on_queue("orders", "s-orders-2"))
            ctx.remove("s-orders")
            assert source.queues == ["orders"]  # one subscription still names it
            ctx.remove("s-orders-2")
            assert source.queues == []  # the last one gone: no longer consumed
            later = zaqar.add("orders", {"n": 2})
            claims = sum(line.startswith("claim") for line in zaqar.log)
            ctx.put(on_queue("other", "s-other"))
            other = zaqar.add("other", {"n": 3})
            await wait_for(lambda: other not in zaqar.messages)
            assert later in zaqar.messages and sum(line.startswith("claim") for line in zaqar.log) == claims + 1
        finally:
            await source.stop()


async def test_under_keystone_only_the_queues_projects_subscriptions_name_its_queues(tmp_path):
    # The queues are the source's project's ("demo"): a subscription of another project naming one
    # cannot receive its events (per-project routing), so it must not have them claimed either
    # (they would be dead-lettered as wanted by nobody).
    async with FakeZaqar() as zaqar:
        config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "auth": {"strategy": "keystone"},
                                        "keystone_authtoken": {"auth_url": "http://127.0.0.1:9/v3", "password": "unused"},
                                        "zaqar": {"url": zaqar.url, "queues": "", "poll_interval": "0.05", "project_id": "demo"}})
        ctx = FakeContext(config)
        source = ZaqarSource(config)
        await source.start(ctx)
        try:
            ctx.put(Subscription(id="s-intruder", project_id="other", source="zaqar", filters={"queue": "orders"}))
            assert source.queues == []
            ctx.put(on_queue("orders", "s-orders"))  # the queue owner's own subscription
            assert source.queues == ["orders"]
        finally:
            await source.stop()


async def test_under_keystone_each_projects_queue_is_claimed_with_its_subscriptions_trust(tmp_path):
    """Two projects name a queue "orders": each project's own queue is claimed with a token of its
    subscription's trust, and a message becomes an event of the queue's project only. A token
    Zaqar refuses (401) is replaced by a fresh one, and claiming goes on."""
    from tests.unit.test_source_swift import FakeCredentials

    async with FakeZaqar() as zaqar:
        zaqar.tokens = {"token-p1": "p1", "token-p2": "p2"}
        config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "auth": {"strategy": "keystone"},
                                        "keystone_authtoken": {"auth_url": "http://127.0.0.1:9/v3", "password": "unused"},
                                        "zaqar": {"url": zaqar.url, "queues": "", "poll_interval": "0.05"}})
        credentials = FakeCredentials({"s-p1": "expired-p1", "s-p2": "token-p2"}, renewed={"s-p1": "token-p1"})
        ctx = FakeContext(config, credentials=credentials)
        source = ZaqarSource(config)
        await source.start(ctx)
        try:
            ctx.put(Subscription(id="s-p1", project_id="p1", source="zaqar", filters={"queue": "orders"},
                                 options={"trust_id": "t1"}))
            ctx.put(Subscription(id="s-p2", project_id="p2", source="zaqar", filters={"queue": "orders"},
                                 options={"trust_id": "t2"}))
            ctx.put(Subscription(id="s-none", project_id="p3", source="zaqar", filters={"queue": "orders"}))
            assert source.consumed == [("p1", "orders"), ("p2", "orders")]  # p3 has no trust to claim with
            in_p2 = zaqar.add("orders", {"for": "p2"}, project="p2")
            await wait_for(lambda: ctx.published)
            ((event, _),) = ctx.published
            assert event.id == in_p2 and event.extensions["projectid"] == "p2"
            # p1's kept token is refused: the next claim asks for a fresh one.
            await wait_for(lambda: "s-p1" in credentials.fresh)
            in_p1 = zaqar.add("orders", {"for": "p1"}, project="p1")
            await wait_for(lambda: len(ctx.published) == 2)
            assert (ctx.published[1][0].id, ctx.published[1][0].extensions["projectid"]) == (in_p1, "p1")
            assert not zaqar.messages  # both deleted, each with its own project's token
        finally:
            await source.stop()


async def test_one_replica_polls_a_queue_and_another_takes_over_when_it_stops(tmp_path):
    """Two replicas with one coordination (as etcd would give them): only the leader claims; when it
    goes, its leadership goes with it and the other replica polls the queue."""
    from engine.coordination import MemoryCoordinator, MemoryState

    state = MemoryState()
    async with FakeZaqar() as zaqar:
        config = zaqar_config(tmp_path, zaqar.url)
        replicas = []
        for name in ("replica-a", "replica-b"):
            ctx = FakeContext(config, subscriptions=JOBS, coordination=MemoryCoordinator(name, state))
            source = ZaqarSource(config)
            await source.start(ctx)
            replicas.append((ctx, source))
        (ctx_a, a), (ctx_b, b) = replicas
        try:
            await wait_for(lambda: a.leading or b.leading)
            leader, (standby_ctx, standby) = (a, replicas[1]) if a.leading else (b, replicas[0])
            assert leader.leading == ["jobs"] and standby.leading == [] and standby.queues == ["jobs"]
            first = zaqar.add("jobs", {"n": 1})
            await wait_for(lambda: first not in zaqar.messages)
            assert [e.id for e, _ in standby_ctx.published] == []  # the standby claimed nothing
            await leader.stop()  # its claim loop ends and gives the queue up
            await wait_for(lambda: standby.leading == ["jobs"])
            second = zaqar.add("jobs", {"n": 2})
            await wait_for(lambda: second not in zaqar.messages)
            assert [e.id for e, _ in standby_ctx.published] == [second]
        finally:
            for _, source in replicas:
                await source.stop()


async def test_push_only_claims_nothing(tmp_path):
    async with FakeZaqar() as zaqar:
        config = zaqar_config(tmp_path, zaqar.url, claim="false")
        source = ZaqarSource(config)
        await source.start(FakeContext(config, subscriptions=JOBS))
        try:
            assert source.queues == []
        finally:
            await source.stop()


def test_the_allow_list_refuses_subscriptions_on_other_queues(tmp_path):
    # Regression: a subscription on a queue the source did not consume was accepted with a log line.
    import datetime as dt

    from router.plugins import SubscriptionInvalid

    now = dt.datetime.now(dt.timezone.utc)
    allowed = ZaqarSource(zaqar_config(tmp_path, "http://x", queues="jobs,orders"))
    assert allowed.validate_subscription({"filters": {"queue": "orders"}}, now) == {}
    with pytest.raises(SubscriptionInvalid, match=r"'billing' is not in \[zaqar\] queues"):
        allowed.validate_subscription({"filters": {"queue": "billing"}}, now)
    with pytest.raises(SubscriptionInvalid, match="not in"):
        allowed.validate_subscription({"filters": {"queue": {"in": ["jobs", "billing"]}}}, now)
    anything = ZaqarSource(zaqar_config(tmp_path, "http://x", queues=""))
    assert anything.validate_subscription({"filters": {"queue": "billing"}}, now) == {}
    with pytest.raises(SubscriptionInvalid, match="must be a Zaqar queue name"):
        anything.validate_subscription({"filters": {"queue": "no spaces"}}, now)


async def test_a_message_no_subscription_wants_is_dead_lettered_not_deleted_silently(tmp_path):
    # Regression: a message on a consumed queue that matched no subscription was claimed and deleted without a trace.
    async with FakeZaqar() as zaqar:
        wanted = zaqar.add("jobs", {"kind": "resize"})
        unwanted = zaqar.add("jobs", {"kind": "other"})
        sub = Subscription(id="s", project_id="demo", source="zaqar", filters={"queue": "jobs", "data.kind": "resize"})
        _, ctx = await run_source(tmp_path, zaqar, lambda c: FakeContext(c, subscriptions=[sub]), lambda s, c: not zaqar.messages)
    assert [e.id for e, _ in ctx.published] == [wanted]
    (letter,) = ctx.dead
    assert letter["event_id"] == unwanted and "matched no subscription" in letter["reason"]
    assert letter["payload"]["body"] == {"kind": "other"}


@contextlib.asynccontextmanager
async def holding_source(tmp_path, zaqar: FakeZaqar, **zaqar_options):
    """A source on the fake Zaqar whose publishes wait for `ctx.release`; yields (source, ctx)."""
    config = zaqar_config(tmp_path, zaqar.url, **zaqar_options)
    ctx = HoldingContext(config, subscriptions=JOBS)
    source = ZaqarSource(config)
    await source.start(ctx)
    try:
        yield source, ctx
    finally:
        await source.stop()


class HoldingContext(FakeContext):
    """Holds every publish until `release` is set (what a long function does on the memory bus)."""

    def __init__(self, config, **kw):
        super().__init__(config, **kw)
        self.holding = 0
        self.release = asyncio.Event()

    async def publish(self, event, *, expect=(), settle=False):
        self.holding += 1
        await self.release.wait()
        return await super().publish(event, expect=expect, settle=settle)


async def test_messages_of_one_queue_run_side_by_side(tmp_path):
    # Regression (#16's observation): five messages for a 2 s function ran one after another.
    async with FakeZaqar() as zaqar:
        ids = [zaqar.add("jobs", {"n": i}) for i in range(5)]
        async with holding_source(tmp_path, zaqar, claim_limit="2") as (source, ctx):
            # All five are being published at once (over three claims), none finished.
            await wait_for(lambda: ctx.holding == 5)
            assert zaqar.messages.keys() == set(ids)
            ctx.release.set()
            await wait_for(lambda: not zaqar.messages)
    assert sorted(e.id for e, _ in ctx.published) == sorted(ids)


async def test_in_flight_messages_are_bounded(tmp_path):
    async with FakeZaqar() as zaqar:
        for i in range(6):
            zaqar.add("jobs", {"n": i})
        async with holding_source(tmp_path, zaqar, max_in_flight="4") as (source, ctx):
            await wait_for(lambda: ctx.holding == 4)
            claims = sum(line.startswith("claim") for line in zaqar.log)
            free = [m for m in zaqar.messages.values() if m["claim"] is None]
            assert len(free) == 2  # not claimed while four run
            ctx.release.set()
            await wait_for(lambda: not zaqar.messages)
            assert sum(line.startswith("claim") for line in zaqar.log) > claims


async def test_the_claim_is_renewed_while_its_message_runs(tmp_path):
    async with FakeZaqar() as zaqar:
        zaqar.add("jobs", {"n": 1})
        config = zaqar_config(tmp_path, zaqar.url, claim_ttl="60", claim_grace="60")
        ctx = HoldingContext(config, subscriptions=JOBS)
        source = ZaqarSource(config)
        assert source.renew_interval == 20  # a third of the claim ttl
        source.renew_interval = 0.02
        await source.start(ctx)
        try:
            await wait_for(lambda: len(zaqar.renewals) >= 2)
            ctx.release.set()
            await wait_for(lambda: not zaqar.messages)
            renewed = len(zaqar.renewals)
        finally:
            await source.stop()
    (claim_id,) = {cid for cid, _ in zaqar.renewals}
    assert f"claim {claim_id}" in zaqar.log and zaqar.renewals[0][1] == {"ttl": 60, "grace": 60}
    assert len(zaqar.renewals) == renewed  # no renewal after the message was done


def test_cloudevent_body_keeps_its_attributes():
    body = {"specversion": "1.0", "id": "r-1", "source": "/headwater/executions/e", "type": "org.openstack.headwater.execution.success",
            "data": {"thumb": "t.jpg"}, "projectid": "p"}
    event = message_event(queue="results", project_id="demo", message_id="m-1", body=body)
    assert (event.id, event.type, event.data) == ("r-1", "org.openstack.headwater.execution.success", {"thumb": "t.jpg"})
    assert event.extensions["queue"] == "results" and event.project_id == "p"


async def test_push_receiver_takes_zaqar_notifications(tmp_path):
    config = zaqar_config(tmp_path, "http://127.0.0.1:1", queues="", push_token="s3cret")
    ctx = FakeContext(config, subscriptions=JOBS)
    source = ZaqarSource(config)
    await source.start(ctx)
    client = TestClient(TestServer(ctx.app()))
    await client.start_server()
    try:
        captured = [json.loads(line) for line in (FIXTURES / "sample-zaqar-webhook-posts.jsonl").read_text().splitlines()]
        for post in captured:
            resp = await client.post(PUSH_PATH, data=post["body"], headers={"Content-Type": "application/json", "X-Headwater-Token": "s3cret"})
            assert resp.status == 202, await resp.text()
        assert [e.data for e, _ in ctx.published] == [{"event": "image.uploaded", "n": n} for n in range(3)]
        assert {e.extensions["queue"] for e, _ in ctx.published} == {"triggers"}

        assert (await client.post(PUSH_PATH, data=captured[0]["body"])).status == 401
        resp = await client.post(PUSH_PATH, json={"Message_Type": "Nonsense"}, headers={"X-Headwater-Token": "s3cret"})
        assert resp.status == 400 and "not a Zaqar notification" in ctx.dead[-1]["reason"]

        # a producer-given id in the body makes a repeated push the same event
        for _ in range(2):
            await client.post(PUSH_PATH, json={"Message_Type": "Notification", "queue_name": "q", "body": {"id": "k1"}},
                              headers={"X-Headwater-Token": "s3cret"})
        assert ctx.published[-1][0].id == ctx.published[-2][0].id
    finally:
        await client.close()
        await source.stop()


@pytest.mark.parametrize("push_token", [None, "s3cret"])
async def test_under_keystone_push_needs_the_token_and_cannot_choose_the_project(tmp_path, push_token):
    zaqar = {"url": "http://127.0.0.1:1", "queues": "", "project_id": "demo", **({"push_token": push_token} if push_token else {})}
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "auth": {"strategy": "keystone"},
                                    "keystone_authtoken": {"auth_url": "http://127.0.0.1:9/v3", "password": "unused"},
                                    "zaqar": zaqar})
    ctx = FakeContext(config, subscriptions=JOBS)
    source = ZaqarSource(config)
    await source.start(ctx)
    client = TestClient(TestServer(ctx.app()))
    await client.start_server()
    try:
        push = {"Message_Type": "Notification", "queue_name": "q", "body": {"n": 1}}
        resp = await client.post(PUSH_PATH + "?project_id=victim", json=push, headers={"X-Headwater-Token": push_token or "x"})
        if push_token is None:
            assert resp.status == 401 and "push_token" in (await resp.json())["error"]
            assert ctx.published == []
        else:
            assert resp.status == 202, await resp.text()
            assert [e.project_id for e, _ in ctx.published] == ["demo"]
    finally:
        await client.close()
        await source.stop()


def test_client_id_defaults_to_a_stable_uuid(tmp_path):
    config = zaqar_config(tmp_path, "http://x")
    assert ZaqarClient(config).client_id == ZaqarClient(config).client_id
    uuid.UUID(ZaqarClient(config).client_id)


@pytest.mark.parametrize("option, value", [("claim_ttl", "59"), ("claim_grace", "43201"), ("claim_limit", "21")])
def test_claim_options_are_held_to_zaqars_ranges(tmp_path, option, value):
    from router.config import ConfigError

    with pytest.raises(ConfigError, match=option):
        zaqar_config(tmp_path, "http://x", **{option: value})
