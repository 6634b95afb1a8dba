"""Keystone for Headwater: validate callers' tokens (with a cache), and act later for users through trusts."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any

from router.config import Config

log = logging.getLogger(__name__)

_CACHE_SIZE = 10_000
# A trust token handed to a function keeps at least this long; a fresher one is fetched before.
TRUST_TOKEN_MARGIN = _dt.timedelta(minutes=5)


class KeystoneUnavailable(Exception):
    """Keystone did not answer, or refused Headwater's own service credentials (the API answers 503)."""


class InvalidToken(Exception):
    """The token is malformed, expired, revoked, or its project or user is disabled (401)."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a valid token speaks for."""

    user_id: str
    user_name: str | None
    project_id: str
    project_name: str | None
    roles: tuple[str, ...]
    expires_at: _dt.datetime | None
    trust_id: str | None = None


def _session(config: Config, **scope: Any):
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    k = config.keystone_authtoken
    auth = v3.Password(auth_url=k.auth_url, username=k.username, password=k.password,
                       user_domain_name=k.user_domain_name, **scope)
    return session.Session(auth=auth, timeout=k.http_connect_timeout)


def service_scope(config: Config) -> dict[str, Any]:
    k = config.keystone_authtoken
    return {"project_name": k.project_name, "project_domain_name": k.project_domain_name}


class Keystone:
    """Headwater's service user at Keystone: validates tokens (GET /v3/auth/tokens, as
    keystonemiddleware does) and makes and uses trusts. keystoneauth1 is synchronous, so calls
    run in a thread; its session keeps and renews the service token."""

    def __init__(self, config: Config, clock=time.monotonic):
        self.config = config
        self.url = config.keystone_authtoken.auth_url.rstrip("/")
        self._service = _session(config, **service_scope(config))
        self._cache: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        self._cache_time = config.keystone_authtoken.token_cache_time
        self._clock = clock
        self._service_user_id: str | None = None
        self._trust_tokens: dict[str, tuple[str, Identity]] = {}

    # -- tokens ---------------------------------------------------------------------------

    async def validate(self, token: str) -> Identity:
        if not token or len(token) > 8192 or not token.isascii() or not token.isprintable():
            raise InvalidToken("The token is malformed.")
        key = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and hit[0] > now and not _expired(hit[1]):
            return hit[1]
        identity = await asyncio.to_thread(self._fetch, token)
        if self._cache_time:
            self._cache[key] = (now + self._cache_time, identity)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return identity

    def _request(self, method: str, path: str, **kwargs: Any):
        from keystoneauth1 import exceptions

        if method == "GET":
            # Only reads are retried: a POST that timed out may have been carried out (a second trust).
            kwargs.setdefault("connect_retries", self.config.keystone_authtoken.http_request_max_retries)
        try:
            return self._service.request(self.url + path, method, raise_exc=False, **kwargs)
        except exceptions.Unauthorized as exc:  # Headwater's own service credentials
            raise KeystoneUnavailable(f"Headwater's service user cannot authenticate to Keystone: {exc}") from None
        except (exceptions.ConnectionError, exceptions.ConnectTimeout, exceptions.RequestTimeout,
                exceptions.DiscoveryFailure, exceptions.SSLError) as exc:
            raise KeystoneUnavailable(f"Keystone at {self.url} is unreachable: {type(exc).__name__}") from None

    def _fetch(self, token: str) -> Identity:
        from keystoneauth1 import access

        resp = self._request("GET", "/auth/tokens", headers={"X-Subject-Token": token})
        if resp.status_code in (401, 403, 404):
            # 404: not a token Keystone knows (expired, revoked, malformed, disabled project or user).
            raise InvalidToken("The token is invalid, expired or revoked.")
        if resp.status_code >= 300:
            raise KeystoneUnavailable(f"Keystone answered {resp.status_code} when validating a token.")
        info = access.create(body=resp.json(), auth_token=token)
        if not info.project_id:
            raise InvalidToken("The token is not scoped to a project.")
        return Identity(user_id=info.user_id, user_name=info.username, project_id=info.project_id,
                        project_name=info.project_name, roles=tuple(info.role_names or ()), expires_at=info.expires,
                        trust_id=info.trust_id if info.trust_scoped else None)

    # -- delegation -----------------------------------------------------------------------

    def service_user_id(self) -> str:
        if self._service_user_id is None:
            self._service_user_id = self._service.get_user_id()
        return self._service_user_id

    async def create_trust(self, user_token: str, identity: Identity) -> str:
        """A trust from the token's user to Headwater's service user for the token's project and
        roles (impersonation on: what Headwater does later is done as that user)."""
        return await asyncio.to_thread(self._create_trust, user_token, identity)

    def _create_trust(self, user_token: str, identity: Identity) -> str:
        trustee = self.service_user_id()
        body = {"trust": {"trustor_user_id": identity.user_id, "trustee_user_id": trustee, "impersonation": True,
                          "project_id": identity.project_id, "roles": [{"name": r} for r in identity.roles]}}
        # The trustor itself must ask: the request carries the user's token, not the service's.
        resp = self._request("POST", "/OS-TRUST/trusts", json=body, headers={"X-Auth-Token": user_token},
                             authenticated=False)
        if resp.status_code >= 300:
            raise KeystoneUnavailable(f"Keystone refused to create a trust ({resp.status_code}): {resp.text[:200]}")
        return resp.json()["trust"]["id"]

    async def delete_trust(self, trust_id: str, user_token: str) -> bool:
        """Delete a trust; only its trustor (or an admin) may, so the request carries the caller's
        token. False when Keystone refused (the caller is another member of the project)."""
        self._trust_tokens.pop(trust_id, None)
        resp = await asyncio.to_thread(self._request, "DELETE", f"/OS-TRUST/trusts/{trust_id}",
                                       headers={"X-Auth-Token": user_token}, authenticated=False)
        return resp.status_code in (204, 404)

    async def trust_token(self, trust_id: str) -> tuple[str, Identity]:
        """A token acting as the trustor in the trust's project, and who it speaks for; reused
        while it has more than TRUST_TOKEN_MARGIN left, so a busy job asks Keystone rarely."""
        cached = self._trust_tokens.get(trust_id)
        if cached is not None and not _expired(cached[1], margin=TRUST_TOKEN_MARGIN):
            return cached
        fresh = await asyncio.to_thread(self._trust_token, trust_id)
        self._trust_tokens[trust_id] = fresh
        return fresh

    def forget_trust_token(self, trust_id: str) -> None:
        """Drop the kept token of a trust (a service refused it): the next trust_token asks anew."""
        self._trust_tokens.pop(trust_id, None)

    def _trust_token(self, trust_id: str) -> tuple[str, Identity]:
        from keystoneauth1 import exceptions

        sess = _session(self.config, trust_id=trust_id)
        try:
            token = sess.get_token()
            info = sess.auth.get_access(sess)
        except exceptions.Unauthorized as exc:  # the trust was deleted, or its trustor disabled
            raise InvalidToken(f"Trust {trust_id} can no longer be used: {exc}") from None
        except (exceptions.ConnectionError, exceptions.ConnectTimeout, exceptions.DiscoveryFailure) as exc:
            raise KeystoneUnavailable(f"Keystone at {self.url} is unreachable: {type(exc).__name__}") from None
        return token, Identity(user_id=info.user_id, user_name=info.username, project_id=info.project_id,
                               project_name=info.project_name, roles=tuple(info.role_names or ()),
                               expires_at=info.expires, trust_id=trust_id)


def _expired(identity: Identity, margin: _dt.timedelta = _dt.timedelta(0)) -> bool:
    return identity.expires_at is not None and identity.expires_at - margin <= _dt.datetime.now(_dt.timezone.utc)
