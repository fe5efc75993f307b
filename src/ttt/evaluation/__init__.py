"""Evaluation of causal LMs: loss, perplexity, bits per byte and loss by position (:mod:`.metrics`),
loading saved models and runs (:mod:`.loading`), text generation, the MQAR recall benchmark
(:mod:`.mqar`) and plots."""

from .metrics import (
    EvalResult,
    EvaluationError,
    document_windows,
    evaluate,
    iter_documents,
    unigram_baseline,
)
from .mqar import generate_mqar

__all__ = [
    "EvalResult",
    "EvaluationError",
    "document_windows",
    "evaluate",
    "generate_mqar",
    "iter_documents",
    "unigram_baseline",
]
