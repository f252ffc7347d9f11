"""``mixkv profile``: per-head redundancy (MixKV table) and visual-head scores (SparseMM table) over images."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from mixkv._compat import cache_kwargs
from mixkv.tools import _cli, _tables
from mixkv.tools._models import (
    LoadedModel,
    Prepared,
    ToolError,
    attention_modules,
    load_image,
    load_model,
    parse_device,
    parse_dtype,
    prepare_inputs,
)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("profile", "Measure per-head key redundancy (and SparseMM visual-head scores) over images.")
    _cli.add_model_args(p)
    p.add_argument("--images", required=True, help="directory of images")
    p.add_argument("--out", required=True, help="redundancy table to write (MixKV JSON format)")
    p.add_argument("--visual-heads", default=None, help="also write SparseMM visual-head scores to this JSON file")
    p.add_argument("--prompt", default="Describe this image in detail.", help="prompt put after each image")
    p.add_argument("--answer-tokens", type=int, default=8, help="tokens generated for visual-head scores (default 8)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images")
    p.add_argument("--image-size", type=int, default=224, help="image side without a processor (default: 224)")
    p.add_argument("--no-plot", action="store_true", help="do not write heat-map PNGs")
    return p


def list_images(directory: str) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise ToolError(f"--images directory not found: {directory!r}")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ToolError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {directory!r}")
    return files


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """tqdm when available, else a line per item."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, item in enumerate(items):
            print(f"{desc}: {i + 1}/{total}", flush=True)
            yield item
        return
    yield from tqdm(items, total=total, desc=desc)


def measure_redundancy(loaded: LoadedModel, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill once with a full cache; r of every (layer, kv head) for keys and for values, float32 [L, Hkv]."""
    from transformers import DynamicCache

    model = loaded.model
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**prepared.inputs, **cache_kwargs(model, cache), use_cache=True)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for layer in cache.layers:
        keys.append(_tables.head_redundancy(layer.keys)[0])
        values.append(_tables.head_redundancy(layer.values)[0])
    return torch.stack(keys).cpu(), torch.stack(values).cpu()


class _AttentionCapture:
    """Forward hooks on the text attention modules, reducing each layer's attention weights at once."""

    def __init__(self, model: torch.nn.Module, key_mask: torch.Tensor, query_rows: slice) -> None:
        self.key_mask = key_mask
        self.query_rows = query_rows
        self.scores: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in attention_modules(model).items()]

    def _hook(self, layer: int) -> Any:
        def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor):
                raise RuntimeError("the attention modules returned no weights; eager attention is required")
            rows = weights[0, :, self.query_rows, :].float()  # [Hq, Q, T]
            mass = (rows * self.key_mask.view(1, 1, -1)).sum(-1)  # attention on image positions
            self.scores[layer] = mass.mean(-1).cpu()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def measure_visual_heads(loaded: LoadedModel, prepared: Prepared, answer_tokens: int) -> torch.Tensor:
    """Per query head: mean attention mass that the answer tokens put on image-token positions, [L, Hq].

    The answer is generated greedily (full cache), then one eager forward over prompt + answer records
    the attention of its rows. With ``answer_tokens`` 0 the rows are the prompt tokens after the image.
    """
    if prepared.image_mask is None or not bool(prepared.image_mask.any()):
        raise ToolError("visual-head scores need image tokens in the prompt (a vision-language model and an image)")
    model = loaded.model
    n = prepared.prompt_length
    inputs = dict(prepared.inputs)
    with torch.no_grad():
        if answer_tokens > 0:
            out = model.generate(**inputs, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, do_sample=False)
            ids = out[:, : n + answer_tokens]
            rows = slice(n, ids.shape[1])
        else:
            ids = inputs["input_ids"]
            last_image = int(torch.nonzero(prepared.image_mask).max())
            rows = slice(last_image + 1, n)
            if last_image + 1 >= n:
                raise ToolError("no prompt tokens after the image to score with; use --answer-tokens > 0")
        extra = ids.shape[1] - n
        key_mask = torch.cat([prepared.image_mask, prepared.image_mask.new_zeros(extra)]).float()
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones_like(ids)
        if "mm_token_type_ids" in inputs:
            tt = inputs["mm_token_type_ids"]
            inputs["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(tt.shape[0], extra)], dim=1)
        capture = _AttentionCapture(model, key_mask, rows)
        try:
            model(**inputs, use_cache=False)
        finally:
            capture.remove()
    return torch.stack([capture.scores[i] for i in sorted(capture.scores)])


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    files = list_images(args.images)
    if args.limit is not None:
        if args.limit <= 0:
            raise ToolError(f"--limit must be positive, got {args.limit}")
        files = files[: args.limit]
    if args.answer_tokens < 0:
        raise ToolError(f"--answer-tokens must be >= 0, got {args.answer_tokens}")
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    attn = "eager" if args.visual_heads else None
    loaded = load_model(args.model, device=device, dtype=dtype, seed=args.seed, attn_implementation=attn)
    if loaded.random_weights:
        print("NOTE: random weights - the tables describe an untrained model")
    if args.visual_heads and not loaded.is_vision:
        raise ToolError("--visual-heads needs a vision-language model")
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    visual: list[torch.Tensor] = []
    for path in progress(files, len(files), "profiling"):
        image = load_image(path) if loaded.is_vision else None
        prepared = prepare_inputs(loaded, image, args.prompt, image_size=args.image_size)
        k, v = measure_redundancy(loaded, prepared)
        keys.append(k)
        values.append(v)
        if args.visual_heads:
            visual.append(measure_visual_heads(loaded, prepared, args.answer_tokens))
    table = _tables.redundancy_json(keys, values)
    _tables.write_json(args.out, table)
    mean_k = torch.stack(keys).mean(0)
    print(f"wrote {args.out}: {mean_k.shape[0]} layers x {mean_k.shape[1]} kv heads, {len(keys)} samples")
    print(f"  key redundancy: mean {mean_k.mean():.4f}, min {mean_k.min():.4f}, max {mean_k.max():.4f}")
    if not args.no_plot:
        png = Path(args.out).with_suffix(".png")
        if _tables.heatmap(mean_k, png, "key redundancy r (mean over samples)", "kv head"):
            print(f"wrote {png}")
    if args.visual_heads:
        vtable = _tables.visual_heads_json(visual)
        _tables.write_json(args.visual_heads, vtable)
        mean_v = torch.stack(visual).mean(0)
        print(f"wrote {args.visual_heads}: {mean_v.shape[0]} layers x {mean_v.shape[1]} query heads")
        if not args.no_plot:
            png = Path(args.visual_heads).with_suffix(".png")
            if _tables.heatmap(mean_v, png, "visual-head score (attention mass on image tokens)", "query head"):
                print(f"wrote {png}")
    return 0


def main(argv: list[str]) -> int:
    return _cli.run("profile", _main, argv)
