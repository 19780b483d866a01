#!/usr/bin/env bash
# Installs (if missing) and starts what labbook's tests and demo talk to, on a Debian machine:
# PostgreSQL and RabbitMQ (started if down), the moto EC2 API emulator (PyPI) and the maildev
# SMTP sink with its web inbox (npm).
# Idempotent: safe to run again; it leaves running what already runs. A port that answers as
# something else stops it before it installs anything, naming the program and the setting.
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

# Who holds a port, if `ss` can say.
holder() { ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\("[^"]*"\).*/\1/p' | head -n 1; }

# A port that answers must be the service expected there: checked before anything is installed,
# so a port another program holds is named at once rather than after an install.
port_ok() {
  local port=$1 name=$2 probe=$3
  port_open "$port" || return 0
  if eval "$probe"; then return 0; fi
  local held
  held=$(holder "$port" || true)
  echo "error: 127.0.0.1:$port answers, but not as $name: another program holds it (${held:-a program ss cannot name})." >&2
  echo "       Stop that program, or give $name another port: $4" >&2
  exit 1
}
smtp_banner() { timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; head -n 1 <&3" 2>/dev/null | grep -q '^220'; }
amqp_answers() { timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; printf 'AMQP\0\0\x09\x01' >&3; head -c 4 <&3" 2>/dev/null | grep -q .; }
port_ok 5432 PostgreSQL "timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5432' 2>/dev/null" "PostgreSQL's port is fixed at 5432 here"
port_ok 5672 RabbitMQ "amqp_answers 5672" "RabbitMQ's port is fixed at 5672 here"
port_ok "$MOTO_PORT" moto "curl -fsS --max-time 5 -o /dev/null 'http://127.0.0.1:$MOTO_PORT/moto-api/' 2>/dev/null" "MOTO_PORT=5001 $0"
port_ok "$MAILDEV_SMTP_PORT" "maildev (SMTP)" "smtp_banner $MAILDEV_SMTP_PORT" "MAILDEV_SMTP_PORT=2025 $0"
port_ok "$MAILDEV_WEB_PORT" "maildev (web)" "curl -fsS --max-time 5 -o /dev/null 'http://127.0.0.1:$MAILDEV_WEB_PORT/email' 2>/dev/null" "MAILDEV_WEB_PORT=2080 $0"

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
