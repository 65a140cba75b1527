"""End to end: Ray Serve on the CPU with a tiny artifact, over HTTP, and the metrics port."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import live_server

from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.loadgen import call
from freemerge.merging.artifact import open_artifact
from freemerge.serving.engine import MergedEngine
from freemerge.serving.metrics import scrape_until
from freemerge.serving.requests import ClassifyRequest, StageTimings


@pytest.fixture(scope="module")
def artifact(tiny_routed_artifact):
    return tiny_routed_artifact


@pytest.fixture(scope="module")
def server(artifact):
    with live_server(
        {
            "artifact": str(artifact),
            "device": "cpu",
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.01,
            "max_items": 8,
            "max_chars": 5000,
        }
    ) as urls:
        yield urls


@pytest.fixture(scope="module")
def texts():
    return {
        task: [t[:1500] for t in task_texts(task, "test")[0][:4]]
        for task in ("sms_spam", "bbc_topic", "debate_party")
    }


def test_tagged_and_untagged_requests(server, artifact, texts):
    url, _ = server
    status, body = call(f"{url}/v1/classify", {"task": "sms_spam", "inputs": texts["sms_spam"]})
    assert status == 200
    assert body["artifact_version"] == open_artifact(artifact).version
    assert [r["task"] for r in body["results"]] == ["sms_spam"] * 4
    assert all(not r["routed"] and r["label"] in ("ham", "spam") for r in body["results"])
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-4 for r in body["results"])
    status, body = call(f"{url}/v1/classify", {"task": None, "inputs": texts["bbc_topic"]})
    assert status == 200 and all(
        r["routed"] and r["router_confidence"] > 0 for r in body["results"]
    )


def test_concurrent_mixed_requests_get_the_answers_they_would_get_alone(server, artifact, texts):
    url, _ = server
    bodies = []
    for i in range(24):
        task = [None, "sms_spam", "bbc_topic", "debate_party"][i % 4]
        source = texts[["bbc_topic", "sms_spam", "bbc_topic", "debate_party"][i % 4]]
        bodies.append({"task": task, "inputs": source[: 1 + i % 4]})
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda b: call(f"{url}/v1/classify", b), bodies))
    engine = MergedEngine(artifact, "cpu")
    for body, (status, reply) in zip(bodies, replies, strict=True):
        assert status == 200
        alone = engine.classify_requests(
            [ClassifyRequest(body["task"], body["inputs"], 0.0)], StageTimings()
        )[0]
        for got, want in zip(reply["results"], alone, strict=True):
            assert (got["task"], got["label"], got["routed"]) == (
                want.task,
                want.label,
                want.routed,
            )
            assert got["scores"] == pytest.approx(want.scores, abs=1e-4)


@pytest.mark.parametrize(
    "payload, status, message",
    [
        (b"{not json", 400, "invalid request"),
        (json.dumps({"task": "sms_spam"}).encode(), 400, "inputs: Field required"),
        (json.dumps({"task": "sms_spam", "inputs": []}).encode(), 400, "at least 1 item"),
        (json.dumps({"task": "sms_spam", "inputs": ["ok", 7]}).encode(), 400, "inputs.1"),
        (
            json.dumps({"task": "sms_spam", "inputs": ["x"] * 9}).encode(),
            413,
            "9 inputs, more than the limit of 8",
        ),
        (
            json.dumps({"task": "sms_spam", "inputs": ["x" * 5001]}).encode(),
            413,
            "more than the limit of 5000",
        ),
        (
            json.dumps({"task": "imdb", "inputs": ["x"]}).encode(),
            404,
            "known tasks: bbc_topic, debate_party",
        ),
        (json.dumps({"Task": "sms_spam", "inputs": ["x"]}).encode(), 400, "Task: Extra inputs"),
        (
            json.dumps({"task": "sms_spam", "inputs": ["ok", "\ud800"]}).encode(),
            400,
            "input 1 is not valid Unicode text",
        ),
        (json.dumps({"task": "t" * 10_000, "inputs": ["x"]}).encode(), 400, "at most 200"),
        (json.dumps({"inputs": [1] * 4000}).encode(), 400, "(and 7997 more)"),  # str or pair, each
        (json.dumps({"inputs": [1] * 200_000}).encode(), 413, "at most 4096 items"),
        (b"[" * 50_000 + b"]" * 50_000, 400, "error parsing the body"),
        (b"x" * (3 * 1024 * 1024), 413, "larger than the limit of 2097152 bytes"),
        (b'{"task": "sms_spam", "inputs": ["\xff\xfe"]}', 400, "error parsing the body"),
    ],
)
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(server, payload, status, message):
    url, _ = server
    got, body = call(f"{url}/v1/classify", raw=payload)
    assert got == status and message in body["error"]
    assert call(f"{url}/v1/classify", {"task": "sms_spam", "inputs": ["still there?"]})[0] == 200


@pytest.mark.parametrize(
    "path, body, status",
    [("/nowhere", None, 404), ("/v1/classify", None, 405), ("/v1/tasks", {"x": 1}, 405)],
)
def test_unknown_routes_and_wrong_methods_get_json_errors(server, path, body, status):
    url, _ = server
    got, answer = call(f"{url}{path}", body)
    assert got == status and isinstance(answer, dict) and set(answer) == {"error"}


def test_long_text_is_truncated_and_marked(server):
    url, _ = server
    status, body = call(
        f"{url}/v1/classify", {"task": "bbc_topic", "inputs": ["news " * 390, "short"]}
    )
    assert status == 200 and [r["truncated"] for r in body["results"]] == [True, False]


def test_info_endpoints_and_openapi(server):
    url, _ = server
    status, tasks = call(f"{url}/v1/tasks")
    assert status == 200 and tasks["router"] is True
    assert {t["task"] for t in tasks["tasks"]} == {"sms_spam", "bbc_topic", "debate_party"}
    assert all(t["expert_kind"] == "lowrank" and t["expert_bytes"] > 0 for t in tasks["tasks"])
    assert call(f"{url}/healthz") == (200, {"status": "ok"})
    status, ready = call(f"{url}/readyz")
    assert status == 200 and ready["ready"] and ready["memory"]["backbone_bytes"] > 0
    status, spec = call(f"{url}/openapi.json")
    assert status == 200 and "/v1/classify" in spec["paths"]
    assert "inputs" in spec["components"]["schemas"]["ClassifyBody"]["properties"]


EXPECTED_METRICS = {
    "ray_freemerge_requests": "counter",
    "ray_freemerge_request_latency_seconds": "histogram",
    "ray_freemerge_stage_latency_seconds": "histogram",
    "ray_freemerge_batch_size": "histogram",
    "ray_freemerge_expert_hits": "counter",
    "ray_freemerge_expert_misses": "counter",
    "ray_freemerge_expert_tier_bytes": "gauge",
    "ray_freemerge_expert_fetch_seconds": "histogram",
    "ray_freemerge_routed": "counter",
    "ray_freemerge_tokens": "counter",
    "ray_freemerge_router_confidence": "histogram",
    "ray_freemerge_process_resident_bytes": "gauge",
    "ray_freemerge_device_allocated_bytes": "gauge",
    "ray_freemerge_backbone_bytes": "gauge",
    "ray_freemerge_resident_expert_bytes": "gauge",
}


FETCH_SECONDS = "ray_freemerge_expert_fetch_seconds"


def labels_of(families, name, label):
    return {s.labels.get(label) for s in families[name].samples} if name in families else set()


def test_metrics_appear_on_the_metrics_port(server, texts):
    url, metrics_url = server
    call(f"{url}/v1/classify", {"inputs": texts["debate_party"]})
    call(f"{url}/v1/classify", {"task": "imdb", "inputs": ["x"]})

    def complete(families):
        return (
            {n: families[n].type for n in EXPECTED_METRICS if n in families} == EXPECTED_METRICS
            and {"queue", "route", "forward", "expert_apply"}
            <= labels_of(families, "ray_freemerge_stage_latency_seconds", "stage")
            and {"200", "404"} <= labels_of(families, "ray_freemerge_requests", "status")
            and {"disk", "host"} <= labels_of(families, FETCH_SECONDS, "tier")
        )

    families = scrape_until(metrics_url, complete, wait_s=60)
    assert {n: families[n].type for n in EXPECTED_METRICS if n in families} == EXPECTED_METRICS
    stages = labels_of(families, "ray_freemerge_stage_latency_seconds", "stage")
    assert {"queue", "route", "forward", "expert_apply"} <= stages
    assert {"200", "404"} <= labels_of(families, "ray_freemerge_requests", "status")
    kinds = labels_of(families, "ray_freemerge_tokens", "kind")
    assert kinds == {"single_label_classification"}  # the artifact's one kind, no task names
    tasks = labels_of(families, "ray_freemerge_requests", "task")
    assert "unknown" in tasks and "imdb" not in tasks  # invented names share one label
    backbone = [s.value for s in families["ray_freemerge_backbone_bytes"].samples]
    assert backbone and backbone[0] > 0
    # the routed request's expert was read from disk, then put on the device
    assert {"disk", "host"} <= labels_of(families, FETCH_SECONDS, "tier")
    held = {s.labels["tier"]: s.value for s in families["ray_freemerge_expert_tier_bytes"].samples}
    assert held["host"] > 0 and held["device"] > 0 and held["disk"] > held["host"]


def test_candidates_and_abstention_over_http(server, artifact, texts):
    url, _ = server
    classify = f"{url}/v1/classify"
    inputs = texts["bbc_topic"][:2] + texts["sms_spam"][:2]
    status, body = call(classify, {"inputs": inputs, "candidates": ["sms_spam", "debate_party"]})
    assert status == 200
    assert all(r["routed"] and r["task"] in ("sms_spam", "debate_party") for r in body["results"])
    confidence = [r.confidence for r in MergedEngine(artifact, "cpu").model.route(inputs)]
    assert min(confidence) < max(confidence)
    threshold = (min(confidence) + max(confidence)) / 2
    status, body = call(classify, {"inputs": inputs, "min_confidence": threshold})
    assert status == 422 and "could not choose a task" in body["error"]
    low = [i for i, c in enumerate(confidence) if c < threshold]
    assert [entry["input"] for entry in body["unrouted"]] == low
    for entry in body["unrouted"]:
        shares = [c["probability"] for c in entry["candidates"]]
        assert len(shares) == 3 and shares == sorted(shares, reverse=True)
        assert shares[0] == pytest.approx(confidence[entry["input"]], abs=1e-3)
    tagged = {"task": "sms_spam", "inputs": inputs, "min_confidence": 1.0}
    assert call(classify, tagged)[0] == 200  # a tagged request is never refused for confidence
    refused = [
        ({"task": "sms_spam", "inputs": inputs, "candidates": ["bbc_topic"]}, 400, "not both"),
        ({"inputs": inputs, "candidates": ["imdb"]}, 404, "unknown candidate task 'imdb'"),
        ({"inputs": inputs, "candidates": []}, 400, "candidates"),
        ({"inputs": inputs, "min_confidence": 1.5}, 400, "min_confidence"),
    ]
    for request, code, message in refused:
        status, body = call(classify, request)
        assert (status, message in body["error"]) == (code, True), body
