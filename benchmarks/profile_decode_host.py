"""Host time of one decode step per decoder layer: MixKVCache versus transformers' DynamicCache.

A tiny random-weight text model (fp32, head_dim 16, so every kernel is negligible and what is
measured is Python, argument handling and operator dispatch) runs a compressing prefill, then:

- ``layer``: the attention block of one layer alone, as the model's attention module runs it
  (``cache.update`` then the registered attention function), over many steps and every layer;
  the cost of building the step's inputs is measured on its own and subtracted;
- ``step``: one whole decode forward (one token); the difference to the full cache divided by the
  number of layers is the extra host time per layer the compressed cache costs in a real step;
- ``ops``: torch operators per layer and step of the ``layer`` loop (torch.profiler), a proxy for
  the kernel launches the path would make on a GPU;
- ``--profile``: cProfile of the MixKVCache layer loop, heaviest functions first.

    python3 benchmarks/profile_decode_host.py --layers 8 --steps 200 --rounds 7 --out host.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import platform
import pstats
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mixkv import MixKVCache, _core
from mixkv._compat import cache_kwargs

FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}

# The core entries a decode step may reach (the last one only where the build has it).
DECODE_ENTRIES: tuple[str, ...] = ("store_append", "attend", "store_copy_segments", "store_append_attend")


def build_model(family: str, layers: int, attn: str) -> Any:
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    return model


def make_cache(kind: str, model: Any, args: argparse.Namespace) -> Any:
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return MixKVCache(model, policy=args.policy, mix=True, budget=args.budget, window=args.window)


def prefill(model: Any, cache: Any, prompt: torch.Tensor) -> None:
    model(input_ids=prompt, use_cache=True, **cache_kwargs(model, cache))


def attention_modules(model: Any) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def layer_loop(model: Any, cache: Any, steps: int, with_attention: bool = True) -> Callable[[], None]:
    """A closure running ``steps`` decode steps of every layer's attention block (update + attention)."""
    modules = attention_modules(model)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    eager = transformers.models.llama.modeling_llama.eager_attention_forward

    def run() -> None:
        for _ in range(steps):
            for module in modules:
                q = torch.randn(1, heads, 1, dim)
                k = torch.randn(1, kv_heads, 1, dim)
                v = torch.randn(1, kv_heads, 1, dim)
                if not with_attention:
                    continue
                keys, values = cache.update(k, v, module.layer_idx)
                fn = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)
                fn(module, q, keys, values, None, dropout=0.0, scaling=module.scaling)

    return run


def best_us(samples: list[float], per: int) -> float:
    """µs per unit of the fastest round (the one least disturbed by other work on the machine)."""
    return min(samples) / per * 1e6


def interleaved(setups: dict[str, Callable[[], Callable[[], None]]], rounds: int) -> dict[str, list[float]]:
    """Seconds per round of every measurement, the rounds of all measurements interleaved (so that a
    burst of other work on the machine disturbs them alike); ``setup`` (not timed) returns the timed
    body of a fresh round."""
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, setup in setups.items():
            body = setup()
            t0 = time.perf_counter()
            body()
            times[name].append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def core_stubbed() -> Iterator[None]:
    """Every kernel entry of ``mixkv._core`` replaced by a no-op: what is left is the Python side."""
    saved = {n: getattr(_core, n) for n in DECODE_ENTRIES if hasattr(_core, n)}
    for n in saved:
        setattr(_core, n, lambda *a, **k: None)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(_core, n, fn)


def _prefilled(model: Any, kind: str, args: argparse.Namespace, prompt: torch.Tensor) -> Any:
    cache = make_cache(kind, model, args)
    prefill(model, cache, prompt)
    return cache


def layer_setup(
    model: Any, kind: str, args: argparse.Namespace, prompt: torch.Tensor, with_attention: bool, stub: bool = False
) -> Callable[[], Callable[[], None]]:
    """Fresh prefilled cache, then the layer loop (kernel entries stubbed when ``stub``)."""

    def make() -> Callable[[], None]:
        loop = layer_loop(model, _prefilled(model, kind, args, prompt), args.steps, with_attention)
        if not stub:
            return loop

        def stubbed() -> None:
            with core_stubbed():
                loop()

        return stubbed

    return make


def step_setup(
    model: Any, kind: str, args: argparse.Namespace, prompt: torch.Tensor
) -> Callable[[], Callable[[], None]]:
    """Fresh prefilled cache, then ``args.steps`` whole decode forwards of one token."""
    token = torch.tensor([[5]])
    length = prompt.shape[1]

    def make() -> Callable[[], None]:
        cache = _prefilled(model, kind, args, prompt)

        def body() -> None:
            for i in range(args.steps):
                position = torch.tensor([[length + i]])
                model(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(model, cache))

        return body

    return make


def count_ops(model: Any, kind: str, args: argparse.Namespace, prompt: torch.Tensor) -> dict[str, float]:
    """Torch operators per layer and step of the layer loop (inputs excluded), total and by name."""
    from torch.profiler import ProfilerActivity, profile

    steps = 20
    layers = model.config.num_hidden_layers
    counts: dict[str, float] = {}
    for with_attention in (True, False):
        cache = _prefilled(model, kind, args, prompt)
        loop = layer_loop(model, cache, steps, with_attention)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loop()
        for event in prof.key_averages():
            if not event.key.startswith("aten::"):
                continue
            sign = 1 if with_attention else -1
            counts[event.key] = counts.get(event.key, 0.0) + sign * event.count / (steps * layers)
    return {k: v for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if abs(v) > 1e-9}


def top_level_ops(counts: dict[str, float]) -> float:
    """Operators a GPU would launch kernels for, roughly: the named ones minus pure views and allocation."""
    quiet = ("empty", "view", "transpose", "as_strided", "expand", "unsqueeze", "select", "slice", "detach", "alias")
    return sum(v for k, v in counts.items() if not any(q in k for q in quiet))


def cprofile_mixkv(model: Any, args: argparse.Namespace, prompt: torch.Tensor, top: int) -> str:
    cache = _prefilled(model, "mixkv", args, prompt)
    loop = layer_loop(model, cache, args.steps)
    profiler = cProfile.Profile()
    profiler.enable()
    loop()
    profiler.disable()
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(top)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=96, help="prompt tokens (compressed to --budget)")
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--steps", type=int, default=200, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--delegates", nargs="+", default=["sdpa", "eager"], help="attention of the full cache")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print cProfile of the MixKVCache layer loop")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    prompt = torch.randint(3, 280, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        variants = [(f"full/{d}", "dynamic", d) for d in args.delegates]
        variants += [(f"mixkv/{args.delegates[0]}", "mixkv", args.delegates[0])]
        models = {name: build_model(args.family, args.layers, attn) for name, _, attn in variants}
        setups: dict[str, Callable[[], Callable[[], None]]] = {}
        for name, kind, _ in variants:
            model = models[name]
            setups[f"{name} layer"] = layer_setup(model, kind, args, prompt, True)
            setups[f"{name} inputs"] = layer_setup(model, kind, args, prompt, False)
            if kind == "mixkv":
                setups[f"{name} python"] = layer_setup(model, kind, args, prompt, True, stub=True)
            setups[f"{name} step"] = step_setup(model, kind, args, prompt)
        for setup in setups.values():  # warm-up
            setup()()
        times = interleaved(setups, args.rounds)
        per_layer = args.steps * args.layers
        profile_text = ""
        for name, kind, _ in variants:
            model = models[name]
            inputs = best_us(times[f"{name} inputs"], per_layer)
            python = f"{name} python"
            ops = count_ops(model, kind, args, prompt)
            rows.append(
                {
                    "variant": name,
                    "layer_us": best_us(times[f"{name} layer"], per_layer) - inputs,
                    "inputs_us": inputs,
                    "python_us": best_us(times[python], per_layer) - inputs if python in times else None,
                    "step_us": best_us(times[f"{name} step"], args.steps),
                    "ops_per_layer": sum(ops.values()),
                    "launch_ops_per_layer": top_level_ops(ops),
                    "ops": ops,
                }
            )
            if kind == "mixkv" and args.profile:
                profile_text = cprofile_mixkv(model, args, prompt, args.top)
            if kind == "mixkv":
                MixKVCache.uninstall(model)

    layers = args.layers
    base = {r["variant"]: r for r in rows}
    reference = base[f"full/{args.delegates[0]}"]
    print(
        f"{args.family}, {layers} layers, prompt {args.prompt} -> budget {args.budget}, {args.steps} steps x "
        f"{args.rounds} rounds, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"
    )
    header = f"{'variant':<14} {'layer us':>9} {'python us':>9} {'step us':>9} {'step/layer':>10} {'vs full':>9}"
    print(f"{header} {'ops':>6} {'launch':>7}")
    for r in rows:
        extra = (r["step_us"] - reference["step_us"]) / layers
        python = "-" if r["python_us"] is None else f"{r['python_us']:.1f}"
        r["step_extra_us_per_layer"] = extra
        print(
            f"{r['variant']:<14} {r['layer_us']:9.1f} {python:>9} {r['step_us']:9.1f} {r['step_us'] / layers:10.1f} "
            f"{extra:+9.1f} {r['ops_per_layer']:6.1f} {r['launch_ops_per_layer']:7.1f}"
        )
    print("(fastest round; layer us: update + attention of one layer, inputs excluded; python us: the same with")
    print(" every kernel entry of mixkv._core a no-op (Python and argument handling); step us: one decode forward;")
    print(" vs full: extra step time per layer against the first full-cache variant; ops: aten operators per layer)")
    mix = rows[-1]
    print(f"\noperators per layer, {mix['variant']}:")
    for k, v in mix["ops"].items():
        print(f"  {v:5.2f}  {k}")
    if profile_text:
        print(profile_text)
    if args.out is not None:
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"args": meta, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
