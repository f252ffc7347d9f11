"""Why the first full-cache run at a new prompt length decodes slower: three identical runs per process.

A text-only decoder at LLaVA-NeXT-Mistral-7B's text dimensions (``--layers`` of them, random
weights, bf16) generates ``--new-tokens`` tokens after a ``--length``-token prompt with transformers'
default cache and SDPA attention, three times; prints the decode ms per token of each run and the
attention kernels of the last run. ``--no-cudnn`` disables PyTorch's cuDNN SDPA backend first.
GPU only (prints a note and exits elsewhere).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from transformers import AutoModelForCausalLM

from mixkv.bench.models import load_config, resolve_model, text_config


def timed_generate(model: torch.nn.Module, ids: torch.Tensor, new: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-cudnn", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("probe_first_run: no CUDA device")
        return 0
    if args.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    cfg = text_config(load_config(resolve_model("llava")))
    cfg.num_hidden_layers = args.layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.eval()
    ids = torch.randint(10, cfg.vocab_size - 10, (1, args.length), device="cuda")
    with torch.no_grad():
        timed_generate(model, ids[:, :16], 2)  # the process's first-call costs, at another length
        for run in range(3):
            prefill = timed_generate(model, ids, 1)
            total = timed_generate(model, ids, args.new_tokens + 1)
            ms = (total - prefill) / args.new_tokens * 1e3
            print(f"run {run}: decode {ms:.2f} ms/token (prefill {prefill * 1e3:.1f} ms)", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            timed_generate(model, ids, 4)
    names = Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and any(
            key in ev.name.lower() for key in ("fmha", "flash", "cudnn", "attention", "sdpa", "mha")
        ):
            names[ev.name[:90]] += 1
    for name, count in names.most_common(4):
        print(f"  kernel x{count}: {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
