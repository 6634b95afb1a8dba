#!/usr/bin/env bash
# Start the external servers the tests use when they are not already running (CI machines have
# them installed; a fresh Debian machine gets them from Debian's packages).
set -uo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  echo "services: $1 did not come up on port $2" >&2; return 1
}

apt_updated=0
need_pkg() {  # binary package
  command -v "$1" >/dev/null 2>&1 && return 0
  [ -x "$1" ] && return 0
  if [ "$apt_updated" = 0 ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

# The dashboard's browser tests (tests/e2e/test_dashboard.py) drive Debian's Chromium through
# Playwright (Playwright's own browser download cannot be used).
if ! command -v chromium >/dev/null 2>&1; then
  echo "services: installing Chromium"
  need_pkg chromium chromium
fi

# The nodejs runtime needs Node.js 18 or newer.
if ! command -v node >/dev/null 2>&1; then
  echo "services: installing Node.js"
  need_pkg node nodejs
fi

# The go runtime builds functions with Go (Debian's golang-go, Go >= 1.19), the php runtime runs
# them with the PHP CLI (php-cli, PHP >= 8.0, with its posix and pcntl extensions).
if ! command -v go >/dev/null 2>&1; then
  echo "services: installing Go"
  need_pkg go golang-go
fi
if ! command -v php >/dev/null 2>&1; then
  echo "services: installing the PHP CLI"
  need_pkg php php-cli
fi

if ! port_open 5432; then
  echo "services: starting PostgreSQL"
  need_pkg pg_ctlcluster postgresql
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  wait_port PostgreSQL 5432 30
  su postgres -c "psql -tc \"SELECT 1 FROM pg_database WHERE datname='test'\" | grep -q 1 || createdb test" || true
fi
if ! port_open 5672; then
  echo "services: starting RabbitMQ"
  need_pkg rabbitmq-server rabbitmq-server
  rabbitmq-server -detached
  wait_port RabbitMQ 5672 60
fi
if ! port_open 4222; then
  echo "services: starting NATS with JetStream"
  need_pkg nats-server nats-server
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port NATS 4222 30
fi
# etcd: the coordination tests start their own etcd-server on free ports; they only need the binary.
if ! command -v etcd >/dev/null 2>&1; then
  echo "services: installing etcd-server"
  need_pkg etcd etcd-server
fi
exit 0
