"""One decode step in one core call: VarlenKVStore.append_attend and the cache's decode path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixkv import MixKVCache, _core
from mixkv.store import VarlenKVStore
from models import TinyModel, generate, text_lm
from test_attend import reference as attend_reference

FIXTURE_OK = settings(suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def build(seed: int, b: int, hkv: int, n: int, d: int, dtype: torch.dtype, device: str, reserve: int):
    """A store of every prompt token's window (positions empty) and its host copy of the segments."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    values = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    positions = torch.full((b, hkv, 1), -1, dtype=torch.int32)
    counts = torch.zeros(b, hkv, dtype=torch.int32)
    store = VarlenKVStore.from_selection(
        keys.to(device), values.to(device), positions.to(device), counts.to(device), n, reserve=reserve
    )
    segs = {(bi, h): (keys[bi, h].clone(), values[bi, h].clone()) for bi in range(b) for h in range(hkv)}
    return store, segs


def reference(q: torch.Tensor, segs, hkv: int, scale: float) -> torch.Tensor:
    """float64 attention of the step's queries over the segments, in the step's [B, T, Hq, D] layout."""
    return attend_reference(q, segs, hkv, scale).transpose(1, 2)


@FIXTURE_OK
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    n=st.integers(1, 20),
    d=st.sampled_from([8, 64, 128]),
    dtype=st.sampled_from(DTYPES),
    reserve=st.integers(0, 3),
    scaled=st.booleans(),
)
def test_append_attend_equals_append_then_attend(device, seed, b, hkv, group, n, d, dtype, reserve, scaled):
    fused, segs = build(seed, b, hkv, n, d, dtype, device, reserve)
    split, _ = build(seed, b, hkv, n, d, dtype, device, reserve)
    g = torch.Generator().manual_seed(seed + 1)
    scale = 0.3 if scaled else None
    for step in range(5):
        t = 1 if step % 3 else 2
        kn = torch.randn(b, hkv, t, d, generator=g).to(dtype)
        vn = torch.randn(b, hkv, t, d, generator=g).to(dtype)
        q = torch.randn(b, hkv * group, t, d, generator=g).to(dtype)
        out = fused.append_attend(kn.to(device), vn.to(device), q.to(device), scale)
        split.append(kn.to(device), vn.to(device))
        expect = split.attend(q.to(device), scale=scale)
        assert out.shape == (b, t, hkv * group, d) and out.dtype == dtype and out.is_contiguous()
        assert torch.equal(out.cpu(), expect.transpose(1, 2).cpu())  # same kernels, same result
        for key in segs:
            segs[key] = (torch.cat([segs[key][0], kn[key]]), torch.cat([segs[key][1], vn[key]]))
        ref = reference(q, segs, hkv, scale or d**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(out.cpu().double(), ref, atol=tol, rtol=tol)
    assert np.array_equal(fused.host_lengths, split.host_lengths)
    assert torch.equal(fused.lengths.cpu(), split.lengths.cpu())
    assert fused.max_length == split.max_length and fused.nbytes == split.nbytes
    for key, (k, v) in segs.items():
        sk, sv = fused.segment(*key)
        assert torch.equal(sk.cpu(), k) and torch.equal(sv.cpu(), v)


def test_append_attend_grows_like_append(device):
    fused, segs = build(4, 2, 2, 6, 16, torch.float32, device, 1)
    g = torch.Generator().manual_seed(9)
    growths = 0
    for _ in range(40):
        kn, vn = torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g)
        q = torch.randn(2, 4, 1, 16, generator=g)
        caps = fused.capacities
        out = fused.append_attend(kn.to(device), vn.to(device), q.to(device))
        growths += int(not np.array_equal(caps, fused.capacities))
        for key in segs:
            segs[key] = (torch.cat([segs[key][0], kn[key]]), torch.cat([segs[key][1], vn[key]]))
        assert torch.allclose(out.cpu().double(), reference(q, segs, 2, 0.25), atol=1e-5, rtol=1e-5)
    assert 1 <= growths <= 6


def _unchanged(store: VarlenKVStore, lengths: np.ndarray, device_lengths: torch.Tensor) -> None:
    assert np.array_equal(store.host_lengths, lengths)
    assert torch.equal(store.lengths.cpu(), device_lengths)


def test_append_attend_refuses_bad_input_and_changes_nothing():
    store, _ = build(1, 2, 2, 5, 8, torch.float32, "cpu", 2)
    k = torch.randn(2, 2, 1, 8)
    q = torch.randn(2, 4, 1, 8)
    lengths, device_lengths = store.host_lengths, store.lengths.clone()
    cases: list[tuple[tuple[Any, ...], type[Exception], str]] = [
        ((k.numpy(), k, q), TypeError, "k must be a torch.Tensor"),
        ((k, k, q[0]), ValueError, "q must have 4 dimensions"),
        ((k, k, torch.randn(2, 4, 2, 8)), ValueError, "q must hold the queries of the 1 tokens"),
        ((k, k, q, "0.5"), TypeError, "scale must be a number or None"),
        ((k, k, q, 0.0), ValueError, "scale must be a non-zero number or None"),
        ((k, k, q, 0), ValueError, "scale must be a non-zero number or None"),
        ((k, k, q.double()), TypeError, "q must have dtype"),
        ((k, k, q.half()), TypeError, "q must have the store's dtype"),
        ((k, k, torch.randn(2, 3, 1, 8)), ValueError, "not a multiple of the 2 kv heads"),
        ((k, k, torch.randn(3, 4, 1, 8)), ValueError, "q must have shape"),
        ((k, k, torch.randn(2, 4, 1, 16)), ValueError, "q must have shape"),
        ((k.half(), k.half(), q), TypeError, "k must have the store's dtype"),
        ((k, k.half(), q), ValueError, "v_new must have the dtype of k_new"),
        ((torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)), ValueError, "offsets must"),
        ((k, k, q, float("nan")), ValueError, "scale must be finite"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            store.append_attend(*args)
        _unchanged(store, lengths, device_lengths)
    strided = torch.randn(2, 2, 1, 16)[..., ::2]
    with pytest.raises(ValueError, match="k_new must have a contiguous last dimension"):
        store.append_attend(strided, strided, q)
    _unchanged(store, lengths, device_lengths)
    with pytest.raises(ValueError, match="out must"):
        _core.store_append_attend(
            *(torch.utils.dlpack.to_dlpack(t) for t in (k, k, q, store.offsets.flatten(), store.lengths.flatten())),
            torch.utils.dlpack.to_dlpack(store.k_buffer),
            torch.utils.dlpack.to_dlpack(store.v_buffer),
            store.max_length + 1,
            0.0,
            torch.utils.dlpack.to_dlpack(torch.empty(2, 4, 1, 8)),  # [B, Hq, T, D] instead of [B, T, Hq, D]
            None,
            0,
            -1,
        )
    _unchanged(store, lengths, device_lengths)


# --- the cache's decode path ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyModel]:
    tiny = text_lm(Path(tmp_path_factory.mktemp("llama-decode")), "llama", "sdpa")
    yield tiny
    MixKVCache.uninstall(tiny.model)


class CoreCalls:
    """Counts the calls of chosen core entries (wrapping them in place)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> None:
        self.counts = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(_core, name)

            def counted(*args: Any, _name: str = name, _fn: Any = original) -> Any:
                self.counts[_name] += 1
                return _fn(*args)

            monkeypatch.setattr(_core, name, counted)


def test_decode_makes_one_core_call_per_layer_and_step(llama: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = llama.make_inputs([40])
    cache = MixKVCache(llama.model, budget=16, window=4)
    calls = CoreCalls(monkeypatch, ("store_append_attend", "store_append", "attend"))
    new = 6
    generate(llama, inputs, cache, new_tokens=new)
    # the first token comes from the prefill; each later one is a decode step over every layer
    assert calls.counts == {"store_append_attend": llama.num_layers * (new - 1), "store_append": 0, "attend": 0}


def test_decode_reads_nothing_back_from_the_device(llama: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """No host read of a tensor in a decode step (on CUDA each would synchronise the device)."""
    inputs = llama.make_inputs([40])
    cache = MixKVCache(llama.model, budget=16, window=4)
    generate(llama, inputs, cache, new_tokens=1)  # prefill (reads the counts once per layer)
    reads: list[str] = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *args: Any, _name: str = name, _fn: Any = original) -> Any:
            reads.append(_name)
            return _fn(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    with torch.no_grad():
        for layer_idx, layer in enumerate(cache.layers):
            module = llama.model.model.layers[layer_idx].self_attn
            q = torch.randn(1, 4, 1, llama.head_dim)
            k = torch.randn(1, llama.num_kv_heads, 1, llama.head_dim)
            keys, values = cache.update(k, k.clone(), layer_idx)
            out, _ = _attention_call(module, q, keys, values)
            assert out.shape == (1, 1, 4, llama.head_dim)
            assert layer.store is not None
    monkeypatch.undo()
    assert reads == []


def _attention_call(module: torch.nn.Module, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> Any:
    from mixkv._attention import mixkv_attention

    return mixkv_attention(module, q, keys, values, None, dropout=0.0, scaling=module.scaling)


def test_inspection_between_update_and_attention_sees_the_new_tokens(llama: TinyModel) -> None:
    inputs = llama.make_inputs([40])
    cache = MixKVCache(llama.model, budget=16, window=4)
    generate(llama, inputs, cache, new_tokens=1)
    layer = cache.layers[0]
    before = layer.lengths().clone()
    module = llama.model.model.layers[0].self_attn
    k = torch.randn(1, llama.num_kv_heads, 1, llama.head_dim)
    with torch.no_grad():
        keys, values = cache.update(k, k.clone(), 0)
        assert torch.equal(layer.lengths(), before + 1)  # the pending tokens are appended first
        nbytes = layer.nbytes
        out, _ = _attention_call(module, torch.randn(1, 4, 1, llama.head_dim), keys, values)
    assert torch.equal(layer.lengths(), before + 1) and layer.nbytes == nbytes  # appended once
    sk, _ = layer.store.segment(0, 1)
    assert torch.equal(sk[-1], k[0, 1, 0])
    assert out.shape == (1, 1, 4, llama.head_dim) and torch.isfinite(out).all()


def test_zero_scaling_is_refused(llama: TinyModel) -> None:
    inputs = llama.make_inputs([40])
    cache = MixKVCache(llama.model, budget=16, window=4)
    generate(llama, inputs, cache, new_tokens=1)
    module = llama.model.model.layers[0].self_attn
    k = torch.randn(1, llama.num_kv_heads, 1, llama.head_dim)
    from mixkv._attention import mixkv_attention

    with torch.no_grad():
        keys, values = cache.update(k, k.clone(), 0)
        with pytest.raises(ValueError, match="scale must be a non-zero number"):
            mixkv_attention(module, torch.randn(1, 4, 1, llama.head_dim), keys, values, None, scaling=0.0)


@pytest.mark.cuda
def test_decode_steps_do_not_synchronise_on_cuda(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    tiny = text_lm(Path(tmp_path_factory.mktemp("llama-decode-cuda")), "llama", "sdpa")
    tiny.model.to("cuda")
    inputs = tiny.make_inputs([60])
    cache = MixKVCache(tiny.model, budget=24, window=8, reserve=2)  # small reserve: growth happens too
    generate(tiny, inputs, cache, new_tokens=1)
    torch.cuda.synchronize()
    # "error": a synchronising operation raises where it happens (its traceback names the culprit)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            for _ in range(8):
                for layer_idx in range(tiny.num_layers):
                    module = tiny.model.model.layers[layer_idx].self_attn
                    q = torch.randn(1, 4, 1, tiny.head_dim, device="cuda")
                    k = torch.randn(1, tiny.num_kv_heads, 1, tiny.head_dim, device="cuda")
                    keys, values = cache.update(k, k.clone(), layer_idx)
                    _attention_call(module, q, keys, values)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    MixKVCache.uninstall(tiny.model)
