"""Decode attention over the varlen store against a float64 reference (SPEC §8)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixkv import _backends, _core
from mixkv.store import VarlenKVStore

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FIXTURE_OK = settings(suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture])

# per-segment lengths: mostly short, sometimes long, up to 40,000
short_len = st.integers(1, 90)
long_len = st.integers(1000, 40_000)
seg_len = st.one_of(short_len, short_len, short_len, short_len, short_len, short_len, long_len)


def build(seed: int, lengths: list[list[int]], d: int, window: int, dtype: torch.dtype, device: str):
    """A store whose segment (b, h) has lengths[b][h] tokens (>= window), plus the reference segments."""
    b, h = len(lengths), len(lengths[0])
    n = max(max(row) for row in lengths)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=g).to(dtype)
    values = torch.randn(b, h, n, d, generator=g).to(dtype)
    w = min(window, n)
    counts = torch.tensor([[x - w for x in row] for row in lengths], dtype=torch.int32)
    c = max(1, int(counts.max()))
    positions = torch.full((b, h, c), -1, dtype=torch.int32)
    segs = {}
    for bi in range(b):
        for hi in range(h):
            cnt = int(counts[bi, hi])
            p = torch.randperm(n - w, generator=g)[:cnt].sort().values
            positions[bi, hi, :cnt] = p.to(torch.int32)
            idx = torch.cat([p, torch.arange(n - w, n)])
            segs[(bi, hi)] = (keys[bi, hi, idx], values[bi, hi, idx])
    store = VarlenKVStore.from_selection(
        keys.to(device), values.to(device), positions.to(device), counts.to(device), w, reserve=seed % 5
    )
    return store, segs


def reference(q: torch.Tensor, segs, num_kv_heads: int, scale: float) -> torch.Tensor:
    """float64: query t of a T-step block sees the first L - T + t + 1 tokens of its segment."""
    b, hq, t, d = q.shape
    g = hq // num_kv_heads
    out = torch.zeros(b, hq, t, d, dtype=torch.float64)
    for bi in range(b):
        for qh in range(hq):
            k, v = (x.double() for x in segs[(bi, qh // g)])
            length = k.shape[0]
            for ti in range(t):
                vis = min(max(length - t + ti + 1, 0), length)
                if vis == 0:
                    continue
                logits = (k[:vis] @ q[bi, qh, ti].double()) * scale
                out[bi, qh, ti] = torch.softmax(logits, dim=0) @ v[:vis]
    return out


def check_close(
    got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, vmax: float = 0.0, logit_rel: float = 0.0
) -> None:
    """fp32: 1e-5 relative to the larger of the output and value magnitudes; 16-bit: 1e-2 of the output max.

    ``logit_rel``: extra relative error allowed for fp32 logits whose own rounding error is large
    (a logit accumulated from terms of magnitude L is off by about eps * L, and so is every weight).
    """
    got = got.double().cpu()
    assert got.shape == ref.shape
    assert torch.isfinite(got).all(), "non-finite output"
    peak = max(float(ref.abs().max()), 1e-3)
    tol = (1e-5 + logit_rel) * max(peak, vmax) if dtype == torch.float32 else 1e-2 * peak
    err = float((got - ref).abs().max())
    assert err <= tol, f"max error {err} > {tol}"


def attend_core(store: VarlenKVStore, q: torch.Tensor, scale: float) -> torch.Tensor:
    """The core entry point with an output poisoned with NaN."""
    b, hq, t, d = q.shape
    out = torch.full_like(q, float("nan"))
    nbytes = _core.attend_workspace_bytes(b, hq, t, d, store.max_length)
    ws = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8, device=q.device)
    stream = torch.cuda.current_stream().cuda_stream if q.is_cuda else 0
    _core.attend(
        q,
        store.k_buffer,
        store.v_buffer,
        store.offsets.reshape(-1),
        store.lengths.reshape(-1),
        store.max_length,
        scale,
        out,
        ws,
        stream,
    )
    return out


@FIXTURE_OK
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 4),
    hkv=st.integers(1, 3),
    g=st.sampled_from([1, 4, 7]),
    t=st.sampled_from([1, 3]),
    d=st.sampled_from([64, 64, 128, 128, 80, 96, 256]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_attend_matches_reference(device, seed, b, hkv, g, t, d, dtype, data):
    lengths = data.draw(st.lists(st.lists(seg_len, min_size=hkv, max_size=hkv), min_size=b, max_size=b))
    longest = max(x for row in lengths for x in row)
    if longest > 100:  # keep the dense [B, Hkv, N, D] inputs small: long cases use few heads, small D
        b = min(b, 2)
        hkv, g = (1 if b == 2 else min(hkv, 2)), min(g, 4)
        d = 64 if d != 128 else 128
        lengths = [[min(x, 40_000 if d == 64 else 12_000) for x in row[:hkv]] for row in lengths[:b]]
    window = data.draw(st.integers(0, 8))
    lengths = [[max(x, window) for x in row] for row in lengths]
    store, segs = build(seed, lengths, d, window, dtype, device)
    gen = torch.Generator().manual_seed(seed + 1)
    kn = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    vn = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    store.append(kn.to(device), vn.to(device))
    for key in segs:
        segs[key] = (torch.cat([segs[key][0], kn[key]]), torch.cat([segs[key][1], vn[key]]))
    # strided queries: a non-contiguous view along T
    q = torch.randn(b, hkv * g, t + 1, d, generator=gen).to(dtype)[:, :, 1:]
    use_scale = seed % 3 == 0
    scale = 0.3 if use_scale else 1.0 / math.sqrt(d)
    ref = reference(q, segs, hkv, scale)
    vmax = max(float(v.abs().max()) for _, v in segs.values())
    qd = q.to(device)
    check_close(attend_core(store, qd, 0.3 if use_scale else 0.0), ref, dtype, vmax)
    for backend in _backends.available(store.device, dtype):
        got = store.attend(qd, scale=0.3 if use_scale else None, backend=backend)
        assert got.shape == q.shape and got.dtype == dtype
        check_close(got, ref, dtype, vmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_segments_give_zeros(device, dtype):
    store, segs = build(1, [[5, 9], [3, 4]], 64, 2, dtype, device)
    store.reset(1)
    q = torch.randn(2, 4, 1, 64).to(dtype)
    out = attend_core(store, q.to(device), 0.0).cpu()
    segs[(1, 0)] = (segs[(1, 0)][0][:0], segs[(1, 0)][1][:0])
    segs[(1, 1)] = (segs[(1, 1)][0][:0], segs[(1, 1)][1][:0])
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    check_close(out, reference(q, segs, 2, 1 / 8), dtype)


def test_more_queries_than_tokens(device):
    """T larger than a segment: early queries see nothing (zeros), later ones a causal prefix."""
    store, segs = build(2, [[2, 6]], 64, 0, torch.float32, device)
    q = torch.randn(1, 2, 4, 64)
    check_close(attend_core(store, q.to(device), 0.0), reference(q, segs, 2, 1 / 8), torch.float32)


def test_extreme_logits_are_stable(device):
    """Large scores: the running maximum keeps the softmax finite and exact."""
    store, segs = build(3, [[3000, 17]], 128, 4, torch.float32, device)
    q = torch.randn(1, 8, 1, 128, generator=torch.Generator().manual_seed(11)) * 40
    scale = 128**-0.5
    # largest sum of |q_i k_i| * scale over every (query head, key): the fp32 logits' rounding scale
    terms = max(float((q[0, qh, 0].abs() @ segs[(0, qh // 4)][0].abs().T).max()) * scale for qh in range(q.shape[1]))
    got = attend_core(store, q.to(device), 0.0)
    check_close(got, reference(q, segs, 2, scale), torch.float32, logit_rel=4 * 2**-24 * terms)


def test_ties_equal_keys_uniform_average(device):
    """Identical keys: exactly uniform weights, output = mean of the values."""
    store, segs = build(4, [[50]], 64, 0, torch.float32, device)
    store.k_buffer[:] = 0.25
    q = torch.randn(1, 3, 1, 64)
    out = attend_core(store, q.to(device), 0.0).cpu()
    _, v = segs[(0, 0)]
    torch.testing.assert_close(out[0, :, 0], v.mean(0).expand(3, -1), rtol=1e-5, atol=1e-5)


def test_workspace_bytes():
    assert _core.attend_workspace_bytes(1, 32, 1, 128, 64) == 0
    chunk = 64
    splits = math.ceil(1024 / chunk)
    assert _core.attend_workspace_bytes(1, 32, 1, 128, 1024) == 32 * splits * 130 * 4
    assert _core.attend_workspace_bytes(2, 8, 3, 64, 40_000) > 0


def test_attend_validation():
    store, _ = build(5, [[4, 6]], 64, 0, torch.float32, "cpu")
    with pytest.raises(ValueError, match="q must have shape"):
        store.attend(torch.randn(1, 3, 1, 64))
    with pytest.raises(ValueError, match="q must have shape"):
        store.attend(torch.randn(1, 2, 1, 32))
    with pytest.raises(TypeError, match="q must have the store's dtype"):
        store.attend(torch.randn(1, 2, 1, 64).half())
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        store.attend(torch.randn(1, 2, 1, 64, 2)[..., 0])
    with pytest.raises(ValueError, match="scale"):
        store.attend(torch.randn(1, 2, 1, 64), scale=0.0)
    with pytest.raises(ValueError, match="backend"):
        store.attend(torch.randn(1, 2, 1, 64), backend="torch")
    q = torch.randn(1, 2, 1, 64)
    flat = store.lengths.reshape(-1)
    with pytest.raises(ValueError, match="max_length"):
        _core.attend(
            q, store.k_buffer, store.v_buffer, store.offsets.reshape(-1), flat, 3, 0.0, torch.empty_like(q), None, 0
        )
    with pytest.raises(ValueError, match="out"):
        _core.attend(
            q,
            store.k_buffer,
            store.v_buffer,
            store.offsets.reshape(-1),
            flat,
            6,
            0.0,
            torch.empty(1, 2, 1, 32),
            None,
            0,
        )
    with pytest.raises(ValueError, match="v_buf"):
        _core.attend(
            q,
            store.k_buffer,
            store.v_buffer.half(),
            store.offsets.reshape(-1),
            flat,
            6,
            0.0,
            torch.empty_like(q),
            None,
            0,
        )
    with pytest.raises(ValueError, match="lengths"):
        _core.attend(
            q,
            store.k_buffer,
            store.v_buffer,
            store.offsets.reshape(-1),
            flat[:1].contiguous(),
            6,
            0.0,
            torch.empty_like(q),
            None,
            0,
        )
