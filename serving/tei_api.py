"""Text Embeddings Inference's API, one task per base URL: ``/tasks/{task}`` behaves as a TEI
server running that task's model (``/predict``, ``/embed``, ``/rerank``, ``/similarity``,
``/info``), and its root answers in the shapes ``huggingface_hub.InferenceClient(
base_url=".../tasks/{task}")`` parses (text and token classification, feature extraction,
sentence similarity). Errors are TEI's (:mod:`freemerge.serving.dialects`).

A text longer than the task's token limit is cut, as a TEI server started with
``--auto-truncate`` cuts it; ``truncate: false`` refuses it with 413 instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from freemerge.merging.kind_rules import (
    AGGREGATIONS,
    EMBEDDING,
    MULTI_LABEL,
    REGRESSION,
    SCORINGS,
    SEQUENCE_KINDS,
    SINGLE_LABEL,
    TOKEN_CLASSIFICATION,
)
from freemerge.serving.dialects import TEI
from freemerge.serving.dropin import DropInRoutes, Texts, error_responses, scored_labels
from freemerge.serving.requests import Prediction, RequestError
from freemerge.serving.settings import MAX_ITEMS_CEILING, MAX_TASK_CHARS

router = APIRouter(tags=["Text Embeddings Inference (one task per base URL)"])
ERRORS = error_responses(TEI)
TEI_ROUTE = {  # where each kind is served in this family
    SINGLE_LABEL: "/tasks/{task}/predict",
    MULTI_LABEL: "/tasks/{task}/predict",
    REGRESSION: "/tasks/{task}/predict",
    TOKEN_CLASSIFICATION: "/tasks/{task} (token classification)",
    EMBEDDING: "/tasks/{task}/embed",
}
MAX_LABELS = 256  # ignore_labels entries at most

Text = StrictStr
TaskName = Annotated[str, Path(max_length=MAX_TASK_CHARS, description="a task's name")]
Sequence = Annotated[list[StrictStr], Field(min_length=1, max_length=2)]


class Truncation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    truncate: StrictBool | None = Field(
        None,
        description="false: a text longer than the task's token limit is refused (413); true "
        "or null: it is cut (the server truncates, as TEI's --auto-truncate)",
    )
    truncation_direction: Literal["right", "Right"] | None = Field(
        None, description="only right: a long text loses its end"
    )


class TeiPredictBody(Truncation):
    inputs: (
        Text
        | Sequence
        | Annotated[list[Sequence], Field(min_length=1, max_length=MAX_ITEMS_CEILING)]
    ) = Field(
        ...,
        description='"text"; a pair ["text", "text_pair"] or ["text"] (one input); or a batch '
        '[["a"], ["b", "b_pair"]]',
    )
    raw_scores: StrictBool = Field(False, description="logits instead of probabilities")


class TeiEmbedBody(Truncation):
    inputs: Text | Texts
    normalize: StrictBool = Field(True, description="scale each embedding to unit length")
    prompt_name: None = Field(None, description="not supported: the tasks have no prompts")
    dimensions: StrictInt | None = Field(
        None, description="must be the embedding's own length when given"
    )


class TeiRerankBody(Truncation):
    query: Text
    texts: Texts
    raw_scores: StrictBool = Field(False, description="logits instead of probabilities")
    return_text: StrictBool = Field(False, description="each result holds its text")


class SimilarityInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_sentence: Text
    sentences: Texts


class SimilarityParameters(Truncation):
    prompt_name: None = Field(None, description="not supported: the tasks have no prompts")


class TeiSimilarityBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None


class RootParameters(SimilarityParameters):
    top_k: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="text classification: the k best labels (default all)"
    )
    function_to_apply: Literal[SCORINGS] | None = Field(  # type: ignore[valid-type]
        None, description="text classification: softmax, sigmoid or none (default the task's)"
    )
    aggregation_strategy: Literal[AGGREGATIONS] | None = Field(  # type: ignore[valid-type]
        None, description="token classification: how tokens are grouped (default simple)"
    )
    ignore_labels: Annotated[list[StrictStr], Field(max_length=MAX_LABELS)] | None = Field(
        None, description='token classification: entity labels left out (default ["O"])'
    )
    stride: None = Field(None, description="not supported: long texts are cut")


class TeiRootBody(TeiEmbedBody):
    """huggingface_hub's request for any kind: the fields of the task's kind only."""

    inputs: Text | Texts | SimilarityInputs
    normalize: StrictBool | None = None
    parameters: RootParameters | None = None
    encoding_format: Literal["float"] | None = None


ROOT_FIELDS = {  # the fields the root takes per kind, beside inputs
    "sequence": {"truncate", "truncation_direction", "top_k", "function_to_apply"},
    "similarity": {"truncate", "truncation_direction"},
    TOKEN_CLASSIFICATION: {"truncate", "truncation_direction", "aggregation_strategy"}
    | {"ignore_labels"},
    EMBEDDING: {"truncate", "truncation_direction", "normalize", "dimensions", "encoding_format"},
}


class LabelScore(BaseModel):
    score: float
    label: str


class RankedText(BaseModel):
    index: int
    score: float
    text: str | None = None


class TokenEntity(BaseModel):
    entity_group: str | None = None
    entity: str | None = None
    score: float
    word: str
    start: int
    end: int


class Info(BaseModel):
    model_id: str = Field(..., description="the task")
    model_sha: str = Field(..., description="the artifact version")
    model_dtype: str
    model_type: dict[str, dict[str, Any]]
    max_concurrent_requests: int
    max_input_length: int | None
    max_batch_tokens: int | None
    max_batch_requests: int
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    kind: str = Field(..., description="the task's kind")
    text_pairs: str


def _rows(inputs: str | list) -> tuple[list[str | tuple[str, str]], bool]:
    """A predict request's rows and whether it was one input (answered with a flat list)."""
    if isinstance(inputs, str):
        return [inputs], True
    if all(isinstance(item, str) for item in inputs):  # one input: ["a"] or the pair ["a", "b"]
        return [inputs[0] if len(inputs) == 1 else tuple(inputs)], True
    return [item[0] if len(item) == 1 else tuple(item) for item in inputs], False


def label_scores(prediction: Prediction, labels: list[str]) -> list[dict]:
    """A sequence answer as ``[{"score", "label"}]``, best first."""
    ranked = sorted(scored_labels(prediction, labels).items(), key=lambda pair: -pair[1])
    return [{"score": score, "label": label} for label, score in ranked]


def _options(body: Truncation, **more: Any) -> dict:
    return {"truncate": body.truncate is not False, **more}


def hub_entities(entities: list[dict], ignored: set[str], grouped: bool) -> list[dict]:
    """Entities in the token-classification pipeline's keys (``entity_group``, or ``entity``
    for tokens left ungrouped; ``word``)."""
    key = "entity_group" if grouped else "entity"
    return [
        {
            key: e["label"],
            "score": e["score"],
            "word": e["text"],
            "start": e["start"],
            "end": e["end"],
        }
        for e in entities
        if e["label"] not in ignored
    ]


def root_answer(
    found: list[Prediction], labels: list[str], single: bool, params: RootParameters
) -> Any:
    """huggingface_hub's shape of the root's answers, by the task's kind."""
    kind = found[0].kind
    if kind == EMBEDDING:
        return [p.embedding for p in found]
    if kind == TOKEN_CLASSIFICATION:
        ignored = set(params.ignore_labels if params.ignore_labels is not None else ["O"])
        grouped = (params.aggregation_strategy or "simple") != "none"
        answers = [hub_entities(p.entities, ignored, grouped) for p in found]
        return answers[0] if single else answers
    return [label_scores(p, labels)[: params.top_k] for p in found]


def cosines(source: list[float], others: list[list[float]]) -> list[float]:
    """Cosine similarity of unit vectors: their dot products."""
    return [sum(a * b for a, b in zip(source, other, strict=True)) for other in others]


class TeiRoutes(DropInRoutes):
    """TEI's routes under ``/tasks/{task}``; inherited by the HTTP front."""

    @router.post(
        "/tasks/{task}/predict",
        response_model=list[LabelScore] | list[list[LabelScore]],
        responses=ERRORS,
        summary="TEI /predict: a sequence task's labels, best first",
    )
    async def tei_predict(self, task: TaskName, body: TeiPredictBody) -> Any:
        rows, single = _rows(body.inputs)
        options = _options(body, function_to_apply="none" if body.raw_scores else None)
        found, labels = await self._predictions(
            task, "/tasks/{task}/predict", SEQUENCE_KINDS, TEI_ROUTE, rows, options
        )
        answers = [label_scores(p, labels) for p in found]
        return answers[0] if single else answers

    @router.post(
        "/tasks/{task}/embed",
        response_model=list[list[float]],
        responses=ERRORS,
        summary="TEI /embed: an embedding task's vectors, one per input",
    )
    async def tei_embed(self, task: TaskName, body: TeiEmbedBody) -> Any:
        rows = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        options = _options(body, normalize=body.normalize)
        found, _ = await self._predictions(
            task,
            "/tasks/{task}/embed",
            (EMBEDDING,),
            TEI_ROUTE,
            rows,
            options,
            lambda kind: self._dimensions_fit(task, body.dimensions),
        )
        return [p.embedding for p in found]

    @router.post(
        "/tasks/{task}/rerank",
        response_model=list[RankedText],
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="TEI /rerank: texts by their relevance to the query, best first",
    )
    async def tei_rerank(self, task: TaskName, body: TeiRerankBody) -> Any:
        rows = [(body.query, text) for text in body.texts]
        options = _options(body, function_to_apply="none" if body.raw_scores else None)
        found, _ = await self._predictions(
            task, "/tasks/{task}/rerank", (REGRESSION,), RERANK, rows, options
        )
        ranked = sorted(range(len(found)), key=lambda i: -found[i].score)
        text = (lambda i: body.texts[i]) if body.return_text else (lambda i: None)
        return [{"index": i, "score": found[i].score, "text": text(i)} for i in ranked]

    @router.post(
        "/tasks/{task}/similarity",
        response_model=list[float],
        responses=ERRORS,
        summary="TEI /similarity: cosine of the source sentence and each sentence",
    )
    async def tei_similarity(self, task: TaskName, body: TeiSimilarityBody) -> Any:
        truncation = body.parameters or SimilarityParameters()
        return await self._similarity(task, body.inputs, truncation, "/tasks/{task}/similarity")

    async def _similarity(
        self,
        task: str,
        inputs: SimilarityInputs,
        truncation: Truncation,
        route: str,
        fits: Callable[[str], None] | None = None,
    ) -> list[float]:
        rows = [inputs.source_sentence, *inputs.sentences]
        options = _options(truncation, normalize=True)
        found, _ = await self._predictions(
            task, route, (EMBEDDING,), TEI_ROUTE, rows, options, fits
        )
        return cosines(found[0].embedding, [p.embedding for p in found[1:]])

    @router.post(
        "/tasks/{task}",
        response_model=list[list[LabelScore]]
        | list[TokenEntity]
        | list[list[TokenEntity]]
        | list[list[float]]
        | list[float],
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="TEI's root, in huggingface_hub's shapes: text and token classification, "
        "feature extraction, sentence similarity, by the task's kind",
    )
    async def tei_root(self, task: TaskName, body: TeiRootBody) -> Any:
        params = body.parameters or RootParameters()
        similar = isinstance(body.inputs, SimilarityInputs)
        truncation = body if body.truncate is not None else params
        if similar:
            fits = lambda kind: self._root_fits(task, "similarity", body)  # noqa: E731
            return await self._similarity(task, body.inputs, truncation, "/tasks/{task}", fits)
        single = isinstance(body.inputs, str)
        options = _options(
            truncation,
            normalize=body.normalize is not False,
            function_to_apply=params.function_to_apply,
            aggregation=params.aggregation_strategy,
        )
        found, labels = await self._predictions(
            task,
            "/tasks/{task}",
            (*SEQUENCE_KINDS, TOKEN_CLASSIFICATION, EMBEDDING),
            TEI_ROUTE,
            [body.inputs] if single else body.inputs,
            options,
            lambda kind: self._root_fits(task, kind, body),
        )
        return root_answer(found, labels, single, params)

    def _root_fits(self, task: str, kind: str, body: TeiRootBody) -> None:
        """400 for a field the task's kind (or ``similarity``) does not take, a ``dimensions``
        not the embedding's, and a task that scores pairs."""
        params = body.parameters
        given = {name for name in body.model_fields_set if getattr(body, name) is not None}
        given |= {n for n in (params.model_fields_set if params else ()) if getattr(params, n)}
        group = "sequence" if kind in SEQUENCE_KINDS else kind
        stray = sorted(given - ROOT_FIELDS[group] - {"inputs", "parameters"})
        if stray:
            what = "sentence similarity" if kind == "similarity" else f"task {task!r} ({kind})"
            raise RequestError(400, f"`{stray[0]}` does not apply to {what}")
        if kind == EMBEDDING:
            self._dimensions_fit(task, body.dimensions)
        if self.front.task_kinds.pairs[task] == "required":
            raise RequestError(
                400, f"task {task!r} scores text pairs: send them to /tasks/{task}/rerank"
            )

    @router.get(
        "/tasks/{task}/info",
        response_model=Info,
        responses={status: ERRORS[status] for status in (401, 404, 422)},
        summary="TEI /info: the task's model, labels and the server's limits",
    )
    async def tei_info(self, task: TaskName) -> Any:
        kind = self.front.task_kinds.kind_of(task)
        entry, limits = await self._task_info(task)
        return {
            "model_id": task,
            "model_sha": limits["artifact_version"],
            "model_dtype": limits["dtype"],
            "model_type": model_type(kind, entry, self.front.embeddings.get(task)),
            "max_concurrent_requests": limits["max_queued_requests"],
            "max_input_length": entry.get("max_input_length"),
            "max_batch_tokens": limits["max_batch_tokens"],
            "max_batch_requests": limits["max_batch_size"],
            "max_client_batch_size": limits["max_items"],
            "auto_truncate": True,
            "tokenization_workers": 1,
            "version": limits["server_version"],
            "kind": kind,
            "text_pairs": entry["text_pairs"],
        }


RERANK = {
    **TEI_ROUTE,
    SINGLE_LABEL: "/tasks/{task}/predict (a reranker has one score)",
    MULTI_LABEL: "/tasks/{task}/predict (a reranker has one score)",
}


POOLING_NAMES = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}


def model_type(kind: str, entry: dict, embedding: dict | None) -> dict:
    """TEI's ``model_type``: an embedding model (its pooling, as TEI names it), a one-score
    reranker or a classifier."""
    if kind == EMBEDDING:
        modes = (embedding or {}).get("pooling") or []
        return {"embedding": {"pooling": "+".join(POOLING_NAMES.get(m, m) for m in modes)}}
    labels = entry["labels"] or ["LABEL_0"]
    maps = {
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    return {"reranker": maps} if kind == REGRESSION else {"classifier": maps}
