"""A real two-node Ray cluster (`ray start`, `serve deploy` of deploy/serve_config.yaml, token
auth on) whose worker node is killed under load: no request fails. Slow (`make test-all`), and
it ends with `ray stop --force`, which stops every Ray process on the machine."""

import pytest

from freemerge.benchmarks.cluster import node_kill


@pytest.mark.slow
def test_a_killed_worker_node_costs_no_request(tiny_routed_artifact):
    bodies = [{"task": t, "inputs": ["win a free prize now"]} for t in ("sms_spam", "bbc_topic")]
    result = node_kill(tiny_routed_artifact, bodies, clients=8, seconds=30)
    assert result["requests"] > 50, result
    assert result["failed"] == 0, result
    assert result["seconds_until_replicas_back"] is not None, result
