#!/usr/bin/env bash
# A real Keystone from PyPI for Headwater's tests: SQLite, fernet tokens, served by gunicorn on
# free ports on 127.0.0.1. Two processes share the database and keys: the main one issues tokens
# that live an hour, the second (the "short" one) tokens that live $SHORT_TTL seconds, so tests
# can hold a token that expires soon without waiting an hour.
#
#   keystone.sh install   the venv under $HEADWATER_KEYSTONE_DIR (reused when present)
#   keystone.sh start     bootstrap (first time) and start both servers
#   keystone.sh up        install + start
#   keystone.sh stop      stop what `start` started, by recorded pid
#   keystone.sh env       the environment the tests read (eval "$(keystone.sh env)")
set -euo pipefail

DIR=${HEADWATER_KEYSTONE_DIR:-/var/tmp/headwater-keystone}
PY=${HEADWATER_KEYSTONE_PYTHON:-python3}
ADMIN_PASSWORD=${HEADWATER_KEYSTONE_ADMIN_PASSWORD:-headwater-admin}
SHORT_TTL=${HEADWATER_KEYSTONE_SHORT_TTL:-8}
PKGS="keystone gunicorn"
V=$DIR/venv

log() { echo "keystone-harness: $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
alive() { [ -f "$DIR/pids/$1.pid" ] && kill -0 "$(cat "$DIR/pids/$1.pid")" 2>/dev/null; }

cmd_install() {
  mkdir -p "$DIR/log" "$DIR/pids"
  if [ -x "$V/bin/keystone-manage" ] && [ -x "$V/bin/gunicorn" ]; then log "venv present"; return 0; fi
  rm -rf "$V"
  "$PY" -m venv "$V"
  local t0=$SECONDS
  "$V/bin/pip" install -q --disable-pip-version-check $PKGS > "$DIR/log/pip.log" 2>&1 \
    || { log "pip install failed; see $DIR/log/pip.log"; tail -20 "$DIR/log/pip.log" >&2; return 1; }
  log "installed in $((SECONDS - t0)) s"
}

write_conf() {  # file expiration
  cat > "$1" <<CONF
[DEFAULT]
log_file = $DIR/log/$(basename "$1" .conf).log
[database]
connection = sqlite:///$DIR/keystone.db
[token]
provider = fernet
expiration = $2
[fernet_tokens]
key_repository = $DIR/fernet-keys
[fernet_receipts]
key_repository = $DIR/fernet-keys
[credential]
key_repository = $DIR/credential-keys
[oslo_policy]
enforce_new_defaults = true
enforce_scope = false
CONF
}

serve() {  # name port conf
  if alive "$1" && port_open "$2"; then log "$1 already up on $2"; return 0; fi
  # Keystone parses sys.argv with oslo.config; gunicorn's own arguments must not reach it.
  printf 'import sys\nsys.argv = sys.argv[:1]\nfrom keystone.wsgi.api import application  # noqa\n' > "$DIR/keystone_wsgi.py"
  OS_KEYSTONE_CONFIG_FILES=$3 nohup "$V/bin/gunicorn" --pythonpath "$DIR" --bind "127.0.0.1:$2" --workers 1 \
    --threads 4 --timeout 120 keystone_wsgi:application > "$DIR/log/$1-gunicorn.log" 2>&1 &
  echo $! > "$DIR/pids/$1.pid"
}

wait_keystone() {  # port seconds
  for _ in $(seq 1 "$2"); do
    if "$PY" -c "import sys,urllib.request; urllib.request.urlopen('http://127.0.0.1:$1/v3', timeout=3)" 2>/dev/null; then return 0; fi
    sleep 1
  done
  log "Keystone did not answer on port $1 (logs: $DIR/log)"; return 1
}

cmd_start() {
  mkdir -p "$DIR/log" "$DIR/pids"
  [ -f "$DIR/port" ] || free_port > "$DIR/port"
  [ -f "$DIR/short-port" ] || free_port > "$DIR/short-port"
  local port short
  port=$(cat "$DIR/port"); short=$(cat "$DIR/short-port")
  # A recorded port another program took meanwhile: pick new ones (the URL goes into the catalog).
  if ! alive keystone && port_open "$port"; then port=$(free_port); echo "$port" > "$DIR/port"; rm -f "$DIR/bootstrapped"; fi
  if ! alive keystone-short && port_open "$short"; then short=$(free_port); echo "$short" > "$DIR/short-port"; fi
  write_conf "$DIR/keystone.conf" 3600
  write_conf "$DIR/keystone-short.conf" "$SHORT_TTL"
  if [ ! -f "$DIR/bootstrapped" ] || [ "$(cat "$DIR/bootstrapped")" != "$port" ]; then
    mkdir -p "$DIR/fernet-keys" "$DIR/credential-keys"
    local m="$V/bin/keystone-manage --config-file $DIR/keystone.conf"
    $m db_sync > "$DIR/log/db_sync.log" 2>&1
    $m fernet_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)" >> "$DIR/log/db_sync.log" 2>&1
    $m credential_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)" >> "$DIR/log/db_sync.log" 2>&1
    $m bootstrap --bootstrap-password "$ADMIN_PASSWORD" --bootstrap-admin-url "http://127.0.0.1:$port/v3" \
      --bootstrap-public-url "http://127.0.0.1:$port/v3" --bootstrap-internal-url "http://127.0.0.1:$port/v3" \
      --bootstrap-region-id RegionOne >> "$DIR/log/db_sync.log" 2>&1
    echo "$port" > "$DIR/bootstrapped"
  fi
  serve keystone "$port" "$DIR/keystone.conf"
  serve keystone-short "$short" "$DIR/keystone-short.conf"
  wait_keystone "$port" 90 || return 1
  wait_keystone "$short" 90 || return 1
  log "up: http://127.0.0.1:$port/v3 (short-lived tokens: http://127.0.0.1:$short/v3)"
}

cmd_stop() {
  for name in keystone keystone-short; do
    if alive "$name"; then kill "$(cat "$DIR/pids/$name.pid")" || true; fi
    rm -f "$DIR/pids/$name.pid"
  done
}

cmd_env() {
  echo "export HEADWATER_KEYSTONE_URL=http://127.0.0.1:$(cat "$DIR/port")/v3"
  echo "export HEADWATER_KEYSTONE_SHORT_URL=http://127.0.0.1:$(cat "$DIR/short-port")/v3"
  echo "export HEADWATER_KEYSTONE_ADMIN_PASSWORD=$ADMIN_PASSWORD"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  up) cmd_install && cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  *) echo "usage: $0 install|start|up|stop|env" >&2; exit 2 ;;
esac
