"""OpenAI's and vLLM's APIs, each task a model name: ``GET /v1/models`` and
``POST /v1/embeddings`` as OpenAI's API (and the ``openai`` client) has them; ``POST
/classify`` and ``POST /rerank`` (also ``/v1/rerank``, the Jina/Cohere shape) as vLLM's
pooling server has them. Errors nest as each family's do (:mod:`freemerge.serving.dialects`).
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from freemerge.merging.kind_rules import (
    EMBEDDING,
    MULTI_LABEL,
    REGRESSION,
    SEQUENCE_KINDS,
    SINGLE_LABEL,
    TOKEN_CLASSIFICATION,
)
from freemerge.serving.dialects import OPENAI, VLLM
from freemerge.serving.dropin import (
    DropInRoutes,
    Texts,
    error_responses,
    scored_labels,
    usage_tokens,
)
from freemerge.serving.requests import Prediction
from freemerge.serving.settings import MAX_TASK_CHARS

router = APIRouter(tags=["OpenAI and vLLM (each task a model)"])
OWNER = "freemerge"
ROUTE = {  # where each kind is served in this family
    SINGLE_LABEL: "/classify",
    MULTI_LABEL: "/classify",
    REGRESSION: "/classify",
    TOKEN_CLASSIFICATION: "/v1/classify (or /tasks/{task})",
    EMBEDDING: "/v1/embeddings",
}
RERANK_ROUTE = {**ROUTE, SINGLE_LABEL: "/classify (a reranker has one score)"}
RERANK_ROUTE[MULTI_LABEL] = RERANK_ROUTE[SINGLE_LABEL]

Model = Annotated[StrictStr, Field(max_length=MAX_TASK_CHARS, description="a task's name")]
User = Annotated[StrictStr, Field(max_length=MAX_TASK_CHARS)] | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: str = Field(..., description="the task's kind")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIEmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Model
    input: StrictStr | Texts = Field(..., description="a text or a list of texts")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes (the openai client's default)"
    )
    dimensions: StrictInt | None = Field(
        None, description="must be the embedding's own length when given"
    )
    user: User = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class VllmClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Model
    input: StrictStr | Texts = Field(..., description="a text or a list of texts")
    truncate_prompt_tokens: Literal[-1] | None = Field(
        None, description="-1 or null: texts are cut at the task's token limit"
    )
    use_activation: StrictBool | None = Field(
        None, description="false: raw logits instead of the task's probabilities"
    )
    priority: StrictInt = Field(0, description="accepted for vLLM clients; requests are FIFO")
    user: User = None


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyUsage(Usage):
    completion_tokens: int = 0


class ClassifyList(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage


class VllmRerankBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Model
    query: StrictStr
    documents: Texts
    top_n: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="the n most relevant documents (0: all)"
    )
    truncate_prompt_tokens: Literal[-1] | None = Field(
        None, description="-1 or null: pairs are cut at the task's token limit"
    )
    priority: StrictInt = Field(0, description="accepted for vLLM clients; requests are FIFO")
    user: User = None


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankList(BaseModel):
    id: str
    model: str
    usage: Usage
    results: list[RerankResult]


def encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as floats, or as base64 of its little-endian float32 bytes."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def class_probs(prediction: Prediction, labels: list[str]) -> tuple[str, list[float]]:
    """A sequence answer as vLLM's (label, probs in label order)."""
    scores = scored_labels(prediction, labels)
    return max(scores, key=scores.__getitem__), list(scores.values())


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


class OpenAIRoutes(DropInRoutes):
    """OpenAI's and vLLM's routes; inherited by the HTTP front."""

    @router.get(
        "/v1/models", response_model=ModelList, responses={401: error_responses(OPENAI)[401]}
    )
    async def openai_models(self) -> Any:
        """Every task as a model."""
        kinds = self.front.task_kinds.kinds
        created = self.front.created
        return {
            "object": "list",
            "data": [
                {"id": t, "object": "model", "created": created, "owned_by": OWNER, "kind": k}
                for t, k in kinds.items()
            ],
        }

    @router.get(
        "/v1/models/{model}",
        response_model=ModelCard,
        responses={s: error_responses(OPENAI)[s] for s in (400, 401, 404)},
    )
    async def openai_model(self, model: Annotated[str, Path(max_length=MAX_TASK_CHARS)]) -> Any:
        """One task as a model (``client.models.retrieve``)."""
        kind = self.front.task_kinds.kind_of(model)
        created = self.front.created
        return {"id": model, "object": "model", "created": created, "owned_by": OWNER, "kind": kind}

    @router.post("/v1/embeddings", response_model=EmbeddingList, responses=error_responses(OPENAI))
    async def openai_embeddings(self, body: OpenAIEmbeddingsBody) -> Any:
        """An embedding task's vectors, unit length, as floats or base64."""
        found, _ = await self._predictions(
            body.model,
            "/v1/embeddings",
            (EMBEDDING,),
            ROUTE,
            _texts(body.input),
            {},
            lambda kind: self._dimensions_fit(body.model, body.dimensions),
        )
        tokens = usage_tokens(found)
        return {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "embedding": encoded(p.embedding, body.encoding_format),
                    "index": i,
                }
                for i, p in enumerate(found)
            ],
            "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @router.post("/classify", response_model=ClassifyList, responses=error_responses(VLLM))
    async def vllm_classify(self, body: VllmClassifyBody) -> Any:
        """A sequence task's label and probabilities per text, as vLLM's ``/classify``."""
        options = {"function_to_apply": "none" if body.use_activation is False else None}
        found, labels = await self._predictions(
            body.model, "/classify", SEQUENCE_KINDS, ROUTE, _texts(body.input), options
        )
        data = []
        for i, prediction in enumerate(found):
            label, probs = class_probs(prediction, labels)
            data.append({"index": i, "label": label, "probs": probs, "num_classes": len(probs)})
        tokens = usage_tokens(found)
        return {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": body.model,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    @router.post("/rerank", response_model=RerankList, responses=error_responses(VLLM))
    async def vllm_rerank(self, body: VllmRerankBody) -> Any:
        """Documents by relevance to the query, best first (Jina/Cohere shape, as vLLM)."""
        return await self._reranked(body, "/rerank")

    @router.post("/v1/rerank", response_model=RerankList, responses=error_responses(VLLM))
    async def vllm_rerank_v1(self, body: VllmRerankBody) -> Any:
        """The same as ``/rerank``."""
        return await self._reranked(body, "/v1/rerank")

    async def _reranked(self, body: VllmRerankBody, route: str) -> dict:
        rows = [(body.query, document) for document in body.documents]
        found, _ = await self._predictions(body.model, route, (REGRESSION,), RERANK_ROUTE, rows)
        ranked = sorted(range(len(found)), key=lambda i: -found[i].score)
        tokens = usage_tokens(found)
        return {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": [
                {
                    "index": i,
                    "document": {"text": body.documents[i]},
                    "relevance_score": found[i].score,
                }
                for i in ranked[: body.top_n or None]
            ],
        }
