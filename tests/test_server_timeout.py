"""End to end on a local Ray: a request with no answer within the request timeout gets a 503
with Retry-After (its own server: one local Ray at a time)."""

from live_server import live_server, post_status

from freemerge.benchmarks.loadgen import call


def test_a_request_without_an_answer_in_time_gets_503_with_retry_after(tiny_routed_artifact):
    options = {"artifact": str(tiny_routed_artifact), "device": "cpu", "request_timeout_s": 0.001}
    with live_server(options) as (url, _):
        status, retry = post_status(
            f"{url}/v1/classify", {"task": "sms_spam", "inputs": ["hello"]}, key=None
        )
        assert (status, retry) == (503, "1")
        status, answer = call(f"{url}/v1/classify", {"task": "sms_spam", "inputs": ["hello"]})
        assert status == 503 and "no answer within 0.001 s" in answer["error"]
