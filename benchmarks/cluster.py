"""A real two-node Ray cluster on this machine, for ``freemerge bench faults --full``.

A head and a worker node are started with ``ray start`` (loopback only, each with its own
ports), the app is deployed with ``serve deploy`` from ``deploy/serve_config.yaml`` (the
artifact, ports and replica counts filled in), and the worker node is killed under load: its
raylet gets ``kill -9``, which takes the node's workers with it. A replacement worker node is
started at once, as Kubernetes would start a new pod. Ray's token auth is on, with a fresh
token that every ``ray`` and ``serve`` command of the bench gets through its environment.
``ray stop --force`` ends the cluster, and with it every Ray process on this machine.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from freemerge.benchmarks.faults import kill_under_load, load_spec, pids_matching
from freemerge.benchmarks.loadgen import call
from freemerge.serving.local import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
HEAD_RESOURCE = "freemerge_head"  # the fronts stay on the head, beside its proxy
_worker_ports = itertools.count(20_000, 250)  # each node's 200 worker ports, apart


def _tool(name: str) -> str:
    """Ray's ``ray`` or ``serve`` command: beside this Python, else on the PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def cluster_env() -> dict[str, str]:
    """This environment with Ray's token auth on and a fresh token."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _ray(env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [_tool("ray"), *args], capture_output=True, text=True, timeout=180, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"ray {args[0]} failed: {done.stderr.strip()[-500:]}")


def start_node(env: dict[str, str], head_port: int | None, cpus: int) -> dict:
    """``ray start`` of a head (``head_port`` None) or of a worker joining it; its ports."""
    ports = {name: free_port() for name in ("node_manager", "object_manager", "metrics")}
    ports |= {"agent_grpc": free_port(), "agent_http": free_port(), "runtime_env": free_port()}
    workers = next(_worker_ports)  # below the ephemeral ports free_port() hands out
    common = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 200}",
    ]
    if head_port is None:
        ports |= {"gcs": free_port(), "dashboard": free_port()}
        _ray(
            env,
            "start",
            "--head",
            f"--port={ports['gcs']}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}",
            f'--resources={{"{HEAD_RESOURCE}": 100}}',
            *common,
        )
    else:
        _ray(env, "start", f"--address=127.0.0.1:{head_port}", *common)
    return ports


def raylet_pid(node_manager_port: int) -> int:
    """The PID of the raylet listening on ``node_manager_port``."""
    pids = pids_matching("raylet", f"--node_manager_port={node_manager_port}")
    if not pids:
        raise RuntimeError(f"no raylet on node manager port {node_manager_port}")
    return pids[0]


def cluster_config(artifact: Path, http_port: int, replicas: int) -> dict:
    """``deploy/serve_config.yaml`` for this cluster: the artifact, a proxy on the head only
    (every node shares 127.0.0.1), ``replicas`` model replicas of one CPU, fronts on the head."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    (app,) = config["applications"]
    app["args"] = {**app["args"], "artifact": str(artifact), "device": "cpu"}
    app["args"]["cpus_per_replica"] = 1
    models, front = app["deployments"]
    for deployment in (models, front):
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = replicas
    models["ray_actor_options"] = {"num_cpus": 1}
    front["ray_actor_options"] = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 1}}
    return config


def running_models(env: dict[str, str], dashboard: int) -> int:
    """RUNNING model replicas, from ``serve status``."""
    out = subprocess.run(
        [_tool("serve"), "status", f"--address=http://127.0.0.1:{dashboard}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    ).stdout
    try:
        status = yaml.safe_load(out) or {}
        deployments = status["applications"]["freemerge"]["deployments"]
        return int(deployments["ModelReplica"]["replica_states"].get("RUNNING", 0))
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        return 0


def wait_until(check: Callable[[], bool], seconds: float) -> float | None:
    """Seconds until ``check()`` is true (polled), or None after ``seconds``."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if check():
            return time.perf_counter() - start
        time.sleep(0.5)
    return None


def deploy(env: dict[str, str], config: dict, dashboard: int) -> None:
    """``serve deploy`` of ``config`` through the head's dashboard."""
    with tempfile.TemporaryDirectory(prefix="freemerge-cluster-") as scratch:
        path = Path(scratch) / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run(
            [_tool("serve"), "deploy", str(path), f"--address=http://127.0.0.1:{dashboard}"],
            check=True,
            capture_output=True,
            timeout=120,
            env=env,
        )


def node_kill(
    artifact: Path, bodies: list[dict], clients: int = 16, seconds: float = 45.0, replicas: int = 2
) -> dict:
    """Deploy on a head and a worker node, kill the worker node a third into closed-loop
    load, start a replacement: failed requests, and seconds until ``replicas`` run again."""
    env = cluster_env()
    head = start_node(env, None, cpus=1)
    try:
        worker = start_node(env, head["gcs"], cpus=1)
        http_port = free_port()
        deploy(env, cluster_config(artifact, http_port, replicas), head["dashboard"])
        url = f"http://127.0.0.1:{http_port}"

        def serving() -> bool:
            ready = call(url + "/readyz", timeout=5)[0] == 200
            return ready and running_models(env, head["dashboard"]) >= replicas

        if wait_until(serving, 300) is None:
            raise RuntimeError("the app did not start on the two-node cluster within 300 s")

        def kill() -> None:
            os.kill(raylet_pid(worker["node_manager"]), signal.SIGKILL)
            start_node(env, head["gcs"], cpus=1)  # the replacement node, as a new pod would be

        spec = load_spec(url, bodies, concurrency=clients, requests=100_000, max_seconds=seconds)
        return kill_under_load(spec, kill, serving, seconds * 4, poll_s=0.5)
    finally:
        subprocess.run([_tool("ray"), "stop", "--force"], capture_output=True, timeout=180, env=env)
