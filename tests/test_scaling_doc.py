"""docs/SCALING.md stays true: its Kubernetes manifests parse, agree with each other (the
pool selects the Deployment's pods on the daemon's port, objectives and rewrites name the
pool and adapters the example provides, the route reaches the pool through the gateway)
and with the daemon (its port, probes, image and settings)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ollama_compact_server.settings import DEFAULT_PORT, Settings, env_name

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "SCALING.md"
API_VERSIONS = {
    "Secret": "v1",
    "PersistentVolumeClaim": "v1",
    "ConfigMap": "v1",
    "Job": "batch/v1",
    "Deployment": "apps/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "InferencePool": "inference.networking.k8s.io/v1",
    "InferenceObjective": "llm-d.ai/v1alpha2",
    "InferenceModelRewrite": "llm-d.ai/v1alpha2",
    "Gateway": "gateway.networking.k8s.io/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
}


def manifests() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert blocks, "no yaml blocks"
    found = [doc for block in blocks for doc in yaml.safe_load_all(block) if doc is not None]
    for doc in found:
        assert isinstance(doc, dict) and doc.get("kind") and doc.get("apiVersion"), doc
        assert doc["metadata"]["name"], doc
    return found


@pytest.fixture(scope="module")
def kinds() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in manifests():
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def one(kinds: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    assert len(kinds[kind]) == 1, kind
    return kinds[kind][0]


def daemon(kinds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (container,) = one(kinds, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def test_kinds_and_api_versions(kinds: dict[str, list[dict[str, Any]]]) -> None:
    assert set(kinds) == set(API_VERSIONS)
    for kind, docs in kinds.items():
        for doc in docs:
            assert doc["apiVersion"] == API_VERSIONS[kind], (kind, doc["apiVersion"])
        names = [d["metadata"]["name"] for d in docs]
        assert len(names) == len(set(names)), kind


def test_the_pool_selects_the_daemon_on_its_port(kinds: dict[str, list[dict[str, Any]]]) -> None:
    deployment = one(kinds, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pool = one(kinds, "InferencePool")
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items()
    container = daemon(kinds)
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == {DEFAULT_PORT} == {p["number"] for p in pool["spec"]["targetPorts"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["OLLAMA_HOST"]["value"] == f"0.0.0.0:{DEFAULT_PORT}"
    policy = one(kinds, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [
        DEFAULT_PORT
    ]


def test_probes_hit_health_and_ready(kinds: dict[str, list[dict[str, Any]]]) -> None:
    container = daemon(kinds)
    live = container["livenessProbe"]["httpGet"]
    assert live["path"] == "/health" and live["port"] == DEFAULT_PORT
    # /ready needs the key: the image's health check script sends it
    script = (REPO / "docker" / "healthcheck.py").read_text()
    assert "/ready" in script and "OCS_API_KEY" in script
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["exec"]["command"] == ["python", "/healthcheck.py"], probe
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY docker/healthcheck.py /healthcheck.py" in dockerfile


def test_the_image_is_the_cuda_target(kinds: dict[str, list[dict[str, Any]]]) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    cuda = compose["services"]["ollama-compact-cuda"]
    assert cuda["build"]["target"] == "cuda"
    assert daemon(kinds)["image"] == cuda["image"]
    job = one(kinds, "Job")["spec"]["template"]["spec"]
    assert [c["image"] for c in job["containers"]] == [cuda["image"]]
    assert "FROM runtime AS cuda" in (REPO / "Dockerfile").read_text()


def test_env_vars_are_settings(kinds: dict[str, list[dict[str, Any]]]) -> None:
    known = {env_name(field) for field in Settings.model_fields}
    container = daemon(kinds)
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names))
    for name in names:
        assert name in known, f"{name} is no setting"
    field_of = {env_name(field): field for field in Settings.model_fields}
    values = {field_of[e["name"]]: e["value"] for e in container["env"] if "value" in e}
    settings = Settings(**values)  # every value valid, as the daemon would read it
    assert settings.address.port == DEFAULT_PORT
    # the EPP scrapes without a key; a non-loopback bind needs one
    assert settings.public_metrics and settings.runtime_lora
    assert "OCS_API_KEY" in names and "OCS_INSECURE_NO_AUTH" not in names
    secret = one(kinds, "Secret")
    key_ref = next(e for e in container["env"] if e["name"] == "OCS_API_KEY")
    ref = key_ref["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # the mounts are where the settings point
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OCS_MODELS"] in mounts and env["OCS_ADAPTERS"] in mounts


def test_volumes_name_the_claim(kinds: dict[str, list[dict[str, Any]]]) -> None:
    claim = one(kinds, "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for kind in ("Deployment", "Job"):
        spec = one(kinds, kind)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in volumes.values()
            if "persistentVolumeClaim" in v
        ]
        assert claims == [claim["metadata"]["name"]], kind
        for container in spec["containers"]:
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, (kind, mount)


def test_objectives_and_rewrites_name_the_pool_and_real_adapters(
    kinds: dict[str, list[dict[str, Any]]],
) -> None:
    adapters = set(one(kinds, "ConfigMap")["data"])
    assert adapters
    pool = one(kinds, "InferencePool")["metadata"]["name"]
    base = Settings().default_model  # the example's base: the default model
    base_objective = base.replace(":", "-").replace(".", "-")
    objectives = set()
    for objective in kinds["InferenceObjective"]:
        ref = objective["spec"]["poolRef"]
        assert ref["name"] == pool and ref["group"] == "inference.networking.k8s.io"
        assert isinstance(objective["spec"]["priority"], int)
        objectives.add(objective["metadata"]["name"])
    assert objectives == adapters | {base_objective}
    for rewrite in kinds["InferenceModelRewrite"]:
        assert rewrite["spec"]["poolRef"]["name"] == pool
        for rule in rewrite["spec"]["rules"]:
            targets = [t["modelRewrite"] for t in rule["targets"]]
            assert set(targets) <= adapters, targets
            assert sum(t["weight"] for t in rule["targets"]) == 100
    # the Job fetches every adapter the ConfigMap lists into the adapters folder
    job = one(kinds, "Job")["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for c in job["containers"] for m in c["volumeMounts"]}
    assert "/data/adapters" in mounts and "/etc/ocs-adapters" in mounts
    config_maps = [v["configMap"]["name"] for v in job["volumes"] if "configMap" in v]
    assert config_maps == [one(kinds, "ConfigMap")["metadata"]["name"]]


def test_the_route_reaches_the_pool(kinds: dict[str, list[dict[str, Any]]]) -> None:
    gateway = one(kinds, "Gateway")
    route = one(kinds, "HTTPRoute")
    listeners = {listener["name"] for listener in gateway["spec"]["listeners"]}
    for parent in route["spec"]["parentRefs"]:
        assert parent["name"] == gateway["metadata"]["name"]
        assert parent.get("sectionName", next(iter(listeners))) in listeners
    pool = one(kinds, "InferencePool")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends and all(
        b["kind"] == "InferencePool"
        and b["group"] == "inference.networking.k8s.io"
        and b["name"] == pool["metadata"]["name"]
        for b in backends
    )
    paths = [m["path"]["value"] for rule in route["spec"]["rules"] for m in rule["matches"]]
    assert "/v1" in paths
    epp = pool["spec"]["endpointPickerRef"]
    assert epp["name"] and epp["port"]["number"] > 0
