"""A real Keystone (tests/integration/keystone/keystone.sh) with two projects and four personas:
alice (member of P1), bob (member of P2), carol (reader of P1), and the cloud admin; plus the
Headwater service user. Skips when Keystone is absent (fails under HEADWATER_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import uuid
from pathlib import Path

import pytest

from tests.services import REQUIRE

HARNESS_DIR = Path(os.environ.get("HEADWATER_KEYSTONE_DIR", "/var/tmp/headwater-keystone"))
PASSWORD = "pw-" + uuid.uuid4().hex[:12]


def _url(env: str, port_file: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env].rstrip("/")
    path = HARNESS_DIR / port_file
    return f"http://127.0.0.1:{path.read_text().strip()}/v3" if path.is_file() else None


KEYSTONE_URL = _url("HEADWATER_KEYSTONE_URL", "port")
SHORT_URL = _url("HEADWATER_KEYSTONE_SHORT_URL", "short-port")
ADMIN_PASSWORD = os.environ.get("HEADWATER_KEYSTONE_ADMIN_PASSWORD", "headwater-admin")


def _reachable(url: str | None) -> bool:
    import urllib.request

    if not url:
        return False
    try:
        urllib.request.urlopen(url, timeout=3)
        return True
    except Exception:
        return False


def require_keystone() -> None:
    if _reachable(KEYSTONE_URL) and _reachable(SHORT_URL):
        return
    message = f"Keystone is not reachable at {KEYSTONE_URL} / {SHORT_URL}"
    if REQUIRE:
        pytest.fail(f"{message} and HEADWATER_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(f"{message} (start it: bash tests/integration/keystone/keystone.sh up)")


@dataclasses.dataclass
class User:
    name: str
    id: str
    project_id: str
    password: str = PASSWORD

    def token(self, url: str | None = None) -> str:
        return issue_token(self.name, self.password, self.project_id, url or KEYSTONE_URL)


def issue_token(username: str, password: str, project_id: str, url: str) -> str:
    return issue_token_expiring(username, password, project_id, url)[0]


def issue_token_expiring(username: str, password: str, project_id: str, url: str) -> tuple[str, _dt.datetime]:
    """A token and its expiry as Keystone stated it when issuing it (asking again later may be too
    late for the short-lived Keystone's tokens)."""
    import requests

    body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": username, "domain": {"id": "default"}, "password": password}}},
        "scope": {"project": {"id": project_id}}}}
    resp = requests.post(f"{url}/auth/tokens", json=body, timeout=30)
    resp.raise_for_status()
    expires = _dt.datetime.fromisoformat(resp.json()["token"]["expires_at"].replace("Z", "+00:00"))
    return resp.headers["X-Subject-Token"], expires


class Admin:
    """The bootstrap admin, for setting identities up and for revoking and disabling."""

    def __init__(self):
        import requests

        self.http = requests.Session()
        token = self._admin_token()
        self.http.headers["X-Auth-Token"] = token

    def _admin_token(self) -> str:
        import requests

        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": "admin", "domain": {"id": "default"}, "password": ADMIN_PASSWORD}}},
            "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}}
        resp = requests.post(f"{KEYSTONE_URL}/auth/tokens", json=body, timeout=30)
        resp.raise_for_status()
        self.project_id = resp.json()["token"]["project"]["id"]
        return resp.headers["X-Subject-Token"]

    def call(self, method: str, path: str, **kw):
        resp = self.http.request(method, KEYSTONE_URL + path, timeout=30, **kw)
        if resp.status_code >= 400:
            raise AssertionError(f"Keystone {method} {path}: {resp.status_code} {resp.text[:300]}")
        return resp.json() if resp.content else None

    def role(self, name: str) -> str:
        found = self.call("GET", "/roles", params={"name": name})["roles"]
        return found[0]["id"] if found else self.call("POST", "/roles", json={"role": {"name": name}})["role"]["id"]

    def project(self, name: str) -> str:
        found = self.call("GET", "/projects", params={"name": name})["projects"]
        if found:
            return found[0]["id"]
        return self.call("POST", "/projects", json={"project": {"name": name, "domain_id": "default"}})["project"]["id"]

    def user(self, name: str, project_id: str, role: str) -> User:
        found = self.call("GET", "/users", params={"name": name})["users"]
        if found:
            user_id = found[0]["id"]
            self.call("PATCH", f"/users/{user_id}", json={"user": {"password": PASSWORD, "enabled": True}})
        else:
            user_id = self.call("POST", "/users", json={"user": {"name": name, "password": PASSWORD,
                                                                  "domain_id": "default"}})["user"]["id"]
        self.call("PUT", f"/projects/{project_id}/users/{user_id}/roles/{self.role(role)}")
        return User(name, user_id, project_id)

    def set_project_enabled(self, project_id: str, enabled: bool) -> None:
        self.call("PATCH", f"/projects/{project_id}", json={"project": {"enabled": enabled}})

    def revoke(self, token: str) -> None:
        resp = self.http.delete(f"{KEYSTONE_URL}/auth/tokens", headers={"X-Subject-Token": token}, timeout=30)
        assert resp.status_code == 204, resp.text


@dataclasses.dataclass
class Identities:
    admin: Admin
    admin_user: User
    alice: User
    bob: User
    carol: User
    service: User
    p1: str
    p2: str
    service_project: str


@pytest.fixture(scope="session")
def identities() -> Identities:
    require_keystone()
    return make_identities()


def make_identities() -> Identities:
    admin = Admin()
    run = uuid.uuid4().hex[:8]  # names unique per test session: Keystone is shared between runs
    p1, p2 = admin.project(f"hw-p1-{run}"), admin.project(f"hw-p2-{run}")
    service_project = admin.project("service")
    service = admin.user(f"headwater-{run}", service_project, "service")
    admin_user = admin.user(f"hw-admin-{run}", admin.project_id, "admin")
    return Identities(
        admin=admin, admin_user=admin_user, alice=admin.user(f"alice-{run}", p1, "member"),
        bob=admin.user(f"bob-{run}", p2, "member"), carol=admin.user(f"carol-{run}", p1, "reader"),
        service=service, p1=p1, p2=p2, service_project=service_project)


def keystone_sections(ids: Identities, url: str | None = None, **auth) -> dict:
    """The configuration of a Headwater that validates tokens at this Keystone as the service user."""
    return {"auth": {"strategy": "keystone", **auth},
            "keystone_authtoken": {"auth_url": url or KEYSTONE_URL, "username": ids.service.name,
                                   "password": ids.service.password, "project_name": "service",
                                   "token_cache_time": "0"}}
