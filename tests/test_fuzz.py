"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), native
and drop-in routes, on an artifact of every task kind: no generated request, valid or not,
may get a 5xx, an undocumented status or body, or get past the API key; and the server still
answers afterwards. The task a generated request names (in the path, or as ``model``) is
mostly one of the artifact's, chosen from the request itself, so that most requests reach
the model rather than a 404."""

import random

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from live_server import live_server
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from freemerge.benchmarks.loadgen import call

KEY = "fuzz-key"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    ignored_auth,
]


TASKS = ["topic", "tags", "rating", "rerank", "ner", "emb"]  # tests/tiny_kinds.py


@pytest.fixture(scope="module")
def fuzzed_server(kinds):
    options = {"artifact": str(kinds["artifact"]), "device": "cpu", "max_items": 8}
    with live_server(options, api_keys=(KEY,)) as urls:
        yield urls[0]


@pytest.fixture(scope="module")
def operations(fuzzed_server):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server}/openapi.json")
    return {op.ok().label: op.ok() for op in schema.get_all_operations()}


def test_the_schema_has_every_route(operations):
    assert set(operations) == {
        "POST /v1/classify",
        "POST /v1/embed",
        "GET /v1/tasks",
        "GET /healthz",
        "GET /readyz",
        "POST /tasks/{task}",
        "POST /tasks/{task}/predict",
        "POST /tasks/{task}/embed",
        "POST /tasks/{task}/rerank",
        "POST /tasks/{task}/similarity",
        "GET /tasks/{task}/info",
        "GET /v1/models",
        "GET /v1/models/{model}",
        "POST /v1/embeddings",
        "POST /classify",
        "POST /rerank",
        "POST /v1/rerank",
    }


@pytest.mark.parametrize(
    "label, mode, examples",
    [
        ("POST /v1/classify", GenerationMode.POSITIVE, 150),
        ("POST /v1/classify", GenerationMode.NEGATIVE, 150),
        ("POST /v1/embed", GenerationMode.POSITIVE, 60),
        ("POST /v1/embed", GenerationMode.NEGATIVE, 60),
        ("GET /v1/tasks", GenerationMode.POSITIVE, 10),  # nothing to make invalid on the GETs
        ("GET /readyz", GenerationMode.POSITIVE, 10),
        ("GET /v1/models", GenerationMode.POSITIVE, 5),
        *[
            (f"POST {route}", mode, 40)
            for route in (
                "/tasks/{task}",
                "/tasks/{task}/predict",
                "/tasks/{task}/embed",
                "/tasks/{task}/rerank",
                "/tasks/{task}/similarity",
                "/v1/embeddings",
                "/classify",
                "/rerank",
            )
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ],
        ("POST /v1/rerank", GenerationMode.POSITIVE, 20),
        ("GET /tasks/{task}/info", GenerationMode.POSITIVE, 20),
        ("GET /v1/models/{model}", GenerationMode.POSITIVE, 20),
    ],
)
def test_no_generated_request_gets_a_server_error(operations, fuzzed_server, label, mode, examples):
    """Valid (positive) and invalid (negative) requests generated from the schema."""

    @given(case=operations[label].as_strategy(mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        aim_at_a_task(case)
        case.call_and_validate(
            base_url=fuzzed_server,
            headers={"Authorization": f"Bearer {KEY}"},
            checks=CHECKS,
            timeout=60,
        )

    check()


def aim_at_a_task(case) -> None:
    """Name one of the artifact's tasks in three generated requests of four (the path's
    ``task`` or ``model``, or the body's ``model`` or ``task``), chosen from the request
    itself (so that derandomized runs stay the same)."""
    pick = random.Random(repr((case.path_parameters, case.body)))
    if pick.random() < 0.25:
        return
    for field in ("task", "model"):
        if isinstance(case.path_parameters, dict) and field in case.path_parameters:
            case.path_parameters[field] = pick.choice(TASKS)
    for field in ("model", "task"):
        if isinstance(case.body, dict) and isinstance(case.body.get(field), str):
            case.body[field] = pick.choice(TASKS)


def test_the_server_still_answers_after_the_fuzzing(fuzzed_server):
    body = {"task": "topic", "inputs": ["win a prize"]}
    assert (
        call(f"{fuzzed_server}/v1/classify", body, headers={"Authorization": f"Bearer {KEY}"})[0]
        == 200
    )
