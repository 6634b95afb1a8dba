"""Error handling: every failure becomes a JSON body in Qinling's shape with the right status code."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from router import safejson

from router.executions import InvalidTarget, TargetUnavailable
from router.plugins import PackageInvalid, PackageStoreUnavailable, SubscriptionInvalid
from router.store import Conflict, NotFound
from router.store.repositories import InvalidFilter, VersionLimit

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    status = 400


class NotAllowed(ApiError):
    status = 403

    def __init__(self, message: str = "Operation not allowed"):
        super().__init__(message)


class ConflictError(ApiError):
    status = 409


_STATUS_BY_TYPE: list[tuple[type[BaseException], int]] = [
    (ApiError, 0),  # status taken from the instance
    (NotFound, 404),
    (TargetUnavailable, 409),
    (Conflict, 400),  # Qinling maps DBError (duplicates) to 400
    (InvalidTarget, 400),
    (PackageInvalid, 400),
    (PackageStoreUnavailable, 503),
    (SubscriptionInvalid, 400),
    (InvalidFilter, 400),
    (VersionLimit, 403),
    (FileNotFoundError, 404),  # a package missing from the store (Qinling's StorageNotFound)
    (safejson.UnsafeJSON, 400),
    # A malformed multipart body (a part name with a control character, a header line past
    # aiohttp's limit) surfaces while a handler reads it: the client's fault.
    (HttpProcessingError, 400),
]


def error_response(status: int, message: str) -> web.Response:
    body = {"faultcode": "Client" if status < 500 else "Server", "faultstring": message, "debuginfo": None}
    return web.json_response(body, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        response = error_response(exc.status, message)
        if "Allow" in exc.headers:  # a 405 says which methods the resource has (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:
        for exc_type, status in _STATUS_BY_TYPE:
            if isinstance(exc, exc_type):
                return error_response(status or exc.status, str(exc))
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "Internal server error.")


async def json_body(request: web.Request) -> dict:
    """The request's JSON object; 400 naming the fault when it is not one."""
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = safejson.loads(raw)
    except safejson.UnsafeJSON as exc:
        raise BadRequest(str(exc)) from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body
