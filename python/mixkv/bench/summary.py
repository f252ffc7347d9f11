"""Medians over repeated end-to-end runs and the cost of MixKV against its base policy.

Runs are repeated interleaved (every method once per round), so slow drifts of the machine touch
every method alike. A MixKV run is compared with its base policy's run of the same round (adjacent
in time); the median of those per-round ratios is the reported overhead.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

KEYS: tuple[str, ...] = ("prefill_s", "total_s", "decode_ms_per_token", "peak_bytes", "cache_bytes")


def _ok(row: dict[str, Any]) -> bool:
    return not row.get("error") and row.get("batch", 1) == 1


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def median_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, length, method): the median of each measurement over its repeats."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        if _ok(row):
            groups.setdefault((row["model"], row["length"], row["method"]), []).append(row)
    out: list[dict[str, Any]] = []
    for runs in groups.values():
        merged: dict[str, Any] = {k: v for k, v in runs[0].items() if k not in KEYS and k != "repeat"}
        merged["runs"] = len(runs)
        for key in KEYS:
            values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
            med = _median(values)
            merged[key] = int(med) if key.endswith("bytes") and med is not None else med
        totals = [r["total_s"] for r in runs if isinstance(r.get("total_s"), int | float)]
        if len(totals) > 1:
            merged["total_s_min"], merged["total_s_max"] = min(totals), max(totals)
        out.append(merged)
    return out


def mix_overhead(rows: Sequence[dict[str, Any]], tolerance: float = 0.02) -> list[dict[str, Any]]:
    """Per (model, length, policy): +MixKV total time against the base policy's, round by round."""
    by_key: dict[tuple[str, int, str, bool], dict[int, dict[str, Any]]] = {}
    for row in rows:
        if _ok(row) and row.get("policy"):
            key = (row["model"], row["length"], row["policy"], bool(row.get("mix")))
            by_key.setdefault(key, {})[int(row.get("repeat", 0))] = row
    out: list[dict[str, Any]] = []
    for (model, length, policy, mix), mixed in by_key.items():
        base = by_key.get((model, length, policy, False))
        if not mix or base is None:
            continue
        rounds = sorted(set(mixed) & set(base))
        if not rounds:
            continue
        ratios = [mixed[r]["total_s"] / base[r]["total_s"] for r in rounds]
        prefill = [mixed[r]["prefill_s"] - base[r]["prefill_s"] for r in rounds]
        ratio = statistics.median(ratios)
        out.append(
            {
                "model": model,
                "length": length,
                "policy": policy,
                "rounds": len(rounds),
                "base_total_s": statistics.median(base[r]["total_s"] for r in rounds),
                "mix_total_s": statistics.median(mixed[r]["total_s"] for r in rounds),
                "total_ratio": ratio,
                "total_ratio_min": min(ratios),
                "total_ratio_max": max(ratios),
                "prefill_delta_s": statistics.median(prefill),
                "within_tolerance": abs(ratio - 1.0) <= tolerance,
                "tolerance": tolerance,
            }
        )
    return out


def prefill_cost_row(
    model: str,
    length: int,
    policy: str,
    base: Sequence[float],
    mixed: Sequence[float],
    *,
    base_total_s: float | None = None,
    tolerance: float = 0.02,
) -> dict[str, Any]:
    """The prefill time MixKV adds to ``policy``: median of the per-round differences.

    ``base`` and ``mixed`` are prefill seconds of interleaved rounds (index = round). MixKV changes
    only the prefill's scoring (the decode then runs on caches of the same sizes), so with the base
    policy's end-to-end total this gives the share of the total that MixKV costs.
    """
    row: dict[str, Any] = {"model": model, "length": length, "policy": policy}
    rounds = min(len(base), len(mixed))
    if rounds == 0:
        return row | {"error": "no successful prefill pair"}
    deltas = [mixed[i] - base[i] for i in range(rounds)]
    delta = statistics.median(deltas)
    row |= {
        "rounds": rounds,
        "base_prefill_s": statistics.median(base[:rounds]),
        "mix_prefill_s": statistics.median(mixed[:rounds]),
        "prefill_delta_s": delta,
        "prefill_delta_min_s": min(deltas),
        "prefill_delta_max_s": max(deltas),
        "base_total_s": base_total_s,
        "total_share": None,
        "within_tolerance": None,
        "tolerance": tolerance,
    }
    if base_total_s:
        row["total_share"] = delta / base_total_s
        row["within_tolerance"] = abs(delta) / base_total_s <= tolerance
    return row
