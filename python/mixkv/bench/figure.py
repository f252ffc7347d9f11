"""The efficiency figure: per model, grouped bars of total time and peak memory for each method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixkv.bench.methods import ALL_METHODS

COLORS: dict[str, str] = {
    "full": "#7f7f7f",
    "snapkv": "#9ecae1",
    "snapkv+mixkv": "#3182bd",
    "pyramidkv": "#a1d99b",
    "pyramidkv+mixkv": "#31a354",
    "adakv": "#fdae6b",
    "adakv+mixkv": "#e6550d",
    "sparsemm": "#bcbddc",
    "sparsemm+mixkv": "#756bb1",
}
LABELS: dict[str, str] = {m.name: m.label for m in ALL_METHODS}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw_efficiency(rows: Sequence[dict[str, Any]], path: Path, *, length: int, title: str = "") -> Path | None:
    """Draws total seconds (top) and peak GB (bottom) per method, one column per model, at ``length``.

    Returns the PNG path, or None (with a message) when matplotlib is missing or nothing matches.
    """
    if not have_matplotlib():
        print("figure: matplotlib is not installed; skipping the figure (pip install matplotlib)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in rows if r.get("length") == length and not r.get("error") and r.get("batch", 1) == 1]
    models = list(dict.fromkeys(r["model"] for r in usable))
    if not models:
        print(f"figure: no successful runs at length {length}; nothing to draw")
        return None
    order = [m.name for m in ALL_METHODS]
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models) + 1.5, 6.4), squeeze=False)
    for col, model in enumerate(models):
        mine = {r["method"]: r for r in usable if r["model"] == model}
        methods = [m for m in order if m in mine]
        xs = list(range(len(methods)))
        colors = [COLORS.get(m, "#333333") for m in methods]
        metrics = (
            ("total_s", "Total time (s)", 1.0, "{:.1f}"),
            ("peak_bytes", "Peak memory (GB)", 1e-9, "{:.2f}"),
        )
        for row_idx, (key, ylabel, scale, fmt) in enumerate(metrics):
            ax = axes[row_idx][col]
            values = [(mine[m].get(key) or 0) * scale for m in methods]
            bars = ax.bar(xs, values, color=colors, edgecolor="black", linewidth=0.5)
            for bar, value in zip(bars, values, strict=True):
                ax.annotate(
                    fmt.format(value),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90 if len(methods) > 5 else 0,
                )
            ax.set_xticks(xs)
            ax.set_xticklabels([LABELS.get(m, m) for m in methods], rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_ylim(0, max([*values, 1e-09]) * 1.25)
            ax.grid(axis="y", alpha=0.3)
            if row_idx == 0:
                ax.set_title(model)
    fig.suptitle(title or f"{length:,}-token prompts", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
