#!/usr/bin/env bash
# The demo fails fast and says why: with the workers' metrics port held by another program,
# scripts/demo.sh must end within seconds, non-zero, naming the cause and the way out.
# Needs the services (scripts/services.sh) and the labbook binary (it builds it if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-target}/debug"
# Always through cargo: a target directory kept between runs may hold older binaries.
cargo build --bins --tests --locked --quiet

# Another program on a port: a listener that holds it for as long as the test runs.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -c 'import socket, sys, time; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); time.sleep(120)' "$port" &
holder=$!
trap 'kill "$holder" 2>/dev/null || true' EXIT
sleep 0.3

out=$(mktemp)
start=$SECONDS
code=0
LABBOOK_DEMO_BIN="$BIN" LABBOOK_DEMO_METRICS_PORT="$port" timeout 60 scripts/demo.sh >"$out" 2>&1 || code=$?
took=$((SECONDS - start))

fail() { echo "FAIL: $*"; sed -e 's/^/    /' "$out"; exit 1; }
[ "$code" -ne 0 ] || fail "the demo exited 0 with its workers unable to start"
[ "$code" -ne 124 ] || fail "the demo did not end within 60 s"
[ "$took" -le 20 ] || fail "the demo took ${took} s to notice its workers had died (at most 20)"
grep -q "demo FAILED: the workers exited" "$out" || fail "the demo did not say that its workers exited"
grep -q "cannot listen on 127.0.0.1:$port" "$out" || fail "the demo did not show the workers' own reason"
grep -q "hint: the metrics port is taken" "$out" || fail "the demo gave no hint"
! grep -q "not stored yet" "$out" || fail "the demo waited for the booking although its workers were dead"
echo "ok: the demo ended in ${took} s with exit code $code, naming the cause:"
grep -E "demo FAILED|cannot listen|hint:" "$out" | sed -e 's/^/    /'
