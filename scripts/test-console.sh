#!/usr/bin/env bash
# The console's end-to-end checks, in a real browser and against its own OpenAPI document:
# - installs what is missing: Debian's chromium, the Playwright driver (tests/browser, npm ci),
#   schemathesis (PyPI, in a venv under $LABBOOK_CACHE_DIR, default /var/cache/labbook);
# - runs the real pipeline (`labbook run all`) in its own vhost and database with a subnet that
#   does not exist, so a booking fails and its provision-due is dead-lettered; then runs the
#   workers again with the cause fixed, and `labbook console` beside them;
# - drives the pages with Playwright (tests/browser/console.mjs): log in, find the failed
#   booking, its timeline, a dry run then the replay, the booking provisioned; screenshots to
#   docs/screenshots/ and target/ci-artifacts/;
# - runs schemathesis against /api/openapi.json with the token.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
CACHE=${LABBOOK_CACHE_DIR:-/var/cache/labbook}
TARGET=${CARGO_TARGET_DIR:-$root/target}
say() { printf '==> %s\n' "$*"; }

scripts/services.sh
if [ ! -x /usr/bin/chromium ]; then
  say "installing chromium (Debian)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
say "Playwright driver (npm ci)"
(cd tests/browser && npm ci --no-audit --no-fund --silent)
if [ ! -x "$CACHE/venv/bin/schemathesis" ]; then
  say "installing schemathesis into $CACHE/venv (PyPI)"
  mkdir -p "$CACHE"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install --quiet 'schemathesis>=4,<5'
fi
say "building labbook"
# The test build (as scripts/test.sh makes it), so nothing is built twice with other features.
cargo test --workspace --no-run --quiet
bin="$TARGET/debug/labbook"

run=$(date +%s)-$$
vhost="labbook-console-$run"
db="labbook_console_${run//-/_}"
state=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # The logs of the processes this run started, for a CI run that failed.
  mkdir -p target/ci-artifacts && cp "$state"/*.log target/ci-artifacts/ 2>/dev/null || true
  rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true
  psql postgres://postgres@127.0.0.1:5432/postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$state"
}
trap cleanup EXIT
rabbitmqctl -q add_vhost "$vhost" >/dev/null
rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null

random() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$vhost"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
export LABBOOK_SECRET_KEY=$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
export LABBOOK_CONSOLE_TOKEN=$(random)
export AWS_ENDPOINT_URL=http://127.0.0.1:5000 AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing LABBOOK_AMI_ID=ami-03cf127a
export LABBOOK_PROVISION_LEAD_SECONDS=0 LABBOOK_METRICS_ADDR=off LABBOOK_INSTALLATION=console-ci
export LABBOOK_RETRY_DELAYS_MS=200,400 LABBOOK_MAX_ATTEMPTS=3 LABBOOK_SCHEDULER_TICK_MS=200
export SMTP_URL=smtp://127.0.0.1:1025 MAIL_FROM=labbook@labbook.test
"$bin" migrate >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"

"$bin" console --listen "127.0.0.1:$port" >"$state/console.log" 2>&1 &
pids+=($!)
LABBOOK_SUBNET_ID=subnet-doesnotexist LABBOOK_SECURITY_GROUP_IDS= \
  "$bin" run all >"$state/workers-failing.log" 2>&1 &
failing=$!
pids+=($failing)
for _ in $(seq 1 100); do curl -sf "$url/healthz" >/dev/null && break; sleep 0.1; done

api() { curl -sS -H "Authorization: Bearer $LABBOOK_CONSOLE_TOKEN" "$@"; }
book() { # id trainer hours_ahead users
  local at
  at=$(python3 -c "import datetime as d; print((d.datetime.now(d.timezone.utc)+d.timedelta(hours=$3)).strftime('%Y-%m-%dT%H:%M:%SZ'))")
  api -o /dev/null -w '%{http_code}' -H 'content-type: application/json' "$url/api/bookings" \
    -d "{\"booking_id\":\"$1\",\"email\":\"$2\",\"booking_time\":\"$at\",\"number_of_users\":$4,\"duration_minutes\":180}" \
    | grep -qx 202
}
state_of() { api "$url/api/bookings/$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["booking"]["state"])' 2>/dev/null || true; }
wait_state() {
  for _ in $(seq 1 150); do [ "$(state_of "$1")" = "$2" ] && return 0; sleep 0.2; done
  echo "error: booking $1 did not become $2" >&2; exit 1
}

say "seeding bookings through the console API and the real pipeline"
failed="course-42-session-$run"
trainer="trainer-$run@example.org"
book "$failed" "$trainer" 0 3
book "python-intro-$run" "ana@example.org" 72 12
book "data-bootcamp-$run" "li@example.org" 240 24
wait_state "$failed" failed
wait_state "python-intro-$run" scheduled
kill "$failing"; wait "$failing" 2>/dev/null || true
"$bin" run all >"$state/workers.log" 2>&1 &
workers=$!
pids+=($workers)
book "git-workshop-$run" "sam@example.org" 0 4
book "python-intro-$run" "ana@example.org" 72 14 # same id, other content: a conflict, dead-lettered
wait_state "git-workshop-$run" provisioned

say "pages in Chromium (Playwright)"
mkdir -p docs/screenshots target/ci-artifacts
start=$(date +%s)
CONSOLE_URL=$url CONSOLE_TOKEN=$LABBOOK_CONSOLE_TOKEN BOOKING_ID=$failed TRAINER=$trainer \
  MAILDEV_API=${TEST_MAILDEV_API:-http://127.0.0.1:1080/email} SCREENSHOTS="$root/docs/screenshots" \
  node tests/browser/console.mjs
cp docs/screenshots/*.png target/ci-artifacts/
say "browser checks took $(( $(date +%s) - start )) s"

# The fuzzer publishes bookings: with no worker running, none of them launches a machine.
# Two checks do not apply: a schema-valid booking may lie in the past and be refused (422), so
# not every valid input is accepted (positive_data_acceptance); and POST /api/bookings answers
# 202 Accepted, the booking being stored later by the credentials stage, so it is not
# readable at once (ensure_resource_availability).
kill "$workers"; wait "$workers" 2>/dev/null || true
say "the API against its OpenAPI document (schemathesis)"
start=$(date +%s)
# From the scratch directory: schemathesis keeps a cache in its working directory.
(cd "$state" && "$CACHE/venv/bin/schemathesis" --no-color run "$url/api/openapi.json" \
  --url "$url/api" \
  --header "Authorization: Bearer $LABBOOK_CONSOLE_TOKEN" \
  --checks all --exclude-checks positive_data_acceptance,ensure_resource_availability \
  --max-examples "${SCHEMATHESIS_EXAMPLES:-25}" --workers 1 --generation-database none)
say "schemathesis took $(( $(date +%s) - start )) s"
say "console checks passed; screenshots in docs/screenshots/ and target/ci-artifacts/"
