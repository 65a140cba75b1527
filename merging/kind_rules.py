"""Task kinds as data: their names, the route that serves each, whether a kind takes text
pairs, how its logits become scores, and the options a request may set, with their defaults.

The torch-free half of the kind seam (:mod:`freemerge.merging.kinds` computes each kind's
answers): the HTTP fronts check requests with it and never load torch or transformers.
"""

from __future__ import annotations

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
TOKEN_CLASSIFICATION = "token_classification"
EMBEDDING = "embedding"
TASK_KINDS = (SINGLE_LABEL, MULTI_LABEL, REGRESSION, TOKEN_CLASSIFICATION, EMBEDDING)
SEQUENCE_KINDS = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)
# The route that serves each kind.
CLASSIFY_ROUTE, EMBED_ROUTE = "/v1/classify", "/v1/embed"
ROUTE_OF_KIND = {kind: CLASSIFY_ROUTE for kind in TASK_KINDS} | {EMBEDDING: EMBED_ROUTE}
# transformers' AggregationStrategy values (a test holds them equal), named here so that a
# front checks a request's `aggregation` without importing transformers' pipelines.
AGGREGATIONS = ("none", "simple", "first", "average", "max")
DEFAULT_AGGREGATION = "simple"
DEFAULT_THRESHOLD = 0.5
SCORINGS = ("softmax", "sigmoid", "none")  # as transformers' `function_to_apply`
DEFAULT_OPTIONS = {
    "threshold": DEFAULT_THRESHOLD,
    "aggregation": DEFAULT_AGGREGATION,
    "normalize": True,
    "function_to_apply": None,  # sequence tasks: None keeps the task's own scoring
    "truncate": True,  # False: a text longer than the task's token limit is refused (413)
}


def scoring_of(kind: str, config: dict) -> str | None:
    """How a sequence task's logits become scores, as transformers' text-classification
    pipeline applies them: ``softmax`` (single-label), ``sigmoid`` (multi-label, and a one-label
    model without ``problem_type``, such as a cross-encoder reranker), ``none`` (regression)."""
    if kind == SINGLE_LABEL:
        return "softmax"
    if kind == MULTI_LABEL or (kind == REGRESSION and config.get("problem_type") != REGRESSION):
        return "sigmoid"
    return "none" if kind == REGRESSION else None


def takes_pairs(kind: str, config: dict) -> str:
    """Whether a task's inputs may be text pairs: ``required`` for a sentence-transformers
    cross-encoder (its config.json holds a ``sentence_transformers`` block), ``accepted`` for
    other sequence tasks, ``refused`` for token and embedding tasks."""
    if kind not in SEQUENCE_KINDS:
        return "refused"
    return "required" if isinstance(config.get("sentence_transformers"), dict) else "accepted"
