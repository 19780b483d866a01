#!/usr/bin/env bash
# Runs a three-node RabbitMQ cluster on this machine with the installed 3.10 binaries (Debian's
# rabbitmq-server), beside the machine's own node, so that labbook can be tried against a
# cluster: a node killed, a rolling restart. The nodes are labbook-c1@localhost, -c2, -c3, with
# their own AMQP ports (5701, 5702, 5703, on 127.0.0.1 only), distribution ports (25701..25703),
# data and logs (/var/cache/labbook/cluster/labbook-cN/{mnesia,log}), their own config (no
# plugin), and one Erlang cookie of their own (/var/cache/labbook/cluster/.erlang.cookie, found
# through HOME, so the machine's node and its CLI cannot talk to them by accident). They run as
# the rabbitmq user and share the machine's epmd (4369). The machine's node (rabbit@localhost,
# 5672, 25672) is left alone. Nodes 2 and 3 join node 1 (stop_app, join_cluster, start_app).
#
# Usage (as root):
#   scripts/rabbitmq-cluster.sh [start]      start the nodes that are down (all at once), form the
#                                            cluster, wait until its three nodes run, print the
#                                            AMQP URLs, comma-separated (an AMQP_URL for labbook)
#   scripts/rabbitmq-cluster.sh stop         stop the three nodes (their data is kept)
#   scripts/rabbitmq-cluster.sh kill N       kill -9 node N's Erlang VM (beam.smp) and nothing else
#   scripts/rabbitmq-cluster.sh restart N    stop node N if it runs (once no quorum queue needs it
#                                            for a majority), start it, wait until it is back in
#                                            the cluster and running; after a `kill N` too
#   scripts/rabbitmq-cluster.sh status       each node's state, then cluster_status (exit 3: none runs)
#   scripts/rabbitmq-cluster.sh urls         print the AMQP URLs (amqp://guest:guest@127.0.0.1:5701/%2f,...)
#   scripts/rabbitmq-cluster.sh url N        print node N's URL
#   scripts/rabbitmq-cluster.sh ctl N ARGS.. rabbitmqctl against node N, e.g. `ctl 1 list_queues`
#   scripts/rabbitmq-cluster.sh cli N TOOL ARGS..  another CLI against node N, e.g.
#                                            `cli 2 rabbitmq-queues quorum_status stage`
#   scripts/rabbitmq-cluster.sh reset        stop the nodes and delete their data and logs
#
# The plain CLI works too, given the cookie:
#   rabbitmqctl --erlang-cookie "$(cat /var/cache/labbook/cluster/.erlang.cookie)" \
#     -n labbook-c1@localhost cluster_status
#
# Settings (environment):
#   LABBOOK_CLUSTER_DIR        data, logs, cookie, config        (/var/cache/labbook/cluster)
#   LABBOOK_CLUSTER_PREFIX     node names: PREFIX1@localhost...  (labbook-c)
#   LABBOOK_CLUSTER_PORT       AMQP port of node N: PORT + N     (5700)
#   LABBOOK_CLUSTER_DIST_PORT  distribution port of node N       (25700)
#   LABBOOK_CLUSTER_TIMEOUT    seconds a command waits for nodes (120)
#
# Idempotent: `start` with the cluster up only prints the URLs; a node already clustered is not
# joined again. A node killed with kill -9 keeps its data and rejoins when started (`restart N`
# or `start`). After `stop`, start the nodes with `start` (all at once): a clustered node that
# did not stop last waits for its peers when it boots.
#
# RabbitMQ 3.10: kill -9 every node within a few minutes of declaring a quorum queue and that
# queue may come back without a leader (Term 0, every member a follower, for good): its members'
# names had not been saved yet (Ra's registry is written lazily), so each node starts a new empty
# member. Kill one node at a time, or all of them only once the queues are minutes old.
set -euo pipefail

BASE="${LABBOOK_CLUSTER_DIR:-/var/cache/labbook/cluster}"
PREFIX="${LABBOOK_CLUSTER_PREFIX:-labbook-c}"
PORT_BASE="${LABBOOK_CLUSTER_PORT:-5700}"
DIST_PORT_BASE="${LABBOOK_CLUSTER_DIST_PORT:-25700}"
TIMEOUT="${LABBOOK_CLUSTER_TIMEOUT:-120}"
NODES=(1 2 3)
COOKIE="$BASE/.erlang.cookie"
CONFIG="$BASE/rabbitmq.conf"
ENV_FILE="$BASE/rabbitmq-env.conf"
PLUGINS_FILE="$BASE/enabled_plugins"
SBIN=/usr/lib/rabbitmq/bin # the CLI itself, not /usr/sbin's wrappers (they switch HOME)

say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node() { echo "$PREFIX$1@localhost"; }
node_dir() { echo "$BASE/$PREFIX$1"; }
pid_file() { echo "$(node_dir "$1")/rabbitmq.pid"; }
node_log() { echo "$(node_dir "$1")/log/$(node "$1").log"; }
start_log() { echo "$(node_dir "$1")/log/start.log"; }
amqp_port() { echo $((PORT_BASE + $1)); }
dist_port() { echo $((DIST_PORT_BASE + $1)); }
url() { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/%2f"; }
urls() {
  local n out=''
  for n in "${NODES[@]}"; do out+="${out:+,}$(url "$n")"; done
  echo "$out"
}
check_n() {
  case ${1:-} in
  1 | 2 | 3) ;;
  *) die "name a node: 1, 2 or 3 (got '${1:-}')" ;;
  esac
}

# --- files shared by the nodes --------------------------------------------------------------
prepare() {
  local n d
  mkdir -p "$BASE"
  chown rabbitmq:rabbitmq "$BASE"
  chmod 755 "$BASE"
  if [ ! -s "$COOKIE" ]; then
    # Erlang wants the cookie readable by its owner only.
    (
      umask 077
      od -An -N16 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F >"$COOKIE.new"
    )
    chown rabbitmq:rabbitmq "$COOKIE.new"
    chmod 400 "$COOKIE.new"
    mv "$COOKIE.new" "$COOKIE"
  fi
  cat >"$CONFIG" <<'EOF'
# Written by labbook's scripts/rabbitmq-cluster.sh for its three local nodes. The node name,
# address and ports come from the environment it gives each node (RABBITMQ_NODENAME,
# RABBITMQ_NODE_IP_ADDRESS, RABBITMQ_NODE_PORT, RABBITMQ_DIST_PORT). guest may log in from the
# loopback interface (RabbitMQ's default), which is where every client comes from.
loopback_users.guest = true
EOF
  # Read by the node and the CLI instead of /etc/rabbitmq/rabbitmq-env.conf (which names the
  # machine's node).
  echo '# Written by labbook'"'"'s scripts/rabbitmq-cluster.sh: nothing from /etc/rabbitmq.' >"$ENV_FILE"
  echo '[].' >"$PLUGINS_FILE"
  chmod 644 "$CONFIG" "$ENV_FILE" "$PLUGINS_FILE"
  for n in "${NODES[@]}"; do
    d=$(node_dir "$n")
    mkdir -p "$d/mnesia" "$d/log"
    chown rabbitmq:rabbitmq "$d" "$d/mnesia" "$d/log"
  done
}

# --- running things as the rabbitmq user, with node N's environment -------------------------
# Sets NODE_ENV (an `env -i ...` command line) for node N.
node_env() {
  local n=$1 d
  d=$(node_dir "$n")
  NODE_ENV=(
    /usr/bin/env -i
    HOME="$BASE" # where Erlang finds .erlang.cookie, for the node and the CLI alike
    PATH="$SBIN:/usr/sbin:/usr/bin:/sbin:/bin"
    LANG=C.UTF-8 LC_ALL=C.UTF-8
    RABBITMQ_NODENAME="$(node "$n")"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    RABBITMQ_NODE_PORT="$(amqp_port "$n")"
    RABBITMQ_DIST_PORT="$(dist_port "$n")"
    RABBITMQ_CONF_ENV_FILE="$ENV_FILE"
    RABBITMQ_CONFIG_FILE="$CONFIG"
    RABBITMQ_ADVANCED_CONFIG_FILE="$BASE/advanced.config" # none
    RABBITMQ_ENABLED_PLUGINS_FILE="$PLUGINS_FILE"
    RABBITMQ_MNESIA_BASE="$d/mnesia"
    RABBITMQ_LOG_BASE="$d/log"
    RABBITMQ_PID_FILE="$(pid_file "$n")"
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    # The CLI's own distribution ports: apart from those of the machine's CLI (35672..35682).
    RABBITMQ_CTL_DIST_PORT_MIN=35701 RABBITMQ_CTL_DIST_PORT_MAX=35730
    ERL_EPMD_ADDRESS=127.0.0.1 # in case this node is the one that starts epmd
    ERL_CRASH_DUMP="$d/log/erl_crash.dump"
  )
}

# Without this script's lock (fd 9): an epmd that a command starts would hold it forever.
as_node() {
  local n=$1
  shift
  node_env "$n"
  setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "${NODE_ENV[@]}" "$@" 9>&-
}
ctl() {
  local n=$1
  shift
  as_node "$n" rabbitmqctl -n "$(node "$n")" "$@"
}
cli() {
  local n=$1 tool=$2
  shift 2
  case $tool in
  rabbitmqctl | rabbitmq-diagnostics | rabbitmq-queues | rabbitmq-upgrade | rabbitmq-plugins | rabbitmq-streams) ;;
  *) die "not a RabbitMQ CLI: $tool" ;;
  esac
  as_node "$n" "$tool" -n "$(node "$n")" "$@"
}
# An Erlang expression evaluated on node N, its result without quotes.
ev() { ctl "$1" -q eval "$2" | tr -d '"'; }

# --- the nodes' state -----------------------------------------------------------------------
registered() { epmd -names 2>/dev/null | grep -q "^name $PREFIX$1 at port "; }
pid_alive() { [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
is_node_beam() { # is_node_beam PID N: PID is node N's Erlang VM
  pid_alive "$1" && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = beam.smp ] &&
    grep -qzxF "RABBITMQ_NODENAME=$(node "$2")" "/proc/$1/environ" 2>/dev/null
}
# The OS pid of node N's beam.smp, from its pid file (written early in its boot), else from the
# node itself; nothing when it does not run.
beam_pid() {
  local n=$1 pid=''
  [ -r "$(pid_file "$n")" ] && pid=$(tr -dc 0-9 <"$(pid_file "$n")")
  if is_node_beam "$pid" "$n"; then
    echo "$pid"
    return
  fi
  if registered "$n"; then
    pid=$(ev "$n" 'os:getpid().' 2>/dev/null) || true
    if is_node_beam "$pid" "$n"; then echo "$pid"; fi
  fi
  return 0
}
alive() { [ -n "$(beam_pid "$1")" ]; }
# stopped (its app, after stop_app), booting, core_started, ready or stopping.
boot_state() { ev "$1" 'rabbit_boot_state:get().' 2>/dev/null || echo unknown; }
up() { alive "$1" && [ "$(boot_state "$1")" = ready ]; }

fail_node() {
  local n=$1 f
  shift
  printf 'error: node %s (%s): %s\n' "$n" "$(node "$n")" "$*" >&2
  for f in "$(start_log "$n")" "$(node_log "$n")"; do
    if [ -s "$f" ]; then
      printf -- '--- last lines of %s\n' "$f" >&2
      tail -n 20 "$f" | cut -c 1-300 >&2
    fi
  done
  exit 1
}

# --- starting and stopping one node ---------------------------------------------------------
declare -A LAUNCHER=()

# Starts node N's VM in its own session (it outlives this script); does not wait.
launch() {
  local n=$1 p
  for p in "$(amqp_port "$n")" "$(dist_port "$n")"; do
    port_open "$p" && die "port $p on 127.0.0.1 is taken by something that is not $(node "$n")" \
      "(see ss -ltnp; LABBOOK_CLUSTER_PORT / LABBOOK_CLUSTER_DIST_PORT move the nodes)"
  done
  rm -f "$(pid_file "$n")" # a kill -9 leaves it behind
  printf '\n=== %s: starting %s\n' "$(date -Is)" "$(node "$n")" >>"$(start_log "$n")"
  chown rabbitmq:rabbitmq "$(start_log "$n")"
  node_env "$n"
  # shellcheck disable=SC2016 # $1, $2 are the inner shell's
  setsid setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "${NODE_ENV[@]}" \
    sh -c 'cd "$1" && exec rabbitmq-server >>"$2" 2>&1' sh "$(node_dir "$n")" "$(start_log "$n")" \
    </dev/null >/dev/null 2>&1 9>&- &
  LAUNCHER[$n]=$!
}

# Waits until node N has booted (rabbit running), at most until DEADLINE (epoch seconds).
await_node() {
  local n=$1 deadline=$2 left out
  # await_startup needs the node registered in epmd first; epmd -names is cheap to ask.
  while ! registered "$n"; do
    if ! pid_alive "${LAUNCHER[$n]:-}" && ! alive "$n"; then
      fail_node "$n" "exited while starting"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || fail_node "$n" "not up after ${TIMEOUT} s"
    sleep 0.3
  done
  left=$((deadline - $(date +%s)))
  [ "$left" -ge 5 ] || left=5
  if ! out=$(ctl "$n" -q await_startup --timeout "$left" 2>&1); then
    # A boot that failed halts the VM within a few seconds.
    for _ in $(seq 1 10); do
      alive "$n" || fail_node "$n" "exited while booting"
      [ "$(date +%s)" -lt "$deadline" ] || break
      sleep 0.5
    done
    fail_node "$n" "did not finish booting within ${TIMEOUT} s (a clustered node waits for the" \
      "peers it last saw running: start them all with \`start\`): $(head -n 1 <<<"$out")"
  fi
}

# Stops node N (gracefully) and waits until its VM has exited.
stop_node() {
  local n=$1 pid out
  pid=$(beam_pid "$n")
  [ -n "$pid" ] || return 0
  out=$(ctl "$n" -q stop 2>&1) || say "rabbitmqctl stop on node $n: $out"
  for _ in $(seq 1 $((TIMEOUT * 2))); do
    pid_alive "$pid" || return 0
    sleep 0.5
  done
  say "node $n (pid $pid) still runs ${TIMEOUT} s after stop: killing it"
  kill -9 "$pid" 2>/dev/null || true
}

# --- the cluster ----------------------------------------------------------------------------
# The nodes node N sees running in its cluster, comma-separated and sorted.
running_seen_by() {
  ev "$1" 'lists:flatten(lists:join(",", [atom_to_list(N) || N <- lists:sort(rabbit_nodes:all_running())])).'
}
member_of() { # member_of N M: node N counts node M among its cluster's nodes
  [ "$(ev "$1" "lists:member('$(node "$2")', rabbit_mnesia:cluster_nodes(all)).")" = true ]
}

# Node N (2 or 3) joins node 1's cluster unless it is a member already.
join() {
  local n=$1 a b out
  a=false b=false
  member_of 1 "$n" && a=true
  member_of "$n" 1 && b=true
  if $a && $b; then return 0; fi
  if $a || $b; then
    die "node $n and node 1 disagree on whether node $n is in the cluster (a data dir deleted?):" \
      "\`$0 reset\` starts over from empty nodes"
  fi
  say "node $n joins $(node 1)"
  out=$(ctl "$n" -q stop_app 2>&1) || fail_node "$n" "stop_app failed: $out"
  out=$(ctl "$n" -q join_cluster "$(node 1)" 2>&1) || fail_node "$n" "join_cluster $(node 1) failed: $out"
  out=$(ctl "$n" -q start_app 2>&1) || fail_node "$n" "start_app failed: $out"
}

# Waits until node VIA sees every node of WANT (comma-separated, sorted) running.
await_running() {
  local via=$1 want=$2 deadline=$3 seen=''
  while :; do
    seen=$(running_seen_by "$via" 2>/dev/null) || true
    [ "$seen" = "$want" ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] ||
      fail_node "$via" "sees running [$seen], not [$want], after ${TIMEOUT} s"
    sleep 1
  done
}

all_nodes() {
  local n out=''
  for n in "$@"; do out+="${out:+,}$(node "$n")"; done
  echo "$out"
}

start() {
  local t0 n deadline started=()
  prepare
  t0=$(now)
  deadline=$(($(date +%s) + TIMEOUT))
  for n in "${NODES[@]}"; do
    if alive "$n"; then
      if [ "$(boot_state "$n")" = stopped ]; then # after a stop_app
        say "starting RabbitMQ on $(node "$n") (its VM runs, the app was stopped)"
        ctl "$n" -q start_app >/dev/null 2>&1 &
        started+=("$n")
      fi
      continue
    fi
    say "starting $(node "$n"): AMQP 127.0.0.1:$(amqp_port "$n"), dist $(dist_port "$n") (log: $(node_dir "$n")/log/)"
    launch "$n"
    started+=("$n")
  done
  if [ ${#started[@]} -eq 0 ] && [ "$(running_seen_by 1 2>/dev/null)" = "$(all_nodes "${NODES[@]}")" ]; then
    say "the cluster runs: $(all_nodes "${NODES[@]}")"
    urls
    return
  fi
  for n in "${NODES[@]}"; do await_node "$n" "$deadline"; done
  [ ${#started[@]} -eq 0 ] || say "nodes ${started[*]} up in $(since "$t0")"
  join 2
  join 3
  await_running 1 "$(all_nodes "${NODES[@]}")" "$deadline"
  say "cluster of $(all_nodes "${NODES[@]}") running, in $(since "$t0")"
  urls
}

stop() {
  local n pids=() any=''
  for n in "${NODES[@]}"; do
    if alive "$n"; then
      any=1
      say "stopping $(node "$n")"
      stop_node "$n" &
      pids+=($!)
    fi
  done
  [ -n "$any" ] || {
    say "no node of the cluster runs"
    return 0
  }
  for n in "${pids[@]}"; do wait "$n" || true; done
  for n in "${NODES[@]}"; do
    alive "$n" && die "node $n still runs"
  done
  say "the cluster is stopped (data kept in $BASE)"
}

kill_node() {
  local n=$1 pid
  pid=$(beam_pid "$n")
  if [ -z "$pid" ]; then
    say "node $n ($(node "$n")) does not run: nothing to kill"
    return 0
  fi
  kill -9 "$pid"
  for _ in $(seq 1 50); do
    if ! pid_alive "$pid" && ! registered "$n"; then
      say "killed $(node "$n") (kill -9 $pid)"
      return 0
    fi
    sleep 0.1
  done
  die "node $n (pid $pid) is still there after kill -9"
}

restart_node() {
  local n=$1 t0 deadline m others=() out
  prepare
  t0=$(now)
  for m in "${NODES[@]}"; do
    [ "$m" = "$n" ] && continue
    if up "$m"; then others+=("$m"); fi
  done
  if alive "$n" && [ "$(boot_state "$n")" != ready ]; then
    say "stopping $(node "$n") (RabbitMQ is not up on it)"
    stop_node "$n"
  elif alive "$n"; then
    # Stopping it must not leave a quorum queue without a majority of its members: with a node
    # down that is known at once; with all up, members that just came back may need a moment.
    if [ ${#others[@]} -lt $((${#NODES[@]} - 1)) ]; then
      out=$(cli "$n" rabbitmq-queues -q check_if_node_is_quorum_critical 2>&1) ||
        die "node $n may not stop now: with node(s) down, quorum queues would lose their majority:" \
          "$out (\`kill $n\` then \`restart $n\` forces it)"
    elif [ ${#others[@]} -gt 0 ]; then
      out=$(cli "$n" rabbitmq-upgrade -q await_online_quorum_plus_one --timeout 60 2>&1) ||
        die "node $n may not stop now: a quorum queue would lose its majority ($out);" \
          "see \`$0 cli $n rabbitmq-queues check_if_node_is_quorum_critical\`"
    fi
    say "stopping $(node "$n")"
    stop_node "$n"
  fi
  deadline=$(($(date +%s) + TIMEOUT))
  say "starting $(node "$n"): AMQP 127.0.0.1:$(amqp_port "$n") (log: $(node_dir "$n")/log/)"
  launch "$n"
  await_node "$n" "$deadline"
  if [ "$n" != 1 ] && [ "${others[0]:-}" = 1 ]; then join "$n"; fi
  if [ ${#others[@]} -eq 0 ]; then
    say "$(node "$n") runs, alone (the other nodes are down), in $(since "$t0")"
    return
  fi
  # Back in the cluster: another node sees it running, with every node that was up.
  # shellcheck disable=SC2046 # one node number a word
  await_running "${others[0]}" "$(all_nodes $(printf '%s\n' "$n" "${others[@]}" | sort))" "$deadline"
  say "$(node "$n") is back in the cluster, running with $(all_nodes "${others[@]}"), in $(since "$t0")"
}

status() {
  local n pid state via='' any=''
  for n in "${NODES[@]}"; do
    pid=$(beam_pid "$n")
    if [ -z "$pid" ]; then
      echo "$(node "$n"): down"
    else
      state=$(boot_state "$n")
      if [ "$state" = ready ]; then
        echo "$(node "$n"): runs (pid $pid), $(url "$n")"
        [ -n "$via" ] || via=$n
      else
        case $state in
        stopped) state="stopped (after a stop_app; \`start\` starts it)" ;;
        booting) state="booting (a clustered node waits for the peers it last saw running)" ;;
        esac
        echo "$(node "$n"): its VM runs (pid $pid), RabbitMQ is $state"
        any=1
      fi
    fi
  done
  if [ -z "$via" ]; then
    [ -n "$any" ] || echo "no node of the cluster runs"
    return 3
  fi
  ctl "$via" cluster_status
}

reset() {
  stop
  local n
  for n in "${NODES[@]}"; do rm -rf --one-file-system "$(node_dir "$n")"; done
  say "deleted the nodes' data and logs under $BASE"
}

cmd="${1:-start}"
[ $# -gt 0 ] && shift
case $cmd in
urls)
  urls
  exit 0
  ;;
url)
  check_n "${1:-}"
  url "$1"
  exit 0
  ;;
esac
[ "$(id -u)" = 0 ] || die "run as root (the nodes run as the rabbitmq user)"
id rabbitmq >/dev/null 2>&1 || die "no rabbitmq user: install Debian's rabbitmq-server"
[ -x "$SBIN/rabbitmq-server" ] || die "no $SBIN/rabbitmq-server: install Debian's rabbitmq-server"
mkdir -p "$BASE"
exec 9>"$BASE/.lock"
case $cmd in
start)
  flock 9
  start
  ;;
stop)
  flock 9
  stop
  ;;
kill)
  check_n "${1:-}"
  flock 9
  kill_node "$1"
  ;;
restart)
  check_n "${1:-}"
  flock 9
  restart_node "$1"
  ;;
status) status ;;
ctl)
  check_n "${1:-}"
  n=$1
  shift
  ctl "$n" "$@"
  ;;
cli)
  check_n "${1:-}"
  [ $# -ge 2 ] || die "usage: $0 cli N TOOL ARGS..."
  cli "$@"
  ;;
reset)
  flock 9
  reset
  ;;
*) die "usage: $0 [start|stop|kill N|restart N|status|urls|url N|ctl N ARGS...|cli N TOOL ARGS...|reset]" ;;
esac
