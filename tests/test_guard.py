"""The ASGI guard in front of the app: API keys, body cap and the replica's request limit,
driven with raw ASGI messages (no server, no Ray)."""

import asyncio
import json
from types import SimpleNamespace

from freemerge.serving.guard import Guard, GuardMiddleware, parse_api_keys


async def echo_length(scope, receive, send):
    """An app answering 200 with the length of the body it read."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(len(body)).encode()})


async def call(
    guard, path="/v1/classify", headers=(), chunks=(b"{}",), app=echo_length, method="POST"
):
    """(status, headers, JSON body) of one request through the middleware."""
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent = []

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "app": SimpleNamespace(state=SimpleNamespace(guard=guard)),
    }
    await GuardMiddleware(app)(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), json.loads(body)


def run(guard, **kwargs):
    return asyncio.run(call(guard, **kwargs))


def test_keys_are_required_but_on_the_probes_and_any_listed_key_works():
    refused = []
    guard = Guard(parse_api_keys(" k1, ,k2 "), refused=lambda status, path: refused.append(status))
    assert guard.api_keys == ("k1", "k2")
    status, headers, body = run(guard)
    assert (status, headers[b"www-authenticate"]) == (401, b"Bearer")
    assert "Authorization: Bearer KEY" in body["error"]
    assert run(guard, headers=[("Authorization", "Bearer k3")])[0] == 401
    assert run(guard, headers=[("Authorization", "Basic k1")])[0] == 401
    assert run(guard, headers=[("Authorization", "k1")])[0] == 401
    assert run(guard, headers=[("Authorization", "Bearer k1")])[:1] == (200,)
    assert run(guard, headers=[("authorization", "bearer k2")])[0] == 200
    assert run(guard, path="/healthz")[0] == 200
    assert run(guard, path="/readyz")[0] == 200
    assert run(guard, path="/openapi.json", method="GET")[0] == 200
    for path in ("/tasks/t/predict", "/tasks/t", "/v1/embeddings", "/classify", "/rerank"):
        assert run(guard, path=path)[0] == 401
    assert refused == [401] * 9


def test_without_keys_nothing_is_asked():
    assert run(Guard())[0] == 200


def test_bodies_over_the_cap_are_refused_by_length_and_while_read():
    refused = []
    guard = Guard(max_body_bytes=10, refused=lambda status, path: refused.append((status, path)))
    status, _, body = run(guard, headers=[("Content-Length", "11")], chunks=[b"x" * 11])
    assert (status, body["error"]) == (413, "the request body is larger than the limit of 10 bytes")
    # no declared length (chunked): refused once the bytes read pass the cap
    assert run(guard, chunks=[b"x" * 6, b"x" * 6])[0] == 413
    assert run(guard, chunks=[b"x" * 5, b"x" * 5]) == (200, {}, 10)
    assert refused == [(413, "/v1/classify")] * 2
    assert guard.held == 0


def test_classify_requests_beyond_the_limit_get_503_at_once_and_the_count_recovers():
    guard = Guard(max_queued=2)
    release = asyncio.Event()

    async def blocked(scope, receive, send):
        await release.wait()
        await echo_length(scope, receive, send)

    async def scenario():
        held = [asyncio.create_task(call(guard, app=blocked)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert guard.held == 2
        status, headers, body = await call(guard, app=blocked)  # refused before it waits
        other = await call(guard, path="/v1/tasks", method="GET")  # GETs are not counted
        release.set()
        return status, headers, body, other, [await task for task in held]

    status, headers, body, other, answers = asyncio.run(scenario())
    assert (status, headers[b"retry-after"]) == (503, b"1")
    assert "holds 2 requests" in body["error"]
    assert other[0] == 200
    assert [a[0] for a in answers] == [200, 200]
    assert guard.held == 0


def test_the_count_recovers_when_the_app_fails():
    async def failing(scope, receive, send):
        raise RuntimeError("boom")

    guard = Guard(max_queued=1)
    for _ in range(3):
        try:
            run(guard, app=failing)
        except RuntimeError:
            pass
    assert guard.held == 0


def test_no_guard_yet_means_not_ready():
    status, headers, body = run(None)
    assert (status, headers[b"retry-after"]) == (503, b"1")
    assert "starting" in body["error"]
    status, _, body = run(None, path="/tasks/t/predict")  # unhealthy, not overloaded
    assert (status, body["error_type"]) == (503, "Unhealthy")


def test_each_api_family_gets_its_own_refusal_shape():
    guard = Guard(parse_api_keys("k"))
    status, _, body = run(guard, path="/tasks/t/embed")
    assert (status, body) == (401, {"error": body["error"], "error_type": "Validation"})
    status, _, body = run(guard, path="/v1/embeddings")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _, body = run(guard, path="/rerank")
    assert status == 401 and body["error"]["code"] == 401
    assert body["error"]["type"] == "UnauthorizedError"


def test_overload_on_the_tei_routes_is_429_overloaded():
    guard = Guard(max_queued=0)
    status, headers, body = run(guard, path="/tasks/t/predict")
    assert (status, headers[b"retry-after"], body["error_type"]) == (429, b"1", "Overloaded")
    status, _, body = run(guard, path="/v1/embeddings")
    assert status == 503 and body["error"]["type"] == "overloaded_error"
