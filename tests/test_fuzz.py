"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): no
generated request, valid or not, may get a 5xx, an undocumented status or body, or get past
the API key; and the server still answers afterwards."""

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


@pytest.fixture(scope="module")
def fuzzed_server(tiny_routed_artifact):
    options = {"artifact": str(tiny_routed_artifact), "device": "cpu", "max_items": 8}
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
        case.call_and_validate(
            base_url=fuzzed_server,
            headers={"Authorization": f"Bearer {KEY}"},
            checks=CHECKS,
            timeout=60,
        )

    check()


def test_the_server_still_answers_after_the_fuzzing(fuzzed_server):
    body = {"task": "sms_spam", "inputs": ["win a prize"]}
    assert (
        call(f"{fuzzed_server}/v1/classify", body, headers={"Authorization": f"Bearer {KEY}"})[0]
        == 200
    )
