"""The tenancy table: every API route, walked with real Keystone tokens. alice (member of P1) sees
and changes only P1's resources, bob's (P2) are 404 to her, carol (reader of P1) reads but cannot
write or invoke (403), the admin sees both projects with all_projects, and without a token the
answer is 401. The table must name every route of the app: a new route without a row fails."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.conditions import eventually
from tests.e2e.server import make_zip
from tests.integration.keystone.conftest import keystone_sections

pytestmark = pytest.mark.slow

PACKAGE = make_zip({"main.py": "def main(**kw):\n    return kw\n"})


class Tenant:
    """Makes resources in one project through the API, as that project's member."""

    def __init__(self, client, token: str, runtime_id: str, project_id: str):
        self.client, self.token, self.runtime_id, self.project_id = client, token, runtime_id, project_id

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Auth-Token": self.token}

    async def post(self, path: str, body: dict) -> dict:
        resp = await self.client.post(path, json=body, headers=self.headers)
        assert resp.status in (200, 201, 202), f"{path}: {resp.status} {await resp.text()}"
        return await resp.json()

    async def function(self) -> str:
        form = aiohttp.FormData()
        form.add_field("code", json.dumps({"source": "package"}))
        form.add_field("runtime_id", self.runtime_id)
        form.add_field("name", f"f-{uuid.uuid4().hex[:6]}")
        form.add_field("package", PACKAGE, filename="package.zip")
        resp = await self.client.post("/v1/functions", data=form, headers=self.headers)
        assert resp.status == 201, await resp.text()
        return (await resp.json())["id"]

    async def version(self) -> tuple[str, int]:
        function_id = await self.function()
        return function_id, (await self.post(f"/v1/functions/{function_id}/versions", {}))["version_number"]

    async def alias(self) -> str:
        name = f"a-{uuid.uuid4().hex[:8]}"
        await self.post("/v1/aliases", {"name": name, "function_id": await self.function()})
        return name

    async def execution(self) -> str:
        return (await self.post("/v1/executions", {"function_id": await self.function(), "input": "{}"}))["id"]

    async def webhook(self) -> str:
        return (await self.post("/v1/webhooks", {"function_id": await self.function()}))["id"]

    async def job(self) -> str:
        return (await self.post("/v1/jobs", {"function_id": await self.function(), "pattern": "0 0 1 1 *"}))["id"]

    async def subscription(self) -> str:
        return (await self.post("/v1/subscriptions", {"source": "http", "function_id": await self.function(),
                                                      "types": ["com.example.tenancy"]}))["id"]

    async def event(self) -> str:
        event_id = str(uuid.uuid4())
        await self.post("/v1/events", {"specversion": "1.0", "id": event_id, "source": "/tenancy",
                                       "type": "com.example.tenancy", "data": {}})
        return event_id

    async def dead_letter(self, hw) -> str:
        # Holds an event of the project, so that it can be replayed as well as shown and discarded.
        event = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/tenancy", "type": "com.example.tenancy",
                 "sourcekind": "http", "projectid": self.project_id, "data": {}}
        return (await hw.store.dead_letters.add(project_id=self.project_id, source="test", reason="tenancy",
                                                event_id=event["id"], payload=event)).id


Build = Callable[[Tenant], Awaitable[tuple[str, dict]]]


@dataclasses.dataclass
class Row:
    kind: str  # public | list | read | write | admin
    build: Build
    cross: bool = True  # whether another project's resource can be named (else: own project only)


def _path(path: str, body: dict | None = None) -> tuple[str, dict]:
    return path, body or {}


async def _fn(t: Tenant) -> str:
    return await t.function()


# (method, route) -> how to call it for a tenant's resource. Routes of sources that are not
# enabled here (aodh, zaqar push) check their own shared tokens and are public.
ROWS: dict[tuple[str, str], Row] = {
    ("GET", "/"): Row("public", lambda t: _aw(_path("/"))),
    ("GET", "/v1"): Row("public", lambda t: _aw(_path("/v1"))),
    ("GET", "/v1/"): Row("public", lambda t: _aw(_path("/v1/"))),
    ("GET", "/healthz"): Row("public", lambda t: _aw(_path("/healthz"))),
    ("GET", "/v1/openapi.json"): Row("public", lambda t: _aw(_path("/v1/openapi.json"))),
    ("GET", "/metrics"): Row("admin", lambda t: _aw(_path("/metrics"))),
    ("POST", "/v1/runtimes"): Row("admin", lambda t: _aw(_path("/v1/runtimes", {"image": "python3"}))),
    ("GET", "/v1/runtimes"): Row("list", lambda t: _aw(_path("/v1/runtimes")), cross=False),
    ("GET", "/v1/runtimes/{id}"): Row("read", lambda t: _aw(_path(f"/v1/runtimes/{t.runtime_id}")), cross=False),
    ("PUT", "/v1/runtimes/{id}"): Row("admin", lambda t: _aw(_path(f"/v1/runtimes/{t.runtime_id}", {"description": "d"}))),
    ("DELETE", "/v1/runtimes/{id}"): Row("admin", None),  # filled in below: needs a runtime of its own
    ("GET", "/v1/runtimes/{id}/pool"): Row("admin", lambda t: _aw(_path(f"/v1/runtimes/{t.runtime_id}/pool"))),
    ("POST", "/v1/functions"): Row("write", None, cross=False),  # multipart: special-cased
    ("GET", "/v1/functions"): Row("list", lambda t: _then(_fn(t), lambda f: _path("/v1/functions"))),
    ("GET", "/v1/functions/{id}"): Row("read", lambda t: _then(_fn(t), lambda f: _path(f"/v1/functions/{f}"))),
    ("PUT", "/v1/functions/{id}"): Row("write", lambda t: _then(_fn(t), lambda f: _path(f"/v1/functions/{f}", {"description": "x"}))),
    ("DELETE", "/v1/functions/{id}"): Row("write", lambda t: _then(_fn(t), lambda f: _path(f"/v1/functions/{f}"))),
    ("POST", "/v1/functions/{id}/detach"): Row("admin", lambda t: _then(_fn(t), lambda f: _path(f"/v1/functions/{f}/detach"))),
    ("POST", "/v1/functions/{id}/scale_up"): Row("admin", lambda t: _then(_fn(t), lambda f: _path(f"/v1/functions/{f}/scale_up", {"count": 1}))),
    ("POST", "/v1/functions/{id}/scale_down"): Row("admin", lambda t: _then(_fn(t), lambda f: _path(f"/v1/functions/{f}/scale_down", {"count": 1}))),
    ("GET", "/v1/functions/{id}/workers"): Row("admin", lambda t: _then(_fn(t), lambda f: _path(f"/v1/functions/{f}/workers"))),
    ("POST", "/v1/functions/{id}/versions"): Row("write", lambda t: _then(_fn(t), lambda f: _path(f"/v1/functions/{f}/versions"))),
    ("GET", "/v1/functions/{id}/versions"): Row("read", lambda t: _then(_fn(t), lambda f: _path(f"/v1/functions/{f}/versions"))),
    ("GET", "/v1/functions/{id}/versions/{version}"): Row("read", lambda t: _then(t.version(), lambda v: _path(f"/v1/functions/{v[0]}/versions/{v[1]}"))),
    ("DELETE", "/v1/functions/{id}/versions/{version}"): Row("write", lambda t: _then(t.version(), lambda v: _path(f"/v1/functions/{v[0]}/versions/{v[1]}"))),
    ("POST", "/v1/functions/{id}/versions/{version}/detach"): Row("admin", lambda t: _then(t.version(), lambda v: _path(f"/v1/functions/{v[0]}/versions/{v[1]}/detach"))),
    ("POST", "/v1/functions/{id}/versions/{version}/scale_up"): Row("admin", lambda t: _then(t.version(), lambda v: _path(f"/v1/functions/{v[0]}/versions/{v[1]}/scale_up", {"count": 1}))),
    ("POST", "/v1/functions/{id}/versions/{version}/scale_down"): Row("admin", lambda t: _then(t.version(), lambda v: _path(f"/v1/functions/{v[0]}/versions/{v[1]}/scale_down", {"count": 1}))),
    ("POST", "/v1/aliases"): Row("write", lambda t: _then(_fn(t), lambda f: _path("/v1/aliases", {"name": f"n-{uuid.uuid4().hex[:6]}", "function_id": f}))),
    ("GET", "/v1/aliases"): Row("list", lambda t: _then(t.alias(), lambda a: _path("/v1/aliases"))),
    ("GET", "/v1/aliases/{name}"): Row("read", lambda t: _then(t.alias(), lambda a: _path(f"/v1/aliases/{a}"))),
    ("PUT", "/v1/aliases/{name}"): Row("write", lambda t: _then(t.alias(), lambda a: _path(f"/v1/aliases/{a}", {"description": "x"}))),
    ("DELETE", "/v1/aliases/{name}"): Row("write", lambda t: _then(t.alias(), lambda a: _path(f"/v1/aliases/{a}"))),
    ("POST", "/v1/executions"): Row("write", lambda t: _then(_fn(t), lambda f: _path("/v1/executions", {"function_id": f, "input": "{}"}))),
    ("GET", "/v1/executions"): Row("list", lambda t: _then(t.execution(), lambda e: _path("/v1/executions"))),
    ("GET", "/v1/executions/{id}"): Row("read", lambda t: _then(t.execution(), lambda e: _path(f"/v1/executions/{e}"))),
    ("GET", "/v1/executions/{id}/log"): Row("read", lambda t: _then(t.execution(), lambda e: _path(f"/v1/executions/{e}/log"))),
    ("DELETE", "/v1/executions/{id}"): Row("write", lambda t: _then(t.execution(), lambda e: _path(f"/v1/executions/{e}"))),
    ("POST", "/v1/webhooks"): Row("write", lambda t: _then(_fn(t), lambda f: _path("/v1/webhooks", {"function_id": f}))),
    ("GET", "/v1/webhooks"): Row("list", lambda t: _then(t.webhook(), lambda w: _path("/v1/webhooks"))),
    ("GET", "/v1/webhooks/{id}"): Row("read", lambda t: _then(t.webhook(), lambda w: _path(f"/v1/webhooks/{w}"))),
    ("PUT", "/v1/webhooks/{id}"): Row("write", lambda t: _then(t.webhook(), lambda w: _path(f"/v1/webhooks/{w}", {"description": "x"}))),
    ("DELETE", "/v1/webhooks/{id}"): Row("write", lambda t: _then(t.webhook(), lambda w: _path(f"/v1/webhooks/{w}"))),
    ("POST", "/v1/webhooks/{id}/invoke"): Row("public", lambda t: _then(t.webhook(), lambda w: _path(f"/v1/webhooks/{w}/invoke", {}))),
    ("POST", "/v1/jobs"): Row("write", lambda t: _then(_fn(t), lambda f: _path("/v1/jobs", {"function_id": f, "pattern": "0 0 1 1 *"}))),
    ("GET", "/v1/jobs"): Row("list", lambda t: _then(t.job(), lambda j: _path("/v1/jobs"))),
    ("GET", "/v1/jobs/{id}"): Row("read", lambda t: _then(t.job(), lambda j: _path(f"/v1/jobs/{j}"))),
    ("PUT", "/v1/jobs/{id}"): Row("write", lambda t: _then(t.job(), lambda j: _path(f"/v1/jobs/{j}", {"status": "paused"}))),
    ("DELETE", "/v1/jobs/{id}"): Row("write", lambda t: _then(t.job(), lambda j: _path(f"/v1/jobs/{j}"))),
    ("POST", "/v1/subscriptions"): Row("write", lambda t: _then(_fn(t), lambda f: _path("/v1/subscriptions", {"source": "http", "function_id": f, "types": ["x.y"]}))),
    ("POST", "/v1/subscriptions/batch"): Row("write", lambda t: _then(_fn(t), lambda f: _path("/v1/subscriptions/batch", {"subscriptions": [{"source": "http", "function_id": f, "types": ["x.y"]}, {"source": "http", "function_id": f}]}))),
    ("POST", "/v1/subscriptions/test"): Row("read", lambda t: _then(t.subscription(), lambda s: _path("/v1/subscriptions/test", {"specversion": "1.0", "id": "1", "source": "/t", "type": "com.example.tenancy"})), cross=False),
    ("GET", "/v1/subscriptions"): Row("list", lambda t: _then(t.subscription(), lambda s: _path("/v1/subscriptions"))),
    ("GET", "/v1/subscriptions/{id}"): Row("read", lambda t: _then(t.subscription(), lambda s: _path(f"/v1/subscriptions/{s}"))),
    ("PUT", "/v1/subscriptions/{id}"): Row("write", lambda t: _then(t.subscription(), lambda s: _path(f"/v1/subscriptions/{s}", {"description": "x"}))),
    ("DELETE", "/v1/subscriptions/{id}"): Row("write", lambda t: _then(t.subscription(), lambda s: _path(f"/v1/subscriptions/{s}"))),
    ("POST", "/v1/events"): Row("write", lambda t: _aw(_path("/v1/events", {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "com.example.tenancy"})), cross=False),
    ("GET", "/v1/events"): Row("list", lambda t: _then(t.event(), lambda e: _path("/v1/events"))),
    ("GET", "/v1/events/{id}"): Row("read", lambda t: _then(t.event(), lambda e: _path(f"/v1/events/{e}"))),
    ("POST", "/v1/events/replay"): Row("write", lambda t: _then(t.subscription(), lambda s: _path("/v1/events/replay", {"subscription_id": s, "since": "2000-01-01T00:00:00Z"}))),
    ("GET", "/v1/deadletters"): Row("list", None),  # need the app: filled in the test
    ("GET", "/v1/deadletters/{id}"): Row("read", None),
    ("POST", "/v1/deadletters/{id}/replay"): Row("write", None),
    ("DELETE", "/v1/deadletters/{id}"): Row("write", None),
    # The dashboard: its pages and files are public (no data in them); what they call is scoped.
    ("GET", "/dashboard"): Row("public", lambda t: _aw(_path("/dashboard"))),
    ("GET", "/dashboard/"): Row("public", lambda t: _aw(_path("/dashboard/"))),
    ("GET", "/dashboard/static/{name}"): Row("public", lambda t: _aw(_path("/dashboard/static/app.js"))),
    ("GET", "/dashboard/api/minutes"): Row("admin", lambda t: _aw(_path("/dashboard/api/minutes"))),
    ("POST", "/dashboard/api/filter"): Row("read", lambda t: _aw(_path("/dashboard/api/filter", {"filter": "subject = 'x'"})), cross=False),
    # An endless stream: checked by test_event_tail_is_scoped below, skipped by the table's walk.
    ("GET", "/dashboard/api/stream"): Row("stream", None),
}


async def _aw(value):
    return value


async def _then(awaitable, fn):
    return fn(await awaitable)


def app_routes(hw) -> set[tuple[str, str]]:
    return {(r.method, r.resource.canonical) for r in hw.web.router.routes() if r.method != "HEAD"}


@pytest.fixture
async def world(make_headwater, identities):
    sections = keystone_sections(identities)
    sections["keystone_authtoken"]["token_cache_time"] = "300"
    hw = await make_headwater("null", **sections)
    admin_token = identities.admin_user.token()
    resp = await hw.client.post("/v1/runtimes", json={"image": "python3", "name": "py"}, headers={"X-Auth-Token": admin_token})
    assert resp.status == 201, await resp.text()
    runtime_id = (await resp.json())["id"]
    alice = Tenant(hw.client, identities.alice.token(), runtime_id, identities.p1)
    bob = Tenant(hw.client, identities.bob.token(), runtime_id, identities.p2)
    carol_token = identities.carol.token()
    return hw, admin_token, alice, bob, carol_token


def _items(doc) -> list[dict]:
    return next((v for v in doc.values() if isinstance(v, list)), []) if isinstance(doc, dict) else []


async def test_every_route_has_a_row(world):
    hw, *_ = world
    missing = app_routes(hw) - set(ROWS)
    extra = set(ROWS) - app_routes(hw)
    assert not missing, f"routes without a row in the tenancy table: {sorted(missing)}"
    assert not extra, f"rows for routes the app no longer has: {sorted(extra)}"


async def test_tenancy_table(world, identities):
    hw, admin_token, alice, bob, carol_token = world
    rows = dict(ROWS)
    rows[("GET", "/v1/deadletters")] = Row("list", lambda t: _then(t.dead_letter(hw), lambda d: _path("/v1/deadletters")))
    rows[("GET", "/v1/deadletters/{id}")] = Row("read", lambda t: _then(t.dead_letter(hw), lambda d: _path(f"/v1/deadletters/{d}")))
    rows[("POST", "/v1/deadletters/{id}/replay")] = Row("write", lambda t: _then(t.dead_letter(hw), lambda d: _path(f"/v1/deadletters/{d}/replay")))
    rows[("DELETE", "/v1/deadletters/{id}")] = Row("write", lambda t: _then(t.dead_letter(hw), lambda d: _path(f"/v1/deadletters/{d}")))

    async def own_runtime(t):
        resp = await hw.client.post("/v1/runtimes", json={"image": "python3"}, headers={"X-Auth-Token": admin_token})
        return _path(f"/v1/runtimes/{(await resp.json())['id']}")
    rows[("DELETE", "/v1/runtimes/{id}")] = Row("admin", own_runtime)
    failures: list[str] = []

    async def call(method, path, body, token):
        headers = {"X-Auth-Token": token} if token else {}
        resp = await hw.client.request(method, path, json=body if method in ("POST", "PUT") else None, headers=headers)
        text = await resp.text()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        return resp.status, doc, text

    def expect(label, status, wanted, text):
        if status not in wanted:
            failures.append(f"{label}: {status} not in {wanted}: {text[:200]}")

    for (method, route), row in sorted(rows.items()):
        label = f"{method} {route}"
        if row.kind == "stream":
            continue
        if row.build is None:  # POST /v1/functions (multipart): alice creates, carol may not
            fid = await alice.function()
            status, doc, text = await call("GET", f"/v1/functions/{fid}", None, alice.token)
            expect(label + " alice own", status, {200}, text)
            form = aiohttp.FormData()
            form.add_field("code", json.dumps({"source": "package"}))
            form.add_field("runtime_id", alice.runtime_id)
            form.add_field("package", PACKAGE, filename="p.zip")
            resp = await hw.client.post("/v1/functions", data=form, headers={"X-Auth-Token": carol_token})
            expect(label + " carol", resp.status, {403}, await resp.text())
            resp = await hw.client.post("/v1/functions", data=form)
            expect(label + " no token", resp.status, {401}, await resp.text())
            continue
        path, body = await row.build(alice)
        if row.kind == "public":
            status, _, text = await call(method, path, body, None)
            expect(label + " no token", status, set(range(200, 300)), text)
            continue
        status, _, text = await call(method, path, body, None)
        expect(label + " no token", status, {401}, text)
        if row.kind == "admin":
            status, _, text = await call(method, path, body, alice.token)
            expect(label + " alice", status, {403}, text)
            status, _, text = await call(method, path, body, admin_token)
            expect(label + " admin", status, set(range(200, 300)), text)
            continue
        if row.kind == "list":
            await row.build(bob)  # bob has one too
            status, doc, text = await call(method, path, body, alice.token)
            expect(label + " alice", status, {200}, text)
            projects = {i.get("project_id") for i in _items(doc or {})}
            if route != "/v1/runtimes" and projects - {identities.p1}:
                failures.append(f"{label} alice sees other projects: {projects}")
            status, doc, text = await call(method, path, body, carol_token)
            expect(label + " carol", status, {200}, text)
            sep = "&" if "?" in path else "?"
            status, doc, text = await call(method, path + sep + "all_projects=true", body, admin_token)
            expect(label + " admin all_projects", status, {200}, text)
            projects = {i.get("project_id") for i in _items(doc or {})}
            if route != "/v1/runtimes" and not {identities.p1, identities.p2} <= projects:
                failures.append(f"{label} admin all_projects does not see both projects: {projects}")
            status, doc, text = await call(method, path + sep + "all_projects=true", body, alice.token)
            projects = {i.get("project_id") for i in _items(doc or {})}
            if route != "/v1/runtimes" and projects - {identities.p1}:
                failures.append(f"{label} alice with all_projects sees other projects: {projects}")
            continue
        if row.cross:  # bob's resource named by alice: as if it did not exist
            bob_path, bob_body = await row.build(bob)
            status, _, text = await call(method, bob_path, bob_body, alice.token)
            expect(label + " alice on bob's", status, {404}, text)
        status, _, text = await call(method, path, body, carol_token)
        expect(label + " carol", status, set(range(200, 300)) if row.kind == "read" else {403}, text)
        status, _, text = await call(method, path, body, alice.token)
        expect(label + " alice own", status, set(range(200, 300)), text)
    assert not failures, "\n".join(failures)


async def test_event_tail_is_scoped(world, identities):
    """GET /dashboard/api/stream: 401 without a token; alice's tail (and carol's, a reader) shows
    P1's events and never bob's, even with all_projects."""
    hw, admin_token, alice, bob, carol_token = world
    resp = await hw.client.get("/dashboard/api/stream")
    assert resp.status == 401, await resp.text()
    for token in (alice.token, carol_token):
        resp = await hw.client.get("/dashboard/api/stream?all_projects=true", headers={"X-Auth-Token": token})
        try:
            assert resp.status == 200, await resp.text()
            # The greeting comes once the server watches: events posted after it are seen.
            assert (await resp.content.readline()).startswith(b": headwater event tail")
            bobs = await bob.event()
            alices = await alice.event()
            seen = b""
            while alices.encode() not in seen:
                seen += await asyncio.wait_for(resp.content.readline(), 60)
            assert bobs.encode() not in seen
        finally:
            resp.close()


async def test_posted_events_belong_to_the_callers_project(world, identities):
    hw, admin_token, alice, bob, carol_token = world
    event_id = str(uuid.uuid4())
    resp = await hw.client.post("/v1/events", json={"specversion": "1.0", "id": event_id, "source": "/spoof",
                                                    "type": "com.example.spoof", "projectid": identities.p2},
                                headers=alice.headers)
    assert resp.status == 202

    # 202: the history is written in batches off the hot path, so wait until the event is there.
    async def recorded():
        resp = await hw.client.get(f"/v1/events/{event_id}", headers=alice.headers)
        assert resp.status in (200, 404), await resp.text()
        return await resp.json() if resp.status == 200 else None
    assert (await eventually(recorded))["project_id"] == identities.p1
    assert (await hw.client.get(f"/v1/events/{event_id}", headers=bob.headers)).status == 404


async def test_package_download_needs_a_token(world):
    hw, admin_token, alice, bob, carol_token = world
    fid = await alice.function()
    assert (await hw.client.get(f"/v1/functions/{fid}?download=true")).status == 401
    assert (await hw.client.get(f"/v1/functions/{fid}?download=true&token=forged")).status == 401
    from router import download_tokens

    token = download_tokens.issue(hw.download_secret, fid, 0, 60)
    resp = await hw.client.get(f"/v1/functions/{fid}?download=true&token={token}")
    assert resp.status == 200 and await resp.read() == PACKAGE
    other = await bob.function()  # a token for one function opens no other
    assert (await hw.client.get(f"/v1/functions/{other}?download=true&token={token}")).status == 401
    resp = await hw.client.get(f"/v1/functions/{fid}?download=true", headers=alice.headers)
    assert resp.status == 200
    assert (await hw.client.get(f"/v1/functions/{fid}?download=true", headers=bob.headers)).status == 404


async def test_events_reach_only_their_projects_subscriptions(world, identities):
    """Two subscriptions with the same filter in P1 and P2: an event of P2 runs only P2's."""
    hw, admin_token, alice, bob, carol_token = world
    subs = {}
    for t in (alice, bob):
        subs[t.project_id] = await t.subscription()
    resp = await hw.client.post("/v1/events", json={"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t",
                                                    "type": "com.example.tenancy"}, headers=bob.headers)
    event_id = (await resp.json())["event_id"]
    for _ in range(200):  # wait on the condition: bob's execution recorded
        bobs = await hw.store.executions.list(filters={"event_id": event_id})
        if bobs:
            break
        await asyncio.sleep(0.05)
    assert {e.subscription_id for e in bobs} == {subs[identities.p2]}
    assert all(e.project_id == identities.p2 for e in bobs)
    assert not await hw.store.executions.list(filters={"subscription_id": subs[identities.p1]})


async def test_private_runtimes_are_visible_only_to_listed_projects(world, identities):
    hw, admin_token, alice, bob, carol_token = world
    admin = {"X-Auth-Token": admin_token}
    resp = await hw.client.post("/v1/runtimes", json={"image": "python3", "is_public": False, "projects": [identities.p1]},
                                headers=admin)
    assert resp.status == 201, await resp.text()
    private = await resp.json()
    assert private["projects"] == [identities.p1]
    mine = await (await hw.client.get(f"/v1/runtimes/{private['id']}", headers=alice.headers)).json()
    assert "projects" not in mine, "who else may use a runtime is not a tenant's business"
    assert private["id"] in {r["id"] for r in (await (await hw.client.get("/v1/runtimes", headers=alice.headers)).json())["runtimes"]}
    assert (await hw.client.get(f"/v1/runtimes/{private['id']}", headers=bob.headers)).status == 404
    assert private["id"] not in {r["id"] for r in (await (await hw.client.get("/v1/runtimes", headers=bob.headers)).json())["runtimes"]}
    bob_with_it = Tenant(hw.client, bob.token, private["id"], bob.project_id)
    form = aiohttp.FormData()
    form.add_field("code", json.dumps({"source": "package"}))
    form.add_field("runtime_id", private["id"])
    form.add_field("package", PACKAGE, filename="p.zip")
    assert (await hw.client.post("/v1/functions", data=form, headers=bob_with_it.headers)).status == 404
    alice_with_it = Tenant(hw.client, alice.token, private["id"], alice.project_id)
    await alice_with_it.function()
    # Shared with P2 as well now: bob sees it.
    resp = await hw.client.put(f"/v1/runtimes/{private['id']}", json={"projects": [identities.p1, identities.p2]}, headers=admin)
    assert (await resp.json())["projects"] == sorted([identities.p1, identities.p2])
    assert (await hw.client.get(f"/v1/runtimes/{private['id']}", headers=bob.headers)).status == 200


async def test_a_batch_naming_another_projects_function_creates_nothing(world, identities):
    """alice's batch with one item aimed at bob's function: 404 naming that item, as if the function
    did not exist, and none of the batch is created (not even her own items). An item that names
    another project, or a trust, is filed in her project without them."""
    hw, admin_token, alice, bob, carol_token = world
    mine, bobs = await alice.function(), await bob.function()
    before = len(await hw.store.subscriptions.list())
    resp = await hw.client.post("/v1/subscriptions/batch", headers=alice.headers, json={"subscriptions": [
        {"source": "http", "function_id": mine}, {"source": "http", "function_id": bobs}]})
    assert resp.status == 404, await resp.text()
    assert "subscriptions[1]" in (await resp.json())["faultstring"]
    assert len(await hw.store.subscriptions.list()) == before
    resp = await hw.client.post("/v1/subscriptions/batch", headers=alice.headers, json={"subscriptions": [
        {"source": "http", "function_id": mine, "project_id": identities.p2, "options": {"trust_id": "stolen"}}]})
    assert resp.status == 201, await resp.text()
    (created,) = (await resp.json())["subscriptions"]
    assert created["project_id"] == identities.p1 and "trust_id" not in created["options"]
    row = await hw.store.subscriptions.get(created["id"])
    assert row.project_id == identities.p1 and "trust_id" not in (row.options or {})
    # carol (a reader) may not create in bulk either, and bob cannot see what alice made.
    resp = await hw.client.post("/v1/subscriptions/batch", headers={"X-Auth-Token": carol_token},
                                json={"subscriptions": [{"source": "http", "function_id": mine}]})
    assert resp.status == 403, await resp.text()
    assert (await hw.client.get(f"/v1/subscriptions/{created['id']}", headers=bob.headers)).status == 404

async def test_execution_pages_stay_in_the_callers_project(world, identities):
    """A marker names an execution of the caller's own list: another project's id is refused as if
    it did not exist, and every page holds the caller's rows only."""
    hw, admin_token, alice, bob, carol_token = world
    mine = [await alice.execution() for _ in range(3)]
    theirs = await bob.execution()
    resp = await hw.client.get(f"/v1/executions?marker={theirs}", headers=alice.headers)
    unknown = await hw.client.get(f"/v1/executions?marker={uuid.uuid4()}", headers=alice.headers)
    assert resp.status == unknown.status == 404
    assert "marker" in (await resp.json())["faultstring"] and "marker" in (await unknown.json())["faultstring"]
    seen, url = [], "/v1/executions?limit=1&all_projects=true"
    while url:
        page = await (await hw.client.get(url, headers=alice.headers)).json()
        seen += [(e["id"], e["project_id"]) for e in page["executions"]]
        url = page.get("next")
    assert [i for i, _ in seen] == mine and {p for _, p in seen} == {identities.p1}
    resp = await hw.client.get(f"/v1/executions?marker={mine[0]}&all_projects=true", headers={"X-Auth-Token": admin_token})
    assert resp.status == 200 and theirs in {e["id"] for e in (await resp.json())["executions"]}
