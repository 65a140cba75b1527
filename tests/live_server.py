"""A server on a local Ray for end-to-end tests."""

from collections.abc import Iterator
from contextlib import contextmanager

from freemerge.serving.local import free_port, start_local, stop_local


@contextmanager
def live_server(options: dict) -> Iterator[tuple[str, str]]:
    """The app on 2 CPUs with metrics exported every 0.5 s: (base URL, metrics URL)."""
    port, metrics_port = free_port(), free_port()
    start_local(options, port=port, metrics_port=metrics_port, num_cpus=2, metrics_interval_ms=500)
    try:
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        stop_local()
