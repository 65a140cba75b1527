"""The checks every HTTP request passes before it costs anything: API key, body size, room.

:class:`GuardMiddleware` is plain ASGI in front of the FastAPI app. In order, it refuses

- a request without a valid ``Authorization: Bearer KEY`` when keys are set (401;
  ``/healthz``, ``/readyz`` and the OpenAPI page stay open for probes and readers);
- a POST (every route that runs the model) when the replica already holds ``max_queued`` of
  them (503 with ``Retry-After``; TEI's routes: 429), before its body is read;
- a body longer than ``max_body_bytes`` (413), by its ``Content-Length`` before reading, or
  as soon as the bytes read pass the cap (chunked bodies).

Each refusal is JSON in the error shape of the path's API family
(:mod:`freemerge.serving.dialects`). The middleware reads its :class:`Guard` from the app's
``state.guard``, which the replica sets when it starts; no Ray here.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from freemerge.serving.dialects import dialect_of, error_body, error_status, needs_key
from freemerge.serving.settings import ServingOptions

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_S = 1


def parse_api_keys(text: str | None) -> tuple[str, ...]:
    """Keys from a comma-separated list (blank entries dropped)."""
    return tuple(key.strip() for key in (text or "").split(",") if key.strip())


@dataclass
class Guard:
    """A replica's admission rules and its count of model requests (POSTs) held now."""

    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = ServingOptions.max_body_bytes
    max_queued: int = ServingOptions.max_queued_requests
    # called with each refusal's status and path
    refused: Callable[[int, str], None] = lambda status, path: None
    held: int = field(default=0, init=False)

    def key_accepted(self, authorization: str | None) -> bool:
        """Whether ``Authorization`` carries one of the keys; each key compared in constant
        time, and every key compared whichever matches."""
        if not self.api_keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(given, key.encode())
        return matched


class BodyTooLarge(Exception):
    """The body passed the byte cap while being read."""


class GuardMiddleware:
    """ASGI middleware applying the app's ``state.guard`` (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard: Guard | None = getattr(scope["app"].state, "guard", None)
        path = scope["path"]
        if guard is None:
            starting = "the server is starting; retry shortly"
            await send_error(send, path, 503, starting, retry=True, overloaded=False)
            return
        refusal = refusal_of(guard, scope)
        if refusal is not None:
            guard.refused(refusal[0], path)
            await send_error(send, path, *refusal)
            return
        counted = scope["method"] == "POST"
        guard.held += counted
        try:
            await self._with_body(guard, scope, receive, send)
        finally:
            guard.held -= counted

    async def _with_body(self, guard: Guard, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the whole body within the cap, then hand it to the app."""
        try:
            body = await read_body(receive, guard.max_body_bytes)
        except BodyTooLarge:
            guard.refused(413, scope["path"])
            await send_error(send, scope["path"], 413, _too_large(guard.max_body_bytes))
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def refusal_of(guard: Guard, scope: Scope) -> tuple[int, str, bool] | None:
    """(status, message, retry) for a request refused before its body is read, else None."""
    headers = {name.lower(): value for name, value in scope.get("headers", [])}
    if needs_key(scope["path"]):
        authorization = headers.get(b"authorization")
        if not guard.key_accepted(authorization.decode("latin-1") if authorization else None):
            return 401, "a valid API key is required: send `Authorization: Bearer KEY`", False
    if scope["method"] == "POST" and guard.held >= guard.max_queued:
        return 503, f"the replica holds {guard.held} requests, its limit; retry shortly", True
    declared = headers.get(b"content-length", b"")
    if declared.isdigit() and int(declared) > guard.max_body_bytes:
        return 413, _too_large(guard.max_body_bytes), False
    return None


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, or :class:`BodyTooLarge` once more than ``limit`` bytes arrive."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def send_error(
    send: Send,
    path: str,
    status: int,
    message: str,
    retry: bool = False,
    overloaded: bool | None = None,
) -> None:
    """The error response of ``path``'s API family; 401s name the scheme, a refusal to retry
    says when. A refusal to retry is overload (TEI's 429) unless ``overloaded`` is False (the
    server starting: 503)."""
    overloaded = retry if overloaded is None else overloaded
    headers = [(b"content-type", b"application/json")]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if retry:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    dialect = dialect_of(path)
    status = error_status(dialect, status, overloaded)
    body = json.dumps(error_body(dialect, status, message, overloaded=overloaded)).encode()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
