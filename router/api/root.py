"""Version discovery, health and metrics endpoints."""

from __future__ import annotations

from aiohttp import web

from router import __version__
from router.api.common import hw


async def versions(request: web.Request) -> web.Response:
    base = hw(request).config.api.public_url
    return web.json_response({"versions": [{"id": "v1.0", "status": "CURRENT",
                                            "links": [{"href": f"{base}/v1", "target": "v1", "rel": "self"}]}]})


async def v1(request: web.Request) -> web.Response:
    return web.json_response({"uri": f"{hw(request).config.api.public_url}/v1"})


async def health(request: web.Request) -> web.Response:
    app = hw(request)
    return web.json_response({"status": "ok", "version": __version__, "subscriptions": len(app.index),
                              "bus": app.config.bus.backend, "engine": app.config.engine.backend,
                              "roles": list(app.config.default.roles)})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=hw(request).metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


def routes(app: web.Application) -> None:
    app.router.add_get("/", versions)
    app.router.add_get("/v1", v1)
    app.router.add_get("/v1/", v1)
    probe_routes(app)


def probe_routes(app: web.Application) -> None:
    """What every process serves, whatever its roles: the probes' and Prometheus' routes."""
    app.router.add_get("/healthz", health)
    app.router.add_get("/metrics", metrics)
