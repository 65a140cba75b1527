"""The serving engine without Ray: tagged, routed, mixed batches, row adapters, bad input."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from freemerge.benchmarks.evaluate import task_texts
from freemerge.merging.artifact import open_artifact
from freemerge.merging.batching import Tokenized
from freemerge.merging.config import parse_config
from freemerge.merging.merge import run_merge
from freemerge.serving import lowrank_kernel
from freemerge.serving.adapters import rows_assigned
from freemerge.serving.engine import MergedEngine, SeparateEngine
from freemerge.serving.expert_store import held_bytes
from freemerge.serving.requests import ClassifyRequest, Limits, RequestError, StageTimings
from freemerge.serving.runtime import MergedClassifier


def merge(zoo, out, experts, router=True):
    raw = {
        "zoo": str(zoo.root),
        "method": "free",
        "parameters": {"scaling": 0.5},
        "experts": experts,
    }
    if router:
        raw["router"] = {"examples_per_task": 60, "epochs": 20}
    run_merge(parse_config(raw), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def artifacts(tiny_zoo, tiny_routed_artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {
        "lowrank": tiny_routed_artifact,
        "sparse": merge(tiny_zoo, root / "sparse", {"kind": "sparse", "density": 0.05}),
        "norouter": merge(
            tiny_zoo, root / "norouter", {"kind": "sparse", "density": 0.05}, router=False
        ),
        # biases and LayerNorms whole beside the factors: still row adapters
        "vectors": merge(
            tiny_zoo, root / "vectors", {"kind": "lowrank", "rank": 4, "vectors": "full"}, False
        ),
    }


@pytest.fixture(scope="module")
def texts():
    return {
        task: task_texts(task, "test")[0][:6] for task in ("sms_spam", "bbc_topic", "debate_party")
    }


def request(task, inputs):
    return ClassifyRequest(task, inputs, 0.0)


def test_row_adapters_are_used_for_lowrank_experts(artifacts):
    assert MergedEngine(artifacts["lowrank"], "cpu").model.row_adapters is not None
    vectors = MergedEngine(artifacts["vectors"], "cpu").model
    assert vectors.row_adapters is not None
    held = vectors.store.layouts["sms_spam"].other  # biases and LayerNorms, whole
    assert any(n.endswith("LayerNorm.weight") for n in held) and any(".bias" in n for n in held)
    wrapped = {type(m).__name__ for m in vectors.backbone.modules()}
    assert {"LowRankLinear", "RowLayerNorm"} <= wrapped
    assert MergedEngine(artifacts["sparse"], "cpu").model.row_adapters is None


def test_row_adapters_run_the_fused_kernel_where_the_cpu_has_it(artifacts, texts, monkeypatch):
    """On an AVX-512 or AVX2 CPU every adapted layer of a pass runs in the fused kernel (the tests
    above then check its answers): a one-task pass through ``lowrank_linear``, a mixed one
    through ``lowrank_update_``."""
    kernel = lowrank_kernel.cpu_kernel()
    if kernel is None:
        pytest.skip("no fused kernel on this CPU")
    calls: list[tuple[str, bool]] = []

    class Counted:
        def lowrank_linear(self, *args):
            out = kernel.lowrank_linear(*args)
            calls.append(("linear", out is not None))
            return out

        def lowrank_update_(self, *args):
            done = kernel.lowrank_update_(*args)
            calls.append(("update", done))
            return done

    monkeypatch.setattr(lowrank_kernel, "cpu_kernel", Counted)
    model = MergedClassifier(open_artifact(artifacts["lowrank"]))
    model.classify_rows(texts["sms_spam"][:2], ["sms_spam"] * 2)
    mixed = texts["sms_spam"][:2] + texts["debate_party"][:2]
    model.classify_rows(mixed, ["sms_spam"] * 2 + ["debate_party"] * 2)
    assert {kind for kind, _ in calls} == {"linear", "update"}
    assert all(done for _, done in calls)


@pytest.mark.parametrize("kind", ["lowrank", "sparse"])
def test_mixed_batch_answers_equal_each_request_alone(artifacts, texts, kind):
    engine = MergedEngine(artifacts[kind], "cpu")
    requests = [
        request("sms_spam", texts["sms_spam"]),
        request(None, texts["bbc_topic"]),
        request("debate_party", texts["debate_party"]),
        request("bbc_topic", texts["sms_spam"][:2]),
    ]
    together = engine.classify_requests(requests, StageTimings())
    for req, answers in zip(requests, together, strict=True):
        alone = engine.classify_requests([req], StageTimings())[0]
        for a, b in zip(answers, alone, strict=True):
            assert (a.task, a.label, a.routed) == (b.task, b.label, b.routed)
            assert a.scores == pytest.approx(b.scores, abs=1e-5)
    assert all(a.routed for a in together[1]) and not any(a.routed for a in together[0])


@pytest.mark.parametrize("kind", ["lowrank", "vectors"])
@pytest.mark.parametrize("second", ["debate_party", "sms_spam"])  # a mixed pass; one task's
def test_row_adapters_equal_the_expert_applied_in_place(artifacts, texts, kind, second):
    artifact = open_artifact(artifacts[kind])
    lora = MergedClassifier(artifact)
    in_place = MergedClassifier(artifact, row_adapters=False)
    mixed = texts["sms_spam"] + texts["debate_party"]
    tasks = ["sms_spam"] * 6 + [second] * 6
    for a, b in zip(
        lora.classify_rows(mixed, tasks), in_place.classify_rows(mixed, tasks), strict=True
    ):
        assert a.label == b.label and a.scores == pytest.approx(b.scores, abs=1e-5)


@pytest.mark.parametrize("kind", ["lowrank", "sparse"])
def test_backbone_is_bitwise_unchanged_after_thousands_of_swaps(artifacts, texts, kind):
    engine = MergedEngine(artifacts[kind], "cpu")
    before = {n: p.detach().clone() for n, p in engine.model.parameters.items()}
    tasks = ["sms_spam", "bbc_topic", "debate_party"]
    first = engine.classify_requests([request("bbc_topic", texts["bbc_topic"])], StageTimings())
    for i in range(2000):
        with engine.model.expert_applied(tasks[i % 3]):
            pass
    for i in range(30):
        engine.classify_requests(
            [request(tasks[i % 3], texts["sms_spam"][:2]), request(None, ["hi"])], StageTimings()
        )
    assert all(torch.equal(before[n], p) for n, p in engine.model.parameters.items())
    again = engine.classify_requests([request("bbc_topic", texts["bbc_topic"])], StageTimings())
    assert [a.scores for a in again[0]] == [a.scores for a in first[0]]


def test_stage_timings_and_memory(artifacts, texts):
    engine = MergedEngine(artifacts["sparse"], "cpu")
    timings = StageTimings()
    answers = engine.classify_requests(
        [request(None, texts["sms_spam"]), request("bbc_topic", ["x"])], timings
    )
    assert set(timings.seconds) == {"route", "expert_apply", "forward"}
    memory = engine.memory()
    assert (
        memory["backbone_bytes"] == open_artifact(artifacts["sparse"]).manifest["backbone"]["bytes"]
    )
    manifest = open_artifact(artifacts["sparse"]).manifest
    # only the experts asked for are held: as stored (host), and ready to apply (the device
    # tier, on the CPU too: int64 indices beside the stored int32, the float32 values shared)
    used = {a.task for a in answers[0]} | {"bbc_topic"}
    tiers = engine.expert_tiers()
    assert tiers["host"].bytes == sum(manifest["tasks"][t]["expert_bytes"] for t in used)
    held = memory["resident_expert_bytes"]
    assert tiers["host"].bytes < held < tiers["host"].bytes + tiers["device"].bytes


def test_expert_bytes_count_every_copy_and_views_once(artifacts):
    """The ready copy of a float32 expert on the CPU is the stored one (no bytes of its own);
    a 16-bit expert's float32 copy is counted."""
    model = MergedClassifier(open_artifact(artifacts["lowrank"]))
    task = model.tasks[0]
    model.classify(["hello"], task)
    stored = model.store.prefetch(task)
    listed = model.artifact.tasks[task]["expert_bytes"]
    assert model.row_adapters is not None
    assert model.expert_bytes() == listed + (listed * 2 if stored.dtype == "float16" else 0)
    b, a = next(iter(stored.factors.values()))
    assert held_bytes([b, b.T, a]) == b.nbytes + a.nbytes
    assert held_bytes([b, b.clone()]) == 2 * b.nbytes


def test_request_checks(artifacts):
    engine = MergedEngine(artifacts["sparse"], "cpu", Limits(max_items=3, max_chars=20))
    cases = [
        (
            ("imdb", ["x"]),
            404,
            "unknown task 'imdb'; known tasks: bbc_topic, debate_party, sms_spam",
        ),
        (("sms_spam", []), 400, "non-empty list of texts"),
        (("sms_spam", "text"), 400, "non-empty list of texts"),
        (("sms_spam", ["a", 3]), 400, "item 1 is neither"),
        (("sms_spam", ["a"] * 4), 413, "4 inputs, more than the limit of 3"),
        (
            ("sms_spam", ["a", "b" * 21]),
            413,
            "input 1 has a text of 21 characters, more than the limit of 20",
        ),
    ]
    for (task, inputs), status, message in cases:
        with pytest.raises(RequestError, match=message) as err:
            engine.check(task, inputs)
        assert err.value.status == status
    no_router = MergedEngine(artifacts["norouter"], "cpu")
    with pytest.raises(RequestError, match="no router, so `task` is required") as err:
        no_router.check(None, ["x"])
    assert err.value.status == 400


def test_overlong_texts_are_truncated_and_marked(artifacts):
    engine = MergedEngine(artifacts["lowrank"], "cpu")
    long_text = "word " * 2000
    answers = engine.classify_requests(
        [request("bbc_topic", [long_text, "short"])], StageTimings()
    )[0]
    assert [a.truncated for a in answers] == [True, False]


def test_separate_engine_matches_each_fine_tuned_model(tiny_zoo, texts):
    engine = SeparateEngine(tiny_zoo.root, "cpu")
    answers = engine.classify_requests(
        [request("sms_spam", texts["sms_spam"]), request("debate_party", texts["debate_party"])],
        StageTimings(),
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_zoo.tasks["debate_party"].path
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo.tasks["debate_party"].path)
    with torch.no_grad():
        expected = torch.softmax(
            model(**tokenizer(texts["debate_party"], padding=True, return_tensors="pt")).logits, -1
        )
    for answer, row in zip(answers[1], expected, strict=True):
        assert list(answer.scores.values()) == pytest.approx(row.tolist(), abs=1e-5)
    with pytest.raises(RequestError) as err:
        engine.check(None, ["x"])
    assert err.value.status == 400
    one_model = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 2.99 < engine.memory()["backbone_bytes"] / one_model < 3.01


def test_row_adapters_follow_the_task_of_each_row_in_any_order(artifacts, texts):
    model = MergedClassifier(open_artifact(artifacts["lowrank"]))
    rows = [texts["sms_spam"][0], texts["debate_party"][0], texts["sms_spam"][1]]
    tasks = ["sms_spam", "debate_party", "sms_spam"]
    batch = Tokenized(model.tokenizer, rows, 128).padded([0, 1, 2], model.device)
    experts = {task: model.store.get(task) for task in tasks}
    with torch.no_grad(), rows_assigned(model.row_adapters, tasks, experts):
        together = model.backbone(**batch).pooler_output
    for i, (text, task) in enumerate(zip(rows, tasks, strict=True)):
        one = Tokenized(model.tokenizer, [text], 128).padded([0], model.device)
        with torch.no_grad(), rows_assigned(model.row_adapters, [task], experts):
            alone = model.backbone(**one).pooler_output
        assert torch.allclose(together[i], alone[0], atol=1e-5)


def test_a_one_task_pass_reads_the_backbone_weights_as_they_are_written_in_place(artifacts, texts):
    """The one-task path reads each layer's weight and bias through references of its own: a
    write into the backbone's parameters in place (as the in-place expert makes) shows in it as
    in the model with the expert merged in place."""
    adapted = MergedClassifier(open_artifact(artifacts["lowrank"]))
    in_place = MergedClassifier(open_artifact(artifacts["lowrank"]), row_adapters=False)
    task = "sms_spam"
    batch = Tokenized(adapted.tokenizer, texts[task][:2], 128).padded([0, 1], adapted.device)
    experts = {task: adapted.store.get(task)}

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), rows_assigned(adapted.row_adapters, [task] * 2, experts):
            rows = adapted.backbone(**batch).last_hidden_state
        with torch.no_grad(), in_place.expert_applied(task):
            merged = in_place.backbone(**batch).last_hidden_state
        return rows, merged

    before, _ = outputs()
    for model in (adapted, in_place):
        with torch.no_grad():
            model.parameters["encoder.layer.0.attention.self.query.weight"].mul_(-1.0)
            model.parameters["encoder.layer.0.output.dense.weight"].mul_(2.0)
            model.parameters["encoder.layer.0.output.dense.bias"].add_(0.5)
    rows, merged = outputs()
    assert not torch.allclose(rows, before, atol=1e-2)
    assert torch.allclose(rows, merged, atol=1e-5)


@pytest.mark.parametrize("kind", ["lowrank", "sparse"])
def test_answers_do_not_depend_on_how_the_batch_is_cut_into_passes(artifacts, texts, kind):
    requests = [
        request("sms_spam", texts["sms_spam"]),
        request("bbc_topic", texts["bbc_topic"]),
        request(None, texts["debate_party"]),
    ]
    every_length = MergedEngine(artifacts[kind], "cpu", pass_overhead_tokens=0)
    one_pass = MergedEngine(artifacts[kind], "cpu", pass_overhead_tokens=10**9)
    cut = every_length.classify_requests(requests, StageTimings())
    whole = one_pass.classify_requests(requests, StageTimings())
    for a, b in zip(sum(cut, []), sum(whole, []), strict=True):
        assert (a.task, a.label, a.truncated) == (b.task, b.label, b.truncated)
        assert a.scores == pytest.approx(b.scores, abs=1e-5)


def test_a_failing_request_fails_alone_and_the_rest_of_its_batch_is_answered():
    import asyncio

    from freemerge.serving.replicas import answer_batch

    class Metrics:
        def batch(self, *args):
            pass

    class InlineThread:  # ModelThread's interface, without touching torch's thread count
        async def run(self, function, *args):
            return function(*args)

        def beat(self):
            pass

    def classify(requests, timings):
        if any("poison" in r.inputs for r in requests):
            raise RuntimeError("the model choked")
        return [[text.upper() for text in r.inputs] for r in requests]

    requests = [request("a", ["one"]), request("a", ["poison"]), request(None, ["two"])]
    answers = asyncio.run(answer_batch(InlineThread(), classify, requests, Metrics()))
    assert answers[0] == ["ONE"] and answers[2] == ["TWO"]
    assert isinstance(answers[1], RuntimeError)
    alone = asyncio.run(answer_batch(InlineThread(), classify, requests[1:2], Metrics()))
    assert isinstance(alone[0], RuntimeError)


def test_lone_surrogates_are_refused_before_any_work(artifacts):
    engine = MergedEngine(artifacts["sparse"], "cpu")
    with pytest.raises(RequestError, match="input 1 is not valid Unicode text") as caught:
        engine.check("sms_spam", ["fine \u00e9", "bad \ud800"])
    assert caught.value.status == 400
    assert engine.check("sms_spam", ["caf\u00e9 \U0001f600"]).inputs == ["caf\u00e9 \U0001f600"]


def test_error_messages_name_at_most_twenty_tasks():
    from freemerge.serving.requests import check_routing

    many = [f"task-{i:04d}" for i in range(1000)]
    with pytest.raises(RequestError) as refused:
        check_routing("nope", None, many, False, "this artifact")
    message = str(refused.value)
    assert refused.value.status == 404 and "task-0019" in message and "task-0020" not in message
    assert "and 980 more (GET /v1/tasks lists them all)" in message
    with pytest.raises(RequestError, match="known tasks: a, b$"):
        check_routing("nope", None, ["a", "b"], False, "this artifact")


def test_a_large_one_task_pass_merges_its_expert_and_answers_the_same(artifacts, texts):
    """Above ``merge_above_tokens`` a one-task pass runs with the expert merged into the
    weights instead of row adapters: same answers, weights restored bitwise, and mixed passes
    keep their row adapters."""
    one_pass = 10**9  # every batch one pass, so the mixed batch is a mixed pass
    merging = MergedClassifier(
        open_artifact(artifacts["lowrank"]), pass_overhead_tokens=one_pass, merge_above_tokens=1
    )
    adapters = MergedClassifier(
        open_artifact(artifacts["lowrank"]), pass_overhead_tokens=one_pass, merge_above_tokens=None
    )
    before = {n: p.clone() for n, p in merging.parameters.items()}
    applied = []
    original = merging.expert_applied
    merging.expert_applied = lambda task: applied.append(task) or original(task)
    for rows, tasks in (
        (texts["sms_spam"][:3], ["sms_spam"] * 3),
        (texts["sms_spam"][:2] + texts["bbc_topic"][:1], ["sms_spam", "sms_spam", "bbc_topic"]),
    ):
        a = merging.classify_rows(rows, tasks)
        b = adapters.classify_rows(rows, tasks)
        for x, y in zip(a, b, strict=True):
            assert x.label == y.label and x.scores == pytest.approx(y.scores, abs=1e-5)
    assert applied == ["sms_spam"]  # the one-task pass only
    assert all(torch.equal(before[n], p) for n, p in merging.parameters.items())
