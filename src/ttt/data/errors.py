"""The data layer's exception."""

from __future__ import annotations


class DataError(ValueError):
    """Bad corpus, tokenizer or data setting; raised before any training starts.

    Messages name the offending file, field or number and say how to fix it.
    """
