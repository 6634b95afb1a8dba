"""Tracing: with a traceparent in the request's context and a collector in
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, an execution is one span (OTLP/JSON, standard library only), and
the function's context carries that span so the function's own spans join the trace."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.request

LOG = logging.getLogger("headwater.runtime.python3")

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def start_span(req: dict) -> dict | None:
    """The execution's span, or None when the request carries no trace or no collector is set."""
    context = req.get("context") if isinstance(req.get("context"), dict) else {}
    found = _TRACEPARENT.match(str(context.get("traceparent") or ""))
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not found or not endpoint:
        return None
    trace_id, parent, flags = found.groups()
    span_id = os.urandom(8).hex()
    req["context"] = {**context, "traceparent": f"00-{trace_id}-{span_id}-{flags}"}
    return {"endpoint": endpoint, "trace_id": trace_id, "parent": parent, "span_id": span_id, "start": time.time_ns()}


def export_span(span: dict, req: dict, result: dict) -> None:
    """Send the finished span to the collector (blocking: run it in an executor)."""
    def attr(key: str, value: str) -> dict:
        return {"key": key, "value": {"stringValue": str(value)}}

    body = {"resourceSpans": [{
        "resource": {"attributes": [attr("service.name", "headwater-runtime-python3")]},
        "scopeSpans": [{"scope": {"name": "headwater.runtime"}, "spans": [{
            "traceId": span["trace_id"], "spanId": span["span_id"], "parentSpanId": span["parent"],
            "name": f"runtime execute {req.get('entry') or 'main.main'}", "kind": 2,
            "startTimeUnixNano": str(span["start"]), "endTimeUnixNano": str(time.time_ns()),
            "attributes": [attr("headwater.execution_id", req.get("execution_id") or ""),
                           attr("headwater.status", result.get("status") or "")],
            "status": {"code": 1 if result.get("status") == "success" else 2}}]}]}]}
    request = urllib.request.Request(span["endpoint"], data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5):
            pass
    except Exception as exc:  # noqa: BLE001 - a collector that is away never fails an execution
        LOG.warning("span of execution %s not exported: %s", req.get("execution_id"), exc)
