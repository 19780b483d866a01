#!/usr/bin/env bash
# Runs a RabbitMQ 4.x node beside the machine's own RabbitMQ (Debian 12 ships 3.10), so labbook
# can be tried against both. The 4.x node lives in a Debian 13 (trixie) root made once with
# debootstrap (minimal variant) in a cache folder outside any checkout, with trixie's
# rabbitmq-server (4.0.x) installed by apt inside it. It runs in that root (chroot) as its own
# node, with its own ports, epmd and data, listening on 127.0.0.1 only, and leaves the
# machine's 3.10 node (rabbit@localhost, 5672, epmd 4369) alone.
#
# Usage (as root):
#   scripts/rabbitmq4.sh [start]     make the root if missing, start the node if down, wait until
#                                    it answers, print its AMQP base URL
#   scripts/rabbitmq4.sh stop        stop the node and its epmd, unmount /proc /dev /sys of the root
#   scripts/rabbitmq4.sh status      say whether it runs, and its URL
#   scripts/rabbitmq4.sh url         print the AMQP base URL (amqp://guest:guest@127.0.0.1:5673)
#   scripts/rabbitmq4.sh ctl ARGS..  rabbitmqctl (4.x) against the node, e.g. `ctl add_vhost x`
#
# Tests against it:
#   TEST_AMQP_BASE=$(scripts/rabbitmq4.sh url) TEST_RABBITMQCTL="scripts/rabbitmq4.sh ctl" ...
#
# Settings (environment):
#   LABBOOK_RABBITMQ4_ROOT       the trixie root       (/var/cache/labbook/trixie-rabbitmq)
#   LABBOOK_RABBITMQ4_MIRROR     Debian mirror          (the first one of apt's sources, else
#                                                        http://deb.debian.org/debian)
#   LABBOOK_RABBITMQ4_NODENAME   Erlang node name       (rabbit4@localhost)
#   LABBOOK_RABBITMQ4_PORT       AMQP port              (5673)
#   LABBOOK_RABBITMQ4_DIST_PORT  Erlang distribution    (25673)
#   LABBOOK_RABBITMQ4_EPMD_PORT  the node's own epmd    (4370)
#
# Idempotent: a second `start` finds the root made and the node up and only prints the URL;
# mounts are made only where nothing is mounted yet. A debootstrap that was interrupted is
# thrown away (its marker file is missing) and made again.
set -euo pipefail

ROOT="${LABBOOK_RABBITMQ4_ROOT:-/var/cache/labbook/trixie-rabbitmq}"
SUITE=trixie
NODENAME="${LABBOOK_RABBITMQ4_NODENAME:-rabbit4@localhost}"
PORT="${LABBOOK_RABBITMQ4_PORT:-5673}"
DIST_PORT="${LABBOOK_RABBITMQ4_DIST_PORT:-25673}"
EPMD_PORT="${LABBOOK_RABBITMQ4_EPMD_PORT:-4370}"
URL="amqp://guest:guest@127.0.0.1:$PORT"
BOOTSTRAPPED="$ROOT/.labbook-debootstrap-done"
INSTALLED="$ROOT/.labbook-rabbitmq-installed"
START_LOG=/var/log/rabbitmq/labbook-start.log # inside the root

say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

source "$(dirname "${BASH_SOURCE[0]}")/lib/apt-mirror.sh"
MIRROR="${LABBOOK_RABBITMQ4_MIRROR:-$(apt_mirror)}"

# The root must not be inside a git checkout (it holds a whole Debian system).
refuse_checkout() {
  local d=$ROOT
  while [ ! -d "$d" ]; do d=$(dirname "$d"); done
  if git -C "$d" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    die "$ROOT is inside a git checkout: set LABBOOK_RABBITMQ4_ROOT to a folder outside it"
  fi
}

# --- mounts -------------------------------------------------------------------------------
mount_root() {
  local fs
  for fs in proc dev sys; do
    mkdir -p "$ROOT/$fs"
    mountpoint -q "$ROOT/$fs" && continue
    case $fs in
    proc) mount -t proc proc "$ROOT/proc" ;;
    dev) mount --bind /dev "$ROOT/dev" ;;
    sys) mount -t sysfs sysfs "$ROOT/sys" ;;
    esac
  done
}

# Every mount under the root, deepest first (also what an interrupted debootstrap left).
unmount_root() {
  local m
  [ -d "$ROOT" ] || return 0
  awk -v r="$(realpath "$ROOT")" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts |
    sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}

# --- the root -----------------------------------------------------------------------------
make_root() {
  local t0
  if [ -e "$BOOTSTRAPPED" ]; then
    return
  fi
  refuse_checkout
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  if [ -e "$ROOT" ]; then
    say "throwing away an unfinished root in $ROOT"
    unmount_root
    rm -rf --one-file-system "$ROOT"
  fi
  mkdir -p "$(dirname "$ROOT")"
  say "debootstrap --variant=minbase $SUITE into $ROOT from $MIRROR (once; a few minutes)"
  t0=$(now)
  debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 ||
    die "debootstrap failed: see $ROOT.debootstrap.log (and $ROOT/debootstrap/debootstrap.log)"
  unmount_root # debootstrap may leave /proc or /sys mounted
  touch "$BOOTSTRAPPED"
  say "debootstrap done in $(since "$t0")"
}

install_rabbitmq() {
  local t0
  if [ -e "$INSTALLED" ]; then
    return
  fi
  say "installing rabbitmq-server with apt inside the root (once)"
  t0=$(now)
  # No service may start while packages are installed: the node is started by this script.
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
  chmod 755 "$ROOT/usr/sbin/policy-rc.d"
  [ -s "$ROOT/etc/resolv.conf" ] || cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  grep -qw localhost "$ROOT/etc/hosts" 2>/dev/null ||
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >>"$ROOT/etc/hosts"
  # The node's user gets the ids of the machine's own rabbitmq user when they are free in the
  # root, so that ps shows it as rabbitmq (else the package makes one, whose uid may be
  # another account's on this machine).
  local uid gid
  if uid=$(id -u rabbitmq 2>/dev/null) && gid=$(id -g rabbitmq 2>/dev/null) &&
    ! chroot "$ROOT" getent passwd rabbitmq >/dev/null &&
    ! chroot "$ROOT" getent passwd "$uid" >/dev/null &&
    ! chroot "$ROOT" getent group rabbitmq >/dev/null &&
    ! chroot "$ROOT" getent group "$gid" >/dev/null; then
    chroot "$ROOT" groupadd --system -g "$gid" rabbitmq
    chroot "$ROOT" useradd --system -u "$uid" -g rabbitmq -d /var/lib/rabbitmq -M \
      -s /usr/sbin/nologin -c "RabbitMQ messaging server" rabbitmq
  fi
  mount_root
  chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends rabbitmq-server >"$ROOT.apt.log" 2>&1 ||
    die "apt-get install rabbitmq-server failed in the root: see $ROOT.apt.log"
  chroot "$ROOT" apt-get clean
  # Its configuration: AMQP on 127.0.0.1 only, no plugin (nothing else listens). guest may log
  # in from the loopback interface (RabbitMQ's default), which is where every client comes from.
  cat >"$ROOT/etc/rabbitmq/rabbitmq.conf" <<'EOF'
# Written by labbook's scripts/rabbitmq4.sh. The address, port and node name come from the
# environment that script gives (RABBITMQ_NODE_IP_ADDRESS, RABBITMQ_NODE_PORT, ...).
loopback_users.guest = true
EOF
  : >"$ROOT/etc/rabbitmq/rabbitmq-env.conf"
  echo '[].' >"$ROOT/etc/rabbitmq/enabled_plugins"
  touch "$INSTALLED"
  # shellcheck disable=SC2016 # ${Version} is dpkg-query's
  say "rabbitmq-server $(chroot "$ROOT" dpkg-query -W -f='${Version}' rabbitmq-server) installed in $(since "$t0")"
}

# --- running things in the root as its rabbitmq user, with the node's environment ---------
# Sets USERSPEC and ROOT_ENV (an `env -i ...` command line) for chroot.
root_env() {
  USERSPEC="$(chroot "$ROOT" id -u rabbitmq):$(chroot "$ROOT" id -g rabbitmq)"
  ROOT_ENV=(
    /usr/bin/env -i
    HOME=/var/lib/rabbitmq
    PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin
    LANG=C.UTF-8 LC_ALL=C.UTF-8
    RABBITMQ_NODENAME="$NODENAME"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    RABBITMQ_NODE_PORT="$PORT"
    RABBITMQ_DIST_PORT="$DIST_PORT"
    RABBITMQ_MNESIA_BASE=/var/lib/rabbitmq/mnesia
    RABBITMQ_LOG_BASE=/var/log/rabbitmq
    RABBITMQ_ENABLED_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    ERL_EPMD_PORT="$EPMD_PORT"
    ERL_EPMD_ADDRESS=127.0.0.1
  )
}

# Without this script's lock files (fds 8, 9): an epmd a command starts outlives it.
in_root() {
  root_env
  chroot --userspec="$USERSPEC" "$ROOT" "${ROOT_ENV[@]}" "$@" 8>&- 9>&-
}

ctl() {
  [ -e "$INSTALLED" ] || die "no RabbitMQ 4.x root yet: run scripts/rabbitmq4.sh start"
  (
    flock 8
    mount_root
  ) 8>"$ROOT.mount.lock"
  in_root rabbitmqctl -n "$NODENAME" "$@"
}

# Processes whose root directory is the chroot: the node, its epmd, helpers.
root_pids() {
  local p r real
  real=$(realpath "$ROOT")
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    [ "$r" = "$real" ] && echo "${p#/proc/}"
  done
  return 0
}

running() {
  [ -e "$INSTALLED" ] && [ -n "$(root_pids)" ] && ctl -q ping >/dev/null 2>&1
}

start() {
  local t0 pid p
  make_root
  install_rabbitmq
  if running; then
    say "RabbitMQ 4.x ($NODENAME) already runs"
    echo "$URL"
    return
  fi
  for p in "$PORT" "$DIST_PORT" "$EPMD_PORT"; do
    if port_open "$p" && [ -z "$(root_pids)" ]; then
      die "port $p on 127.0.0.1 is taken by something else: set LABBOOK_RABBITMQ4_*PORT"
    fi
  done
  mount_root
  say "starting RabbitMQ 4.x: node $NODENAME, AMQP 127.0.0.1:$PORT, dist $DIST_PORT, epmd $EPMD_PORT (log: $ROOT$START_LOG)"
  t0=$(now)
  # Its own session, without this script's lock (fd 9): it outlives the script.
  root_env
  setsid chroot --userspec="$USERSPEC" "$ROOT" "${ROOT_ENV[@]}" \
    sh -c "exec rabbitmq-server >>$START_LOG 2>&1" </dev/null >/dev/null 2>&1 8>&- 9>&- &
  pid=$!
  # await_startup needs the node to be registered in its epmd first: try until it is.
  for _ in $(seq 1 120); do
    if ctl -q await_startup --timeout 60 >/dev/null 2>&1; then
      break
    fi
    kill -0 "$pid" 2>/dev/null || die "RabbitMQ 4.x exited: see $ROOT$START_LOG and $ROOT/var/log/rabbitmq/"
    sleep 1
  done
  ctl -q await_startup --timeout 5 >/dev/null 2>&1 || die "RabbitMQ 4.x did not start: see $ROOT$START_LOG"
  port_open "$PORT" || die "RabbitMQ 4.x runs but does not listen on 127.0.0.1:$PORT"
  say "RabbitMQ $(ctl -q eval 'rabbit_misc:version().' 2>/dev/null | tr -d '"') up in $(since "$t0")"
  echo "$URL"
}

stop() {
  local pids
  if [ ! -e "$INSTALLED" ]; then
    say "no RabbitMQ 4.x root in $ROOT: nothing to stop"
    return
  fi
  if [ -n "$(root_pids)" ]; then
    mount_root
    say "stopping RabbitMQ 4.x ($NODENAME)"
    ctl -q stop >/dev/null 2>&1 || true
    in_root epmd -kill >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do
      [ -z "$(root_pids)" ] && break
      sleep 0.5
    done
    pids=$(root_pids)
    if [ -n "$pids" ]; then
      say "ending what is left in the root: $(echo "$pids" | tr '\n' ' ')"
      # shellcheck disable=SC2086
      kill $pids 2>/dev/null || true
      sleep 2
      pids=$(root_pids)
      # shellcheck disable=SC2086
      [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
  else
    say "RabbitMQ 4.x is not running"
  fi
  unmount_root
}

if [ "${1:-}" = url ]; then
  echo "$URL"
  exit 0
fi
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mount need it)"
mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
cmd="${1:-start}"
[ $# -gt 0 ] && shift
case $cmd in
start)
  flock 9
  start
  ;;
stop)
  flock 9
  stop
  ;;
status)
  if running; then
    echo "RabbitMQ 4.x ($NODENAME) runs: $URL"
  else
    echo "RabbitMQ 4.x ($NODENAME) is not running"
    exit 3
  fi
  ;;
ctl) ctl "$@" ;;
*) die "usage: $0 [start|stop|status|url|ctl RABBITMQCTL-ARGS...]" ;;
esac
