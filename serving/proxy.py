"""What runs in Ray Serve's HTTP proxy: a request whose front replica died before answering is
sent again, so the death of a front fails no request.

Ray's proxy hands each HTTP request to a front (``ClassifierServer``) replica. Serve retries a
request only until a replica accepts it; when the front dies mid-request, the proxy's app ends
without starting a response and the client gets a bare 500. Every route of this app is
idempotent (inference and reads), so :class:`ResendWhenFrontLost` keeps the request's body (up
to :data:`RESEND_MAX_BYTES`) and, when the proxy's app ends without starting a response while
the client is still there, sends the request again (Serve then picks a live front), up to
:data:`ATTEMPTS` times; then a 503 with ``Retry-After`` in the path's error shape. A front
that fails answers a JSON 500 itself: a started response is never sent again.

Ray installs it in every proxy it starts when the proxy's environment holds
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=freemerge.serving.proxy:proxy_middlewares``
(:data:`PROXY_CALLBACK`): ``freemerge serve`` sets it before starting Ray, and the KubeRay
manifests set it on every pod.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.middleware import Middleware

from freemerge.serving.guard import ASGIApp, Message, Receive, Scope, Send, send_error

logger = logging.getLogger(__name__)

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "freemerge.serving.proxy:proxy_middlewares"
RESEND_MAX_BYTES = 8 * 1024 * 1024  # larger bodies pass through once (the guard refuses them)
ATTEMPTS = 3
PAUSES_S = (0.5, 2.0)  # before the second and third attempt: time for Serve to drop the dead


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy callback: the middlewares it wraps its ASGI app in."""
    return [Middleware(ResendWhenFrontLost)]


class ResendWhenFrontLost:
    """Plain ASGI around the proxy's app: HTTP requests whose app ends without a response
    are sent again (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks, complete = await _read_up_to(receive, RESEND_MAX_BYTES)
        if not complete:  # too large to keep: once, as it came
            await self.app(scope, _replayed(chunks, receive), send)
            return
        request = _KeptRequest(b"".join(chunks), receive)
        try:
            for attempt in range(1, ATTEMPTS + 1):
                fresh = {**scope, "headers": list(scope.get("headers", []))}
                started = await request.send_to(self.app, fresh, send)
                if started or request.disconnected.is_set():
                    return
                if attempt < ATTEMPTS:
                    logger.warning("a front was lost mid-request; sending it again")
                    await asyncio.sleep(PAUSES_S[attempt - 1])
            message = f"the server's fronts were lost {ATTEMPTS} times in a row; retry shortly"
            await send_error(send, scope["path"], 503, message, retry=True, overloaded=False)
        finally:
            request.close()


class _KeptRequest:
    """A request's body, handed to each attempt, and the client's disconnect, watched once
    for all attempts."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self.body = body
        self.disconnected = asyncio.Event()
        self.watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()

    async def send_to(self, app: ASGIApp, scope: Scope, send: Send) -> bool:
        """One attempt; whether it started a response."""
        started = False
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            await self.disconnected.wait()
            return {"type": "http.disconnect"}

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, watched_send)
        except Exception:
            if started:
                raise
            logger.exception("the proxy's app failed before answering")
        return started

    def close(self) -> None:
        self.watcher.cancel()


async def _read_up_to(receive: Receive, limit: int) -> tuple[list[bytes], bool]:
    """The body's chunks while they total at most ``limit`` bytes, and whether that is all of
    it (False: more is left to read from ``receive``)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return chunks, True
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return chunks, True
        if size > limit:
            return chunks, False


def _replayed(chunks: list[bytes], receive: Receive) -> Receive:
    """A receive that gives the chunks already read (more to come), then reads on."""
    pending = list(chunks)

    async def replay() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": True}
        return await receive()

    return replay
