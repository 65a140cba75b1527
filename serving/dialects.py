"""The API families the server speaks, told apart by path, and how each shapes its errors.

- ``native``: ``/v1/classify``, ``/v1/embed``, ``/v1/tasks``: ``{"error": message, ...}``.
- ``tei``: ``/tasks/{task}`` and below, Text Embeddings Inference's routes for one task:
  ``{"error": message, "error_type": "Validation"}`` with TEI's statuses (a bad request is
  422; overloaded is 429 ``Overloaded``; no model replica is 503 ``Unhealthy``).
- ``openai``: ``/v1/models``, ``/v1/models/{model}``, ``/v1/embeddings``: ``{"error":
  {"message", "type", "param", "code"}}`` as OpenAI's API nests it (``code`` a string or
  null).
- ``vllm``: ``/classify``, ``/rerank``, ``/v1/rerank``: the same nesting as vLLM gives it
  (``type`` such as ``BadRequestError``, ``code`` the HTTP status).

A client's mistake is a 4xx on every family (the ``openai`` client retries 5xx, 408, 409 and
429). No Ray and no torch here: the guard uses this module before a request is read.
"""

from __future__ import annotations

NATIVE, TEI, OPENAI, VLLM = "native", "tei", "openai", "vllm"
TEI_PREFIX = "/tasks/"
OPENAI_PATHS = {"/v1/models": "/v1/models", "/v1/embeddings": "/v1/embeddings"}
MODELS_PREFIX = "/v1/models/"
VLLM_PATHS = {"/classify": "/classify", "/rerank": "/rerank", "/v1/rerank": "/v1/rerank"}
NATIVE_PATHS = ("/v1/classify", "/v1/embed", "/v1/tasks", "/healthz", "/readyz")
TEI_ROUTES = ("predict", "embed", "rerank", "similarity", "info")
VLLM_TYPES = {  # vLLM's error `type` per status
    400: "BadRequestError",
    401: "UnauthorizedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
# Open without a key: our probes, the OpenAPI page, and Ray's own probe (`/-/healthz`, answered
# by Ray's proxy and by each front replica before the app; HAProxy checks the fronts with it).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/-/healthz"})


def dialect_of(path: str) -> str:
    """The API family a request path belongs to (``native`` for any path of no family)."""
    if path.startswith(TEI_PREFIX):
        return TEI
    if path in OPENAI_PATHS or path.startswith(MODELS_PREFIX):
        return OPENAI
    if path in VLLM_PATHS:
        return VLLM
    return NATIVE


def route_label(path: str) -> str:
    """The route a path is served by, as a bounded metrics label: the task in a TEI path is
    replaced by ``{task}``; a path the server does not serve is ``other``."""
    if path in NATIVE_PATHS or path in OPENAI_PATHS or path in VLLM_PATHS:
        return path
    if path.startswith(MODELS_PREFIX) and "/" not in path[len(MODELS_PREFIX) :]:
        return "/v1/models/{model}"
    if path.startswith(TEI_PREFIX):
        parts = path[len(TEI_PREFIX) :].split("/")
        if len(parts) == 1 and parts[0]:
            return "/tasks/{task}"
        if len(parts) == 2 and parts[0] and parts[1] in TEI_ROUTES:
            return f"/tasks/{{task}}/{parts[1]}"
    return "other"


def needs_key(path: str) -> bool:
    """Whether a path needs the API key when the server has keys: all but the probes and the
    OpenAPI page."""
    return path not in OPEN_PATHS


def error_status(dialect: str, status: int, overloaded: bool = False) -> int:
    """The status a family gives for one of ours: TEI answers a bad request with 422 and
    overload with 429 (an unhealthy server keeps 503); the others keep ours."""
    if dialect == TEI and status == 400:
        return 422
    if dialect == TEI and overloaded:
        return 429
    return status


def error_body(
    dialect: str,
    status: int,
    message: str,
    details: dict | None = None,
    overloaded: bool = False,
    param: str | None = None,
) -> dict:
    """The JSON error body of ``dialect`` for an error of (already mapped) ``status``;
    ``details`` are extra fields of the native body (``unrouted``), ``param`` the request
    field at fault where known."""
    param = param or (details or {}).get("param")
    if dialect == TEI:
        return {"error": message, "error_type": _tei_type(status, overloaded)}
    if dialect == OPENAI:
        code = {401: "invalid_api_key", 404: "model_not_found"}.get(status)
        kind = "invalid_request_error" if status < 500 else "server_error"
        if status == 429 or overloaded:
            kind = "overloaded_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    if dialect == VLLM:
        kind = VLLM_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
        return {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return {"error": message, **(details or {})}


def _tei_type(status: int, overloaded: bool) -> str:
    if overloaded or status == 429:
        return "Overloaded"
    if status == 503:
        return "Unhealthy"
    if status >= 500:
        return "Backend"
    return "Validation"
