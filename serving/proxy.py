"""What runs in Ray Serve's HTTP proxy (and, behind HAProxy, in each front's own HTTP server):
requests past the server's room refused at once, and a request whose front replica died before
answering sent again, so the death of a front fails no request.

**Refusals.** A refusal in the proxy costs a fraction of a front's (the proxy's call to a front
is most of a request's cost outside the model; measured: 0.2 ms of the proxy's CPU against
3.7 ms through a front). The proxy applies the fronts' own :class:`Guard` rules, in their
order: the API key (``FREEMERGE_API_KEYS``, which every Ray process inherits; 401), then the
room: a POST that finds ``FREEMERGE_PROXY_MAX_REQUESTS`` (:data:`PROXY_LIMIT_ENV`) held by this
proxy gets 503 with ``Retry-After`` (429 on TEI's routes) without reaching a front.
``freemerge serve`` sets it to ``--max-queued-requests`` times the fronts (the room their
guards hold); unset (several proxies sharing the fronts), the fronts' guards refuse. Refusals
are counted in ``freemerge_requests_total`` as the fronts count theirs (task ``unknown``). Ray's
own plain-text refusals (its queue for the fronts full, or no front) get the same shape.

**Resending.** Ray's proxy hands each HTTP request to a front (``ClassifierServer``) replica.
Serve retries a request only until a replica accepts it; when the front dies mid-request, the
proxy's app ends without starting a response and the client gets a bare 500. Every route of
this app is idempotent (inference and reads), so :class:`GuardAndResend` keeps the
request's body (up to :data:`RESEND_MAX_BYTES`) and, when the proxy's app ends without starting
a response while the client is still there, sends the request again (Serve then picks a live
front), up to :data:`ATTEMPTS` times; then a 503 with ``Retry-After`` in the path's error
shape. A front that fails answers a JSON 500 itself: a started response is never sent again.

Ray installs the middleware in every proxy it starts when the proxy's environment holds
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=freemerge.serving.proxy:proxy_middlewares``
(:data:`PROXY_CALLBACK`): ``freemerge serve`` sets it before starting Ray, and the KubeRay
manifests set it on every pod.

**Behind HAProxy** (``freemerge serve --ingress haproxy``), each front replica serves HTTP
itself and Ray wraps that server in the same middleware: the key and the room are checked
there, before Ray's replica machinery, and a front that dies takes its middleware with it, so
HAProxy resends instead (``local.haproxy_environment``). Ray's proxy stays as HAProxy's
fallback while no front is up, with the middleware as above.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from starlette.middleware import Middleware

from freemerge.serving.dialects import dialect_of, error_status, route_label
from freemerge.serving.guard import (
    ASGIApp,
    Guard,
    Message,
    Receive,
    Scope,
    Send,
    parse_api_keys,
    refusal_of,
    send_error,
)
from freemerge.serving.metrics import REQUESTS_TOTAL
from freemerge.serving.settings import API_KEYS_ENV

logger = logging.getLogger(__name__)

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "freemerge.serving.proxy:proxy_middlewares"
PROXY_LIMIT_ENV = "FREEMERGE_PROXY_MAX_REQUESTS"
RESEND_MAX_BYTES = 8 * 1024 * 1024  # larger bodies pass through once (the guard refuses them)
ATTEMPTS = 3
PAUSES_S = (0.5, 2.0)  # before the second and third attempt: time for Serve to drop the dead


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy callback: the middlewares it wraps its ASGI app in."""
    return [Middleware(GuardAndResend)]


def _refusal_counter() -> Any:
    """The fronts' request counter, from this proxy (False outside a Ray worker)."""
    try:
        from ray.util.metrics import Counter

        return Counter(**REQUESTS_TOTAL)
    except Exception:
        return False


def proxy_limit() -> int | None:
    """The POSTs a proxy holds at most (:data:`PROXY_LIMIT_ENV`), None when unset."""
    text = os.environ.get(PROXY_LIMIT_ENV, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


class GuardAndResend:
    """Plain ASGI around the proxy's app: the API key and the room checked with the fronts'
    own :class:`Guard` rules (``limit`` POSTs held, by default :func:`proxy_limit`; none: no
    room check), and HTTP requests whose app ends without a response sent again (see the
    module's docstring)."""

    def __init__(self, app: ASGIApp, limit: int | None = None) -> None:
        self.app = app
        limit = limit if limit is not None else proxy_limit()
        self.guard = Guard(
            parse_api_keys(os.environ.get(API_KEYS_ENV)),
            max_body_bytes=sys.maxsize,  # the fronts check bodies
            max_queued=limit if limit is not None else sys.maxsize,
            refused=self._count,
        )
        self._refusals: Any = None  # the metric, made on the first refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = refusal_of(self.guard, scope)
        if refusal is not None:
            self.guard.refused(refusal[0], scope["path"])
            await send_error(send, scope["path"], *refusal)
            return
        counted = scope["method"] == "POST"
        self.guard.held += counted
        try:
            await self._resent(scope, receive, send)
        finally:
            self.guard.held -= counted

    def _count(self, status: int, path: str) -> None:
        """A refusal in ``freemerge_requests_total``, as the fronts count theirs."""
        if self._refusals is None:
            self._refusals = _refusal_counter()
        if self._refusals:
            shown = str(error_status(dialect_of(path), status, status == 503))
            tags = {"task": "unknown", "status": shown, "route": route_label(path)}
            self._refusals.inc(tags=tags)

    async def _resent(self, scope: Scope, receive: Receive, send: Send) -> None:
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

        refusal: list[bytes] = []  # Ray's own refusal: its body, to answer in our shape

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and _is_rays_refusal(message):
                refusal.append(b"")
                return
            if refusal:  # the refusal's body
                refusal.append(message.get("body", b""))
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, watched_send)
        except Exception:
            if started:
                raise
            logger.exception("the proxy's app failed before answering")
        if refusal:
            await _refused(scope["path"], b"".join(refusal).decode("utf-8", "replace"), send)
            return True
        return started

    def close(self) -> None:
        self.watcher.cancel()


def _is_rays_refusal(start: Message) -> bool:
    """Whether a response is Ray's own plain-text refusal (its proxy's queue full, or no
    replica to send to) rather than the app's answer (always JSON)."""
    if start["status"] not in (408, 429, 503):
        return False
    headers = dict(start.get("headers", []))
    return not headers.get(b"content-type", b"").startswith(b"application/json")


async def _refused(path: str, reason: str, send: Send) -> None:
    """Ray's refusal in the route's error shape: overloaded (its queue was full) or not."""
    overloaded = "max_queued_requests" in reason or "backpressure" in reason.lower()
    message = (
        "every front is full: the server is overloaded; retry shortly"
        if overloaded
        else f"no front can take the request: {reason.strip()[:200]}"
    )
    await send_error(send, path, 503, message, retry=True, overloaded=overloaded)


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
