"""Who is asking and may they: request ids, authentication (noauth or Keystone), policy, audit log."""

from __future__ import annotations

import logging
import uuid

from aiohttp import web

from router import download_tokens
from router.api.common import APP_KEY, CTX_KEY, REQUEST_ID_KEY, RULE_KEY, RequestContext
from router.api.errors import error_response
from router.keystone import InvalidToken, KeystoneUnavailable

log = logging.getLogger(__name__)
audit_log = logging.getLogger("headwater.audit")

REQUEST_ID_HEADER = "X-Openstack-Request-Id"
_READS = ("GET", "HEAD", "OPTIONS")
# Package downloads a runtime makes with an engine-issued token (?token=), in place of Keystone's.
_DOWNLOADS = {("GET", "/v1/functions/{id}"), ("GET", "/v1/functions/{id}/versions/{version}")}


def _route(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    """Outermost: every answer, errors included, names its request; each mutating request is
    audited in one structured line."""
    request_id = f"req-{uuid.uuid4()}"
    request[REQUEST_ID_KEY] = request_id
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects and the like that the error middleware lets through
        exc.headers[REQUEST_ID_HEADER] = request_id
        _audit(request, exc.status)
        raise
    response.headers[REQUEST_ID_HEADER] = request_id
    _audit(request, response.status)
    return response


def _audit(request: web.Request, status: int) -> None:
    if request.method in _READS:
        return
    c = request.get(CTX_KEY)
    audit_log.info("audit", extra={
        "request_id": request[REQUEST_ID_KEY], "user_id": getattr(c, "user_id", None),
        "project_id": getattr(c, "project_id", None), "action": request.get(RULE_KEY) or f"{request.method} {_route(request)}",
        "target": dict(request.match_info) or None, "outcome": "success" if status < 400 else "failure", "status": status})


def _unauthorized(request: web.Request, message: str) -> web.Response:
    response = error_response(401, message)
    uri = request.app[APP_KEY].config.keystone_authtoken.www_authenticate_uri
    response.headers["WWW-Authenticate"] = f'Keystone uri="{uri}"'
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler):
    app = request.app[APP_KEY]
    route = _route(request)
    request_id = request[REQUEST_ID_KEY]
    strategy = app.config.auth.strategy
    if route is None:  # no such route: aiohttp answers 404/405
        request[CTX_KEY] = RequestContext("", False, roles=(), request_id=request_id, store=app.store)
        return await handler(request)
    # HEAD is GET without the body: the same rule decides.
    key = ("GET" if request.method == "HEAD" else request.method, route)
    public = key in app.public_routes
    if key in _DOWNLOADS and "token" in request.query:
        # An engine's download token stands for the owner for this one package; wrong or expired: 401.
        version = request.match_info.get("version", "0")
        if not version.isdigit() or not download_tokens.verify(app.download_secret, request.query["token"],
                                                               request.match_info["id"], int(version)):
            return error_response(401, "Invalid or expired download token.")
        request[CTX_KEY] = RequestContext(request_id=request_id, store=app.store, roles=("service",))
        return await handler(request)
    if strategy == "noauth":
        request[CTX_KEY] = RequestContext(request_id=request_id, store=app.store)
        if not public and not await _allowed(app, request, key):
            return error_response(403, f"Policy does not allow {request.get(RULE_KEY) or 'this request'}.")
        return await handler(request)
    if public:  # anonymous: no project, not admin
        request[CTX_KEY] = RequestContext("", False, roles=(), request_id=request_id, store=app.store)
        return await handler(request)
    token = request.headers.get("X-Auth-Token")
    if not token:
        return _unauthorized(request, "Authentication required: send a Keystone token in X-Auth-Token.")
    try:
        identity = await app.keystone.validate(token)
    except InvalidToken as exc:
        return _unauthorized(request, str(exc))
    except KeystoneUnavailable as exc:
        log.error("keystone unavailable: %s", exc, extra={"request_id": request_id})
        return error_response(503, f"Identity service unavailable, try again later: {exc}")
    is_admin = app.policy.allowed("context_is_admin", {"roles": list(identity.roles), "project_id": identity.project_id,
                                                       "user_id": identity.user_id}, {})
    request[CTX_KEY] = RequestContext(identity.project_id, is_admin, user_id=identity.user_id, roles=identity.roles,
                                      request_id=request_id, token=token, identity=identity, store=app.store)
    if not await _allowed(app, request, key):
        return error_response(403, f"Policy does not allow {request.get(RULE_KEY) or 'this request'}.")
    return await handler(request)


async def _allowed(app, request: web.Request, key: tuple[str, str]) -> bool:
    rule = app.policy.rule_for(*key)
    if rule is None:  # a route nobody wrote a rule for is closed, not open
        log.error("no policy rule for %s %s", *key)
        return False
    request[RULE_KEY] = rule
    c = request[CTX_KEY]
    return app.policy.allowed(rule, c.credentials, {"project_id": c.project_id})
