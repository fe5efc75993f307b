"""Evaluation of causal LMs (loss, perplexity, bits per byte, loss by position), plots, the comparison
study (:mod:`ttt.evaluation.compare`) and the MQAR recall benchmark (:mod:`ttt.evaluation.mqar`)."""

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
