#!/usr/bin/env bash
# Real Zaqar, Swift + ceilometermiddleware and Aodh from PyPI on 127.0.0.1, for Headwater's
# integration tests (tests/integration/openstack). No Docker, no systemd.
#
# Two auth modes side by side in one run: the servers above trust the X-Project-ID headers a client
# sends (no auth, what most tests use), and, when a Keystone is given (HEADWATER_KEYSTONE_URL and
# HEADWATER_KEYSTONE_ADMIN_PASSWORD, as `tests/integration/keystone/keystone.sh env` exports), a
# second Zaqar, a second Swift proxy and a second Aodh API on ports of their own run with Keystone
# auth: keystonemiddleware's authtoken in each, Swift's keystoneauth for accounts AUTH_<project id>.
# They share the first ones' stores (Redis database, Swift rings and disks, Aodh database, the
# listener and notifier), so they cost three processes and no second install.
#
#   openstack.sh install   venvs under $HEADWATER_OPENSTACK_DIR (a cache, reused when present)
#   openstack.sh start     start the servers (needs Redis :6379 and RabbitMQ :5672 already up)
#   openstack.sh up        install + start
#   openstack.sh stop      stop what `start` started, by recorded pid, and remove the run's state
#   openstack.sh status    which ports answer
#   openstack.sh env       the environment the tests read (eval "$(openstack.sh env)")
#
# Each run takes free ports and an empty Redis database (Redis is shared), chosen at `start` (or
# given as HEADWATER_{ZAQAR,SWIFT,AODH}_PORT and HEADWATER_{ZAQAR,SWIFT,AODH}_KEYSTONE_PORT), and keeps its configuration, logs, pids and data in
# $HEADWATER_OPENSTACK_RUN (default $HEADWATER_OPENSTACK_DIR/run): two runs with different run
# directories never collide. The harness is shared by whoever uses this machine: run it under
# `flock /tmp/headwater-openstack.lock …`, start to stop.
set -euo pipefail

DIR=${HEADWATER_OPENSTACK_DIR:-/var/tmp/headwater-openstack}
REPO=$(cd "$(dirname "$0")/../../../.." && pwd)
RUN=${HEADWATER_OPENSTACK_RUN:-$DIR/run}
PY=${HEADWATER_OPENSTACK_PYTHON:-python3}
RABBIT_URL=${HEADWATER_OPENSTACK_RABBIT:-rabbit://guest:guest@127.0.0.1:5672/}

# Pinned to what the wire-format reference was captured with.
ZAQAR_PKGS="zaqar==23.0.1 python-zaqarclient==4.7.0 redis"
SWIFT_PKGS="swift==2.38.3 ceilometermiddleware==3.13.0 python-swiftclient"
AODH_PKGS="aodh==23.0.0 aodhclient==3.12.0"
# Keystone mode: Zaqar and Aodh depend on keystonemiddleware already; Swift's proxy needs it added.
KEYSTONE_PKGS="keystonemiddleware==13.0.1"
KEYSTONE_URL=${HEADWATER_KEYSTONE_URL:-}
KEYSTONE_ADMIN_PASSWORD=${HEADWATER_KEYSTONE_ADMIN_PASSWORD:-}

log() { echo "openstack-harness: $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_http() {  # name url seconds
  for _ in $(seq 1 "$3"); do
    if "$PY" - "$2" <<'PYEOF' 2>/dev/null; then return 0; fi
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers={
        "Client-ID": "3381af92-2b9e-11e3-b191-71861300734c", "X-Project-ID": "probe"}), timeout=2)
except urllib.error.HTTPError:
    pass  # any HTTP answer means the server is up
PYEOF
    sleep 1
  done
  log "$1 did not answer at $2 (logs: $RUN/log)"; return 1
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

free_redis_db() {  # an empty database of the shared Redis (1..15; 0 is everybody's default)
  "$PY" - <<'PYEOF'
import random, socket
with socket.create_connection(("127.0.0.1", 6379), timeout=5) as s:
    s.sendall(b"INFO keyspace\r\n")
    data = b""
    while not data.endswith(b"\r\n") or data.count(b"\r\n") < 2:
        data += s.recv(65536)
used = {int(line.split(b":")[0][2:]) for line in data.split(b"\r\n") if line.startswith(b"db")}
free = [n for n in range(1, 16) if n not in used]
if not free:
    raise SystemExit("openstack-harness: no empty Redis database (1..15) left")
print(random.choice(free))
PYEOF
}

redis_flush() {  # db — drop what this run's Zaqar stored
  "$PY" - "$1" <<'PYEOF' || true
import socket, sys
with socket.create_connection(("127.0.0.1", 6379), timeout=5) as s:
    s.sendall(b"SELECT %s\r\nFLUSHDB\r\n" % sys.argv[1].encode())
    s.recv(1024)
PYEOF
}

# The run's ports and Redis database: chosen once by `start`, read back by every other command.
load_run() {
  if [ -f "$RUN/env" ]; then . "$RUN/env"; fi
}

choose_run() {
  mkdir -p "$RUN/log" "$RUN/pids"
  load_run
  ZAQAR_PORT=${ZAQAR_PORT:-${HEADWATER_ZAQAR_PORT:-$(free_port)}}
  SWIFT_PORT=${SWIFT_PORT:-${HEADWATER_SWIFT_PORT:-$(free_port)}}
  AODH_PORT=${AODH_PORT:-${HEADWATER_AODH_PORT:-$(free_port)}}
  # Swift's backend servers; the proxy is the only one clients talk to.
  OBJ_PORT=${OBJ_PORT:-$(free_port)}; CONT_PORT=${CONT_PORT:-$(free_port)}; ACCT_PORT=${ACCT_PORT:-$(free_port)}
  REDIS_DB=${REDIS_DB:-${HEADWATER_OPENSTACK_REDIS_DB:-$(free_redis_db)}}
  if [ -n "$KEYSTONE_URL" ]; then
    ZAQAR_KS_PORT=${ZAQAR_KS_PORT:-${HEADWATER_ZAQAR_KEYSTONE_PORT:-$(free_port)}}
    SWIFT_KS_PORT=${SWIFT_KS_PORT:-${HEADWATER_SWIFT_KEYSTONE_PORT:-$(free_port)}}
    AODH_KS_PORT=${AODH_KS_PORT:-${HEADWATER_AODH_KEYSTONE_PORT:-$(free_port)}}
  fi
  cat > "$RUN/env" <<ENV
ZAQAR_PORT=$ZAQAR_PORT SWIFT_PORT=$SWIFT_PORT AODH_PORT=$AODH_PORT
OBJ_PORT=$OBJ_PORT CONT_PORT=$CONT_PORT ACCT_PORT=$ACCT_PORT REDIS_DB=$REDIS_DB
ZAQAR_KS_PORT=${ZAQAR_KS_PORT:-} SWIFT_KS_PORT=${SWIFT_KS_PORT:-} AODH_KS_PORT=${AODH_KS_PORT:-}
KEYSTONE_URL=$KEYSTONE_URL
ENV
  REDIS_URI="redis://127.0.0.1:6379?dbid=$REDIS_DB"
}

venv_add() {  # name module packages... — add packages to a present venv unless the module imports
  local v="$DIR/venv-$1" module=$2; shift 2
  if "$v/bin/python" -c "import $module" 2>/dev/null; then return 0; fi
  "$v/bin/pip" install -q --disable-pip-version-check "$@" >> "$DIR/log/pip-$(basename "$v").log" 2>&1 \
    || { log "pip install of $* into $v failed"; return 1; }
  log "added $* to $(basename "$v")"
}

venv_install() {  # name marker-binary packages...
  local name=$1 marker=$2; shift 2
  local v="$DIR/venv-$name"
  if [ -x "$v/bin/$marker" ]; then log "$name venv present"; return 0; fi
  rm -rf "$v"
  "$PY" -m venv "$v"
  local t0=$SECONDS
  "$v/bin/pip" install -q --disable-pip-version-check "$@" > "$DIR/log/pip-$name.log" 2>&1 \
    || { log "pip install for $name failed; see $DIR/log/pip-$name.log"; tail -20 "$DIR/log/pip-$name.log" >&2; return 1; }
  log "$name installed in $((SECONDS - t0)) s"
}

cmd_install() {
  mkdir -p "$DIR/log"
  # In parallel: the three installs are independent and mostly wait on downloads and builds.
  venv_install zaqar zaqar-server $ZAQAR_PKGS & local z=$!
  venv_install swift swift-proxy-server $SWIFT_PKGS & local s=$!
  venv_install aodh aodh-api $AODH_PKGS & local a=$!
  local rc=0
  wait $z || rc=1; wait $s || rc=1; wait $a || rc=1
  [ $rc = 0 ] || return $rc
  # Keystone mode (idempotent, so a cache made before it existed gains it too).
  venv_add zaqar keystonemiddleware $KEYSTONE_PKGS & z=$!
  venv_add swift keystonemiddleware $KEYSTONE_PKGS & s=$!
  venv_add aodh keystonemiddleware $KEYSTONE_PKGS & a=$!
  wait $z || rc=1; wait $s || rc=1; wait $a || rc=1
  return $rc
}

spawn() {  # name command... — background, logged, pid recorded
  local name=$1; shift
  nohup "$@" > "$RUN/log/$name.log" 2>&1 &
  echo $! > "$RUN/pids/$name.pid"
}

# The [keystone_authtoken] section every Keystone-mode server validates tokens with (as the
# harness's own service user, made by keystone_setup).
authtoken_section() {
  cat <<CONF
[keystone_authtoken]
www_authenticate_uri = $KEYSTONE_URL
auth_url = $KEYSTONE_URL
auth_type = password
username = $KS_SERVICE_USER
password = $KS_SERVICE_PASSWORD
user_domain_name = Default
project_name = service
project_domain_name = Default
CONF
}

write_zaqar_conf() {  # file port auth_strategy ("" = none: the API trusts X-Project-ID; keystone)
  cat > "$1" <<CONF
[DEFAULT]
auth_strategy = $3
pooling = false
admin_mode = false
unreliable = true

[drivers]
transport = wsgi
message_store = redis
management_store = redis

[drivers:transport:wsgi]
bind = 127.0.0.1
port = $2

[drivers:message_store:redis]
uri = $REDIS_URI

[drivers:management_store:redis]
uri = $REDIS_URI

[storage]
# runs the notifier after each post: push subscriptions (webhooks) need it
message_pipeline = zaqar.notification.notifier

[notification]
require_confirmation = false
CONF
  if [ "$3" = keystone ]; then authtoken_section >> "$1"; fi
}

write_swift_conf() {
  local etc=$RUN/swift/etc node=$RUN/swift/node
  mkdir -p "$etc" "$node/d1"
  cat > "$etc/swift.conf" <<CONF
[swift-hash]
swift_hash_path_prefix = headwater
swift_hash_path_suffix = headwater

[storage-policy:0]
name = Policy-0
default = yes
CONF
  local kind port
  for kind in account:$ACCT_PORT container:$CONT_PORT object:$OBJ_PORT; do
    port=${kind##*:}; kind=${kind%%:*}
    cat > "$etc/$kind-server.conf" <<CONF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $port
workers = 0
devices = $node
mount_check = false
disable_fallocate = true
swift_dir = $etc
log_name = $kind-server

[pipeline:main]
pipeline = $kind-server

[app:$kind-server]
use = egg:swift#$kind

[$kind-replicator]
[$kind-updater]
[$kind-auditor]
CONF
  done
  # No auth middleware (tempauth would need memcached): every request is allowed. The
  # ceilometer filter still sees X-Project-Id / X-User-Id headers the client sends, which is
  # what keystonemiddleware would set in a real cloud.
  cat > "$etc/proxy-server.conf" <<CONF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $SWIFT_PORT
workers = 0
swift_dir = $etc
log_name = proxy-server

[pipeline:main]
# headwater (sources/swift_middleware.py) tells ceilometer what Swift answered; tempurl gives the
# tests a real 401 (an expired temp URL) without an auth system; copy/slo/dlo sit after the filter
# so that COPY and large-object manifests are seen as the client sent them.
pipeline = catch_errors proxy-logging ceilometer headwater tempurl copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:headwater]
paste.filter_factory = sources.swift_middleware:filter_factory

[filter:tempurl]
use = egg:swift#tempurl

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo

[filter:ceilometer]
paste.filter_factory = ceilometermiddleware.swift:filter_factory
url = $RABBIT_URL
driver = messagingv2
topic = notifications
control_exchange = swift
swift_conf_file = $etc/swift.conf
nonblocking_notify = False
metadata_headers = X-Headwater-Status, X-Headwater-Etag, X-Headwater-Content-Type, X-Headwater-Size, X-Headwater-Large-Object, X-Headwater-Destination, X-Headwater-Copy-From
CONF
  if [ -n "$KEYSTONE_URL" ]; then
    # The Keystone proxy: the same filters, plus authtoken (delay_auth_decision, so tempurl still
    # answers for itself) and keystoneauth: a member of project P may write to AUTH_<P id>.
    sed -e "s/^bind_port = .*/bind_port = $SWIFT_KS_PORT/" -e "s/^log_name = proxy-server/log_name = proxy-server-keystone/" \
        -e "s/^pipeline = catch_errors .*/pipeline = catch_errors proxy-logging ceilometer headwater tempurl authtoken keystoneauth copy slo dlo proxy-logging proxy-server/" \
        "$etc/proxy-server.conf" > "$etc/proxy-server-keystone.conf"
    { echo; echo "[filter:authtoken]"; echo "paste.filter_factory = keystonemiddleware.auth_token:filter_factory"
      echo "delay_auth_decision = true"; authtoken_section | tail -n +2
      printf '\n[filter:keystoneauth]\nuse = egg:swift#keystoneauth\noperator_roles = admin, member\n'
    } >> "$etc/proxy-server-keystone.conf"
  fi
  local v=$DIR/venv-swift r p
  for kind in account:$ACCT_PORT container:$CONT_PORT object:$OBJ_PORT; do
    p=${kind##*:}; r=${kind%%:*}
    if [ ! -f "$etc/$r.ring.gz" ]; then
      # one partition, one replica, one device: the smallest ring Swift accepts
      (cd "$etc" && "$v/bin/swift-ring-builder" "$r.builder" create 0 1 1 >/dev/null \
        && "$v/bin/swift-ring-builder" "$r.builder" add "r1z1-127.0.0.1:$p/d1" 1 >/dev/null \
        && { "$v/bin/swift-ring-builder" "$r.builder" rebalance >/dev/null || true; })
    fi
  done
}

write_aodh_conf() {  # file auth_mode (noauth | keystone)
  cat > "$1" <<CONF
[DEFAULT]
transport_url = $RABBIT_URL
# a new alarm is otherwise invisible to aodh-listener for up to 60 s (per-project cache)
event_alarm_cache_ttl = 0
rest_notifier_max_retries = 0
# RabbitMQ is shared by every run on the machine: topics named after this run's Aodh port, or a
# second run's listener takes this run's events off the shared queue (and its notifier the alarms)
notifier_topic = alarming.$AODH_PORT

[api]
auth_mode = $2

[database]
connection = sqlite:///$RUN/aodh/aodh.db

[listener]
event_alarm_topic = alarm.all.$AODH_PORT
batch_size = 1

[notifier]
batch_size = 1
CONF
  if [ "$2" = keystone ]; then
    # Aodh's paste pipeline has authtoken read a configuration of its own (oslo_config_project),
    # which would be /etc/aodh/aodh.conf: point it at this one.
    local paste=${1%.conf}-api-paste.ini
    sed "s|^oslo_config_project = aodh\$|&\noslo_config_file = $1|" \
      "$("$DIR/venv-aodh/bin/python" -c 'import aodh.api, os; print(os.path.dirname(aodh.api.__file__))')/api-paste.ini" > "$paste"
    sed -i "s|^\[api\]\$|&\npaste_config = $paste|" "$1"
    authtoken_section >> "$1"
  fi
}

# Keystone mode's service user (role `service` in project `service`: it may validate tokens), one
# per run, made through Keystone's API as its bootstrap admin. Sets KS_SERVICE_USER/PASSWORD.
keystone_setup() {
  if [ -f "$RUN/keystone-service" ]; then . "$RUN/keystone-service"; return 0; fi
  [ -n "$KEYSTONE_ADMIN_PASSWORD" ] || { log "HEADWATER_KEYSTONE_ADMIN_PASSWORD is not set (eval \"\$(keystone.sh env)\")"; return 1; }
  KS_SERVICE_USER="hw-openstack-$(basename "$RUN" | tr -cd 'a-zA-Z0-9' | tail -c 12)"
  KS_SERVICE_PASSWORD=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')
  "$PY" - "$KEYSTONE_URL" "$KEYSTONE_ADMIN_PASSWORD" "$KS_SERVICE_USER" "$KS_SERVICE_PASSWORD" <<'PYEOF'
import json, sys, urllib.request
url, admin_password, name, password = sys.argv[1:]

def call(method, path, body=None, token=None):
    req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", **({"X-Auth-Token": token} if token else {})})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
        return resp.headers, (json.loads(raw) if raw else None)

headers, _ = call("POST", "/auth/tokens", {"auth": {"identity": {"methods": ["password"], "password": {"user": {
    "name": "admin", "domain": {"id": "default"}, "password": admin_password}}},
    "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}})
token = headers["X-Subject-Token"]

def one(kind, name, create):
    found = call("GET", f"/{kind}s?name={name}", token=token)[1][f"{kind}s"]
    return found[0]["id"] if found else call("POST", f"/{kind}s", {kind: create}, token)[1][kind]["id"]

project = one("project", "service", {"name": "service", "domain_id": "default"})
role = one("role", "service", {"name": "service"})
user = one("user", name, {"name": name, "password": password, "domain_id": "default"})
call("PATCH", f"/users/{user}", {"user": {"password": password}}, token)
call("PUT", f"/projects/{project}/users/{user}/roles/{role}", token=token)
PYEOF
  printf 'KS_SERVICE_USER=%s\nKS_SERVICE_PASSWORD=%s\n' "$KS_SERVICE_USER" "$KS_SERVICE_PASSWORD" > "$RUN/keystone-service"
  chmod 600 "$RUN/keystone-service"
}

cmd_start() {
  port_open 6379 || { log "Redis is not running on 127.0.0.1:6379"; return 1; }
  port_open 5672 || { log "RabbitMQ is not running on 127.0.0.1:5672"; return 1; }
  choose_run
  mkdir -p "$RUN/zaqar" "$RUN/aodh"
  local t0=$SECONDS
  if port_open "$ZAQAR_PORT"; then log "zaqar already up"; else
    write_zaqar_conf "$RUN/zaqar/zaqar.conf" "$ZAQAR_PORT" ""
    spawn zaqar-server "$DIR/venv-zaqar/bin/zaqar-server" --config-file "$RUN/zaqar/zaqar.conf"
  fi
  if [ -n "$KEYSTONE_URL" ]; then
    keystone_setup
    if port_open "$ZAQAR_KS_PORT"; then log "zaqar (keystone) already up"; else
      write_zaqar_conf "$RUN/zaqar/zaqar-keystone.conf" "$ZAQAR_KS_PORT" keystone
      spawn zaqar-server-keystone "$DIR/venv-zaqar/bin/zaqar-server" --config-file "$RUN/zaqar/zaqar-keystone.conf"
    fi
  fi
  if port_open "$SWIFT_PORT"; then log "swift already up"; else
    write_swift_conf
    local n
    for n in account container object; do
      spawn "swift-$n" "$DIR/venv-swift/bin/swift-$n-server" "$RUN/swift/etc/$n-server.conf" -v
    done
    # The proxy imports Headwater's filter from this checkout (sources/swift_middleware.py, stdlib only).
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" spawn swift-proxy "$DIR/venv-swift/bin/swift-proxy-server" "$RUN/swift/etc/proxy-server.conf" -v
    if [ -n "$KEYSTONE_URL" ]; then
      PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" spawn swift-proxy-keystone "$DIR/venv-swift/bin/swift-proxy-server" "$RUN/swift/etc/proxy-server-keystone.conf" -v
    fi
  fi
  if port_open "$AODH_PORT"; then log "aodh already up"; else
    write_aodh_conf "$RUN/aodh/aodh.conf" noauth
    "$DIR/venv-aodh/bin/aodh-dbsync" --config-file "$RUN/aodh/aodh.conf" > "$RUN/log/aodh-dbsync.log" 2>&1
    spawn aodh-api "$DIR/venv-aodh/bin/aodh-api" --host 127.0.0.1 --port "$AODH_PORT" -- --config-file "$RUN/aodh/aodh.conf"
    if [ -n "$KEYSTONE_URL" ]; then  # the same database, listener and notifier
      write_aodh_conf "$RUN/aodh/aodh-keystone.conf" keystone
      spawn aodh-api-keystone "$DIR/venv-aodh/bin/aodh-api" --host 127.0.0.1 --port "$AODH_KS_PORT" -- --config-file "$RUN/aodh/aodh-keystone.conf"
    fi
    # event alarms need only the listener (evaluates) and the notifier (POSTs); no evaluator
    spawn aodh-listener "$DIR/venv-aodh/bin/aodh-listener" --config-file "$RUN/aodh/aodh.conf"
    spawn aodh-notifier "$DIR/venv-aodh/bin/aodh-notifier" --config-file "$RUN/aodh/aodh.conf"
  fi
  wait_http zaqar "http://127.0.0.1:$ZAQAR_PORT/v2/ping" 60
  wait_http swift "http://127.0.0.1:$SWIFT_PORT/info" 60
  wait_http aodh "http://127.0.0.1:$AODH_PORT/" 90
  if [ -n "$KEYSTONE_URL" ]; then
    wait_http zaqar-keystone "http://127.0.0.1:$ZAQAR_KS_PORT/v2/ping" 60
    wait_http swift-keystone "http://127.0.0.1:$SWIFT_KS_PORT/info" 60
    wait_http aodh-keystone "http://127.0.0.1:$AODH_KS_PORT/" 90
    log "Keystone auth ($KEYSTONE_URL): zaqar :$ZAQAR_KS_PORT, swift :$SWIFT_KS_PORT, aodh :$AODH_KS_PORT"
  fi
  log "up in $((SECONDS - t0)) s: zaqar :$ZAQAR_PORT, swift :$SWIFT_PORT, aodh :$AODH_PORT, redis db $REDIS_DB (state: $RUN)"
}

cmd_stop() {
  local f pid
  load_run
  for f in "$RUN"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    if kill -TERM "$pid" 2>/dev/null; then log "stopped $(basename "$f" .pid) ($pid)"; fi
    rm -f "$f"
  done
  if [ -n "${REDIS_DB:-}" ]; then redis_flush "$REDIS_DB"; fi
  # The run's state is temporary; the venvs in $DIR are the cache and stay.
  rm -rf "$RUN"
}

cmd_status() {
  local rc=0 p
  load_run
  [ -n "${ZAQAR_PORT:-}" ] || { echo "not started (no $RUN/env)"; return 1; }
  for p in zaqar:$ZAQAR_PORT swift:$SWIFT_PORT aodh:$AODH_PORT ${ZAQAR_KS_PORT:+zaqar-keystone:$ZAQAR_KS_PORT} \
           ${SWIFT_KS_PORT:+swift-keystone:$SWIFT_KS_PORT} ${AODH_KS_PORT:+aodh-keystone:$AODH_KS_PORT}; do
    if port_open "${p##*:}"; then echo "${p%%:*} up (${p##*:})"; else echo "${p%%:*} down (${p##*:})"; rc=1; fi
  done
  return $rc
}

cmd_env() {
  load_run
  [ -n "${ZAQAR_PORT:-}" ] || { log "not started (no $RUN/env)"; return 1; }
  cat <<ENV
export HEADWATER_OPENSTACK_DIR=$DIR HEADWATER_OPENSTACK_RUN=$RUN
export HEADWATER_ZAQAR_PORT=$ZAQAR_PORT HEADWATER_SWIFT_PORT=$SWIFT_PORT HEADWATER_AODH_PORT=$AODH_PORT
ENV
  if [ -n "${ZAQAR_KS_PORT:-}" ]; then
    echo "export HEADWATER_ZAQAR_KEYSTONE_PORT=$ZAQAR_KS_PORT HEADWATER_SWIFT_KEYSTONE_PORT=$SWIFT_KS_PORT HEADWATER_AODH_KEYSTONE_PORT=$AODH_KS_PORT"
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  up) cmd_install && cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 install|start|up|stop|status|env" >&2; exit 2 ;;
esac
