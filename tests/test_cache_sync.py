"""Prefill compression reads the device once per layer; the store's unchecked build equals the checked one."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mixkv import MixKVCache
from mixkv._compat import cache_kwargs
from mixkv.cache import MixKVLayer
from mixkv.ops import capacities, compute_scores, select
from mixkv.store import VarlenKVStore
from models import TinyModel, text_lm

HAS_CUDA = torch.cuda.is_available()


def _count_syncs(fn: Callable[[], Any]) -> int:
    """Synchronising CUDA operations performed by ``fn`` (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.fixture(scope="module")
def tiny_cuda(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyModel]:
    if not HAS_CUDA:
        pytest.skip("no CUDA")
    tiny = text_lm(Path(tmp_path_factory.mktemp("llama-sync")), "llama", "sdpa")
    tiny.model.to("cuda")
    yield tiny


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "adakv", "sparsemm"])
@pytest.mark.parametrize("padded", [False, True], ids=["one-sequence", "left-padded"])
def test_prefill_compression_synchronises_once_per_layer(
    tiny_cuda: TinyModel, policy: str, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = tiny_cuda
    lengths = [60, 37] if padded else [60]
    inputs = {k: v.to("cuda") for k, v in tiny.make_inputs(lengths).items()}
    extra: dict[str, Any] = {}
    if policy == "sparsemm":
        extra["sparsemm_table"] = torch.rand(tiny.num_layers, tiny.num_kv_heads) + 0.1
    cache = MixKVCache(tiny.model, policy=policy, mix=True, budget=24, window=8, **extra)
    seen: list[int] = []
    original = MixKVLayer._compress

    def counted(self: MixKVLayer, *args: Any) -> None:
        torch.cuda.synchronize()
        seen.append(_count_syncs(lambda: original(self, *args)))

    monkeypatch.setattr(MixKVLayer, "_compress", counted)
    with torch.inference_mode():
        tiny.model.generate(**inputs, **cache_kwargs(tiny.model, cache), max_new_tokens=2, do_sample=False)
    assert len(seen) == tiny.num_layers
    # the counts (and valid lengths) reach the host once per layer; a mask, when the model passes
    # one, is read once per forward (padding needs one)
    assert seen[0] == 2 if padded else seen[0] in (1, 2)
    assert seen[1:] == [1] * (tiny.num_layers - 1)


def _random_selection(device: str, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, n, d, w = 3, 4, 2, 50, 16, 6
    q = torch.randn(b, hq, w, d, generator=gen).to(device)
    k = torch.randn(b, hkv, n, d, generator=gen).to(device)
    v = torch.randn(b, hkv, n, d, generator=gen).to(device)
    valid = torch.tensor([50, 31, 9], dtype=torch.int32, device=device)
    result = compute_scores(q, k, v, method="mixkv", pooling="avg", kernel_size=3, gqa="mean", valid_lengths=valid)
    caps = capacities("adakv", result.scores, budget=14, window=w, layer_idx=0, num_layers=1, valid_lengths=valid)
    positions, counts = select(result.scores, caps)
    return k, v, positions, counts, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unchecked_store_build_equals_the_checked_one(device: str, seed: int) -> None:
    k, v, positions, counts, valid = _random_selection(device, seed)
    checked = VarlenKVStore.from_selection(k, v, positions, counts, 6, reserve=5, valid_lengths=valid)
    # a wider positions buffer (as the cache passes) must not change anything
    wide = torch.full((*positions.shape[:2], k.shape[2] - 6), -7, dtype=torch.int32, device=device)
    wide[..., : positions.shape[2]] = positions
    fast = VarlenKVStore.from_selection(k, v, wide, counts, 6, reserve=5, valid_lengths=valid, validate=False)
    assert torch.equal(checked.lengths.cpu(), fast.lengths.cpu())
    assert (checked.capacities == fast.capacities).all()
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            ck, cv = checked.segment(b, h)
            fk, fv = fast.segment(b, h)
            assert torch.equal(ck, fk) and torch.equal(cv, fv)


def test_unchecked_store_build_still_checks_counts(device: str) -> None:
    k, v, positions, counts, valid = _random_selection(device, 3)
    bad = counts.clone()
    bad[0, 0] = positions.shape[2] + 1
    with pytest.raises(ValueError, match="counts must lie in"):
        VarlenKVStore.from_selection(k, v, positions, bad, 6, valid_lengths=valid, validate=False)
