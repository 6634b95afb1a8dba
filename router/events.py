"""The Event type: a CloudEvents 1.0 envelope in structured JSON mode, with deterministic ids."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import uuid
from typing import Any

import orjson

SPEC_VERSION = "1.0"

# Names reserved by the CloudEvents spec; everything else on the wire is an extension.
_CORE_ATTRIBUTES = frozenset(
    {"id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema", "data"}
)

# Namespace for ids derived from other ids (execution ids, cron ticks). Fixed forever: changing it
# would break de-duplication across an upgrade.
HEADWATER_NAMESPACE = uuid.UUID("8f0c7a52-3c1e-4d7e-9a55-6a4f4b1d2e10")


class InvalidEvent(ValueError):
    """Raised when a document is not a valid CloudEvents 1.0 structured event."""


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


_NAMESPACE_BYTES = HEADWATER_NAMESPACE.bytes


def derived_id(*parts: str) -> str:
    """A stable uuid for a tuple of ids: the same parts give the same id on every replica. It is
    uuid.uuid5(HEADWATER_NAMESPACE, "\x1f".join(parts)), computed without building UUID objects
    (this runs for every execution on the routing path)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + "\x1f".join(parts).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def execution_id_for(source: str, event_id: str, subscription_id: str) -> str:
    """The execution id of (event, subscription): what makes redelivery recognisable. An event is
    its `source` and `id` together (CloudEvents identity): two producers may both send id 1001."""
    return derived_id("execution", source, event_id, subscription_id)


@dataclasses.dataclass(slots=True)
class Event:
    """One thing that happened, normalised. `extensions` holds CloudEvents extension attributes
    (lower-case alphanumeric names), e.g. `projectid` and `partitionkey`."""

    id: str
    source: str
    type: str
    data: Any = None
    subject: str | None = None
    time: _dt.datetime | None = None
    datacontenttype: str | None = "application/json"
    dataschema: str | None = None
    extensions: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def project_id(self) -> str | None:
        return self.extensions.get("projectid")

    @property
    def partition_key(self) -> str | None:
        return self.extensions.get("partitionkey")

    def attribute(self, name: str) -> Any:
        """An attribute by its CloudEvents name, core or extension (None when absent)."""
        if name in _CORE_ATTRIBUTES:
            value = getattr(self, name)
            if name == "time" and value is not None:
                return _format_time(value)
            return value
        if name == "specversion":
            return SPEC_VERSION
        return self.extensions.get(name)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"specversion": SPEC_VERSION, "id": self.id, "source": self.source, "type": self.type}
        if self.subject is not None:
            doc["subject"] = self.subject
        if self.time is not None:
            doc["time"] = _format_time(self.time)
        if self.datacontenttype is not None:
            doc["datacontenttype"] = self.datacontenttype
        if self.dataschema is not None:
            doc["dataschema"] = self.dataschema
        doc.update(self.extensions)
        if self.data is not None:
            doc["data"] = self.data
        return doc

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Event:
        if not isinstance(doc, dict):
            raise InvalidEvent("a CloudEvent must be a JSON object")
        if doc.get("specversion") != SPEC_VERSION:
            raise InvalidEvent(f"specversion must be {SPEC_VERSION!r}, got {doc.get('specversion')!r}")
        for required in ("id", "source", "type"):
            value = doc.get(required)
            if not isinstance(value, str) or not value:
                raise InvalidEvent(f"attribute {required!r} must be a non-empty string")
        time_value = doc.get("time")
        parsed_time = None
        if time_value is not None:
            try:
                parsed_time = _dt.datetime.fromisoformat(str(time_value).replace("Z", "+00:00"))
            except ValueError as exc:
                raise InvalidEvent(f"attribute 'time' is not an RFC 3339 timestamp: {time_value!r}") from exc
        for optional in ("subject", "datacontenttype", "dataschema"):
            if doc.get(optional) is not None and not isinstance(doc[optional], str):
                raise InvalidEvent(f"attribute {optional!r} must be a string, not {type(doc[optional]).__name__}")
        extensions = {k: v for k, v in doc.items() if k not in _CORE_ATTRIBUTES and k != "specversion"}
        for name, value in extensions.items():
            if not (name.isalnum() and name.islower()) or len(name) > 20:
                raise InvalidEvent(f"extension attribute name {name!r} must be lower-case alphanumeric")
            # CloudEvents extension values are scalars (string, integer, boolean); anything else
            # would break matching and the history writer further down.
            if not isinstance(value, (str, int, bool)) or (isinstance(value, int) and not -(2 ** 31) <= value < 2 ** 31):
                raise InvalidEvent(f"extension attribute {name!r} must be a string, a 32-bit integer or a boolean")
        return cls(
            id=doc["id"],
            source=doc["source"],
            type=doc["type"],
            data=doc.get("data"),
            subject=doc.get("subject"),
            time=parsed_time,
            datacontenttype=doc.get("datacontenttype"),
            dataschema=doc.get("dataschema"),
            extensions=extensions,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(f"not JSON: {exc}") from exc
        return cls.from_dict(doc)


def _format_time(value: _dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc).isoformat().replace("+00:00", "Z")
