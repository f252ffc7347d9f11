"""``mixkv generate``: answer a prompt about an image with a compressed KV cache."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch

from mixkv._compat import cache_kwargs
from mixkv.tools import _cli
from mixkv.tools._cache import CacheSpec, cache_bytes, check_spec, make_cache
from mixkv.tools._models import (
    LoadedModel,
    ToolError,
    decode,
    load_image,
    load_model,
    parse_device,
    parse_dtype,
    prepare_inputs,
)

RANDOM_WEIGHTS_NOTE = "NOTE: random weights - the generated text is meaningless; this run only checks the machinery"


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("generate", "Generate an answer for an image and a prompt with a compressed KV cache.")
    _cli.add_model_args(p)
    p.add_argument("--image", default=None, help="image file (optional for text-only models)")
    p.add_argument("--prompt", default="Describe this image.", help="the question (default: %(default)r)")
    _cli.add_cache_args(p)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="image side without a processor (default: 224)")
    return p


@dataclass
class Timer:
    """Wall time of the first forward (prefill) and of the ones after it (decode)."""

    device: torch.device
    start: float = 0.0
    marks: list[float] | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin(self) -> None:
        self.start = self._now()
        self.marks = []

    def hook(self, *_: object) -> None:
        assert self.marks is not None
        self.marks.append(self._now())

    @property
    def prefill_s(self) -> float:
        return (self.marks[0] - self.start) if self.marks else 0.0

    @property
    def decode_s(self) -> float:
        return (self.marks[-1] - self.marks[0]) if self.marks else 0.0

    @property
    def steps(self) -> int:
        return len(self.marks or [])


def run_generate(
    loaded: LoadedModel, image: Any | None, prompt: str, spec: CacheSpec, max_new_tokens: int, image_size: int
) -> dict[str, Any]:
    prepared = prepare_inputs(loaded, image, prompt, image_size=image_size)
    model = loaded.model
    device = next(model.parameters()).device
    cache = make_cache(model, spec)
    timer = Timer(device)
    handle = model.register_forward_hook(timer.hook)
    try:
        timer.begin()
        with torch.no_grad():
            out = model.generate(
                **prepared.inputs,
                **cache_kwargs(model, cache),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
    finally:
        handle.remove()
    new_ids = out[0, prepared.prompt_length :]
    held, full = cache_bytes(cache)
    return {
        "answer": decode(loaded, new_ids),
        "prompt_tokens": prepared.prompt_length,
        "new_tokens": int(new_ids.numel()),
        "prefill_s": timer.prefill_s,
        "decode_s": timer.decode_s,
        "cache_bytes": held,
        "full_cache_bytes": full,
        "notes": prepared.notes,
    }


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    policy = None if args.policy == "full" else args.policy
    spec = CacheSpec(
        policy=policy,
        mix=_cli.parse_mix(args.mix, False),
        budget=args.budget,
        window=args.window,
        sparsemm_table=args.sparsemm_table,
        redundancy_table=args.redundancy_table,
    )
    check_spec(spec)
    if args.max_new_tokens <= 0:
        raise ToolError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    image = load_image(args.image) if args.image is not None else None
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    loaded = load_model(args.model, device=device, dtype=dtype, seed=args.seed)
    if loaded.is_vision and image is None and loaded.processor is None:
        raise ToolError("--image is required for a vision-language model")
    if loaded.random_weights:
        print(RANDOM_WEIGHTS_NOTE)
    result = run_generate(loaded, image, args.prompt, spec, args.max_new_tokens, args.image_size)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"answer: {result['answer']}")
    held, full = result["cache_bytes"], result["full_cache_bytes"]
    ratio = f"{100.0 * held / full:.1f}%" if full else "n/a"
    per_tok = 1000.0 * result["decode_s"] / max(result["new_tokens"] - 1, 1)
    print(
        f"summary: model={loaded.model_type} cache={spec.label} budget={spec.budget} window={spec.window} "
        f"prompt={result['prompt_tokens']} tokens, new={result['new_tokens']} tokens | "
        f"prefill {1000.0 * result['prefill_s']:.1f} ms, decode {1000.0 * result['decode_s']:.1f} ms "
        f"({per_tok:.2f} ms/token) | cache {held / 2**20:.3f} MiB of {full / 2**20:.3f} MiB full ({ratio})"
    )
    if loaded.random_weights:
        print(RANDOM_WEIGHTS_NOTE)
    return 0


def main(argv: list[str]) -> int:
    return _cli.run("generate", _main, argv)
