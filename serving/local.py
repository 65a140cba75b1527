"""Run the app on an embedded local Ray (no cluster): ``freemerge serve`` / ``serve-separate``."""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

import ray
from ray import serve

from freemerge.serving.app import build_app

APP_NAME = "freemerge"


def free_port() -> int:
    """A TCP port on the loopback that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_local(
    options: dict[str, Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    metrics_port: int = 8080,
    num_cpus: int | None = None,
    metrics_interval_ms: int | None = None,
) -> None:
    """Start Ray (no dashboard) with its metrics export on ``metrics_port``, then deploy."""
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
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name=APP_NAME, route_prefix="/")


def stop_local() -> None:
    serve.shutdown()
    ray.shutdown()


def serve_until_signalled(options: dict[str, Any], host: str, port: int, metrics_port: int) -> int:
    """Deploy, print where it listens, and shut down cleanly on Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    start_local(options, host, port, metrics_port)
    print(f"freemerge is serving on http://{host}:{port} (OpenAPI page: /docs)", flush=True)
    print(f"Prometheus metrics on http://127.0.0.1:{metrics_port}/metrics", flush=True)
    print("Ctrl-C or SIGTERM stops it.", flush=True)
    try:
        stop.wait()
    finally:
        print("shutting down", flush=True)
        stop_local()
    return 0
