"""Token scores (SPEC §1-5) against a float64 reference written from the spec."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixkv
from mixkv import _core
from mixkv.ops import GQA_REDUCTIONS, METHODS, POOLINGS, head_redundancy, scores
from mixkv.ops._score import ScoreResult, compute_scores

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POISON = float("nan")
HAS_CUDA = mixkv.cuda_available() and torch.cuda.is_available()


# ---- reference ----------------------------------------------------------------------------------


def ref_redundancy(k: torch.Tensor, n: int) -> torch.Tensor:
    """SPEC §4 on the valid keys k [H, n, D] (float64): clamp((n|m|^2 - 1) / (n - 1), 0, 1)."""
    khat = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    m = khat.mean(dim=1)
    if n < 2:
        return torch.zeros(k.shape[0], dtype=torch.float64)
    return ((n * (m * m).sum(-1) - 1) / (n - 1)).clamp(0.0, 1.0)


def ref_align(x: torch.Tensor, mean_a: torch.Tensor) -> torch.Tensor:
    """Min-max normalise per row (+1e-8), then scale to the row mean of the importance."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    xn = (x - lo) / (hi - lo + 1e-8)
    return xn * mean_a / (xn.mean(dim=-1, keepdim=True) + 1e-8)


@dataclass
class Ref:
    scores: torch.Tensor
    importance: torch.Tensor
    redundancy: torch.Tensor


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str,
    pooling: str,
    kernel_size: int,
    gqa: str,
    redundancy: torch.Tensor | None,
    valid: list[int] | None,
    scale: float | None,
) -> Ref:
    q, k, v = (t.detach().cpu().double() for t in (q, k, v))
    bsz, hq, w, d = q.shape
    hkv, n_all = k.shape[1], k.shape[2]
    g = hq // hkv
    p = n_all - w
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    out_s = torch.full((bsz, hkv, p), -math.inf, dtype=torch.float64)
    out_a = out_s.clone()
    out_r = torch.zeros(bsz, hkv, dtype=torch.float64)
    for b in range(bsz):
        n = n_all if valid is None else valid[b]
        s0 = n_all - n
        kb, vb, qb = k[b, :, s0:], v[b, :, s0:], q[b]
        r = ref_redundancy(kb, n)
        if redundancy is not None:
            r = redundancy[0 if redundancy.shape[0] == 1 else b].double().cpu()
        out_r[b] = r if method == "mixkv" else math.nan  # only mixkv uses an r
        npre = p - s0
        if npre <= 0:
            continue
        logits = sc * qb @ kb.repeat_interleave(g, dim=0).transpose(-1, -2)  # [Hq, W, n]
        visible = torch.arange(n)[None, :] <= (npre + torch.arange(w))[:, None]
        probs = logits.masked_fill(~visible, -math.inf).softmax(dim=-1)
        a = probs[..., :npre].mean(dim=1).view(hkv, g, npre)
        a = a.mean(dim=1) if gqa == "mean" else a.amax(dim=1)
        if pooling == "avg":
            a = F.avg_pool1d(a[:, None], kernel_size, 1, kernel_size // 2)[:, 0]
        else:
            a = F.max_pool1d(a[:, None], kernel_size, 1, kernel_size // 2)[:, 0]
        mean_a = a.mean(dim=-1, keepdim=True)
        vn = ref_align(vb[:, :npre].norm(dim=-1), mean_a)
        kn = ref_align(-kb[:, :npre].norm(dim=-1), mean_a)
        khat = kb / kb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        m = khat.mean(dim=1)
        dv = ref_align(-(khat[:, :npre] @ m[:, :, None])[..., 0], mean_a)
        rr = r[:, None]
        mixed = {
            "attn": a,
            "keydiff": dv,
            "vnorm": a + vn,
            "knorm": a + kn,
            "uniform-mix": (a + dv + vn) / 3,
            "mixkv": rr * dv + (1 - rr) * (a + vn),
        }[method]
        out_s[b, :, s0:] = mixed
        out_a[b, :, s0:] = a
    return Ref(out_s, out_a, out_r)


# ---- helpers ------------------------------------------------------------------------------------


def run_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str,
    pooling: str,
    kernel_size: int,
    gqa: str,
    redundancy: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> ScoreResult:
    """The low-level call with poisoned outputs and a poisoned workspace."""
    bsz, hkv, n, d = k.shape
    w = q.shape[2]
    dev = k.device
    s = torch.full((bsz, hkv, n - w), POISON, dtype=torch.float32, device=dev)
    a = torch.full_like(s, POISON)
    r = torch.full((bsz, hkv), POISON, dtype=torch.float32, device=dev)
    nbytes = _core.score_workspace_bytes(bsz, q.shape[1], hkv, n, w, d)
    ws = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=dev) if dev.type == "cuda" and nbytes else None
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    _core.score(
        q,
        k,
        v,
        None if valid is None else valid.to(torch.int32),
        redundancy,
        METHODS.index(method),
        POOLINGS.index(pooling),
        kernel_size,
        GQA_REDUCTIONS.index(gqa),
        0.0 if scale is None else scale,
        s,
        a,
        r,
        ws,
        stream,
    )
    return ScoreResult(s, a, r)


def assert_close_rows(got: torch.Tensor, want: torch.Tensor, rtol: float, atol_rel: float, what: str) -> None:
    """Elementwise check with -inf exactly where expected; atol relative to each row's largest value."""
    got = got.detach().cpu().double()
    assert got.shape == want.shape, what
    want_inf = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), want_inf), f"{what}: -inf pattern differs"
    assert not torch.isnan(got).any(), f"{what}: NaN in output"
    finite_want = want.masked_fill(want_inf, 0.0)
    finite_got = got.masked_fill(want_inf, 0.0)
    scale = finite_want.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    tol = rtol * finite_want.abs() + atol_rel * scale
    err = (finite_got - finite_want).abs()
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst {float((err - tol).max()):.3e}"


def make_inputs(
    bsz: int,
    hq: int,
    hkv: int,
    n: int,
    w: int,
    d: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = 2.0 * torch.randn(bsz, hq, w, d, generator=gen)
    k = torch.randn(bsz, hkv, n, d, generator=gen) + 0.5 * torch.randn(1, hkv, 1, d, generator=gen)
    v = torch.randn(bsz, hkv, n, d, generator=gen) * (1 + torch.rand(bsz, hkv, n, 1, generator=gen))
    return q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)


# ---- property test against the reference --------------------------------------------------------


@st.composite
def cases(draw: st.DrawFn) -> dict:
    big = draw(st.integers(0, 9)) == 0
    g = draw(st.sampled_from((1, 4, 7)))
    hkv = draw(st.sampled_from((1, 2)))
    d = draw(st.sampled_from((64, 128, 64, 128, 80, 96, 256)))
    w = draw(st.one_of(st.just(32), st.integers(1, 32)))
    n_max = 8192 if big else 200
    n = draw(st.integers(w + 1, max(w + 1, n_max)))
    if big:
        g, hkv, d = draw(st.sampled_from((1, 4))), 1, draw(st.sampled_from((64, 128)))
    bsz = draw(st.sampled_from((1, 3)))
    padded = draw(st.booleans())
    valid = [n if i == 0 else draw(st.integers(1, n)) for i in range(bsz)] if padded else None
    if valid is not None and bsz > 1 and draw(st.booleans()):
        valid[1] = draw(st.integers(1, w))  # a sequence with an empty prefix
    return {
        "bsz": bsz,
        "g": g,
        "hkv": hkv,
        "d": d,
        "w": w,
        "n": n,
        "valid": valid,
        "method": draw(st.sampled_from(METHODS)),
        "pooling": draw(st.sampled_from(POOLINGS)),
        "kernel_size": draw(st.sampled_from((1, 3, 5, 7))),
        "gqa": draw(st.sampled_from(GQA_REDUCTIONS)),
        "red": draw(st.sampled_from((None, "one", "batch"))),
        "dtype": draw(st.sampled_from(DTYPES)),
        "scale": draw(st.sampled_from((None, None, 0.05))),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def tolerances(dtype: torch.dtype, device: str) -> tuple[float, float]:
    # Inputs are exact in every dtype (the reference reads the rounded values); the arithmetic is
    # float32 throughout, so the tolerance depends on the path, not on the input dtype.
    return (1e-4, 1e-5) if device == "cpu" else (2e-4, 2e-5)


@given(case=cases())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_scores_match_reference(device: str, case: dict) -> None:
    check_case(device, case)


def check_case(device: str, case: dict) -> None:
    c = case
    q, k, v = make_inputs(c["bsz"], c["g"] * c["hkv"], c["hkv"], c["n"], c["w"], c["d"], c["dtype"], device, c["seed"])
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    red = None
    if c["red"] is not None:
        rows = 1 if c["red"] == "one" else c["bsz"]
        red = torch.rand(rows, c["hkv"], generator=gen).to(device)
    valid = None if c["valid"] is None else torch.tensor(c["valid"], dtype=torch.int32, device=device)
    opts = {"method": c["method"], "pooling": c["pooling"], "kernel_size": c["kernel_size"], "gqa": c["gqa"]}
    got = run_core(q, k, v, redundancy=red, valid=valid, scale=c["scale"], **opts)
    want = reference(q, k, v, redundancy=red, valid=c["valid"], scale=c["scale"], **opts)
    rtol, atol = tolerances(c["dtype"], device)
    assert_close_rows(got.importance, want.importance, rtol, atol, "importance")
    assert_close_rows(got.scores, want.scores, rtol, atol, "scores")
    torch.testing.assert_close(got.redundancy.cpu().double(), want.redundancy, rtol=1e-5, atol=1e-6, equal_nan=True)


# Pass 2 runs on warpgroup MMA by default on sm_90 devices (head dimension 65-128, at most 256 packed
# rows); MIXKV_SCORE_WGMMA=0 takes the mma.sync pass 2, which other devices use.
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@given(case=cases())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_scores_match_reference_mma_pass2(monkeypatch: pytest.MonkeyPatch, case: dict) -> None:
    with monkeypatch.context() as m:
        m.setenv("MIXKV_SCORE_WGMMA", "0")
        check_case("cuda", case)


# Pass 1 runs on warpgroup MMA by default on sm_90 devices for bfloat16 (head dimension <= 128, at most
# 256 packed rows); MIXKV_SCORE_WGMMA1=0 takes the mma.sync pass 1, which other devices use.
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@given(case=cases())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_scores_match_reference_mma_pass1(monkeypatch: pytest.MonkeyPatch, case: dict) -> None:
    with monkeypatch.context() as m:
        m.setenv("MIXKV_SCORE_WGMMA1", "0")
        check_case("cuda", case)


# On sm_90 with tensor-map tiles pass 1 writes the key norms and pass 2 takes k·m from spare query rows
# that hold the mean key (where the packed rows leave a warp free); MIXKV_SCORE_KM=0 keeps pass 2's key
# slabs (norms and k̂·m on the tensor cores), the path of shapes without spare rows.
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@given(case=cases())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_scores_match_reference_key_slabs(monkeypatch: pytest.MonkeyPatch, case: dict) -> None:
    with monkeypatch.context() as m:
        m.setenv("MIXKV_SCORE_KM", "0")
        check_case("cuda", case)


# On sm_90 both warpgroup-MMA passes copy key (and value) tiles by tensor map; MIXKV_SCORE_TMA=0 takes their
# cp.async copies (the path where the driver cannot encode a map), here with pass 2 on warpgroup MMA.
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@given(case=cases())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_scores_match_reference_copies(monkeypatch: pytest.MonkeyPatch, case: dict) -> None:
    with monkeypatch.context() as m:
        m.setenv("MIXKV_SCORE_TMA", "0")
        m.setenv("MIXKV_SCORE_WGMMA", "1")
        check_case("cuda", case)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("tma", ["1", "0"])
def test_strided_keys_tensor_core(monkeypatch: pytest.MonkeyPatch, tma: str) -> None:
    """Keys and values as [B, N, H, D] buffers seen as [B, H, N, D] (the layout of a transposed projection),
    on the tensor-core passes with left padding: the tensor maps order the dimensions by stride."""
    monkeypatch.setenv("MIXKV_SCORE_TMA", tma)
    monkeypatch.setenv("MIXKV_SCORE_WGMMA", "1")
    bsz, hkv, g, n, w, d = 2, 4, 7, 3000, 32, 128
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(bsz, hkv * g, w, d, generator=gen).to("cuda", torch.bfloat16)
    kt = torch.randn(bsz, n, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    vt = torch.randn(bsz, n, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    k, v = kt.transpose(1, 2), vt.transpose(1, 2)
    valid = torch.tensor([n, 1777], device="cuda")
    opts = {"method": "mixkv", "pooling": "max", "kernel_size": 7, "gqa": "mean"}
    got = run_core(q, k, v, valid=valid, **opts)
    same = run_core(q, k.contiguous(), v.contiguous(), valid=valid, **opts)
    assert torch.equal(got.scores, same.scores)
    want = reference(q, k, v, redundancy=None, valid=[n, 1777], scale=None, **opts)
    assert_close_rows(got.scores, want.scores, 2e-4, 2e-5, "scores")


# Sequences of one or two valid keys leave nothing to average out the rounding of the unit-key sums in the
# online redundancy: with the inverse norms in two 16-bit parts on the tensor cores (16 bits) such a
# case missed the tolerance by 8x; three parts carry a float's 24 bits. Both pass-1 paths on CUDA (mixkv:
# the method that reports its r).
@pytest.mark.parametrize("pass1", ["1", "0"])
@pytest.mark.parametrize("seed", range(6))
def test_redundancy_of_few_keys(monkeypatch: pytest.MonkeyPatch, device: str, pass1: str, seed: int) -> None:
    monkeypatch.setenv("MIXKV_SCORE_WGMMA1", pass1)
    case = {
        "bsz": 3, "g": 1, "hkv": 2, "d": 64, "w": 32, "n": 33, "valid": [33, 2, 1], "method": "mixkv",
        "pooling": "avg", "kernel_size": 1, "gqa": "mean", "red": None, "dtype": torch.bfloat16, "scale": None,
        "seed": seed,
    }  # fmt: skip
    check_case(device, case)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize(("pass1", "pass2"), [("1", "1"), ("1", "0"), ("0", "0")])
@pytest.mark.parametrize(
    ("gqa", "method", "dtype"), [("mean", "mixkv", torch.bfloat16), ("max", "uniform-mix", torch.float16)]
)
def test_long_chunks(
    monkeypatch: pytest.MonkeyPatch, pass1: str, pass2: str, gqa: str, method: str, dtype: torch.dtype
) -> None:
    """Chunks of many key tiles per block (the tile rings wrap several times), 224 packed rows; passes
    on warpgroup MMA ("1") or mma.sync ("0")."""
    monkeypatch.setenv("MIXKV_SCORE_WGMMA1", pass1)
    monkeypatch.setenv("MIXKV_SCORE_WGMMA", pass2)
    n = 20000
    q, k, v = make_inputs(2, 28, 4, n, 32, 128, dtype, "cuda", 11)
    valid = torch.tensor([n, 13001], device="cuda")
    opts = {"method": method, "pooling": "max", "kernel_size": 7, "gqa": gqa}
    got = run_core(q, k, v, valid=valid, **opts)
    want = reference(q, k, v, redundancy=None, valid=[n, 13001], scale=None, **opts)
    assert_close_rows(got.importance, want.importance, 2e-4, 2e-5, "importance")
    assert_close_rows(got.scores, want.scores, 2e-4, 2e-5, "scores")


@pytest.mark.parametrize("method", METHODS)
def test_public_api_matches_core(device: str, method: str) -> None:
    q, k, v = make_inputs(2, 8, 2, 70, 32, 64, torch.bfloat16, device, 3)
    valid = torch.tensor([70, 50], device=device)
    got = scores(q, k, v, method=method, valid_lengths=valid)
    low = run_core(q, k, v, method=method, pooling="max", kernel_size=7, gqa="mean", valid=valid)
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (2, 2, 38)
    assert torch.equal(got, low.scores)
    full = compute_scores(
        q, k, v, method=method, pooling="avg", kernel_size=5, gqa="max", valid_lengths=valid, need_importance=True
    )
    assert full.importance is not None
    want = reference(
        q, k, v, method=method, pooling="avg", kernel_size=5, gqa="max", redundancy=None, valid=[70, 50], scale=None
    )
    assert_close_rows(full.scores, want.scores, 2e-4, 2e-5, "scores")
    assert_close_rows(full.importance, want.importance, 2e-4, 2e-5, "importance")
    assert compute_scores(q, k, v, method=method, pooling="avg", kernel_size=5, gqa="max").importance is None


@pytest.mark.parametrize("pass1", ["1", "0"])
def test_importance_without_the_mean_key(monkeypatch: pytest.MonkeyPatch, device: str, pass1: str) -> None:
    """Methods without the diversity signal skip the unit-key sums (the mean key, the online r): the same
    importance as mixkv, which computes them; r is NaN where no method uses one."""
    monkeypatch.setenv("MIXKV_SCORE_WGMMA1", pass1)
    q, k, v = make_inputs(2, 28, 4, 3000, 32, 128, torch.bfloat16, device, 21)
    valid = torch.tensor([3000, 1234], device=device)
    opts = {"pooling": "avg", "kernel_size": 5, "gqa": "mean", "valid": valid}
    mix = run_core(q, k, v, method="mixkv", **opts)
    assert torch.isfinite(mix.redundancy).all()
    for method in ("attn", "vnorm", "knorm"):
        got = run_core(q, k, v, method=method, **opts)
        torch.testing.assert_close(got.importance, mix.importance, rtol=1e-6, atol=1e-9)
        assert torch.isnan(got.redundancy).all()
    attn = run_core(q, k, v, method="attn", **opts)
    torch.testing.assert_close(attn.scores, attn.importance, rtol=0, atol=0)


def test_defaults(device: str) -> None:
    q, k, v = make_inputs(1, 4, 2, 60, 8, 64, torch.float32, device, 5)
    want = reference(
        q, k, v, method="mixkv", pooling="max", kernel_size=7, gqa="mean", redundancy=None, valid=None, scale=None
    )
    assert_close_rows(scores(q, k, v), want.scores, 1e-4, 1e-5, "scores")


def test_padding_equals_alone(device: str) -> None:
    """Each sequence of a left-padded batch scores as if run alone (bitwise on the CPU)."""
    bsz, hkv, g, n, w, d = 3, 2, 4, 90, 16, 64
    q, k, v = make_inputs(bsz, hkv * g, hkv, n, w, d, torch.bfloat16, device, 11)
    lengths = [90, 40, 12]
    valid = torch.tensor(lengths, device=device)
    for method in METHODS:
        batch = run_core(q, k, v, method=method, pooling="avg", kernel_size=5, gqa="mean", valid=valid)
        for b, nb in enumerate(lengths):
            alone = (
                run_core(
                    q[b : b + 1],
                    k[b : b + 1, :, n - nb :],
                    v[b : b + 1, :, n - nb :],
                    method=method,
                    pooling="avg",
                    kernel_size=5,
                    gqa="mean",
                )
                if nb > w
                else None
            )
            pad = n - nb
            assert torch.isneginf(batch.scores[b, :, :pad]).all()
            assert torch.isneginf(batch.importance[b, :, :pad]).all()
            if alone is None:
                continue
            for got, want in ((batch.scores, alone.scores), (batch.importance, alone.importance)):
                if device == "cpu":
                    assert torch.equal(got[b, :, pad:], want[0])
                else:
                    torch.testing.assert_close(got[b, :, pad:], want[0], rtol=1e-5, atol=1e-7)
            if device == "cpu":
                torch.testing.assert_close(batch.redundancy[b], alone.redundancy[0], rtol=0, atol=0, equal_nan=True)


def test_strided_inputs(device: str) -> None:
    """Any strides with a contiguous last dimension: a window sliced from the full Q, [B, N, H, D] keys."""
    bsz, hkv, g, n, w, d = 2, 2, 4, 50, 8, 64
    gen = torch.Generator().manual_seed(1)
    qfull = torch.randn(bsz, hkv * g, n, d, generator=gen).to(device)
    kt = torch.randn(bsz, n, hkv, d, generator=gen).to(device)
    vt = torch.randn(bsz, n, hkv, d, generator=gen).to(device)
    q, k, v = qfull[:, :, n - w :], kt.transpose(1, 2), vt.transpose(1, 2)
    got = scores(q, k, v, method="mixkv", pooling="avg", kernel_size=5)
    want = scores(q.contiguous(), k.contiguous(), v.contiguous(), method="mixkv", pooling="avg", kernel_size=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    ref = reference(
        q, k, v, method="mixkv", pooling="avg", kernel_size=5, gqa="mean", redundancy=None, valid=None, scale=None
    )
    assert_close_rows(got, ref.scores, 1e-4, 1e-5, "scores")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [36, 72])
def test_odd_head_dims(device: str, dtype: torch.dtype, d: int) -> None:
    """Head dimensions that are not a multiple of 16 (zero-padded tiles, unaligned rows)."""
    q, k, v = make_inputs(2, 6, 2, 75, 20, d, dtype, device, d)
    valid = torch.tensor([75, 31], device=device)
    for method in ("mixkv", "knorm"):
        got = run_core(q, k, v, method=method, pooling="max", kernel_size=3, gqa="max", valid=valid)
        want = reference(
            q, k, v, method=method, pooling="max", kernel_size=3, gqa="max", redundancy=None, valid=[75, 31], scale=None
        )
        assert_close_rows(got.scores, want.scores, 2e-4, 2e-5, "scores")
        assert_close_rows(got.importance, want.importance, 2e-4, 2e-5, "importance")


@pytest.mark.parametrize(
    ("hq", "hkv", "w", "d"),
    [
        (16, 2, 32, 128),  # 256 packed rows: every warp of the tensor-core passes holds query rows
        (14, 2, 32, 256),  # head dimension 256: 14 query warps of 16 rows and one more warp
        (2, 2, 16, 64),  # one query warp and three more
        (10, 2, 20, 96),  # 160 packed rows (three warpgroups), 12 padding rows per head, head dimension 96
    ],
)
def test_warp_layouts(device: str, hq: int, hkv: int, w: int, d: int) -> None:
    """Query-warp counts of the tensor-core passes: with and without warps that hold no query rows."""
    q, k, v = make_inputs(2, hq, hkv, 333, w, d, torch.bfloat16, device, hq * d)
    valid = torch.tensor([333, 170], device=device)
    got = run_core(q, k, v, method="mixkv", pooling="avg", kernel_size=5, gqa="mean", valid=valid)
    want = reference(
        q, k, v, method="mixkv", pooling="avg", kernel_size=5, gqa="mean", redundancy=None, valid=[333, 170], scale=None
    )
    assert_close_rows(got.scores, want.scores, 2e-4, 2e-5, "scores")
    assert_close_rows(got.importance, want.importance, 2e-4, 2e-5, "importance")
    torch.testing.assert_close(got.redundancy.cpu().double(), want.redundancy, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_query_rows_unaligned(device: str) -> None:
    """Query rows that are not 16-byte aligned (a view into wider rows) score as the contiguous copy."""
    q, k, v = make_inputs(2, 14, 2, 700, 32, 128, torch.bfloat16, device, 11)
    wide = torch.zeros(2, 14, 32, 129, dtype=q.dtype, device=device)
    wide[..., 1:] = q
    view = wide[..., 1:]
    assert not view.is_contiguous()
    valid = torch.tensor([700, 431], device=device)
    want = run_core(q, k, v, method="mixkv", pooling="max", kernel_size=7, gqa="mean", valid=valid)
    got = run_core(view, k, v, method="mixkv", pooling="max", kernel_size=7, gqa="mean", valid=valid)
    assert torch.equal(got.scores, want.scores)
    assert torch.equal(got.redundancy, want.redundancy)


def test_constant_norms_map_to_zero(device: str) -> None:
    """A constant value-norm row normalises to 0 (the epsilon), so vnorm equals attn."""
    q, k, v = make_inputs(1, 4, 1, 40, 8, 64, torch.float32, device, 2)
    v = torch.zeros_like(v)
    v[..., 0] = 3.0
    a = scores(q, k, v, method="attn", pooling="avg", kernel_size=3)
    vn = scores(q, k, v, method="vnorm", pooling="avg", kernel_size=3)
    assert torch.equal(a, vn)
    # identical keys: no diversity (0 everywhere) and r = 1, so mixkv scores vanish
    k = k[:, :, :1].expand_as(k).contiguous()
    s = compute_scores(q, k, v, method="mixkv", pooling="avg", kernel_size=3, gqa="mean")
    # (r = 1 up to the rounding of the unit keys' squared norm)
    assert abs(float(s.redundancy) - 1.0) <= 1e-6
    assert float(s.scores.abs().max()) <= 1e-6 * float(
        compute_scores(q, k, v, method="attn", pooling="avg", kernel_size=3, gqa="mean").scores.max()
    )


# ---- head redundancy ----------------------------------------------------------------------------


@given(
    bsz=st.sampled_from((1, 3)),
    hkv=st.integers(1, 4),
    n=st.integers(1, 300),
    d=st.sampled_from((64, 80, 128)),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    padded=st.booleans(),
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_head_redundancy_matches_reference(
    device: str, bsz: int, hkv: int, n: int, d: int, dtype: torch.dtype, seed: int, padded: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(bsz, hkv, n, d, generator=gen) + 2 * torch.rand(1, hkv, 1, d, generator=gen)).to(dtype)
    lengths = [int(x) for x in torch.randint(1, n + 1, (bsz,), generator=gen)] if padded else [n] * bsz
    valid = torch.tensor(lengths, device=device) if padded else None
    got = head_redundancy(k.to(device), valid)
    want = torch.stack([ref_redundancy(k[b, :, n - lengths[b] :].double(), lengths[b]) for b in range(bsz)])
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)


def test_head_redundancy_clamps(device: str) -> None:
    row = torch.randn(1, 1, 1, 64)
    same = row.expand(1, 1, 10, 64).contiguous().to(device)
    assert abs(float(head_redundancy(same)) - 1.0) <= 1e-6
    opposite = torch.cat([row, -row], dim=2).to(device)  # mean key 0: r = -1/(n-1) -> 0
    assert float(head_redundancy(opposite)) == 0.0
    assert float(head_redundancy(row.to(device))) == 0.0  # a single token
    zeros = torch.zeros(1, 1, 5, 64, device=device)  # zero keys stay zero after the clamp_min
    assert float(head_redundancy(zeros)) == 0.0


# ---- validation ---------------------------------------------------------------------------------


def _ok() -> dict:
    q, k, v = make_inputs(2, 4, 2, 20, 4, 16, torch.float32, "cpu", 0)
    return {"query_window": q, "keys": k, "values": v}


def _call(**over: object) -> None:
    args = _ok()
    args.update(over)
    scores(args.pop("query_window"), args.pop("keys"), args.pop("values"), **args)


@pytest.mark.parametrize(
    ("over", "exc", "word"),
    [
        ({"query_window": "x"}, TypeError, "query_window"),
        ({"keys": [1.0]}, TypeError, "keys"),
        ({"values": None}, TypeError, "values"),
        ({"query_window": torch.zeros(4, 4, 16)}, ValueError, "query_window"),
        ({"keys": torch.zeros(2, 2, 20, 16, dtype=torch.int32)}, TypeError, "keys"),
        ({"values": torch.zeros(2, 2, 20, 16, dtype=torch.float64)}, TypeError, "values"),
        ({"values": torch.zeros(2, 2, 20, 16, dtype=torch.float16)}, TypeError, "values"),
        ({"values": torch.zeros(2, 2, 21, 16)}, ValueError, "values"),
        ({"query_window": torch.zeros(2, 3, 4, 16)}, ValueError, "query_window"),
        ({"query_window": torch.zeros(2, 4, 4, 8)}, ValueError, "query_window"),
        ({"query_window": torch.zeros(1, 4, 4, 16)}, ValueError, "query_window"),
        ({"query_window": torch.zeros(2, 4, 20, 16)}, ValueError, "query_window"),
        ({"query_window": torch.zeros(2, 4, 0, 16)}, ValueError, "query_window"),
        ({"keys": torch.zeros(2, 2, 20, 32)[..., ::2]}, ValueError, "keys"),
        ({"method": "snap"}, ValueError, "method"),
        ({"pooling": "min"}, ValueError, "pooling"),
        ({"gqa": "sum"}, ValueError, "gqa"),
        ({"kernel_size": 4}, ValueError, "kernel_size"),
        ({"kernel_size": 0}, ValueError, "kernel_size"),
        ({"kernel_size": 3.0}, TypeError, "kernel_size"),
        ({"redundancy": torch.zeros(2, 3)}, ValueError, "redundancy"),
        ({"redundancy": torch.zeros(3, 2)}, ValueError, "redundancy"),
        ({"redundancy": torch.zeros(2)}, ValueError, "redundancy"),
        ({"redundancy": torch.full((1, 2), math.nan)}, ValueError, "redundancy"),
        ({"valid_lengths": torch.tensor([20, 0])}, ValueError, "valid_lengths"),
        ({"valid_lengths": torch.tensor([21, 5])}, ValueError, "valid_lengths"),
        ({"valid_lengths": torch.tensor([20])}, ValueError, "valid_lengths"),
        ({"valid_lengths": torch.tensor([20.0, 5.0])}, TypeError, "valid_lengths"),
        ({"scale": -1.0}, ValueError, "scale"),
        ({"scale": "a"}, TypeError, "scale"),
        ({"keys": torch.zeros(2, 2, 20, 16, device="meta")}, ValueError, "keys"),
    ],
)
def test_validation(over: dict, exc: type[Exception], word: str) -> None:
    with pytest.raises(exc, match=word):
        _call(**over)


@pytest.mark.parametrize("name", ["query_window", "keys", "values"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs(name: str, bad: float) -> None:
    args = _ok()
    args[name] = args[name].clone()
    args[name][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=name):
        scores(**args)
    # validate=False skips only this scan
    q, k, v = args["query_window"], args["keys"], args["values"]
    compute_scores(q, k, v, method="attn", pooling="avg", kernel_size=1, gqa="mean", validate=False)


def test_head_redundancy_validation() -> None:
    with pytest.raises(TypeError, match="keys"):
        head_redundancy(torch.zeros(1, 1, 4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="keys"):
        head_redundancy(torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="keys"):
        head_redundancy(torch.full((1, 1, 4, 8), math.nan))
    with pytest.raises(ValueError, match="valid_lengths"):
        head_redundancy(torch.zeros(1, 1, 4, 8), torch.tensor([5]))


def test_core_validation() -> None:
    """The core checks its own arguments too (names in the messages)."""
    q, k, v = _ok().values()
    good = run_core(q, k, v, method="attn", pooling="avg", kernel_size=3, gqa="mean")
    assert not torch.isnan(good.scores).any()
    s = torch.empty(2, 2, 16)
    with pytest.raises(ValueError, match="scores"):
        _core.score(q, k, v, None, None, 0, 0, 3, 0, 0.0, torch.empty(2, 2, 15), None, None, None, 0)
    with pytest.raises(ValueError, match="kernel_size"):
        _core.score(q, k, v, None, None, 0, 0, 2, 0, 0.0, s, None, None, None, 0)
    with pytest.raises(ValueError, match="method"):
        _core.score(q, k, v, None, None, 9, 0, 3, 0, 0.0, s, None, None, None, 0)
    with pytest.raises(ValueError, match="valid_lengths"):
        _core.score(q, k, v, torch.tensor([3, 30], dtype=torch.int32), None, 0, 0, 3, 0, 0.0, s, None, None, None, 0)
    with pytest.raises(ValueError, match="importance"):
        _core.score(q, k, v, None, None, 0, 0, 3, 0, 0.0, s, torch.empty(2, 2, 16, dtype=torch.int32), None, None, 0)
    with pytest.raises(ValueError, match="redundancy_out"):
        _core.score(q, k, v, None, None, 0, 0, 3, 0, 0.0, s, None, torch.empty(2, 3), None, 0)
