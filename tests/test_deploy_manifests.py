"""Static checks of the Kubernetes/KubeRay files in deploy/ (no network, no cluster).

The RayService manifests are validated against KubeRay's RayService CRD schema (reference data
in shared/kuberay/, beside the repository) and their serveConfigV2 against Ray's own Serve
schema; the PodMonitor must match the pod templates and the Dockerfile must stay artifact-free.
The lock-down is checked too: Ray token auth, restricted containers with a writable /tmp, API
keys from a Secret, and a NetworkPolicy that keeps the GCS, dashboard and client ports closed.
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

from freemerge.serving.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

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

# Ports of the head that only the Ray cluster (and, for the dashboard, the KubeRay operator)
# may reach, by the head container's port names.
PROTECTED_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
SERVE_PORT = 8000
METRICS_PORT = 8080
MONITORING_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
API_KEYS_ENV = "FREEMERGE_API_KEYS"
API_KEYS_SECRET = {"name": "freemerge-api-keys", "key": "api-keys"}
ALLOWED_KINDS = {"RayService", "NetworkPolicy"}

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
    """The ModelReplica deployment (the models) of the one application."""
    (app,) = config["applications"]
    models, front = app["deployments"]
    assert (models["name"], front["name"]) == ("ModelReplica", "ClassifierServer")
    return models


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


def pod_specs(service: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head (``head``) and of every worker group."""
    cluster = service["spec"]["rayClusterConfig"]
    found = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    for group in cluster.get("workerGroupSpecs", []):
        found.append((group["groupName"], group["template"]["spec"]))
    return found


def all_containers(service: dict) -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec) of every container that will run in the cluster's pods.

    Containers and init containers of every pod template, plus the autoscaler sidecar that
    KubeRay adds to the head pod from ``autoscalerOptions`` when in-tree autoscaling is on.
    """
    found = []
    for group, spec in pod_specs(service):
        for kind in ("initContainers", "containers"):
            for container in spec.get(kind, []):
                found.append((f"{group}/{container['name']}", container, spec))
    cluster = service["spec"]["rayClusterConfig"]
    if cluster.get("enableInTreeAutoscaling"):
        autoscaler = {"name": "autoscaler", **cluster.get("autoscalerOptions", {})}
        found.append(("head/autoscaler", autoscaler, pod_specs(service)[0][1]))
    return found


def effective_security(container: dict, pod_spec: dict) -> dict:
    """A container's securityContext over its pod's (the fields both levels define)."""
    pod_level = pod_spec.get("securityContext", {})
    shared = ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")
    merged = {key: pod_level[key] for key in shared if key in pod_level}
    merged.update(container.get("securityContext", {}))
    return merged


def env_entry(container: dict, name: str) -> dict | None:
    """The env entry ``name`` of a container, if any."""
    found = [e for e in container.get("env", []) if e["name"] == name]
    assert len(found) <= 1, f"{container['name']}: {name} set twice"
    return found[0] if found else None


def network_policies(name: str) -> list[dict]:
    """The NetworkPolicy documents of deploy/<name>."""
    docs = [d for d in load_documents(DEPLOY / name) if d.get("kind") == "NetworkPolicy"]
    for doc in docs:
        assert doc["apiVersion"] == "networking.k8s.io/v1"
    return docs


def label_selector_matches(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector selects an object with ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def is_empty_selector(selector: dict | None) -> bool:
    """An empty selector ``{}`` selects everything."""
    return not selector or not (selector.get("matchLabels") or selector.get("matchExpressions"))


def policies_selecting(name: str, labels: dict) -> list[dict]:
    """NetworkPolicies of deploy/<name> that restrict ingress to pods carrying ``labels``."""
    return [
        policy
        for policy in network_policies(name)
        if "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
        and label_selector_matches(policy["spec"]["podSelector"], labels)
    ]


def rule_covers(rule: dict, port: int, port_names: dict[str, int]) -> bool:
    """Whether an ingress rule admits TCP ``port`` (no ``ports`` = every port)."""
    ports = rule.get("ports")
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        value = entry.get("port")
        if value is None:
            return True
        if isinstance(value, str):
            value = port_names.get(value)
            if value is None:
                continue
        if value == port or value <= port <= entry.get("endPort", value):
            return True
    return False


def peer_is_open(peer: dict) -> bool:
    """A `from` peer that admits sources outside the Ray cluster wholesale."""
    if "ipBlock" in peer:
        return True
    if "namespaceSelector" in peer:
        return is_empty_selector(peer["namespaceSelector"]) and is_empty_selector(
            peer.get("podSelector")
        )
    return is_empty_selector(peer.get("podSelector"))


def peer_is_ray_cluster(peer: dict, service: dict) -> bool:
    """A peer selecting pods of this namespace that carry the labels of every Ray pod template."""
    selector = peer.get("podSelector")
    if "namespaceSelector" in peer or "ipBlock" in peer or is_empty_selector(selector):
        return False
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return all(
        label_selector_matches(selector, g["template"]["metadata"]["labels"]) for g in templates
    )


def peer_is_operator(peer: dict) -> bool:
    """A peer naming the KubeRay operator's pods in a named namespace."""
    return (
        not is_empty_selector(peer.get("namespaceSelector"))
        and OPERATOR_POD_LABELS.items()
        <= peer.get("podSelector", {}).get("matchLabels", {}).items()
        and "ipBlock" not in peer
    )


def peer_is_whole_cluster(peer: dict) -> bool:
    """``namespaceSelector: {}`` alone: every pod of the Kubernetes cluster, nothing outside."""
    return (
        "namespaceSelector" in peer
        and is_empty_selector(peer["namespaceSelector"])
        and is_empty_selector(peer.get("podSelector"))
        and "ipBlock" not in peer
    )


def peer_is_monitoring(peer: dict) -> bool:
    """The monitoring namespace's pods, by the namespace's name label."""
    return (
        peer.get("namespaceSelector", {}).get("matchLabels") == MONITORING_NAMESPACE
        and "ipBlock" not in peer
    )


def head_port_names(service: dict) -> dict[str, int]:
    """Container port names of the head's Ray container."""
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    return {p["name"]: p["containerPort"] for p in ray_containers(head)[0].get("ports", [])}


def admitting_peers(policies: list[dict], port: int, port_names: dict[str, int]) -> list:
    """The `from` lists of every ingress rule that admits ``port`` (None: a rule with no from)."""
    peers = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if rule_covers(rule, port, port_names):
                peers.append(rule.get("from") or None)
    return peers


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
    """serveConfigV2 is valid for Ray Serve and deploys the models and their front."""
    schema = validate_serve_config(serve_config(name))
    (app,) = schema.applications
    assert [d.name for d in app.deployments] == ["ModelReplica", "ClassifierServer"]


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
    """The model replicas autoscale between sane bounds."""
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


def test_the_cpu_image_compiles_the_fused_kernel_and_keeps_no_compiler():
    """The CPU variant builds serving/lowrank_kernel.cpp into $FREEMERGE_KERNELS with the module's
    own command, after the package is installed, and purges the compiler in the same step."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    assert "ENV FREEMERGE_KERNELS=/opt/freemerge/kernels" in lines
    build = next(i for i, line in enumerate(lines) if "-m freemerge.serving.lowrank_kernel" in line)
    assert any(line.startswith("RUN pip install /tmp/freemerge") for line in lines[:build])
    step = " ".join(lines[build - 4 : build + 4])
    assert '"${VARIANT}" = "cpu"' in step and "install" in step and "g++ ninja-build" in step
    assert "purge -y --auto-remove g++ ninja-build" in step


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_manifest_documents(name):
    """One RayService plus its NetworkPolicy per file; no Secret (no key in the repository)."""
    kinds = [d.get("kind") for d in load_documents(DEPLOY / name)]
    assert kinds.count("RayService") == 1
    assert kinds.count("NetworkPolicy") >= 1
    assert set(kinds) <= ALLOWED_KINDS, f"{name}: unexpected kinds {set(kinds) - ALLOWED_KINDS}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_no_secret_values_in_deploy(path):
    """No YAML file in deploy/ carries a Secret with data: keys and tokens are created in place."""
    for doc in load_documents(path):
        if doc.get("kind") == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{path.name}: Secret data"


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_ray_token_auth_on(name):
    """authOptions.mode is token (KubeRay makes the token Secret and sets the env itself)."""
    service = rayservice(name)
    auth = service["spec"]["rayClusterConfig"].get("authOptions")
    assert auth, f"{name}: no rayClusterConfig.authOptions"
    assert auth.get("mode") == "token"
    # Kubernetes-delegated token auth is unsupported for RayService.
    assert not auth.get("enableK8sTokenAuth")
    # Nothing overrides what KubeRay injects (a RAY_AUTH_MODE=disabled would win).
    for where, container, _ in all_containers(service):
        for variable in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            assert env_entry(container, variable) is None, f"{where} sets {variable}"


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_auth_options_checked_by_strict_schema(name):
    """The strict CRD schema accepts authOptions as written and rejects a wrong mode."""
    schema = crd_schema()
    service = rayservice(name)
    jsonschema.validate(service, schema)
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "Token"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_every_container_is_restricted(name):
    """Every container (init, Ray, autoscaler) is restricted: no privilege escalation, no
    capabilities, read-only root filesystem, RuntimeDefault seccomp (pod level counts), non-root.
    """
    containers = all_containers(rayservice(name))
    assert {where.split("/")[1] for where, _, _ in containers} >= {
        "ray-head",
        "ray-worker",
        "autoscaler",
    }
    for where, container, pod_spec in containers:
        security = effective_security(container, pod_spec)
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("privileged") is not True, where
        capabilities = security.get("capabilities", {})
        assert "ALL" in capabilities.get("drop", []), where
        assert not capabilities.get("add"), where
        assert security.get("readOnlyRootFilesystem") is True, where
        assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert security.get("runAsNonRoot") is True, where


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_read_only_root_has_writable_tmp_and_home(name):
    """With a read-only root, /tmp (Ray's /tmp/ray) and $HOME (caches) lie on emptyDirs."""
    for where, container, pod_spec in all_containers(rayservice(name)):
        empty_dirs = {v["name"] for v in pod_spec.get("volumes", []) if "emptyDir" in v}
        writable = [
            m["mountPath"].rstrip("/")
            for m in container.get("volumeMounts", [])
            if m["name"] in empty_dirs and not m.get("readOnly")
        ]
        assert "/tmp" in writable, f"{where}: /tmp is not a writable emptyDir"
        home = env_entry(container, "HOME")
        assert home and "value" in home, f"{where}: HOME not set to a writable folder"
        assert any(
            home["value"] == path or home["value"].startswith(path + "/") for path in writable
        ), f"{where}: HOME={home['value']} is not on a writable emptyDir"


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_api_keys_come_from_secret(name):
    """FREEMERGE_API_KEYS comes from the Secret in every Ray container (Serve replicas inherit
    the raylet's environment); never a literal value."""
    for group, spec in pod_specs(rayservice(name)):
        for container in spec["containers"]:
            where = f"{group}/{container['name']}"
            entry = env_entry(container, API_KEYS_ENV)
            assert entry, f"{where}: no {API_KEYS_ENV}"
            assert "value" not in entry, f"{where}: {API_KEYS_ENV} has a literal value"
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            assert ref, f"{where}: {API_KEYS_ENV} is not from a secretKeyRef"
            assert {k: ref.get(k) for k in API_KEYS_SECRET} == API_KEYS_SECRET, where
            assert ref.get("optional") is not True, f"{where}: the Secret must not be optional"


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_every_proxy_resends_requests_of_a_lost_front(name):
    """Every Ray container names the proxy middleware (any node may run a proxy), and the
    name imports to Ray's callback."""
    module, _, attribute = PROXY_CALLBACK.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    for group, spec in pod_specs(rayservice(name)):
        for container in spec["containers"]:
            entry = env_entry(container, PROXY_CALLBACK_ENV) or {}
            assert entry.get("value") == PROXY_CALLBACK, f"{group}/{container['name']}"


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_network_policy_closes_head_ports(name):
    """A NetworkPolicy selects the head; GCS, dashboard and client are admitted only from the
    Ray cluster's pods (and the dashboard from the KubeRay operator), never from everyone."""
    service = rayservice(name)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    policies = policies_selecting(name, head["template"]["metadata"]["labels"])
    assert policies, f"{name}: no NetworkPolicy selects the head pod"
    port_names = head_port_names(service)
    for port_name, port in PROTECTED_PORTS.items():
        assert port_names.get(port_name) == port, f"head port {port_name} is not {port}"
        for peers in admitting_peers(policies, port, port_names):
            assert peers is not None, f"{port} is admitted from everyone (empty from)"
            for peer in peers:
                assert not peer_is_open(peer), f"{port} is admitted from {peer}"
                allowed = peer_is_ray_cluster(peer, service) or (
                    port == PROTECTED_PORTS["dashboard"] and peer_is_operator(peer)
                )
                assert allowed, f"{port} is admitted from {peer}"


def ray_pod_groups(service: dict) -> list[dict]:
    """Head group and worker groups (their pod templates carry the labels policies select)."""
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_network_policy_lets_ray_pods_talk(name):
    """Every Ray pod is covered by a policy that admits all ports from the cluster's own pods
    (GCS, raylets, object managers and workers talk on many ports)."""
    service = rayservice(name)
    for group in ray_pod_groups(service):
        policies = policies_selecting(name, group["template"]["metadata"]["labels"])
        assert policies, f"{name}: a pod template is not covered by a NetworkPolicy"
        assert any(
            not rule.get("ports")
            and any(peer_is_ray_cluster(peer, service) for peer in rule.get("from", []))
            for policy in policies
            for rule in policy["spec"].get("ingress", [])
        ), "Ray pods must reach each other on every port"


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_network_policy_serve_and_metrics(name):
    """Serve (8000) is admitted from any pod of the Kubernetes cluster; metrics (8080) only from
    the monitoring namespace (and the Ray cluster itself)."""
    service = rayservice(name)
    port_names = head_port_names(service)
    for group in ray_pod_groups(service):
        policies = policies_selecting(name, group["template"]["metadata"]["labels"])
        serve = admitting_peers(policies, SERVE_PORT, port_names)
        assert any(peers and any(map(peer_is_whole_cluster, peers)) for peers in serve), (
            "Serve (8000) is not admitted from the whole cluster"
        )
        metrics = admitting_peers(policies, METRICS_PORT, port_names)
        assert any(peers and any(map(peer_is_monitoring, peers)) for peers in metrics), (
            "metrics (8080) not admitted from the monitoring namespace"
        )
        for peers in metrics:
            assert peers is not None, "metrics (8080) admitted from everyone"
            for peer in peers:
                assert peer_is_monitoring(peer) or peer_is_ray_cluster(peer, service), (
                    f"metrics (8080) admitted from {peer}"
                )


@pytest.mark.parametrize("name", RAYSERVICE_FILES)
def test_network_policy_admits_operator_to_dashboard(name):
    """The KubeRay operator reaches the head's dashboard (RayService drives Serve through it)."""
    service = rayservice(name)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    policies = policies_selecting(name, head["template"]["metadata"]["labels"])
    dashboard = admitting_peers(policies, PROTECTED_PORTS["dashboard"], head_port_names(service))
    assert any(peers and any(map(peer_is_operator, peers)) for peers in dashboard)
