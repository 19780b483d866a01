#!/usr/bin/env python3
"""Checks that labbook's Grafana dashboard and alert rules name only series labbook exports.

    python3 deploy/monitoring/check_series.py               # against the series in src/
    python3 deploy/monitoring/check_series.py --metrics F   # against a scraped /metrics (F, or -)

Every `labbook_*` name in a dashboard query or a rule must be a series labbook's code exports
(found in `metrics::counter!/gauge!/histogram!` calls under src/; a histogram as its `_bucket`,
`_sum` and `_count`), or, with --metrics, a series the scraped worker really serves. Names the
provisioner's readiness loop adds in a change not merged yet are listed in PENDING and
accepted until they appear. Other series must be in EXTERNAL (Prometheus's own `up`,
RabbitMQ's plugin). Also checks that the plain rule file and the PrometheusRule hold the same
rules. Prints one line per finding; exits 1 if there is any.
"""
import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/monitoring/grafana/labbook-dashboard.json"
RULES = ROOT / "deploy/monitoring/labbook-alerts.yml"
PROMETHEUS_RULE = ROOT / "deploy/kubernetes/prometheusrule.yaml"

# Series of the provisioner's readiness loop (labbook_machines{state}, labbook_readiness_due,
# labbook_boot_seconds, labbook_machines_replaced_total): accepted by name until they exist.
PENDING = {
    "labbook_machines",
    "labbook_readiness_due",
    "labbook_boot_seconds_bucket",
    "labbook_boot_seconds_sum",
    "labbook_boot_seconds_count",
    "labbook_machines_replaced_total",
}
# Exported by the scheduler's timer once per tick (src/store/heartbeat.rs), so a worker that
# is not a scheduler, or a scheduler before its first tick, does not serve them.
TIMER = {
    "labbook_scheduler_last_tick_timestamp_seconds",
    "labbook_bookings",
    "labbook_bookings_late",
}
EXTERNAL = {"up", "rabbitmq_detailed_queue_consumers"}
PROMQL_WORDS = {
    "sum", "by", "without", "max", "min", "avg", "count", "rate", "increase", "irate",
    "histogram_quantile", "time", "absent", "or", "and", "unless", "on", "ignoring", "le",
    "humanize", "offset", "bool", "group_left", "group_right", "topk", "bottomk",
}


def expressions():
    """(where, expr) of every dashboard query and every rule."""
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield f"dashboard panel {panel['title']!r}", target["expr"]
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule['alert']}", rule["expr"]


def names(expr):
    """Metric names in a PromQL expression: identifiers outside {…}, […] and strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        after = text[m.end():].lstrip()
        if word in PROMQL_WORDS or after.startswith("("):
            continue
        if word.startswith("$") or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        found.add(word)
    return found


def exported_in_source():
    series = set()
    pattern = re.compile(r'metrics::(counter|gauge|histogram)!\(\s*"(labbook_[a-z0-9_]+)"')
    for path in (ROOT / "src").rglob("*.rs"):
        for kind, name in pattern.findall(path.read_text()):
            if kind == "histogram":
                series |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                series.add(name)
    return series


def exported_in_scrape(text):
    series = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return series


def main(argv):
    scraped = None
    if len(argv) == 2 and argv[0] == "--metrics":
        scraped = sys.stdin.read() if argv[1] == "-" else pathlib.Path(argv[1]).read_text()
    exported = exported_in_scrape(scraped) if scraped is not None else exported_in_source()
    accepted = exported | PENDING | EXTERNAL | (TIMER if scraped is not None else set())
    problems = []
    used = set()
    for where, expr in expressions():
        for name in sorted(names(expr)):
            used.add(name)
            if name not in accepted:
                problems.append(f"{where}: {name} is not a series labbook exports")
    plain = yaml.safe_load(RULES.read_text())["groups"]
    operator = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"]
    if plain != operator:
        problems.append(f"{RULES.name} and {PROMETHEUS_RULE.name} hold different rules")
    for p in problems:
        print(p)
    if problems:
        return 1
    waiting = sorted(used & PENDING - exported)
    source = "the scraped /metrics" if scraped is not None else "src/"
    print(
        f"{len(used)} series named by the dashboard and rules, all in {source}"
        + (f" (waiting for the provisioner's: {', '.join(waiting)})" if waiting else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
