#!/usr/bin/env python3
"""Static checks of the deploy files; needs python3 and PyYAML, uses kubectl when present.

    python3 scripts/check-deploy.py [REPO_ROOT]

Checks docker-compose.yml (the stack a developer starts, its webhook inspector that every notify
service's ORDER_WEBHOOK_URL points at, and its `cluster` profile: three RabbitMQ nodes of one
cluster, notify given all three; its `observability` profile, the Grafana dashboard and the
Prometheus config: scripts/check_observability.py), deploy/Dockerfile and, when present,
deploy/k8s/ (the base, and every overlay under deploy/k8s/overlays rendered with
`kubectl kustomize`: RabbitMQ cluster, KEDA, HPA, PodDisruptionBudgets, CloudNativePG) against
what the design asks of them, plus that every setting the deploy files pass to the binaries is
documented in .env.example. When the Python package kubernetes-validate is importable, every
rendered object of a built-in kind is also validated (strictly: unknown fields fail) against the
Kubernetes OpenAPI schemas it ships (offline); custom resources get a field whitelist instead.
Prints one line per failed check and exits 1 if any failed, else prints a summary and exits 0.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

try:
    import yaml
except ImportError:  # pragma: no cover - reported to the user
    sys.exit(
        "check-deploy: PyYAML is missing: `apt-get install python3-yaml` "
        "or `python3 -m pip install pyyaml`"
    )

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
REQUIRED_SERVICES = ("rabbitmq", "postgres", "mailpit", "api", "worker")

errors: list[str] = []
notes: list[str] = []
checked = 0


def check(cond: bool, message: str) -> bool:
    global checked
    checked += 1
    if not cond:
        errors.append(message)
    return cond


def load_yaml_docs(path: Path) -> list:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        errors.append(f"{path.relative_to(ROOT)}: cannot parse: {exc}")
        return []


def container_ports(port_specs) -> set[int]:
    """Container-side ports of a compose `ports:` list (short or long syntax)."""
    out: set[int] = set()
    for spec in port_specs or []:
        if isinstance(spec, dict):
            target = spec.get("target")
            if target is not None:
                out.add(int(target))
            continue
        s = str(spec).split("/")[0]          # drop /tcp
        target = s.rsplit(":", 1)[-1]        # [ip:][host:]container
        if "-" in target:
            lo, hi = target.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        elif target.isdigit():
            out.add(int(target))
    return out


def env_names(environment) -> set[str]:
    if isinstance(environment, dict):
        return set(environment)
    names = set()
    for item in environment or []:
        names.add(str(item).split("=", 1)[0])
    return names


def expand_defaults(s: str) -> str:
    """${VAR:-default} / ${VAR-default} -> default, ${VAR} -> '' (what compose uses when unset)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", s)


def host_ports(port_specs) -> set[int]:
    """Host-side ports of a compose `ports:` list (with ${VAR:-default} resolved)."""
    out: set[int] = set()
    for spec in port_specs or []:
        if isinstance(spec, dict):
            if spec.get("published") is not None:
                p = expand_defaults(str(spec["published"]))
                if p.isdigit():
                    out.add(int(p))
            continue
        parts = expand_defaults(str(spec)).split("/")[0].split(":")
        if len(parts) >= 2 and parts[-2].isdigit():
            out.add(int(parts[-2]))
    return out


def notify_command(svc) -> str | None:
    """`notify-api` / `notify-worker` when the service runs one of notify's binaries."""
    command = (svc or {}).get("command")
    command = command if isinstance(command, list) else str(command or "").split()
    return command[0] if command and str(command[0]).startswith("notify-") else None


def depends_on_names(svc) -> list[str]:
    deps = (svc or {}).get("depends_on") or {}
    return list(deps) if isinstance(deps, (dict, list)) else []


def env_dict(environment) -> dict[str, str]:
    if isinstance(environment, dict):
        return {k: "" if v is None else str(v) for k, v in environment.items()}
    out = {}
    for item in environment or []:
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


def amqp_urls(value: str) -> list:
    """RABBITMQ_URL -> parsed URLs (comma-separated list, as notify reads it)."""
    return [urlsplit(u.strip()) for u in str(value).split(",") if u.strip()]


def mounts(svc) -> dict[str, str]:
    """Bind/volume mounts of a compose service: container path -> source."""
    out = {}
    for v in (svc or {}).get("volumes") or []:
        if isinstance(v, dict):
            out[str(v.get("target"))] = str(v.get("source"))
            continue
        parts = str(v).split(":")
        if len(parts) >= 2:
            out[parts[1]] = parts[0]
    return out


def rabbit_conf(text: str) -> dict[str, str]:
    """key = value lines of a rabbitmq.conf (sysctl format)."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def documented_settings() -> set[str]:
    path = ROOT / ".env.example"
    if not check(path.is_file(), ".env.example is missing"):
        return set()
    names = set()
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", line)
        if m:
            names.add(m.group(1))
    return names


def check_compose(documented: set[str]) -> None:
    path = ROOT / "docker-compose.yml"
    if not check(path.is_file(), "docker-compose.yml is missing"):
        return
    docs = load_yaml_docs(path)
    if not docs:
        return
    doc = docs[0]
    check("version" not in doc, "docker-compose.yml: drop the obsolete top-level `version:` key")
    services = doc.get("services") or {}
    for name in REQUIRED_SERVICES:
        check(name in services, f"docker-compose.yml: service `{name}` is missing")
    for name, svc in services.items():
        check(
            "container_name" not in (svc or {}),
            f"docker-compose.yml: service `{name}` sets container_name "
            "(breaks `--scale` and parallel stacks)",
        )

    def svc(name):
        return services.get(name) or {}

    check(9919 in container_ports(svc("api").get("ports")),
          "docker-compose.yml: api must publish port 9919")
    check(15672 in container_ports(svc("rabbitmq").get("ports")),
          "docker-compose.yml: rabbitmq must expose the management UI port 15672")
    check(5672 in container_ports(svc("rabbitmq").get("ports")),
          "docker-compose.yml: rabbitmq must expose AMQP port 5672")
    check(not svc("worker").get("ports"),
          "docker-compose.yml: worker must publish no ports (it is scaled with --scale worker=N)")

    for name in ("rabbitmq", "postgres"):
        check(bool(svc(name).get("healthcheck")),
              f"docker-compose.yml: {name} needs a healthcheck (api/worker wait on it)")
    for name, s in services.items():
        if notify_command(s) == "notify-worker":
            test = ((s or {}).get("healthcheck") or {}).get("test") or []
            check(list(test)[1:] == ["notify-worker", "healthcheck"],
                  f"docker-compose.yml: {name} needs healthcheck `notify-worker healthcheck` "
                  f"(GET /ready on its listener; the image has no curl), found {test!r}")
    for name in ("api", "worker"):
        deps = svc(name).get("depends_on") or {}
        for dep in ("rabbitmq", "postgres"):
            cond = deps.get(dep, {}).get("condition") if isinstance(deps, dict) else None
            check(cond == "service_healthy",
                  f"docker-compose.yml: {name} must depend_on {dep} with "
                  f"condition: service_healthy (found {cond!r})")
        command = svc(name).get("command")
        command = command if isinstance(command, list) else str(command or "").split()
        check(command[:1] == [f"notify-{name}"],
              f"docker-compose.yml: {name} must run `notify-{name}` (command: {command!r})")

    api, worker = svc("api"), svc("worker")
    check(api.get("image") and api.get("image") == worker.get("image"),
          "docker-compose.yml: api and worker must use one image name")
    check(api.get("build") is not None and api.get("build") == worker.get("build"),
          "docker-compose.yml: api and worker must carry the same build section")
    build = api.get("build") or {}
    if isinstance(build, dict):
        dockerfile = ROOT / (build.get("context") or ".") / (build.get("dockerfile") or "Dockerfile")
        check(dockerfile.is_file(), f"docker-compose.yml: build dockerfile {dockerfile} is missing")
    for name in ("api", "worker"):
        check(svc(name).get("pull_policy") in ("build", "never"),
              f"docker-compose.yml: {name} needs pull_policy: build "
              "(else compose tries to pull the local image from a registry)")
    check(bool(worker.get("stop_grace_period")),
          "docker-compose.yml: worker needs stop_grace_period for a graceful drain")
    for name, s in services.items():
        if not notify_command(s):
            continue
        for var in sorted(env_names((s or {}).get("environment"))):
            check(var in documented,
                  f"docker-compose.yml: {name} sets {var}, which .env.example does not document")

    # `docker compose up` (no profile) must not need a profile's service.
    for name, s in services.items():
        if (s or {}).get("profiles"):
            continue
        for dep in depends_on_names(s):
            check(not (services.get(dep) or {}).get("profiles"),
                  f"docker-compose.yml: default service {name} depends on {dep}, which is only in "
                  f"profile(s) {(services.get(dep) or {}).get('profiles')}")
    # Services that run together must not publish the same host port.
    seen: dict[int, str] = {}
    for name, s in services.items():
        for port in host_ports((s or {}).get("ports")):
            check(port not in seen,
                  f"docker-compose.yml: {name} and {seen.get(port)} both publish host port {port}")
            seen.setdefault(port, name)
    check_compose_cluster(services)
    check_compose_webhooks(services)
    # The `observability` profile, the Grafana dashboard and the scrape config (own module).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from check_observability import check_observability
    check_observability(ROOT, services, check, notes, load_yaml_docs, container_ports, host_ports)


UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def check_compose_webhooks(services: dict) -> None:
    """The webhook inspector: every notify service (default and `cluster` profile) sends the
    shipped order.completed webhook to it, and may (WEBHOOK_ALLOW_PRIVATE) since it is a
    private address of the stack. The inspector (tarampampam/webhook-tester) records only paths
    that start with a session UUID, created on first use with AUTO_CREATE_SESSIONS."""
    where = "docker-compose.yml (webhook inspector)"
    inspectors = {n: s or {} for n, s in services.items()
                  if "webhook-tester" in str((s or {}).get("image", ""))}
    if not check(len(inspectors) == 1,
                 f"{where}: expected one webhook-tester service, found {sorted(inspectors)}"):
        return
    name, inspector = next(iter(inspectors.items()))
    check(not inspector.get("profiles"), f"{where}: {name} must run without a profile")
    check(8080 in container_ports(inspector.get("ports")),
          f"{where}: {name} must publish its UI port 8080")
    check(str(env_dict(inspector.get("environment")).get("AUTO_CREATE_SESSIONS", "")).lower() == "true",
          f"{where}: {name} needs AUTO_CREATE_SESSIONS: \"true\" (else requests to a new session id get 404)")
    notify = {n: s or {} for n, s in services.items() if notify_command(s)}
    check(any(notify_command(s) == "notify-worker" for s in notify.values()),
          f"{where}: no worker service")
    for n, s in notify.items():
        env = env_dict(s.get("environment"))
        url = urlsplit(env.get("ORDER_WEBHOOK_URL", ""))
        ok = check(url.scheme == "http" and url.hostname in (name, inspector.get("hostname"))
                   and (url.port or 80) == 8080,
                   f"{where}: {n}'s ORDER_WEBHOOK_URL must point at http://{name}:8080/<session uuid>, "
                   f"found {env.get('ORDER_WEBHOOK_URL')!r}")
        if ok:
            check(UUID_RE.fullmatch(url.path.strip("/").split("/")[0]) is not None,
                  f"{where}: {n}'s ORDER_WEBHOOK_URL path must start with a session UUID "
                  f"(the inspector records nothing else), found {url.path!r}")
        check(env.get("WEBHOOK_ALLOW_PRIVATE", "").lower() == "true",
              f"{where}: {n} needs WEBHOOK_ALLOW_PRIVATE: \"true\" ({name} is a private address of the stack)")


def check_compose_cluster(services: dict) -> None:
    """Profile `cluster`: three RabbitMQ nodes of one cluster, notify given all three."""
    where = "docker-compose.yml (profile cluster)"
    cluster = {n: s or {} for n, s in services.items() if "cluster" in ((s or {}).get("profiles") or [])}
    if not check(bool(cluster), f"{where}: no service has profiles: [cluster]"):
        return
    nodes = {n: s for n, s in cluster.items() if str(s.get("image", "")).startswith("rabbitmq:")}
    check(len(nodes) == 3, f"{where}: expected 3 RabbitMQ nodes, found {sorted(nodes)}")
    for n, s in nodes.items():
        tag = str(s.get("image")).split(":", 1)[1]
        check(tag.split(".")[0].split("-")[0] == "4", f"{where}: {n} must run RabbitMQ 4.x (image {s.get('image')})")
        check(bool(s.get("hostname")), f"{where}: {n} needs a fixed hostname (the node name rabbit@<hostname> keys its data)")
        check(bool(s.get("healthcheck")), f"{where}: {n} needs a healthcheck (notify waits on it)")
        check("RABBITMQ_ERLANG_COOKIE" not in env_names(s.get("environment")),
              f"{where}: {n} sets RABBITMQ_ERLANG_COOKIE (ignored by RabbitMQ 4 images; mount a cookie file)")
    hostnames = {n: str(s.get("hostname") or n) for n, s in nodes.items()}
    check(len(set(hostnames.values())) == len(nodes), f"{where}: RabbitMQ node hostnames must differ: {hostnames}")

    # One Erlang cookie for all nodes, from one file.
    cookie_targets = ("/var/lib/rabbitmq/.erlang.cookie", "/run/notify/erlang.cookie")
    cookies = {}
    for n, s in nodes.items():
        m = mounts(s)
        src = next((m[t_] for t_ in cookie_targets if t_ in m), None)
        check(src is not None, f"{where}: {n} mounts no Erlang cookie (one of {cookie_targets})")
        cookies[n] = src
        if "/run/notify/erlang.cookie" in m:
            # Copied into place by our entrypoint wrapper: it must be mounted and used.
            entry = s.get("entrypoint")
            entry = entry if isinstance(entry, list) else str(entry or "").split()
            script_target = next((e for e in entry if e.endswith(".sh")), None)
            script_src = m.get(script_target or "")
            if check(script_src is not None,
                     f"{where}: {n} mounts the cookie at /run/notify/erlang.cookie but its entrypoint "
                     f"{entry} is no mounted script that installs it"):
                path = ROOT / script_src
                text = path.read_text() if path.is_file() else ""
                check("/run/notify/erlang.cookie" in text and "/var/lib/rabbitmq/.erlang.cookie" in text
                      and "docker-entrypoint.sh" in text,
                      f"{where}: {script_src} must copy /run/notify/erlang.cookie to "
                      "/var/lib/rabbitmq/.erlang.cookie and exec docker-entrypoint.sh")
            command = s.get("command")
            command = command if isinstance(command, list) else str(command or "").split()
            check(command[:1] == ["rabbitmq-server"],
                  f"{where}: {n} overrides the entrypoint, so it needs command: [rabbitmq-server] "
                  f"(found {command!r})")
    srcs = {c for c in cookies.values() if c}
    if check(len(srcs) == 1, f"{where}: the nodes must share one Erlang cookie file, found {cookies}"):
        path = ROOT / next(iter(srcs))
        value = path.read_text().strip() if path.is_file() else ""
        check(re.fullmatch(r"[A-Za-z0-9_.@-]{20,255}", value) is not None,
              f"{where}: cookie file {path.relative_to(ROOT) if path.is_file() else path} must hold one "
              "cookie of 20+ plain characters")

    # One rabbitmq.conf naming exactly these nodes, classic peer discovery.
    confs = set()
    for n, s in nodes.items():
        srcs_ = [src for tgt, src in mounts(s).items() if tgt.startswith("/etc/rabbitmq/") and tgt.endswith(".conf")]
        check(len(srcs_) == 1, f"{where}: {n} must mount one rabbitmq.conf under /etc/rabbitmq/ (found {srcs_})")
        confs.update(srcs_)
    if check(len(confs) == 1, f"{where}: the nodes must share one rabbitmq.conf, found {sorted(confs)}"):
        path = ROOT / next(iter(confs))
        if check(path.is_file(), f"{where}: {path} is missing"):
            conf = rabbit_conf(path.read_text())
            check(conf.get("cluster_formation.peer_discovery_backend") in
                  ("classic_config", "rabbit_peer_discovery_classic_config"),
                  f"{where}: {path.name}: cluster_formation.peer_discovery_backend must be classic_config")
            listed = {v for k, v in conf.items() if re.fullmatch(r"cluster_formation\.classic_config\.nodes\.\d+", k)}
            expected = {f"rabbit@{h}" for h in hostnames.values()}
            check(listed == expected,
                  f"{where}: {path.name} lists nodes {sorted(listed)}, the services are {sorted(expected)}")
            check(conf.get("default_queue_type") in (None, "quorum"),
                  f"{where}: {path.name}: default_queue_type should be quorum on a cluster")

    data = {}
    for n, s in nodes.items():
        data[n] = mounts(s).get("/var/lib/rabbitmq")
        check(bool(data[n]), f"{where}: {n} needs its own volume at /var/lib/rabbitmq")
    check(len(set(data.values())) == len(data), f"{where}: each node needs its own data volume: {data}")

    # notify in the profile: an API and a worker, each given all three nodes.
    node_hosts = set(nodes) | set(hostnames.values())
    notify = {n: s for n, s in cluster.items() if notify_command(s)}
    kinds = {notify_command(s) for s in notify.values()}
    check({"notify-api", "notify-worker"} <= kinds,
          f"{where}: needs an API and a worker service (found {sorted(notify)})")
    for n, s in notify.items():
        url = env_dict(s.get("environment")).get("RABBITMQ_URL", "")
        urls = amqp_urls(url)
        hosts = [u.hostname for u in urls]
        check(len(urls) == 3 and set(hosts) <= node_hosts and len(set(hosts)) == 3,
              f"{where}: {n}'s RABBITMQ_URL must list the 3 nodes {sorted(nodes)}, found hosts {hosts}")
        check(all(u.scheme in ("amqp", "amqps") for u in urls),
              f"{where}: {n}'s RABBITMQ_URL entries must be amqp:// URLs")
        deps = s.get("depends_on") or {}
        for node in nodes:
            cond = deps.get(node, {}).get("condition") if isinstance(deps, dict) else None
            check(cond == "service_healthy",
                  f"{where}: {n} must depend_on {node} with condition: service_healthy (found {cond!r})")
        if notify_command(s) == "notify-worker":
            check(not s.get("ports"), f"{where}: {n} must publish no ports (scaled with --scale)")


def check_dockerfile() -> None:
    path = ROOT / "deploy" / "Dockerfile"
    if not check(path.is_file(), "deploy/Dockerfile is missing"):
        return
    text = path.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    check(len(froms) >= 2, "deploy/Dockerfile: must be multi-stage")
    for binary in ("notify-api", "notify-worker"):
        check(binary in text, f"deploy/Dockerfile: does not mention {binary}")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    check(bool(users) and users[-1].split(":")[0] not in ("root", "0"),
          "deploy/Dockerfile: the runtime stage must run as a non-root USER")
    check(re.search(r"^COPY\s+config/\s+/app/config/", text, re.M) is not None,
          "deploy/Dockerfile: must COPY config/ /app/config/")
    check(re.search(r'^CMD\s+\["notify-api"\]', text, re.M) is not None,
          'deploy/Dockerfile: default CMD must be ["notify-api"]')
    ignore = ROOT / ".dockerignore"
    if check(ignore.is_file(), ".dockerignore is missing"):
        entries = {l.strip().rstrip("/") for l in ignore.read_text().splitlines()}
        for entry in ("target", ".git", ".env"):
            check(entry in entries, f".dockerignore: must exclude {entry}")


def check_k8s(documented: set[str]) -> None:
    k8s = ROOT / "deploy" / "k8s"
    if not k8s.is_dir():
        return
    root_kust = k8s / "kustomization.yaml"
    if check(root_kust.is_file(), "deploy/k8s/kustomization.yaml is missing (`kubectl apply -k deploy/k8s`)"):
        rdoc = (load_yaml_docs(root_kust) or [{}])[0]
        check("base" in [str(r).rstrip("/") for r in rdoc.get("resources") or []],
              "deploy/k8s/kustomization.yaml must build the base (resources: [base])")
        check("namespace" not in rdoc, "deploy/k8s/kustomization.yaml: sets no namespace")
    base = k8s / "base"
    kust = base / "kustomization.yaml"
    if not check(kust.is_file(), "deploy/k8s/base/kustomization.yaml is missing"):
        return
    kdoc = (load_yaml_docs(kust) or [{}])[0]
    resources = kdoc.get("resources") or []
    check("namespace" not in kdoc, "deploy/k8s/base/kustomization.yaml: the base sets no namespace")
    check(not any("secret.example" in r for r in resources),
          "deploy/k8s: secret.example.yaml must not be a kustomize resource")
    objects = []
    for res in resources:
        p = base / res
        if check(p.is_file(), f"deploy/k8s/base: resource {res} is missing"):
            objects += load_yaml_docs(p)
    by_kind_name = {(o.get("kind"), o.get("metadata", {}).get("name")): o for o in objects}
    cm = by_kind_name.get(("ConfigMap", "notify-config"))
    if check(cm is not None, "deploy/k8s: ConfigMap notify-config is missing"):
        for key in cm.get("data") or {}:
            check(key in documented,
                  f"deploy/k8s: ConfigMap key {key} is not documented in .env.example")
        check(str((cm.get("data") or {}).get("WEBHOOK_ALLOW_PRIVATE", "false")).lower() != "true",
              "deploy/k8s: ConfigMap sets WEBHOOK_ALLOW_PRIVATE=true (development only: compose)")
        for secret_key in ("RABBITMQ_URL", "DATABASE_URL", "SMTP_URL", "API_KEYS"):
            check(secret_key not in (cm.get("data") or {}),
                  f"deploy/k8s: {secret_key} belongs in the Secret, not the ConfigMap")
    deployments = [o for o in objects if o.get("kind") == "Deployment"]
    check(len(deployments) >= 2, "deploy/k8s: expected Deployments for api and worker")
    check_worker_probes("deploy/k8s/base", objects)
    for d in deployments:
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        for c in pod.get("containers", []):
            refs = {(k, v.get("name")) for e in c.get("envFrom", []) for k, v in e.items()}
            check(("configMapRef", "notify-config") in refs,
                  f"deploy/k8s: {name}/{c['name']} must envFrom configMap notify-config")
            check(("secretRef", "notify-secrets") in refs,
                  f"deploy/k8s: {name}/{c['name']} must envFrom secret notify-secrets")


@functools.lru_cache(maxsize=None)
def worker_http_port_default() -> int:
    """WORKER_HTTP_PORT's default, read from crates/worker/src/config.rs."""
    src = ROOT / "crates" / "worker" / "src" / "config.rs"
    m = re.search(r'"WORKER_HTTP_PORT",\s*(\d+)u16', src.read_text()) if src.is_file() else None
    if m is None:
        notes.append("WORKER_HTTP_PORT default not found in crates/worker/src/config.rs; assuming 9920")
        return 9920
    return int(m.group(1))


def check_worker_probes(where: str, objects: list) -> None:
    """The worker's liveness (/health) and readiness (/ready) probes and its Prometheus
    annotations must reach the port its listener binds: WORKER_HTTP_PORT from the ConfigMap
    notify-config (or the env of the container), else the code's default."""
    worker = next((o for o in objects if o.get("kind") == "Deployment"
                   and notify_command(container_of(o)) == "notify-worker"), None)
    if not check(worker is not None, f"{where}: no notify-worker Deployment"):
        return
    c = container_of(worker)
    cm = next((o for o in objects if o.get("kind") == "ConfigMap"
               and (o.get("metadata") or {}).get("name") == "notify-config"), None)
    port = str(((cm or {}).get("data") or {}).get("WORKER_HTTP_PORT", worker_http_port_default()))
    for e in c.get("env") or []:
        if e.get("name") == "WORKER_HTTP_PORT" and "value" in e:
            port = str(e["value"])
    named = {p.get("name"): p.get("containerPort") for p in c.get("ports") or [] if p.get("name")}
    declared = {str(p.get("containerPort")) for p in c.get("ports") or []}
    check(port in declared,
          f"{where}: notify-worker listens on {port} (WORKER_HTTP_PORT) but declares containerPorts {sorted(declared)}")
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        if not check(bool(get), f"{where}: notify-worker needs an httpGet {probe} on {path}"):
            continue
        target = str(named.get(get.get("port"), get.get("port")))
        check(target == port,
              f"{where}: notify-worker {probe} goes to port {get.get('port')!r} ({target}), its listener is on {port}")
        check(get.get("path") == path, f"{where}: notify-worker {probe} path is {get.get('path')!r}, expected {path}")
    annotations = ((worker["spec"]["template"].get("metadata") or {}).get("annotations") or {})
    check(str(annotations.get("prometheus.io/scrape")) == "true",
          f"{where}: notify-worker pods need the annotation prometheus.io/scrape: \"true\"")
    check(str(annotations.get("prometheus.io/port")) == port,
          f"{where}: notify-worker's prometheus.io/port is {annotations.get('prometheus.io/port')!r}, its listener is on {port}")


# ------------------------------------------------------------------------- rendered k8s overlays
# What the code names (read, never changed): channel names and how queue names are built.
@functools.lru_cache(maxsize=None)
def channel_names() -> tuple[str, ...]:
    src = ROOT / "crates" / "types" / "src" / "channel.rs"
    text = src.read_text() if src.is_file() else ""
    m = re.search(r"fn as_str\(self\)[^{]*\{(.*?)\n    \}", text, re.S)
    names = re.findall(r'Channel::\w+\s*=>\s*"([a-z0-9_]+)"', m.group(1)) if m else []
    check(bool(names), "crates/types/src/channel.rs: cannot find Channel::as_str's names "
          "(update channel_names() in scripts/check-deploy.py)")
    return tuple(names)


@functools.lru_cache(maxsize=None)
def queue_naming_known() -> bool:
    src = ROOT / "crates" / "types" / "src" / "topology.rs"
    text = src.read_text() if src.is_file() else ""
    m = re.search(r"pub fn queue\(&self, channel: Channel\) -> String \{\s*format!\(\"\{\}\.\{\}\", self\.prefix, channel\)", text)
    return check(m is not None, "crates/types/src/topology.rs: Topology::queue no longer builds `<prefix>.<channel>` "
                 "(update channel_queue() in scripts/check-deploy.py and the KEDA triggers)")


def channel_queue(prefix: str, channel: str) -> str:
    queue_naming_known()
    return f"{prefix}.{channel}"


def default_prefix() -> str:
    src = ROOT / "crates" / "types" / "src" / "config.rs"
    m = re.search(r'"NOTIFY_PREFIX",\s*"([^"]+)"', src.read_text() if src.is_file() else "")
    return m.group(1) if m else "notify"


def pool_sizes() -> tuple[int, int]:
    """PostgreSQL connections per API replica and per worker (the pools' maximums in the code)."""
    api, worker = 8, 32
    s = ROOT / "crates" / "api" / "src" / "startup.rs"
    m = re.search(r"Store::connect_lazy\([^;]*?,\s*(\d+)\s*\)", s.read_text() if s.is_file() else "", re.S)
    if m:
        api = int(m.group(1))
    else:
        notes.append("API pool size not found in crates/api/src/startup.rs; assuming 8")
    s = ROOT / "crates" / "worker" / "src" / "consumer.rs"
    m = re.search(r"Store::connect_lazy\(.*?clamp\(\d+,\s*(\d+)\)", s.read_text() if s.is_file() else "", re.S)
    if m:
        worker = int(m.group(1))
    else:
        notes.append("worker pool size not found in crates/worker/src/consumer.rs; assuming 32")
    return api, worker


def kustomize(path: Path) -> list | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    rel = path.relative_to(ROOT)
    try:
        out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        check(False, f"{rel}: kubectl kustomize failed: {exc}")
        return []
    if not check(out.returncode == 0, f"{rel}: does not render: {out.stderr.strip()[:500]}"):
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_of(deploy: dict) -> dict:
    cs = deploy["spec"]["template"]["spec"].get("containers") or [{}]
    return cs[0]


# Fields of the custom resources used here (their CRDs' top-level spec fields), so a typo fails.
CRD_FIELDS = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): {
        "spec": {"replicas", "image", "imagePullSecrets", "service", "persistence", "resources",
                 "affinity", "tolerations", "rabbitmq", "tls", "override", "skipPostDeploySteps",
                 "terminationGracePeriodSeconds", "delayStartSeconds", "secretBackend",
                 "autoEnableAllFeatureFlags"},
        "spec.rabbitmq": {"additionalConfig", "advancedConfig", "envConfig", "additionalPlugins",
                          "erlangInetConfig"},
        "spec.persistence": {"storageClassName", "storage"},
    },
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "spec": {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                 "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "advanced", "triggers",
                 "fallback"},
        "spec.scaleTargetRef": {"apiVersion", "kind", "name", "envSourceContainerName"},
    },
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "spec": {"secretTargetRef", "env", "hashiCorpVault", "podIdentity", "azureKeyVault",
                 "awsSecretManager", "gcpSecretManager", "configMapTargetRef",
                 "boundServiceAccountToken"},
    },
    ("postgresql.cnpg.io/v1", "Cluster"): {
        "spec": {"description", "inheritedMetadata", "imageName", "imageCatalogRef",
                 "imagePullPolicy", "schedulerName", "postgresUID", "postgresGID", "instances",
                 "minSyncReplicas", "maxSyncReplicas", "postgresql", "replicationSlots",
                 "bootstrap", "replica", "superuserSecret", "enableSuperuserAccess", "certificates",
                 "imagePullSecrets", "storage", "serviceAccountTemplate", "walStorage",
                 "ephemeralVolumeSource", "startDelay", "stopDelay", "smartShutdownTimeout",
                 "switchoverDelay", "failoverDelay", "livenessProbeTimeout", "affinity",
                 "topologySpreadConstraints", "resources", "ephemeralVolumesSizeLimit",
                 "priorityClassName", "primaryUpdateStrategy", "primaryUpdateMethod", "backup",
                 "nodeMaintenanceWindow", "monitoring", "externalClusters", "logLevel",
                 "projectedVolumeTemplate", "env", "envFrom", "managed", "seccompProfile",
                 "tablespaces", "enablePDB", "plugins", "probes", "podSecurityContext",
                 "securityContext"},
        "spec.bootstrap.initdb": {"database", "owner", "secret", "options", "dataChecksums",
                                  "encoding", "localeCollate", "localeCType", "locale",
                                  "localeProvider", "icuLocale", "icuRules", "builtinLocale",
                                  "walSegmentSize", "postInitSQL", "postInitApplicationSQL",
                                  "postInitTemplateSQL", "import", "postInitApplicationSQLRefs",
                                  "postInitTemplateSQLRefs", "postInitSQLRefs"},
        "spec.affinity": {"enablePodAntiAffinity", "topologyKey", "nodeSelector", "nodeAffinity",
                          "tolerations", "podAntiAffinityType", "additionalPodAntiAffinity",
                          "additionalPodAffinity"},
    },
}


def check_crd_fields(where: str, obj: dict) -> bool:
    """True when obj is one of CRD_FIELDS' kinds (then its fields were checked)."""
    fields = CRD_FIELDS.get((obj.get("apiVersion"), obj.get("kind")))
    if fields is None:
        return False
    for path, allowed in fields.items():
        node = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            unknown = sorted(set(node) - allowed)
            check(not unknown, f"{where}: {obj['kind']}/{obj['metadata']['name']}: unknown field(s) "
                  f"{unknown} under {path}")
    return True


SCHEMA = {"validated": 0, "version": None, "skipped": set()}


def schema_check(where: str, objects: list) -> None:
    """Built-in kinds against the Kubernetes OpenAPI schemas of kubernetes-validate (strict)."""
    try:
        import kubernetes_validate as kv  # optional; scripts/test installs it when it can
    except ImportError:
        return
    version = SCHEMA["version"] or kv.latest_version()
    SCHEMA["version"] = version
    for obj in objects:
        if check_crd_fields(where, obj):
            continue
        name = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        try:
            kv.validate(obj, version, strict=True)
            SCHEMA["validated"] += 1
            check(True, "")
        except kv.SchemaNotFoundError:
            SCHEMA["skipped"].add(f"{obj.get('apiVersion')} {obj.get('kind')}")
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            check(False, f"{where}: {name} fails the Kubernetes {version} schema at {path}: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - report, do not crash the other checks
            check(False, f"{where}: {name}: schema validation error: {exc}")


def check_overlay(rel: str, objects: list, kdoc: dict) -> None:
    """Checks of one rendered overlay (kubectl kustomize output)."""
    by_kind: dict[str, list] = {}
    for o in objects:
        by_kind.setdefault(o.get("kind"), []).append(o)
    namespace = kdoc.get("namespace")
    for o in objects:
        check((o.get("metadata") or {}).get("namespace") == namespace,
              f"{rel}: {o.get('kind')}/{o['metadata'].get('name')} is not in namespace {namespace!r}")

    deployments = by_kind.get("Deployment", [])
    api = next((d for d in deployments if notify_command(container_of(d)) == "notify-api"), None)
    worker = next((d for d in deployments if notify_command(container_of(d)) == "notify-worker"), None)
    if not check(api is not None and worker is not None, f"{rel}: needs the notify-api and notify-worker Deployments"):
        return
    for d in (api, worker):
        refs = {(k, v.get("name")) for e in container_of(d).get("envFrom", []) for k, v in e.items()}
        check(("configMapRef", "notify-config") in refs and ("secretRef", "notify-secrets") in refs,
              f"{rel}: {d['metadata']['name']} must keep envFrom notify-config and notify-secrets")
        env = container_of(d).get("env") or []
        defined: set[str] = set()
        for e in env:
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e.get("value", ""))):
                check(ref in defined, f"{rel}: {d['metadata']['name']}: {e['name']} uses $({ref}) "
                      "before it is defined (Kubernetes expands only earlier variables)")
            defined.add(e["name"])
    cm = next((c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"] == "notify-config"), {})
    settings = cm.get("data") or {}

    def env_of(d: dict) -> dict:
        return {e["name"]: e for e in container_of(d).get("env") or []}

    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    scaled = by_kind.get("ScaledObject", [])
    max_api = int(api["spec"].get("replicas", 1))
    max_worker = int(worker["spec"].get("replicas", 1))

    # ---- RabbitMQ cluster (Cluster Operator)
    rmqs = by_kind.get("RabbitmqCluster", [])
    if rel.endswith("/cluster") or rel.endswith("/cluster-ha"):
        check(bool(rmqs) and bool(scaled) and bool(hpas),
              f"{rel}: expected a RabbitmqCluster, a KEDA ScaledObject and an HPA")
    for r in rmqs:
        name, spec = r["metadata"]["name"], r.get("spec") or {}
        check(r.get("apiVersion") == "rabbitmq.com/v1beta1", f"{rel}: RabbitmqCluster apiVersion must be rabbitmq.com/v1beta1")
        check(spec.get("replicas") == 3, f"{rel}: RabbitmqCluster {name} must have replicas: 3 (found {spec.get('replicas')})")
        conf = rabbit_conf((spec.get("rabbitmq") or {}).get("additionalConfig") or "")
        check(conf.get("default_queue_type") == "quorum",
              f"{rel}: RabbitmqCluster {name}: additionalConfig needs default_queue_type = quorum")
        check("rabbitmq_prometheus" in ((spec.get("rabbitmq") or {}).get("additionalPlugins") or []),
              f"{rel}: RabbitmqCluster {name}: additionalPlugins needs rabbitmq_prometheus")
        res = spec.get("resources") or {}
        check(bool((res.get("requests") or {}).get("memory")) and bool((res.get("limits") or {}).get("memory")),
              f"{rel}: RabbitmqCluster {name}: set resources (memory requests and limits)")
        nodes = {f"{name}-server-{i}.{name}-nodes.{namespace}.svc" for i in range(3)}
        secret = f"{name}-default-user"
        urls = {}
        for d in (api, worker):
            dn = d["metadata"]["name"]
            env = env_of(d)
            value = str((env.get("RABBITMQ_URL") or {}).get("value", ""))
            urls[dn] = value
            parsed = amqp_urls(value)
            hosts = [u.hostname for u in parsed]
            check(len(parsed) == 3 and set(hosts) == nodes,
                  f"{rel}: {dn}'s RABBITMQ_URL must list the three nodes {sorted(nodes)}, found {hosts}")
            check(all(u.scheme == "amqp" and (u.port or 5672) == 5672 for u in parsed),
                  f"{rel}: {dn}'s RABBITMQ_URL entries must be amqp://...:5672")
            for ref in set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value)):
                skr = ((env.get(ref) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
                check(skr.get("name") == secret and skr.get("key") in ("username", "password"),
                      f"{rel}: {dn}: $({ref}) in RABBITMQ_URL must come from Secret {secret} (username/password)")
        check(len(set(urls.values())) == 1, f"{rel}: API and worker must get the same RABBITMQ_URL")
        check(any(labels_match((p["spec"].get("selector") or {}).get("matchLabels") or {},
                               {"app.kubernetes.io/name": name}) for p in by_kind.get("PodDisruptionBudget", [])),
              f"{rel}: no PodDisruptionBudget for the RabbitMQ pods (app.kubernetes.io/name: {name})")

    # ---- PodDisruptionBudgets: one per Deployment, selecting exactly its pods
    if rmqs or hpas or scaled:
        for d in (api, worker):
            dn = d["metadata"]["name"]
            tmpl = d["spec"]["template"]["metadata"].get("labels") or {}
            sel = d["spec"]["selector"].get("matchLabels") or {}
            pdbs = [p for p in by_kind.get("PodDisruptionBudget", [])
                    if labels_match((p["spec"].get("selector") or {}).get("matchLabels") or {}, tmpl)]
            if check(len(pdbs) == 1, f"{rel}: expected one PodDisruptionBudget selecting {dn}'s pods, found "
                     f"{[p['metadata']['name'] for p in pdbs]}"):
                pspec = pdbs[0]["spec"]
                psel = pspec["selector"]["matchLabels"]
                check(psel == sel, f"{rel}: PDB {pdbs[0]['metadata']['name']} selector {psel} != {dn}'s selector {sel}")
                others = [o for o in deployments if o is not d and labels_match(psel, o["spec"]["template"]["metadata"].get("labels") or {})]
                check(not others, f"{rel}: PDB {pdbs[0]['metadata']['name']} also selects {[o['metadata']['name'] for o in others]}")
                check(("maxUnavailable" in pspec) != ("minAvailable" in pspec),
                      f"{rel}: PDB {pdbs[0]['metadata']['name']} needs exactly one of maxUnavailable/minAvailable")
                if "minAvailable" in pspec and isinstance(pspec["minAvailable"], int):
                    check(pspec["minAvailable"] < 2, f"{rel}: PDB {pdbs[0]['metadata']['name']}: minAvailable "
                          f"{pspec['minAvailable']} would block every drain at the minimum of 2 replicas")

    # ---- HPA for the API
    for h in hpas:
        ref = h["spec"].get("scaleTargetRef") or {}
        check(h.get("apiVersion") == "autoscaling/v2", f"{rel}: HPA {h['metadata']['name']} must be autoscaling/v2")
        check(ref.get("kind") == "Deployment" and ref.get("name") == api["metadata"]["name"]
              and ref.get("apiVersion") == "apps/v1",
              f"{rel}: HPA {h['metadata']['name']} must target Deployment {api['metadata']['name']} (found {ref})")
        metrics = h["spec"].get("metrics") or []
        check(any(m.get("type") == "Resource" and (m.get("resource") or {}).get("name") == "cpu" for m in metrics),
              f"{rel}: HPA {h['metadata']['name']} must scale on CPU")
        check(bool(((container_of(api).get("resources") or {}).get("requests") or {}).get("cpu")),
              f"{rel}: the API container needs a CPU request for the HPA's utilization target")
        lo, hi = h["spec"].get("minReplicas", 1), h["spec"].get("maxReplicas", 0)
        check(2 <= lo <= hi, f"{rel}: HPA {h['metadata']['name']}: need 2 <= minReplicas <= maxReplicas (found {lo}, {hi})")
        max_api = max(max_api if "replicas" in api["spec"] else 0, hi)
    if hpas:
        check("replicas" not in api["spec"], f"{rel}: {api['metadata']['name']} sets spec.replicas although an HPA owns it")

    # ---- KEDA ScaledObject for the worker
    prefix = settings.get("NOTIFY_PREFIX") or default_prefix()
    enabled = [c.strip().replace("-", "_") for c in str(settings.get("WORKER_CHANNELS") or "").split(",") if c.strip()]
    known = channel_names()
    if enabled:
        check(set(enabled) <= set(known), f"{rel}: WORKER_CHANNELS {enabled} names unknown channels (known: {known})")
    expected_queues = {channel_queue(prefix, c) for c in (enabled or known)}
    auths = {a["metadata"]["name"]: a for a in by_kind.get("TriggerAuthentication", [])}
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    auth_checked: set[str] = set()
    for so in scaled:
        sname, spec = so["metadata"]["name"], so.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        check(ref.get("name") == worker["metadata"]["name"] and ref.get("kind", "Deployment") == "Deployment",
              f"{rel}: ScaledObject {sname} must target Deployment {worker['metadata']['name']} (found {ref})")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        check(isinstance(lo, int) and isinstance(hi, int) and 2 <= lo <= hi,
              f"{rel}: ScaledObject {sname}: need 2 <= minReplicaCount <= maxReplicaCount (found {lo}, {hi})")
        max_worker = max(max_worker if "replicas" in worker["spec"] else 0, hi if isinstance(hi, int) else 100)
        triggers = spec.get("triggers") or []
        queues = [(tr.get("metadata") or {}).get("queueName") for tr in triggers]
        check(all(tr.get("type") == "rabbitmq" for tr in triggers), f"{rel}: ScaledObject {sname}: triggers must be type rabbitmq")
        check(sorted(queues) == sorted(expected_queues),
              f"{rel}: ScaledObject {sname} scales on queues {queues}; the worker consumes {sorted(expected_queues)}")
        for tr in triggers:
            md = tr.get("metadata") or {}
            check(md.get("mode", "QueueLength") == "QueueLength" and str(md.get("value", "")).replace(".", "", 1).isdigit(),
                  f"{rel}: ScaledObject {sname}: trigger {md.get('queueName')} needs mode QueueLength and a numeric value")
            check("host" not in md and "hostFromEnv" not in md,
                  f"{rel}: ScaledObject {sname}: the broker address belongs in the TriggerAuthentication's secret")
            aname = (tr.get("authenticationRef") or {}).get("name")
            auth = auths.get(aname)
            if not check(auth is not None, f"{rel}: ScaledObject {sname}: authenticationRef {aname!r} is no TriggerAuthentication here"):
                continue
            if aname in auth_checked:
                continue
            auth_checked.add(aname)
            params = {x.get("parameter"): x for x in (auth["spec"].get("secretTargetRef") or [])}
            host = params.get("host")
            if check(host is not None, f"{rel}: TriggerAuthentication {aname} must take `host` from a secret"):
                hs = secrets.get(host.get("name"))
                if hs is not None:  # generated here: its URL must point at the RabbitmqCluster
                    raw = (hs.get("stringData") or {}).get(host.get("key"))
                    if raw is None and (hs.get("data") or {}).get(host.get("key")):
                        raw = base64.b64decode(hs["data"][host.get("key")]).decode()
                    u = urlsplit(str(raw or ""))
                    services = [f"{r['metadata']['name']}.{namespace}.svc" for r in rmqs]
                    targets = set(services) | {f"{r['metadata']['name']}-server-{i}.{r['metadata']['name']}-nodes.{namespace}.svc"
                                               for r in rmqs for i in range(3)}
                    check(u.scheme in ("amqp", "amqps", "http", "https") and u.hostname in targets,
                          f"{rel}: Secret {hs['metadata']['name']}: KEDA host {u.scheme}://{u.hostname} is not the "
                          f"RabbitmqCluster's Service in namespace {namespace} ({', '.join(services)})")
                    check(not u.password, f"{rel}: Secret {hs['metadata']['name']}: keep credentials out of the host URL")
            for cred in ("username", "password"):
                if cred in params and rmqs:
                    check(params[cred].get("name") in {f"{r['metadata']['name']}-default-user" for r in rmqs},
                          f"{rel}: TriggerAuthentication {aname}: {cred} must come from the operator's default-user secret")
    if scaled:
        check("replicas" not in worker["spec"], f"{rel}: {worker['metadata']['name']} sets spec.replicas although KEDA owns it")

    # ---- PostgreSQL HA (CloudNativePG)
    pgs = [c for c in by_kind.get("Cluster", []) if str(c.get("apiVersion", "")).startswith("postgresql.cnpg.io/")]
    if rel.endswith("/postgres-ha") or rel.endswith("/cluster-ha"):
        check(bool(pgs), f"{rel}: expected a CloudNativePG Cluster")
    for c in pgs:
        name, spec = c["metadata"]["name"], c.get("spec") or {}
        check(c.get("apiVersion") == "postgresql.cnpg.io/v1", f"{rel}: CloudNativePG Cluster apiVersion must be postgresql.cnpg.io/v1")
        check(spec.get("instances") == 3, f"{rel}: CloudNativePG Cluster {name} must have instances: 3 (found {spec.get('instances')})")
        check(int(spec.get("minSyncReplicas", 0)) >= 1 or bool((spec.get("postgresql") or {}).get("synchronous")),
              f"{rel}: CloudNativePG Cluster {name}: use synchronous replication (a failover must not lose a recorded send)")
        initdb = ((spec.get("bootstrap") or {}).get("initdb") or {})
        check(bool(initdb.get("database")) and bool(initdb.get("owner")),
              f"{rel}: CloudNativePG Cluster {name}: bootstrap.initdb needs database and owner (they make the {name}-app secret)")
        for d in (api, worker):
            skr = ((env_of(d).get("DATABASE_URL") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            check(skr.get("name") == f"{name}-app" and skr.get("key") == "uri",
                  f"{rel}: {d['metadata']['name']}'s DATABASE_URL must come from Secret {name}-app key uri (found {skr})")
        api_pool, worker_pool = pool_sizes()
        need = max_api * api_pool + max_worker * worker_pool
        maxc = int(((spec.get("postgresql") or {}).get("parameters") or {}).get("max_connections", 100))
        check(need < maxc, f"{rel}: up to {max_api} API x {api_pool} + {max_worker} workers x {worker_pool} = {need} "
              f"PostgreSQL connections, but {name} allows max_connections {maxc}")

    schema_check(rel, objects)


def check_k8s_rendered() -> None:
    k8s = ROOT / "deploy" / "k8s"
    if not k8s.is_dir():
        return
    if shutil.which("kubectl") is None:
        notes.append("SKIPPED the rendered k8s checks (overlays, schemas): kubectl is not installed")
        return
    overlays = sorted(p for p in (k8s / "overlays").glob("*") if (p / "kustomization.yaml").is_file())
    names = {p.name for p in overlays}
    check({"cluster", "postgres-ha"} <= names,
          f"deploy/k8s/overlays: expected overlays cluster and postgres-ha (found {sorted(names)})")
    plain = kustomize(k8s)
    if plain:
        schema_check("deploy/k8s", plain)
        check_worker_probes("deploy/k8s", plain)
    for ov in overlays:
        objects = kustomize(ov)
        if objects:
            kdoc = (load_yaml_docs(ov / "kustomization.yaml") or [{}])[0]
            check(bool(kdoc.get("namespace")), f"{ov.relative_to(ROOT)}: set a namespace (the URLs name it)")
            check_overlay(str(ov.relative_to(ROOT)), objects, kdoc)
            check_worker_probes(str(ov.relative_to(ROOT)), objects)


def main() -> int:
    documented = documented_settings()
    check_compose(documented)
    check_dockerfile()
    check_k8s(documented)
    check_k8s_rendered()
    rendered = shutil.which("kubectl") is not None
    for n in notes:
        print(f"check-deploy: note: {n}")
    try:
        import kubernetes_validate  # noqa: F401
        if not rendered:
            raise ImportError
        print(f"check-deploy: schema: {SCHEMA['validated']} rendered objects valid against Kubernetes "
              f"{SCHEMA['version']} (kubernetes-validate, strict); custom resources checked by field "
              f"list: {', '.join(sorted(k for _, k in CRD_FIELDS))}"
              + (f"; no schema for {sorted(SCHEMA['skipped'])}" if SCHEMA["skipped"] else ""))
    except ImportError:
        print("check-deploy: schema: SKIPPED (" + ("Python package kubernetes-validate not installed; "
              "`python3 -m pip install kubernetes-validate`)" if rendered else "nothing rendered without kubectl)"))
    if errors:
        for e in errors:
            print(f"check-deploy: FAIL {e}")
        print(f"check-deploy: {len(errors)} of {checked} checks failed")
        return 1
    print(f"check-deploy: all {checked} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
