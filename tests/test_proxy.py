"""The proxy middleware: a request whose app ended without a response is sent again, and
nothing else is (no Ray: plain ASGI calls)."""

import asyncio
import json

import pytest

from freemerge.serving import proxy
from freemerge.serving.proxy import GuardAndResend


class FlakyApp:
    """Ends without a response (a lost front) ``lost`` times, then echoes the body."""

    def __init__(self, lost: int, status: int = 200) -> None:
        self.lost = lost
        self.status = status
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        if len(self.bodies) <= self.lost:
            return
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": message["body"]})


def call(app, body: bytes, chunk: int | None = None, disconnect: bool = False) -> list[dict]:
    """The messages the client gets for a POST of ``body`` (in chunks of ``chunk`` bytes)."""
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    incoming = [
        {"type": "http.request", "body": piece, "more_body": k < len(pieces) - 1}
        for k, piece in enumerate(pieces)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": []}
    asyncio.run(GuardAndResend(app)(scope, receive, send))
    return sent


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    monkeypatch.setattr(proxy, "PAUSES_S", (0.0, 0.0))


def test_a_request_whose_front_was_lost_is_sent_again_whole():
    app = FlakyApp(lost=2)
    sent = call(app, b'{"inputs": ["hi"]}', chunk=5)
    assert [m.get("status") for m in sent] == [200, None]
    assert sent[1]["body"] == b'{"inputs": ["hi"]}'
    assert app.bodies == [b'{"inputs": ["hi"]}'] * 3


def test_a_started_response_is_never_sent_again():
    app = FlakyApp(lost=0, status=500)
    assert call(app, b"x")[0]["status"] == 500
    assert len(app.bodies) == 1


def test_fronts_lost_every_time_get_a_503_to_retry():
    app = FlakyApp(lost=10)
    start, body = call(app, b"x")
    assert start["status"] == 503
    assert (b"retry-after", b"1") in start["headers"]
    assert "error" in json.loads(body["body"])
    assert len(app.bodies) == proxy.ATTEMPTS


def test_a_client_that_left_gets_nothing_sent_again():
    app = FlakyApp(lost=10)

    async def gone(scope, receive, send) -> None:  # the proxy sees the disconnect, then ends
        await app(scope, receive, send)
        assert (await receive())["type"] == "http.disconnect"

    assert call(gone, b"x", disconnect=True) == []
    assert len(app.bodies) == 1


def test_a_body_too_large_to_keep_passes_through_once(monkeypatch):
    monkeypatch.setattr(proxy, "RESEND_MAX_BYTES", 4)
    app = FlakyApp(lost=1)
    assert call(app, b"0123456789", chunk=3) == []
    assert app.bodies == [b"012"]  # the app read its first chunk; nothing was sent again


def test_past_its_room_the_proxy_refuses_without_calling_a_front(monkeypatch):
    """A refusal in the proxy never reaches a front (a front's refusal costs a call to it):
    with one POST held, the next is refused in the path's shape; reads are never counted."""

    async def scenario() -> tuple[list, list, list, int]:
        release = asyncio.Event()
        calls = []

        async def front(scope, receive, send) -> None:
            calls.append(scope["path"])
            await receive()
            if scope["path"] == "/slow":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        middleware = GuardAndResend(front, limit=1)

        async def request(path: str, method: str = "POST") -> list[dict]:
            sent: list[dict] = []
            incoming = [{"type": "http.request", "body": b"{}", "more_body": False}]

            async def receive() -> dict:
                if incoming:
                    return incoming.pop(0)
                await asyncio.sleep(3600)

            async def send(message: dict) -> None:
                sent.append(message)

            scope = {"type": "http", "method": method, "path": path, "headers": []}
            await middleware(scope, receive, send)
            return sent

        slow = asyncio.ensure_future(request("/slow"))
        await asyncio.sleep(0.01)
        refused = await request("/v1/classify")
        tei = await request("/tasks/sms_spam/predict")
        read = await request("/v1/tasks", "GET")
        release.set()
        await slow
        return refused, tei, read, len(calls)

    refused, tei, read, calls = asyncio.run(scenario())
    assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
    assert "error" in json.loads(refused[1]["body"])
    assert tei[0]["status"] == 429  # TEI's overload status
    assert json.loads(tei[1]["body"])["error_type"] == "Overloaded"
    assert read[0]["status"] == 200
    assert calls == 2  # the slow POST and the read; the refused never reached the front


def test_the_proxy_asks_for_the_key_first(monkeypatch):
    monkeypatch.setenv("FREEMERGE_API_KEYS", "secret")
    app = FlakyApp(lost=0)
    middleware = GuardAndResend(app, limit=5)

    async def post(headers: list) -> list[dict]:
        sent: list[dict] = []
        incoming = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> dict:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": headers}
        await middleware(scope, receive, send)
        return sent

    assert asyncio.run(post([]))[0]["status"] == 401
    assert app.bodies == []
    assert asyncio.run(post([(b"authorization", b"Bearer secret")]))[0]["status"] == 200
