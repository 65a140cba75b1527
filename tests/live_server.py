"""A server on a local Ray for end-to-end tests."""

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from freemerge.serving.local import free_port, start_local, stop_local
from freemerge.serving.settings import API_KEYS_ENV, DEFAULT_INGRESS, INGRESSES

# Each ingress as a fixture's parameter: the default in `make test`, the others marked slow (a
# server each, behind the same scenarios; `make test-all` runs them)
INGRESS_PARAMS = [
    pytest.param(name, marks=() if name == DEFAULT_INGRESS else pytest.mark.slow)
    for name in INGRESSES
]


@contextmanager
def live_server(
    options: dict,
    api_keys: tuple[str, ...] = (),
    from_config: bool = False,
    ingress: str = DEFAULT_INGRESS,
) -> Iterator[tuple[str, str]]:
    """The app on 2 CPUs with metrics exported every 0.5 s: (base URL, metrics URL). With
    ``api_keys``, they are in the environment the local Ray's replicas inherit; with
    ``from_config``, deployed as a config (so that a later deploy can update it in place);
    ``ingress``: what takes the HTTP port (``start_local``'s)."""
    before = os.environ.get(API_KEYS_ENV)
    if api_keys:
        os.environ[API_KEYS_ENV] = ",".join(api_keys)
    try:
        with _started(options, from_config, ingress) as urls:
            yield urls
    finally:
        if before is None:
            os.environ.pop(API_KEYS_ENV, None)
        else:
            os.environ[API_KEYS_ENV] = before


@contextmanager
def _started(options: dict, from_config: bool, ingress: str) -> Iterator[tuple[str, str]]:
    port, metrics_port = free_port(), free_port()
    start_local(
        options,
        port=port,
        metrics_port=metrics_port,
        num_cpus=2,
        metrics_interval_ms=500,
        from_config=from_config,
        ingress=ingress,
    )
    try:
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        stop_local()


def bearer(key: str) -> dict[str, str]:
    """The header that carries an API key."""
    return {"Authorization": f"Bearer {key}"}


def post_status(url: str, body: dict, key: str | None) -> tuple[int, str | None]:
    """(status, Retry-After header) of one classify request (``key`` None: no key)."""
    headers = {"content-type": "application/json", **(bearer(key) if key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("Retry-After")
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Retry-After")
