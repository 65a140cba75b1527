"""End to end on a local Ray, behind either ingress (Ray's proxy, or Ray Serve's HAProxy): API
keys, the replica's request limit and readiness, over HTTP."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import INGRESS_PARAMS, bearer, live_server, post_status

from freemerge.benchmarks.loadgen import call

KEYS = ("first-key", "second-key")


@pytest.fixture(scope="module", params=INGRESS_PARAMS)
def keyed_server(request, tiny_routed_artifact):
    """Two API keys, a limit of two requests held per replica and a 20 s request timeout."""
    options = {
        "artifact": str(tiny_routed_artifact),
        "device": "cpu",
        "max_queued_requests": 2,
        "request_timeout_s": 20,
    }
    with live_server(options, api_keys=KEYS, ingress=request.param) as urls:
        yield urls[0]


def test_v1_routes_need_a_key_and_probes_do_not(keyed_server):
    body = {"task": "sms_spam", "inputs": ["win a prize now"]}
    status, answer = call(f"{keyed_server}/v1/classify", body)
    assert status == 401 and "Bearer" in answer["error"]
    assert call(f"{keyed_server}/v1/classify", body, headers=bearer("wrong"))[0] == 401
    assert call(f"{keyed_server}/v1/tasks")[0] == 401
    for key in KEYS:
        assert call(f"{keyed_server}/v1/classify", body, headers=bearer(key))[0] == 200
    assert call(f"{keyed_server}/v1/tasks", headers=bearer(KEYS[1]))[0] == 200
    assert call(f"{keyed_server}/healthz") == (200, {"status": "ok"})
    assert call(f"{keyed_server}/-/healthz")[0] == 200  # Ray's own probe (HAProxy checks it)
    status, ready = call(f"{keyed_server}/readyz")
    assert status == 200 and ready["ready"] is True


def test_openapi_documents_the_bearer_scheme(keyed_server):
    status, spec = call(f"{keyed_server}/openapi.json")
    assert status == 200
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/classify"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_requests_beyond_the_replica_limit_are_refused_with_retry_after(keyed_server):
    body = {"task": "bbc_topic", "inputs": ["markets fell sharply " * 200] * 64}
    with ThreadPoolExecutor(12) as pool:
        answers = list(
            pool.map(lambda _: post_status(f"{keyed_server}/v1/classify", body, KEYS[0]), range(12))
        )
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    assert all(retry == "1" for status, retry in answers if status == 503)
