"""capacities_select_into against the float64 references of capacities (SPEC §7) and select (§6).

On CUDA, AdaKV takes a fused path (each row's top min(Hkv * base, P) selection scores kept beside the
AdaKV ranking, then a pick per row): every case here must give exactly what the two operations give.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mixkv.ops import POLICIES, capacities_into, capacities_select_into, select_into
from test_budget import FIXTURE_OK, make_case, split_options
from test_budget import reference as capacity_reference
from test_select import POISON
from test_select import reference as select_reference

COMMON = ("budget", "window", "layer_idx", "num_layers")


def run_case(device: str, case: dict[str, object], *, extra_columns: int, need_gap: bool) -> None:
    imp = case["imp"]
    scores = case["scores"]
    assert isinstance(imp, torch.Tensor) and (scores is None or isinstance(scores, torch.Tensor))
    opts, ref_opts = split_options(case, device)
    valid = case["valid"]
    common = {k: case[k] for k in COMMON}
    want_caps, gap = capacity_reference(case["policy"], imp, valid_lengths=valid, **common, **ref_opts)  # type: ignore[arg-type]
    if need_gap:
        assume(gap > 1e-5)  # float32 ranking on the GPU: no near-ties at the k-th place
    sel = imp if scores is None else scores
    want_pos, want_cnt = select_reference(sel, torch.tensor(want_caps, dtype=torch.int32))
    b, h, _ = imp.shape
    columns = max(max(row) for row in want_caps) + extra_columns
    caps = torch.full((b, h), POISON, dtype=torch.int32, device=device)
    pos = torch.full((b, h, columns), POISON, dtype=torch.int32, device=device)
    cnt = torch.full((b, h), POISON, dtype=torch.int32, device=device)
    imp_d = imp.to(device)
    sel_d = imp_d if scores is None else sel.to(device)  # the same tensor for both, as plain policies pass it
    lengths = None if valid is None else torch.tensor(valid, device=device)
    capacities_select_into(
        case["policy"],  # type: ignore[arg-type]
        imp_d,
        sel_d,
        capacities=caps,
        positions=pos,
        counts=cnt,
        valid_lengths=lengths,
        **common,  # type: ignore[arg-type]
        **opts,
    )
    assert caps.cpu().tolist() == want_caps
    got_pos, got_cnt = pos.cpu(), cnt.cpu()
    for i in range(b):
        for j in range(h):
            assert got_pos[i, j].tolist() == want_pos[i][j] + [-1] * (columns - len(want_pos[i][j])), (i, j)
            assert int(got_cnt[i, j]) == want_cnt[i][j], (i, j)


@st.composite
def problems(draw: st.DrawFn) -> tuple[dict[str, object], int]:
    """Mostly AdaKV with Hkv * base below P (the fused path), every policy now and then."""
    policy = draw(st.sampled_from(["adakv"] * 3 + list(POLICIES)))
    batch = draw(st.sampled_from([1, 3]))
    heads = draw(st.sampled_from([1, 2, 4, 7, 8]))
    window = draw(st.integers(1, 40))
    kind = draw(st.integers(0, 7))
    p = (
        draw(st.sampled_from([5_000, 12_000])) // batch
        if kind == 0
        else draw(st.integers(2, 1_500 if kind < 3 else 150))
    )
    base = draw(st.one_of(st.integers(0, max(p // heads, 1)), st.integers(0, p + 5)))
    num_layers = draw(st.integers(1, 8))
    layer_idx = draw(st.integers(0, num_layers - 1))
    valid: list[int] | None = None
    if draw(st.booleans()):
        valid = [draw(st.integers(1, p + window)) for _ in range(batch)]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.integers(0, 3)) == 0:  # integer scores: exact ties everywhere, ranked alike on both paths
        imp = torch.randint(0, 6, (batch, heads, p), generator=gen).float()
    else:
        imp = torch.rand((batch, heads, p), generator=gen) ** draw(st.sampled_from([1.0, 3.0]))
        imp = imp * torch.rand((1, heads, 1), generator=gen) * 10
    scores: torch.Tensor | None = None
    score_kind = draw(st.sampled_from(["same", "real", "ties"]))
    if score_kind == "real":
        scores = torch.randn((batch, heads, p), generator=gen)
    elif score_kind == "ties":
        scores = torch.randint(-3, 3, (batch, heads, p), generator=gen).float()
    opts: dict[str, object] = {}
    if policy == "adakv":
        opts = {"floor": draw(st.sampled_from([0.0, 0.2, 1.0])), "normalize": draw(st.booleans())}
        opts["skip"] = draw(st.integers(0, 2))
    if policy == "sparsemm":
        table = torch.rand((num_layers, heads), generator=gen)
        opts = {"head_scores": table / table.sum(), "ratio": 0.1}
    case = make_case(
        policy,
        imp,
        scores,
        base + window,
        window=window,
        layer_idx=layer_idx,
        num_layers=num_layers,
        valid=valid,
        **opts,
    )
    return case, draw(st.sampled_from([0, 1, 7, 300]))


@FIXTURE_OK
@given(problem=problems())
def test_capacities_select_matches_reference(device: str, problem: tuple[dict[str, object], int]) -> None:
    case, extra = problem
    integer = bool(torch.equal(case["imp"], case["imp"].round()))  # type: ignore[union-attr]
    run_case(device, case, extra_columns=extra, need_gap=device == "cuda" and not integer)


# MIXKV_SELECT_MAX_CLUSTER caps the blocks per row on CUDA ("1": the one-block path of devices before
# sm_90); MIXKV_SELECT_MERGE=0 turns the shortlist form of cluster rows off. The CPU twin ignores both.
@pytest.mark.parametrize(("max_cluster", "merge"), [(None, "1"), (None, "0"), ("1", "1")])
def test_fused_shapes_match_two_calls(
    device: str, max_cluster: str | None, merge: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every launch shape of the fused path against capacities_into + select_into on the same device:
    candidates per row at most 256 (ranked per thread) and above (radix cut), rows of one block and of
    clusters (shortlists of G x m <= 4,096 or not), padding, the skip layers, m >= P and more rows than one
    wave holds (no fusion), normalised or not."""
    monkeypatch.setenv("MIXKV_SELECT_MERGE", merge)
    if max_cluster is not None:
        monkeypatch.setenv("MIXKV_SELECT_MAX_CLUSTER", max_cluster)
    gen = torch.Generator().manual_seed(11)
    shapes = [  # (batch, heads, P, budget, valid)
        (1, 4, 2016, 64, None),  # m = 128
        (1, 4, 31968, 64, None),  # m = 128, clusters of 8 (shortlists)
        (2, 4, 31968, 64, [32000, 9000]),  # a padded row: empty chunks in its cluster
        (2, 4, 8160, 256, [8192, 5000]),  # m = 896: radix pick (shortlists of 2 x 896)
        (1, 7, 9000, 600, None),  # m = 3,976
        (3, 2, 300, 100, [332, 40, 150]),  # m = 136, padded rows, one row below the budget
        (1, 4, 100, 64, None),  # m = 128 >= P: the two operations
        (1, 8, 6000, 600, None),  # m = 4,544 > 4,096: the two operations
        (4, 32, 2000, 64, None),  # m = 1,024, but 256 rows of candidates and ranking: the two operations
    ]
    for batch, heads, p, budget, valid in shapes:
        imp = torch.rand((batch, heads, p), generator=gen) ** 3 * torch.rand((1, heads, 1), generator=gen)
        scores = torch.randn((batch, heads, p), generator=gen)
        for normalize, layer_idx in ((True, 1), (False, 1), (True, 0)):
            case = make_case(
                "adakv", imp, scores, budget, layer_idx=layer_idx, valid=valid, normalize=normalize, skip=1
            )
            s = case["scores"]
            assert isinstance(s, torch.Tensor)
            common = {k: case[k] for k in COMMON}
            lengths = None if valid is None else torch.tensor(valid, device=device)
            imp_d, s_d = case["imp"].to(device), s.to(device)  # type: ignore[union-attr]
            want_caps = torch.full((batch, heads), POISON, dtype=torch.int32, device=device)
            capacities_into("adakv", imp_d, out=want_caps, valid_lengths=lengths, normalize=normalize, skip=1, **common)  # type: ignore[arg-type]
            want_pos = torch.full((batch, heads, p), POISON, dtype=torch.int32, device=device)
            want_cnt = torch.full((batch, heads), POISON, dtype=torch.int32, device=device)
            select_into(s_d, want_caps, want_pos, want_cnt)
            caps = torch.full_like(want_caps, POISON)
            pos = torch.full_like(want_pos, POISON)
            cnt = torch.full_like(want_cnt, POISON)
            capacities_select_into(
                "adakv",
                imp_d,
                s_d,
                capacities=caps,
                positions=pos,
                counts=cnt,
                valid_lengths=lengths,
                normalize=normalize,
                skip=1,
                **common,  # type: ignore[arg-type]
            )
            label = (batch, heads, p, budget, normalize, layer_idx)
            assert torch.equal(caps, want_caps), label
            assert torch.equal(cnt, want_cnt), label
            assert torch.equal(pos, want_pos), label
            # and against the float64 reference of the selection by those capacities
            ref_pos, ref_cnt = select_reference(s, want_caps.cpu())
            assert cnt.cpu().tolist() == ref_cnt, label
            for i in range(batch):
                for j in range(heads):
                    assert pos[i, j, : ref_cnt[i][j]].cpu().tolist() == ref_pos[i][j], label


def test_ties_go_to_lower_positions(device: str) -> None:
    # a selection score that is constant over each row: every head keeps its c lowest positions
    gen = torch.Generator().manual_seed(2)
    imp = torch.rand((1, 4, 5000), generator=gen)
    scores = torch.zeros((1, 4, 5000))
    case = make_case("adakv", imp, scores, 96)
    run_case(device, case, extra_columns=3, need_gap=device == "cuda")


def test_capacities_select_rejects_bad_inputs(device: str) -> None:
    imp = torch.rand((2, 4, 300), device=device)
    scores = torch.rand((2, 4, 300), device=device)
    caps = torch.empty((2, 4), dtype=torch.int32, device=device)
    pos = torch.empty((2, 4, 300), dtype=torch.int32, device=device)
    cnt = torch.empty((2, 4), dtype=torch.int32, device=device)
    ok: dict[str, object] = {"budget": 40, "window": 4, "layer_idx": 0, "num_layers": 2}

    def run(**changes: object) -> None:
        args: dict[str, object] = {
            "importance": imp,
            "scores": scores,
            "capacities": caps,
            "positions": pos,
            "counts": cnt,
            **ok,
            **changes,
        }
        capacities_select_into("adakv", **args)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="scores"):
        run(scores=scores[:, :, :299])
    with pytest.raises(TypeError, match="scores"):
        run(scores=scores.double())
    nan = scores.clone()
    nan[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="scores"):
        run(scores=nan)
    with pytest.raises(ValueError, match="positions"):
        run(positions=pos[:, :3])
    with pytest.raises(ValueError, match="counts"):
        run(counts=cnt[:1])
    with pytest.raises(ValueError, match="out"):
        run(capacities=caps[:, :2])
    with pytest.raises(ValueError, match="budget"):
        run(budget=0)
    with pytest.raises(TypeError, match="ratio"):
        run(ratio=0.5)
    # capacities above the columns of positions (AdaKV gives up to 36 * 4 * 0.8 + 7 = 122 here)
    with pytest.raises(ValueError, match="columns"):
        run(positions=pos[:, :, :10])
    if device == "cuda":
        with pytest.raises(ValueError, match="scores"):
            run(scores=scores.cpu())
