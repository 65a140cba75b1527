"""A server on a local Ray for end-to-end tests, and ``call`` for HTTP requests to it."""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from serving.local import free_port, start_local, stop_local


def call(url: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a POST with ``body`` (or ``raw`` bytes), or a GET without."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextmanager
def live_server(options: dict) -> Iterator[tuple[str, str]]:
    """The app on 2 CPUs with metrics exported every 0.5 s: (base URL, metrics URL)."""
    port, metrics_port = free_port(), free_port()
    start_local(options, port=port, metrics_port=metrics_port, num_cpus=2, metrics_interval_ms=500)
    try:
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        stop_local()
