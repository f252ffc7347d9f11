"""Aggregating ``mixkv fidelity`` results over seeds: summary rows, the MixKV effect, tables and plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

METRICS: tuple[str, ...] = ("kl_mean", "top1_agreement", "attn_rel_err_mean")


@dataclass
class Result:
    """One (model, image, seed, cache, budget) run compared with the full cache."""

    model: str
    image: str
    seed: int
    cache: str
    policy: str
    mix: str
    budget: int
    prompt_tokens: int
    steps: int  # decode forwards compared
    kl_mean: float  # mean over the decode steps of KL(p_full || p_cache)
    kl_max: float
    top1_agreement: float  # share of decode steps whose argmax equals the full cache's
    attn_rel_err_mean: float  # mean over layers of attn_rel_err_per_layer
    attn_rel_err_per_layer: list[float] = field(default_factory=list)
    kl_per_step: list[float] = field(default_factory=list)
    prefill_kl: float = 0.0  # the prompt's own next-token distribution (before any decode step)
    cache_bytes: int = 0
    full_cache_bytes: int = 0


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds (0 with one seed)
    lo: float
    hi: float

    @staticmethod
    def of(values: Sequence[float]) -> Stat:
        vals = list(values)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return Stat(statistics.fmean(vals), std, min(vals), max(vals))


def _key(r: Result) -> tuple[str, str, str, int]:
    return (r.model, r.image, r.cache, r.budget)


def summarize(results: Sequence[Result]) -> list[dict[str, object]]:
    """One row per (model, image, cache, budget): mean, std, min, max over seeds of each metric."""
    groups: dict[tuple[str, str, str, int], list[Result]] = {}
    for r in results:
        groups.setdefault(_key(r), []).append(r)
    rows: list[dict[str, object]] = []
    for (model, image, cache, budget), rs in groups.items():
        row: dict[str, object] = {
            "model": model,
            "image": image,
            "cache": cache,
            "policy": rs[0].policy,
            "mix": rs[0].mix,
            "budget": budget,
            "seeds": len(rs),
            "prompt_tokens": rs[0].prompt_tokens,
            "cache_fraction": statistics.fmean(r.cache_bytes / max(r.full_cache_bytes, 1) for r in rs),
        }
        for metric in METRICS:
            row[metric] = vars(Stat.of([getattr(r, metric) for r in rs]))
        rows.append(row)
    return rows


def mix_effect(results: Sequence[Result]) -> list[dict[str, object]]:
    """Per (model, image, policy, budget): MixKV against the same policy without it, seed by seed.

    ``kl_ratio``: KL(mix) / KL(off) per seed (< 1: MixKV moved the model less); ``kl_wins``,
    ``attn_wins``: seeds where MixKV's KL / attention error is the lower; ``top1_diff``: top-1
    agreement of MixKV minus that of the policy alone.
    """
    by_seed: dict[tuple[str, str, str, int, int, str], Result] = {}
    for r in results:
        by_seed[(r.model, r.image, r.policy, r.budget, r.seed, r.mix)] = r
    rows: list[dict[str, object]] = []
    done: set[tuple[str, str, str, int]] = set()
    for model, image, policy, budget, _seed, mix in by_seed:
        key = (model, image, policy, budget)
        if mix != "mixkv" or key in done:
            continue
        done.add(key)
        pairs = [
            (by_seed[(model, image, policy, budget, s, "off")], by_seed[(model, image, policy, budget, s, "mixkv")])
            for (m, i, p, b, s, x) in by_seed
            if (m, i, p, b, x) == (model, image, policy, budget, "mixkv")
            and (model, image, policy, budget, s, "off") in by_seed
        ]
        if not pairs:
            continue
        ratios = [on.kl_mean / off.kl_mean if off.kl_mean > 0 else math.nan for off, on in pairs]
        rows.append(
            {
                "model": model,
                "image": image,
                "policy": policy,
                "budget": budget,
                "seeds": len(pairs),
                "kl_ratio": vars(Stat.of(ratios)),
                "kl_wins": sum(on.kl_mean < off.kl_mean for off, on in pairs),
                "attn_wins": sum(on.attn_rel_err_mean < off.attn_rel_err_mean for off, on in pairs),
                "top1_diff": vars(Stat.of([on.top1_agreement - off.top1_agreement for off, on in pairs])),
            }
        )
    return rows


def _pm(stat: object, fmt: str, seeds: object = 2) -> str:
    """mean ± std (the mean alone for one seed)."""
    assert isinstance(stat, dict)
    if seeds == 1:
        return f"{stat['mean']:{fmt}}"
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def summary_markdown(rows: Sequence[dict[str, object]]) -> str:
    lines = [
        "| model | image | cache | budget | prompt | kept | KL(full ‖ cache) | top-1 agreement | attn rel. error |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['image']} | {r['cache']} | {r['budget']} | {r['prompt_tokens']} | "
            f"{float(r['cache_fraction']):.1%} | {_pm(r['kl_mean'], '.2e', r['seeds'])} | "  # type: ignore[arg-type]
            f"{_pm(r['top1_agreement'], '.3f', r['seeds'])} | {_pm(r['attn_rel_err_mean'], '.3f', r['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def effect_markdown(rows: Sequence[dict[str, object]]) -> str:
    lines = [
        "| model | image | policy | budget | KL ratio mix/off | KL wins | attn-error wins | top-1 diff |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n = r["seeds"]
        lines.append(
            f"| {r['model']} | {r['image']} | {r['policy']} | {r['budget']} | {_pm(r['kl_ratio'], '.3f', n)} | "
            f"{r['kl_wins']}/{n} | {r['attn_wins']}/{n} | {_pm(r['top1_diff'], '+.3f', n)} |"
        )
    return "\n".join(lines) + "\n"


def compact_markdown(rows: Sequence[dict[str, object]], metric: str = "kl_mean", fmt: str = ".2e") -> str:
    """One table per model: a row per (policy, budget), a column per (image, without / with MixKV)."""
    cells: dict[tuple[str, str, int, str, str], str] = {}
    for r in rows:
        if r["mix"] not in ("off", "mixkv"):
            continue
        key = (str(r["model"]), str(r["policy"]), int(r["budget"]), str(r["image"]), str(r["mix"]))  # type: ignore[call-overload]
        cells[key] = _pm(r[metric], fmt, r["seeds"])
    out: list[str] = []
    for model in sorted({k[0] for k in cells}):
        images = sorted({k[3] for k in cells if k[0] == model})
        head = " | ".join(f"{i} | {i} +MixKV" for i in images)
        out += [f"| {model}: policy | budget | {head} |", "|---|---:|" + "---:|" * (2 * len(images))]
        seen: list[tuple[str, int]] = []
        for k in cells:
            if k[0] == model and (k[1], k[2]) not in seen:
                seen.append((k[1], k[2]))
        for policy, budget in seen:
            vals = [cells.get((model, policy, budget, i, m), "") for i in images for m in ("off", "mixkv")]
            out.append(f"| {policy} | {budget} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: Sequence[dict[str, object]], path: Path) -> bool:
    """KL, top-1 agreement and attention error against budget (mean ± std over seeds), one column per
    (model, image); each policy solid, its MixKV variant dashed in the same colour."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path}")
        return False
    groups = sorted({(str(r["model"]), str(r["image"])) for r in rows})
    panels = (("kl_mean", "next-token KL(full ‖ cache)"), ("top1_agreement", "top-1 agreement"))
    panels += (("attn_rel_err_mean", "attention-output rel. error"),)
    fig, axes = plt.subplots(len(panels), len(groups), figsize=(5 * len(groups), 3.3 * len(panels)), squeeze=False)
    policies = sorted({str(r["policy"]) for r in rows if r["policy"] != "full"})
    colours = {p: f"C{i}" for i, p in enumerate(policies)}
    for col, (model, image) in enumerate(groups):
        mine = [r for r in rows if (r["model"], r["image"]) == (model, image) and r["policy"] != "full"]
        for cache in sorted({str(r["cache"]) for r in mine}):
            pts = sorted((r for r in mine if r["cache"] == cache), key=lambda r: int(r["budget"]))  # type: ignore[call-overload]
            policy = str(pts[0]["policy"])
            style = "-" if pts[0]["mix"] == "off" else "--"
            # policies side by side around each budget, so that coinciding curves stay visible
            shift = 1.0 + 0.025 * (policies.index(policy) - (len(policies) - 1) / 2)
            xs = [int(r["budget"]) * shift for r in pts]  # type: ignore[call-overload]
            for row, (metric, label) in enumerate(panels):
                ys = [float(r[metric]["mean"]) for r in pts]  # type: ignore[index]
                es = [float(r[metric]["std"]) for r in pts]  # type: ignore[index]
                ax = axes[row][col]
                ax.errorbar(xs, ys, yerr=es, fmt=style, marker="o", ms=3, capsize=2, color=colours[policy], label=cache)
                ax.set_ylabel(label)
        axes[0][col].set_title(f"{model} / {image}")
        axes[0][col].set_yscale("log")
        axes[1][col].set_ylim(-0.05, 1.05)
        budgets = sorted({int(r["budget"]) for r in mine})  # type: ignore[call-overload]
        for row in range(len(panels)):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(budgets, [str(b) for b in budgets])
            axes[row][col].set_xlabel("budget (tokens per head)")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
