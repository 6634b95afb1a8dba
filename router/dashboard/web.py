"""The dashboard's routes: its pages and static files, the live event tail (server-sent events),
per-minute counts, and a filter check for the subscription form. Everything else the pages show
comes from the ordinary /v1 API, with the user's token and the API's project scoping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from aiohttp import web

from router.api.common import APP_KEY, ctx, hw
from router.api.errors import ApiError, BadRequest, json_body
from router.dashboard.feed import TooManyWatchers
from router.dashboard.series import MinuteSeries
from router.events import Event, InvalidEvent
from router.filters import FilterError, compile_filter, explain
from router.index import SOURCE_KIND_EXTENSION

STATIC = Path(__file__).parent / "static"
PREFIX = "/dashboard"
KEEPALIVE_SECONDS = 15.0
MINUTES_KEY = web.AppKey("dashboard-minutes", MinuteSeries)

# The pages load nothing from elsewhere and run no inline script: an event's text shown in the
# tail can never become code.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


async def page(request: web.Request) -> web.StreamResponse:
    if request.path == PREFIX:
        raise web.HTTPFound(PREFIX + "/")
    return web.FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file():
        raise ApiError(f"No dashboard file {name!r}.", status=404)
    return web.FileResponse(path, headers=SECURITY_HEADERS)


async def minutes(request: web.Request) -> web.Response:
    """Per-minute counts of the whole service (admins only: they count every project's events)."""
    if not ctx(request).is_admin:
        raise ApiError("The per-minute counts cover every project: admins only.", status=403)
    return web.json_response({"minutes": request.app[MINUTES_KEY].minutes()})


def _sse(kind: str, data: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def stream(request: web.Request) -> web.StreamResponse:
    """GET /dashboard/api/stream[?filter=EXPR]: the live tail as server-sent events (`event:
    event`, data = the event's summary), limited to the caller's project; a watcher that falls
    behind gets `event: missed` with how many it lost."""
    expression = request.query.get("filter")
    try:
        matcher = compile_filter(None, expression) if expression else None
    except FilterError as exc:
        raise BadRequest(str(exc)) from None
    feed = hw(request).feed
    try:
        watcher = feed.watch(ctx(request).list_scope(request), matcher)
    except TooManyWatchers as exc:
        raise ApiError(str(exc), status=503) from None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await response.write(b": headwater event tail\n\n")
        missed = 0
        while True:
            try:
                item = await asyncio.wait_for(watcher.queue.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if item is None:
                break  # the server is stopping
            if watcher.missed != missed:
                await response.write(_sse("missed", {"count": watcher.missed - missed}))
                missed = watcher.missed
            await response.write(_sse("event", item))
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the watcher went away, or the server is stopping
    finally:
        feed.unwatch(watcher)
    return response


async def check_filter(request: web.Request) -> web.Response:
    """POST /dashboard/api/filter {filters?, filter?, event?}: whether the filter is valid (the
    message names the fault) and, given a CloudEvent, whether it matches it and what failed."""
    body = await json_body(request)
    try:
        compile_filter(body.get("filters") or None, body.get("filter") or None)
    except FilterError as exc:
        return web.json_response({"valid": False, "error": str(exc)})
    answer: dict = {"valid": True}
    if body.get("event") is not None:
        doc = body["event"]
        if not isinstance(doc, dict):
            raise BadRequest("event must be a CloudEvent object.")
        try:
            event = Event.from_dict({SOURCE_KIND_EXTENSION: "http", **doc})
        except InvalidEvent as exc:
            raise BadRequest(f"Invalid CloudEvent: {exc}") from None
        reasons = explain(body.get("filters") or None, body.get("filter") or None, event)
        answer.update(matches=not reasons, reasons=reasons)
    return web.json_response(answer)


async def _start_series(app: web.Application) -> None:
    app[MINUTES_KEY].start()


async def _stop_series(app: web.Application) -> None:
    await app[MINUTES_KEY].stop()


async def _end_streams(app: web.Application) -> None:
    # Before the server waits for open requests to finish: a tail would otherwise hold it for its
    # whole shutdown timeout.
    app[APP_KEY].feed.close()


def routes(app: web.Application) -> None:
    app[MINUTES_KEY] = MinuteSeries(app[APP_KEY].metrics)
    app.on_startup.append(_start_series)
    app.on_shutdown.append(_end_streams)
    app.on_cleanup.append(_stop_series)
    app.router.add_get(PREFIX, page)
    app.router.add_get(PREFIX + "/", page)
    app.router.add_get(PREFIX + "/static/{name}", asset)
    app.router.add_get(PREFIX + "/api/minutes", minutes)
    app.router.add_get(PREFIX + "/api/stream", stream)
    app.router.add_post(PREFIX + "/api/filter", check_filter)
