"""The JSON result file: environment metadata and the rows of each benchmark part."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

import torch

PARTS: tuple[str, ...] = ("e2e", "e2e_median", "mix_overhead", "mix_cost", "compress", "throughput", "memory")


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and library versions, with the date."""
    import transformers

    try:
        import mixkv

        mixkv_version = str(mixkv.__version__)
    except ImportError:
        mixkv_version = "unavailable"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "mixkv": mixkv_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(path: Path, meta: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> Path:
    """Writes ``{"meta": ..., <part>: [rows]}`` as indented JSON (parent directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"meta": meta}
    for part in PARTS:
        payload[part] = list(results.get(part, []))
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
