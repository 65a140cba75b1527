"""End to end: the separate-models baseline through Ray Serve model multiplexing."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import live_server

from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.loadgen import call
from freemerge.serving.app import build_app
from freemerge.serving.engine import SeparateEngine
from freemerge.serving.metrics import counter_total, scrape_until
from freemerge.serving.requests import ClassifyRequest, StageTimings

TASKS = ["sms_spam", "bbc_topic", "debate_party"]


@pytest.fixture(scope="module")
def server(tiny_zoo):
    with live_server(
        {
            "zoo": str(tiny_zoo.root),
            "models_per_replica": 1,
            "device": "cpu",
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.01,
        }
    ) as urls:
        yield urls


@pytest.fixture(scope="module")
def texts():
    return {task: [t[:800] for t in task_texts(task, "test")[0][:3]] for task in TASKS}


def test_multiplexed_answers_equal_the_all_loaded_models(server, tiny_zoo, texts):
    url, _ = server
    bodies = [{"task": task, "inputs": texts[task][i : i + 2]} for i in (0, 1) for task in TASKS]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda body: call(f"{url}/v1/classify", body), bodies * 2))
    engine = SeparateEngine(tiny_zoo.root, "cpu")
    for body, (status, reply) in zip(bodies * 2, replies, strict=True):
        assert status == 200, reply
        alone = engine.classify_requests(
            [ClassifyRequest(body["task"], body["inputs"], 0.0)], StageTimings()
        )[0]
        assert [r["label"] for r in reply["results"]] == [a.label for a in alone]
        for result, answer in zip(reply["results"], alone, strict=True):
            assert result["task"] == body["task"]
            assert list(result["scores"].values()) == pytest.approx(
                list(answer.scores.values()), abs=1e-5
            )
    status, reply = call(f"{url}/v1/classify", {"task": "imdb", "inputs": ["x"]})
    assert status == 404 and "sms_spam" in reply["error"]
    status, reply = call(f"{url}/v1/classify", {"inputs": ["x"]})
    assert status == 400 and "need a `task`" in reply["error"]


def test_one_model_per_replica_reloads_and_holds_one_model(server, tiny_zoo, texts):
    url, metrics_url = server
    for task in TASKS * 2:  # each request evicts the previous task's model
        assert call(f"{url}/v1/classify", {"task": task, "inputs": texts[task][:1]})[0] == 200
    status, ready = call(f"{url}/readyz")
    assert status == 200
    last = SeparateEngine(tiny_zoo.root, "cpu", tasks=[TASKS[-1]]).memory()  # loaded last
    assert ready["memory"]["backbone_bytes"] == last["backbone_bytes"]
    families = scrape_until(
        metrics_url, lambda f: counter_total(f, "ray_freemerge_model_loads") >= 6, wait_s=60
    )
    loads = counter_total(families, "ray_freemerge_model_loads")
    assert loads >= 6  # at least one load per request above
    status, info = call(f"{url}/v1/tasks")
    assert sorted(t["task"] for t in info["tasks"]) == sorted(TASKS)


def test_multiplexing_needs_a_zoo_and_a_positive_count(tiny_routed_artifact, tiny_zoo):
    with pytest.raises(ValueError, match="models_per_replica"):
        build_app({"artifact": str(tiny_routed_artifact), "models_per_replica": 2})
    with pytest.raises(ValueError, match="models_per_replica"):
        build_app({"zoo": str(tiny_zoo.root), "models_per_replica": 0})
