"""Static checks of notify's observability files, run by scripts/check-deploy.py.

- deploy/grafana/dashboards/*.json: valid JSON; every panel queries the provisioned Prometheus
  datasource (by uid); every metric name in every query exists: notify's own in the Rust code (a
  string literal), RabbitMQ's in the rabbitmq_prometheus set below, plus Prometheus' `up`.
- deploy/grafana/provisioning: the datasource the dashboards name, the dashboards folder the
  compose file mounts.
- docker-compose.yml profile `observability`: Prometheus and Grafana only in that profile,
  Grafana on host port 3000; deploy/prometheus/prometheus.yml scrapes the api's port, every
  worker replica (DNS service discovery on the compose service name) on the worker's HTTP port,
  and RabbitMQ's rabbitmq_prometheus port, whose plugin the rabbitmq service enables.
- deploy/k8s/base/api.yaml: Prometheus scrape annotations naming the API's container port.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

# rabbitmq_prometheus metric names the dashboard may use (RabbitMQ 3.10-4.x, /metrics and
# /metrics/per-object), and Prometheus' own per-target series.
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_consumers",
    "rabbitmq_queues",
    "rabbitmq_connections",
    "rabbitmq_channels",
    "rabbitmq_consumers",
    "rabbitmq_build_info",
    "rabbitmq_identity_info",
    "rabbitmq_alarms_memory_used_watermark",
    "rabbitmq_alarms_free_disk_space_watermark",
    "rabbitmq_global_messages_received_total",
    "rabbitmq_global_messages_delivered_total",
    "rabbitmq_global_messages_confirmed_total",
}
PROMETHEUS_METRICS = {"up", "scrape_duration_seconds"}
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "histogram_quantile", "abs", "ceil", "floor", "round", "clamp_min", "clamp_max", "vector",
    "scalar", "time", "absent", "changes", "resets", "deriv", "predict_linear", "label_replace",
    "sort", "sort_desc", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "inf", "nan",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)      # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)                 # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)                # ranges
    names = set()
    for token in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if token.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", token):
            names.add(token)
    return names


def code_metric_names(root: Path) -> set[str]:
    """Every `"notify_…"` string literal in the Rust sources: the metric names notify records."""
    names = set()
    for path in (root / "crates").glob("*/src/**/*.rs"):
        names.update(re.findall(r'"(notify_[a-z0-9_]+)"', path.read_text()))
    return names


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_observability(root: Path, services: dict, check: Callable[[bool, str], bool],
                        notes: list[str], load_yaml_docs, container_ports, host_ports) -> None:
    where = "docker-compose.yml (profile observability)"
    # Provisioned datasources.
    ds_uids = set()
    for path in sorted((root / "deploy/grafana/provisioning/datasources").glob("*.yaml")):
        for doc in load_yaml_docs(path):
            for ds in doc.get("datasources") or []:
                if ds.get("type") == "prometheus":
                    ds_uids.add(ds.get("uid"))
                    check(ds.get("url") == "http://prometheus:9090",
                          f"{path.relative_to(root)}: the Prometheus datasource must point at "
                          f"http://prometheus:9090 (found {ds.get('url')!r})")
    check(bool(ds_uids), "deploy/grafana/provisioning/datasources: no Prometheus datasource is provisioned")

    # Dashboards.
    code_names = code_metric_names(root)
    worker_in_code = any(n.startswith("notify_worker_") for n in code_names)
    dashboards = sorted((root / "deploy/grafana/dashboards").glob("*.json"))
    check(bool(dashboards), "deploy/grafana/dashboards: no dashboard JSON")
    pending = set()
    for path in dashboards:
        rel = path.relative_to(root)
        try:
            dash = json.loads(path.read_text())
        except ValueError as exc:
            check(False, f"{rel}: not valid JSON: {exc}")
            continue
        check(bool(dash.get("uid")) and bool(dash.get("title")), f"{rel}: needs a uid and a title")
        panels = [p for p in dash.get("panels") or [] if p.get("type") != "row"]
        check(bool(panels), f"{rel}: has no panels")
        ids = [p.get("id") for p in dash.get("panels") or []]
        check(len(ids) == len(set(ids)), f"{rel}: panel ids repeat")
        for panel in panels:
            title = panel.get("title")
            uid = (panel.get("datasource") or {}).get("uid")
            check(uid in ds_uids, f"{rel}: panel {title!r} uses datasource uid {uid!r}, not a provisioned one {sorted(ds_uids)}")
            targets = panel.get("targets") or []
            check(bool(targets), f"{rel}: panel {title!r} has no query")
            for target in targets:
                for name in metric_names(target.get("expr", "")):
                    base = base_name(name)
                    if name in PROMETHEUS_METRICS or name in RABBITMQ_METRICS:
                        continue
                    if name.startswith("notify_"):
                        if base in code_names or name in code_names:
                            continue
                        if not worker_in_code and (base.startswith("notify_worker_") or base == "notify_dead_letters"):
                            pending.add(base)
                            continue
                    check(False, f"{rel}: panel {title!r} queries `{name}`, which neither notify's code "
                                 "nor the known rabbitmq_prometheus/Prometheus metrics have")
    if pending:
        notes.append("the dashboard's worker metrics are not in the code yet (crates/worker records none): "
                     + ", ".join(sorted(pending)))

    provider_paths = set()
    for path in sorted((root / "deploy/grafana/provisioning/dashboards").glob("*.yaml")):
        for doc in load_yaml_docs(path):
            for prov in doc.get("providers") or []:
                provider_paths.add((prov.get("options") or {}).get("path"))
    check(bool(provider_paths), "deploy/grafana/provisioning/dashboards: no dashboard provider")

    # Compose profile.
    prom, graf = services.get("prometheus") or {}, services.get("grafana") or {}
    for name, svc in (("prometheus", prom), ("grafana", graf)):
        check(svc.get("profiles") == ["observability"], f"{where}: {name} must be only in profile observability")
    check(3000 in host_ports(graf.get("ports")) and 3000 in container_ports(graf.get("ports")),
          f"{where}: grafana must publish port 3000 (the README names it)")
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in graf.get("volumes") or [] if ":" in str(v)}
    check(mounts.get("/etc/grafana/provisioning") == "./deploy/grafana/provisioning",
          f"{where}: grafana must mount ./deploy/grafana/provisioning at /etc/grafana/provisioning")
    for target in provider_paths:
        check(mounts.get(target) == "./deploy/grafana/dashboards",
              f"{where}: the dashboard provider reads {target}, which must be ./deploy/grafana/dashboards")
    prom_mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in prom.get("volumes") or [] if ":" in str(v)}
    check(prom_mounts.get("/etc/prometheus/prometheus.yml") == "./deploy/prometheus/prometheus.yml",
          f"{where}: prometheus must mount ./deploy/prometheus/prometheus.yml")

    # Scrape targets against the services.
    docs = load_yaml_docs(root / "deploy/prometheus/prometheus.yml")
    jobs = {j.get("job_name"): j for j in (docs[0].get("scrape_configs") or [])} if docs else {}
    api_env = (services.get("api") or {}).get("environment") or {}
    api_port = str(api_env.get("API_PORT", "9919")) if isinstance(api_env, dict) else "9919"
    api_targets = [t for sc in (jobs.get("notify-api") or {}).get("static_configs") or [] for t in sc.get("targets") or []]
    check(api_targets == [f"api:{api_port}"], f"deploy/prometheus/prometheus.yml: notify-api must scrape api:{api_port} (found {api_targets})")
    worker_sd = [sd for sd in (jobs.get("notify-worker") or {}).get("dns_sd_configs") or []]
    check(len(worker_sd) == 1 and worker_sd[0].get("names") == ["worker"] and worker_sd[0].get("type") == "A"
          and worker_sd[0].get("port") == worker_http_port(root),
          f"deploy/prometheus/prometheus.yml: notify-worker must find every replica by DNS (dns_sd_configs, "
          f"names [worker], type A, port {worker_http_port(root)})")
    rabbit = jobs.get("rabbitmq") or {}
    rabbit_targets = [t for sc in rabbit.get("static_configs") or [] for t in sc.get("targets") or []]
    check(rabbit_targets == ["rabbitmq:15692"], f"deploy/prometheus/prometheus.yml: rabbitmq must scrape rabbitmq:15692 (found {rabbit_targets})")
    rabbit_mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in (services.get("rabbitmq") or {}).get("volumes") or [] if ":" in str(v)}
    plugins_file = rabbit_mounts.get("/etc/rabbitmq/enabled_plugins")
    plugins = (root / plugins_file).read_text() if plugins_file and (root / plugins_file).is_file() else ""
    check("rabbitmq_prometheus" in plugins and "rabbitmq_management" in plugins,
          "docker-compose.yml: rabbitmq must mount an enabled_plugins file with rabbitmq_management and rabbitmq_prometheus")

    # Kubernetes: the API pods carry scrape annotations naming their port.
    for doc in load_yaml_docs(root / "deploy/k8s/base/api.yaml"):
        if doc.get("kind") != "Deployment":
            continue
        template = doc["spec"]["template"]
        ann = (template.get("metadata") or {}).get("annotations") or {}
        ports = {str(p.get("containerPort")) for c in template["spec"]["containers"] for p in c.get("ports") or []}
        check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") in ports
              and ann.get("prometheus.io/path") == "/metrics",
              f"deploy/k8s/base/api.yaml: the API pods need prometheus.io/scrape \"true\", /path /metrics and "
              f"/port one of their container ports {sorted(ports)} (found {ann})")


def worker_http_port(root: Path) -> int:
    """The worker's default HTTP port (WORKER_HTTP_PORT), from the code when it is there."""
    for path in (root / "crates/worker/src").glob("**/*.rs"):
        m = re.search(r"WORKER_HTTP_PORT[^\n]*?(\d{4,5})", path.read_text())
        if m:
            return int(m.group(1))
    return 9920
