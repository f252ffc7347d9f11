"""Command-line tools: ``mixkv generate``, ``mixkv profile``, ``mixkv fidelity`` and an lmms-eval model."""

from __future__ import annotations

__all__: list[str] = []
