"""The drop-in APIs against a running server of every task kind (tests/tiny_kinds.py), with
an API key: the real ``huggingface_hub`` and ``openai`` clients, and TEI's and vLLM's shapes
over plain HTTP. Every answer equals the native ``/v1/classify`` or ``/v1/embed`` one."""

import base64
import math
import time
import urllib.request

import numpy as np
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from live_server import bearer, live_server
from tiny_kinds import PAIRS, TEXTS

from freemerge.benchmarks.loadgen import call
from freemerge.serving.openai_api import encoded

KEY = "dropin-key"
LONG = " ".join(["the people came back from work"] * 20)  # past the tiny models' 64 tokens
SIMILAR = {"source_sentence": "a", "sentences": ["b"]}


@pytest.fixture(scope="module")
def server(kinds):
    with live_server({"artifact": str(kinds["artifact"]), "device": "cpu"}, (KEY,)) as urls:
        yield urls


def post(url: str, body: dict, key: str | None = KEY) -> tuple[int, object]:
    return call(url, body, headers=bearer(key) if key else None)


def native(url: str, route: str, body: dict) -> list[dict]:
    status, answer = post(f"{url}{route}", body)
    assert status == 200, answer
    return answer["results"] if route == "/v1/classify" else answer["embeddings"]


def ranked(scores: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda item: -item[1])


def assert_ranked(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [label for label, _ in got] == [label for label, _ in want]
    assert [score for _, score in got] == pytest.approx([score for _, score in want])


def test_huggingface_hub_client(server):
    url = server[0]
    topic = InferenceClient(base_url=f"{url}/tasks/topic", api_key=KEY)
    want = native(url, "/v1/classify", {"task": "topic", "inputs": TEXTS[:1]})[0]["scores"]
    got = topic.text_classification(TEXTS[0], top_k=2)
    assert_ranked([(e.label, e.score) for e in got], ranked(want)[:2])
    raw = topic.text_classification(TEXTS[0], function_to_apply="none")
    exp = {e.label: math.exp(e.score) for e in raw}
    assert {k: v / sum(exp.values()) for k, v in exp.items()} == pytest.approx(want, abs=1e-5)

    tagger = InferenceClient(base_url=f"{url}/tasks/ner", api_key=KEY)
    want = native(url, "/v1/classify", {"task": "ner", "inputs": TEXTS[:1]})[0]["entities"]
    got = tagger.token_classification(TEXTS[0])
    assert want and [(e.entity_group, e.start, e.end, e.word) for e in got] == [
        (e["label"], e["start"], e["end"], e["text"]) for e in want
    ]
    assert [e.score for e in got] == pytest.approx([e["score"] for e in want])

    embedder = InferenceClient(base_url=f"{url}/tasks/emb", api_key=KEY)
    want = np.array(native(url, "/v1/embed", {"task": "emb", "inputs": TEXTS}))
    assert np.allclose(embedder.feature_extraction(TEXTS), want, atol=1e-6)
    assert embedder.feature_extraction(TEXTS[0]).shape == (1, want.shape[1])
    similar = embedder.sentence_similarity(TEXTS[0], other_sentences=TEXTS[1:])
    assert similar == pytest.approx((want[1:] @ want[0]).tolist(), abs=1e-5)

    with pytest.raises(HfHubHTTPError) as refused:
        InferenceClient(base_url=f"{url}/tasks/nope", api_key=KEY).text_classification("x")
    assert refused.value.response.status_code == 404
    assert refused.value.response.json()["error_type"] == "Validation"


def test_openai_client(server):
    url = server[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"topic", "tags", "rating", "rerank", "ner", "emb"}
    assert models["emb"].kind == "embedding" and models["emb"].owned_by == "freemerge"
    assert client.models.retrieve("ner").kind == "token_classification"
    want = np.array(native(url, "/v1/embed", {"task": "emb", "inputs": TEXTS}))
    default = client.embeddings.create(model="emb", input=TEXTS)  # sent as base64
    floats = client.embeddings.create(model="emb", input=TEXTS, encoding_format="float")
    for answer in (default, floats):
        assert [d.index for d in answer.data] == list(range(len(TEXTS)))
        assert np.allclose([d.embedding for d in answer.data], want, atol=1e-6)
        assert answer.model == "emb" and answer.usage.total_tokens > len(TEXTS)
    one = client.embeddings.create(model="emb", input=TEXTS[0])
    assert np.allclose(one.data[0].embedding, want[0], atol=1e-6)

    with pytest.raises(openai.NotFoundError) as unknown:
        client.embeddings.create(model="nope", input="x")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError) as wrong:
        client.embeddings.create(model="topic", input="x")
    assert "/classify" in wrong.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_tei_routes(server):
    url = f"{server[0]}/tasks"
    want = native(server[0], "/v1/classify", {"task": "topic", "inputs": TEXTS[:2] + PAIRS[:1]})
    status, one = post(f"{url}/topic/predict", {"inputs": TEXTS[0]})
    assert status == 200
    assert_ranked([(e["label"], e["score"]) for e in one], ranked(want[0]["scores"]))
    status, pair = post(f"{url}/topic/predict", {"inputs": PAIRS[0]})  # a pair, not a batch
    assert {e["label"]: e["score"] for e in pair} == pytest.approx(want[2]["scores"])
    status, batch = post(f"{url}/topic/predict", {"inputs": [[TEXTS[0]], [TEXTS[1]], PAIRS[0]]})
    for row, expected in zip(batch, want, strict=True):
        assert {e["label"]: e["score"] for e in row} == pytest.approx(expected["scores"])
    status, raw = post(f"{url}/topic/predict", {"inputs": TEXTS[0], "raw_scores": True})
    exp = {e["label"]: math.exp(e["score"]) for e in raw}
    assert {k: v / sum(exp.values()) for k, v in exp.items()} == pytest.approx(want[0]["scores"])

    vectors = native(server[0], "/v1/embed", {"task": "emb", "inputs": TEXTS, "normalize": False})
    status, embedded = post(f"{url}/emb/embed", {"inputs": TEXTS[0], "normalize": False})
    assert status == 200 and np.allclose(embedded, vectors[:1], atol=1e-6)  # [[...]] for one
    status, similar = post(
        f"{url}/emb/similarity",
        {"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}},
    )
    unit = np.array(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert status == 200 and similar == pytest.approx((unit[1:] @ unit[0]).tolist(), abs=1e-5)

    docs = ["the water is down there", "no", "a good day"]
    scores = native(
        server[0], "/v1/classify", {"task": "rerank", "inputs": [[TEXTS[2], d] for d in docs]}
    )
    status, reranked = post(f"{url}/rerank/rerank", {"query": TEXTS[2], "texts": docs})
    order = sorted(range(3), key=lambda i: -scores[i]["score"])
    assert status == 200 and [r["index"] for r in reranked] == order
    assert [r["score"] for r in reranked] == pytest.approx([scores[i]["score"] for i in order])
    assert "text" not in reranked[0]
    _, with_text = post(
        f"{url}/rerank/rerank", {"query": TEXTS[2], "texts": docs, "return_text": True}
    )
    assert [r["text"] for r in with_text] == [docs[i] for i in order]

    status, info = call(f"{url}/topic/info", headers=bearer(KEY))
    assert status == 200 and info["model_id"] == "topic" and info["max_input_length"] == 64
    assert info["model_type"]["classifier"]["id2label"] == {"0": "sport", "1": "news", "2": "art"}
    assert "reranker" in call(f"{url}/rerank/info", headers=bearer(KEY))[1]["model_type"]
    assert "embedding" in call(f"{url}/emb/info", headers=bearer(KEY))[1]["model_type"]


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/tasks/nope/predict", {"inputs": "x"}, 404, "unknown task 'nope'"),
        ("/tasks/emb/predict", {"inputs": "x"}, 422, "/tasks/emb/embed"),
        ("/tasks/topic/embed", {"inputs": "x"}, 422, "/tasks/topic/predict"),
        ("/tasks/topic/rerank", {"query": "x", "texts": ["y"]}, 422, "one score"),
        ("/tasks/topic/predict", {"inputz": "x"}, 422, "inputz"),
        ("/tasks/topic/predict", {"inputs": ["a", "b", "c"]}, 422, "inputs"),
        ("/tasks/topic/predict", {"inputs": LONG, "truncate": False}, 413, "64 tokens"),
        ("/tasks/topic", {"inputs": "x", "normalize": True}, 422, "`normalize`"),
        ("/tasks/rerank", {"inputs": "x"}, 422, "/tasks/rerank/rerank"),
        ("/tasks/emb/embed", {"inputs": "x", "dimensions": 3}, 422, "embeddings, 32"),
        ("/tasks/emb", {"inputs": "x", "dimensions": 3}, 422, "embeddings, 32"),
        ("/tasks/emb/predict", {"inputs": [["x"]] * 4097}, 413, "inputs"),
        ("/tasks/emb/embed", {"inputs": ["x"] * 4097}, 413, "inputs"),
        ("/tasks/emb", {"inputs": ["x"] * 65}, 413, "65 inputs, more than the limit of 64"),
        ("/tasks/emb", {"inputs": SIMILAR, "normalize": False}, 422, "sentence similarity"),
        ("/tasks/topic/predict", {"inputs": "x"}, 401, "API key"),
    ],
)
def test_tei_errors(server, path, body, status, words):
    got, answer = post(f"{server[0]}{path}", body, None if status == 401 else KEY)
    assert (got, set(answer)) == (status, {"error", "error_type"}), answer
    assert words in answer["error"] and answer["error_type"] == "Validation"


def test_vllm_routes(server):
    url = server[0]
    want = native(url, "/v1/classify", {"task": "topic", "inputs": TEXTS[:2]})
    status, answer = post(f"{url}/classify", {"model": "topic", "input": TEXTS[:2]})
    assert status == 200 and answer["object"] == "list" and answer["id"].startswith("classify-")
    for row, expected in zip(answer["data"], want, strict=True):
        assert row["probs"] == pytest.approx(list(expected["scores"].values()))
        assert (row["label"], row["num_classes"]) == (expected["label"], 3)
    assert answer["usage"]["prompt_tokens"] > 2

    docs = ["the water is down there", "no", "a good day"]
    scores = native(
        url, "/v1/classify", {"task": "rerank", "inputs": [[TEXTS[2], d] for d in docs]}
    )
    order = sorted(range(3), key=lambda i: -scores[i]["score"])
    for route in ("/rerank", "/v1/rerank"):
        body = {"model": "rerank", "query": TEXTS[2], "documents": docs, "top_n": 2}
        status, answer = post(f"{url}{route}", body)
        assert status == 200 and [r["index"] for r in answer["results"]] == order[:2]
        assert [r["document"]["text"] for r in answer["results"]] == [docs[i] for i in order[:2]]
        assert [r["relevance_score"] for r in answer["results"]] == pytest.approx(
            [scores[i]["score"] for i in order[:2]]
        )

    status, refused = post(f"{url}/classify", {"model": "ner", "input": "x"})
    assert status == 400 and refused["error"]["code"] == 400
    assert (
        refused["error"]["type"] == "BadRequestError"
        and "/v1/classify" in refused["error"]["message"]
    )
    status, refused = post(f"{url}/rerank", {"model": "nope", "query": "x", "documents": ["y"]})
    assert status == 404 and refused["error"]["type"] == "NotFoundError"
    status, refused = post(f"{url}/classify", {"model": "topic", "input": ["x"] * 4097})
    assert status == 413 and refused["error"]["param"] == "input"
    body = {"model": "topic", "input": TEXTS[:1], "use_activation": False, "priority": 1}
    status, raw = post(f"{url}/classify", body)
    exp = np.exp(raw["data"][0]["probs"])
    assert exp / exp.sum() == pytest.approx(list(want[0]["scores"].values()), abs=1e-5)


def requests_lines(metrics_url: str) -> list[str]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if line.startswith("ray_freemerge_requests_total")]


def test_every_route_is_counted_by_its_template(server):
    url, metrics = server
    post(f"{url}/tasks/topic/predict", {"inputs": "x"})
    post(f"{url}/tasks/no-such-task/predict", {"inputs": "x"})
    wanted = [
        ('route="/tasks/{task}/predict"', 'status="200"', 'task="topic"'),
        ('route="/tasks/{task}/predict"', 'status="404"', 'task="unknown"'),
    ]
    deadline = time.monotonic() + 30
    while True:
        lines = requests_lines(metrics)
        found = [any(all(p in line for p in parts) for line in lines) for parts in wanted]
        if all(found) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found == [True, True], lines
    assert not any("no-such-task" in line for line in lines)


def test_base64_is_little_endian_float32():
    vector = [1.0, -2.5, 0.125]
    data = base64.b64decode(encoded(vector, "base64"))
    assert np.frombuffer(data, dtype="<f4").tolist() == vector
    assert encoded(vector, "float") == vector
