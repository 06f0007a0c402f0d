#!/usr/bin/env python3
"""Static checks of the deploy files; needs only python3 and PyYAML.

    python3 scripts/check-deploy.py [REPO_ROOT]

Checks docker-compose.yml (the stack a developer starts), deploy/Dockerfile and, when present,
deploy/k8s/ against what the design asks of them, plus that every setting the deploy files
pass to the binaries is documented in .env.example. Prints one line per failed check and exits
1 if any failed, else prints a summary and exits 0.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

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
    for name in ("api", "worker"):
        for var in sorted(env_names(svc(name).get("environment"))):
            check(var in documented,
                  f"docker-compose.yml: {name} sets {var}, which .env.example does not document")


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
    base = ROOT / "deploy" / "k8s"
    if not base.is_dir():
        return
    kust = base / "kustomization.yaml"
    if not check(kust.is_file(), "deploy/k8s/kustomization.yaml is missing"):
        return
    kdoc = (load_yaml_docs(kust) or [{}])[0]
    resources = kdoc.get("resources") or []
    check("namespace" not in kdoc, "deploy/k8s/kustomization.yaml: the base sets no namespace")
    check(not any("secret.example" in r for r in resources),
          "deploy/k8s: secret.example.yaml must not be a kustomize resource")
    objects = []
    for res in resources:
        p = base / res
        if check(p.is_file(), f"deploy/k8s: resource {res} is missing"):
            objects += load_yaml_docs(p)
    by_kind_name = {(o.get("kind"), o.get("metadata", {}).get("name")): o for o in objects}
    cm = by_kind_name.get(("ConfigMap", "notify-config"))
    if check(cm is not None, "deploy/k8s: ConfigMap notify-config is missing"):
        for key in cm.get("data") or {}:
            check(key in documented,
                  f"deploy/k8s: ConfigMap key {key} is not documented in .env.example")
        for secret_key in ("RABBITMQ_URL", "DATABASE_URL", "SMTP_URL", "API_KEYS"):
            check(secret_key not in (cm.get("data") or {}),
                  f"deploy/k8s: {secret_key} belongs in the Secret, not the ConfigMap")
    deployments = [o for o in objects if o.get("kind") == "Deployment"]
    check(len(deployments) >= 2, "deploy/k8s: expected Deployments for api and worker")
    for d in deployments:
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        for c in pod.get("containers", []):
            refs = {(k, v.get("name")) for e in c.get("envFrom", []) for k, v in e.items()}
            check(("configMapRef", "notify-config") in refs,
                  f"deploy/k8s: {name}/{c['name']} must envFrom configMap notify-config")
            check(("secretRef", "notify-secrets") in refs,
                  f"deploy/k8s: {name}/{c['name']} must envFrom secret notify-secrets")


def main() -> int:
    documented = documented_settings()
    check_compose(documented)
    check_dockerfile()
    check_k8s(documented)
    if errors:
        for e in errors:
            print(f"check-deploy: FAIL {e}")
        print(f"check-deploy: {len(errors)} of {checked} checks failed")
        return 1
    print(f"check-deploy: all {checked} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
