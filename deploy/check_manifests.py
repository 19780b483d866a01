#!/usr/bin/env python3
"""Offline checks of labbook's deployment files that no off-the-shelf validator covers:
the KEDA objects (their CRDs are not in kubernetes-validate's schemas), the consistency of the
Kubernetes manifests with each other and with the contract, the compose file, the RabbitMQ
definitions and the IAM policy.

    deploy/check_manifests.py CHECK     # CHECK: one of CHECKS below; exit 1 on failure

Run by deploy/check.sh, which prints one line per check. Needs PyYAML and jsonschema (both come
with kubernetes-validate) and, for `iam-lint`, parliament.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
ROOT = DEPLOY.parent
K8S = DEPLOY / "kubernetes"

EXCHANGE = "labbook"
STAGE_QUEUES = ["booking-created", "credentials-ready", "provision-due", "notify", "teardown-due"]
RETRY_TIERS = {"1s": 1_000, "10s": 10_000, "60s": 60_000, "600s": 600_000}
# worker -> the queues it consumes (docs/contract.md §4)
WORKERS = {
    "credentials": ["booking-created"],
    "scheduler": ["credentials-ready"],
    "provisioner": ["provision-due", "teardown-due"],
    "notifier": ["notify"],
}
BINARIES = ["labbook"] + [f"labbook-{w}" for w in WORKERS]
SECRET = "labbook-secrets"
CONFIGMAP = "labbook-config"
METRICS_PORT = 9464
SHUTDOWN_TIMEOUT = 30
# Not applied by kustomize on purpose (placeholders must never overwrite the real Secret).
# prometheusrule.yaml needs the Prometheus Operator's CRD; it is applied on its own.
NOT_IN_KUSTOMIZATION = {"secret.example.yaml", "kustomization.yaml", "prometheusrule.yaml"}
KEDA_FILES = {"keda-scaledobjects.yaml", "keda-triggerauthentication.yaml"}


class CheckError(Exception):
    pass


def require(cond, msg):
    if not cond:
        raise CheckError(msg)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def all_k8s_docs():
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for d in load_docs(path):
            docs.append((path.name, d))
    return docs


def by_kind(docs, kind):
    return {d["metadata"]["name"]: (f, d) for f, d in docs if d.get("kind") == kind}


# --------------------------------------------------------------------------------------------
# kustomization.yaml and the core manifests' consistency


def check_kustomization():
    k = load_docs(K8S / "kustomization.yaml")
    require(len(k) == 1, "kustomization.yaml: one document expected")
    k = k[0]
    require(k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1", "kustomization: apiVersion")
    require(k.get("kind") == "Kustomization", "kustomization: kind")
    resources = k.get("resources") or []
    require(len(resources) == len(set(resources)), "kustomization: duplicate resources")
    present = {p.name for p in K8S.glob("*.yaml")}
    for r in resources:
        require(r in present, f"kustomization lists {r}, which does not exist")
    expected = present - NOT_IN_KUSTOMIZATION
    missing = expected - set(resources)
    require(not missing, f"kustomization does not list {sorted(missing)}")
    require("secret.example.yaml" not in resources, "secret.example.yaml must not be applied")
    images = {i["name"] for i in k.get("images") or []}
    require("labbook" in images, "kustomization: images entry for `labbook` missing")
    return f"{len(resources)} resources listed, secret.example.yaml excluded"


def containers_of(pod_spec):
    return (pod_spec.get("initContainers") or []) + pod_spec["containers"]


def check_env_refs(where, container, configmaps):
    secret_keys = set()
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            name = src["configMapRef"]["name"]
            require(name in configmaps, f"{where}: envFrom unknown ConfigMap {name}")
        if "secretRef" in src:
            require(src["secretRef"]["name"] == SECRET, f"{where}: envFrom secret {SECRET}")
    for e in container.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            require(ref["name"] == SECRET, f"{where}: env {e['name']} refers to {ref['name']}")
            require(ref["key"] == e["name"], f"{where}: env {e['name']} from key {ref['key']}")
            secret_keys.add(ref["key"])
    return secret_keys


def check_security(where, pod_spec):
    psc = pod_spec.get("securityContext") or {}
    require(psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot")
    require(psc.get("runAsUser") == 10001, f"{where}: pod runAsUser 10001 (the image's user)")
    require(pod_spec.get("automountServiceAccountToken") is False, f"{where}: no SA token")
    for c in containers_of(pod_spec):
        sc = c.get("securityContext") or {}
        require(sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}: read-only root")
        require(sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: no escalation")
        require("ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
                f"{where}/{c['name']}: drop ALL capabilities")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                require(r in (res.get(part) or {}), f"{where}/{c['name']}: resources.{part}.{r}")
        require(c.get("image", "").split(":")[0] == "labbook",
                f"{where}/{c['name']}: image `labbook` (kustomize rewrites it)")
        mounts = {m["mountPath"] for m in c.get("volumeMounts") or []}
        require("/tmp" in mounts, f"{where}/{c['name']}: writable /tmp (emptyDir)")


def check_workloads():
    docs = all_k8s_docs()
    configmaps = by_kind(docs, "ConfigMap")
    require(set(configmaps) == {CONFIGMAP}, f"one ConfigMap {CONFIGMAP} expected")
    cm_data = configmaps[CONFIGMAP][1]["data"]
    for key in ("AMQP_URL", "DATABASE_URL", "SMTP_URL", "LABBOOK_SECRET_KEY",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        require(key not in cm_data, f"ConfigMap holds the secret {key}")
    require(cm_data.get("LABBOOK_LOG_FORMAT") == "json", "ConfigMap: LABBOOK_LOG_FORMAT json")
    require(int(cm_data.get("LABBOOK_SHUTDOWN_TIMEOUT_SECONDS", SHUTDOWN_TIMEOUT))
            == SHUTDOWN_TIMEOUT, "ConfigMap: shutdown timeout")

    secrets = by_kind(docs, "Secret")
    require(set(secrets) == {SECRET}, "secret.example.yaml: one Secret labbook-secrets")
    example_keys = set((secrets[SECRET][1].get("stringData") or {}).keys())

    sas = by_kind(docs, "ServiceAccount")
    deployments = by_kind(docs, "Deployment")
    require(set(deployments) == {f"labbook-{w}" for w in WORKERS} | {"labbook-console"},
            f"Deployments: {sorted(deployments)}")
    pdbs = by_kind(docs, "PodDisruptionBudget")

    for w in WORKERS:
        name = f"labbook-{w}"
        f, d = deployments[name]
        where = f"{f}:{name}"
        require("replicas" not in d["spec"], f"{where}: replicas is KEDA's (leave it out)")
        sel = d["spec"]["selector"]["matchLabels"]
        tmpl = d["spec"]["template"]
        labels = tmpl["metadata"]["labels"]
        require(all(labels.get(k) == v for k, v in sel.items()), f"{where}: selector vs labels")
        ann = tmpl["metadata"].get("annotations") or {}
        require(ann.get("prometheus.io/scrape") == "true", f"{where}: prometheus.io/scrape")
        require(ann.get("prometheus.io/port") == str(METRICS_PORT), f"{where}: prometheus port")
        spec = tmpl["spec"]
        require(spec.get("serviceAccountName") in sas, f"{where}: serviceAccountName")
        grace = spec.get("terminationGracePeriodSeconds")
        require(grace == 45 and grace > SHUTDOWN_TIMEOUT, f"{where}: terminationGracePeriod 45")
        check_security(where, spec)
        require(len(spec["containers"]) == 1, f"{where}: one container")
        c = spec["containers"][0]
        require(c.get("command") == [name], f"{where}: command [{name}]")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
        require(ports.get("metrics") == METRICS_PORT, f"{where}: port metrics {METRICS_PORT}")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            p = (c.get(probe) or {}).get("httpGet") or {}
            require(p.get("path") == path and p.get("port") in ("metrics", METRICS_PORT),
                    f"{where}: {probe} GET {path} on {METRICS_PORT}")
        keys = check_env_refs(where, c, configmaps)
        require({"AMQP_URL", "DATABASE_URL"} <= keys,
                f"{where}: AMQP_URL and DATABASE_URL from {SECRET}")
        # The scheduler never handles a password; every other worker encrypts or decrypts.
        require(("LABBOOK_SECRET_KEY" in keys) == (w != "scheduler"),
                f"{where}: LABBOOK_SECRET_KEY for every worker but the scheduler")
        require(("SMTP_URL" in keys) == (w == "notifier"), f"{where}: SMTP_URL only notifier")
        aws = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        require((aws <= keys) == (w == "provisioner") and (not keys & aws or aws <= keys),
                f"{where}: AWS keys only for the provisioner")
        require(keys <= example_keys, f"{where}: keys {sorted(keys - example_keys)} missing "
                "from secret.example.yaml")

        pdb = pdbs.get(name)
        require(pdb is not None, f"{where}: no PodDisruptionBudget {name}")
        pspec = pdb[1]["spec"]
        require(pspec.get("maxUnavailable") == 1 or pspec.get("minAvailable") == 1,
                f"{name}: PDB maxUnavailable 1 or minAvailable 1")
        require(pspec["selector"]["matchLabels"] == sel, f"{name}: PDB selector = Deployment's")

    jobs = by_kind(docs, "Job")
    require(set(jobs) == {"labbook-migrate"}, "one Job labbook-migrate")
    f, job = jobs["labbook-migrate"]
    spec = job["spec"]["template"]["spec"]
    check_security(f"{f}:labbook-migrate", spec)
    commands = [c["command"] for c in containers_of(spec)]
    require(commands == [["labbook", "migrate"], ["labbook", "topology"]],
            f"migrate job runs `labbook migrate` then `labbook topology` (got {commands})")
    for c in containers_of(spec):
        check_env_refs(f"{f}:labbook-migrate/{c['name']}", c, configmaps)
    return (f"{len(deployments)} Deployments, {len(pdbs)} PDBs, 1 Job, ConfigMap and Secret "
            "refs consistent")


def check_console():
    """The console: `labbook console` on a port a ClusterIP Service targets, its token from the
    Secret, no key that decrypts passwords, no mail or AWS credentials."""
    docs = all_k8s_docs()
    configmaps = by_kind(docs, "ConfigMap")
    secrets = by_kind(docs, "Secret")
    example_keys = set((secrets[SECRET][1].get("stringData") or {}).keys())
    f, d = by_kind(docs, "Deployment")["labbook-console"]
    where = f"{f}:labbook-console"
    spec = d["spec"]["template"]["spec"]
    labels = d["spec"]["template"]["metadata"]["labels"]
    check_security(where, spec)
    require(len(spec["containers"]) == 1, f"{where}: one container")
    c = spec["containers"][0]
    cmd = c.get("command") or []
    require(cmd[:2] == ["labbook", "console"], f"{where}: command labbook console")
    require("--listen" in cmd, f"{where}: --listen (the default is loopback only)")
    port = int(cmd[cmd.index("--listen") + 1].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
    require(ports.get("http") == port, f"{where}: container port http = the --listen port")
    for probe in ("readinessProbe", "livenessProbe"):
        p = (c.get(probe) or {}).get("httpGet") or {}
        require(p.get("path") == "/healthz" and p.get("port") in ("http", port),
                f"{where}: {probe} GET /healthz (the one path without the token)")
    keys = check_env_refs(where, c, configmaps)
    require({"AMQP_URL", "DATABASE_URL", "LABBOOK_CONSOLE_TOKEN"} <= keys,
            f"{where}: AMQP_URL, DATABASE_URL, LABBOOK_CONSOLE_TOKEN from {SECRET}")
    forbidden = {"LABBOOK_SECRET_KEY", "SMTP_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    require(not keys & forbidden, f"{where}: must not get {sorted(keys & forbidden)}")
    require(keys <= example_keys, f"{where}: keys {sorted(keys - example_keys)} missing "
            "from secret.example.yaml")
    services = by_kind(docs, "Service")
    require("labbook-console" in services, "a Service labbook-console")
    svc = services["labbook-console"][1]["spec"]
    require(svc.get("type", "ClusterIP") == "ClusterIP", "console Service: ClusterIP only")
    require(all(labels.get(k) == v for k, v in svc["selector"].items()),
            "console Service selects the console's pods")
    require(all(p.get("targetPort") in ("http", port) for p in svc["ports"]),
            "console Service targets the http port")
    return "Deployment and ClusterIP Service consistent; token from the Secret, no password key"


# --------------------------------------------------------------------------------------------
# KEDA: a strict subset of the keda.sh/v1alpha1 CRD schemas (the fields these manifests may
# use), checked with jsonschema, then the semantics.

_INT = {"type": "integer"}
_STR = {"type": "string"}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "labels": {"type": "object"}, "annotations": {"type": "object"}},
    "additionalProperties": False,
}
SCALEDOBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": _STR, "kind": _STR, "apiVersion": _STR,
                                   "envSourceContainerName": _STR},
                },
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _INT, "replicas": _INT},
                    "additionalProperties": False,
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": _STR,
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        d: {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "properties": {
                                                "stabilizationWindowSeconds": {
                                                    "type": "integer", "minimum": 0,
                                                    "maximum": 3600},
                                                "selectPolicy": _STR,
                                                "policies": {"type": "array"},
                                            },
                                        }
                                        for d in ("scaleUp", "scaleDown")
                                    },
                                },
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": _STR,
                            "name": _STR,
                            "metricType": _STR,
                            "useCachedMetrics": {"type": "boolean"},
                            # The CRD: a map of strings. A bare 20 in YAML is rejected.
                            "metadata": {"type": "object",
                                         "additionalProperties": {"type": "string"}},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"name": _STR, "kind": _STR},
                            },
                        },
                    },
                },
            },
        },
    },
}
TRIGGERAUTH_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {"parameter": _STR, "name": _STR, "key": _STR},
                    },
                },
            },
        },
    },
}
RABBITMQ_TRIGGER_KEYS = {"protocol", "queueName", "mode", "value", "activationValue",
                         "vhostName", "hostFromEnv", "unsafeSsl"}
PROMETHEUS_TRIGGER_KEYS = {"serverAddress", "query", "threshold", "activationThreshold",
                           "namespace", "ignoreNullValues"}
# The series labbook's workers export that a prometheus trigger may scale on.
SCALING_SERIES = {"provisioner": {"labbook_readiness_due"}}


def check_keda():
    import jsonschema

    docs = []
    for name in sorted(KEDA_FILES):
        docs += [(name, d) for d in load_docs(K8S / name)]
    auths = {}
    scaled = {}
    for f, d in docs:
        kind = d.get("kind")
        schema = {"ScaledObject": SCALEDOBJECT_SCHEMA,
                  "TriggerAuthentication": TRIGGERAUTH_SCHEMA}.get(kind)
        require(schema is not None, f"{f}: unexpected kind {kind}")
        try:
            jsonschema.validate(d, schema)
        except jsonschema.ValidationError as e:
            path = "/".join(map(str, e.absolute_path))
            raise CheckError(f"{f}:{d['metadata'].get('name')}: {path}: {e.message}") from None
        (auths if kind == "TriggerAuthentication" else scaled)[d["metadata"]["name"]] = d

    for name, a in auths.items():
        refs = {r["parameter"]: r for r in a["spec"]["secretTargetRef"]}
        require("host" in refs, f"TriggerAuthentication {name}: parameter host")
        require(refs["host"]["name"] == SECRET and refs["host"]["key"] == "AMQP_URL",
                f"TriggerAuthentication {name}: host from {SECRET}/AMQP_URL")

    deployments = by_kind(all_k8s_docs(), "Deployment")
    require(set(scaled) == {f"labbook-{w}" for w in WORKERS},
            f"one ScaledObject per worker (got {sorted(scaled)})")
    seen_queues = []
    for name, so in scaled.items():
        spec = so["spec"]
        target = spec["scaleTargetRef"]
        require(target["name"] == name and name in deployments,
                f"{name}: scaleTargetRef names its Deployment")
        require(target.get("kind", "Deployment") == "Deployment", f"{name}: targets a Deployment")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        require(0 <= lo <= hi and hi >= 1, f"{name}: 0 <= min <= max")
        worker = name.removeprefix("labbook-")
        # The scheduler runs the durable timer, the provisioner the time-critical teardown.
        if worker in ("scheduler", "provisioner"):
            require(lo >= 1, f"{name}: minReplicaCount must be >= 1")
        queues = []
        for t in spec["triggers"]:
            m = t["metadata"]
            if t["type"] == "prometheus":
                # Work that is no message: machines the boot watch is due to look at.
                require(set(m) <= PROMETHEUS_TRIGGER_KEYS, f"{name}: unknown prometheus keys "
                        f"{sorted(set(m) - PROMETHEUS_TRIGGER_KEYS)}")
                series = set(re.findall(r"labbook_[a-z_]+", m.get("query", "")))
                require(series and series <= SCALING_SERIES.get(worker, set()),
                        f"{name}: the query names a series the worker exports (got {sorted(series)})")
                require(re.fullmatch(r"[1-9][0-9]*", m.get("threshold", "")),
                        f"{name}: threshold a positive whole number (as a string)")
                continue
            require(t["type"] == "rabbitmq", f"{name}: trigger type rabbitmq")
            require(set(m) <= RABBITMQ_TRIGGER_KEYS, f"{name}: unknown rabbitmq keys "
                    f"{sorted(set(m) - RABBITMQ_TRIGGER_KEYS)}")
            require(m.get("mode") == "QueueLength", f"{name}: mode QueueLength")
            require(m.get("protocol", "auto") in ("amqp", "auto"), f"{name}: protocol amqp")
            require(re.fullmatch(r"[1-9][0-9]*", m.get("value", "")),
                    f"{name}: value a positive whole number (as a string)")
            require("host" not in m, f"{name}: the host (with its password) comes from the "
                    "TriggerAuthentication, never inline")
            auth = (t.get("authenticationRef") or {}).get("name")
            require(auth in auths, f"{name}: authenticationRef to a TriggerAuthentication")
            queues.append(m["queueName"])
        require(sorted(queues) == sorted(WORKERS[worker]),
                f"{name}: triggers on {sorted(WORKERS[worker])} (got {sorted(queues)})")
        seen_queues += queues
    require(sorted(seen_queues) == sorted(STAGE_QUEUES), "every stage queue scaled exactly once")
    mins = ", ".join(f"{n.removeprefix('labbook-')}>={s['spec'].get('minReplicaCount', 0)}"
                     for n, s in sorted(scaled.items()))
    return f"{len(scaled)} ScaledObjects over 5 queues, {len(auths)} TriggerAuthentication; {mins}"


# --------------------------------------------------------------------------------------------
# docker-compose.yml (as resolved by `docker-compose config`)


def check_compose():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABBOOK_")}
    env["LABBOOK_SECRET_KEY"] = "Y2hlY2stb25seS1ub3QtYS1yZWFsLWtleS0zMmJ5dGU="  # not a real key
    # An empty --env-file: a developer's .env must not change what is checked.
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        out = subprocess.run(
            ["docker-compose", "--env-file", empty.name,
             "-f", str(ROOT / "docker-compose.yml"), "config"],
            env=env, capture_output=True, text=True, cwd=ROOT,
        )
    require(out.returncode == 0, f"docker-compose config failed: {out.stderr.strip()}")
    services = yaml.safe_load(out.stdout)["services"]
    expected = {"rabbitmq", "postgres", "moto", "mailpit", "migrate", "console", *WORKERS,
                "prometheus", "grafana", "jaeger"}
    require(set(services) == expected, f"compose services {sorted(services)}")
    # The trace collector is optional: only with `--profile tracing`, and the workers export
    # nothing unless OTEL_EXPORTER_OTLP_ENDPOINT is set (empty by default).
    require(services["jaeger"].get("profiles") == ["tracing"], "compose: jaeger is in the tracing profile")
    for w in WORKERS:
        require(services[w]["environment"].get("OTEL_EXPORTER_OTLP_ENDPOINT") in ("", None),
                f"compose: {w} exports no traces by default")
    for infra in ("rabbitmq", "postgres"):
        require("healthcheck" in services[infra], f"compose: {infra} healthcheck")
    mig = services["migrate"]
    require(all(mig["depends_on"][s]["condition"] == "service_healthy"
                for s in ("rabbitmq", "postgres")), "compose: migrate waits for healthy deps")
    require("labbook migrate && labbook topology" in " ".join(mig["command"]),
            "compose: migrate runs `labbook migrate` then `labbook topology`")
    required_env = {"AMQP_URL", "DATABASE_URL", "SMTP_URL", "MAIL_FROM", "AWS_REGION",
                    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                    "LABBOOK_AMI_ID", "LABBOOK_SECRET_KEY", "LABBOOK_LOG_FORMAT"}
    for w in WORKERS:
        s = services[w]
        require(s["command"] == [f"labbook-{w}"], f"compose: {w} runs labbook-{w}")
        require(s["depends_on"]["migrate"]["condition"] == "service_completed_successfully",
                f"compose: {w} waits for migrate to succeed")
        missing = required_env - set(s["environment"])
        require(not missing, f"compose: {w} lacks {sorted(missing)}")
        require(s["environment"]["LABBOOK_LOG_FORMAT"] == "json", f"compose: {w} json logs")
        require(s["environment"]["SMTP_URL"] == "smtp://mailpit:1025", f"compose: {w} SMTP")
        require(s["environment"]["AWS_ENDPOINT_URL"] == "http://moto:5000", f"compose: {w} moto")
    con = services["console"]
    require(con["command"][:2] == ["labbook", "console"], "compose: console runs labbook console")
    require("LABBOOK_SECRET_KEY" not in con["environment"], "compose: console gets no secret key")
    def host_ip(p):  # docker-compose 1.x writes "IP:HOST:CONTAINER", 2.x a mapping
        return p.split(":")[0] if isinstance(p, str) and p.count(":") == 2 else (
            p.get("host_ip") if isinstance(p, dict) else None)
    require(all(host_ip(p) == "127.0.0.1" for p in con.get("ports") or []),
            "compose: the console is published on the host's loopback only")
    return f"{len(services)} services; workers wait for migrate; shared environment complete"


# --------------------------------------------------------------------------------------------
# deploy/rabbitmq-definitions.json


# topology::DELIVERY_LIMIT: stage and dead-letter queues never reach RabbitMQ 4.x's limit.
DELIVERY_LIMIT = 1_000_000_000


def expected_queues():
    q = {}
    for s in STAGE_QUEUES:
        q[s] = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
        q[f"{s}.dlq"] = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
        for tier, ms in RETRY_TIERS.items():
            q[f"{s}.retry.{tier}"] = {
                "x-queue-type": "quorum",
                "x-message-ttl": ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": s,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
    return q


def check_definitions():
    path = DEPLOY / "rabbitmq-definitions.json"
    d = json.loads(path.read_text())
    exchanges = d.get("exchanges") or []
    got_x = sorted((x["name"], x["vhost"], x["type"], x["durable"], x["auto_delete"], x["internal"])
                   for x in exchanges)
    require(got_x == [(EXCHANGE, "/", "direct", True, False, False),
                      ("labbook.events", "/", "topic", True, False, False)],
            "definitions: exchanges labbook (direct) and labbook.events (topic), durable")
    want = expected_queues()
    queues = d.get("queues") or []
    names = [q["name"] for q in queues]
    require(len(names) == len(set(names)), "definitions: duplicate queue")
    require(set(names) == set(want) and len(names) == 30,
            f"definitions: the 30 queues (missing {sorted(set(want) - set(names))}, "
            f"extra {sorted(set(names) - set(want))})")
    for q in queues:
        require(q["vhost"] == "/" and q["durable"] is True and q["auto_delete"] is False,
                f"definitions: {q['name']} durable, not auto-delete, vhost /")
        args = q["arguments"]
        require(args == want[q["name"]], f"definitions: {q['name']} arguments {args}")
        ttl = args.get("x-message-ttl")
        require(ttl is None or (isinstance(ttl, int) and not isinstance(ttl, bool)),
                f"definitions: {q['name']} x-message-ttl must be a JSON integer")
    bindings = d.get("bindings") or []
    got = sorted((b["source"], b["destination"], b["destination_type"], b["routing_key"],
                  b["vhost"]) for b in bindings)
    require(got == sorted((EXCHANGE, s, "queue", s, "/") for s in STAGE_QUEUES),
            f"definitions: exactly the 5 stage bindings (got {got})")
    require(not any(k in d for k in ("users", "permissions")),
            "definitions: no users or permissions (passwords are secrets)")
    import re
    policies = d.get("policies") or []
    require([p["name"] for p in policies] == ["labbook-delivery-limit"],
            "definitions: the one policy labbook-delivery-limit")
    pol = policies[0]
    pattern = re.compile(pol["pattern"])
    limited = sorted(n for n in want if pattern.search(n))
    require(limited == sorted(list(STAGE_QUEUES) + [f"{s}.dlq" for s in STAGE_QUEUES]),
            f"definitions: the policy matches the stage and dead-letter queues only (got {limited})")
    require(pol["definition"] == {"delivery-limit": DELIVERY_LIMIT} and pol["apply-to"] == "queues",
            "definitions: the policy sets the delivery limit labbook declares")
    # The committed file is what the generator writes.
    gen = subprocess.run(
        [sys.executable, str(DEPLOY / "gen-rabbitmq-definitions.py"), "--output", "-"],
        capture_output=True, text=True,
    )
    require(gen.returncode == 0, f"gen-rabbitmq-definitions.py failed: {gen.stderr.strip()}")
    require(gen.stdout == path.read_text(), "rabbitmq-definitions.json differs from what "
            "gen-rabbitmq-definitions.py writes: regenerate it")
    return ("30 queues (5 stage, 5 dlq, 20 retry), 2 exchanges (labbook, labbook.events), "
            "5 bindings, the delivery-limit policy; matches generator")


# --------------------------------------------------------------------------------------------
# deploy/iam-policy.json

RUN_INSTANCES_TYPES = ["instance", "image", "subnet", "security-group", "network-interface"]


def as_list(v):
    return v if isinstance(v, list) else [v]


def stmts_for_all(stmts, action):
    return [s for s in stmts if action in as_list(s["Action"])]


def check_iam():
    p = json.loads((DEPLOY / "iam-policy.json").read_text())
    require(p.get("Version") == "2012-10-17", "iam: Version 2012-10-17")
    stmts = p["Statement"]
    sids = [s.get("Sid", "") for s in stmts]
    require(all(re.fullmatch(r"[A-Za-z0-9]+", s) for s in sids), "iam: every Sid alphanumeric")
    require(len(set(sids)) == len(sids), "iam: unique Sids")
    actions = set()
    for s in stmts:
        require(s["Effect"] == "Allow", f"iam {s['Sid']}: Allow only")
        for a in as_list(s["Action"]):
            require(a.startswith(("ec2:", "servicequotas:Get")) and "*" not in a,
                    f"iam {s['Sid']}: {a} (no wildcards)")
            actions.add(a)
            # Reads with no resource type of their own (IAM's reference, as parliament
            # carries it) may name "*".
            if not a.startswith(("ec2:Describe", "servicequotas:Get")):
                require(s["Resource"] != "*", f"iam {s['Sid']}: {a} scoped to resources")

    def stmts_for(action):
        return [s for s in stmts if action in as_list(s["Action"])]

    # RunInstances: the instance only with the managed tag and IMDSv2; the union of the
    # statements covers every resource type the call authorizes.
    run = stmts_for("ec2:RunInstances")
    covered = set()
    for s in run:
        for r in as_list(s["Resource"]):
            m = re.fullmatch(r"arn:aws:ec2:\*:\*?:([a-z-]+)/\*", r)
            require(m, f"iam {s['Sid']}: resource {r}")
            covered.add(m.group(1))
            if m.group(1) == "instance":
                cond = s.get("Condition", {}).get("StringEquals", {})
                require(cond.get("aws:RequestTag/labbook:managed") == "true",
                        f"iam {s['Sid']}: instances only with labbook:managed=true")
                require(cond.get("ec2:MetadataHttpTokens") == "required",
                        f"iam {s['Sid']}: instances only with IMDSv2 required")
    require(set(RUN_INSTANCES_TYPES) <= covered,
            f"iam: RunInstances lacks {sorted(set(RUN_INSTANCES_TYPES) - covered)}")
    for s in stmts_for("ec2:CreateTags"):
        ca = as_list(s.get("Condition", {}).get("StringEquals", {}).get("ec2:CreateAction"))
        require(ca and ca != [None], f"iam {s['Sid']}: CreateTags only while creating")
        if s["Sid"].startswith("Image"):
            require(ca == ["CreateImage"], f"iam {s['Sid']}: CreateTags only in CreateImage")
        elif not s["Sid"].startswith("Optional"):
            require(ca == ["RunInstances"], f"iam {s['Sid']}: CreateTags only in RunInstances")
    for s in stmts_for("ec2:TerminateInstances"):
        cond = s.get("Condition", {}).get("StringEquals", {})
        require(cond.get("ec2:ResourceTag/labbook:managed") == "true",
                f"iam {s['Sid']}: terminate only instances tagged labbook:managed=true")
    for a in ("ec2:CreateSecurityGroup", "ec2:AuthorizeSecurityGroupIngress"):
        require(all(s["Sid"].startswith("Optional") for s in stmts_for(a)),
                f"iam: {a} only in a statement marked Optional")
    # labbook's own security group: created only tagged labbook:managed=true, its ingress changed
    # only on groups so tagged; the statements together cover the types each call authorizes.
    for a, key, types in (
        ("ec2:CreateSecurityGroup", "aws:RequestTag/labbook:managed", {"security-group", "vpc"}),
        ("ec2:AuthorizeSecurityGroupIngress", "ec2:ResourceTag/labbook:managed",
         {"security-group", "security-group-rule"}),
    ):
        covered = set()
        for st in stmts_for(a):
            for r in as_list(st["Resource"]):
                m = re.fullmatch(r"arn:aws:ec2:\*:\*?:([a-z-]+)/\*", r)
                require(m, f"iam {st['Sid']}: resource {r}")
                covered.add(m.group(1))
                if m.group(1) == "security-group":
                    cond = st.get("Condition", {}).get("StringEquals", {})
                    require(cond.get(key) == "true",
                            f"iam {st['Sid']}: {a} on security groups only with {key}=true")
        require(types <= covered, f"iam: {a} lacks {sorted(types - covered)}")
    # `labbook image`: the builder stopped, imaged, images deregistered and snapshots deleted only
    # where tagged labbook:managed=true; a new image and its snapshots only so tagged.
    for a in ("ec2:StopInstances", "ec2:DeregisterImage", "ec2:DeleteSnapshot"):
        for st in stmts_for(a):
            require(st["Sid"].startswith("Image"), f"iam {st['Sid']}: {a} only in an Image statement")
            cond = st.get("Condition", {}).get("StringEquals", {})
            require(cond.get("ec2:ResourceTag/labbook:managed") == "true",
                    f"iam {st['Sid']}: {a} only on resources tagged labbook:managed=true")
    covered = set()
    for st in stmts_for("ec2:CreateImage"):
        cond = st.get("Condition", {}).get("StringEquals", {})
        for r in as_list(st["Resource"]):
            m = re.fullmatch(r"arn:aws:ec2:\*:\*?:([a-z-]+)/\*", r)
            require(m, f"iam {st['Sid']}: resource {r}")
            covered.add(m.group(1))
            key = ("ec2:ResourceTag/labbook:managed" if m.group(1) == "instance"
                   else "aws:RequestTag/labbook:managed")
            require(cond.get(key) == "true", f"iam {st['Sid']}: CreateImage on {m.group(1)} only with {key}=true")
    require({"instance", "image", "snapshot"} <= covered,
            f"iam: CreateImage lacks {sorted({'instance', 'image', 'snapshot'} - covered)}")
    for a in ("ec2:StopInstances", "ec2:CreateImage", "ec2:DeregisterImage", "ec2:DeleteSnapshot",
              "ec2:DescribeInstances", "ec2:DescribeImages", "ec2:DescribeSecurityGroups",
              "ec2:DescribeSubnets", "ec2:DescribeVpcs", "ec2:RunInstances",
              "ec2:TerminateInstances", "ec2:CreateTags", "ec2:GetConsoleOutput",
              "ec2:DescribeInstanceTypes", "servicequotas:GetServiceQuota",
              "servicequotas:GetAWSDefaultServiceQuota"):
        require(a in actions, f"iam: {a} missing")
    return f"{len(stmts)} statements, {len(actions)} actions, no wildcards; tag/IMDSv2 conditions"


def check_iam_lint():
    """parliament, offline. Its RESOURCE_MISMATCH check looks at one statement at a time and
    so flags RunInstances (and CreateImage) split over two statements (instance with conditions, the supporting
    resources without): IAM authorizes each resource of the request against every statement,
    and `iam` above checks that the union covers every required type. That finding is
    accepted for the calls split that way (RunInstances, and CreateSecurityGroup and
    AuthorizeSecurityGroupIngress for labbook's own group); any other finding fails."""
    from parliament import analyze_policy_string, enhance_finding

    text = (DEPLOY / "iam-policy.json").read_text()
    policy = analyze_policy_string(text, "deploy/iam-policy.json")
    kept, accepted = [], 0
    for f in policy.findings:
        f = enhance_finding(f)
        detail = f.detail if isinstance(f.detail, list) else []
        if f.issue == "RESOURCE_MISMATCH" and detail and all(
            isinstance(x, dict) and x.get("action") in SPLIT_ACTIONS for x in detail
        ):
            accepted += 1
            continue
        kept.append(f"{f.severity} {f.issue} {f.detail} {f.location}")
    require(not kept, f"parliament: {len(kept)} finding(s): " + "; ".join(kept[:3]))
    return (f"parliament: no findings ({accepted} RESOURCE_MISMATCH for the deliberate "
            "statement splits accepted)")


# Calls whose resources are split over two statements (the tagged resource with conditions,
# the others without); see check_iam_lint.
SPLIT_ACTIONS = ("ec2:RunInstances", "ec2:CreateSecurityGroup", "ec2:AuthorizeSecurityGroupIngress",
                 "ec2:CreateImage")


# --------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore (hadolint checks the syntax and practices; this, the contents)


def dockerfile_instructions():
    lines, cur = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if not cur and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1] + " "
            continue
        lines.append((cur + raw).strip())
        cur = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
            for ln in lines]


def check_dockerfile():
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    require(len(froms) == 2, f"Dockerfile: two stages (got {froms})")
    require(froms[0].split()[0] == "rust:1-bookworm", "Dockerfile: builder rust:1-bookworm")
    require(froms[1].split()[0] == "debian:bookworm-slim", "Dockerfile: runtime bookworm-slim")
    runs = " ".join(a for i, a in ins if i == "RUN")
    require(runs.count("cargo build --release --locked") == 2,
            "Dockerfile: cargo build --release --locked, for the dependency layer and the crate")
    require("ca-certificates" in runs, "Dockerfile: runtime installs ca-certificates")
    # The builder installs each binary into /out, which the runtime copies to /usr/local/bin.
    m = re.search(r"for b in ([^;]+); do install -m 0755 \"target/release/\$b\" \"/out/\$b\"",
                  re.sub(r"\s+", " ", runs))
    require(m and sorted(m.group(1).split()) == sorted(BINARIES),
            f"Dockerfile: installs exactly {BINARIES} (got {m and m.group(1).split()})")
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # older Python: the Cargo.toml comparison is skipped
        tomllib = None
    if tomllib is not None:
        with open(ROOT / "Cargo.toml", "rb") as f:
            cargo_bins = [b["name"] for b in tomllib.load(f).get("bin", [])]
        require(sorted(cargo_bins) == sorted(BINARIES),
                f"Cargo.toml [[bin]] {cargo_bins} differ from the deployed {BINARIES}")
    final = ins[[i for i, _ in ins].index("FROM", 1):]
    require(("COPY", "--from=builder /out/ /usr/local/bin/") in final,
            "Dockerfile: COPY --from=builder /out/ /usr/local/bin/")
    users = [a for i, a in final if i == "USER"]
    require(users and users[-1].split(":")[0] == "10001", "Dockerfile: USER 10001 (numeric)")
    require(("EXPOSE", "9464") in final, "Dockerfile: EXPOSE 9464")
    cmd = [a for i, a in final if i == "CMD"]
    require(cmd and json.loads(cmd[-1]) == ["labbook", "--help"], "Dockerfile: CMD labbook --help")
    require(not [a for i, a in final if i == "ENTRYPOINT"], "Dockerfile: no ENTRYPOINT")
    ignored = (ROOT / ".dockerignore").read_text().split()
    for p in ("target/", ".git/"):
        require(p in ignored, f".dockerignore: {p}")
    for p in ("src/", "bins/", "migrations/", "templates/", "Cargo.toml", "Cargo.lock"):
        require(p not in ignored and p.rstrip("/") not in ignored,
                f".dockerignore must not exclude {p}: the build needs it")
    return (f"2 stages, the {len(BINARIES)} Cargo.toml binaries into /usr/local/bin, USER 10001, "
            "EXPOSE 9464; .dockerignore ok")


CHECKS = {
    "dockerfile": check_dockerfile,
    "kustomization": check_kustomization,
    "workloads": check_workloads,
    "console": check_console,
    "keda": check_keda,
    "compose": check_compose,
    "definitions": check_definitions,
    "iam": check_iam,
    "iam-lint": check_iam_lint,
}


def main(argv):
    if len(argv) != 2 or argv[1] not in CHECKS:
        print(f"usage: {argv[0]} {{{'|'.join(CHECKS)}}}", file=sys.stderr)
        return 2
    try:
        print(CHECKS[argv[1]]())
    except CheckError as e:
        msg = str(e)
        print(f"FAILED: {msg[:600]}{' ...' if len(msg) > 600 else ''}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
