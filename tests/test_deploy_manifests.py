"""Static checks of the Kubernetes/KubeRay files in deploy/ (no network, no cluster).

The RayService manifests are validated against KubeRay's RayService CRD schema (reference data
in shared/kuberay/, beside the repository) and their serveConfigV2 against Ray's own Serve
schema; the PodMonitor must match the pod templates and the Dockerfile must stay artifact-free.
"""

import copy
import importlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMA_NAME = "rayservice.schema.strict.json"
SCHEMA_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared" / "kuberay" / SCHEMA_NAME,
    Path("/work/shared/kuberay") / SCHEMA_NAME,
)
GPU_FILE = "rayservice.yaml"
CPU_FILE = "rayservice-cpu.yaml"
RAYSERVICE_FILES = (GPU_FILE, CPU_FILE)
ARTIFACT_CLAIM = "freemerge-artifacts"
ARTIFACT_MOUNT = "/models/freemerge"
AUTOSCALING_KEYS = (
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
)

YAML_FILES = sorted(p for p in DEPLOY.iterdir() if p.suffix in (".yaml", ".yml"))


def load_documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rayservice(name: str) -> dict:
    """The single RayService document of deploy/<name>."""
    docs = [d for d in load_documents(DEPLOY / name) if d.get("kind") == "RayService"]
    assert len(docs) == 1, f"{name}: expected one RayService, found {len(docs)}"
    return docs[0]


def serve_config(name: str) -> dict:
    """serveConfigV2 of a RayService file, parsed."""
    text = rayservice(name)["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string block"
    config = yaml.safe_load(text)
    assert isinstance(config, dict)
    return config


def validate_serve_config(config: dict) -> ServeDeploySchema:
    """Ray's own validation of a multi-application Serve config."""
    if hasattr(ServeDeploySchema, "model_validate"):
        return ServeDeploySchema.model_validate(config)
    return ServeDeploySchema.parse_obj(config)  # pragma: no cover - pydantic v1


def the_deployment(config: dict) -> dict:
    """The ClassifierServer deployment of the one application."""
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    assert deployment["name"] == "ClassifierServer"
    return deployment


def groups(service: dict) -> list[dict]:
    """Head group followed by the worker groups of a RayService."""
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


def worker_group(service: dict, name: str) -> dict:
    """The worker group called ``name``."""
    found = [
        g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == name
    ]
    assert found, f"no worker group {name!r}"
    return found[0]


def ray_containers(group: dict) -> list[dict]:
    """The containers of a group's pod template."""
    return group["template"]["spec"]["containers"]


def crd_schema() -> dict:
    """KubeRay's strict RayService schema, or skip when the reference data is not around."""
    for path in SCHEMA_CANDIDATES:
        if path.is_file():
            return json.loads(path.read_text())
    pytest.skip(
        f"KubeRay RayService schema not found (looked in {', '.join(map(str, SCHEMA_CANDIDATES))})"
    )


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_file_parses(path):
    """Each YAML file in deploy/ parses to at least one mapping."""
    docs = load_documents(path)
    assert docs, f"{path.name} is empty"
    assert all(isinstance(d, dict) for d in docs)


def test_expected_files_exist():
    """The deploy folder has the manifests, the Dockerfile and the README."""
    names = {p.name for p in DEPLOY.iterdir()}
    assert {*RAYSERVICE_FILES, "podmonitor.yaml", "Dockerfile", "README.md"} <= names


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_rayservice_kind_and_version(name):
    """apiVersion ray.io/v1, kind RayService, Ray 2.60.0 in-tree autoscaling."""
    service = rayservice(name)
    assert service["apiVersion"] == "ray.io/v1"
    assert service["kind"] == "RayService"
    assert service["metadata"]["name"] == "freemerge"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_rayservice_validates_against_crd_schema(name):
    """Each RayService document passes KubeRay's strict CRD schema."""
    schema = crd_schema()
    for doc in load_documents(DEPLOY / name):
        if doc.get("kind") == "RayService":
            jsonschema.validate(doc, schema)


def test_crd_schema_rejects_unknown_fields():
    """Sanity check of the check: a misspelt field fails the strict schema."""
    schema = crd_schema()
    broken = copy.deepcopy(rayservice(GPU_FILE))
    head = broken["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParamz"] = head.pop("rayStartParams")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_serve_config_validates_with_ray_schema(name):
    """serveConfigV2 is valid for Ray Serve and deploys ClassifierServer."""
    schema = validate_serve_config(serve_config(name))
    (app,) = schema.applications
    assert [d.name for d in app.deployments] == ["ClassifierServer"]


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_import_paths_import_and_build(name):
    """Every import_path imports, and its builder builds an app from the given args."""
    for app in serve_config(name)["applications"]:
        module, _, attribute = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attribute)
        assert callable(builder)
        if app["import_path"] == "freemerge.serving.app:build_app":
            assert isinstance(builder(app["args"]), Application)


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_autoscaling_config(name):
    """ClassifierServer autoscales between sane bounds."""
    autoscaling = the_deployment(serve_config(name))["autoscaling_config"]
    for key in AUTOSCALING_KEYS:
        assert key in autoscaling, f"autoscaling_config lacks {key}"
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    assert autoscaling["target_ongoing_requests"] > 0
    assert autoscaling["upscale_delay_s"] < autoscaling["downscale_delay_s"]


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_replica_threads_match_reserved_cpus(name):
    """cpus_per_replica (torch threads) equals the CPUs Ray reserves for a replica."""
    config = serve_config(name)
    (app,) = config["applications"]
    actor = the_deployment(config)["ray_actor_options"]
    assert app["args"]["cpus_per_replica"] == actor["num_cpus"]


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_artifact_comes_from_read_only_claim(name):
    """The artifact path lies on the PVC, mounted read-only in every Ray container."""
    config = serve_config(name)
    (app,) = config["applications"]
    assert app["args"]["artifact"].startswith(ARTIFACT_MOUNT + "/")
    for group in groups(rayservice(name)):
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        for container in ray_containers(group):
            mounts = [m for m in container["volumeMounts"] if m["mountPath"] == ARTIFACT_MOUNT]
            assert len(mounts) == 1, f"{container['name']} does not mount {ARTIFACT_MOUNT}"
            assert mounts[0].get("readOnly") is True
            claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
            assert claim["claimName"] == ARTIFACT_CLAIM


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_ports_and_metrics_export(name):
    """Serve's HTTP port is the containers' `serve` port; metrics go out on `metrics` (8080)."""
    service = rayservice(name)
    http_port = serve_config(name)["http_options"]["port"]
    for group in groups(service):
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        for container in ray_containers(group):
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["serve"] == http_port
            assert ports["metrics"] == 8080
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-gpus"] == "0"


def test_gpu_manifest_asks_for_gpus():
    """GPU file: one GPU per replica, and the GPU workers request and limit nvidia.com/gpu."""
    config = serve_config(GPU_FILE)
    (app,) = config["applications"]
    assert app["args"]["device"] == "cuda"
    deployment = the_deployment(config)
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    group = worker_group(rayservice(GPU_FILE), "gpu-workers")
    # One GPU per pod and per replica: enough pods for the most replicas.
    assert group["maxReplicas"] >= deployment["autoscaling_config"]["max_replicas"]
    for container in ray_containers(group):
        assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == 1
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    spec = group["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_cpu_manifest_has_no_gpus():
    """CPU file: device cpu, no GPU per replica, no nvidia.com/gpu anywhere, :cpu image."""
    config = serve_config(CPU_FILE)
    (app,) = config["applications"]
    assert app["args"]["device"] == "cpu"
    assert the_deployment(config)["ray_actor_options"].get("num_gpus", 0) == 0
    service = rayservice(CPU_FILE)
    worker_group(service, "cpu-workers")
    assert "nvidia.com/gpu" not in json.dumps(service["spec"]["rayClusterConfig"])
    for group in groups(service):
        for container in ray_containers(group):
            assert container["image"].endswith(":cpu")


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_podmonitor_matches_pod_templates(name):
    """The PodMonitor selects labels every pod template carries and scrapes a defined port."""
    (monitor,) = load_documents(DEPLOY / "podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert {e["path"] for e in endpoints} == {"/metrics"}
    assert {e["interval"] for e in endpoints} == {"15s"}
    for group in groups(rayservice(name)):
        labels = group["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        port_names = {p["name"] for c in ray_containers(group) for p in c.get("ports", [])}
        for endpoint in endpoints:
            assert endpoint["port"] in port_names


def test_dockerfile_is_parametrised_non_root_and_artifact_free():
    """ARG VARIANT picks the build; the image runs as a non-root user and copies no models."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    assert any(re.match(r"ARG VARIANT\b", line) for line in lines)
    users = [line.split(None, 1)[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER line"
    assert users[-1].split(":")[0] not in ("root", "0")
    copies = [line for line in lines if line.startswith(("COPY ", "ADD "))]
    assert copies
    for line in copies:
        assert not re.search(r"\b(artifacts?|models?|exported)\b", line, re.IGNORECASE), line
