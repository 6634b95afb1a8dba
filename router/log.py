"""Structured logging: one JSON object per line, carrying the event id and execution id in scope."""

from __future__ import annotations

import contextvars
import datetime as _dt
import logging
import sys
from typing import Any

import orjson

# Set by the dispatcher and the execution service so every line logged while handling an event or
# running an execution names it, without threading ids through every call.
current_event_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("event_id", default=None)
current_execution_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("execution_id", default=None)
# Set by router.tracing inside a span: lines logged there carry the trace id.
current_trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
    if "event_id" not in fields and (event_id := current_event_id.get()):
        fields["event_id"] = event_id
    if "execution_id" not in fields and (execution_id := current_execution_id.get()):
        fields["execution_id"] = execution_id
    if "trace_id" not in fields and (trace_id := current_trace_id.get()):
        fields["trace_id"] = trace_id
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(_context(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = _context(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Alembic announces every plugin it loads at INFO; the schema revision is logged by Headwater.
    logging.getLogger("alembic").setLevel(logging.WARNING)
