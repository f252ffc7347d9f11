"""GPU benchmarks for mixkv: end-to-end efficiency, the compression step, batch throughput, memory."""

from __future__ import annotations

__all__: list[str] = []
