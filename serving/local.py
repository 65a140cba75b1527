"""Run the app on an embedded local Ray (no cluster): ``freemerge serve`` / ``serve-separate``.

Stopping leaves no process behind. ``ray.shutdown()`` alone does not promise that: it ends
the processes the driver started (GCS, raylet, ...) and counts on the raylet to end its
own children (agents, workers). When the raylet dies abruptly instead, its DashboardAgent
and RuntimeEnvAgent block their event loops reporting that to the dead GCS (a call with a
60 s timeout), and so do not act on SIGTERM for a minute. So :func:`stop_local` also ends,
SIGTERM then SIGKILL, whatever Ray started that outlived ``ray.shutdown()``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import ray
from ray import serve
from ray.serve.context import _get_global_client  # what `serve run CONFIG.yaml` deploys with
from ray.serve.schema import ServeDeploySchema

from freemerge.serving.app import build_app
from freemerge.serving.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV, PROXY_LIMIT_ENV
from freemerge.serving.settings import DEFAULT_INGRESS, INGRESSES, ServingOptions

APP_NAME = "freemerge"
STOP_GRACE_S = 5.0  # between SIGTERM and SIGKILL for a process that outlived ray.shutdown()
STOP_DEADLINE_S = 45.0  # for the whole shutdown of `freemerge serve`; past it, kill the rest
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"

# This process's children from before Ray started (not Ray's to end), and the processes
# Ray had started by the end of ray.init(): set by _start_ray, read by stop_local.
_not_ray: set[psutil.Process] = set()
_ray_started: list[psutil.Process] = []


# Ports free_port picks from: above Ray's worker ports (10002-19999) and below the ephemeral
# range, where the OS puts every outgoing connection's local port and every listener bound to
# port 0 (Ray starts dozens), so that none of them takes a picked port before its server binds.
PICKED_PORTS = (20000, 32768)
_picked: set[int] = set()


def free_port() -> int:
    """A TCP port on the loopback that is free now and was not picked before in this process,
    from :data:`PICKED_PORTS` (below the ephemeral range; any free port when that range starts
    lower)."""
    low, high = PICKED_PORTS[0], min(PICKED_PORTS[1], _ephemeral_start())
    for port in random.sample(range(low, high), min(256, max(0, high - low))):
        if port not in _picked and _bindable(port):
            _picked.add(port)
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return PICKED_PORTS[1]


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_local(
    options: dict[str, Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    metrics_port: int = 8080,
    num_cpus: int | None = None,
    metrics_interval_ms: int | None = None,
    from_config: bool = False,
    ingress: str = DEFAULT_INGRESS,
) -> None:
    """Start Ray (no dashboard) with its metrics export on ``metrics_port``, then deploy: the
    app object through ``serve.run`` (fast: built here), or with ``from_config`` as a config
    (:func:`deploy_app`), which later deploys can update in place. ``ingress``: one of
    :data:`INGRESSES`.

    If starting fails (or is interrupted), what was started is stopped (:func:`stop_local`)
    before the error propagates.
    """
    try:
        _start_ray(options, metrics_port, num_cpus, metrics_interval_ms, ingress)
        _deploy(options, host, port, from_config)
    except BaseException:
        stop_local()
        raise


def _proxy_environment(options: ServingOptions, ingress: str) -> None:
    """What Ray's proxy reads when it starts (Ray's processes inherit this environment): our
    middleware, the room of the fronts it serves (``--max-queued-requests`` each), and the
    ingress (:func:`haproxy_environment`, or Ray's proxy alone)."""
    if ingress not in INGRESSES:
        raise ValueError(f"unknown ingress {ingress!r}; allowed: {', '.join(INGRESSES)}")
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    os.environ[PROXY_LIMIT_ENV] = str(options.max_queued_requests * options.fronts)
    os.environ.update(haproxy_environment() if ingress == "haproxy" else {HAPROXY_FLAG: "0"})


def haproxy_environment() -> dict[str, str]:
    """Ray Serve's HAProxy ingress, as a local server runs it. HAProxy holds the HTTP port and
    each front replica serves HTTP on a port of its own; Ray's proxy stays behind HAProxy as
    the fallback while no front is up. Every route is idempotent, so a request whose front died
    before answering goes to another front, or to that fallback, which waits for a new one. Our
    middleware (``serving/proxy.py``), which Ray wraps around each front's own HTTP server too,
    checks the API key and the room there, before Ray's replica machinery."""
    return {
        HAPROXY_FLAG: "1",
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response response-timeout",
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",
        # Ray's per-request HTTP metrics come from a log line per request, parsed in Python;
        # freemerge_requests_total (counted by the fronts) stays.
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        # A stopping front stays reachable this long for HAProxy to drop it (Ray's default, 30
        # s, is for HAProxy on other nodes; here it runs beside the fronts).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
        # HAProxy's stats and Prometheus pages (Ray binds them to all interfaces).
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def _start_ray(
    options: dict[str, Any],
    metrics_port: int,
    num_cpus: int | None,
    metrics_interval_ms: int | None,
    ingress: str,
) -> None:
    global _not_ray, _ray_started
    _not_ray = set(psutil.Process().children())
    _proxy_environment(ServingOptions.from_mapping(dict(options)), ingress)
    system_config = (
        {"metrics_report_interval_ms": metrics_interval_ms} if metrics_interval_ms else {}
    )
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config=system_config,
        log_to_driver=False,
        configure_logging=False,
    )
    _ray_started = _ray_processes()


def _deploy(options: dict[str, Any], host: str, port: int, from_config: bool) -> None:
    serve.start(http_options={"host": host, "port": port})
    if from_config:
        deploy_app(options)
    else:
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")


def deploy_app(
    options: dict[str, Any], artifact: str | dict | None = None, timeout_s: float = 600.0
) -> None:
    """Deploy (or deploy again) the app on the running local Serve from a config, as
    ``serve run CONFIG.yaml`` and ``serve deploy`` do, and wait until it runs. ``artifact``
    (a folder, or ``{"artifact": folder, "expect_version": hex}``) goes into both deployments'
    ``user_config``, as in ``deploy/serve_config.yaml``: deployed again with only that changed,
    the running replicas move to that artifact version without a restart (a change of the app's
    ``args`` restarts them)."""
    app: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": f"{build_app.__module__}:{build_app.__name__}",
        "args": {k: v for k, v in options.items() if v is not None},
    }
    if artifact is not None:
        user_config = artifact if isinstance(artifact, dict) else {"artifact": str(artifact)}
        app["deployments"] = [
            {"name": name, "user_config": user_config}
            for name in ("ModelReplica", "ClassifierServer")
        ]
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = status.status if status else None
        deployments = status.deployments.values() if status else []
        if state == "RUNNING" and all(d.status == "HEALTHY" for d in deployments):
            return
        if state == "DEPLOY_FAILED" or time.monotonic() > deadline:
            message = status.message if status else "no status"
            raise RuntimeError(f"deploying the app failed ({state}): {message}")
        time.sleep(0.5)


def _ray_processes() -> list[psutil.Process]:
    """This process's descendants, except children it had before Ray started and theirs."""
    found = []
    for child in psutil.Process().children():
        if child in _not_ray:
            continue
        try:
            found += [child, *child.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return found


def _ray_tree() -> set[psutil.Process]:
    """Every process Ray started that can still be found: those recorded when it started too."""
    return {*_ray_started, *_ray_processes()}


def stop_local() -> None:
    """Shut down Serve and Ray, then end every process Ray started that outlived them.

    Those get SIGTERM, and SIGKILL after ``STOP_GRACE_S`` if still there; this returns once
    they are gone.
    """
    leftovers = _ray_tree()
    try:
        with _worker_logs_quiet():
            try:
                if ray.is_initialized():  # serve.shutdown() would otherwise start a Ray
                    serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        _end(leftovers, STOP_GRACE_S)
        _ray_started.clear()


@contextmanager
def _worker_logs_quiet() -> Iterator[None]:
    """Stop printing the workers' logs on this console while Ray stops (they stay in Ray's log
    folder): when Serve stops, Ray reports its controller's shutdown task as failed
    ("graceful_shutdown failed ... killed by `ray.kill`"), which reads as an error and is
    none. The switch is the one Ray itself flips while a debugger is attached."""
    try:
        from ray._private import worker  # no public switch once Ray has started
    except ImportError:  # another Ray: its logs are printed, nothing else changes
        yield
        return
    before = getattr(worker, "_worker_logs_enabled", True)
    worker._worker_logs_enabled = False
    try:
        yield
    finally:
        worker._worker_logs_enabled = before


def _end(processes: Iterable[psutil.Process], grace_s: float) -> None:
    """SIGTERM the living ``processes``, then SIGKILL those still there after ``grace_s``."""
    living = still_running(processes)
    if grace_s > 0:
        living = _wait_gone(_signal_each(living, signal.SIGTERM), grace_s)
    living = _wait_gone(_signal_each(living, signal.SIGKILL), 5.0)
    if living:
        print(f"freemerge: could not end processes {[p.pid for p in living]}", file=sys.stderr)


def still_running(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (a zombie has exited; its PID is not reused)."""
    living = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                living.append(process)
        except psutil.Error:
            pass
    return living


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for ``processes`` to exit; those still running."""
    deadline = time.monotonic() + timeout_s
    while (living := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return living


def _signal_each(processes: Iterable[psutil.Process], sig: int) -> list[psutil.Process]:
    """Send ``sig`` to each process that is still the one recorded; those it reached."""
    reached = []
    for process in processes:
        try:
            process.send_signal(sig)  # psutil checks the PID was not reused
            reached.append(process)
        except psutil.Error:
            pass  # gone already (or never ours)
    return reached


def _on_stop_signals(handler: Callable[[int, Any], None]) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def serve_until_signalled(
    options: dict[str, Any], host: str, port: int, metrics_port: int, ingress: str = DEFAULT_INGRESS
) -> int:
    """Deploy (``ingress``: one of :data:`INGRESSES`), print where it listens, and serve until
    Ctrl-C or SIGTERM; then stop cleanly.

    Either signal, while starting or serving, stops everything (:func:`stop_local`) and
    returns 0 (a SIGTERM while ``ray.init()`` itself runs meets Ray's handler instead: the
    same stop, then ``SystemExit(15)``); an error while starting stops everything too, then
    propagates. A second signal while stopping, or a stop that takes more than
    ``STOP_DEADLINE_S``, kills what is left and ends the process at once (:func:`os._exit`)
    with status 128 + the signal's number, or 1 past the deadline.
    """
    _on_stop_signals(_interrupt)
    try:
        _start_ray(options, metrics_port, None, None, ingress)
        # ray.init() installs its own SIGTERM handlers: sys.exit(15), behind Ray's crash
        # handler, which aborts the process (SIGABRT) 3 s later, in the middle of stopping.
        _on_stop_signals(_interrupt)
        _deploy(options, host, port, from_config=False)
        print(f"freemerge is serving on http://{host}:{port} (OpenAPI page: /docs)", flush=True)
        print(f"Prometheus metrics on http://127.0.0.1:{metrics_port}/metrics", flush=True)
        print("Ctrl-C or SIGTERM stops it.", flush=True)
        threading.Event().wait()  # until a stop signal raises KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    finally:
        _stop_within_deadline()
    return 0


def _stop_within_deadline() -> None:
    """:func:`stop_local`, cut short by a second stop signal or after ``STOP_DEADLINE_S``."""
    tree = _ray_tree()  # now, while the raylet's children are still found under it
    _on_stop_signals(lambda signum, _: _kill_all_and_exit(tree, 128 + signum))
    if hasattr(signal, "alarm"):
        signal.alarm(0)  # the abort Ray's crash handler arms on a SIGTERM that came before ours
    print("shutting down", flush=True)
    watchdog = threading.Timer(STOP_DEADLINE_S, _kill_all_and_exit, args=(tree, 1))
    watchdog.daemon = True
    watchdog.start()
    try:
        stop_local()
    finally:
        watchdog.cancel()


def _kill_all_and_exit(tree: set[psutil.Process], status: int) -> None:
    print("freemerge: stopping now: killing what is left", file=sys.stderr, flush=True)
    _end(tree | _ray_tree(), grace_s=0)
    sys.stdout.flush()
    os._exit(status)
