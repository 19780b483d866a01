#!/usr/bin/env bash
# labbook's demo: installs and starts what is missing (PostgreSQL, RabbitMQ, the moto EC2
# emulator, the maildev SMTP sink), builds labbook, runs every stage, publishes a demo booking,
# shows its progress, and ends with a summary: the booking, its instances, its emails, the web
# inbox where a person can read them, and the command that opens the console on this data.
# Then it cancels the booking, so its (emulated) machines are terminated before it stops.
#
# It fails fast: the workers are watched while it waits, and a worker that exits ends the demo
# at once, non-zero, with its last log lines and a hint.
#
# Settings (all optional):
#   LABBOOK_DEMO_METRICS_PORT  serve the workers' /metrics on this port (default: a free port
#                              the workers pick, shown at the end)
#   LABBOOK_DEMO_KEEP=1        leave the demo booking's machines running (no cancellation)
#   LABBOOK_DEMO_WAIT_SECONDS  how long to wait for the pipeline (default 180)
#   LABBOOK_DEMO_BIN           a directory with labbook already built (skips the build)
#   MOTO_PORT, MAILDEV_SMTP_PORT, MAILDEV_WEB_PORT  as for scripts/services.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }
fail() {
  printf '\ndemo FAILED: %s\n' "$1" >&2
  shift
  for line in "$@"; do printf '  %s\n' "$line" >&2; done
  exit 1
}

if [ -z "${LABBOOK_DEMO_BIN:-}" ]; then
  scripts/services.sh
  BIN="${CARGO_TARGET_DIR:-target}/debug"
  if [ ! -x "$BIN/labbook" ]; then
    say "building labbook: the first build compiles every dependency and takes several minutes (later ones take seconds)"
  else
    say "building labbook (up to date in seconds unless the sources changed)"
  fi
  # The binaries and the test targets in one build: building the tests turns on the features
  # the dev-dependencies ask of shared crates, so scripts/test.sh afterwards reuses these
  # artifacts instead of compiling most dependencies a second time with other features.
  # Cargo shows its progress bar on a terminal and one line per crate otherwise.
  cargo build --bins --tests --locked
else
  BIN=$LABBOOK_DEMO_BIN
  [ -x "$BIN/labbook" ] || fail "LABBOOK_DEMO_BIN=$BIN holds no labbook binary" \
    "unset it to build labbook, or run: cargo build --bins --locked"
fi

DEMO_DIR=.demo
mkdir -p "$DEMO_DIR"
random_secret() { python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'; }
[ -s "$DEMO_DIR/secret-key" ] || random_secret >"$DEMO_DIR/secret-key"
[ -s "$DEMO_DIR/console-token" ] || random_secret >"$DEMO_DIR/console-token"
export LABBOOK_SECRET_KEY
LABBOOK_SECRET_KEY=$(cat "$DEMO_DIR/secret-key")
export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/labbook_demo"
export SMTP_URL="smtp://127.0.0.1:${MAILDEV_SMTP_PORT:-1025}"
export MAIL_FROM="labbook@demo.labbook.test"
export AWS_ENDPOINT_URL="http://127.0.0.1:${MOTO_PORT:-5000}" AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo
export LABBOOK_AMI_ID=ami-03cf127a
# Port 0: the workers take a free port (no fixed port that another program can hold); the log
# says which. A port given explicitly must be free, or the workers stop at once and say so.
export LABBOOK_METRICS_ADDR="127.0.0.1:${LABBOOK_DEMO_METRICS_PORT:-0}"
INBOX="http://127.0.0.1:${MAILDEV_WEB_PORT:-1080}"
WAIT_SECONDS=${LABBOOK_DEMO_WAIT_SECONDS:-180}
LOG="$DEMO_DIR/workers.log"

say "database and broker topology"
# The demo starts from an empty database of its own: a booking or a migration left by an earlier
# run (of an older labbook) never decides what this run shows.
psql -q -h 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE IF EXISTS labbook_demo WITH (FORCE)' \
  || fail "cannot reset the demo database labbook_demo" "is PostgreSQL running on 127.0.0.1:5432? scripts/services.sh starts it"
$BIN/labbook migrate
$BIN/labbook topology >/dev/null && echo "broker topology declared"

say "starting every stage in one process (labbook run all; log: $LOG)"
LABBOOK_LOG_FORMAT=text $BIN/labbook run all >"$LOG" 2>&1 &
WORKERS=$!
stop_workers() {
  if kill -0 "$WORKERS" 2>/dev/null; then
    kill -TERM "$WORKERS"
    wait "$WORKERS" && echo "workers stopped cleanly (exit 0)" || echo "workers exited with $?"
  fi
}
trap stop_workers EXIT

# The workers died: their last lines and what to do, then exit non-zero.
workers_died() {
  local code=0
  wait "$WORKERS" || code=$?
  local hint="see $LOG"
  if grep -q 'LABBOOK_METRICS_ADDR' "$LOG"; then
    hint="the metrics port is taken: unset LABBOOK_DEMO_METRICS_PORT (the workers then pick a free port) or choose another"
  elif grep -qiE 'broker|AMQP_URL|5672' "$LOG"; then
    hint="RabbitMQ is not reachable at $AMQP_URL: run scripts/services.sh"
  elif grep -qiE 'database|DATABASE_URL|5432' "$LOG"; then
    hint="PostgreSQL is not reachable at 127.0.0.1:5432: run scripts/services.sh"
  fi
  local lines=()
  mapfile -t lines < <(tail -n 15 "$LOG" | cut -c 1-300)
  fail "the workers exited (code $code) $1; their last log lines ($LOG):" "${lines[@]}" "" "hint: $hint"
}

# On a terminal the progress line is rewritten in place; in a log, a line is written only when
# something changed (or every 30 s), so the log stays readable.
if [ -t 1 ]; then TTY=1; else TTY=""; fi
progress() {
  local line=$1 key=$2
  if [ -n "$TTY" ]; then
    printf '\r  %s ' "$line"
  elif [ "$key" != "${last_key:-}" ] || [ $((SECONDS - ${last_print:-0})) -ge 30 ]; then
    printf '  %s\n' "$line"
    last_key=$key
    last_print=$SECONDS
  fi
}

say "waiting for the workers to be ready"
metrics=""
for _ in $(seq 1 120); do
  kill -0 "$WORKERS" 2>/dev/null || workers_died "while starting"
  if [ -z "$metrics" ]; then
    metrics=$(sed -n 's/.*serving \/metrics.*addr=\([0-9.:]*\).*/\1/p; s/.*addr=\([0-9.:]*\).*serving \/metrics.*/\1/p' "$LOG" | head -n 1)
  fi
  if [ -n "$metrics" ] && curl -fsS "http://$metrics/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.5
done
[ -n "$metrics" ] || fail "the workers did not say where they serve /metrics" "see $LOG"
curl -fsS "http://$metrics/readyz" >/dev/null 2>&1 \
  || fail "the workers are not ready after 60 s: $(curl -sS "http://$metrics/readyz" 2>&1 | head -n 1)" "see $LOG"
echo "ready (http://$metrics/readyz)"

ID="demo-$(date +%Y%m%d-%H%M%S)"
TO="trainer@example.org"
WHEN=$(date -u -d '+10 minutes' +%Y-%m-%dT%H:%M:%SZ)
cat >"$DEMO_DIR/booking.json" <<JSON
{
  "booking_id": "$ID",
  "email": "$TO",
  "booking_time": "$WHEN",
  "number_of_users": 5,
  "duration_minutes": 60
}
JSON
say "publishing a demo booking: 5 users at $WHEN ($DEMO_DIR/booking.json)"
$BIN/labbook publish "$DEMO_DIR/booking.json"

emails_for_booking() {
  # maildev 2.2 lists emails at /email (some other 2.x releases at /api/email).
  { curl -fsS "$INBOX/email" 2>/dev/null || curl -fsS "$INBOX/api/email"; } | python3 -c '
import json, sys
want = "Booking ID: " + sys.argv[1]
mails = [m for m in json.load(sys.stdin) if want in (m.get("text") or "")]
print(len(mails))
for m in mails:
    print("  %-32s to %s  (%s)" % (m["subject"], m["to"][0]["address"], m["headers"].get("message-id", "")))
' "$1"
}

booking_state() {
  local status
  if status=$($BIN/labbook status "$1" --json 2>/dev/null); then
    python3 -c 'import json,sys; print(json.loads(sys.argv[1])["booking"]["state"])' "$status"
  else
    echo "not stored yet"
  fi
}

say "waiting for the pipeline (intake, schedule, EC2 instances, emails; at most ${WAIT_SECONDS} s)"
state=""
count=0
for i in $(seq 1 "$WAIT_SECONDS"); do
  kill -0 "$WORKERS" 2>/dev/null || workers_died "while the booking was in the pipeline"
  state=$(booking_state "$ID")
  count=$(emails_for_booking "$ID" | sed -n 1p)
  progress "$(printf '%3ss  booking: %-14s emails received: %s/2' "$i" "$state" "$count")" "$state $count"
  if [ "$count" -ge 2 ] || [ "$state" = failed ]; then break; fi
  sleep 1
done
[ -n "$TTY" ] && echo

say "summary"
$BIN/labbook status "$ID"
echo
echo "emails:"
emails_for_booking "$ID" | tail -n +2
echo
echo "read them in the web inbox: $INBOX"
echo "metrics of this run: http://$metrics/metrics"
# The demo succeeds when the booking is provisioned and both emails arrived (the state read in
# the loop may predate the last email).
state=$(booking_state "$ID")
count=$(emails_for_booking "$ID" | sed -n 1p)
ok=""
[ "$state" = provisioned ] && [ "$count" -ge 2 ] && ok=1

if [ -z "${LABBOOK_DEMO_KEEP:-}" ] && [ "$state" != "not stored yet" ]; then
  say "tearing the demo's machines down (labbook cancel $ID; LABBOOK_DEMO_KEEP=1 keeps them)"
  $BIN/labbook cancel "$ID" | head -n 2
  for _ in $(seq 1 60); do
    kill -0 "$WORKERS" 2>/dev/null || workers_died "while tearing the machines down"
    running=$($BIN/labbook status "$ID" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(sum(1 for i in s["instances"] if i["instance_id"] and i["state"] not in ("terminated", "shutting-down")))')
    [ "$running" = 0 ] && [ "$(booking_state "$ID")" = cancelled ] && break
    sleep 1
  done
  echo "booking $(booking_state "$ID"); machines still running: $running"
fi

say "the console on this demo's data"
echo "  DATABASE_URL=$DATABASE_URL AMQP_URL='$AMQP_URL' LABBOOK_CONSOLE_TOKEN=\$(cat $DEMO_DIR/console-token) $BIN/labbook console"
echo "  then open http://127.0.0.1:8080/bookings/$ID and log in with the token in $DEMO_DIR/console-token"
[ -n "$ok" ] || fail "booking $ID ended the wait as '$state' with $count of 2 emails" "see $LOG and: $BIN/labbook status $ID"
