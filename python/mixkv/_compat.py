"""Differences between the supported transformers releases."""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=64)
def _keyword_of(model_type: type) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model: Any) -> str:
    """The keyword with which ``model`` (its forward and ``generate``) takes a cache.

    transformers renamed ``past_key_values`` to ``cache`` in 5.24 (the old name still works there,
    with a deprecation warning); earlier releases know only ``past_key_values``.
    """
    return _keyword_of(type(model))


def cache_kwargs(model: Any, cache: object) -> dict[str, object]:
    """``{keyword: cache}`` for ``model(...)`` or ``model.generate(...)`` (empty when cache is None)."""
    return {} if cache is None else {cache_keyword(model): cache}
