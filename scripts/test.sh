#!/usr/bin/env bash
# Runs labbook's whole test suite: starts what the tests talk to, then unit and integration
# tests (cargo-nextest if present, else cargo test).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
