"""MixKVCache options, the attention registration, padding detection and cache bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixkv import MixKVCache
from mixkv._attention import valid_lengths_from_mask
from mixkv.cache import PrefillRecord
from models import TinyModel, generate, text_lm
from test_tables import REDUNDANCY_FILE

_loaded: dict[tuple[str, str, str], TinyModel] = {}


def _tiny(
    tmp_path_factory: pytest.TempPathFactory, model_type: str, attn: str = "sdpa", device: str = "cpu"
) -> TinyModel:
    key = (model_type, attn, device)
    if key not in _loaded:
        tiny = text_lm(tmp_path_factory.mktemp(f"{model_type}-{attn}"), model_type, attn)
        tiny.model.to(device)
        _loaded[key] = tiny
    return _loaded[key]


@pytest.fixture
def llama(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return _tiny(tmp_path_factory, "llama")


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"policy": "h2o"}, ValueError, "policy must be one of 'snapkv', 'pyramidkv', 'adakv', 'sparsemm'"),
        ({"mix": "diverse"}, ValueError, "mix must be True, False or one of 'attn', 'keydiff'"),
        ({"mix": 1}, ValueError, "mix must be True, False"),
        ({"budget": 0}, ValueError, "budget must be >= 1"),
        ({"budget": 16.0}, TypeError, "budget must be an int"),
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"budget": 8, "window": 16}, ValueError, r"budget \(8\) counts the window and must be >= window \(16\)"),
        ({"pooling": "sum"}, ValueError, "pooling must be one of 'avg', 'max'"),
        ({"kernel_size": 4}, ValueError, "kernel_size must be odd"),
        ({"kernel_size": 0}, ValueError, "kernel_size must be >= 1"),
        ({"gqa": "min"}, ValueError, "gqa must be one of 'mean', 'max'"),
        ({"floor": 1.5}, ValueError, r"floor must lie in \[0.0, 1.0\]"),
        ({"normalize": "yes"}, TypeError, "normalize must be True or False"),
        ({"skip": -1}, ValueError, "skip must be >= 0"),
        ({"beta": 0}, ValueError, "beta must be > 0"),
        ({"sparsemm_ratio": 1.0}, ValueError, r"sparsemm_ratio must lie in \[0.0, 1.0\)"),
        ({"backend": "cuda"}, ValueError, "backend must be one of 'auto', 'mixkv', 'flash', 'torch'"),
        ({"reserve": -1}, ValueError, "reserve must be >= 0"),
        ({"record": 1}, TypeError, "record must be True or False"),
        ({"budgett": 64}, TypeError, "unknown MixKVCache option.*budgett.*allowed options: policy, mix, budget"),
        ({"policy": "sparsemm"}, ValueError, "policy='sparsemm' needs sparsemm_table"),
        ({"sparsemm_table": {"0-0": [1.0]}}, ValueError, "sparsemm_table is only used by policy='sparsemm'"),
        ({"redundancy_table": torch.zeros(32, 8)}, ValueError, "32 layers x 8 kv heads.*3 layers x 2 kv heads"),
        ({"policy": "sparsemm", "sparsemm_table": torch.ones(3, 3)}, ValueError, r"shape \[3, 4\]"),
    ],
)
def test_bad_options_fail_at_construction(llama: TinyModel, options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        MixKVCache(llama.model, **options)


def test_a_refused_cache_leaves_the_model_alone(tmp_path_factory: pytest.TempPathFactory) -> None:
    tiny = _tiny(tmp_path_factory, "qwen2")
    with pytest.raises(ValueError):
        MixKVCache(tiny.model, policy="nope")
    assert tiny.model.config._attn_implementation == "sdpa"


def test_unsupported_models_are_refused() -> None:
    with pytest.raises(TypeError, match="PreTrainedModel"):
        MixKVCache(torch.nn.Linear(2, 2))
    config = pytest.importorskip("transformers").GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10)
    model = pytest.importorskip("transformers").GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported; supported model types: qwen2_vl"):
        MixKVCache(model)


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_text_models_match_the_full_cache(tmp_path_factory: pytest.TempPathFactory, model_type: str) -> None:
    tiny = _tiny(tmp_path_factory, model_type)
    inputs = tiny.make_inputs([40])
    full = generate(tiny, inputs)
    assert torch.equal(generate(tiny, inputs, MixKVCache(tiny.model, budget=64, window=8)), full)
    compressed = MixKVCache(tiny.model, policy="adakv", budget=16, window=8)
    generate(tiny, inputs, compressed)
    assert int(compressed.lengths(0).sum()) < 2 * (41 + 15)


def test_eager_text_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Delegation to eager attention (additive float masks) and padding read from those masks."""
    tiny = _tiny(tmp_path_factory, "llama", attn="eager")
    batch = tiny.make_inputs([33, 47, 25])
    full = generate(tiny, batch)
    assert torch.equal(generate(tiny, batch, MixKVCache(tiny.model, budget=80, window=8)), full)
    cache = MixKVCache(tiny.model, policy="adakv", budget=16, window=8)
    out = generate(tiny, batch, cache)
    width = batch["input_ids"].shape[1]
    for i, n in enumerate([33, 47, 25]):
        alone_inputs = tiny.make_inputs([n])
        alone = generate(tiny, alone_inputs, MixKVCache(tiny.model, policy="adakv", budget=16, window=8))
        assert torch.equal(out[i, width:], alone[0, alone_inputs["input_ids"].shape[1] :])
    assert tiny.model.config._attn_implementation == "mixkv"
    assert torch.equal(generate(tiny, batch), full)


def test_record_keeps_what_the_prefill_decided(llama: TinyModel) -> None:
    inputs = llama.make_inputs([30, 44])
    cache = MixKVCache(llama.model, policy="adakv", mix=True, budget=16, window=8, record=True)
    generate(llama, inputs, cache, new_tokens=1)
    for layer in range(llama.num_layers):
        record = cache.layers[layer].record
        assert isinstance(record, PrefillRecord)
        assert record.window == 8
        assert record.valid_lengths is not None and record.valid_lengths.tolist() == [31, 45]
        p = inputs["input_ids"].shape[1] - 8
        assert record.scores is not None and record.scores.shape == (2, 2, p)
        assert record.importance is not None and record.importance.shape == (2, 2, p)
        assert not torch.equal(record.scores, record.importance)  # MixKV scores differ from A
        assert bool(torch.isinf(record.scores[0, :, : p - (31 - 8)]).all())  # padding never scored
        assert record.capacities is not None
        assert torch.equal(cache.lengths(layer).cpu(), record.capacities.cpu() + 8)
    plain = MixKVCache(llama.model, policy="snapkv", budget=16, window=8)
    generate(llama, inputs, plain, new_tokens=1)
    assert plain.layers[0].record is None


def test_reset_makes_the_cache_reusable(llama: TinyModel) -> None:
    first, second = llama.make_inputs([38]), llama.make_inputs([45])
    cache = MixKVCache(llama.model, policy="pyramidkv", budget=16, window=8)
    generate(llama, first, cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    reused = generate(llama, second, cache)
    fresh = generate(llama, second, MixKVCache(llama.model, policy="pyramidkv", budget=16, window=8))
    assert torch.equal(reused, fresh)


def test_uninstall_and_refusal_to_run_without_mixkv_attention(llama: TinyModel) -> None:
    inputs = llama.make_inputs([40])
    cache = MixKVCache(llama.model, budget=16, window=8)
    MixKVCache.uninstall(llama.model)
    assert llama.model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="never followed by mixkv attention"):
        generate(llama, inputs, cache)
    again = MixKVCache(llama.model, budget=16, window=8)
    assert llama.model.config._attn_implementation == "mixkv"
    generate(llama, inputs, again)


def test_crop_is_refused(llama: TinyModel) -> None:
    cache = MixKVCache(llama.model, budget=16, window=8)
    generate(llama, llama.make_inputs([30]), cache, new_tokens=2)
    cache.crop(0)
    with pytest.raises(NotImplementedError, match="cannot crop"):
        cache.crop(-1)
    assert not cache.is_croppable and not cache.is_compileable


def test_inspection_before_prefill(llama: TinyModel) -> None:
    cache = MixKVCache(llama.model, budget=16, window=8)
    assert cache.get_seq_length() == 0 and cache.nbytes == 0 and cache.full_nbytes == 0
    with pytest.raises(RuntimeError, match="no prefill ran"):
        cache.lengths(0)
    assert "policy='snapkv'" in repr(cache) and "method='mixkv'" in repr(cache)


def test_bfloat16_model_keeps_half_the_bytes(tmp_path_factory: pytest.TempPathFactory) -> None:
    tiny = text_lm(tmp_path_factory.mktemp("bf16"), "llama")
    tiny.model.to(torch.bfloat16)
    cache = MixKVCache(tiny.model, policy="adakv", budget=16, window=8)
    out = generate(tiny, tiny.make_inputs([40]), cache)
    assert out.shape[1] == 41 + 16
    held = sum(int(cache.lengths(layer).sum()) for layer in range(tiny.num_layers))
    assert cache.nbytes == held * tiny.head_dim * 2 * 2


def test_sparsemm_with_the_redundancy_table(llama: TinyModel, tmp_path: Path) -> None:
    table = {f"{layer}-{head}": [1.0 + layer + head] for layer in range(3) for head in range(4)}
    path = tmp_path / "sparsemm.json"
    path.write_text(json.dumps(table))
    redundancy = {
        f"{layer}-{head}-{kind}": [0.5] for layer in range(3) for head in range(2) for kind in ("key", "value")
    }
    cache = MixKVCache(
        llama.model, policy="sparsemm", sparsemm_table=path, redundancy_table=redundancy, budget=16, window=8
    )
    generate(llama, llama.make_inputs([40]), cache)
    assert cache.settings.redundancy is not None and cache.settings.head_scores is not None


# --- padding read from the masks of each delegate ----------------------------------------------------


def _padding(lengths: list[int], n: int) -> torch.Tensor:
    return torch.stack([torch.arange(n) >= n - k for k in lengths])  # [B, N] True = valid


def test_valid_lengths_from_every_mask_kind() -> None:
    n, lengths = 7, [7, 4, 1]
    valid = _padding(lengths, n)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    bool_mask = (causal[None] & valid[:, None, :])[:, None]  # sdpa: [B, 1, N, N]
    float_mask = torch.zeros(3, 1, n, n).masked_fill(~bool_mask, torch.finfo(torch.float32).min)  # eager
    for mask in (bool_mask, float_mask, valid.long(), valid):
        got = valid_lengths_from_mask(mask, 3, n)
        assert got is not None and got.dtype == torch.int32 and got.tolist() == lengths
    assert valid_lengths_from_mask(None, 3, n) is None
    assert valid_lengths_from_mask(torch.ones(3, n, dtype=torch.bool), 3, n) is None


def test_right_padding_and_odd_masks_are_refused() -> None:
    right = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="left padding"):
        valid_lengths_from_mask(right, 1, 3)
    with pytest.raises(ValueError, match="at least one non-padding token"):
        valid_lengths_from_mask(torch.zeros(1, 3, dtype=torch.bool), 1, 3)
    with pytest.raises(ValueError, match="shape"):
        valid_lengths_from_mask(torch.ones(1, 3, 3, dtype=torch.bool), 1, 3)
    with pytest.raises(ValueError, match="type"):
        valid_lengths_from_mask([1, 1, 1], 1, 3)


def test_decoding_past_a_sliding_window_warns_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    tiny = text_lm(tmp_path_factory.mktemp("sliding"), "mistral", sliding_window=24)
    cache = MixKVCache(tiny.model, budget=16, window=8)
    with pytest.warns(UserWarning, match="longer than the model's sliding window") as caught:
        generate(tiny, tiny.make_inputs([40]), cache, new_tokens=4)
    assert sum("sliding window" in str(w.message) for w in caught) == 1


@pytest.mark.skipif(not REDUNDANCY_FILE.is_file(), reason="published redundancy table not present")
def test_published_redundancy_table_on_another_model_is_refused(llama: TinyModel) -> None:
    with pytest.raises(ValueError, match=r"28 layers x 4 kv heads, but the model has 3 layers x 2 kv heads"):
        MixKVCache(llama.model, redundancy_table=REDUNDANCY_FILE)
    assert llama.model.config._attn_implementation in ("sdpa", "mixkv")


def test_the_cache_goes_by_the_installed_keyword(llama: TinyModel) -> None:
    import inspect
    import warnings

    from mixkv._compat import cache_keyword, cache_kwargs

    forward = inspect.signature(type(llama.model).forward).parameters
    assert cache_keyword(llama.model) == ("cache" if "cache" in forward else "past_key_values")
    assert cache_kwargs(llama.model, None) == {}
    cache = MixKVCache(llama.model, policy="snapkv", budget=24, window=8)
    inputs = llama.make_inputs([40])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)  # no deprecated keyword
        llama.model.generate(**inputs, **cache_kwargs(llama.model, cache), max_new_tokens=3, do_sample=False)
    # the cache given is the one used: the prompt (BOS + 40) and two fed-back tokens went through it
    assert cache.get_seq_length() == 1 + 40 + 2
    assert cache.nbytes > 0
