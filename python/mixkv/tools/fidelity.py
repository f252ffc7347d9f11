"""``mixkv fidelity``: how far each compressed cache moves a (random-weight) model from the full cache.

For every policy x mix x budget: the same teacher-forced token stream (the full cache's greedy
continuation) is fed through the compressed cache; per decode step the attention outputs of every
text layer and the next-token distribution are compared with the full cache's.
Metrics: per-layer relative error of the attention output (||a_c - a_f|| / ||a_f||, mean over steps),
next-token KL(p_full || p_compressed) (mean over steps) and top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixkv.tools import _cli, _tables
from mixkv.tools._cache import MIX_VARIANTS, POLICIES, CacheSpec, cache_bytes, check_spec, make_cache
from mixkv.tools._models import (
    REAL_CONFIGS,
    LoadedModel,
    Prepared,
    ToolError,
    attention_modules,
    load_model,
    parse_device,
    parse_dtype,
    prepare_inputs,
    synthetic_image,
)

IMAGE_KINDS: tuple[str, ...] = ("tiles", "noise", "mixed")
PROMPT = "Describe what is repeated in this picture and what is not, in detail."


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("fidelity", "Weight-free fidelity of every policy x mix against the full cache.")
    p.add_argument("--dims", default="tiny", choices=["tiny", "real"], help="tiny configs (CPU) or real dims (GPU)")
    p.add_argument("--models", default=None, help=f"real-dim configs to run, comma list of {', '.join(REAL_CONFIGS)}")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma list (full: a full-vs-full control)")
    p.add_argument("--mix", default="off,on", help="comma list of off, on or variant names (default: off,on)")
    p.add_argument("--budgets", default="64,128,256", help="comma list of budgets (default: %(default)s)")
    p.add_argument("--window", type=int, default=32, help="observation window (default: %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="decode steps compared (default: %(default)s)")
    p.add_argument("--images", default="tiles,noise", help=f"synthetic images, comma list of {', '.join(IMAGE_KINDS)}")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: 448 tiny, 896 real)")
    p.add_argument("--device", default=None, help="torch device (default: cpu for tiny, cuda for real)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 tiny, bfloat16 real)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights (default: %(default)s)")
    p.add_argument("--out", default="fidelity.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default=None, help="PNG plot (default: next to --out)")
    return p


@dataclass
class Result:
    model: str
    image: str
    cache: str
    policy: str
    mix: str
    budget: int
    prompt_tokens: int
    steps: int
    kl_mean: float
    kl_max: float
    top1_agreement: float
    attn_rel_err_mean: float
    attn_rel_err_per_layer: list[float] = field(default_factory=list)
    cache_bytes: int = 0
    full_cache_bytes: int = 0


class _DecodeCapture:
    """Attention outputs of single-token (decode) calls, per layer, in call order."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in attention_modules(model).items()]
        if not self.handles:
            raise ToolError("found no attention modules (layers.<i>.self_attn) in the text decoder")

    def _hook(self, layer: int) -> Any:
        def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[1] == 1:
                self.outputs.setdefault(layer, []).append(out[0, 0].detach().float().cpu())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def stacked(self) -> dict[int, torch.Tensor]:
        return {i: torch.stack(v) for i, v in sorted(self.outputs.items())}


class _ForceTokens:
    """Logits processor that makes generate emit a fixed token stream (teacher forcing)."""

    def __init__(self, tokens: torch.Tensor, prompt_length: int) -> None:
        self.tokens = tokens
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced[:, int(self.tokens[step])] = 0.0
        return forced


@dataclass
class Trace:
    tokens: torch.Tensor  # [steps] generated ids
    logits: torch.Tensor  # [steps, V] float32, the distribution each step's token was drawn from
    attn: dict[int, torch.Tensor]  # layer -> [steps - 1, hidden] decode attention outputs
    held: int
    full: int


def _trace(loaded: LoadedModel, prepared: Prepared, spec: CacheSpec, steps: int, force: torch.Tensor | None) -> Trace:
    from transformers import LogitsProcessorList

    model = loaded.model
    cache = make_cache(model, spec)
    capture = _DecodeCapture(model)
    processors = LogitsProcessorList([_ForceTokens(force, prepared.prompt_length)]) if force is not None else None
    try:
        with torch.no_grad():
            out = model.generate(
                **prepared.inputs,
                past_key_values=cache,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                logits_processor=processors,
            )
    finally:
        capture.remove()
    tokens = out.sequences[0, prepared.prompt_length :].cpu()
    logits = torch.stack([step[0].float().cpu() for step in out.logits])
    held, full = cache_bytes(cache)
    return Trace(tokens, logits, capture.stacked(), held, full)


def compare(ref: Trace, got: Trace) -> tuple[float, float, float, list[float]]:
    """(KL mean, KL max, top-1 agreement, per-layer attention-output relative error)."""
    logp = torch.log_softmax(ref.logits.double(), -1)
    logq = torch.log_softmax(got.logits.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)
    agree = (ref.logits.argmax(-1) == got.logits.argmax(-1)).double().mean()
    errs: list[float] = []
    for layer, a_ref in ref.attn.items():
        a_got = got.attn[layer]
        num = (a_got.double() - a_ref.double()).norm(dim=-1)
        den = a_ref.double().norm(dim=-1).clamp_min(1e-12)
        errs.append(float((num / den).mean()))
    return float(kl.mean()), float(kl.max()), float(agree), errs


def _sparsemm_table(loaded: LoadedModel, prepared: Prepared) -> torch.Tensor:
    """Visual-head scores [L, Hq] of this model on this input (eager attention for one forward)."""
    from mixkv.tools.profile import measure_visual_heads

    model = loaded.model
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return measure_visual_heads(loaded, prepared, answer_tokens=4)
    finally:
        model.set_attn_implementation(before)


def _mix_value(name: str) -> bool | str:
    if name == "off":
        return False
    if name == "on":
        return True
    if name not in MIX_VARIANTS:
        raise ToolError(f"--mix entries must be off, on or one of {', '.join(MIX_VARIANTS)}, got {name!r}")
    return name


def _specs(args: argparse.Namespace) -> list[CacheSpec]:
    try:
        budgets = [int(b) for b in _csv(args.budgets)]
    except ValueError as exc:
        raise ToolError(f"--budgets must be a comma list of integers, got {args.budgets!r}") from exc
    if not budgets:
        raise ToolError("--budgets is empty")
    specs: list[CacheSpec] = []
    for policy in _csv(args.policies):
        if policy == "full":
            specs.append(CacheSpec(policy=None))
            continue
        for mix in _csv(args.mix):
            for budget in budgets:
                spec = CacheSpec(policy=policy, mix=_mix_value(mix), budget=budget, window=args.window)
                check_spec(spec)
                specs.append(spec)
    if not specs:
        raise ToolError("--policies is empty")
    return specs


def run_fidelity(
    loaded: LoadedModel, model_name: str, image_kind: str, image_size: int, specs: list[CacheSpec], steps: int
) -> list[Result]:
    prepared = prepare_inputs(loaded, synthetic_image(image_kind, image_size), PROMPT, image_size=image_size)
    ref = _trace(loaded, prepared, CacheSpec(policy=None), steps, force=None)
    table: torch.Tensor | None = None
    results: list[Result] = []
    for spec in specs:
        if spec.policy == "sparsemm" and spec.sparsemm_table is None:
            if table is None:
                table = _sparsemm_table(loaded, prepared)
            spec = CacheSpec(spec.policy, spec.mix, spec.budget, spec.window, sparsemm_table=table)
        got = _trace(loaded, prepared, spec, steps, force=ref.tokens)
        kl, kl_max, agree, errs = compare(ref, got)
        mix = spec.mix if isinstance(spec.mix, str) else ("mixkv" if spec.mix else "off")
        results.append(
            Result(
                model=model_name,
                image=image_kind,
                cache=spec.label,
                policy=spec.policy or "full",
                mix=mix,
                budget=spec.budget if spec.policy else 0,
                prompt_tokens=prepared.prompt_length,
                steps=steps,
                kl_mean=kl,
                kl_max=kl_max,
                top1_agreement=agree,
                attn_rel_err_mean=sum(errs) / max(len(errs), 1),
                attn_rel_err_per_layer=errs,
                cache_bytes=got.held,
                full_cache_bytes=got.full,
            )
        )
        r = results[-1]
        print(
            f"{model_name:<22} {image_kind:<6} {r.cache:<18} {r.budget:>6} {r.prompt_tokens:>6} "
            f"{r.kl_mean:>10.3e} {r.top1_agreement:>7.3f} {r.attn_rel_err_mean:>10.3e}",
            flush=True,
        )
    return results


def plot(results: list[Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path}")
        return False
    groups = sorted({(r.model, r.image) for r in results})
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), squeeze=False)
    for col, (model, image) in enumerate(groups):
        rows = [r for r in results if r.model == model and r.image == image and r.policy != "full"]
        for cache in sorted({r.cache for r in rows}):
            pts = sorted((r.budget, r.kl_mean, r.attn_rel_err_mean) for r in rows if r.cache == cache)
            style = "--" if "+" in cache else "-"
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=cache)
            axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=cache)
        axes[0][col].set_title(f"{model} / {image}")
        axes[0][col].set_ylabel("next-token KL (mean)")
        axes[1][col].set_ylabel("attention-output rel. error (mean)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("budget")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    specs = _specs(args)
    if args.steps < 2:
        raise ToolError(f"--steps must be at least 2, got {args.steps}")
    kinds = _csv(args.images)
    for kind in kinds:
        if kind not in IMAGE_KINDS:
            raise ToolError(f"--images entries must be in {', '.join(IMAGE_KINDS)}, got {kind!r}")
    real = args.dims == "real"
    if real:
        models = _csv(args.models) if args.models else list(REAL_CONFIGS)
        for m in models:
            if m not in REAL_CONFIGS:
                raise ToolError(f"--models entries must be in {', '.join(REAL_CONFIGS)}, got {m!r}")
    else:
        if args.models:
            raise ToolError("--models applies to --dims real")
        models = ["tiny"]
    image_size = args.image_size or (896 if real else 448)
    device = parse_device(args.device or ("cuda" if real else "cpu"))
    dtype = parse_dtype(args.dtype or ("bfloat16" if real else "float32"))
    print("random weights: these numbers measure the cache machinery on untrained models, not answer quality")
    print(
        f"{'model':<22} {'image':<6} {'cache':<18} {'budget':>6} {'prompt':>6} {'KL':>10} {'top1':>7} {'attn err':>10}"
    )
    results: list[Result] = []
    for name in models:
        loaded = load_model(name, device=device, dtype=dtype, seed=args.seed)
        for kind in kinds:
            results += run_fidelity(loaded, name, kind, image_size, specs, args.steps)
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    meta = {"dims": args.dims, "steps": args.steps, "window": args.window, "dtype": str(dtype), "seed": args.seed}
    _tables.write_json(out, {})  # creates the parent directory
    out.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1) + "\n")
    print(f"wrote {out}")
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    if plot(results, png):
        print(f"wrote {png}")
    return 0


def main(argv: list[str]) -> int:
    return _cli.run("fidelity", _main, argv)
