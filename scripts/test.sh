#!/usr/bin/env bash
# Runs labbook's whole test suite: starts what the tests talk to, then unit and integration
# tests (cargo-nextest if present, else cargo test).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# The EC2 emulator starts empty: it slows down with every instance it holds (its tag searches
# scan them all), and the tests find their machines by their own tags, never by count.
curl -fsS -X POST -o /dev/null "${TEST_MOTO_URL:-http://127.0.0.1:5000}/moto-api/reset"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
