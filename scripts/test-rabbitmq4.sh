#!/usr/bin/env bash
# Runs the tests that depend on the broker against RabbitMQ 4.x (Debian 13's rabbitmq-server,
# started beside the machine's 3.10 by scripts/rabbitmq4.sh): the consumer runtime, intake,
# dead letters and operations, the combined faults, and booking changes with their events. Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/rabbitmq4.sh start
export TEST_AMQP_BASE
TEST_AMQP_BASE=$(scripts/rabbitmq4.sh url)
export TEST_RABBITMQCTL="$PWD/scripts/rabbitmq4.sh ctl"
# RabbitMQ 4.x refuses messages over 16 MiB by default.
export TEST_HUGE_MESSAGE_MIB=15
echo "==> tests against RabbitMQ 4.x at $TEST_AMQP_BASE"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" -E 'test(/^(runtime|intake|operations|faults|shutdown|changes)::/)'
else
  for group in runtime intake operations faults shutdown changes; do
    cargo test --workspace --no-fail-fast --test api "$@" "$group::"
  done
fi
