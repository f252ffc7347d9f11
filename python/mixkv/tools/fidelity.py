"""``mixkv fidelity``: how far each compressed cache moves a (random-weight) model from the full cache.

For every seed x policy x mix x budget, from the same prompt: the full cache decodes ``steps + 1``
tokens greedily (the first comes from the prefill, the other ``steps`` from decode forwards); the
compressed cache is then driven through the same tokens (teacher forcing), so its ``steps`` decode
forwards see exactly the inputs the full cache's did. At every decode forward the two runs are compared:

- next-token KL(p_full || p_cache), p = softmax of the raw logits, in float64;
- top-1 agreement: argmax of the two logit vectors equal;
- per text layer, the relative error of the attention module's output (after o_proj, at the new
  token) ||a_cache - a_full|| / ||a_full||. It includes the drift that the layers below passed up.

The prefill's own next-token distribution is computed before any compression takes effect and is
reported apart (``prefill_kl``, 0 up to rounding); it is not part of the decode-step means.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mixkv._compat import cache_kwargs
from mixkv.tools import _cli, _tables
from mixkv.tools._cache import MIX_VARIANTS, POLICIES, CacheSpec, cache_bytes, check_spec, make_cache
from mixkv.tools._fidelity_report import (
    Result,
    compact_markdown,
    effect_markdown,
    mix_effect,
    plot,
    summarize,
    summary_markdown,
)
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
    p.add_argument("--steps", type=int, default=64, help="decode forwards compared (default: %(default)s)")
    p.add_argument("--images", default="tiles,noise", help=f"synthetic images, comma list of {', '.join(IMAGE_KINDS)}")
    p.add_argument(
        "--image-size",
        type=int,
        default=896,
        help="image side in pixels (default: %(default)s, 1024 Qwen2-VL image tokens: every budget compresses)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cpu for tiny, cuda for real)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 tiny, bfloat16 real)")
    p.add_argument(
        "--seeds", "--seed", default="0", help="comma list of seeds (random weights and image) (default: %(default)s)"
    )
    p.add_argument("--out", default="fidelity.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default=None, help="PNG plot (default: next to --out)")
    p.add_argument("--table", default=None, help="Markdown tables (default: next to --out, .md)")
    p.add_argument("--merge", default=None, help="comma list of result JSON files: merge and report them, run nothing")
    return p


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
    tokens: torch.Tensor  # [steps + 1] generated ids (the first from the prefill)
    logits: torch.Tensor  # [steps, V] float32 raw logits of the decode forwards
    attn: dict[int, torch.Tensor]  # layer -> [steps, hidden] attention outputs of the decode forwards
    held: int
    full: int
    prefill_logits: torch.Tensor | None = None  # [V] raw logits of the prompt's last position


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
                **cache_kwargs(model, cache),
                max_new_tokens=steps + 1,
                min_new_tokens=steps + 1,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                logits_processor=processors,
            )
    finally:
        capture.remove()
    tokens = out.sequences[0, prepared.prompt_length :].cpu()
    logits = torch.stack([step[0].float().cpu() for step in out.logits])
    attn = capture.stacked()
    if tokens.numel() != steps + 1 or logits.shape[0] != steps + 1:
        raise ToolError(f"generate stopped after {tokens.numel()} of {steps + 1} tokens")
    if force is not None and not torch.equal(tokens, force.cpu()):
        raise ToolError("teacher forcing failed: the compressed run did not follow the full cache's tokens")
    if any(a.shape[0] != steps for a in attn.values()):
        raise ToolError(f"captured {[a.shape[0] for a in attn.values()]} decode attention outputs, expected {steps}")
    held, full = cache_bytes(cache)
    return Trace(tokens, logits[1:], attn, held, full, prefill_logits=logits[0])


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) over the last dimension, float64, clamped at 0 (rounding)."""
    logp = torch.log_softmax(p_logits.double(), -1)
    logq = torch.log_softmax(q_logits.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


@dataclass
class Comparison:
    kl_per_step: list[float]  # KL(p_full || p_cache) per decode forward
    top1_agreement: float
    attn_rel_err_per_layer: list[float]  # mean over decode forwards, per layer
    prefill_kl: float

    @property
    def kl_mean(self) -> float:
        return sum(self.kl_per_step) / len(self.kl_per_step)


def compare(ref: Trace, got: Trace) -> Comparison:
    """The full cache's trace ``ref`` against a compressed cache's ``got`` (same token stream)."""
    if ref.logits.shape != got.logits.shape or ref.attn.keys() != got.attn.keys():
        raise ValueError("the two traces cover different steps or layers")
    kl = kl_divergence(ref.logits, got.logits)
    agree = (ref.logits.argmax(-1) == got.logits.argmax(-1)).double().mean()
    errs: list[float] = []
    for layer, a_ref in ref.attn.items():
        num = (got.attn[layer].double() - a_ref.double()).norm(dim=-1)
        den = a_ref.double().norm(dim=-1).clamp_min(1e-12)
        errs.append(float((num / den).mean()))
    prefill = 0.0
    if ref.prefill_logits is not None and got.prefill_logits is not None:
        prefill = float(kl_divergence(ref.prefill_logits, got.prefill_logits))
    return Comparison([float(k) for k in kl], float(agree), errs, prefill)


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
    loaded: LoadedModel,
    model_name: str,
    image_kind: str,
    image_size: int,
    specs: list[CacheSpec],
    steps: int,
    seed: int = 0,
    progress: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    image = synthetic_image(image_kind, image_size, seed=seed)
    prepared = prepare_inputs(loaded, image, PROMPT, image_size=image_size)
    ref = _trace(loaded, prepared, CacheSpec(policy=None), steps, force=None)
    table: torch.Tensor | None = None
    results: list[Result] = []
    for spec in specs:
        if spec.policy == "sparsemm" and spec.sparsemm_table is None:
            if table is None:
                table = _sparsemm_table(loaded, prepared)
            spec = CacheSpec(spec.policy, spec.mix, spec.budget, spec.window, sparsemm_table=table)
        got = _trace(loaded, prepared, spec, steps, force=ref.tokens)
        c = compare(ref, got)
        mix = spec.mix if isinstance(spec.mix, str) else ("mixkv" if spec.mix else "off")
        r = Result(
            model=model_name,
            image=image_kind,
            seed=seed,
            cache=spec.label,
            policy=spec.policy or "full",
            mix=mix,
            budget=spec.budget if spec.policy else 0,
            prompt_tokens=prepared.prompt_length,
            steps=steps,
            kl_mean=c.kl_mean,
            kl_max=max(c.kl_per_step),
            top1_agreement=c.top1_agreement,
            attn_rel_err_mean=sum(c.attn_rel_err_per_layer) / max(len(c.attn_rel_err_per_layer), 1),
            attn_rel_err_per_layer=c.attn_rel_err_per_layer,
            kl_per_step=c.kl_per_step,
            prefill_kl=c.prefill_kl,
            cache_bytes=got.held,
            full_cache_bytes=got.full,
        )
        results.append(r)
        if progress is not None:
            progress(results)
        print(
            f"{model_name:<22} {image_kind:<6} {seed:>4} {r.cache:<18} {r.budget:>6} {r.prompt_tokens:>6} "
            f"{r.kl_mean:>10.3e} {r.top1_agreement:>7.3f} {r.attn_rel_err_mean:>10.3e}",
            flush=True,
        )
    return results


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.merge:
        return _merge(args)
    specs = _specs(args)
    if args.steps < 2:
        raise ToolError(f"--steps must be at least 2, got {args.steps}")
    kinds = _csv(args.images)
    for kind in kinds:
        if kind not in IMAGE_KINDS:
            raise ToolError(f"--images entries must be in {', '.join(IMAGE_KINDS)}, got {kind!r}")
    try:
        seeds = [int(x) for x in _csv(args.seeds)]
    except ValueError as exc:
        raise ToolError(f"--seeds must be a comma list of integers, got {args.seeds!r}") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise ToolError(f"--seeds must list distinct integers, got {args.seeds!r}")
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
    image_size = args.image_size
    if image_size < 28:
        raise ToolError(f"--image-size must be at least 28 pixels, got {image_size}")
    device = parse_device(args.device or ("cuda" if real else "cpu"))
    dtype = parse_dtype(args.dtype or ("bfloat16" if real else "float32"))
    print("random weights: these numbers measure the cache machinery on untrained models, not answer quality")
    print(
        f"{'model':<22} {'image':<6} {'seed':>4} {'cache':<18} {'budget':>6} {'prompt':>6} "
        f"{'KL':>10} {'top1':>7} {'attn err':>10}"
    )
    results: list[Result] = []
    for name in models:
        for seed in seeds:
            loaded = load_model(name, device=device, dtype=dtype, seed=seed)
            for kind in kinds:
                done = list(results)
                results += run_fidelity(
                    loaded,
                    name,
                    kind,
                    image_size,
                    specs,
                    args.steps,
                    seed=seed,
                    progress=lambda rs, done=done: _checkpoint(Path(args.out), done + rs),
                )
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meta = {
        "dims": args.dims,
        "models": models,
        "images": kinds,
        "image_size": image_size,
        "steps": args.steps,
        "window": args.window,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "seeds": seeds,
        "kl": "KL(p_full || p_cache) per decode forward, float64",
    }
    _report(results, meta, args)
    return 0


def _checkpoint(out: Path, results: list[Result]) -> None:
    """The results so far (a long run that is stopped keeps them); the final report replaces the file."""
    _tables.write_json(out, {})
    out.write_text(json.dumps({"meta": {"partial": True}, "results": [asdict(r) for r in results]}, indent=1) + "\n")


def _merge(args: argparse.Namespace) -> int:
    results: list[Result] = []
    metas: list[Any] = []
    for name in _csv(args.merge):
        path = Path(name)
        if not path.is_file():
            raise ToolError(f"--merge file not found: {name!r}")
        try:
            data = json.loads(path.read_text())
            results += [Result(**r) for r in data["results"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ToolError(f"--merge file {name!r} is not a fidelity result file: {exc}") from exc
        metas.append(data.get("meta", {}))
    meta = metas[0] if len(metas) == 1 else {"merged": metas}
    _report(results, meta, args)
    return 0


def _report(results: list[Result], meta: dict[str, Any], args: argparse.Namespace) -> None:
    """Summary over seeds, the MixKV effect, and the JSON / Markdown / PNG outputs."""
    rows = summarize(results)
    effect = mix_effect(results)
    tables = "## Next-token KL(full ‖ cache), mean over decode steps (± std over seeds)\n\n"
    tables += compact_markdown(rows)
    tables += "\n## Summary (mean ± std over seeds)\n\n" + summary_markdown(rows)
    if effect:
        tables += "\n## MixKV against the policy alone (per seed)\n\n" + effect_markdown(effect)
    print()
    print(tables)
    out = Path(args.out)
    _tables.write_json(out, {})  # creates the parent directory
    payload = {"meta": meta, "summary": rows, "mix_effect": effect, "results": [asdict(r) for r in results]}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")
    md = Path(args.table) if args.table else out.with_suffix(".md")
    md.write_text(tables)
    print(f"wrote {md}")
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    if plot(rows, png):
        print(f"wrote {png}")


def main(argv: list[str]) -> int:
    return _cli.run("fidelity", _main, argv)
