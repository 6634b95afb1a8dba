"""Helpers the resource handlers share: request context, parameter parsing, serialisation."""

from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any

from aiohttp import web

from router.api.errors import BadRequest
from router.safejson import INT_MAX, INT_MIN

APP_KEY = web.AppKey("headwater", object)
CTX_KEY = web.RequestKey("ctx", object) if hasattr(web, "RequestKey") else "ctx"
REQUEST_ID_KEY = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
RULE_KEY = web.RequestKey("policy_rule", str) if hasattr(web, "RequestKey") else "policy_rule"


class RequestContext:
    """Who is asking, and the one place a request's project scope comes from. With [auth]
    strategy = noauth every request is project `default` and admin, as Qinling without Keystone.
    `store` is the database as this caller may see it: every query through it is limited to the
    caller's project (admins: every project), so a handler cannot forget the scope."""

    def __init__(self, project_id: str = "default", is_admin: bool = True, *, user_id: str | None = None,
                 roles: tuple[str, ...] = ("admin", "member", "reader"), request_id: str = "", token: str | None = None,
                 identity: Any = None, store: Any = None):
        self.project_id = project_id
        self.is_admin = is_admin
        self.user_id = user_id
        self.roles = tuple(roles)
        self.request_id = request_id
        self.token = token
        self.identity = identity
        self.store = store.scoped(None if is_admin else project_id) if store is not None else None

    @property
    def credentials(self) -> dict[str, Any]:
        """What policy rules check (oslo.policy's creds)."""
        return {"user_id": self.user_id, "project_id": self.project_id, "roles": list(self.roles),
                "is_admin": self.is_admin}

    def list_scope(self, request: web.Request) -> str | None:
        """The project a list is limited to; None means every project (admins only)."""
        every = parse_bool(request.query.get("all_projects"), "all_projects")  # checked even when unused
        project = request.query.get("project_id")
        if project and self.is_admin:
            return project
        if every and self.is_admin:
            return None
        return self.project_id

    @property
    def get_scope(self) -> str | None:
        """Single-object reads: admins see every project's objects, as in Qinling."""
        return None if self.is_admin else self.project_id


def hw(request: web.Request):
    return request.app[APP_KEY]


def ctx(request: web.Request) -> RequestContext:
    return request[CTX_KEY]


def store(request: web.Request):
    """The store as the caller may see it (router.store.ScopedStore)."""
    return request[CTX_KEY].store


def format_time(value: _dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_time_ms(value: _dt.datetime | None) -> str | None:
    """RFC 3339 UTC with milliseconds (`2026-12-04T15:35:37.123Z`): Headwater's own fields, where
    retries, backoff and overlap happen within a second. Qinling's fields keep format_time."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_bool(value: Any, name: str, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise BadRequest(f"Invalid value for {name}: {value!r} is not a boolean.")


def parse_int(value: Any, name: str, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise BadRequest(f"Invalid value for {name}: {value!r} is not an integer.")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"Invalid value for {name}: {str(value)[:40]!r} is not an integer.") from None
    if not INT_MIN <= number <= INT_MAX:
        raise BadRequest(f"Invalid value for {name}: {str(value)[:40]} is out of range (64-bit integers).")
    return number


def require_uuid(value: str, name: str = "id") -> str:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError):
        raise BadRequest(f"Expected a uuid but received {value}.") from None
    return value


def list_filters(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """Query filters of a list endpoint; unknown parameters are refused, as WSME does."""
    out = {}
    for name, value in request.query.items():
        if name in ("all_projects", "project_id"):
            continue
        if name not in allowed:
            raise BadRequest(f"Unknown argument: {name!r}. Accepted filters: {', '.join(allowed) or 'none'}.")
        out[name] = value
    return out
