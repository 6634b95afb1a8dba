"""Configuration: an INI file (or several, later wins) checked against one schema of known options."""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message always names the section and option."""


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    type: str  # str | int | float | bool | list | path
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None


def _opt(name, type_, default, help_, **kw) -> Option:
    return Option(name, type_, default, help_, **kw)


# The one schema. `etc/headwater.conf.sample` is generated from it (`headwater config-sample`) and a
# test keeps the two identical, so every option is documented with its default.
SCHEMA: dict[str, list[Option]] = {
    "DEFAULT": [
        _opt("data_dir", "path", None, "Where the SQLite database and packages live. Default: $XDG_DATA_HOME/headwater or ~/.local/share/headwater."),
        _opt("log_level", "str", "INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
        _opt("log_format", "str", "json", "Log line format: one JSON object per line, or human-readable text.", choices=("json", "text")),
        _opt("roles", "list", ["api", "router", "engine", "sources"], "What this process runs, so a deployment can split them: api (the HTTP API, webhooks and POST /v1/events; without it only /healthz and /metrics are served), router (consumes the bus and runs what it routes), engine (runs executions: api and router need it), sources (cron, Zaqar, Swift, Aodh; each queue polled by its elected replica)."),
    ],
    "api": [
        _opt("host", "str", "127.0.0.1", "Address the API listens on."),
        _opt("port", "int", 7070, "Port the API listens on.", minimum=0, maximum=65535),
        _opt("public_url", "str", None, "Base URL clients use to reach the API (webhook_url, package download_url). Default: http://<host>:<port>."),
        _opt("workers", "int", 1, "Server processes sharing the API port (SO_REUSEPORT) and the bus, to use every core; more than 1 needs a bus processes share (rabbitmq, nats, sqlite).", minimum=1),
        _opt("max_request_size", "int", 52428800, "Largest request body accepted, in bytes (packages up to 50 MiB).", minimum=1024),
        _opt("max_connections_per_client", "int", 256, "Connections one client address may hold open at once; more are closed on arrival (a slowloris holds hundreds).", minimum=1),
        _opt("request_header_timeout", "float", 20.0, "Seconds a client has to send a request's line and headers once it starts; a slower one is disconnected.", minimum=0.01),
        _opt("request_body_timeout", "float", 30.0, "Seconds a request body may stall (no bytes arriving) before the client is disconnected.", minimum=0.01),
    ],
    "auth": [
        _opt("strategy", "str", "noauth", "How API requests are authenticated: noauth (every request is project `default` and admin; for one machine only) or keystone (a Keystone token in X-Auth-Token, see [keystone_authtoken]).", choices=("noauth", "keystone")),
        _opt("delegation", "str", "trusts", "How work that runs later on a user's behalf (cron jobs, queue and object subscriptions, replays) acts as that user: a Keystone trust from the user to Headwater's service user, made when the subscription is created (keystone strategy only).", choices=("trusts", "none")),
        _opt("function_token_ttl", "int", 900, "Seconds a token handed to a function that asks for one (options.keystone_token) stays useful; Keystone's own token lifetime caps it.", minimum=60),
    ],
    "keystone_authtoken": [
        _opt("www_authenticate_uri", "str", None, "Keystone URL clients are sent to (WWW-Authenticate: Keystone uri=...). Default: auth_url."),
        _opt("auth_url", "str", None, "Keystone URL Headwater's service user authenticates at and validates tokens against, e.g. http://keystone:5000/v3."),
        _opt("auth_type", "str", "password", "How the service user authenticates (keystoneauth1 plugin name).", choices=("password",)),
        _opt("username", "str", "headwater", "Service user name."),
        _opt("password", "str", None, "Service user password."),
        _opt("project_name", "str", "service", "Project the service user's token is scoped to."),
        _opt("user_domain_name", "str", "Default", "Domain of the service user."),
        _opt("project_domain_name", "str", "Default", "Domain of project_name."),
        _opt("region_name", "str", None, "Region of the endpoints Headwater looks up in the catalog."),
        _opt("token_cache_time", "int", 300, "Seconds a validated token is remembered before Keystone is asked again (never beyond the token's expiry; 0 turns the cache off).", minimum=0),
        _opt("http_connect_timeout", "float", 10.0, "Seconds to wait for Keystone to connect and to answer, per attempt (a busy Keystone can take seconds; keystonemiddleware waits without a limit).", minimum=0.1),
        _opt("http_request_max_retries", "int", 2, "How often a token validation is retried after Keystone could not be reached or timed out (0.5 s, 1 s, ... apart) before the request is answered 503.", minimum=0),
        _opt("service_token_roles", "list", ["service"], "Roles that make a token a service's (the `service` persona of the policy)."),
    ],
    "oslo_policy": [
        _opt("policy_file", "path", None, "YAML or JSON file overriding policy rules (`headwater policy-sample` prints the defaults). A file that does not parse stops start-up."),
    ],
    "database": [
        _opt("connection", "str", None, "SQLAlchemy URL. Default: sqlite+aiosqlite:///<data_dir>/headwater.db. Production: postgresql+asyncpg://user:pass@host/db."),
        _opt("pool_size", "int", 10, "Connection pool size: on PostgreSQL this many kept plus as many more under load; on SQLite at most this many connections (callers wait for one).", minimum=1),
    ],
    "bus": [
        _opt("backend", "str", "sqlite", "Event bus backend, by plugin name: sqlite (embedded and durable: events and scheduled retries in <data_dir>/bus.db), rabbitmq, nats, or memory (tests and benchmarks only: a crash loses every event not yet handled and every retry waiting)."),
        _opt("url", "str", None, "Broker URL, e.g. amqp://guest:guest@127.0.0.1:5672/ or nats://127.0.0.1:4222; for sqlite, sqlite:///<path of the bus file> (default <data_dir>/bus.db)."),
        _opt("prefetch", "int", 256, "Events a router holds unacknowledged at once.", minimum=1),
        _opt("max_deliveries", "int", 10, "Deliveries of one event before it is dead-lettered.", minimum=1),
    ],
    "delivery": [
        _opt("max_attempts", "int", 3, "Attempts to run one event for one subscription, unless its options.delivery says otherwise.", minimum=1, maximum=100),
        _opt("backoff_initial", "float", 1.0, "Seconds before the second attempt.", minimum=0),
        _opt("backoff_multiplier", "float", 2.0, "Each further attempt waits this many times longer.", minimum=1),
        _opt("backoff_max", "float", 60.0, "Cap on the wait between attempts (seconds).", minimum=0),
        _opt("jitter", "float", 0.2, "Share of each wait taken off at random (0..1), so retries of many events spread out.", minimum=0, maximum=1),
        _opt("max_event_age", "float", 0, "Seconds after an event's time beyond which it is dead-lettered instead of run again (0: no limit).", minimum=0),
        _opt("retry_on", "list", ["error", "timeout", "failed"], "Outcomes of event-triggered executions that are retried: error (platform), timeout, failed (any function failure). The default follows AWS Lambda's asynchronous invocations: any failure is retried (max_attempts 3: two retries with backoff), then dead-lettered. Sync executions (POST /v1/executions) are never retried."),
        _opt("dead_letter_topic", "str", None, "Bus topic dead letters are also published to (besides the dead_letters table)."),
        _opt("dead_letter_payload_max", "int", 65536, "Bytes of a dead letter's payload that are kept (as JSON); a larger payload is cut to this and the record says so (truncated, original size).", minimum=256),
        _opt("lease_margin", "float", 30.0, "Seconds beyond a function's timeout before another worker may take over an execution whose worker went silent.", minimum=0.1),
    ],
    "engine": [
        _opt("backend", "str", "local", "Execution engine, by plugin name (local, null, kubernetes)."),
        _opt("local_runtimes", "list", ["python=python3", "node=nodejs", "go=go", "php=php"], "How runtime images map to local runtime servers: 'substring=runtime_dir' pairs, first match wins. 'python=python3' runs every image whose name contains 'python' with runtimes/python3, 'node=nodejs' every image containing 'node' with runtimes/nodejs, 'go=go' and 'php=php' likewise with runtimes/go and runtimes/php."),
        _opt("compiled_runtimes", "list", ["go"], "Runtimes (as named by local_runtimes) whose packages are compiled once on upload (the build step: the function shows building, then available or error), and whose executions run the built artifact."),
        _opt("build_timeout", "int", 300, "Seconds a function's build may take (a Go package's `go build`) before it ends in error.", minimum=1, maximum=3600),
        _opt("local_workers_per_function", "int", 1, "Warm runtime processes the local engine keeps per function version.", minimum=1, maximum=64),
        _opt("local_pool_size", "int", 1, "Runtime servers the local engine keeps started per runtime (python3, nodejs, go, php) before any function needs them, so a new function (or one whose idle worker was released) claims one instead of waiting for a server to start; refilled in the background. A claimed server serves that function only and is never given back. 0 disables the pool.", minimum=0, maximum=16),
        _opt("function_concurrency", "int", 3, "Running executions per worker before another worker is added.", minimum=1),
        _opt("function_service_expiration", "int", 3600, "Idle seconds before a function's warm workers are released.", minimum=1),
        _opt("coordination", "str", "memory", "How engine processes coordinate workers, locks and leaders: in-process (one engine process) or etcd (several; see [etcd]).", choices=("memory", "etcd")),
        _opt("download_token_secret", "str", None, "Key that signs the short-lived, single-function tokens runtime pods fetch packages with (?token= on the download URL). Every API and engine process must share it. Default: a random key kept in <data_dir>/download-token.key."),
        _opt("download_token_ttl", "int", 300, "Seconds a package download token stays valid.", minimum=1),
        _opt("function_network", "str", "none", "Network a function sees on the local engine (runtime started as root): none (its own network namespace with only a loopback of its own: no host services, API or metadata), or host (the host's network, unconfined: only for trusted code). Without root the runtime cannot make namespaces and functions share the host's network whatever this says.", choices=("none", "host")),
        _opt("function_scratch_size", "int", 67108864, "Bytes of private /tmp and /dev/shm (one size-limited tmpfs each) a function's warm worker gets on the local engine as root; removed with the worker.", minimum=1048576),
    ],
    "kubernetes": [
        _opt("kube_host", "str", None, "Kubernetes API server URL, e.g. https://<k8s>:6443 or http://127.0.0.1:8001 (kubectl proxy). Default: in-cluster config when running in a pod, else http://127.0.0.1:8001. Ignored when kubeconfig is set."),
        _opt("kubeconfig", "path", None, "A kubeconfig file to connect with instead of kube_host and the certificate options."),
        _opt("use_api_certificate", "bool", True, "Verify the API server with ssl_ca_cert and authenticate with cert_file/key_file; False turns TLS verification off."),
        _opt("ssl_ca_cert", "path", None, "CA certificate of the Kubernetes API server (e.g. /etc/headwater/pki/kubernetes/ca.crt)."),
        _opt("cert_file", "path", None, "Client certificate Headwater authenticates to Kubernetes with."),
        _opt("key_file", "path", None, "Key of cert_file."),
        _opt("namespace", "str", "headwater", "Namespace of the runtime pools and function pods (created if missing and allowed)."),
        _opt("replicas", "int", 3, "Warm pods per runtime pool (one Deployment per runtime); claimed pods are replaced.", minimum=0),
        _opt("resolver", "str", "podip", "How the engine reaches a pod: podip (the pod IP, for an engine inside the cluster) or nodeport (a NodePort Service per worker, for an engine outside it).", choices=("podip", "nodeport")),
        _opt("node_address", "str", None, "Node address for the nodeport resolver. Default: the first node's ExternalIP, else InternalIP."),
        _opt("runtime_port", "int", 9090, "Port the runtime server listens on inside a pool pod (given to the image's own entrypoint as HEADWATER_RUNTIME_PORT, with the pod's IP as HEADWATER_RUNTIME_HOST).", minimum=1, maximum=65535),
        _opt("worker_wait", "float", 60.0, "Seconds an execution waits for a ready pool pod before it fails with 'Not enough workers available'.", minimum=0.1),
        _opt("rollout_timeout", "float", 300.0, "Seconds a pool resize or image update may take before it is rolled back.", minimum=1),
        _opt("image_pull_secrets", "list", [], "Secrets pool and image-function pods pull their images with."),
    ],
    "etcd": [
        _opt("host", "str", "127.0.0.1", "etcd host (with [engine] coordination = etcd)."),
        _opt("port", "int", 2379, "etcd client port.", minimum=1, maximum=65535),
        _opt("protocol", "str", "http", "http, or https with the certificate options below.", choices=("http", "https")),
        _opt("ca_cert", "path", None, "CA certificate of etcd (https)."),
        _opt("cert_file", "path", None, "Client certificate for etcd (https)."),
        _opt("cert_key", "path", None, "Key of cert_file."),
        _opt("lease_ttl", "int", 15, "Seconds an engine's claims, locks and leadership outlive the engine (its etcd lease).", minimum=1),
        _opt("prefix", "str", "/headwater/", "Key prefix of everything Headwater keeps in etcd."),
    ],
    "storage": [
        _opt("provider", "str", "filesystem", "Package store, by plugin name: 'filesystem' (one machine, or a volume every replica mounts) or 'swift' (a Swift container every replica shares; file_system_dir is then each replica's cache)."),
        _opt("file_system_dir", "path", None, "Package root (with provider = swift: this replica's cache). Default: <data_dir>/packages."),
        _opt("swift_store_url", "str", None, "With provider = swift: the storage URL of the Swift account that keeps packages, e.g. http://swift:8080/v1/AUTH_headwater."),
        _opt("swift_store_container", "str", "headwater-packages", "With provider = swift: the container packages are kept in (created when missing)."),
        _opt("swift_store_token", "str", None, "With provider = swift: X-Auth-Token for the package account (unset: none, for a Swift without auth)."),
        _opt("swift_url", "str", None, "Swift storage URL for functions whose code is a Swift object; {project_id} is replaced by the function's project, e.g. http://swift:8080/v1/AUTH_{project_id}. Unset: such functions are refused."),
        _opt("swift_token", "str", None, "X-Auth-Token sent to Swift when fetching function code (unset: none, for Swift without auth)."),
    ],
    "resource_limits": [
        _opt("default_cpu", "int", 100, "Default function cpu (millicpu).", minimum=1),
        _opt("min_cpu", "int", 100, "Smallest allowed cpu (millicpu).", minimum=1),
        _opt("max_cpu", "int", 300, "Largest allowed cpu (millicpu).", minimum=1),
        _opt("default_memory", "int", 33554432, "Default function memory (bytes).", minimum=1),
        _opt("min_memory", "int", 33554432, "Smallest allowed memory (bytes).", minimum=1),
        _opt("max_memory", "int", 134217728, "Largest allowed memory (bytes).", minimum=1),
        _opt("default_timeout", "int", 5, "Default function timeout (seconds).", minimum=1),
        _opt("min_timeout", "int", 1, "Smallest allowed timeout (seconds).", minimum=1),
        _opt("max_timeout", "int", 300, "Largest allowed timeout (seconds).", minimum=1),
        _opt("max_package_unpacked_size", "int", 268435456, "Largest total size a function package may unpack to (bytes), checked from its ZIP directory at upload, before anything is unpacked.", minimum=1),
        _opt("max_package_files", "int", 10000, "Most files (and directories) a function package may hold.", minimum=1),
    ],
    "sources": [
        _opt("enabled", "list", ["http", "cron"], "Event sources to start, by plugin name."),
    ],
    "events": [
        _opt("history", "bool", True, "Keep the events that enter Headwater (GET /v1/events, replay)."),
        _opt("history_retention", "int", 604800, "Seconds an event is kept in the history (default 7 days).", minimum=60),
        _opt("history_max_per_project", "int", 100000, "Most events kept per project; the oldest go first.", minimum=1),
        _opt("max_chain_depth", "int", 8, "Longest chain of results triggering functions (event sinks) before the router stops it as a loop.", minimum=1),
    ],
    "tracing": [
        _opt("otlp_endpoint", "str", None, "OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318): spans of each event's trip, from the API to the function, are exported there (needs the `tracing` extra). Default: no tracing."),
        _opt("service_name", "str", "headwater", "service.name of the spans Headwater exports."),
    ],
    "cron": [
        _opt("max_sleep", "float", 1.0, "Longest the scheduler sleeps before looking at the table again (seconds).", minimum=0.01),
    ],
    "swift": [
        _opt("transport_url", "str", "amqp://guest:guest@127.0.0.1:5672/", "RabbitMQ that ceilometermiddleware publishes Swift's notifications to (the proxy filter's `url`; rabbit:// is accepted too)."),
        _opt("exchange", "str", "swift", "Exchange the notifications arrive on (the filter's `control_exchange`)."),
        _opt("exchange_durable", "bool", False, "Whether that exchange is durable: must match how oslo.messaging declared it ([oslo_messaging_rabbit] amqp_durable_queues)."),
        _opt("routing_key", "str", "notifications.info", "Routing key to bind: the filter's `topic` + '.info'."),
        _opt("queue", "str", "headwater-swift", "Headwater's own durable queue bound to the exchange (never the shared `notifications.info`, which ceilometer consumes)."),
        _opt("methods", "list", ["PUT", "POST", "DELETE", "COPY"], "Object requests that become events, by HTTP method; add GET, HEAD to also trigger on reads. COPY events (for the Destination object) need `copy` after the headwater filter in the proxy pipeline."),
        _opt("require_status", "bool", True, "Publish only notifications that carry Swift's answer (X-Headwater-Status, from the sources.swift_middleware proxy filter), and of those only 2xx. False: also publish notifications without it (any request the proxy saw, refused ones included)."),
        _opt("container_events", "bool", False, "Also publish container-level requests (no object name) as org.openstack.swift.container.<method> events."),
        _opt("prefetch", "int", 32, "Notifications held unacknowledged at once.", minimum=1),
    ],
    "zaqar": [
        _opt("url", "str", "http://127.0.0.1:8888", "Zaqar API endpoint (without /v2)."),
        _opt("queues", "list", [], "Optional allow-list of queues. The source consumes the queues its subscriptions name (filters {\"queue\": …}), starting when the first subscription on a queue is created and stopping when the last is deleted; when this is set, subscriptions on other queues are refused and subscriptions naming no queue take all of these."),
        _opt("claim", "bool", True, "Claim messages from the queues subscriptions name. False: push only (Zaqar push subscriptions to /v1/zaqar/push), so a pushed message, which stays in its queue, is not also claimed and run twice."),
        _opt("max_in_flight", "int", 20, "Messages of one queue processed at once (claimed and not yet deleted).", minimum=1, maximum=1000),
        _opt("project_id", "str", "default", "X-Project-ID sent to a Zaqar without Keystone, and the project of the events; ignored for the header when auth_url is set. Under [auth] strategy = keystone each subscription's queues are its own project's, claimed with its creator's trust."),
        _opt("client_id", "str", None, "Client-ID (a UUID) Headwater identifies itself with. Default: a stable UUID derived from the host name."),
        _opt("claim_ttl", "int", 300, "Seconds a claim holds its messages; an unfinished message is claimed again after this (Zaqar allows 60..43200).", minimum=60, maximum=43200),
        _opt("claim_grace", "int", 60, "Extra seconds of message life beyond the claim (Zaqar allows 60..43200).", minimum=60, maximum=43200),
        _opt("claim_limit", "int", 10, "Messages taken per claim (Zaqar allows at most 20).", minimum=1, maximum=20),
        _opt("poll_interval", "float", 1.0, "Seconds to wait before claiming again when a queue was empty or Zaqar failed.", minimum=0.05),
        _opt("push_token", "str", None, "When set, push subscribers must send it in the X-Headwater-Token header (put it in the Zaqar subscription's options.post_headers)."),
        _opt("message_ttl", "int", 3600, "TTL of the messages the Zaqar sink posts, unless the target says otherwise (60..1209600).", minimum=60, maximum=1209600),
        _opt("auth_url", "str", None, "Keystone URL. When set, Headwater authenticates to Zaqar with keystoneauth1 (the `openstack` extra) instead of sending X-Project-ID."),
        _opt("username", "str", None, "Keystone user (with auth_url)."),
        _opt("password", "str", None, "Keystone password (with auth_url)."),
        _opt("project_name", "str", None, "Keystone project to scope the token to (with auth_url)."),
        _opt("user_domain_name", "str", "Default", "Keystone user domain (with auth_url)."),
        _opt("project_domain_name", "str", "Default", "Keystone project domain (with auth_url)."),
    ],
    "aodh": [
        _opt("path", "str", "/v1/aodh/alarms", "Path of the endpoint Aodh alarm actions POST to (the alarm action is <public_url><path>)."),
        _opt("token", "str", None, "Token an alarm action must carry as ?token=<this> in its URL (Aodh's plain http notifier sends no credentials); `register` adds it. Default: a random token kept in <data_dir>/aodh-token.key, so the endpoint never takes unauthenticated alarms."),
        _opt("endpoint", "str", "http://127.0.0.1:8042", "Aodh API: for registering alarms (python -m sources.aodh register), and under [auth] strategy = keystone for confirming that an alarm action's alarm belongs to the project its URL names (asked with a token of that project's aodh subscription, through its trust; unconfirmed actions are refused 403)."),
        _opt("project_id", "str", "default", "Project of alarm events whose action URL names none (register puts ?project_id= in the URL)."),
    ],
}


def persistent_secret(config: "Config", filename: str) -> str:
    """A random secret kept in <data_dir>/<filename> (created once, mode 0600), so that processes
    sharing a data_dir agree on it without configuration: the secure default for a token option."""
    path = Path(config.data_dir) / filename
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "headwater"


class Section:
    """Attribute access to one section's typed values."""

    def __init__(self, name: str, values: dict[str, Any]):
        self._name = name
        self._values = values

    def __getattr__(self, option: str) -> Any:
        try:
            return self._values[option]
        except KeyError:
            raise AttributeError(f"no option [{self._name}] {option}") from None

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


class Config:
    """Typed, validated configuration. `config.api.port`, `config.bus.backend`, …"""

    def __init__(self, values: dict[str, dict[str, Any]], files: Sequence[str] = ()):
        self._values = values
        self.files = tuple(files)
        for section, options in values.items():
            setattr(self, "default" if section == "DEFAULT" else section, Section(section, options))

    @property
    def data_dir(self) -> Path:
        return self._values["DEFAULT"]["data_dir"]

    def get(self, section: str, option: str) -> Any:
        return self._values[section][option]

    def summary(self) -> dict[str, dict[str, Any]]:
        """The configuration in force, with secrets in URLs masked, for the start-up log."""
        out: dict[str, dict[str, Any]] = {}
        for section, options in self._values.items():
            out[section] = {k: ("***" if v is not None and _SECRET_NAME.search(k) else _mask(v)) for k, v in options.items()}
        return out

    @classmethod
    def load(cls, files: Iterable[str | os.PathLike] = (), overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
        """Read the files in order (later wins), apply overrides (from the command line), validate."""
        parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
        parser.optionxform = str  # option names are case-sensitive, as in oslo.config
        read: list[str] = []
        for path in files:
            path = os.fspath(path)
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path} does not exist")
            try:
                with open(path, encoding="utf-8") as fh:
                    parser.read_file(fh, source=path)
            except configparser.Error as exc:
                raise ConfigError(f"config file {path} is not valid INI: {exc}") from exc
            read.append(path)
        raw: dict[str, dict[str, Any]] = {name: {} for name in SCHEMA}
        for section in parser.sections():
            if section not in SCHEMA:
                raise ConfigError(f"unknown section [{section}] in {', '.join(read)}; known: {', '.join(sorted(SCHEMA))}")
            raw[section].update(parser.items(section))
        for section, options in (overrides or {}).items():
            raw.setdefault(section, {}).update({k: v for k, v in options.items() if v is not None})
        values = {section: _validate_section(section, raw.get(section, {})) for section in SCHEMA}
        _fill_derived(values)
        return cls(values, read)


# Options that existed once: naming one stops start-up with what replaced it, not a bare "unknown".
REMOVED = {
    ("kubernetes", "runtime_command"): "each runtime image starts its own server by its ENTRYPOINT/CMD "
                                       "(runtimes/*/Dockerfile, published as headwater/runtime-<name>); delete the option",
}


def _validate_section(section: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    known = {opt.name: opt for opt in SCHEMA[section]}
    for name in raw:
        if (section, name) in REMOVED:
            raise ConfigError(f"option [{section}] {name} was removed: {REMOVED[section, name]}")
        if name not in known:
            raise ConfigError(f"unknown option [{section}] {name}; known: {', '.join(sorted(known))}")
    out: dict[str, Any] = {}
    for name, opt in known.items():
        out[name] = _coerce(section, opt, raw[name]) if name in raw else opt.default
    return out


_BOOL = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(section: str, opt: Option, value: Any) -> Any:
    where = f"[{section}] {opt.name}"
    converters: dict[str, Callable[[Any], Any]] = {
        "str": lambda v: str(v).strip() or None,
        "path": lambda v: Path(os.path.expanduser(str(v).strip())) if str(v).strip() else None,
        "int": lambda v: int(str(v).strip()),
        "float": lambda v: float(str(v).strip()),
        "bool": lambda v: v if isinstance(v, bool) else _BOOL[str(v).strip().lower()],
        "list": lambda v: list(v) if isinstance(v, (list, tuple)) else [p.strip() for p in str(v).split(",") if p.strip()],
    }
    try:
        result = converters[opt.type](value)
    except (ValueError, KeyError):
        raise ConfigError(f"{where} = {value!r} is not a valid {opt.type}") from None
    if opt.choices is not None and result not in opt.choices:
        raise ConfigError(f"{where} = {value!r} is not one of {', '.join(opt.choices)}")
    if opt.minimum is not None and result < opt.minimum:
        raise ConfigError(f"{where} = {value!r} is below the minimum {opt.minimum:g}")
    if opt.maximum is not None and result > opt.maximum:
        raise ConfigError(f"{where} = {value!r} is above the maximum {opt.maximum:g}")
    return result


ROLES = ("api", "router", "engine", "sources")


def _check_roles(roles: list[str]) -> None:
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ConfigError(f"[DEFAULT] roles = {', '.join(roles) or '(empty)'}: each must be one of {', '.join(ROLES)}"
                          + (f" (not {', '.join(unknown)})" if unknown else ""))
    # Executions run in the process that accepted them (a sync API call) or dispatched them.
    for role in ("api", "router"):
        if role in roles and "engine" not in roles:
            raise ConfigError(f"[DEFAULT] roles: {role} runs executions in its own process and needs engine beside it")


def _fill_derived(values: dict[str, dict[str, Any]]) -> None:
    """Defaults that depend on other options, and cross-option checks."""
    _check_roles(values["DEFAULT"]["roles"])
    data_dir = values["DEFAULT"]["data_dir"] or default_data_dir()
    values["DEFAULT"]["data_dir"] = Path(data_dir)
    if values["database"]["connection"] is None:
        values["database"]["connection"] = f"sqlite+aiosqlite:///{Path(data_dir) / 'headwater.db'}"
    elif "://" not in values["database"]["connection"]:
        raise ConfigError(f"[database] connection = {values['database']['connection']!r} is not an SQLAlchemy URL")
    if values["storage"]["file_system_dir"] is None:
        values["storage"]["file_system_dir"] = Path(data_dir) / "packages"
    api = values["api"]
    if api["public_url"] is None:
        host = api["host"] if api["host"] not in ("0.0.0.0", "::") else "127.0.0.1"
        api["public_url"] = f"http://{host}:{api['port']}"
    api["public_url"] = api["public_url"].rstrip("/")
    for pair in values["engine"]["local_runtimes"]:
        if "=" not in pair:
            raise ConfigError(f"[engine] local_runtimes entry {pair!r} must look like 'substring=runtime_dir'")
    limits = values["resource_limits"]
    for kind in ("cpu", "memory", "timeout"):
        low, default, high = limits[f"min_{kind}"], limits[f"default_{kind}"], limits[f"max_{kind}"]
        if not low <= default <= high:
            raise ConfigError(f"[resource_limits] default_{kind} = {default} must lie within min_{kind} ({low}) and max_{kind} ({high})")
    keystone = values["keystone_authtoken"]
    if values["auth"]["strategy"] == "keystone":
        for option in ("auth_url", "password"):
            if not keystone[option]:
                raise ConfigError(f"[keystone_authtoken] {option} is required with [auth] strategy = keystone")
    if keystone["www_authenticate_uri"] is None:
        keystone["www_authenticate_uri"] = keystone["auth_url"]


# Options whose values are credentials: never written to the start-up log.
_SECRET_NAME = re.compile(r"password|secret|token$")


def _mask(value: Any) -> Any:
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, rest = value.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    if isinstance(value, Path):
        return str(value)
    return value


def render_sample() -> str:
    """The documented sample configuration: every option, commented out at its default."""
    lines = ["# Headwater configuration. Every option is shown at its default, commented out.",
             "# Generated by `headwater config-sample`; a test keeps this file in step with the code.", ""]
    for section, options in SCHEMA.items():
        lines.append(f"[{section}]")
        for opt in options:
            lines.append(f"# {opt.help}")
            if opt.choices:
                lines.append(f"# Choices: {', '.join(opt.choices)}")
            default = opt.default
            if isinstance(default, list):
                default = ", ".join(default)
            lines.append(f"#{opt.name} = {'' if default is None else default}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
