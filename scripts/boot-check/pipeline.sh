# shellcheck shell=bash
# The boot check's user-data, as labbook renders it: sourced by scripts/boot-check.sh. Runs
# the real pipeline the way scripts/demo.sh does (labbook migrate, topology, run all, publish)
# against the services of scripts/services.sh, in a database and a RabbitMQ vhost of its own,
# one booking per bootstrap mode, then reads each instance's user-data back from moto and the
# passwords from maildev (labdata.py). pipeline_cleanup removes what it made.

PIPELINE_DB=labbook_boot_check
PIPELINE_VHOST=labbook-boot-check
PIPELINE_INSTALLATION=boot-check
PIPELINE_BOOKINGS=()
PIPELINE_INSTANCES=()
PIPELINE_WORKERS=""
PIPELINE_READY=""

# BIN: the directory of the labbook binaries.
pipeline_binaries() {
  if [ -n "${LABBOOK_BIN_DIR:-}" ]; then
    BIN=$LABBOOK_BIN_DIR
    say "labbook binaries from LABBOOK_BIN_DIR: $BIN"
  else
    say "building labbook (cargo build --bins --locked)"
    cargo build --bins --locked
    BIN="${CARGO_TARGET_DIR:-target}/debug"
  fi
  [ -x "$BIN/labbook" ] || die "no labbook binary in $BIN"
}

pipeline_psql() {
  PGOPTIONS='-c client_min_messages=warning' psql -X -q -v ON_ERROR_STOP=1 \
    "postgres://postgres@127.0.0.1:5432/postgres" -c "$1" >/dev/null
}

pipeline_setup() {
  say "services (scripts/services.sh), database $PIPELINE_DB, vhost $PIPELINE_VHOST"
  # The services outlive the check: they must not hold its lock (fd 6).
  scripts/services.sh >&2 6>&-
  # What an interrupted run may have left.
  rabbitmqctl -q delete_vhost "$PIPELINE_VHOST" >/dev/null 2>&1 || true
  pipeline_psql "DROP DATABASE IF EXISTS $PIPELINE_DB WITH (FORCE)"
  rabbitmqctl -q add_vhost "$PIPELINE_VHOST" >/dev/null
  rabbitmqctl -q set_permissions -p "$PIPELINE_VHOST" guest '.*' '.*' '.*' >/dev/null
  PIPELINE_READY=1

  export LABBOOK_SECRET_KEY
  LABBOOK_SECRET_KEY=$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
  export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$PIPELINE_VHOST"
  export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$PIPELINE_DB"
  export SMTP_URL="smtp://127.0.0.1:${MAILDEV_SMTP_PORT:-1025}"
  export MAIL_FROM="labbook@boot-check.labbook.test"
  export AWS_ENDPOINT_URL="http://127.0.0.1:${MOTO_PORT:-5000}" AWS_REGION=us-east-1
  export AWS_ACCESS_KEY_ID=boot-check AWS_SECRET_ACCESS_KEY=boot-check
  export LABBOOK_AMI_ID=ami-03cf127a
  export LABBOOK_METRICS_ADDR=off
  export LABBOOK_INSTALLATION=$PIPELINE_INSTALLATION
  export LABBOOK_USERS_PER_INSTANCE=2
  # JupyterHub mode's certificates come from the ACME server on the host (acme.sh), which the
  # baked stand-in reaches at this address; the plain image has no instance metadata and asks
  # for none.
  export LABBOOK_ACME_DIRECTORY=$ACME_DIRECTORY_URL
  # moto's consoles stay empty: the instance email follows running machines (as `auto` does
  # with AWS_ENDPOINT_URL); the boots below read the bootstrap's report instead.
  export LABBOOK_READINESS=running
  "$BIN/labbook" migrate >"$WORK/migrate.log" 2>&1 || die "labbook migrate failed: see $WORK/migrate.log"
  "$BIN/labbook" topology >"$WORK/topology.log" 2>&1 || die "labbook topology failed: see $WORK/topology.log"
}

pipeline_stop_workers() {
  [ -n "$PIPELINE_WORKERS" ] || return 0
  if kill -0 "$PIPELINE_WORKERS" 2>/dev/null; then
    kill -TERM "$PIPELINE_WORKERS"
    wait "$PIPELINE_WORKERS" || say "workers exited with $?"
  fi
  PIPELINE_WORKERS=""
}

pipeline_state() {
  "$BIN/labbook" status "$1" --json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["booking"]["state"])' 2>/dev/null ||
    echo "not stored yet"
}

pipeline_email_count() {
  curl -fsS "http://127.0.0.1:${MAILDEV_WEB_PORT:-1080}/email" 2>/dev/null | python3 -c '
import json, sys
want = "Booking ID: " + sys.argv[1]
print(sum(want in (m.get("text") or "") for m in json.load(sys.stdin)))' "$1" 2>/dev/null || echo 0
}

# pipeline_render MODE OUTDIR: a 3-user booking provisioned with LABBOOK_BOOTSTRAP=MODE;
# its instances' user-data and logins in OUTDIR/slot-N/ (see labdata.py).
pipeline_render() {
  local mode=$1 out=$2 id when state count i
  id="boot-check-$mode-$(date +%Y%m%d-%H%M%S)"
  when=$(date -u -d '+10 minutes' +%Y-%m-%dT%H:%M:%SZ)
  mkdir -p "$out"
  say "pipeline with LABBOOK_BOOTSTRAP=$mode: booking $id, 3 users, 2 per instance (log: $out/workers.log)"
  LABBOOK_BOOTSTRAP=$mode "$BIN/labbook" run all >"$out/workers.log" 2>&1 &
  PIPELINE_WORKERS=$!
  PIPELINE_BOOKINGS+=("$id")
  cat >"$out/booking.json" <<JSON
{"booking_id": "$id", "email": "trainer@boot-check.labbook.test", "booking_time": "$when",
 "number_of_users": 3, "duration_minutes": 60}
JSON
  "$BIN/labbook" publish "$out/booking.json" >/dev/null
  state="" count=0
  for i in $(seq 1 120); do
    state=$(pipeline_state "$id")
    count=$(pipeline_email_count "$id")
    if [ "$state" = provisioned ] && [ "$count" -ge 2 ]; then break; fi
    [ "$state" != failed ] || break
    if [ $((i % 10)) = 0 ]; then say "  ${i} s: booking $state, emails $count/2"; fi
    sleep 1
  done
  pipeline_stop_workers
  [ "$state" = provisioned ] && [ "$count" -ge 2 ] ||
    die "booking $id: state '$state', $count of 2 emails after 120 s (see $out/workers.log)"
  "$BIN/labbook" status "$id" --json >"$out/status.json"
  python3 "$HERE/labdata.py" fetch "$id" "$out/status.json" "$out" >&2 ||
    die "could not read booking $id's user-data and logins back from moto and maildev"
  while read -r i; do PIPELINE_INSTANCES+=("$i"); done < <(cat "$out"/slot-*/instance-id)
  [ -s "$out/slot-0/user-data" ] && [ -s "$out/slot-1/user-data" ] ||
    die "booking $id: expected 2 instances (slot 0 and 1), see $out/status.json"
}

# Removes what the check made in the shared services: its instances in moto, its security
# group, its emails, its database and vhost. Safe to call twice.
pipeline_cleanup() {
  local args=() i b
  pipeline_stop_workers
  if [ ${#PIPELINE_INSTANCES[@]} -gt 0 ] || [ ${#PIPELINE_BOOKINGS[@]} -gt 0 ]; then
    for i in "${PIPELINE_INSTANCES[@]}"; do args+=(--instance "$i"); done
    for b in "${PIPELINE_BOOKINGS[@]}"; do args+=(--booking "$b"); done
    python3 "$HERE/labdata.py" cleanup "${args[@]}" \
      --security-group "labbook-lab-$PIPELINE_INSTALLATION" ||
      say "warning: could not remove the check's instances or emails (see above)"
    PIPELINE_INSTANCES=() PIPELINE_BOOKINGS=()
  fi
  if [ -n "$PIPELINE_READY" ]; then
    rabbitmqctl -q delete_vhost "$PIPELINE_VHOST" >/dev/null 2>&1 || true
    pipeline_psql "DROP DATABASE IF EXISTS $PIPELINE_DB WITH (FORCE)" || true
    PIPELINE_READY=""
  fi
}
