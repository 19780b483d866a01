#!/usr/bin/env bash
# labbook's demo: installs and starts what is missing (PostgreSQL, RabbitMQ, the moto EC2
# emulator, the maildev SMTP sink), builds labbook, runs every stage, publishes a demo booking,
# shows its progress, and ends with a summary: the booking, its instances, its emails, and the
# web inbox where a person can read them.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

scripts/services.sh

say "building labbook"
# The binaries and the test targets in one build: building the tests turns on the features the
# dev-dependencies ask of shared crates, so scripts/test.sh afterwards reuses these artifacts
# instead of compiling most dependencies a second time with other features.
cargo build --bins --tests --locked
BIN="${CARGO_TARGET_DIR:-target}/debug"

DEMO_DIR=.demo
mkdir -p "$DEMO_DIR"
if [ ! -s "$DEMO_DIR/secret-key" ]; then
  python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())' >"$DEMO_DIR/secret-key"
fi
export LABBOOK_SECRET_KEY
LABBOOK_SECRET_KEY=$(cat "$DEMO_DIR/secret-key")
export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/labbook_demo"
export SMTP_URL="smtp://127.0.0.1:1025"
export MAIL_FROM="labbook@demo.labbook.test"
export AWS_ENDPOINT_URL="http://127.0.0.1:${MOTO_PORT:-5000}" AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo
export LABBOOK_AMI_ID=ami-03cf127a
export LABBOOK_METRICS_ADDR="127.0.0.1:${LABBOOK_DEMO_METRICS_PORT:-9464}"
INBOX="http://127.0.0.1:${MAILDEV_WEB_PORT:-1080}"

say "database and broker topology"
$BIN/labbook migrate
$BIN/labbook topology >/dev/null && echo "broker topology declared"

say "starting every stage in one process (labbook run all; log: $DEMO_DIR/workers.log)"
$BIN/labbook run all >"$DEMO_DIR/workers.log" 2>&1 &
WORKERS=$!
stop_workers() {
  if kill -0 "$WORKERS" 2>/dev/null; then
    kill -TERM "$WORKERS"
    wait "$WORKERS" && echo "workers stopped cleanly (exit 0)" || echo "workers exited with $?"
  fi
}
trap stop_workers EXIT

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

say "waiting for the pipeline (intake, schedule, EC2 instances, emails)"
state=""
for i in $(seq 1 180); do
  if status=$($BIN/labbook status "$ID" --json 2>/dev/null); then
    state=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["booking"]["state"])' "$status")
  else
    state="not stored yet"
  fi
  count=$(emails_for_booking "$ID" | sed -n 1p)
  printf '\r  %3ss  booking: %-14s emails received: %s/2 ' "$i" "$state" "$count"
  if [ "$count" -ge 2 ] || [ "$state" = failed ]; then break; fi
  sleep 1
done
echo

say "summary"
$BIN/labbook status "$ID"
echo
echo "emails:"
emails_for_booking "$ID" | tail -n +2
echo
echo "read them in the web inbox: $INBOX"
echo "metrics of this run: http://127.0.0.1:${LABBOOK_DEMO_METRICS_PORT:-9464}/metrics"
# The demo succeeds when the booking is provisioned and both emails arrived (the state read in
# the loop may predate the last email).
state=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["booking"]["state"])' \
  "$($BIN/labbook status "$ID" --json)")
[ "$state" = provisioned ] && [ "$(emails_for_booking "$ID" | sed -n 1p)" -ge 2 ]
