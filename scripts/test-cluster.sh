#!/usr/bin/env bash
# Runs the broker-cluster tests (tests/api/cluster.rs) on a three-node RabbitMQ cluster that
# scripts/rabbitmq-cluster.sh starts on this machine: the workers are given the three nodes in
# AMQP_URL, and the tests kill and restart nodes under them. Extra arguments go to the runner.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/rabbitmq-cluster.sh start
export TEST_AMQP_BASE TEST_CLUSTER="$PWD/scripts/rabbitmq-cluster.sh"
TEST_AMQP_BASE=$(scripts/rabbitmq-cluster.sh urls | sed 's#/%2f##g')
export TEST_RABBITMQCTL="$PWD/scripts/rabbitmq-cluster.sh ctl 3"
echo "==> cluster tests against $TEST_AMQP_BASE"
status=0
# One at a time: each test kills or restarts the nodes the other would use.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --run-ignored only --test-threads 1 "$@" \
    -E 'test(/^cluster::/)' || status=$?
else
  cargo test --workspace --no-fail-fast --test api "$@" cluster:: -- --ignored --test-threads 1 ||
    status=$?
fi
scripts/rabbitmq-cluster.sh stop
exit "$status"
