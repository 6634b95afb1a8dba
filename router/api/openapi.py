"""The OpenAPI 3 document of the HTTP API, served at GET /v1/openapi.json (tests check the handlers against it)."""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from router import __version__
from router.api.common import hw
from router.api.subscriptions import MAX_BATCH
from router.policy import PUBLIC_ROUTES

JSON = "application/json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


STR = {"type": "string"}
NSTR = _nullable(STR)
INT = {"type": "integer"}
NINT = _nullable(INT)
BOOL = {"type": "boolean"}
TIME = _nullable({"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$"})
COMMON = {"id": STR, "project_id": STR, "created_at": TIME, "updated_at": TIME}


def _obj(properties: dict, required: tuple[str, ...] | None = None, **extra) -> dict:
    schema = {"type": "object", "properties": properties,
              "required": list(properties) if required is None else list(required), **extra}
    if not schema["required"]:
        del schema["required"]
    return schema


def _list_of(key: str, item: str) -> dict:
    return _obj({key: {"type": "array", "items": _ref(item)}})


def _any_case(*words: str) -> str:
    return "|".join("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in w) for w in words)


UUID = {"type": "string", "format": "uuid"}
NAME = {"type": "string", "minLength": 1}
# Integers travel as 64-bit values (the database and the bus carry no more); forms send them as text.
INT64 = {"type": "integer", "minimum": -(2 ** 63), "maximum": 2 ** 63 - 1}
INT_OR_TEXT = {"oneOf": [INT64, {"type": "string", "pattern": r"^-?\d{1,18}$"}]}
BOOL_OR_TEXT = {"oneOf": [{"type": "boolean", "nullable": True}, {"type": "integer", "enum": [0, 1]}, {"type": "string", "pattern": rf"^(?:{_any_case('true', 'false', 'yes', 'no', 'on', 'off')}|1|0)?$"}]}
# List filters compare an integer or a time column: `value` or `op:value` (documented: the plain value).
INT_FILTER = {"type": "string", "pattern": r"^-?\d{1,18}$"}
TIME_FILTER = {"type": "string", "format": "date-time"}
TIME_OR_EMPTY = {"type": "string", "anyOf": [{"format": "date-time"}, {"maxLength": 0}]}  # empty: no bound
# A webhook's signing secret (printable ASCII).
SECRET = {"type": "string", "pattern": "^[ -~]{16,255}$"}
# The projects a private runtime is shared with.
PROJECTS = {"type": "array", "nullable": True, "items": {"type": "string", "pattern": "^[!-~]{1,80}$"}, "maxItems": 1000}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"faultcode": {"type": "string", "enum": ["Client", "Server"]}, "faultstring": STR,
                   "debuginfo": _nullable(STR)}),
    "Versions": _obj({"versions": {"type": "array", "items": _obj({
        "id": STR, "status": STR, "links": {"type": "array", "items": _obj({"href": STR, "target": STR, "rel": STR})}})}}),
    "V1": _obj({"uri": STR}),
    "Runtime": _obj({**COMMON, "name": NSTR, "image": STR, "description": NSTR, "is_public": BOOL, "trusted": BOOL,
                     "status": {"type": "string", "enum": ["creating", "available", "upgrading", "error", "deleting"]}}),
    "RuntimePool": _obj({"name": STR, "capacity": _obj({"total": INT, "available": INT})}),
    # What a function's code is: one shape per source.
    "Code": {"oneOf": [
        _obj({"source": {"type": "string", "enum": ["package"]}, "md5sum": STR}, required=("source",)),
        _obj({"source": {"type": "string", "enum": ["swift"]}, "swift": _obj({"container": NAME, "object": NAME})},
             required=("source", "swift")),
        _obj({"source": {"type": "string", "enum": ["image"]}, "image": NAME}, required=("source", "image")),
    ]},
    "Function": _obj({**COMMON, "name": NSTR, "description": NSTR, "runtime_id": NSTR, "code": _ref("Code"),
                      "entry": NSTR, "cpu": INT, "memory_size": INT, "timeout": NINT, "count": INT, "latest_version": INT,
                      # The build step of compiled runtimes (go): building → available, or error with the compiler's message.
                      "status": {"type": "string", "enum": ["building", "available", "error"]}, "status_reason": NSTR}),
    "Worker": _obj({"function_id": STR, "function_version": INT, "worker_name": STR}),
    "FunctionVersion": _obj({**COMMON, "function_id": STR, "description": NSTR, "version_number": INT, "count": INT}),
    "FunctionAlias": _obj({**COMMON, "name": STR, "function_id": STR, "function_version": INT, "description": NSTR}),
    "Execution": _obj({**COMMON, "function_id": NSTR, "function_alias": NSTR, "function_version": INT,
                       "description": NSTR,
                       "status": {"type": "string", "enum": ["running", "retrying", "success", "failed", "error"]},
                       "sync": BOOL, "input": NSTR, "attempts": INT,
                       "started_at": _nullable({"type": "string", "description": "RFC 3339 UTC with milliseconds"}),
                       "finished_at": _nullable({"type": "string", "description": "RFC 3339 UTC with milliseconds; null while unfinished"}),
                       "result": _nullable({"type": "string", "description": "JSON text: {\"duration\": s, \"output\": …}"}),
                       "reason": NSTR, "event_id": NSTR, "subscription_id": NSTR}),
    "Job": _obj({**COMMON, "name": NSTR, "function_id": NSTR, "function_alias": NSTR, "function_version": NINT,
                 "function_input": NSTR, "status": {"type": "string", "enum": ["running", "paused", "done", "cancelled"]},
                 "pattern": NSTR, "count": NINT, "first_execution_time": TIME, "next_execution_time": TIME}),
    "Webhook": _obj({**COMMON, "function_id": NSTR, "function_alias": NSTR, "function_version": NINT,
                     "description": NSTR, "webhook_url": STR, "signed": BOOL}),
    # Owned by the subscriptions API; documented by shape so it can grow without breaking this document.
    "Subscription": {"type": "object", "properties": {"id": STR, "source": STR, "kind": STR}, "required": ["id", "source"],
                     "additionalProperties": True},
    "SubscriptionDryRun": {"type": "object", "properties": {"event_id": STR, "matches": {"type": "array"}},
                           "required": ["matches"], "additionalProperties": True},
    "DeadLetter": {"type": "object", "properties": {"id": STR, "source": STR, "reason": STR}, "required": ["id", "reason"],
                   "additionalProperties": True},
    "EventRecord": {"type": "object", "properties": {"id": STR, "event": {"type": "object"}}, "required": ["id"],
                    "additionalProperties": True},
    "DeadLetterReplayed": _obj({"deadletter_id": STR, "event_id": STR, "subscription_id": NSTR}),
    "Replayed": {"type": "object", "properties": {"replayed": INT, "skipped": INT}, "additionalProperties": True},
    "Invoked": _obj({"execution_id": STR, "event_id": STR}, required=("execution_id",)),
    "EventAccepted": _obj({"event_id": STR}),
    "Health": {"type": "object", "properties": {"status": STR, "version": STR}, "required": ["status"],
               "additionalProperties": True},
}

for _name, _item in (("runtimes", "Runtime"), ("functions", "Function"), ("workers", "Worker"),
                     ("function_versions", "FunctionVersion"), ("function_aliases", "FunctionAlias"),
                     ("executions", "Execution"), ("jobs", "Job"), ("webhooks", "Webhook"),
                     ("subscriptions", "Subscription"), ("deadletters", "DeadLetter"),
                     ("events", "EventRecord")):
    SCHEMAS[f"{_item}List"] = _list_of(_name, _item)
# A full page of executions says where the next one starts (the same query with marker and limit).
SCHEMAS["ExecutionList"]["properties"]["next"] = STR

# Request bodies. Properties are listed with their types; clients may send more (ignored, as Qinling).
TARGET = [{"required": ["function_id"]}, {"required": ["function_alias"]}]  # what runs: a function or an alias
SOURCE_KINDS = ("http", "cron")  # the sources the default configuration enables
# Limits within the default [resource_limits] ranges (an operator's configuration may widen them).
FUNCTION_FIELDS = {
    "code": {"type": "string", "description": "JSON text of the code object (an object is accepted too)"},
    "runtime_id": {"type": "string", "nullable": True, "anyOf": [{"format": "uuid"}, {"maxLength": 0}]}, "name": NSTR, "description": NSTR, "entry": NSTR,
    "cpu": {"type": "integer", "minimum": 100, "maximum": 300, "nullable": True},  # null: the default
    "memory_size": {"type": "integer", "minimum": 33554432, "maximum": 134217728, "nullable": True},
    "timeout": {"type": "integer", "minimum": 1, "maximum": 300, "nullable": True},
}
FORM_FIELDS = {"name": STR, "description": STR, "entry": STR,
               **{k: {key: v for key, v in FUNCTION_FIELDS[k].items() if key != "nullable"} for k in ("cpu", "memory_size", "timeout")}}
VERSION_NUMBER = {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1}, {"type": "string", "pattern": r"^\d{1,18}$"}]}
REQUESTS: dict[str, Any] = {
    "RuntimeCreate": _obj({"image": NAME, "name": NSTR, "description": NSTR, "is_public": BOOL_OR_TEXT,
                           "trusted": BOOL_OR_TEXT, "projects": PROJECTS}, required=("image",)),
    "RuntimeUpdate": _obj({"image": STR, "name": STR, "description": STR, "is_public": BOOL_OR_TEXT,
                           "projects": PROJECTS}, required=()),
    # Forms carry text: the code object as JSON text. A multipart form uploads a package; a urlencoded
    # one (no file) names an image or a Swift object.
    "FunctionForm": _obj({**FORM_FIELDS, "code": {"type": "string", "enum": ['{"source": "package"}']},
                          "runtime_id": UUID, "package": {"type": "string", "format": "binary"}},
                         required=("code", "runtime_id", "package"), additionalProperties=False),
    "FunctionImageForm": _obj({**FORM_FIELDS, "code": {"type": "string", "pattern": r'^\{"source": "image", "image": "[a-z0-9][a-z0-9./:-]{0,60}"\}$'}},
                              required=("code",), additionalProperties=False),
    # JSON carries no package: an image function (a Swift one needs a Swift store configured).
    "FunctionJson": _obj({**FUNCTION_FIELDS, "code": _obj({"source": {"type": "string", "enum": ["image"]}, "image": NAME})},
                         required=("code",),
                         additionalProperties=False),
    "FunctionUpdateForm": _obj({**{k: v for k, v in FUNCTION_FIELDS.items() if k != "runtime_id"},
                                "source": STR, "package": {"type": "string", "format": "binary"}}, required=()),
    "Count": _obj({"count": INT_OR_TEXT}),
    "VersionCreate": _obj({"description": STR}, required=()),
    "AliasCreate": _obj({"name": NAME, "function_id": UUID, "function_version": VERSION_NUMBER, "description": STR},
                        required=("name", "function_id")),
    "AliasUpdate": _obj({"function_id": NSTR, "function_version": _nullable(VERSION_NUMBER), "description": NSTR}, required=()),
    "ExecutionCreate": _obj({"function_id": UUID, "function_alias": NAME, "function_version": VERSION_NUMBER,
                             "sync": BOOL_OR_TEXT, "input": {"description": "text (parsed as JSON when it is JSON) or any JSON value"},
                             "description": STR}, required=(), anyOf=TARGET),
    "JobCreate": _obj({"function_id": UUID, "function_alias": NAME, "function_version": VERSION_NUMBER, "name": STR,
                       "function_input": STR, "pattern": STR, "first_execution_time": STR, "count": INT,
                       "timezone": STR}, required=(), anyOf=TARGET),
    "JobUpdate": _obj({"name": NSTR, "function_input": NSTR, "status": _nullable({"type": "string"}), "pattern": NSTR,
                       "next_execution_time": NSTR}, required=()),
    "WebhookCreate": _obj({"function_id": UUID, "function_alias": NAME, "function_version": VERSION_NUMBER,
                           "description": STR, "secret": SECRET},
                          required=(), anyOf=TARGET, additionalProperties=False),
    "WebhookUpdate": _obj({"function_id": NSTR, "function_alias": NSTR, "function_version": _nullable(VERSION_NUMBER),
                           "description": NSTR,
                           "secret": {"type": "string", "nullable": True, "anyOf": [SECRET, {"maxLength": 0}]}}, required=()),
    "SubscriptionCreate": {"type": "object", "properties": {"source": {"type": "string", "enum": list(SOURCE_KINDS)},
                                                            "function_id": UUID, "function_alias": NAME},
                           "required": ["source"], "anyOf": TARGET, "additionalProperties": True},
    # Items as SubscriptionCreate, listed without the fields it leaves open (so generated examples are
    # ones a server must accept or answer 404 for).
    "SubscriptionBatch": _obj({"subscriptions": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": {
        "type": "object", "properties": {"source": {"type": "string", "enum": list(SOURCE_KINDS)},
                                         "function_id": UUID, "function_alias": NAME},
        "required": ["source"], "anyOf": TARGET, "additionalProperties": False}}}),
    # A CloudEvent in structured mode (https://github.com/cloudevents/spec): the attributes Headwater checks.
    "CloudEvent": {"type": "object", "properties": {
        "specversion": {"type": "string", "enum": ["1.0"]}, "id": NAME, "source": NAME, "type": NAME, "subject": NSTR,
        "time": {"type": "string", "format": "date-time", "nullable": True}, "datacontenttype": NSTR, "dataschema": NSTR,
        "data": {}},
        "required": ["specversion", "id", "source", "type"],
        # Extension attributes (lower-case alphanumeric names, scalar values) are accepted too; OpenAPI
        # 3.0 cannot describe names by pattern, so the document lists none.
        "additionalProperties": False},
    "Replay": _obj({"subscription_id": UUID, "since": {"type": "string", "format": "date-time"},
                    "until": {"type": "string", "format": "date-time"}, "filter": STR,
                    "execution_status": {"type": "array", "items": {"type": "string", "enum": ["success", "failed", "error", "running"]}},
                    "force": {"type": "boolean"}, "limit": {"type": "integer", "minimum": 1, "maximum": 10000}},
                   required=("subscription_id", "since")),
}
SCHEMAS.update(REQUESTS)

_ERROR_TEXT = {400: "Invalid input", 401: "Missing or wrong credentials", 403: "Operation not allowed", 404: "Not found", 405: "Method not allowed",
               409: "Conflict (runtime not available)", 503: "Event could not be accepted"}
# With [auth] strategy = keystone every operation but the public ones (router.policy.PUBLIC_ROUTES)
# needs a token (401 without a valid one, WWW-Authenticate naming Keystone), is checked against its
# policy rule (403) and answers 503 while Keystone cannot be reached.
_AUTH_ERRORS = {"401": "No valid Keystone token (X-Auth-Token); WWW-Authenticate names Keystone",
                "403": "The policy rule of this action does not allow the caller's roles",
                "503": "Service unavailable (the identity service cannot be reached)"}


def _json(schema: str, description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": _ref(schema)}}}


def _op(summary: str, ok: int, body: str | None = None, *, errors: tuple[int, ...] = (400, 404), params: list | None = None,
        request: dict | None = None, ok_content: dict | None = None, tag: str = "qinling") -> dict:
    responses: dict[str, Any] = {}
    if ok == 204 or (ok == 202 and body is None and ok_content is None):
        responses[str(ok)] = {"description": "Done, no body"}
    elif ok_content is not None:
        responses[str(ok)] = {"description": summary, "content": ok_content}
    else:
        responses[str(ok)] = _json(body, summary)
    for status in errors:
        responses[str(status)] = _json("Error", _ERROR_TEXT[status])
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if params:
        op["parameters"] = params
    if request is not None:
        op["requestBody"] = request
    return op


def _path(name: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema or STR}


def _query(name: str, schema: dict | None = None, description: str = "") -> dict:
    param = {"name": name, "in": "query", "required": False, "schema": schema or STR}
    if description:
        param["description"] = description
    return param


def _body(schema: str, *, required: bool = True, form: str | None = None) -> dict:
    content: dict[str, Any] = {JSON: {"schema": _ref(schema)}}
    if form:
        content = {"multipart/form-data": {"schema": _ref(form)},
                   "application/x-www-form-urlencoded": {"schema": _ref(form)}, **content}
    return {"required": required, "content": content}


SCOPE = [_query("all_projects", BOOL_OR_TEXT, "Admins: every project's objects."),
         _query("project_id", STR, "Admins: this project's objects.")]
FILTER = "Qinling filter: a value, or op:value with op in eq neq in nin gt gte lt lte has."


_FILTER_TYPES = {"function_version": INT_FILTER, "created_at": TIME_FILTER, "updated_at": TIME_FILTER}


def _filters(*names: str) -> list:
    return SCOPE + [_query(n, _FILTER_TYPES.get(n, STR), FILTER) for n in names]


ID = [_path("id", UUID)]
VERSION = [_path("id", UUID), _path("version", {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1})]
ALIAS = [_path("name")]
ZIP = {"application/zip": {"schema": {"type": "string", "format": "binary"}}}

PATHS: dict[str, Any] = {
    "/": {"get": _op("API versions", 200, "Versions", errors=(), tag="discovery")},
    "/v1/": {"get": _op("The v1 API root", 200, "V1", errors=(), tag="discovery")},
    "/v1/openapi.json": {"get": _op("This document", 200, ok_content={JSON: {"schema": {"type": "object"}}}, errors=(),
                                    tag="discovery")},
    "/healthz": {"get": _op("Health", 200, "Health", errors=(), tag="operations")},
    "/metrics": {"get": _op("Prometheus metrics", 200, ok_content={"text/plain": {"schema": STR}}, errors=(),
                            tag="operations")},
    "/v1/runtimes": {
        "get": _op("List runtimes (public ones and the project's own)", 200, "RuntimeList", errors=(400,),
                   params=[SCOPE[0]]),
        "post": _op("Create a runtime (admin)", 201, "Runtime", errors=(400, 403), request=_body("RuntimeCreate")),
    },
    "/v1/runtimes/{id}": {
        "get": _op("Show a runtime", 200, "Runtime", params=ID),
        "put": _op("Update a runtime (admin)", 200, "Runtime", errors=(400, 403, 404, 409), params=ID,
                   request=_body("RuntimeUpdate", required=False)),
        "delete": _op("Delete a runtime no function uses (admin)", 204, errors=(400, 403, 404), params=ID),
    },
    "/v1/runtimes/{id}/pool": {"get": _op("Runtime capacity (admin)", 200, "RuntimePool", errors=(400, 403, 404),
                                          params=ID)},
    "/v1/functions": {
        "get": _op("List functions", 200, "FunctionList", errors=(400,),
                   params=_filters("name", "runtime_id", "description", "entry")),
        "post": _op("Create a function (package, swift or image)", 201, "Function", errors=(400, 404),
                    request={"required": True, "content": {
                        "multipart/form-data": {"schema": _ref("FunctionForm")},
                        "application/x-www-form-urlencoded": {"schema": _ref("FunctionImageForm")},
                        JSON: {"schema": _ref("FunctionJson")}}}),
    },
    "/v1/functions/{id}": {
        "get": _op("Show a function, or download its package with download=true (its built artifact with artifact=true)", 200,
                   "Function", errors=(400, 404, 405), params=ID + [_query("download", BOOL_OR_TEXT), _query("artifact", BOOL_OR_TEXT)],
                   ok_content={JSON: {"schema": _ref("Function")}, **ZIP}),
        "put": _op("Update a function", 200, "Function", errors=(400, 403, 404), params=ID,
                   request=_body("FunctionUpdateForm", required=False, form="FunctionUpdateForm")),
        "delete": _op("Delete a function nothing uses", 204, errors=(403, 404), params=ID),
    },
    "/v1/functions/{id}/detach": {"post": _op("Release the function's warm workers (admin)", 202, errors=(403, 404),
                                              params=ID)},
    "/v1/functions/{id}/scale_up": {"post": _op("Add warm workers (admin)", 202, errors=(400, 403, 404), params=ID,
                                                request=_body("Count"))},
    "/v1/functions/{id}/scale_down": {"post": _op("Remove warm workers (admin)", 202, errors=(400, 403, 404), params=ID,
                                                  request=_body("Count"))},
    "/v1/functions/{id}/workers": {"get": _op("Warm workers (admin)", 200, "WorkerList", errors=(400, 403, 404),
                                              params=ID + [_query("function_version", INT_OR_TEXT)])},
    "/v1/functions/{id}/versions": {
        "get": _op("List a function's versions", 200, "FunctionVersionList", errors=(404,), params=ID),
        "post": _op("Snapshot the function's package (and, for a compiled runtime, its built artifact) as a new version", 201,
                    "FunctionVersion", errors=(400, 403, 404, 409), params=ID, request=_body("VersionCreate", required=False)),
    },
    "/v1/functions/{id}/versions/{version}": {
        "get": _op("Show a version, or download its package with download=true (its built artifact with artifact=true)", 200,
                   "FunctionVersion", params=VERSION + [_query("download", BOOL_OR_TEXT), _query("artifact", BOOL_OR_TEXT)],
                   ok_content={JSON: {"schema": _ref("FunctionVersion")}, **ZIP}),
        "delete": _op("Delete a version nothing uses", 204, errors=(400, 403, 404), params=VERSION),
    },
    "/v1/functions/{id}/versions/{version}/detach": {
        "post": _op("Release the version's warm workers (admin)", 202, errors=(400, 403, 404), params=VERSION)},
    "/v1/functions/{id}/versions/{version}/scale_up": {
        "post": _op("Add warm workers to a version (admin)", 202, errors=(400, 403, 404), params=VERSION,
                    request=_body("Count"))},
    "/v1/functions/{id}/versions/{version}/scale_down": {
        "post": _op("Remove warm workers of a version (admin)", 202, errors=(400, 403, 404), params=VERSION,
                    request=_body("Count"))},
    "/v1/aliases": {
        "get": _op("List aliases", 200, "FunctionAliasList", errors=(400,),
                   params=_filters("name", "function_id", "function_version", "description")),
        "post": _op("Create an alias", 201, "FunctionAlias", errors=(400, 404), request=_body("AliasCreate")),
    },
    "/v1/aliases/{name}": {
        "get": _op("Show an alias", 200, "FunctionAlias", errors=(404,), params=ALIAS),
        "put": _op("Re-point or describe an alias", 200, "FunctionAlias", params=ALIAS,
                   request=_body("AliasUpdate", required=False)),
        "delete": _op("Delete an alias", 204, errors=(404,), params=ALIAS),
    },
    "/v1/executions": {
        "get": _op("List executions, oldest first, a page at a time", 200, "ExecutionList", errors=(400, 404),
                   params=_filters("function_id", "function_alias", "function_version", "status", "description",
                                   "subscription_id", "event_id", "created_at", "updated_at") + [
                       _query("limit", {"type": "string", "pattern": r"^(0*[1-9]\d{0,17})?$"},
                              "Executions per page: 1 to 1000 (more is taken as 1000); 100 when not given or empty."),
                       _query("marker", UUID, "The last execution id of the previous page (its `next` link); 404 if there is no such execution.")]),
        "post": _op("Run a function (sync by default)", 201, "Execution", errors=(400, 404, 409),
                    request=_body("ExecutionCreate")),
    },
    "/v1/executions/{id}": {
        "get": _op("Show an execution", 200, "Execution", errors=(404,), params=ID),
        "delete": _op("Delete an execution", 204, errors=(404,), params=ID),
    },
    "/v1/executions/{id}/log": {"get": _op("An execution's captured output", 200, errors=(404,), params=ID,
                                           ok_content={"text/plain": {"schema": STR}})},
    "/v1/jobs": {
        "get": _op("List jobs", 200, "JobList", errors=(400,),
                   params=_filters("name", "function_id", "function_alias", "status", "pattern")),
        "post": _op("Create a job (cron pattern and/or first execution time)", 201, "Job", errors=(400, 404),
                    request=_body("JobCreate")),
    },
    "/v1/jobs/{id}": {
        "get": _op("Show a job", 200, "Job", errors=(404,), params=ID),
        "put": _op("Update, pause, resume or cancel a job", 200, "Job", params=ID,
                   request=_body("JobUpdate", required=False)),
        "delete": _op("Delete a job", 204, errors=(404,), params=ID),
    },
    "/v1/webhooks": {
        "get": _op("List webhooks", 200, "WebhookList", errors=(400,),
                   params=_filters("function_id", "function_alias", "function_version", "description")),
        "post": _op("Create a webhook", 201, "Webhook", errors=(400, 404), request=_body("WebhookCreate")),
    },
    "/v1/webhooks/{id}": {
        "get": _op("Show a webhook", 200, "Webhook", errors=(404,), params=ID),
        "put": _op("Update a webhook", 200, "Webhook", params=ID, request=_body("WebhookUpdate", required=False)),
        "delete": _op("Delete a webhook", 204, errors=(404,), params=ID),
    },
    "/v1/webhooks/{id}/invoke": {"post": _op(
        "Invoke a webhook (no token; query, form and JSON body merge into the input; a webhook with a secret "
        "needs X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body>)", 202, "Invoked",
        errors=(400, 401, 404, 409, 503), params=ID, tag="events",
        request={"required": False, "content": {JSON: {"schema": {}},
                                                "application/x-www-form-urlencoded": {"schema": {"type": "object"}}}})},
    "/v1/events": {"get": _op(
        "The event history", 200, "EventRecordList", errors=(400,), tag="headwater",
        params=SCOPE + [_query(n) for n in ("source_kind", "type", "subject")]
        + [_query(n, TIME_OR_EMPTY) for n in ("since", "until")]
        + [_query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})]), "post": _op("Publish a CloudEvent (structured or binary mode)", 202, "EventAccepted", errors=(400,),
                               tag="events",
                               request={"required": True, "content": {"application/cloudevents+json": {"schema": _ref("CloudEvent")},
                                                                      JSON: {"schema": _ref("CloudEvent")}}})},
    "/v1/events/{id}": {"get": _op(
        "Show a recorded event and the routing decision for it (which subscriptions match, which do not and why)",
        200, "EventRecord", errors=(400, 404), tag="headwater",
        params=[_path("id", NAME), _query("subscription_id", STR, "Explain this subscription's verdict: the conditions that failed.")])},
    "/v1/events/replay": {"post": _op(
        "Replay recorded events to one subscription", 202, "Replayed", errors=(400, 404), tag="headwater",
        request=_body("Replay"))},
    "/v1/subscriptions": {
        "get": _op("List subscriptions", 200, "SubscriptionList", errors=(400,),
                   params=_filters("source", "kind", "name", "function_id", "function_alias", "status"), tag="headwater"),
        "post": _op("Create a subscription", 201, "Subscription", errors=(400, 404), request=_body("SubscriptionCreate"),
                    tag="headwater"),
    },
    "/v1/subscriptions/batch": {"post": _op(
        "Create many subscriptions in one transaction: all or none (a 400 or 404 names the first bad one)", 201,
        "SubscriptionList", errors=(400, 404), request=_body("SubscriptionBatch"), tag="headwater")},
    "/v1/subscriptions/test": {"post": _op(
        "Which subscriptions a CloudEvent would match (nothing runs)", 200, "SubscriptionDryRun", errors=(400,),
        params=SCOPE + [_query("source_kind", STR)], tag="headwater",
        request={"required": True, "content": {JSON: {"schema": _ref("CloudEvent")}}})},
    "/v1/deadletters": {"get": _op(
        "List dead letters", 200, "DeadLetterList", errors=(400,), tag="headwater",
        params=_filters("source", "subscription_id", "event_id", "created_at")
        + [_query("limit", {"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1})])},
    "/v1/deadletters/{id}": {
        "get": _op("Show a dead letter", 200, "DeadLetter", errors=(400, 404), params=ID, tag="headwater"),
        "delete": _op("Discard a dead letter", 204, errors=(400, 404), params=ID, tag="headwater")},
    "/v1/deadletters/{id}/replay": {"post": _op(
        "Publish a dead letter's event again (to its subscription) and remove the letter", 202, "DeadLetterReplayed",
        errors=(400, 404, 409), params=ID, tag="headwater")},
    "/v1/subscriptions/{id}": {
        "get": _op("Show a subscription", 200, "Subscription", errors=(404,), params=ID, tag="headwater"),
        "put": _op("Edit a subscription's name, description, types, filters, filter or status", 200, "Subscription",
                   errors=(400, 404), params=ID, tag="headwater",
                   request={"required": True, "content": {JSON: {"schema": {"type": "object"}}}}),
        "delete": _op("Delete a subscription", 204, errors=(404,), params=ID, tag="headwater"),
    },
}


def _with_auth(paths: dict) -> dict:
    """Every operation that needs a token (under Keystone) documents the answers authentication and
    policy give; public ones stay anonymous. No security scheme is declared: with auth off
    (noauth) no token is needed, and a document requiring one would be wrong there."""
    for path, operations in paths.items():
        for method, op in operations.items():
            if (method.upper(), path) in PUBLIC_ROUTES:
                continue
            for status, text in _AUTH_ERRORS.items():
                op["responses"].setdefault(status, _json("Error", text))
    return paths


def document(public_url: str = "http://127.0.0.1:7070") -> dict:
    """The whole document, with the server's public URL."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "Headwater API", "version": __version__,
                 "description": "OpenStack Qinling v1 compatible function API plus Headwater's subscriptions and "
                                "events. Errors are {faultcode, faultstring, debuginfo}. With auth off every request "
                                "is project `default` and admin. docs/qinling-compatibility.md lists every "
                                "difference from Qinling."},
        "servers": [{"url": public_url}],
        "tags": [{"name": t} for t in ("discovery", "qinling", "events", "headwater", "operations")],
        "paths": _with_auth(copy.deepcopy(PATHS)),
        "components": {"schemas": copy.deepcopy(SCHEMAS)},
    }


async def serve_document(request: web.Request) -> web.Response:
    return web.json_response(document(hw(request).config.api.public_url))


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/openapi.json", serve_document)
