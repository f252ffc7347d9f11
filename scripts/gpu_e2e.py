"""End-to-end check on the GPU: random-weight Qwen2-VL at the real 7B dimensions, bf16, generating
from a ~2,000-token image prompt with every policy, with and without MixKV, beside the full cache.

Prints a table (prefill and total seconds, peak memory, cache bytes) and writes JSON. Weights are
random, so the generated text is meaningless; this checks that the whole path runs at real sizes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, Qwen2VLForConditionalGeneration

from mixkv import MixKVCache

ROOT = Path(__file__).resolve().parents[1]


def build_inputs(config: PretrainedConfig, grid: int, text: int, device: torch.device) -> dict[str, torch.Tensor]:
    merge = config.vision_config.spatial_merge_size
    n_image = (grid // merge) ** 2
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 150000, (text,), generator=gen)
    ids = torch.cat(
        [
            words[: text // 2],
            torch.tensor([config.vision_start_token_id]),
            torch.full((n_image,), config.image_token_id),
            torch.tensor([config.vision_end_token_id]),
            words[text // 2 :],
        ]
    )[None]
    patch_dim = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(grid * grid, patch_dim, generator=gen).to(device, torch.bfloat16),
        "image_grid_thw": torch.tensor([[1, grid, grid]]).to(device),
        "mm_token_type_ids": (ids == config.image_token_id).int().to(device),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu_e2e.json"))
    parser.add_argument("--grid", type=int, default=88, help="image patches per side (88 -> 1,936 tokens)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device; nothing to run")
        return 0
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(ROOT / "python" / "mixkv" / "configs" / "qwen2-vl-7b")
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    inputs = build_inputs(config, args.grid, 64, device)
    prompt = inputs["input_ids"].shape[1]
    runs = [("full", None, None)] + [
        (p, p, m) for p in ("snapkv", "pyramidkv", "adakv", "sparsemm") for m in (False, True)
    ]
    layers, kv_heads = config.text_config.num_hidden_layers, config.text_config.num_key_value_heads
    uniform = torch.full((layers, kv_heads), 1.0 / (layers * kv_heads))
    rows = []
    reference = None
    for name, policy, mix in runs:
        cache = None
        if policy is not None:
            extra = {"sparsemm_table": uniform} if policy == "sparsemm" else {}
            cache = MixKVCache(model, policy=policy, mix=mix, budget=args.budget, **extra)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs,
                past_key_values=cache,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
            )
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        tokens = out[0, prompt:].tolist()
        if reference is None:
            reference = tokens
        label = name if policy is None else f"{policy}{'+mixkv' if mix else ''}"
        row = {
            "run": label,
            "prompt_tokens": prompt,
            "new_tokens": len(tokens),
            "total_s": total,
            "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
            "cache_MiB": (cache.nbytes / 2**20) if cache is not None else None,
            "full_cache_MiB": (cache.full_nbytes / 2**20) if cache is not None else None,
            "agree_with_full": sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(tokens),
        }
        rows.append(row)
        cache_txt = f"{row['cache_MiB']:8.2f} MiB of {row['full_cache_MiB']:8.1f}" if cache is not None else " " * 24
        print(
            f"{label:>18} prompt {prompt} new {len(tokens)} total {total:6.2f} s "
            f"peak {row['peak_GiB']:6.2f} GiB cache {cache_txt} agree {row['agree_with_full']:.2f}",
            flush=True,
        )
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
