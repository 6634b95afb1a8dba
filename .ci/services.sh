#!/usr/bin/env bash
# Start the external servers the tests use when they are not already running (CI machines have
# them installed; a fresh Debian machine gets them from Debian's packages, in one apt-get call).
set -uo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  echo "services: $1 did not come up on port $2" >&2; return 1
}

# dpkg has one lock: on a shared machine, queue behind other users of apt-get.
apt() { if command -v flock >/dev/null 2>&1; then flock /tmp/headwater-apt.lock apt-get "$@"; else apt-get "$@"; fi; }

# What is missing, as Debian packages: the nodejs runtime needs Node.js 18 or newer; the
# coordination tests start their own etcd-server on free ports (they only need the binary); the
# OpenStack harness's Zaqar keeps its messages in Redis; the dashboard's browser tests
# (tests/e2e/test_dashboard.py) drive Debian's Chromium through Playwright (Playwright's own
# browser download cannot be used).
missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
port_open 5432 || command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
port_open 5672 || command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
port_open 4222 || command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
port_open 6379 || command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The go runtime builds functions with Go (Debian's golang-go, Go >= 1.19), the php runtime runs
# them with the PHP CLI (php-cli, PHP >= 8.0, with its posix and pcntl extensions).
command -v go >/dev/null 2>&1 || missing+=(golang-go)
command -v php >/dev/null 2>&1 || missing+=(php-cli)
if [ ${#missing[@]} -gt 0 ]; then
  echo "services: installing ${missing[*]}"
  apt update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { echo "services: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi

if ! port_open 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
fi
if ! port_open 5672; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached
fi
if ! port_open 4222; then
  echo "services: starting NATS with JetStream"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
fi
if ! port_open 6379; then
  echo "services: starting Redis"
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no >/dev/null
fi
# Started together above; now wait for each.
rc=0
wait_port PostgreSQL 5432 60 || rc=1
wait_port RabbitMQ 5672 90 || rc=1
wait_port NATS 4222 30 || rc=1
wait_port Redis 6379 30 || rc=1
if [ $rc = 0 ]; then
  su postgres -c "psql -tc \"SELECT 1 FROM pg_database WHERE datname='test'\" | grep -q 1 || createdb test" 2>/dev/null || true
fi
exit $rc
