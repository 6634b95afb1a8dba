"""Swift proxy filter (paste): tells ceilometermiddleware what Swift answered, so Headwater publishes only what happened.

ceilometermiddleware reports every request the proxy saw, with outcome `success` even for a 401,
404 or 503, and without the stored object's etag or size. This filter sits *after* `ceilometer`
in the proxy pipeline (nearer `proxy-server`) and, when Swift answers, writes the answer into the
request environment as `X-Headwater-*` request headers, which ceilometermiddleware reads when it
builds its notification (after the response) and copies when they are named in its
`metadata_headers`:

    [pipeline:main]
    pipeline = catch_errors proxy-logging ceilometer headwater copy slo dlo proxy-logging proxy-server

    [filter:headwater]
    paste.filter_factory = sources.swift_middleware:filter_factory

    [filter:ceilometer]
    ...
    metadata_headers = X-Headwater-Status, X-Headwater-Etag, X-Headwater-Content-Type, X-Headwater-Size,
                       X-Headwater-Large-Object, X-Headwater-Destination, X-Headwater-Copy-From

It runs inside the Swift proxy, so it imports nothing but the standard library (the proxy needs
only this file on its PYTHONPATH). Values a client sends in these headers are removed on the way
in: only the filter's own can reach the notification.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

PREFIX = "HTTP_X_HEADWATER_"
STATUS = PREFIX + "STATUS"
ETAG = PREFIX + "ETAG"
CONTENT_TYPE = PREFIX + "CONTENT_TYPE"
SIZE = PREFIX + "SIZE"
LARGE_OBJECT = PREFIX + "LARGE_OBJECT"
DESTINATION = PREFIX + "DESTINATION"
COPY_FROM = PREFIX + "COPY_FROM"
# What ceilometermiddleware's metadata_headers must name for these to reach the notification.
METADATA_HEADERS = ("X-Headwater-Status", "X-Headwater-Etag", "X-Headwater-Content-Type", "X-Headwater-Size",
                    "X-Headwater-Large-Object", "X-Headwater-Destination", "X-Headwater-Copy-From")


def _query_flag(env: dict[str, Any], name: str) -> str | None:
    for part in (env.get("QUERY_STRING") or "").split("&"):
        key, _, value = part.partition("=")
        if key == name:
            return value
    return None


class HeadwaterFilter:
    def __init__(self, app: Callable[..., Iterable[bytes]]):
        self.app = app

    def __call__(self, env: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        for key in [k for k in env if k.startswith(PREFIX)]:
            del env[key]  # a client's X-Headwater-* headers never reach the notification
        method = env.get("REQUEST_METHOD", "")
        if _query_flag(env, "multipart-manifest") == "put" or env.get("HTTP_X_STATIC_LARGE_OBJECT"):
            env[LARGE_OBJECT] = "slo"
        elif env.get("HTTP_X_OBJECT_MANIFEST"):
            env[LARGE_OBJECT] = "dlo"
        if method == "COPY" and env.get("HTTP_DESTINATION"):
            # COPY's path is the source; the object it creates is the Destination: <account>/<container>/<object>.
            account = env.get("HTTP_DESTINATION_ACCOUNT") or (env.get("PATH_INFO") or "").lstrip("/").split("/")[1:2]
            account = account if isinstance(account, str) else (account[0] if account else "")
            env[DESTINATION] = f"{account}/" + env["HTTP_DESTINATION"].lstrip("/")

        def record(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            env[STATUS] = status.split(" ", 1)[0]
            if env.get("HTTP_X_COPY_FROM"):
                # A server-side copy: Swift's copy middleware turns a COPY into a PUT of the destination
                # with X-Copy-From (in this same environment), as a client's PUT + X-Copy-From is.
                env[COPY_FROM] = env["HTTP_X_COPY_FROM"].lstrip("/")
            if method in ("PUT", "POST", "COPY") and status.startswith("2"):
                found = {name.lower(): value for name, value in headers}
                if found.get("etag"):
                    env[ETAG] = found["etag"].strip('"')
                # A PUT answer carries no Content-Type of the object; the request's is what Swift stored.
                if method == "PUT" and env.get("CONTENT_TYPE"):
                    env[CONTENT_TYPE] = env["CONTENT_TYPE"]
                if method == "PUT" and env.get("CONTENT_LENGTH") and LARGE_OBJECT not in env and COPY_FROM not in env:
                    env[SIZE] = env["CONTENT_LENGTH"]
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        return self.app(env, record)


def filter_factory(global_conf: dict[str, Any], **local_conf: Any) -> Callable[[Any], HeadwaterFilter]:
    return HeadwaterFilter
