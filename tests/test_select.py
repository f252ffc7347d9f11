"""select / select_into against a float64 reference written from SPEC §6."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixkv.ops import select
from mixkv.ops._select import select_into

NEG_INF = float("-inf")
# The device fixture is a plain string: sharing it across generated examples is safe.
FIXTURE_OK = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
)
POISON = -7777


def reference(scores: torch.Tensor, caps: torch.Tensor) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Top-c by score (ties: lower position first) over the entries above -inf, ascending."""
    s = scores.to(torch.float64).cpu()
    b_, h_, _ = s.shape
    positions: list[list[list[int]]] = []
    counts: list[list[int]] = []
    for b in range(b_):
        prow: list[list[int]] = []
        crow: list[int] = []
        for h in range(h_):
            row = s[b, h]
            valid = torch.nonzero(row > NEG_INF).flatten()
            order = torch.sort(row[valid], descending=True, stable=True).indices
            chosen = sorted(valid[order[: int(caps[b, h])]].tolist())
            prow.append(chosen)
            crow.append(len(chosen))
        positions.append(prow)
        counts.append(crow)
    return positions, counts


def check(scores: torch.Tensor, caps: torch.Tensor, device: str, extra_columns: int) -> None:
    b, h, _ = scores.shape
    columns = (int(caps.max()) if caps.numel() else 0) + extra_columns
    pos = torch.full((b, h, columns), POISON, dtype=torch.int32, device=device)
    cnt = torch.full((b, h), POISON, dtype=torch.int32, device=device)
    select_into(scores.to(device), caps.to(device), pos, cnt)
    exp_pos, exp_cnt = reference(scores, caps)
    got_pos, got_cnt = pos.cpu(), cnt.cpu()
    for i in range(b):
        for j in range(h):
            want = exp_pos[i][j] + [-1] * (columns - len(exp_pos[i][j]))
            assert got_pos[i, j].tolist() == want, (i, j)
            assert int(got_cnt[i, j]) == exp_cnt[i][j], (i, j)


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    b = draw(st.sampled_from([1, 3]))
    h = draw(st.sampled_from([1, 2, 4, 8, 28]))
    if draw(st.integers(0, 4)) == 0:  # occasionally long rows, total size kept moderate
        p = min(draw(st.sampled_from([40_000, 20_000, 7_000, 2_000])), max(1_000, 600_000 // (b * h)))
        p -= draw(st.integers(0, 999))
    else:
        p = draw(st.integers(1, 80))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["continuous", "few", "ties", "normal"]))
    if kind == "continuous":
        scores = torch.rand((b, h, p), generator=gen)
    elif kind == "normal":
        scores = torch.randn((b, h, p), generator=gen) * 1e3
    elif kind == "few":  # many equal scores
        scores = torch.randint(0, 4, (b, h, p), generator=gen).float() - 1.5
    else:  # nearly everything tied, with signed zeros
        scores = torch.where(torch.rand((b, h, p), generator=gen) < 0.5, 0.0, -0.0)
        scores[..., torch.randint(0, p, (1,), generator=gen)] = 1.0
    # left padding per sequence, scattered -inf and a few +inf
    for i in range(b):
        pad = draw(st.integers(0, p))
        scores[i, :, :pad] = NEG_INF
    if draw(st.booleans()):
        scores[torch.rand((b, h, p), generator=gen) < 0.1] = NEG_INF
    if draw(st.booleans()):
        scores[torch.rand((b, h, p), generator=gen) < 0.01] = float("inf")
    finite = (scores > NEG_INF).sum(-1)
    choice = torch.randint(0, 5, (b, h), generator=gen)
    caps = torch.randint(0, p + 1, (b, h), generator=gen)
    caps = torch.where(choice == 0, 0, caps)
    caps = torch.where(choice == 1, p, caps)
    caps = torch.where(choice == 2, torch.clamp(finite + 1, max=p), caps)  # above the finite entries
    caps = torch.where(choice == 3, torch.clamp(finite - 1, min=0), caps)
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return scores.contiguous(), caps.to(dtype), draw(st.integers(0, 3))


@FIXTURE_OK
@given(problem=problems())
def test_select_matches_reference(device: str, problem: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    scores, caps, extra = problem
    check(scores, caps, device, extra)


@FIXTURE_OK
@given(problem=problems())
def test_select_allocating(device: str, problem: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    scores, caps, _ = problem
    pos, cnt = select(scores.to(device), caps.to(device))
    b, h, _ = scores.shape
    assert pos.shape == (b, h, int(caps.max())) and pos.dtype == torch.int32
    exp_pos, exp_cnt = reference(scores, caps)
    for i in range(b):
        for j in range(h):
            assert pos[i, j].tolist() == exp_pos[i][j] + [-1] * (pos.shape[2] - len(exp_pos[i][j]))
            assert int(cnt[i, j]) == exp_cnt[i][j]


def test_ties_lowest_positions_win(device: str) -> None:
    p = 5000
    scores = torch.zeros((1, 2, p))
    scores[0, 1, ::2] = -0.0  # signed zeros compare equal
    scores[0, 1, 4000:] = 1.0
    caps = torch.tensor([[700, 1200]])
    pos, cnt = select(scores.to(device), caps.to(device))
    assert pos[0, 0].tolist() == list(range(700)) + [-1] * 500
    assert pos[0, 1].tolist() == list(range(200)) + list(range(4000, 5000))
    assert cnt.tolist() == [[700, 1200]]


def test_padding_and_zero_capacity(device: str) -> None:
    scores = torch.full((2, 1, 6), NEG_INF)
    scores[1, 0, 3:] = torch.tensor([3.0, 1.0, 2.0])
    pos, cnt = select(scores.to(device), torch.tensor([[4], [6]], device=device))
    assert pos.tolist() == [[[-1] * 6], [[3, 4, 5, -1, -1, -1]]]
    assert cnt.tolist() == [[0], [3]]
    pos, cnt = select(scores.to(device), torch.zeros((2, 1), dtype=torch.int32, device=device))
    assert pos.shape == (2, 1, 0)
    assert cnt.tolist() == [[0], [0]]


def test_large_row_few_rows(device: str) -> None:
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn((1, 4, 32000), generator=gen)
    scores[..., 5000:9000] = 0.25  # a block of ties around the threshold
    caps = torch.tensor([[64, 4000, 12000, 31999]])
    check(scores, caps, device, 0)


def test_select_rejects_bad_inputs(device: str) -> None:
    s = torch.rand((2, 3, 10), device=device)
    c = torch.full((2, 3), 4, dtype=torch.int32, device=device)
    pos = torch.empty((2, 3, 4), dtype=torch.int32, device=device)
    cnt = torch.empty((2, 3), dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="scores"):
        select(s.double(), c)
    with pytest.raises(TypeError, match="capacities"):
        select(s, c.float())
    with pytest.raises(ValueError, match="scores"):
        select(s[0], c)
    with pytest.raises(ValueError, match="capacities"):
        select(s, c[:1])
    with pytest.raises(ValueError, match="capacities"):
        select(s, c - 5)
    with pytest.raises(ValueError, match="capacities"):
        select(s, c + 7)
    bad = s.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="scores"):
        select(bad, c)
    with pytest.raises(ValueError, match="positions"):
        select_into(s, c + 1, pos, cnt)
    with pytest.raises(TypeError, match="positions"):
        select_into(s, c, pos.long(), cnt)
    with pytest.raises(ValueError, match="counts"):
        select_into(s, c, pos, cnt[:, :2])
    with pytest.raises(ValueError, match="scores"):
        select(s.transpose(1, 2).contiguous().transpose(1, 2), c)
    with pytest.raises(TypeError, match="scores"):
        select([[1.0]], c)  # type: ignore[arg-type]


@pytest.mark.cuda
def test_select_device_mismatch() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    s = torch.rand((1, 1, 4), device="cuda")
    with pytest.raises(ValueError, match="capacities"):
        select(s, torch.ones((1, 1), dtype=torch.int32))


def test_strided_outputs(device: str) -> None:
    gen = torch.Generator().manual_seed(11)
    scores_big = torch.randn((3, 5, 70), generator=gen)
    scores = scores_big[:, 1:4]  # leading-dimension strides, contiguous rows
    caps = torch.randint(0, 71, (3, 3), generator=gen).T  # non-contiguous capacities
    pos_buf = torch.full((3, 3, 80), POISON, dtype=torch.int32, device=device)
    cnt_buf = torch.full((3, 3), POISON, dtype=torch.int32, device=device)
    pos, cnt = pos_buf[:, :, 5:75], cnt_buf.T
    select_into(scores.to(device), caps.to(device), pos, cnt)
    exp_pos, exp_cnt = reference(scores, caps)
    for i in range(3):
        for j in range(3):
            assert pos[i, j].tolist() == exp_pos[i][j] + [-1] * (70 - len(exp_pos[i][j]))
            assert int(cnt[i, j]) == exp_cnt[i][j]
    assert bool((pos_buf[:, :, :5] == POISON).all()) and bool((pos_buf[:, :, 75:] == POISON).all())


# MIXKV_SELECT_MAX_CLUSTER caps the blocks per row on CUDA: "1" runs the one-block path of devices
# before sm_90 on any device, "16" the largest (non-portable) clusters. The CPU twin ignores it.
CLUSTER_CAPS = [None, "1", "16"]


@pytest.mark.parametrize("max_cluster", CLUSTER_CAPS)
def test_every_launch_shape(device: str, max_cluster: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if max_cluster is not None:
        monkeypatch.setenv("MIXKV_SELECT_MAX_CLUSTER", max_cluster)
    gen = torch.Generator().manual_seed(23)
    # one block (short rows, exactly at the limit), clusters of 2 (just above it) and of 8+ (long
    # rows); with one block per row, 12,000 cached keys (48,000 bytes) plus the kernel's static
    # shared memory pass the default 48 KiB limit, which must be raised for that launch
    shapes = ((4096, [[1, 4095, 4096]]), (4097, [[4097, 2048, 3]]), (12_000, [[64, 6000, 12_000]]))
    for p, caps in (*shapes, (70_001, [[64, 1056, 65_000]])):
        scores = torch.rand((1, 3, p), generator=gen) ** 3
        scores[0, 1, p // 3 : p // 2] = 0.5  # ties across block boundaries
        scores[0, 2, : p // 4] = NEG_INF
        check(scores, torch.tensor(caps), device, 1)
    # many rows, left padding, capacities from 0 to everything
    scores = torch.randn((8, 32, 2000), generator=gen)
    scores[3, :, :700] = NEG_INF
    caps = torch.randint(0, 2001, (8, 32), generator=gen)
    caps[:, 0] = 32
    caps[:, 1] = 2000
    caps[:, 2] = 0
    check(scores, caps, device, 0)


@pytest.mark.parametrize("span", ["1", "0"])
@pytest.mark.parametrize("max_cluster", [None, "1"])
def test_narrow_key_spans(device: str, max_cluster: str | None, span: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The radix passes start at the highest bit in which a row's keys differ (MIXKV_SELECT_SPAN=0 on
    # CUDA: at bit 31): rows whose finite scores are all equal, differ only in their last bit, share
    # everything but the sign, or span the whole range, in one block and in clusters.
    monkeypatch.setenv("MIXKV_SELECT_SPAN", span)
    if max_cluster is not None:
        monkeypatch.setenv("MIXKV_SELECT_MAX_CLUSTER", max_cluster)
    gen = torch.Generator().manual_seed(31)
    for p in (3000, 9000):
        scores = torch.full((1, 5, p), 0.3)
        scores[0, 0, : p // 5] = NEG_INF  # all equal behind padding
        scores[0, 1, ::7] = torch.nextafter(torch.tensor(0.3), torch.tensor(1.0))  # last bit only
        scores[0, 2, 1::3] = -0.3  # sign only
        scores[0, 3] = torch.randn(p, generator=gen) * torch.logspace(-30, 30, p)  # every exponent
        scores[0, 4] = NEG_INF
        scores[0, 4, p - 1] = 2.0  # a single finite score
        check(scores, torch.tensor([[100, 1000, p // 2, 77, 5]]), device, 1)


# Rows of a cluster whose blocks' shortlists fit one block (blocks x columns <= 4,096) take the
# shortlist form on CUDA: each block's top c, then one block's cut of the candidates.
# MIXKV_SELECT_MERGE=0 takes the one-pass cluster cut instead; both must give the reference.
@pytest.mark.parametrize("merge", ["1", "0"])
@pytest.mark.parametrize("max_cluster", [None, "16"])
def test_shortlists(device: str, merge: str, max_cluster: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXKV_SELECT_MERGE", merge)
    if max_cluster is not None:
        monkeypatch.setenv("MIXKV_SELECT_MAX_CLUSTER", max_cluster)
    gen = torch.Generator().manual_seed(41)
    for p, extra in ((4097, 0), (8160, 3), (31_968, 0), (70_001, 0)):
        scores = torch.rand((2, 6, p), generator=gen) ** 3
        scores[0, 1] = 0.25  # every score tied: the lowest positions win, across every block
        scores[0, 2, ::5] = 0.75  # ties among the top, in every block
        scores[0, 3, : p - 40] = NEG_INF  # left padding: the finite scores in the last block only
        scores[0, 4] = torch.randint(0, 3, (p,), generator=gen).float()  # few distinct values
        scores[0, 5, p // 2 :] = NEG_INF  # fewer finite scores in some blocks than the capacity
        scores[1, :, : p // 3] = NEG_INF
        scores[1, 2, -1] = float("inf")
        caps = torch.tensor([[32, 32, 17, 64, 255, 1], [0, 7, 32, 100, 256, 50]])
        caps[0, 5] = min(p // 2 + 5, 64)
        check(scores, caps, device, extra)
    # a capacity above the finite scores of the whole row, and one row entirely -inf
    scores = torch.full((1, 2, 20_000), NEG_INF)
    scores[0, 0, 123:140] = torch.rand(17, generator=gen)
    check(scores, torch.tensor([[40, 40]]), device, 0)
