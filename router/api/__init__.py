"""The HTTP API (aiohttp): Qinling's v1 resources plus Headwater's subscriptions, health and metrics."""

from __future__ import annotations

from aiohttp import web

from router.api import executions, functions, jobs, root, runtimes, subscriptions, webhooks
from router.api.common import APP_KEY, CTX_KEY, RequestContext
from router.api.errors import error_middleware


@web.middleware
async def context_middleware(request: web.Request, handler):
    request[CTX_KEY] = RequestContext()
    return await handler(request)


def build_api(headwater) -> web.Application:
    app = web.Application(middlewares=[error_middleware, context_middleware],
                          client_max_size=headwater.config.api.max_request_size)
    app[APP_KEY] = headwater
    for module in (root, runtimes, functions, executions, webhooks, jobs, subscriptions):
        module.routes(app)
    return app
