"""Head tables in their published JSON formats, and the measurements that fill them.

- MixKV redundancy: ``{"<layer>-<kv_head>-key": [r per sample], "<layer>-<kv_head>-value": [...]}``
- SparseMM visual heads: ``{"<layer>-<q_head>": [score per sample]}``
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch


def redundancy_torch(x: torch.Tensor, valid_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Mean pairwise cosine similarity of each head's vectors (SPEC §4), float32 [B, H].

    r = (n * |m|^2 - 1) / (n - 1) with m the mean of the unit vectors, clamped to [0, 1]; a head with
    one token has r = 0. Left padding: only the last ``valid_lengths[b]`` tokens count.
    """
    b, _, n, _ = x.shape
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if valid_lengths is None:
        lengths = torch.full((b,), n, dtype=torch.float32, device=x.device)
    else:
        lengths = valid_lengths.to(device=x.device, dtype=torch.float32)
        pos = torch.arange(n, device=x.device)
        keep = pos.view(1, n) >= (n - valid_lengths.to(x.device).view(b, 1))
        unit = unit * keep.view(b, 1, n, 1)
    m = unit.sum(dim=2) / lengths.view(b, 1, 1)
    nn = lengths.view(b, 1)
    r = (nn * (m * m).sum(-1) - 1.0) / (nn - 1.0).clamp_min(1.0)
    r = torch.where(nn > 1, r, torch.zeros_like(r))
    return r.clamp(0.0, 1.0)


def head_redundancy(x: torch.Tensor, valid_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``mixkv.ops.head_redundancy`` when the core provides it, else the PyTorch formula above."""
    try:
        from mixkv.ops import head_redundancy as core_redundancy
    except ImportError:
        return redundancy_torch(x, valid_lengths)
    try:
        return core_redundancy(x.contiguous(), valid_lengths)
    except (RuntimeError, NotImplementedError):  # a build whose core op is not implemented
        return redundancy_torch(x, valid_lengths)


def redundancy_json(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Per-sample [S, L, Hkv] tensors (one per sample, stacked) -> the MixKV published format."""
    k = torch.stack(list(keys)).float().cpu()  # [S, L, H]
    v = torch.stack(list(values)).float().cpu()
    out: dict[str, list[float]] = {}
    for layer in range(k.shape[1]):
        for head in range(k.shape[2]):
            out[f"{layer}-{head}-key"] = [float(x) for x in k[:, layer, head]]
            out[f"{layer}-{head}-value"] = [float(x) for x in v[:, layer, head]]
    return out


def visual_heads_json(scores: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Per-sample [L, Hq] visual-head scores -> the SparseMM published format."""
    s = torch.stack(list(scores)).float().cpu()  # [S, L, Hq]
    return {
        f"{layer}-{head}": [float(x) for x in s[:, layer, head]]
        for layer in range(s.shape[1])
        for head in range(s.shape[2])
    }


def table_matrix(table: dict[str, list[float]], suffix: str | None = None) -> torch.Tensor:
    """A published table -> float32 [L, H] of per-sample means (``suffix`` "key"/"value" or None)."""
    cells: dict[tuple[int, int], float] = {}
    for name, samples in table.items():
        parts = name.split("-")
        if suffix is not None:
            if len(parts) != 3 or parts[2] != suffix:
                continue
        elif len(parts) != 2:
            continue
        cells[(int(parts[0]), int(parts[1]))] = sum(samples) / max(len(samples), 1)
    if not cells:
        raise ValueError("the table has no entries of the expected form")
    n_layers = 1 + max(layer for layer, _ in cells)
    n_heads = 1 + max(head for _, head in cells)
    out = torch.full((n_layers, n_heads), float("nan"))
    for (layer, head), value in cells.items():
        out[layer, head] = value
    return out


def write_json(path: str | Path, table: dict[str, list[float]]) -> None:
    p = Path(path)
    if p.parent != Path():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(table, indent=1) + "\n")


def heatmap(matrix: torch.Tensor, path: str | Path, title: str, xlabel: str) -> bool:
    """Write a heat map PNG; False (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the heat map {path}")
        return False
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * matrix.shape[1] + 2), max(3.0, 0.18 * matrix.shape[0] + 1.5)))
    im = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
