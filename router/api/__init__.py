"""The HTTP API (aiohttp): Qinling's v1 resources plus Headwater's subscriptions, health and metrics."""

from __future__ import annotations

from aiohttp import web

from router.api import aliases, deadletters, events, executions, functions, jobs, openapi, root, runtimes, subscriptions, versions, webhooks
from router.api.auth import auth_middleware, request_id_middleware
from router.api.common import APP_KEY
from router import tracing
from router.api.errors import error_middleware
from router.dashboard import web as dashboard


@web.middleware
async def tracing_middleware(request: web.Request, handler):
    """A server span per request when tracing is on (joining a caller's `traceparent` header)."""
    if not tracing.enabled:
        return await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    with tracing.span(f"{request.method} {route}", headers=request.headers, kind="server",
                      attributes={"http.request.method": request.method, "http.route": route}) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        return response


# Writes under these paths change what an execution resolves to (functions, runtimes, versions, aliases).
_TARGET_PATHS = ("/v1/functions", "/v1/runtimes", "/v1/aliases")


@web.middleware
async def target_cache_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    finally:
        if request.method not in ("GET", "HEAD") and request.path.startswith(_TARGET_PATHS):
            request.app[APP_KEY].executions.targets.clear()


def build_api(headwater) -> web.Application:
    app = web.Application(middlewares=[tracing_middleware, request_id_middleware, error_middleware, auth_middleware,
                                       target_cache_middleware],
                          client_max_size=headwater.config.api.max_request_size)
    app[APP_KEY] = headwater
    if "api" not in headwater.config.default.roles:
        root.probe_routes(app)  # a process without the api role still answers its probes
        return app
    for module in (root, runtimes, functions, versions, aliases, executions, webhooks, jobs, subscriptions, deadletters, events, openapi, dashboard):
        module.routes(app)
    return app
