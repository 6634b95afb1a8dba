#!/usr/bin/env bash
# Real Zaqar, Swift + ceilometermiddleware and Aodh from PyPI on 127.0.0.1, for Headwater's
# integration tests (tests/integration/openstack). No Keystone, no Docker, no systemd.
#
#   openstack.sh install   venvs under $HEADWATER_OPENSTACK_DIR (a cache, reused when present)
#   openstack.sh start     start the servers (needs Redis :6379 and RabbitMQ :5672 already up)
#   openstack.sh up        install + start
#   openstack.sh stop      stop what `start` started, by recorded pid, and remove the run's state
#   openstack.sh status    which ports answer
#   openstack.sh env       the environment the tests read (eval "$(openstack.sh env)")
#
# Each run takes free ports and an empty Redis database (Redis is shared), chosen at `start` (or
# given as HEADWATER_{ZAQAR,SWIFT,AODH}_PORT), and keeps its configuration, logs, pids and data in
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
  cat > "$RUN/env" <<ENV
ZAQAR_PORT=$ZAQAR_PORT SWIFT_PORT=$SWIFT_PORT AODH_PORT=$AODH_PORT
OBJ_PORT=$OBJ_PORT CONT_PORT=$CONT_PORT ACCT_PORT=$ACCT_PORT REDIS_DB=$REDIS_DB
ENV
  REDIS_URI="redis://127.0.0.1:6379?dbid=$REDIS_DB"
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
  return $rc
}

spawn() {  # name command... — background, logged, pid recorded
  local name=$1; shift
  nohup "$@" > "$RUN/log/$name.log" 2>&1 &
  echo $! > "$RUN/pids/$name.pid"
}

write_zaqar_conf() {
  cat > "$RUN/zaqar/zaqar.conf" <<CONF
[DEFAULT]
# empty: no Keystone middleware, the API trusts X-Project-ID
auth_strategy =
pooling = false
admin_mode = false
unreliable = true

[drivers]
transport = wsgi
message_store = redis
management_store = redis

[drivers:transport:wsgi]
bind = 127.0.0.1
port = $ZAQAR_PORT

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

write_aodh_conf() {
  cat > "$RUN/aodh/aodh.conf" <<CONF
[DEFAULT]
transport_url = $RABBIT_URL
# a new alarm is otherwise invisible to aodh-listener for up to 60 s (per-project cache)
event_alarm_cache_ttl = 0
rest_notifier_max_retries = 0
# RabbitMQ is shared by every run on the machine: topics named after this run's Aodh port, or a
# second run's listener takes this run's events off the shared queue (and its notifier the alarms)
notifier_topic = alarming.$AODH_PORT

[api]
auth_mode = noauth

[database]
connection = sqlite:///$RUN/aodh/aodh.db

[listener]
event_alarm_topic = alarm.all.$AODH_PORT
batch_size = 1

[notifier]
batch_size = 1
CONF
}

cmd_start() {
  port_open 6379 || { log "Redis is not running on 127.0.0.1:6379"; return 1; }
  port_open 5672 || { log "RabbitMQ is not running on 127.0.0.1:5672"; return 1; }
  choose_run
  mkdir -p "$RUN/zaqar" "$RUN/aodh"
  local t0=$SECONDS
  if port_open "$ZAQAR_PORT"; then log "zaqar already up"; else
    write_zaqar_conf
    spawn zaqar-server "$DIR/venv-zaqar/bin/zaqar-server" --config-file "$RUN/zaqar/zaqar.conf"
  fi
  if port_open "$SWIFT_PORT"; then log "swift already up"; else
    write_swift_conf
    local n
    for n in account container object; do
      spawn "swift-$n" "$DIR/venv-swift/bin/swift-$n-server" "$RUN/swift/etc/$n-server.conf" -v
    done
    # The proxy imports Headwater's filter from this checkout (sources/swift_middleware.py, stdlib only).
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" spawn swift-proxy "$DIR/venv-swift/bin/swift-proxy-server" "$RUN/swift/etc/proxy-server.conf" -v
  fi
  if port_open "$AODH_PORT"; then log "aodh already up"; else
    write_aodh_conf
    "$DIR/venv-aodh/bin/aodh-dbsync" --config-file "$RUN/aodh/aodh.conf" > "$RUN/log/aodh-dbsync.log" 2>&1
    spawn aodh-api "$DIR/venv-aodh/bin/aodh-api" --host 127.0.0.1 --port "$AODH_PORT" -- --config-file "$RUN/aodh/aodh.conf"
    # event alarms need only the listener (evaluates) and the notifier (POSTs); no evaluator
    spawn aodh-listener "$DIR/venv-aodh/bin/aodh-listener" --config-file "$RUN/aodh/aodh.conf"
    spawn aodh-notifier "$DIR/venv-aodh/bin/aodh-notifier" --config-file "$RUN/aodh/aodh.conf"
  fi
  wait_http zaqar "http://127.0.0.1:$ZAQAR_PORT/v2/ping" 60
  wait_http swift "http://127.0.0.1:$SWIFT_PORT/info" 60
  wait_http aodh "http://127.0.0.1:$AODH_PORT/" 90
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
  for p in zaqar:$ZAQAR_PORT swift:$SWIFT_PORT aodh:$AODH_PORT; do
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
