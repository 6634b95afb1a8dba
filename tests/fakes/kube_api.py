"""A fake Kubernetes API server for tests: the subset of the REST API the kubernetes engine uses, done right.

No real API server can be installed on the test machines, so this one serves, over real HTTP on
127.0.0.1, what `engine.kubernetes` touches through kubernetes-asyncio, with the semantics that matter:

* objects get a server-set ``uid``, ``resourceVersion`` (one cluster-wide counter) and, for
  Deployments, ``generation`` bumped on spec changes; ``generateName``; 409 AlreadyExists; 404;
  422 for invalid names/labels and for pod spec changes Kubernetes forbids;
* GET lists with ``labelSelector`` (=, ==, !=, exists, !exists, in, notin) and ``fieldSelector``;
* PATCH as strategic-merge (list merge keys for containers, env, ports, volumes, volumeMounts),
  JSON merge (RFC 7386) and JSON patch (RFC 6902); PUT; a ``metadata.resourceVersion`` in the body
  is a precondition: stale means 409 Conflict — the optimistic concurrency pool claims rely on;
* ``watch=true`` with ``resourceVersion`` (replay from the event log, 410 Gone when too old) and
  ``timeoutSeconds``, streamed as JSON lines;
* a Deployment controller: pods from the template with ``pod-template-hash``, owner references to a
  (virtual) ReplicaSet, pods whose labels stop matching the selector are *released* (owner
  reference removed) and replaced, rolling updates on template change, status replicas/ready/
  available/unavailable/updated, ``Progressing`` condition with ``ProgressDeadlineExceeded``;
* garbage collection of objects whose owner is gone; DELETE with grace period and
  ``propagationPolicy``; deletecollection;
* a fake kubelet that runs each pod's container as a local process on its own loopback IP
  (127.x.y.N, so every pod can listen on the same port), expanding ``$(VAR)`` from env and the
  downward API, mapping the image's files/binaries and emptyDir volumes onto a per-pod directory,
  probing ``readinessProbe.httpGet``, reporting Pending/Running/Succeeded/Failed with container
  states, ``ErrImagePull`` then ``ImagePullBackOff`` for an image it does not know (it knows only the
  runtime images, read from runtimes/*/Dockerfile, and the official ``python``: tests/fakes/kube_images.py),
  ``CreateContainerConfigError`` when ``runAsNonRoot`` meets an image that runs as root, ``activeDeadlineSeconds``, restarts for
  ``restartPolicy: Always``, and serving the container's output as the pod log;
* NodePort Services with a small kube-proxy forwarding 127.0.0.1:<nodePort> to a ready endpoint.

Time is compressed where waiting would only slow tests: probes run at most every ``probe_interval``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import dataclasses
import datetime as _dt
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import string
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.fakes.kube_images import FakeImage, default_images

LOG = logging.getLogger(__name__)

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff")
EVENT_LOG_SIZE = 20000


# ---------------------------------------------------------------------------------------------
# Small helpers


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def response(self) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}
        return web.json_response(body, status=self.code)


def _image_name(image: str) -> str:
    """Repository part of an image reference (no tag/digest)."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        ref = ref[: len(ref) - len(last)] + last.split(":", 1)[0]
    return ref


# Label selectors ------------------------------------------------------------------------------

_REQ = re.compile(r"\s*(!?)\s*([A-Za-z0-9./_-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def parse_selector(text: str | None) -> list[tuple[str, str, Any]]:
    if not text:
        return []
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    out = []
    for part in parts:
        if not part.strip():
            continue
        m = _REQ.match(part)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        neg, key, op, value, setop, values = m.groups()
        if neg and (op or setop):
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        if neg:
            out.append((key, "!exists", None))
        elif op:
            out.append((key, "=" if op in ("=", "==") else "!=", value))
        elif setop:
            out.append((key, setop, {v.strip() for v in values.split(",") if v.strip()}))
        else:
            out.append((key, "exists", None))
    return out


def selector_matches(reqs: list[tuple[str, str, Any]], labels: dict[str, str]) -> bool:
    for key, op, value in reqs:
        have = labels.get(key)
        if op == "=" and have != value:
            return False
        if op == "!=" and have == value:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
        if op == "in" and have not in value:
            return False
        if op == "notin" and have in value:
            return False
    return True


def label_selector_text(selector: dict) -> str:
    """A LabelSelector object (matchLabels/matchExpressions) as selector text."""
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        op = expr["operator"]
        if op in ("In", "NotIn"):
            parts.append(f"{expr['key']} {op.lower()} ({','.join(expr.get('values') or [])})")
        elif op == "Exists":
            parts.append(expr["key"])
        else:
            parts.append(f"!{expr['key']}")
    return ",".join(parts)


def field_matches(text: str | None, obj: dict) -> bool:
    if not text:
        return True
    for part in text.split(","):
        if not part.strip():
            continue
        neg = "!=" in part
        path, _, value = part.replace("!=", "=").replace("==", "=").partition("=")
        node: Any = obj
        for step in path.strip().split("."):
            node = node.get(step) if isinstance(node, dict) else None
        have = "" if node is None else str(node)
        if (have == value.strip()) == neg:
            return False
    return True


# Patches --------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}


def strategic_merge(target: Any, patch: Any, field: str | None = None) -> Any:
    """Strategic merge patch with the list merge keys of the types the engine patches."""
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        if patch.get("$patch") == "delete":
            return None
        result = dict(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if key.startswith("$"):
                continue
            if value is None:
                result.pop(key, None)
            else:
                merged = strategic_merge(result.get(key), value, key)
                if merged is None and isinstance(value, dict) and value.get("$patch") == "delete":
                    result.pop(key, None)
                else:
                    result[key] = merged
        return result
    if isinstance(patch, list) and field in MERGE_KEYS and isinstance(target, list):
        mkey = MERGE_KEYS[field]
        result = [copy.deepcopy(x) for x in target]
        for item in patch:
            if not isinstance(item, dict) or mkey not in item:
                raise ApiError(422, "Invalid", f"strategic merge patch: list {field} items need the merge key {mkey}")
            idx = next((i for i, x in enumerate(result) if x.get(mkey) == item[mkey]), None)
            if item.get("$patch") == "delete":
                if idx is not None:
                    result.pop(idx)
            elif idx is None:
                result.append({k: v for k, v in item.items() if k != "$patch"})
            else:
                result[idx] = strategic_merge(result[idx], item, None)
        return result
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"json patch: bad path {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, test, move, copy)."""
    doc = copy.deepcopy(doc)

    def parent(parts):
        node = doc
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        return node

    def get(parts):
        node = doc
        for p in parts:
            node = node[int(p)] if isinstance(node, list) else node[p]
        return node

    def remove(parts):
        par = parent(parts)
        return par.pop(int(parts[-1])) if isinstance(par, list) else par.pop(parts[-1])

    def add(parts, value):
        par = parent(parts)
        if isinstance(par, list):
            if parts[-1] == "-":
                par.append(value)
            else:
                par.insert(int(parts[-1]), value)
        else:
            par[parts[-1]] = value

    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "json patch must be a list of operations")
    try:
        for op in ops:
            kind, parts = op["op"], _pointer(op["path"])
            if kind == "add":
                add(parts, copy.deepcopy(op["value"]))
            elif kind == "remove":
                remove(parts)
            elif kind == "replace":
                remove(parts)
                add(parts, copy.deepcopy(op["value"]))
            elif kind == "test":
                if get(parts) != op["value"]:
                    raise ApiError(422, "Invalid", f"json patch test failed at {op['path']}")
            elif kind in ("move", "copy"):
                src = _pointer(op["from"])
                value = copy.deepcopy(get(src))
                if kind == "move":
                    remove(src)
                add(parts, value)
            else:
                raise ApiError(422, "Invalid", f"json patch: unknown op {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(422, "Invalid", f"json patch cannot be applied: {exc!r}") from None
    return doc


# ---------------------------------------------------------------------------------------------
# Resources

@dataclasses.dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    api_version: str
    namespaced: bool = True


RESOURCES = {
    ("v1", "pods"): Resource("pods", "Pod", "v1"),
    ("v1", "services"): Resource("services", "Service", "v1"),
    ("v1", "namespaces"): Resource("namespaces", "Namespace", "v1", namespaced=False),
    ("v1", "nodes"): Resource("nodes", "Node", "v1", namespaced=False),
    ("apps/v1", "deployments"): Resource("deployments", "Deployment", "apps/v1"),
}


@dataclasses.dataclass(eq=False)
class PodRuntime:
    """What the fake kubelet keeps for one pod."""

    name: str
    namespace: str
    ip: str
    root: Path
    task: asyncio.Task | None = None
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    killing: bool = False


class FakeKubernetes:
    """The fake cluster. `await start()` returns the API URL; `await stop()` kills every pod."""

    def __init__(self, images: dict[str, FakeImage] | None = None, *, probe_interval: float = 0.05,
                 pull_delay: float = 0.0, restart_backoff: float = 1.0):
        self.images = dict(default_images() if images is None else images)
        self.probe_interval = probe_interval
        self.pull_delay = pull_delay
        self.restart_backoff = restart_backoff
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.rv = 0
        # (resourceVersion, plural, namespace, type, object, labels before the change), sorted by resourceVersion
        self.events: list[tuple[int, str, str, str, dict, dict | None]] = []
        self._labels: dict[tuple[str, str, str], dict] = {}  # each live object's labels, for the above
        self.changed = asyncio.Condition()
        self.url = ""
        self.responses: list[tuple[str, str, int]] = []  # (method, path, status) of every API request, for tests
        self._pods: dict[tuple[str, str], PodRuntime] = {}
        self._proxies: dict[int, asyncio.AbstractServer] = {}
        # Pods share the host network, so each gets its own loopback address instead of a netns;
        # a random /16 keeps two fake clusters on one machine apart.
        self._net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
        self._ips = itertools.count(2)
        self._root = Path(tempfile.mkdtemp(prefix="fake-kube-"))
        self._runner: web.AppRunner | None = None
        self._controller: asyncio.Task | None = None
        self._dirty = asyncio.Event()
        self._stopping = False

    # -----------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> str:
        @web.middleware
        async def record(request: web.Request, handler):
            response = await handler(request)
            self.responses.append((request.method, request.path, response.status))
            return response

        app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[record])
        app.router.add_get("/version", self._version)
        for prefix, group in (("/api/v1", "v1"), ("/apis/apps/v1", "apps/v1")):
            app.router.add_route("*", prefix + "/namespaces/{ns}/pods/{name}/log", self._pod_log)
            app.router.add_route("*", prefix + "/namespaces/{ns}/{plural}/{name}/status", self._handle_status(group))
            app.router.add_route("*", prefix + "/namespaces/{ns}/{plural}/{name}", self._handle(group, item=True))
            app.router.add_route("*", prefix + "/namespaces/{ns}/{plural}", self._handle(group, item=False))
            app.router.add_route("*", prefix + "/{plural}/{name}", self._handle(group, item=True, cluster=True))
            app.router.add_route("*", prefix + "/{plural}", self._handle(group, item=False, cluster=True))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._put_raw("nodes", "", {"metadata": {"name": "fake-node-1", "labels": {"kubernetes.io/hostname": "fake-node-1"}},
                                    "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                                             {"type": "Hostname", "address": "fake-node-1"}],
                                               "conditions": [{"type": "Ready", "status": "True"}]}})
        self._put_raw("namespaces", "", {"metadata": {"name": "default"}, "status": {"phase": "Active"}})
        self._controller = asyncio.create_task(self._control_loop(), name="fake-kube-controller")
        return self.url

    async def stop(self) -> None:
        self._stopping = True
        if self._controller:
            self._controller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._controller
        await asyncio.gather(*(self._kill_pod(rt, grace=0.5) for rt in list(self._pods.values())), return_exceptions=True)
        for rt in list(self._pods.values()):
            if rt.task:
                rt.task.cancel()
        for server in self._proxies.values():
            server.close()
        if self._runner:
            await self._runner.cleanup()
        shutil.rmtree(self._root, ignore_errors=True)

    async def __aenter__(self) -> FakeKubernetes:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -----------------------------------------------------------------------------------------
    # The object store

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, kind: str, plural: str, ns: str, obj: dict) -> None:
        # The labels before this change ride along: a label-selector watch must see an object that
        # stops matching as DELETED (the API server's watch cache does this; pool claims rely on it).
        key = (plural, ns, obj["metadata"]["name"])
        before = self._labels.pop(key, None) if kind == "DELETED" else self._labels.get(key)
        if kind != "DELETED":
            self._labels[key] = dict(obj["metadata"].get("labels") or {})
        self.events.append((int(obj["metadata"]["resourceVersion"]), plural, ns, kind, copy.deepcopy(obj), before))
        if len(self.events) > 2 * EVENT_LOG_SIZE:
            del self.events[:EVENT_LOG_SIZE]
        self._dirty.set()
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _put_raw(self, plural: str, ns: str, obj: dict) -> dict:
        res = next(r for r in RESOURCES.values() if r.plural == plural)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now_iso())
        if res.namespaced:
            meta["namespace"] = ns
        meta["resourceVersion"] = self._next_rv()
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        self.objects[(plural, ns, meta["name"])] = obj
        self._emit("ADDED", plural, ns, obj)
        return obj

    def get(self, plural: str, ns: str, name: str) -> dict | None:
        return self.objects.get((plural, ns, name))

    def list(self, plural: str, ns: str | None = None, selector: str | None = None) -> list[dict]:
        reqs = parse_selector(selector)
        return [o for (p, n, _), o in sorted(self.objects.items()) if p == plural and (ns is None or n == ns)
                and selector_matches(reqs, o["metadata"].get("labels") or {})]

    def _create(self, plural: str, ns: str, body: dict) -> dict:
        res = next(r for r in RESOURCES.values() if r.plural == plural)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if res.namespaced and ("namespaces", "", ns) not in self.objects:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", f"{res.kind} is invalid: metadata.name: Required value: name or generateName is required")
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        if res.namespaced and meta.get("namespace") not in (None, ns):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request")
        self._validate(res, obj)
        if (plural, ns if res.namespaced else "", meta["name"]) in self.objects:
            raise ApiError(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists', {"name": meta["name"], "kind": plural})
        for key in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "generation"):
            meta.pop(key, None)
        if plural == "deployments":
            meta["generation"] = 1
            spec = obj.setdefault("spec", {})
            spec.setdefault("replicas", 1)
            spec.setdefault("progressDeadlineSeconds", 600)
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
            obj["status"] = {}
            selector = label_selector_text(spec.get("selector") or {})
            template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            if not selector or not selector_matches(parse_selector(selector), template_labels):
                raise ApiError(422, "Invalid", "Deployment is invalid: spec.template.metadata.labels: Invalid value: "
                               "`selector` does not match template `labels`")
        elif plural == "pods":
            spec = obj.setdefault("spec", {})
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            obj["status"] = {"phase": "Pending", "qosClass": _qos(spec)}
        elif plural == "services":
            self._allocate_service(obj)
        elif plural == "namespaces":
            obj["status"] = {"phase": "Active"}
        obj = self._put_raw(plural, ns if res.namespaced else "", obj)
        if plural == "pods":
            self._start_pod(ns, obj)
        if plural == "services":
            self._sync_proxies()
        return obj

    def _validate(self, res: Resource, obj: dict) -> None:
        meta = obj["metadata"]
        name = meta["name"]
        pattern, limit = (DNS1123_LABEL, 63) if res.plural in ("services", "namespaces") else (DNS1123_SUBDOMAIN, 253)
        if len(name) > limit or not pattern.match(name):
            raise ApiError(422, "Invalid", f'{res.kind} "{name}" is invalid: metadata.name: Invalid value: "{name}"')
        for key, value in (meta.get("labels") or {}).items():
            prefix, _, short = key.rpartition("/")
            if not LABEL_NAME.match(short) or len(short) > 63 or (prefix and not DNS1123_SUBDOMAIN.match(prefix)):
                raise ApiError(422, "Invalid", f'{res.kind} "{name}" is invalid: metadata.labels: Invalid value: "{key}"')
            if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
                raise ApiError(422, "Invalid", f'{res.kind} "{name}" is invalid: metadata.labels: Invalid value: "{value}"')
        if res.plural == "pods":
            containers = (obj.get("spec") or {}).get("containers") or []
            if not containers:
                raise ApiError(422, "Invalid", f'Pod "{name}" is invalid: spec.containers: Required value')
            for c in containers:
                if not c.get("name") or not c.get("image"):
                    raise ApiError(422, "Invalid", f'Pod "{name}" is invalid: spec.containers: name and image are required')

    def _update(self, plural: str, ns: str, name: str, new: dict, *, status_only: bool = False) -> dict:
        res = next(r for r in RESOURCES.values() if r.plural == plural)
        key = (plural, ns if res.namespaced else "", name)
        old = self.objects.get(key)
        if old is None:
            raise ApiError(404, "NotFound", f'{plural} "{name}" not found', {"name": name, "kind": plural})
        meta = new.setdefault("metadata", {})
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; '
                           "please apply your changes to the latest version and try again", {"name": name, "kind": plural})
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        for field in ("uid", "creationTimestamp", "deletionTimestamp", "namespace", "generation"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        meta["name"] = name
        if status_only:
            new = {**copy.deepcopy(old), "status": new.get("status", old.get("status"))}
        else:
            new["status"] = copy.deepcopy(old.get("status", {}))  # the main resource ignores status writes
            if plural == "pods":
                _check_pod_update(old, new)
            if plural == "deployments" and new.get("spec") != old.get("spec"):
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self._validate(res, new)
        new["kind"], new["apiVersion"] = res.kind, res.api_version
        new["metadata"]["resourceVersion"] = self._next_rv()
        if "deletionTimestamp" in old["metadata"]:
            new["metadata"]["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
        self.objects[key] = new
        self._emit("MODIFIED", plural, key[1], new)
        if plural == "services":
            self._sync_proxies()
        return new

    def _set_status(self, plural: str, ns: str, name: str, status: dict) -> dict | None:
        obj = self.objects.get((plural, ns, name))
        if obj is None or obj.get("status") == status:
            return obj
        return self._update(plural, ns, name, {"metadata": {"name": name}, "status": status}, status_only=True)

    def _delete(self, plural: str, ns: str, name: str, grace: float | None = None, propagation: str | None = None,
                preconditions: dict | None = None) -> dict:
        res = next(r for r in RESOURCES.values() if r.plural == plural)
        key = (plural, ns if res.namespaced else "", name)
        obj = self.objects.get(key)
        if obj is None:
            raise ApiError(404, "NotFound", f'{plural} "{name}" not found', {"name": name, "kind": plural})
        pre = preconditions or {}
        if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                           f"ResourceVersion in object meta: {obj['metadata']['resourceVersion']}")
        if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
            raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {obj['metadata']['uid']}")
        if plural == "pods":
            rt = self._pods.get((ns, name))
            if grace is None:
                grace = float(obj["spec"].get("terminationGracePeriodSeconds", 30))
            if rt is not None and (rt.process is not None and rt.process.returncode is None) and grace > 0:
                if "deletionTimestamp" not in obj["metadata"]:
                    obj = copy.deepcopy(obj)
                    obj["metadata"]["deletionTimestamp"] = now_iso()
                    obj["metadata"]["deletionGracePeriodSeconds"] = int(grace)
                    obj["metadata"]["resourceVersion"] = self._next_rv()
                    self.objects[key] = obj
                    self._emit("MODIFIED", plural, ns, obj)
                    asyncio.get_running_loop().create_task(self._terminate_then_remove(rt, grace))
                return obj
            if rt is not None:
                asyncio.get_running_loop().create_task(self._kill_pod(rt, grace=0))
        if propagation == "Orphan":
            for dep in self._dependents(obj["metadata"]["uid"]):
                self._update_meta(dep, lambda m: m.pop("ownerReferences", None))
        return self._remove(key)

    def _remove(self, key: tuple[str, str, str]) -> dict:
        obj = self.objects.pop(key)
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit("DELETED", key[0], key[1], obj)
        if key[0] == "pods":
            self._pods.pop((key[1], key[2]), None)
        if key[0] == "services":
            self._sync_proxies()
        return obj

    async def _terminate_then_remove(self, rt: PodRuntime, grace: float) -> None:
        await self._kill_pod(rt, grace=grace)
        key = ("pods", rt.namespace, rt.name)
        if key in self.objects:
            self._remove(key)

    def _update_meta(self, obj: dict, change) -> None:
        plural = next(r.plural for r in RESOURCES.values() if r.kind == obj["kind"])
        new = copy.deepcopy(obj)
        change(new["metadata"])
        new["metadata"].pop("resourceVersion", None)
        with contextlib.suppress(ApiError):
            self._update(plural, obj["metadata"].get("namespace", ""), obj["metadata"]["name"], new)

    def _dependents(self, uid: str) -> list[dict]:
        rs = "rs-" + uid + "-"
        return [o for o in self.objects.values()
                if any(ref.get("uid") == uid or (ref.get("uid") or "").startswith(rs) for ref in o["metadata"].get("ownerReferences") or [])]

    # -----------------------------------------------------------------------------------------
    # HTTP

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "30", "gitVersion": "v1.30.0-headwater-fake", "platform": "linux/amd64"})

    def _resource(self, group: str, plural: str) -> Resource:
        res = RESOURCES.get((group, plural))
        if res is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({group}/{plural})")
        return res

    def _handle(self, group: str, *, item: bool, cluster: bool = False):
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                res = self._resource(group, request.match_info["plural"])
                if cluster and res.namespaced and request.method != "GET":
                    raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
                ns = "" if cluster or not res.namespaced else request.match_info["ns"]
                if not res.namespaced and not cluster:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                if item:
                    return await self._item(request, res, ns, request.match_info["name"])
                return await self._collection(request, res, None if cluster and res.namespaced else ns)
            except ApiError as exc:
                return exc.response()
        return handler

    def _handle_status(self, group: str):
        async def handler(request: web.Request) -> web.Response:
            try:
                res = self._resource(group, request.match_info["plural"])
                ns, name = request.match_info["ns"], request.match_info["name"]
                obj = self.get(res.plural, ns, name)
                if obj is None:
                    raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found', {"name": name, "kind": res.plural})
                if request.method == "GET":
                    return web.json_response(obj)
                raise ApiError(405, "MethodNotAllowed", "status is written by the controllers of this fake")
            except ApiError as exc:
                return exc.response()
        return handler

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read() or b"null")
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not valid JSON") from None

    async def _item(self, request: web.Request, res: Resource, ns: str, name: str) -> web.StreamResponse:
        if request.method == "GET":
            obj = self.get(res.plural, ns, name)
            if obj is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found', {"name": name, "kind": res.plural})
            return web.json_response(obj)
        if request.method == "PUT":
            body = await self._body(request)
            return web.json_response(self._update(res.plural, ns, name, body))
        if request.method == "PATCH":
            obj = self.get(res.plural, ns, name)
            if obj is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found', {"name": name, "kind": res.plural})
            ctype = request.content_type
            body = await self._body(request)
            current = copy.deepcopy(obj)
            current["metadata"].pop("resourceVersion", None)  # only a resourceVersion in the patch is a precondition
            if ctype == "application/json-patch+json":
                merged = json_patch(obj, body)
                if merged["metadata"].get("resourceVersion") == obj["metadata"]["resourceVersion"]:
                    merged["metadata"].pop("resourceVersion")
            elif ctype == "application/merge-patch+json":
                merged = merge_patch(current, body)
            elif ctype == "application/strategic-merge-patch+json":
                if res.kind not in ("Pod", "Service", "Deployment", "Namespace", "Node"):
                    raise ApiError(415, "UnsupportedMediaType", "strategic merge patch is not supported for this kind")
                merged = strategic_merge(current, body)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted media "
                               f"types include: application/json-patch+json, application/merge-patch+json, "
                               f"application/strategic-merge-patch+json (got {ctype})")
            if not isinstance(merged, dict):
                raise ApiError(422, "Invalid", "the patch does not produce an object")
            return web.json_response(self._update(res.plural, ns, name, merged))
        if request.method == "DELETE":
            body = await self._body(request) or {}
            grace = request.query.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
            propagation = request.query.get("propagationPolicy", body.get("propagationPolicy"))
            obj = self._delete(res.plural, ns, name, None if grace is None else float(grace), propagation, body.get("preconditions"))
            return web.json_response(obj)
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not allowed here")

    async def _collection(self, request: web.Request, res: Resource, ns: str | None) -> web.StreamResponse:
        q = request.query
        if request.method == "GET":
            if q.get("watch", "").lower() in ("true", "1"):
                return await self._watch(request, res, ns)
            items = [o for o in self.list(res.plural, ns, q.get("labelSelector")) if field_matches(q.get("fieldSelector"), o)]
            return web.json_response({"kind": f"{res.kind}List", "apiVersion": res.api_version,
                                      "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        if request.method == "POST":
            body = await self._body(request)
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body must be an object")
            return web.json_response(self._create(res.plural, ns or "", body), status=201)
        if request.method == "DELETE":
            body = await self._body(request) or {}
            grace = request.query.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
            items = [o for o in self.list(res.plural, ns, q.get("labelSelector")) if field_matches(q.get("fieldSelector"), o)]
            done = []
            for o in items:
                with contextlib.suppress(ApiError):
                    done.append(self._delete(res.plural, o["metadata"].get("namespace", ""), o["metadata"]["name"],
                                             None if grace is None else float(grace), body.get("propagationPolicy")))
            return web.json_response({"kind": f"{res.kind}List", "apiVersion": res.api_version,
                                      "metadata": {"resourceVersion": str(self.rv)}, "items": done})
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not allowed here")

    async def _watch(self, request: web.Request, res: Resource, ns: str | None) -> web.StreamResponse:
        q = request.query
        reqs = parse_selector(q.get("labelSelector"))
        fields = q.get("fieldSelector")
        timeout = float(q.get("timeoutSeconds") or 1800)
        since = q.get("resourceVersion")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        def wanted(plural: str, obj_ns: str, obj: dict) -> bool:
            return (plural == res.plural and (ns is None or obj_ns == ns)
                    and selector_matches(reqs, obj["metadata"].get("labels") or {}) and field_matches(fields, obj))

        async def send(kind: str, obj: dict) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if not since or since == "0":
            # No starting point: the current state as synthetic ADDED events, then changes.
            cursor = self.rv
            for o in self.list(res.plural, ns):
                if wanted(res.plural, o["metadata"].get("namespace", ""), o):
                    await send("ADDED", o)
        else:
            cursor = int(since)
            oldest = self.events[0][0] if self.events else self.rv + 1
            if cursor < oldest - 1 and cursor < self.rv:
                await send("ERROR", {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
                                     "message": f"too old resource version: {cursor} ({oldest - 1})"})
                return resp
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while not self._stopping:
                start = bisect.bisect_right(self.events, cursor, key=lambda e: e[0])
                for rv, plural, obj_ns, kind, obj, before in self.events[start:]:
                    cursor = rv
                    if wanted(plural, obj_ns, obj):
                        matched_before = before is not None and selector_matches(reqs, before)
                        await send("ADDED" if kind == "MODIFIED" and before is not None and not matched_before else kind, obj)
                    elif kind == "MODIFIED" and before is not None and plural == res.plural and (ns is None or obj_ns == ns) \
                            and selector_matches(reqs, before) and field_matches(fields, obj):
                        await send("DELETED", obj)  # it left the selection
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                async with self.changed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), min(remaining, 1.0))
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    async def _pod_log(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = self.get("pods", ns, name)
        if obj is None:
            return ApiError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}).response()
        rt = self._pods.get((ns, name))
        if rt is None or rt.log_path is None or not rt.log_path.exists():
            return ApiError(400, "BadRequest", f'container "{obj["spec"]["containers"][0]["name"]}" in pod "{name}" is waiting to start: '
                            "ContainerCreating").response()
        data = rt.log_path.read_bytes()
        if request.query.get("tailLines"):
            data = b"".join(data.splitlines(keepends=True)[-int(request.query["tailLines"]):])
        if request.query.get("limitBytes"):
            data = data[: int(request.query["limitBytes"])]
        return web.Response(body=data, content_type="text/plain")

    # -----------------------------------------------------------------------------------------
    # Services and the NodePort proxy

    def _allocate_service(self, obj: dict) -> None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec["clusterIP"] = f"10.96.{random.randint(0, 255)}.{random.randint(1, 254)}"
        used = {p.get("nodePort") for o in self.list("services") for p in o["spec"].get("ports") or []}
        for port in spec.setdefault("ports", []):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
            if spec["type"] == "NodePort" and not port.get("nodePort"):
                while True:
                    candidate = random.randint(30000, 32767)
                    if candidate not in used:
                        port["nodePort"] = candidate
                        used.add(candidate)
                        break
        obj["status"] = {"loadBalancer": {}}

    def _sync_proxies(self) -> None:
        wanted = {}
        for svc in self.list("services"):
            if svc["spec"].get("type") == "NodePort":
                for port in svc["spec"]["ports"]:
                    wanted[port["nodePort"]] = (svc["metadata"]["namespace"], svc["metadata"]["name"], port)
        for node_port in list(self._proxies):
            if node_port not in wanted:
                self._proxies.pop(node_port).close()
        for node_port, target in wanted.items():
            if node_port not in self._proxies:
                asyncio.get_running_loop().create_task(self._open_proxy(node_port, *target))

    async def _open_proxy(self, node_port: int, ns: str, name: str, port: dict) -> None:
        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            svc = self.get("services", ns, name)
            endpoints = [] if svc is None else [
                p for p in self.list("pods", ns, label_selector_text({"matchLabels": svc["spec"].get("selector") or {}}))
                if _pod_ready(p) and p["status"].get("podIP")]
            if not endpoints or not (svc["spec"].get("selector")):
                writer.close()
                return
            pod = random.choice(endpoints)
            try:
                up_r, up_w = await asyncio.open_connection(pod["status"]["podIP"], int(port["targetPort"]))
            except OSError:
                writer.close()
                return

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(Exception):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                with contextlib.suppress(Exception):
                    dst.close()

            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

        if node_port in self._proxies:
            return
        try:
            self._proxies[node_port] = await asyncio.start_server(forward, "127.0.0.1", node_port)
        except OSError as exc:
            LOG.warning("fake kube-proxy cannot listen on node port %d: %s", node_port, exc)

    # -----------------------------------------------------------------------------------------
    # Controllers: deployments, garbage collection

    async def _control_loop(self) -> None:
        # `_stopping` ends the loop too: Python 3.11's wait_for can swallow a cancellation.
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await self._dirty.wait()
            self._dirty.clear()
            try:
                for dep in [o for o in self.objects.values() if o["kind"] == "Deployment"]:
                    self._reconcile_deployment(dep)
                self._collect_garbage()
            except Exception:  # noqa: BLE001 - a controller bug must show, not kill the loop
                LOG.exception("fake kube controller failed")
            await asyncio.sleep(0.01)

    def _collect_garbage(self) -> None:
        uids = {o["metadata"]["uid"] for o in self.objects.values()}
        prefixes = tuple(_rs_uid_prefix(o) for o in self.objects.values() if o["kind"] == "Deployment")

        def alive(ref: dict) -> bool:
            uid = ref.get("uid") or ""
            return uid in uids or (bool(prefixes) and uid.startswith(prefixes))

        for obj in list(self.objects.values()):
            refs = obj["metadata"].get("ownerReferences") or []
            if refs and not any(alive(ref) for ref in refs) and "deletionTimestamp" not in obj["metadata"]:
                plural = next(r.plural for r in RESOURCES.values() if r.kind == obj["kind"])
                with contextlib.suppress(ApiError):
                    self._delete(plural, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])

    def _reconcile_deployment(self, dep: dict) -> None:
        ns, name = dep["metadata"]["namespace"], dep["metadata"]["name"]
        spec = dep["spec"]
        selector = parse_selector(label_selector_text(spec["selector"]))
        template = spec["template"]
        thash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        owned, current, old = [], [], []
        for pod in self.list("pods", ns):
            refs = pod["metadata"].get("ownerReferences") or []
            mine = [r for r in refs if r.get("uid", "").startswith(_rs_uid_prefix(dep))]
            if not mine:
                continue
            labels = pod["metadata"].get("labels") or {}
            if not selector_matches(selector, labels):
                # The ReplicaSet releases a pod relabelled out of its selector, and replaces it.
                self._update_meta(pod, lambda m, mine=mine: m.__setitem__(
                    "ownerReferences", [r for r in m.get("ownerReferences") or [] if r not in mine]))
                continue
            if "deletionTimestamp" in pod["metadata"] or pod["status"].get("phase") in ("Failed", "Succeeded"):
                continue
            owned.append(pod)
            (current if labels.get("pod-template-hash") == thash else old).append(pod)
        want = int(spec.get("replicas", 1))
        strategy = (spec.get("strategy") or {})
        rolling = strategy.get("rollingUpdate") or {}
        surge = _scaled(rolling.get("maxSurge", "25%"), want, up=True) if strategy.get("type", "RollingUpdate") == "RollingUpdate" else 0
        unavailable = _scaled(rolling.get("maxUnavailable", "25%"), want, up=False)
        if strategy.get("type") == "Recreate":
            surge, unavailable = 0, want
        if surge == 0 and unavailable == 0:
            surge = 1
        ready_current = [p for p in current if _pod_ready(p)]
        # Scale the current ReplicaSet towards `want`, within the surge allowance.
        if len(current) < want:
            room = max(0, want + surge - len(current) - len(old)) if old else want - len(current)
            for _ in range(min(room, want - len(current))):
                self._create_pod_from_template(dep, thash)
        elif len(current) > want:
            extra = sorted(current, key=lambda p: (_pod_ready(p), p["metadata"]["creationTimestamp"]))[: len(current) - want]
            for pod in extra:
                with contextlib.suppress(ApiError):
                    self._delete("pods", ns, pod["metadata"]["name"])
        # Retire old pods as new ones become ready, keeping at least want - maxUnavailable available.
        if old:
            ready_old = [p for p in old if _pod_ready(p)]
            floor = want - unavailable
            removable = len(ready_current) + len(ready_old) - floor
            not_ready_old = [p for p in old if not _pod_ready(p)]
            for pod in not_ready_old + ready_old[: max(0, removable)]:
                with contextlib.suppress(ApiError):
                    self._delete("pods", ns, pod["metadata"]["name"])
        # Status.
        ready = [p for p in owned if _pod_ready(p)]
        conditions = [c for c in (dep.get("status") or {}).get("conditions") or [] if c["type"] != "Progressing"]
        progress = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
        complete = len(current) == want and len(ready_current) == want and not old
        if not complete:
            started = dep.get("status", {}).get("_rolloutStarted") if dep.get("status", {}).get("_rolloutHash") == thash else None
            progress = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
            deadline = float(spec.get("progressDeadlineSeconds", 600))
            if started is not None and asyncio.get_running_loop().time() - started > deadline:
                progress = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                            "message": f'ReplicaSet "{name}-{thash}" has timed out progressing.'}
        conditions.append(progress)
        available = min(len(ready), want) if complete else len(ready)
        status = {"observedGeneration": dep["metadata"].get("generation", 1), "replicas": len(owned),
                  "updatedReplicas": len(current), "readyReplicas": len(ready), "availableReplicas": available,
                  "conditions": conditions}
        if want - available > 0:
            status["unavailableReplicas"] = want - available
        # Rollout bookkeeping rides along in status (a fake-only field a client ignores).
        prev = dep.get("status") or {}
        status["_rolloutHash"] = thash
        status["_rolloutStarted"] = prev.get("_rolloutStarted") if prev.get("_rolloutHash") == thash else asyncio.get_running_loop().time()
        self._set_status("deployments", ns, name, status)

    def _create_pod_from_template(self, dep: dict, thash: str) -> None:
        template = copy.deepcopy(dep["spec"]["template"])
        meta = template.get("metadata") or {}
        labels = dict(meta.get("labels") or {})
        labels["pod-template-hash"] = thash
        rs_name = f"{dep['metadata']['name']}-{thash}"
        body = {"metadata": {"generateName": rs_name + "-", "labels": labels, "annotations": meta.get("annotations") or {},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                                                  "uid": _rs_uid_prefix(dep) + thash, "controller": True, "blockOwnerDeletion": True}]},
                "spec": template.get("spec") or {}}
        self._create("pods", dep["metadata"]["namespace"], body)

    # -----------------------------------------------------------------------------------------
    # The fake kubelet

    def _start_pod(self, ns: str, pod: dict) -> None:
        name = pod["metadata"]["name"]
        rt = PodRuntime(name=name, namespace=ns, ip=f"{self._net}.{next(self._ips) % 254 + 1}", root=self._root / f"{ns}-{name}")
        self._pods[(ns, name)] = rt
        rt.task = asyncio.get_running_loop().create_task(self._run_pod(rt), name=f"fake-kubelet-{name}")

    def _pod_status(self, rt: PodRuntime, **changes) -> dict | None:
        pod = self.get("pods", rt.namespace, rt.name)
        if pod is None:
            return None
        status = copy.deepcopy(pod["status"])
        status.update(changes)
        return self._set_status("pods", rt.namespace, rt.name, status)

    async def _run_pod(self, rt: PodRuntime) -> None:
        pod = self.get("pods", rt.namespace, rt.name)
        if pod is None:
            return
        container = pod["spec"]["containers"][0]
        cname = container["name"]
        started_at = now_iso()
        self._pod_status(rt, podIP=rt.ip, podIPs=[{"ip": rt.ip}], hostIP="127.0.0.1", startTime=started_at,
                         conditions=[{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
                         containerStatuses=[{"name": cname, "image": container["image"], "imageID": _image_id(container["image"]), "ready": False, "restartCount": 0,
                                             "state": {"waiting": {"reason": "ContainerCreating"}}}])
        if pod["spec"].get("nodeName") is None:
            new = copy.deepcopy(self.get("pods", rt.namespace, rt.name))
            if new is None:
                return
            new["spec"]["nodeName"] = "fake-node-1"
            new["metadata"].pop("resourceVersion", None)
            self.objects[("pods", rt.namespace, rt.name)] = {**new, "metadata": {**new["metadata"], "resourceVersion": self._next_rv()}}
            self._emit("MODIFIED", "pods", rt.namespace, self.objects[("pods", rt.namespace, rt.name)])
        if self.pull_delay:
            await asyncio.sleep(self.pull_delay)
        image = self.images.get(_image_name(container["image"]))
        if image is None:
            reason = "ErrImagePull"
            for _ in range(2):
                self._pod_status(rt, containerStatuses=[{
                    "name": cname, "image": container["image"], "imageID": _image_id(container["image"]), "ready": False, "restartCount": 0,
                    "state": {"waiting": {"reason": reason, "message": f'failed to pull and unpack image "{container["image"]}": '
                                          "pull access denied, repository does not exist or may require authorization"}}}])
                await asyncio.sleep(0.5)
                reason = "ImagePullBackOff"
            return
        if (refusal := _non_root_refusal(pod, container, image)) is not None:
            # The kubelet checks before it starts anything, and keeps the pod Pending.
            self._pod_status(rt, containerStatuses=[{
                "name": cname, "image": container["image"], "imageID": _image_id(container["image"]), "ready": False, "restartCount": 0,
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": refusal}}}])
            return
        restarts = 0
        deadline = pod["spec"].get("activeDeadlineSeconds")
        loop = asyncio.get_running_loop()
        began = loop.time()
        while True:
            code = await self._run_container(rt, pod, container, image, restarts,
                                             None if deadline is None else max(0.0, began + float(deadline) - loop.time()))
            if rt.killing or self.get("pods", rt.namespace, rt.name) is None:
                return
            if code == "deadline":
                self._pod_status(rt, phase="Failed", reason="DeadlineExceeded",
                                 message="Pod was active on the node longer than the specified deadline",
                                 conditions=[{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}])
                return
            policy = pod["spec"].get("restartPolicy", "Always")
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                return
            restarts += 1
            self._back_off(rt, restarts)
            await asyncio.sleep(self.restart_backoff)

    async def _run_container(self, rt: PodRuntime, pod: dict, container: dict, image: FakeImage, restarts: int,
                             deadline: float | None) -> int | str:
        cname = container["name"]
        env = self._container_env(pod, container, rt)
        argv = [_expand(a, env) for a in (container.get("command") or image.entrypoint)]
        argv += [_expand(a, env) for a in (container.get("args") if "args" in container else ([] if container.get("command") else image.cmd))]
        volumes = {}
        for mount in container.get("volumeMounts") or []:
            vol = next((v for v in pod["spec"].get("volumes") or [] if v["name"] == mount["name"]), None)
            if vol is not None and "emptyDir" in vol:
                host = rt.root / "volumes" / vol["name"]
                host.mkdir(parents=True, exist_ok=True)
                volumes[mount["mountPath"].rstrip("/")] = str(host)
        rootfs = rt.root / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)

        def host_path(arg: str) -> str:
            if not arg.startswith("/"):
                return arg
            if arg in image.files:
                return image.files[arg]
            for mount_path, host in sorted(volumes.items(), key=lambda kv: -len(kv[0])):
                if arg == mount_path or arg.startswith(mount_path + "/"):
                    return host + arg[len(mount_path):]
            return str(rootfs) + arg

        if not argv:
            return await self._container_failed(rt, container, 128, "no command")
        if argv[0] not in image.binaries and not argv[0].startswith("/"):
            # Only the image's own programs are on its PATH (never the host's), as in a real container.
            return await self._container_failed(rt, container, 128, f'exec: "{argv[0]}": executable file not found in $PATH')
        argv = [image.binaries.get(argv[0], host_path(argv[0]))] + [host_path(a) for a in argv[1:]]
        cwd = host_path(container.get("workingDir") or image.workdir)
        os.makedirs(cwd, exist_ok=True)
        rt.log_path = rt.root / f"{cname}-{restarts}.log"
        log = open(rt.log_path, "wb")
        proc_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(rootfs), "HOSTNAME": rt.name, **image.env, **env}
        try:
            rt.process = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=proc_env, stdin=asyncio.subprocess.DEVNULL,
                                                              stdout=log, stderr=log, start_new_session=True,
                                                              preexec_fn=_die_with_parent)
        except OSError as exc:
            return await self._container_failed(rt, container, 128, f"StartError: {exc}")
        finally:
            log.close()
        started = now_iso()
        probe = container.get("readinessProbe")
        self._pod_status(rt, phase="Running", conditions=[{"type": "PodScheduled", "status": "True"},
                                                          {"type": "Ready", "status": "True" if not probe else "False"},
                                                          {"type": "ContainersReady", "status": "True" if not probe else "False"}],
                         containerStatuses=[{"name": cname, "image": container["image"], "imageID": _image_id(container["image"]), "ready": not probe, "restartCount": restarts,
                                             "started": True, "state": {"running": {"startedAt": started}}}])
        prober = asyncio.get_running_loop().create_task(self._probe(rt, container, probe, restarts)) if probe else None
        try:
            if deadline is not None:
                try:
                    code = await asyncio.wait_for(rt.process.wait(), deadline)
                except asyncio.TimeoutError:
                    await self._kill_process(rt.process, 0)
                    return "deadline"
            else:
                code = await rt.process.wait()
        finally:
            if prober:
                prober.cancel()
        if rt.killing or self.get("pods", rt.namespace, rt.name) is None:
            return code
        reason = "Completed" if code == 0 else ("OOMKilled" if code == -signal.SIGKILL else "Error")
        exit_code = code if code >= 0 else 128 - code
        policy = self.get("pods", rt.namespace, rt.name)["spec"].get("restartPolicy", "Always")
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now_iso()}
        phase = "Running"
        if policy == "Never" or (policy == "OnFailure" and exit_code == 0):
            phase = "Succeeded" if exit_code == 0 else "Failed"
        self._pod_status(rt, phase=phase, conditions=[{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"},
                                                      {"type": "ContainersReady", "status": "False"}],
                         containerStatuses=[{"name": cname, "image": container["image"], "imageID": _image_id(container["image"]), "ready": False, "restartCount": restarts,
                                             "started": False, "state": {"terminated": terminated}, "lastState": {}}])
        return exit_code

    async def _container_failed(self, rt: PodRuntime, container: dict, code: int, message: str) -> int:
        """The container's command could not be started (containerd's StartError)."""
        pod = self.get("pods", rt.namespace, rt.name)
        policy = pod["spec"].get("restartPolicy", "Always") if pod else "Always"
        # With a restart policy the kubelet keeps trying: the pod stays Pending, never Failed.
        self._pod_status(rt, phase="Failed" if policy == "Never" else "Pending", containerStatuses=[{
            "name": container["name"], "image": container["image"], "imageID": _image_id(container["image"]), "ready": False, "restartCount": 0,
            "started": False, "state": {"terminated": {"exitCode": code, "reason": "StartError", "message": message,
                                                       "startedAt": now_iso(), "finishedAt": now_iso()}}}])
        return code

    def _back_off(self, rt: PodRuntime, restarts: int) -> None:
        """Between restarts of a failed container the kubelet reports CrashLoopBackOff, with the
        failure that caused it as lastState."""
        pod = self.get("pods", rt.namespace, rt.name)
        if pod is None:
            return
        statuses = copy.deepcopy(pod["status"].get("containerStatuses") or [])
        for status in statuses:
            last = status.get("state", {}).get("terminated")
            status.update(restartCount=restarts, ready=False, started=False,
                          state={"waiting": {"reason": "CrashLoopBackOff",
                                             "message": f"back-off restarting failed container {status['name']} in pod {rt.name}"}},
                          lastState={"terminated": last} if last else status.get("lastState", {}))
        self._pod_status(rt, containerStatuses=statuses)

    def _container_env(self, pod: dict, container: dict, rt: PodRuntime) -> dict[str, str]:
        env: dict[str, str] = {}
        fields = {"status.podIP": rt.ip, "metadata.name": rt.name, "metadata.namespace": rt.namespace,
                  "metadata.uid": pod["metadata"]["uid"], "spec.nodeName": "fake-node-1", "status.hostIP": "127.0.0.1"}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = _expand(str(item["value"]), env)
            elif (ref := (item.get("valueFrom") or {}).get("fieldRef")) is not None:
                env[item["name"]] = fields.get(ref["fieldPath"], "")
            elif (ref := (item.get("valueFrom") or {}).get("resourceFieldRef")) is not None:
                limits = (container.get("resources") or {}).get("limits") or {}
                env[item["name"]] = str(limits.get(ref["resource"].split(".", 1)[1], "0"))
        return env

    async def _probe(self, rt: PodRuntime, container: dict, probe: dict, restarts: int) -> None:
        http = probe.get("httpGet") or {}
        port = http.get("port")
        if isinstance(port, str):
            port = next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port), port)
        url = f"http://{rt.ip}:{port}{http.get('path', '/')}"
        interval = min(float(probe.get("periodSeconds", 10)), self.probe_interval)
        await asyncio.sleep(min(float(probe.get("initialDelaySeconds", 0)), self.probe_interval))
        ready = False
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=float(probe.get("timeoutSeconds", 1)))) as resp:
                        ok = 200 <= resp.status < 400
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    ok = False
                if ok != ready:
                    ready = ok
                    pod = self.get("pods", rt.namespace, rt.name)
                    if pod is None:
                        return
                    statuses = copy.deepcopy(pod["status"].get("containerStatuses") or [])
                    for st in statuses:
                        st["ready"] = ok
                    flag = "True" if ok else "False"
                    self._pod_status(rt, conditions=[{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": flag},
                                                     {"type": "ContainersReady", "status": flag}], containerStatuses=statuses)
                await asyncio.sleep(interval)

    async def _kill_pod(self, rt: PodRuntime, grace: float) -> None:
        rt.killing = True
        if rt.process is not None and rt.process.returncode is None:
            await self._kill_process(rt.process, grace)
        if rt.task is not None and not rt.task.done():
            rt.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await rt.task

    @staticmethod
    async def _kill_process(process: asyncio.subprocess.Process, grace: float) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            await asyncio.wait_for(process.wait(), grace if grace > 0 else 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), 5)

    # -----------------------------------------------------------------------------------------
    # Test helpers

    def pod_pid(self, ns: str, name: str) -> int | None:
        rt = self._pods.get((ns, name))
        return rt.process.pid if rt and rt.process else None


def _non_root_refusal(pod: dict, container: dict, image: FakeImage) -> str | None:
    """The kubelet's runAsNonRoot check: an image whose USER is root (or unset) and no runAsUser."""
    pod_ctx, ctx = pod["spec"].get("securityContext") or {}, container.get("securityContext") or {}
    if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
        return None
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    user = str(uid) if uid is not None else image.user.split(":", 1)[0]
    if user in ("", "0", "root"):
        return "container has runAsNonRoot and image will run as root"
    if uid is None and not user.isdigit():
        return f"container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root"
    return None


def _rs_uid_prefix(dep: dict) -> str:
    return "rs-" + dep["metadata"]["uid"] + "-"


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, so a killed test run leaves no pods."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _image_id(image: str) -> str:
    return "docker.io/" + _image_name(image) + "@sha256:" + hashlib.sha256(image.encode()).hexdigest()


def _scaled(value: Any, total: int, *, up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = total * float(value[:-1]) / 100
        return math.ceil(exact) if up else math.floor(exact)
    return int(value)


def _pod_ready(pod: dict) -> bool:
    if "deletionTimestamp" in pod["metadata"]:
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions") or [])


def _qos(spec: dict) -> str:
    resources = [c.get("resources") or {} for c in spec.get("containers") or []]
    if not any(r.get("limits") or r.get("requests") for r in resources):
        return "BestEffort"
    if all((r.get("limits") or {}).get("cpu") and (r.get("limits") or {}).get("memory") for r in resources):
        return "Guaranteed"
    return "Burstable"


def _check_pod_update(old: dict, new: dict) -> None:
    """Kubernetes lets a pod's spec change only in container images (and a few fields we do not use)."""
    def strip(spec: dict) -> dict:
        spec = copy.deepcopy(spec or {})
        for c in spec.get("containers") or []:
            c.pop("image", None)
        spec.pop("activeDeadlineSeconds", None)
        return spec
    if strip(old.get("spec")) != strip(new.get("spec")):
        raise ApiError(422, "Invalid", f'Pod "{old["metadata"]["name"]}" is invalid: spec: Forbidden: pod updates may not change '
                       "fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, "
                       "`spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations)")


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args/env ($$(VAR) escapes it)."""
    out = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text.replace("$$(", "\0("))
    return out.replace("\0(", "$(")


async def _serve_until_stdin_closes(probe_interval: float) -> None:
    """Run the fake cluster in a process of its own, as a real API server is (benchmarks: its
    controllers and kubelet then do not share the engine's event loop). Prints its URL, stops at EOF."""
    async with FakeKubernetes(probe_interval=probe_interval) as fake:
        print(fake.url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    # An optional argument: the shortest probe period (default: the tests' compressed 0.05 s).
    asyncio.run(_serve_until_stdin_closes(float(sys.argv[1]) if len(sys.argv) > 1 else 0.05))
