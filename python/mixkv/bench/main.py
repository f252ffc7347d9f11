"""`mixkv bench`: end-to-end efficiency, the compression step, batch throughput and a memory breakdown.

Random-weight models at the real dimensions of LLaVA-NeXT-Mistral-7B, Qwen2-VL-7B and InternVL3-8B
(bf16, built on the GPU from the shipped configs; nothing is downloaded). Prompts are one image plus
random text of an exact length; generation is greedy with no early stop. Without a CUDA device the
command prints the plan and exits.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixkv.bench.methods import ALL_METHODS, Method, parse_method
from mixkv.bench.models import ModelSpec, attention_dims, load_config, resolve_model
from mixkv.bench.prompts import choose_image
from mixkv.bench.report import environment, write_results

ALL_PARTS: tuple[str, ...] = ("compress", "e2e", "mixcost", "memory", "throughput")

QUICK: dict[str, Any] = {
    "models": ["llava-next-mistral-7b"],
    "lengths": [2000],
    "methods": ["full", "snapkv", "adakv+mixkv"],
    "new_tokens": 16,
    "repeats": 1,
    "mix_cost_rounds": 3,
    "throughput_length": 2000,
    "throughput_new_tokens": 8,
    "throughput_cap_s": 30.0,
    "throughput_max_batch": 8,
    "compress_length": 8000,
    "compress_reps": 5,
    "loop_reps": 2,
}
DEFAULTS: dict[str, Any] = {
    "models": ["llava-next-mistral-7b", "qwen2-vl-7b", "internvl3-8b"],
    "lengths": [32000, 2000, 8000],
    "methods": [m.name for m in ALL_METHODS],
    "new_tokens": 512,
    "repeats": 1,
    "mix_cost_rounds": 7,
    "throughput_length": 32000,
    "throughput_new_tokens": 32,
    "throughput_cap_s": 240.0,
    "throughput_max_batch": 256,
    "compress_length": 32000,
    "compress_reps": 20,
    "loop_reps": 5,
}


@dataclass
class Settings:
    """Resolved options."""

    models: list[ModelSpec]
    lengths: list[int]
    methods: list[Method]
    parts: list[str]
    new_tokens: int
    repeats: int
    warm_full: bool
    mix_cost_rounds: int
    budget: int
    throughput_length: int
    throughput_methods: list[Method]
    throughput_new_tokens: int
    throughput_cap_s: float
    throughput_max_batch: int
    compress_length: int
    compress_reps: int
    loop_reps: int
    out_dir: Path
    device: str
    seed: int
    progress: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixkv bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--models", nargs="+", help=f"models or aliases (default: {' '.join(DEFAULTS['models'])})")
    add("--lengths", nargs="+", type=int, help="prompt lengths in tokens (default: 32000 2000 8000)")
    add("--methods", nargs="+", help="full, <policy>, <policy>+mixkv (default: all nine)")
    add("--parts", nargs="+", choices=ALL_PARTS, default=list(ALL_PARTS), help="benchmark parts to run")
    add("--new-tokens", type=int, help="tokens generated per run, no early stop (default: 512)")
    add(
        "--repeats",
        type=int,
        help="rounds of end-to-end runs, interleaved (every method once per round; medians reported; default 1)",
    )
    add(
        "--no-warm-full",
        action="store_true",
        help="skip the untimed full-cache run made at each length before timing (its first run is slower)",
    )
    add("--mix-cost-rounds", type=int, help="interleaved prefill-only rounds of the MixKV cost (default: 7)")
    add("--budget", type=int, default=64, help="cache budget per head, window included (default: 64)")
    add("--throughput-length", type=int, help="prompt length of the batch search (default: 32000)")
    add(
        "--throughput-methods",
        nargs="+",
        default=["full", "adakv+mixkv"],
        help="methods of the batch search (default: full adakv+mixkv)",
    )
    add("--throughput-new-tokens", type=int, help="tokens generated when measuring decode tokens/s (default: 32)")
    add("--throughput-cap-s", type=float, help="seconds allowed to each batch search (default: 240)")
    add("--throughput-max-batch", type=int, help="largest batch tried (default: 256)")
    add("--compress-length", type=int, help="tokens of the compression-step comparison (default: 32000)")
    add("--compress-reps", type=int, help="timed repetitions of the mixkv step (default: 20)")
    add("--loop-reps", type=int, help="timed repetitions of the per-head loop (default: 5)")
    add("--out-dir", type=Path, default=Path("bench_out"), help="where bench.json and the figures go")
    add("--device", default="cuda", help="torch device (default: cuda)")
    add("--seed", type=int, default=0)
    add("--quick", action="store_true", help="a small smoke configuration (explicit options still win)")
    add("--plan", action="store_true", help="print what would run and exit")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve(args: argparse.Namespace) -> Settings:
    base = dict(DEFAULTS)
    if args.quick:
        base.update(QUICK)

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else value

    positive = ("new_tokens", "repeats", "mix_cost_rounds", "budget")
    for name in (*positive, "throughput_new_tokens", "throughput_max_batch", "compress_reps"):
        value = pick(name)
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be positive (got {value})")
    return Settings(
        models=[resolve_model(m) for m in pick("models")],
        lengths=[int(n) for n in pick("lengths")],
        methods=[parse_method(m) for m in pick("methods")],
        parts=list(dict.fromkeys(args.parts)),
        new_tokens=pick("new_tokens"),
        repeats=pick("repeats"),
        warm_full=not args.no_warm_full,
        mix_cost_rounds=pick("mix_cost_rounds"),
        budget=args.budget,
        throughput_length=pick("throughput_length"),
        throughput_methods=[parse_method(m) for m in args.throughput_methods],
        throughput_new_tokens=pick("throughput_new_tokens"),
        throughput_cap_s=float(pick("throughput_cap_s")),
        throughput_max_batch=pick("throughput_max_batch"),
        compress_length=pick("compress_length"),
        compress_reps=pick("compress_reps"),
        loop_reps=pick("loop_reps"),
        out_dir=args.out_dir,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
    )


def plan_lines(settings: Settings) -> list[str]:
    """A short human-readable plan of what the command runs."""
    lines = ["mixkv bench plan:"]
    methods = " ".join(m.name for m in settings.methods)
    for spec in settings.models:
        config = load_config(spec)
        dims = attention_dims(config)
        lines.append(
            f"  {spec.label}: {dims['layers']} layers, Hq {dims['q_heads']}, Hkv {dims['kv_heads']}, "
            f"D {dims['head_dim']}, bf16 random weights"
        )
        for length in settings.lengths:
            try:
                image = choose_image(config, length - 10).describe()
            except ValueError as error:
                image = f"(no image fits: {error})"
            lines.append(f"    {length:>6} tokens: {image}")
    if "compress" in settings.parts:
        lines.append(
            f"  compress: one layer's step at {settings.compress_length} tokens, snapkv/adakv x mix, "
            f"mixkv vs per-head loop (median ms per layer)"
        )
    if "e2e" in settings.parts:
        runs = len(settings.models) * len(settings.lengths) * len(settings.methods) * settings.repeats
        rounds = f" ({settings.repeats} interleaved rounds)" if settings.repeats > 1 else ""
        if settings.warm_full and any(m.policy is None for m in settings.methods):
            rounds += " after one untimed full-cache run per length"
        lines.append(
            f"  e2e: {runs} runs{rounds}, {settings.new_tokens} new tokens, budget {settings.budget}, "
            f"methods: {methods}"
        )
    if "mixcost" in settings.parts:
        lines.append(
            f"  mixcost: {settings.mix_cost_rounds} interleaved prefill-only rounds per length, each policy "
            "without and with MixKV (the prefill time MixKV adds, as a share of the base total)"
        )
    if "memory" in settings.parts:
        lines.append("  memory: weights + one layer's prefill working set + cache vs measured peak")
    if "throughput" in settings.parts:
        names = " ".join(m.name for m in settings.throughput_methods)
        lines.append(
            f"  throughput: largest batch at {settings.throughput_length} tokens for {names} "
            f"(cap {settings.throughput_cap_s:.0f} s each), "
            f"decode tokens/s over {settings.throughput_new_tokens} tokens"
        )
    lines.append(f"  output: {settings.out_dir / 'bench.json'} and efficiency_<length>.png")
    return lines


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = resolve(args)
    except ValueError as error:
        parser.error(str(error))
    device = torch.device(settings.device)
    runnable = device.type != "cuda" or torch.cuda.is_available()
    if args.plan or not runnable or device.type != "cuda":
        if not runnable or device.type != "cuda":
            print("mixkv bench: no CUDA device; printing the plan only.")
        print("\n".join(plan_lines(settings)))
        return 0
    from mixkv.bench.figure import draw_efficiency
    from mixkv.bench.runner import run_all

    meta = environment(device) | {"settings": _settings_json(settings)}
    path = settings.out_dir / "bench.json"

    def save(results: dict[str, list[dict[str, Any]]]) -> None:
        write_results(path, meta, results)

    results = run_all(settings, device, save)
    save(results)
    print(f"wrote {path}")
    for row in results.get("mix_overhead", []):
        print(
            f"mixkv cost {row['model']} N={row['length']} {row['policy']}: total x{row['total_ratio']:.3f} "
            f"(rounds {row['rounds']}, range {row['total_ratio_min']:.3f}-{row['total_ratio_max']:.3f}), "
            f"prefill {row['prefill_delta_s'] * 1e3:+.1f} ms"
        )
    for length in settings.lengths:
        figure = settings.out_dir / f"efficiency_{length}.png"
        drawn = draw_efficiency(results.get("e2e_median", []), figure, length=length)
        if drawn is not None:
            print(f"wrote {drawn}")
    return 0


def _settings_json(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(settings).items():
        if key in ("methods", "throughput_methods"):
            out[key] = [m.name for m in value]
        elif key == "models":
            out[key] = [m.name for m in value]
        else:
            out[key] = str(value) if isinstance(value, Path) else value
    return out
