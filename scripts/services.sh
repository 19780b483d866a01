#!/usr/bin/env bash
# Installs (if missing) and starts what labbook's tests and demo talk to, on a Debian machine:
# PostgreSQL and RabbitMQ (started if down), the moto EC2 API emulator (PyPI) and the maildev
# SMTP sink with its web inbox (npm).
# Idempotent: safe to run again; it leaves running what already runs.
set -euo pipefail

STATE_DIR="${LABBOOK_STATE_DIR:-/tmp/labbook-services}"
MOTO_PORT="${MOTO_PORT:-5000}"
MAILDEV_SMTP_PORT="${MAILDEV_SMTP_PORT:-1025}"
MAILDEV_WEB_PORT="${MAILDEV_WEB_PORT:-1080}"
mkdir -p "$STATE_DIR"

say() { printf '==> %s\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  echo "error: $name did not start listening on 127.0.0.1:$port (see $STATE_DIR/$name.log)" >&2
  exit 1
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  say "installing $* (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL
if ! port_open 5432; then
  if ! command -v pg_ctlcluster >/dev/null; then apt_install postgresql; fi
  say "starting PostgreSQL"
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_port 5432 postgresql
fi

# RabbitMQ
if ! port_open 5672; then
  if ! command -v rabbitmq-server >/dev/null; then apt_install rabbitmq-server; fi
  say "starting RabbitMQ"
  rabbitmq-server -detached
  wait_port 5672 rabbitmq
fi
for _ in $(seq 1 60); do
  rabbitmqctl -q await_startup >/dev/null 2>&1 && break
  sleep 1
done

# moto: the EC2 API emulator
if ! command -v moto_server >/dev/null; then
  say "installing moto[server] (PyPI)"
  python3 -m pip install --quiet 'moto[server]>=5,<6'
fi
if ! port_open "$MOTO_PORT"; then
  say "starting moto on 127.0.0.1:$MOTO_PORT"
  nohup moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$STATE_DIR/moto.log" 2>&1 &
  wait_port "$MOTO_PORT" moto
fi

# maildev: an SMTP server that keeps what it receives, with a web inbox and a REST API
if ! command -v maildev >/dev/null; then
  say "installing maildev (npm)"
  npm install --global --silent maildev@2.2.1 >/dev/null
fi
if ! port_open "$MAILDEV_SMTP_PORT"; then
  say "starting maildev (SMTP 127.0.0.1:$MAILDEV_SMTP_PORT, inbox http://127.0.0.1:$MAILDEV_WEB_PORT)"
  nohup maildev --ip 127.0.0.1 --web-ip 127.0.0.1 -s "$MAILDEV_SMTP_PORT" -w "$MAILDEV_WEB_PORT" \
    >"$STATE_DIR/maildev.log" 2>&1 &
  wait_port "$MAILDEV_SMTP_PORT" maildev
  wait_port "$MAILDEV_WEB_PORT" maildev
fi
say "services are up: PostgreSQL :5432, RabbitMQ :5672, moto :$MOTO_PORT, maildev :$MAILDEV_SMTP_PORT/:$MAILDEV_WEB_PORT"
