"""capacities / capacities_into against a float64 reference written from SPEC §7."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mixkv.ops import POLICIES, capacities, capacity_bound
from mixkv.ops._budget import capacities_into

NEG_INF = float("-inf")
# The device fixture is a plain string: sharing it across generated examples is safe.
FIXTURE_OK = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
)


def prefixes(p: int, window: int, valid_lengths: list[int] | None, batch: int) -> list[int]:
    return [p] * batch if valid_lengths is None else [max(n - window, 0) for n in valid_lengths]


def adakv_slots(imp: torch.Tensor, pb: int, base: int, normalize: bool) -> tuple[list[int], float]:
    """Slots won per head in the global top H*base (ties to the lower flat index) and the gap
    between the k-th and (k+1)-th scaled scores relative to their size."""
    heads = imp.shape[0]
    scaled = []
    for h in range(heads):
        a = torch.sort(imp[h, imp.shape[1] - pb :].to(torch.float64), descending=True).values
        f = 1.0
        if normalize:
            total = float(a.sum())
            f = float(a[:base].sum()) / total if total != 0.0 else 1.0
        scaled.append(a * f)
    flat = torch.cat(scaled)
    order = torch.sort(flat, descending=True, stable=True)
    k = heads * base
    won = [0] * heads
    for i in order.indices[:k].tolist():
        won[i // pb] += 1
    vals = order.values
    gap = math.inf
    if 0 < k < vals.numel():
        gap = float(vals[k - 1] - vals[k]) / max(abs(float(vals[k - 1])), 1e-30)
    return won, gap


def reference(
    policy: str,
    imp: torch.Tensor,
    *,
    budget: int,
    window: int,
    layer_idx: int,
    num_layers: int,
    valid_lengths: list[int] | None,
    beta: float = 20.0,
    floor: float = 0.2,
    normalize: bool = True,
    skip: int = 0,
    head_scores: list[float] | None = None,
    ratio: float = 0.1,
) -> tuple[list[list[int]], float]:
    batch, heads, p = imp.shape
    base = max(budget - window, 0)
    out: list[list[int]] = []
    min_gap = math.inf
    for b, pb in enumerate(prefixes(p, window, valid_lengths, batch)):
        if policy == "snapkv":
            row = [base] * heads
        elif policy == "pyramidkv":
            mn = base // beta
            mx = 2 * base - mn
            if mx >= pb:
                mx = pb
                mn = 2 * base - mx
            step = (mx - mn) // (num_layers - 1) if num_layers > 1 else 0
            row = [int(mx - layer_idx * step)] * heads
        elif policy == "sparsemm":
            assert head_scores is not None
            mn = int(base * ratio)
            pool = (base - mn) * num_layers * heads
            row = [round(s * pool + mn) for s in head_scores]
        else:
            row = [base] * heads
            if layer_idx >= skip and pb > base:
                won, gap = adakv_slots(imp[b], pb, base, normalize)
                min_gap = min(min_gap, gap)
                row = [round(a * (1 - floor) + math.floor(floor * base)) for a in won]
        out.append([min(max(c, 0), pb) for c in row])
    return out, min_gap


@st.composite
def problems(draw: st.DrawFn) -> dict[str, object]:
    policy = draw(st.sampled_from(POLICIES))
    batch = draw(st.sampled_from([1, 3]))
    heads = draw(st.sampled_from([1, 2, 4, 8, 28]))
    window = draw(st.integers(1, 40))
    if draw(st.integers(0, 5)) == 0:
        p = draw(st.sampled_from([40_000, 12_000, 3_000])) // (heads * batch if policy == "adakv" else 1)
    else:
        p = draw(st.integers(1, 120))
    budget = draw(st.one_of(st.integers(1, window + p + 10), st.integers(window, window + min(p, 300))))
    num_layers = draw(st.integers(1, 40))
    layer_idx = draw(st.integers(0, num_layers - 1))
    valid: list[int] | None = None
    if draw(st.booleans()):
        valid = [draw(st.integers(1, p + window)) for _ in range(batch)]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    imp = torch.rand((batch, heads, p), generator=gen) ** draw(st.sampled_from([1.0, 3.0, 8.0]))
    imp = imp * torch.rand((1, heads, 1), generator=gen) * 10  # heads on different scales
    if valid is not None:
        for b, n in enumerate(valid):
            imp[b, :, : p - max(n - window, 0)] = NEG_INF
    opts: dict[str, object] = {}
    if policy == "pyramidkv" and draw(st.booleans()):
        opts["beta"] = draw(st.sampled_from([1.0, 3.0, 7.5, 20.0, 100.0]))
    if policy == "adakv":
        opts["floor"] = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0, 0.33]))
        opts["normalize"] = draw(st.booleans())
        opts["skip"] = draw(st.integers(0, 3))
    if policy == "sparsemm":
        table = torch.rand((num_layers, heads), generator=gen)
        opts["head_scores"] = table / table.sum()
        opts["ratio"] = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    return {
        "policy": policy,
        "imp": imp,
        "budget": budget,
        "window": window,
        "layer_idx": layer_idx,
        "num_layers": num_layers,
        "valid": valid,
        "opts": opts,
    }


def split_options(case: dict[str, object], device: str) -> tuple[dict[str, object], dict[str, object]]:
    """The case's policy options for the call on ``device`` and for the reference (which takes this
    layer's row of a SparseMM table as floats)."""
    opts = dict(case["opts"])  # type: ignore[call-overload]
    ref_opts = dict(opts)
    if "head_scores" in opts:
        table = opts["head_scores"]
        ref_opts["head_scores"] = table[case["layer_idx"]].to(torch.float64).tolist()  # type: ignore[index]
        opts["head_scores"] = table.to(device)  # type: ignore[union-attr]
    return opts, ref_opts


def run_and_compare(device: str, case: dict[str, object], *, need_gap: bool) -> None:
    imp = case["imp"]
    assert isinstance(imp, torch.Tensor)
    opts, ref_opts = split_options(case, device)
    valid = case["valid"]
    common = {k: case[k] for k in ("budget", "window", "layer_idx", "num_layers")}
    want, gap = reference(case["policy"], imp, valid_lengths=valid, **common, **ref_opts)  # type: ignore[arg-type]
    if need_gap:
        assume(gap > 1e-5)  # float32 ranking on the GPU: no near-ties at the k-th place
    out = torch.full(tuple(imp.shape[:2]), -7777, dtype=torch.int32, device=device)
    lengths = None if valid is None else torch.tensor(valid, device=device)
    capacities_into(case["policy"], imp.to(device), out=out, valid_lengths=lengths, **common, **opts)  # type: ignore[arg-type]
    assert out.cpu().tolist() == want


@FIXTURE_OK
@given(case=problems())
def test_capacities_match_reference(device: str, case: dict[str, object]) -> None:
    run_and_compare(device, case, need_gap=device == "cuda")


def test_adakv_ties_go_to_lower_heads(device: str) -> None:
    # every head holds the same multiset of small integers (exact sums): scaled scores tie exactly
    gen = torch.Generator().manual_seed(3)
    heads, p = 4, 300
    values = torch.randint(0, 5, (p,), generator=gen).float()
    imp = torch.stack([values[torch.randperm(p, generator=gen)] for _ in range(heads)])[None]
    for normalize in (False, True):
        for budget in (10, 47, 130, 290):
            case = {
                "policy": "adakv",
                "imp": imp,
                "budget": budget,
                "window": 8,
                "layer_idx": 0,
                "num_layers": 2,
                "valid": None,
                "opts": {"normalize": normalize, "floor": 0.0},
            }
            run_and_compare(device, case, need_gap=False)
    # explicit: all scores equal, base 2, 6 slots, no floor: the first heads take every slot in flat order
    out = capacities(
        "adakv",
        torch.ones((1, 3, 4), device=device),
        budget=3,
        window=1,
        layer_idx=0,
        num_layers=1,
        floor=0.0,
        normalize=False,
    )
    assert out.tolist() == [[4, 2, 0]]


def test_budget_above_context_keeps_everything(device: str) -> None:
    imp = torch.rand((3, 4, 50))
    lengths = torch.tensor([82, 10, 40])
    table = torch.full((4,), 0.9)
    for policy in POLICIES:
        opts: dict[str, object] = {"head_scores": table.to(device)} if policy == "sparsemm" else {}
        out = capacities(policy, imp.to(device), budget=82, window=32, layer_idx=1, num_layers=3, **opts)
        assert out.tolist() == [[50] * 4] * 3
        out = capacities(
            policy,
            imp.to(device),
            budget=82,
            window=32,
            layer_idx=1,
            num_layers=3,
            valid_lengths=lengths.to(device),
            **opts,
        )
        assert out.tolist() == [[50] * 4, [0] * 4, [8] * 4]


def test_sparsemm_rounds_half_to_even(device: str) -> None:
    # base 64, ratio 0 -> pool = 64 * L * Hkv = 512 (L = 2, Hkv = 4): s * pool is exact
    scores = torch.tensor([2.5, 3.5, 0.5, 100.25]) / 512
    out = capacities(
        "sparsemm",
        torch.zeros((1, 4, 200), device=device),
        budget=96,
        window=32,
        layer_idx=0,
        num_layers=2,
        head_scores=scores.to(device),
        ratio=0.0,
    )
    assert out.tolist() == [[2, 4, 0, 100]]


def test_pyramid_single_layer_and_adakv_skip(device: str) -> None:
    imp = torch.rand((1, 2, 500), device=device)
    out = capacities("pyramidkv", imp, budget=132, window=32, layer_idx=0, num_layers=1)
    assert out.tolist() == [[195, 195]]  # min = 5, max = 195, step 0
    out = capacities("adakv", imp, budget=132, window=32, layer_idx=2, num_layers=8, skip=3)
    assert out.tolist() == [[100, 100]]


def test_capacities_reject_bad_inputs(device: str) -> None:
    imp = torch.rand((2, 4, 30), device=device)
    ok = {"budget": 20, "window": 4, "layer_idx": 0, "num_layers": 2}
    table = torch.full((2, 4), 1 / 8, device=device)
    bad_calls: list[tuple[type[Exception], str, str, dict[str, object]]] = [
        (ValueError, "policy", "h2o", {}),
        (ValueError, "budget", "snapkv", {"budget": 0}),
        (ValueError, "window", "snapkv", {"window": 0}),
        (ValueError, "layer_idx", "snapkv", {"layer_idx": 2}),
        (ValueError, "layer_idx", "snapkv", {"layer_idx": -1}),
        (ValueError, "num_layers", "snapkv", {"num_layers": 0, "layer_idx": 0}),
        (TypeError, "budget", "snapkv", {"budget": 2.5}),
        (ValueError, "floor", "adakv", {"floor": 1.5}),
        (ValueError, "ratio", "sparsemm", {"ratio": 1.0, "head_scores": table}),
        (ValueError, "beta", "pyramidkv", {"beta": 0.0}),
        (ValueError, "skip", "adakv", {"skip": -1}),
        (TypeError, "normalize", "adakv", {"normalize": 1}),
        (TypeError, "beta", "adakv", {"beta": 3.0}),
        (TypeError, "colour", "snapkv", {"colour": 1}),
        (ValueError, "head_scores", "sparsemm", {}),
        (ValueError, "head_scores", "sparsemm", {"head_scores": table[:, :3]}),
        (ValueError, "head_scores", "sparsemm", {"head_scores": table * float("nan")}),
        (ValueError, "valid_lengths", "snapkv", {"valid_lengths": torch.tensor([0, 5], device=device)}),
        (ValueError, "valid_lengths", "snapkv", {"valid_lengths": torch.tensor([35, 5], device=device)}),
        (ValueError, "valid_lengths", "snapkv", {"valid_lengths": torch.tensor([5], device=device)}),
    ]
    for exc, word, policy, changes in bad_calls:
        with pytest.raises(exc, match=word):
            capacities(policy, imp, **{**ok, **changes})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="importance"):
        capacities("snapkv", imp.double(), **ok)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="importance"):
        capacities("snapkv", imp[0], **ok)  # type: ignore[arg-type]
    nan = imp.clone()
    nan[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="importance"):
        capacities("adakv", nan, **ok)  # type: ignore[arg-type]
    inf = imp.clone()
    inf[0, 0, 29] = NEG_INF
    with pytest.raises(ValueError, match="importance"):
        capacities("adakv", inf, **ok)  # type: ignore[arg-type]
    out = torch.empty((2, 3), dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="out"):
        capacities_into("snapkv", imp, out=out, **ok)  # type: ignore[arg-type]


def make_case(
    policy: str,
    imp: torch.Tensor,
    scores: torch.Tensor | None,
    budget: int,
    *,
    window: int = 32,
    layer_idx: int = 1,
    num_layers: int = 4,
    valid: list[int] | None = None,
    **opts: object,
) -> dict[str, object]:
    """A test case of a policy; ``scores`` (None: the importance) is the selection score of
    capacities_select (test_capacities_select.py); padding turns to -inf in both score rows."""
    if valid is not None:  # padding: -inf in both score rows, as the scoring kernels leave it
        p = imp.shape[2]
        imp = imp.clone()
        scores = None if scores is None else scores.clone()
        for b, n in enumerate(valid):
            imp[b, :, : p - max(n - window, 0)] = NEG_INF
            if scores is not None:
                scores[b, :, : p - max(n - window, 0)] = NEG_INF
    return {
        "policy": policy,
        "imp": imp,
        "scores": scores,
        "budget": budget,
        "window": window,
        "layer_idx": layer_idx,
        "num_layers": num_layers,
        "valid": valid,
        "opts": opts,
    }


def adakv_case(imp: torch.Tensor, budget: int, normalize: bool, valid: list[int] | None = None) -> dict[str, object]:
    return make_case("adakv", imp, None, budget, valid=valid, normalize=normalize, floor=0.2)


# MIXKV_SELECT_MAX_CLUSTER caps the blocks per row on CUDA ("1": the one-block path of devices
# before sm_90); the CPU twin ignores it.
@pytest.mark.parametrize("max_cluster", [None, "1"])
def test_adakv_many_heads_long_rows_large_budgets(
    device: str, max_cluster: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if max_cluster is not None:
        monkeypatch.setenv("MIXKV_SELECT_MAX_CLUSTER", max_cluster)
    gen = torch.Generator().manual_seed(41)
    # integer scores: every scaled score is exact or tied exactly, so both paths rank alike
    many = torch.randint(0, 50, (4, 32, 2000), generator=gen).float()
    run_and_compare(device, adakv_case(many, 96, False, [2032, 900, 40, 2032]), need_gap=False)
    # heads holding the same multiset: equal f_h, exact ties across heads; 12,000 keys cached in one
    # block take 48,000 bytes of dynamic shared memory, over the default limit once the kernel's
    # static shared memory is counted (a launch that failed before the limit was raised for it)
    values = torch.randint(0, 9, (12_000,), generator=gen).float()
    same = torch.stack([values[torch.randperm(12_000, generator=gen)] for _ in range(4)])[None]
    for budget in (64, 1056, 4000):
        run_and_compare(device, adakv_case(same, budget, True), need_gap=False)
    # real-valued scores on different scales (the k-th place has a clear gap for this seed)
    gen = torch.Generator().manual_seed(5)
    real = (torch.rand((2, 4, 31968), generator=gen) ** 3) * torch.rand((1, 4, 1), generator=gen) * 10
    for budget in (64, 1056):
        case = adakv_case(real, budget, True, [32000, 20000])
        _, gap = reference(
            "adakv", real, valid_lengths=case["valid"], budget=budget, window=32, layer_idx=1, num_layers=4
        )  # type: ignore[arg-type]
        assert gap > 1e-6
        run_and_compare(device, case, need_gap=False)


def test_adakv_heads_beyond_one_block_raise(device: str) -> None:
    """AdaKV's CUDA allocation keeps 28 bytes per kv head in one block's shared memory: a layer with
    more kv heads than that holds is refused with a ValueError (the CPU twin has no such limit and
    must agree with the reference)."""
    gen = torch.Generator().manual_seed(3)
    imp = torch.rand((1, 9000, 40), generator=gen)
    case = adakv_case(imp, 40, False)
    if device == "cpu":
        run_and_compare(device, case, need_gap=False)
        return
    with pytest.raises(ValueError, match="too many kv heads"):
        capacities("adakv", imp.to(device), budget=40, window=32, layer_idx=1, num_layers=4)
    torch.cuda.synchronize()  # nothing was left running on the device


# ---- capacity_bound ---------------------------------------------------------------------------


def bound_of(case: dict[str, object]) -> int:
    imp = case["imp"]
    assert isinstance(imp, torch.Tensor)
    common = {k: case[k] for k in ("budget", "window", "layer_idx", "num_layers")}
    return capacity_bound(
        case["policy"],  # type: ignore[arg-type]
        num_kv_heads=imp.shape[1],
        prefix=imp.shape[2],
        **common,  # type: ignore[arg-type]
        **case["opts"],  # type: ignore[arg-type]
    )


@FIXTURE_OK
@given(case=problems())
def test_capacity_bound_holds(case: dict[str, object]) -> None:
    """No capacity of the reference exceeds the bound, which lies in [0, P] (snapkv: exactly base)."""
    imp = case["imp"]
    assert isinstance(imp, torch.Tensor)
    _, ref_opts = split_options(case, "cpu")
    common = {k: case[k] for k in ("budget", "window", "layer_idx", "num_layers")}
    want, _ = reference(case["policy"], imp, valid_lengths=case["valid"], **common, **ref_opts)  # type: ignore[arg-type]
    bound = bound_of(case)
    p = imp.shape[2]
    assert 0 <= bound <= p
    assert max(max(row) for row in want) <= bound
    if case["policy"] == "snapkv":
        assert bound == min(max(case["budget"] - case["window"], 0), p)  # type: ignore[operator]


def test_capacity_bound_is_reached() -> None:
    """pyramidkv's first layer and an AdaKV head that wins every slot (floor 0) reach the bound."""
    imp = torch.rand(1, 4, 5000) * 1e-6
    case = make_case("pyramidkv", imp, None, 96, layer_idx=0, num_layers=28, beta=20.0)
    assert int(capacities("pyramidkv", imp, budget=96, window=32, layer_idx=0, num_layers=28).max()) == bound_of(case)
    assert bound_of(case) == 2 * 64 - 64 // 20
    imp[0, 2] = 1.0 + torch.rand(5000)
    case = make_case("adakv", imp, None, 96, floor=0.0, normalize=True)
    caps = capacities("adakv", imp, budget=96, window=32, layer_idx=1, num_layers=4, floor=0.0)
    assert int(caps.max()) == bound_of(case) == 4 * 64
    case = make_case("adakv", imp, None, 96, skip=2)
    assert bound_of(case) == 64  # layers below skip keep base
    assert bound_of(make_case("sparsemm", imp, None, 96, head_scores=torch.full((4, 4), 1 / 16))) == 5000


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"policy": "h2o"}, ValueError, "policy"),
        ({"budget": 0}, ValueError, "budget"),
        ({"window": 0}, ValueError, "window"),
        ({"layer_idx": 4}, ValueError, "layer_idx"),
        ({"num_kv_heads": 0}, ValueError, "num_kv_heads"),
        ({"prefix": -1}, ValueError, "prefix"),
        ({"prefix": 3.0}, TypeError, "prefix"),
        ({"beta": 2.0}, TypeError, "beta"),
        ({"policy": "pyramidkv", "beta": 0.0}, ValueError, "beta"),
        ({"policy": "adakv", "floor": 2.0}, ValueError, "floor"),
    ],
)
def test_capacity_bound_rejects_bad_arguments(kwargs: dict[str, object], error: type, match: str) -> None:
    args: dict[str, object] = {
        "policy": "snapkv",
        "budget": 64,
        "window": 32,
        "layer_idx": 1,
        "num_layers": 4,
        "num_kv_heads": 4,
        "prefix": 100,
    }
    args.update(kwargs)
    policy = args.pop("policy")
    with pytest.raises(error, match=match):
        capacity_bound(policy, **args)  # type: ignore[arg-type]
