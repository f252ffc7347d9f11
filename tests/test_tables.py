"""Head-table loaders: SparseMM visual-head scores and MixKV offline redundancy (published formats)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from mixkv.tables import load_redundancy_table, load_sparsemm_table

# The published tables live beside the repository (``<parent>/shared/data``); never copied into it.
DATA = Path(os.environ.get("MIXKV_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SPARSEMM_FILE = DATA / "sparsemm_visual_heads_llava-v1.6-vicuna-7b.json"
REDUNDANCY_FILE = DATA / "mixkv_redundancy_qwen2-vl-7b.json"
needs_sparsemm = pytest.mark.skipif(not SPARSEMM_FILE.is_file(), reason="published SparseMM table not present")
needs_redundancy = pytest.mark.skipif(not REDUNDANCY_FILE.is_file(), reason="published redundancy table not present")


def _sparsemm_reference(raw: dict[str, list[float]], layers: int, heads: int, kv_heads: int) -> list[list[float]]:
    """SPEC §7 in plain Python: mean over samples, normalise over all (layer, head), sum per GQA group."""
    mean = {k: sum(v) / len(v) for k, v in raw.items()}
    total = sum(mean.values())
    group = heads // kv_heads
    return [
        [sum(mean[f"{layer}-{kv * group + g}"] / total for g in range(group)) for kv in range(kv_heads)]
        for layer in range(layers)
    ]


@needs_sparsemm
@pytest.mark.parametrize("kv_heads", [32, 8])
def test_published_sparsemm_table(kv_heads: int) -> None:
    raw = json.loads(SPARSEMM_FILE.read_text())
    table = load_sparsemm_table(SPARSEMM_FILE, num_layers=32, num_heads=32, num_kv_heads=kv_heads)
    assert table.dtype == torch.float32 and table.shape == (32, kv_heads)
    expected = torch.tensor(_sparsemm_reference(raw, 32, 32, kv_heads), dtype=torch.float64)
    torch.testing.assert_close(table.double(), expected, rtol=1e-6, atol=1e-9)
    assert math.isclose(float(table.double().sum()), 1.0, rel_tol=1e-6)


@needs_sparsemm
def test_published_sparsemm_table_refuses_another_model() -> None:
    with pytest.raises(ValueError, match=r"32 layers x 32 query heads.*28 layers x 28 query heads"):
        load_sparsemm_table(SPARSEMM_FILE, num_layers=28, num_heads=28, num_kv_heads=4)


@needs_redundancy
def test_published_redundancy_table() -> None:
    raw = json.loads(REDUNDANCY_FILE.read_text())
    table = load_redundancy_table(REDUNDANCY_FILE, num_layers=28, num_kv_heads=4)
    assert table.dtype == torch.float32 and table.shape == (28, 4)
    for layer in range(28):
        for head in range(4):
            samples = raw[f"{layer}-{head}-key"]
            assert math.isclose(float(table[layer, head]), sum(samples) / len(samples), rel_tol=1e-6)


@needs_redundancy
def test_published_redundancy_table_refuses_llava_next_mistral() -> None:
    with pytest.raises(ValueError, match=r"28 layers x 4 kv heads.*32 layers x 8 kv heads"):
        load_redundancy_table(REDUNDANCY_FILE, num_layers=32, num_kv_heads=8)


def test_sparsemm_from_dict_and_tensor_agree() -> None:
    g = torch.Generator().manual_seed(0)
    raw = {f"{layer}-{head}": torch.rand(3, generator=g).tolist() for layer in range(3) for head in range(4)}
    from_dict = load_sparsemm_table(raw, num_layers=3, num_heads=4, num_kv_heads=2)
    expected = torch.tensor(_sparsemm_reference(raw, 3, 4, 2), dtype=torch.float64)
    torch.testing.assert_close(from_dict.double(), expected, rtol=1e-6, atol=1e-9)
    means = torch.tensor([[sum(raw[f"{la}-{h}"]) / 3 for h in range(4)] for la in range(3)])
    per_query = load_sparsemm_table(means * 7.0, num_layers=3, num_heads=4, num_kv_heads=2)
    torch.testing.assert_close(per_query, from_dict)
    per_kv = load_sparsemm_table(from_dict * 3.0, num_layers=3, num_heads=4, num_kv_heads=2)
    torch.testing.assert_close(per_kv, from_dict)


def test_sparsemm_file_round_trip(tmp_path: Path) -> None:
    raw = {f"{layer}-{head}": [float(layer + head + 1)] for layer in range(2) for head in range(2)}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(raw))
    table = load_sparsemm_table(str(path), num_layers=2, num_heads=2, num_kv_heads=1)
    torch.testing.assert_close(table, torch.tensor([[3.0 / 8.0], [5.0 / 8.0]]))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"0-0": [1.0], "0-x": [1.0]}, "layer-head"),
        ({"0-0": [1.0], "0-1": [1.0], "1-0": [1.0]}, "full grid"),
        ({"0-0": [], "0-1": [1.0]}, "no samples"),
        ({"0-0": [float("nan")], "0-1": [1.0]}, "non-finite"),
        ({"0-0": ["a"], "0-1": [1.0]}, "non-numeric"),
        ({"0-0": [-1.0], "0-1": [0.5]}, "negative"),
        ({"0-0": [0.0], "0-1": [0.0]}, "sums to zero"),
        ({}, "empty"),
    ],
)
def test_sparsemm_rejects_malformed_tables(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_sparsemm_table(raw, num_layers=1, num_heads=2, num_kv_heads=1)


def test_sparsemm_rejects_wrong_tensor_shapes_and_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape \[2, 4\].*\[2, 2\]"):
        load_sparsemm_table(torch.ones(2, 3), num_layers=2, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="3 layers"):
        load_sparsemm_table(torch.ones(3, 4), num_layers=2, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="NaN"):
        load_sparsemm_table(torch.full((2, 4), float("nan")), num_layers=2, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="no such file"):
        load_sparsemm_table(tmp_path / "missing.json", num_layers=2, num_heads=4, num_kv_heads=2)
    with pytest.raises(TypeError, match=r"sparsemm_table must be a path, a dict or a torch.Tensor"):
        load_sparsemm_table(3, num_layers=2, num_heads=4, num_kv_heads=2)  # type: ignore[arg-type]
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_sparsemm_table(bad, num_layers=2, num_heads=4, num_kv_heads=2)


def test_redundancy_uses_key_entries_only() -> None:
    raw = {}
    for layer in range(2):
        for head in range(3):
            raw[f"{layer}-{head}-key"] = [0.1 * (layer + 1), 0.1 * (head + 1)]
            raw[f"{layer}-{head}-value"] = [0.99, 0.99]
    table = load_redundancy_table(raw, num_layers=2, num_kv_heads=3)
    expected = torch.tensor([[(0.1 * (la + 1) + 0.1 * (h + 1)) / 2 for h in range(3)] for la in range(2)])
    torch.testing.assert_close(table, expected)
    torch.testing.assert_close(load_redundancy_table(expected, num_layers=2, num_kv_heads=3), expected)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"0-0-keys": [0.5]}, "layer-kvhead-key"),
        ({"0-0-key": [0.5], "1-1-key": [0.5]}, "full grid"),
        ({"0-0-key": [1.5], "0-1-key": [0.5]}, r"\[0, 1\]"),
        ({"0-0-value": [0.5]}, "empty"),
    ],
)
def test_redundancy_rejects_malformed_tables(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_redundancy_table(raw, num_layers=1, num_kv_heads=2)


def test_redundancy_rejects_wrong_tensor_shapes() -> None:
    with pytest.raises(ValueError, match=r"2 layers x 3 kv heads.*2 layers x 2 kv heads"):
        load_redundancy_table(torch.zeros(2, 3), num_layers=2, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"shape \[2, 2\]"):
        load_redundancy_table(torch.zeros(4), num_layers=2, num_kv_heads=2)
