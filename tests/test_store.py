"""VarlenKVStore and the store kernels against a plain Python model of the segments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixkv import _core
from mixkv.store import VarlenKVStore

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the `device` fixture is a plain string parameter: sharing it across examples is harmless
FIXTURE_OK = settings(suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture])


def make_selection(seed: int, b: int, h: int, n: int, d: int, window: int, dtype: torch.dtype, padded: bool):
    """Random keys/values, valid lengths and selections of ascending prefix positions."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=g).to(dtype)
    values = torch.randn(b, h, n, d, generator=g).to(dtype)
    valid = torch.randint(1, n + 1, (b,), generator=g) if padded else torch.full((b,), n)
    sel: list[list[list[int]]] = []
    for bi in range(b):
        nb = int(valid[bi])
        lo, hi = n - nb, max(n - window, n - nb)
        row = []
        for _ in range(h):
            c = int(torch.randint(0, hi - lo + 1, (1,), generator=g))
            row.append(sorted((torch.randperm(hi - lo, generator=g)[:c] + lo).tolist()))
        sel.append(row)
    cap = max(1, max(len(p) for row in sel for p in row)) + int(torch.randint(0, 3, (1,), generator=g))
    positions = torch.full((b, h, cap), -1, dtype=torch.int32)
    counts = torch.zeros(b, h, dtype=torch.int32)
    for bi in range(b):
        for hi_ in range(h):
            p = sel[bi][hi_]
            positions[bi, hi_, : len(p)] = torch.tensor(p, dtype=torch.int32)
            counts[bi, hi_] = len(p)
    return keys, values, positions, counts, (valid if padded else None), sel, valid


def reference_segments(keys, values, sel, valid, window):
    """Python loops: segment (b, h) = selected positions then the window tokens."""
    n = keys.shape[2]
    segs = {}
    for bi in range(keys.shape[0]):
        wstart = max(n - window, n - int(valid[bi]))
        for h in range(keys.shape[1]):
            idx = [*sel[bi][h], *range(wstart, n)]
            segs[(bi, h)] = (keys[bi, h, idx].clone(), values[bi, h, idx].clone())
    return segs


def assert_store_matches(store: VarlenKVStore, segs) -> None:
    lengths = store.lengths.cpu()
    for (b, h), (k, v) in segs.items():
        assert int(lengths[b, h]) == k.shape[0]
        assert int(store.host_lengths[b, h]) == k.shape[0]
        sk, sv = store.segment(b, h)
        assert torch.equal(sk.cpu(), k), (b, h)
        assert torch.equal(sv.cpu(), v), (b, h)
    assert store.nbytes == sum(k.numel() for k, _ in segs.values()) * 2 * segs[(0, 0)][0].element_size()


@FIXTURE_OK
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    n=st.integers(1, 40),
    d=st.sampled_from([8, 64, 80, 128]),
    window=st.integers(0, 12),
    dtype=st.sampled_from(DTYPES),
    padded=st.booleans(),
    reserve=st.integers(0, 5),
)
def test_build_and_appends(device, seed, b, h, n, d, window, dtype, padded, reserve):
    keys, values, positions, counts, valid, sel, vl = make_selection(seed, b, h, n, d, window, dtype, padded)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    store = VarlenKVStore.from_selection(
        mv(keys), mv(values), mv(positions), mv(counts), window, reserve=reserve, valid_lengths=mv(valid)
    )
    segs = reference_segments(keys, values, sel, vl, window)
    assert_store_matches(store, segs)
    g = torch.Generator().manual_seed(seed + 1)
    grown = 0
    for step in range(12):
        t = 1 if step % 4 else 3
        kn = torch.randn(b, h, t, d, generator=g).to(dtype)
        vn = torch.randn(b, h, t, d, generator=g).to(dtype)
        before = store.k_buffer.data_ptr()
        caps = store.capacities
        store.append(kn.to(device), vn.to(device))
        if not np.array_equal(caps, store.capacities):
            grown += 1
            assert np.all(store.capacities >= np.minimum(2 * caps, caps + t))
        else:
            assert store.k_buffer.data_ptr() == before  # appended in place
        for key in segs:
            bi, hi = key
            segs[key] = (torch.cat([segs[key][0], kn[bi, hi]]), torch.cat([segs[key][1], vn[bi, hi]]))
    assert_store_matches(store, segs)
    assert np.all(store.capacities >= store.host_lengths)
    assert store.reserved_nbytes == int(store.capacities.sum()) * d * 2 * keys.element_size()
    if reserve == 0:
        assert grown >= 1


def test_hundred_appends_with_growth(device):
    b, h, n, d = 2, 3, 16, 64
    keys, values, positions, counts, _, sel, vl = make_selection(7, b, h, n, d, 4, torch.bfloat16, False)
    store = VarlenKVStore.from_selection(
        keys.to(device), values.to(device), positions.to(device), counts.to(device), 4, reserve=8
    )
    segs = reference_segments(keys, values, sel, vl, 4)
    g = torch.Generator().manual_seed(3)
    growths = 0
    for _ in range(100):
        kn = torch.randn(b, h, 1, d, generator=g).to(torch.bfloat16)
        vn = torch.randn(b, h, 1, d, generator=g).to(torch.bfloat16)
        caps = store.capacities
        store.append(kn.to(device), vn.to(device))
        growths += int(not np.array_equal(caps, store.capacities))
        for (bi, hi), (k, v) in list(segs.items()):
            segs[(bi, hi)] = (torch.cat([k, kn[bi, hi]]), torch.cat([v, vn[bi, hi]]))
    assert 1 <= growths <= 5  # doubling: logarithmically many copies
    assert_store_matches(store, segs)


def test_zero_width_selection_keeps_only_the_window(device):
    # every capacity 0 (e.g. a PyramidKV top layer): positions [B, H, 0] are a valid, empty selection
    b, h, n, d, window = 2, 2, 12, 64, 4
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(b, h, n, d, generator=g)
    values = torch.randn(b, h, n, d, generator=g)
    positions = torch.empty(b, h, 0, dtype=torch.int32)
    counts = torch.zeros(b, h, dtype=torch.int32)
    store = VarlenKVStore.from_selection(
        keys.to(device), values.to(device), positions.to(device), counts.to(device), window
    )
    assert store.host_lengths.tolist() == [[window] * h] * b
    for bi in range(b):
        for hi in range(h):
            k, v = store.segment(bi, hi)
            assert torch.equal(k.cpu(), keys[bi, hi, n - window :])
            assert torch.equal(v.cpu(), values[bi, hi, n - window :])


@FIXTURE_OK
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), idx=st.lists(st.integers(0, 3), min_size=1, max_size=6))
def test_reorder_and_reset(device, seed, b, idx):
    idx = [i % b for i in idx]
    h, n, d = 2, 12, 16
    keys, values, positions, counts, _, sel, vl = make_selection(seed, b, h, n, d, 3, torch.float16, False)
    store = VarlenKVStore.from_selection(
        keys.to(device), values.to(device), positions.to(device), counts.to(device), 3, reserve=1
    )
    segs = reference_segments(keys, values, sel, vl, 3)
    use_tensor = seed % 2 == 0
    store.reorder(torch.tensor(idx, device=device) if use_tensor else idx)
    assert store.batch_size == len(idx)
    segs = {(i, hh): segs[(src, hh)] for i, src in enumerate(idx) for hh in range(h)}
    assert_store_matches(store, segs)
    store.reset(0)
    g = torch.Generator().manual_seed(seed)
    kn = torch.randn(len(idx), h, 2, d, generator=g).to(torch.float16)
    vn = torch.randn(len(idx), h, 2, d, generator=g).to(torch.float16)
    store.append(kn.to(device), vn.to(device))
    for (bi, hi), (k, v) in list(segs.items()):
        if bi == 0:
            k, v = k[:0], v[:0]
        segs[(bi, hi)] = (torch.cat([k, kn[bi, hi]]), torch.cat([v, vn[bi, hi]]))
    assert_store_matches(store, segs)


def test_core_build_writes_only_segments(device):
    """Poisoned buffers: the kernel writes exactly the segment rows and every length."""
    b, h, n, d = 2, 2, 10, 16
    keys, values, positions, counts, valid, sel, vl = make_selection(11, b, h, n, d, 3, torch.float32, True)
    segs = reference_segments(keys, values, sel, vl, 3)
    lens = [segs[(bi, hi)][0].shape[0] for bi in range(b) for hi in range(h)]
    offs = np.cumsum([0] + [x + 2 for x in lens[:-1]]).astype(np.int32)
    slots = int(offs[-1] + lens[-1] + 2)
    kb = torch.full((slots, d), float("nan"), device=device)
    vb = torch.full((slots, d), float("nan"), device=device)
    lengths = torch.full((b * h,), -7777, dtype=torch.int32, device=device)
    _core.store_build(
        keys.to(device),
        values.to(device),
        positions.to(device),
        counts.to(device),
        valid.to(torch.int32).to(device),
        3,
        torch.from_numpy(offs).to(device),
        kb,
        vb,
        lengths,
        0 if device == "cpu" else torch.cuda.current_stream().cuda_stream,
    )
    assert lengths.cpu().tolist() == lens
    written = torch.zeros(slots, dtype=torch.bool)
    for s, (k, v) in enumerate(segs.values()):
        o = int(offs[s])
        assert torch.equal(kb[o : o + lens[s]].cpu(), k) and torch.equal(vb[o : o + lens[s]].cpu(), v)
        written[o : o + lens[s]] = True
    assert torch.isnan(kb.cpu()[~written]).all() and torch.isnan(vb.cpu()[~written]).all()


def test_core_copy_segments(device):
    d = 8
    src_k = torch.randn(20, d, device=device)
    src_v = torch.randn(20, d, device=device)
    src_off = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    src_len = torch.tensor([4, 7, 0], dtype=torch.int32, device=device)
    idx = torch.tensor([1, 1, 0, 2], dtype=torch.int32, device=device)
    dst_off = torch.tensor([0, 8, 16, 21], dtype=torch.int32, device=device)
    dk = torch.full((24, d), float("nan"), device=device)
    dv = torch.full((24, d), float("nan"), device=device)
    dl = torch.full((4,), -7777, dtype=torch.int32, device=device)
    stream = 0 if device == "cpu" else torch.cuda.current_stream().cuda_stream
    _core.store_copy_segments(src_k, src_v, src_off, src_len, idx, dst_off, dk, dv, dl, stream)
    assert dl.cpu().tolist() == [7, 7, 4, 0]
    assert torch.equal(dk[0:7], src_k[5:12]) and torch.equal(dk[8:15], src_k[5:12])
    assert torch.equal(dv[16:20], src_v[0:4])
    assert torch.isnan(dk[7]).all() and torch.isnan(dk[15]).all() and torch.isnan(dk[20:]).all()


# ---- validation -----------------------------------------------------------------------------------


def small_store(reserve: int = 2) -> tuple[VarlenKVStore, tuple]:
    keys, values, positions, counts, _, _, _ = make_selection(5, 2, 2, 10, 8, 2, torch.float32, False)
    return VarlenKVStore.from_selection(keys, values, positions, counts, 2, reserve=reserve), (
        keys,
        values,
        positions,
        counts,
    )


def test_build_validation():
    _, (keys, values, positions, counts) = small_store()
    with pytest.raises(ValueError, match="values"):
        VarlenKVStore.from_selection(keys, values[:, :1], positions, counts, 2)
    with pytest.raises(TypeError, match="values"):
        VarlenKVStore.from_selection(keys, values.half(), positions, counts, 2)
    with pytest.raises(TypeError, match="keys"):
        VarlenKVStore.from_selection(keys.int(), values, positions, counts, 2)
    with pytest.raises(ValueError, match="positions"):
        VarlenKVStore.from_selection(keys, values, positions[:1], counts, 2)
    with pytest.raises(TypeError, match="positions"):
        VarlenKVStore.from_selection(keys, values, positions.float(), counts, 2)
    with pytest.raises(ValueError, match="counts"):
        VarlenKVStore.from_selection(keys, values, positions, counts[:, :1], 2)
    with pytest.raises(ValueError, match="counts"):
        VarlenKVStore.from_selection(keys, values, positions, counts + positions.shape[2], 2)
    with pytest.raises(ValueError, match="window"):
        VarlenKVStore.from_selection(keys, values, positions, counts, -1)
    with pytest.raises(ValueError, match="reserve"):
        VarlenKVStore.from_selection(keys, values, positions, counts, 2, reserve=-3)
    bad = positions.clone()
    bad[0, 0, 0] = 9  # a window position
    with pytest.raises(ValueError, match="positions"):
        VarlenKVStore.from_selection(keys, values, bad, torch.ones_like(counts), 2)
    bad = torch.tensor([[[3, 1]] * 2] * 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="ascending"):
        VarlenKVStore.from_selection(keys, values, bad, torch.full_like(counts, 2), 2)
    with pytest.raises(ValueError, match="valid_lengths"):
        VarlenKVStore.from_selection(keys, values, positions, counts, 2, valid_lengths=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="contiguous"):
        VarlenKVStore.from_selection(keys.transpose(2, 3), values.transpose(2, 3), positions, counts, 2)


def test_append_and_misc_validation():
    store, _ = small_store()
    good = torch.randn(2, 2, 1, 8)
    with pytest.raises(ValueError, match="k must have shape"):
        store.append(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))
    with pytest.raises(ValueError, match="v must have the shape"):
        store.append(good, torch.randn(2, 2, 2, 8))
    with pytest.raises(TypeError, match="k must have the store's dtype"):
        store.append(good.half(), good.half())
    with pytest.raises(TypeError, match=r"k must be a torch\.Tensor"):
        store.append([1.0], good)
    with pytest.raises(ValueError, match="indices"):
        store.reorder([0, 2])
    with pytest.raises(ValueError, match="indices"):
        store.reorder([])
    with pytest.raises(ValueError, match="batch_index"):
        store.reset(2)
    with pytest.raises(ValueError, match=r"\(b, h\)"):
        store.segment(0, 2)
    with pytest.raises(ValueError, match="available"):
        store.attend(torch.randn(2, 4, 1, 8), backend="nope")
    with pytest.raises(ValueError, match="available"):
        store.attend(torch.randn(2, 4, 1, 8), backend="flash")  # CPU: only the own kernel


def test_core_validation_names_arguments():
    store, _ = small_store()
    lengths = torch.zeros(4, dtype=torch.int32)
    offs = store.offsets.reshape(-1).contiguous()
    with pytest.raises(ValueError, match="k_buf"):
        _core.store_append(
            torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), offs, lengths, torch.randn(4, 7), torch.randn(4, 7), 0
        )
    with pytest.raises(ValueError, match="no room"):
        _core.store_append(
            torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), offs, lengths, torch.randn(4, 8), torch.randn(4, 8), 0
        )
    with pytest.raises(ValueError, match="src_index"):
        _core.store_copy_segments(
            torch.randn(8, 8),
            torch.randn(8, 8),
            offs,
            lengths,
            torch.tensor([9], dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32),
            torch.randn(8, 8),
            torch.randn(8, 8),
            torch.zeros(1, dtype=torch.int32),
            0,
        )
    with pytest.raises(ValueError, match="offsets"):
        _core.store_append(
            torch.randn(2, 2, 1, 8),
            torch.randn(2, 2, 1, 8),
            offs.long(),
            lengths,
            torch.randn(64, 8),
            torch.randn(64, 8),
            0,
        )


def test_core_calls_receive_dlpack_capsules() -> None:
    from mixkv._runtime import call

    seen: list[object] = []

    def spy(*args: object) -> int:
        seen.extend(args)
        return 7

    t = torch.arange(6, dtype=torch.int32).view(2, 3)
    assert call(spy, t, None, 3, 0.5) == 7
    assert type(seen[0]).__name__ == "PyCapsule" and seen[1:] == [None, 3, 0.5]
    back = torch.from_dlpack(seen[0])
    assert torch.equal(back, t) and back.data_ptr() == t.data_ptr()  # a view, not a copy
