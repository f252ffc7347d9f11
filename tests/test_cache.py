"""MixKVCache in generate() on tiny random Qwen2-VL, LLaVA-NeXT (Mistral), InternVL (Qwen2) and Llama models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import mixkv.ops
from mixkv import MixKVCache
from models import BUILDERS, TinyModel, cache_keyword, generate

MODELS = list(BUILDERS)
POLICIES = ["snapkv", "pyramidkv", "adakv", "sparsemm"]
WINDOW, BUDGET = 8, 16
BATCH_TEXT = [31, 46, 38]  # text tokens of a left-padded batch of three (distinct lengths)

_loaded: dict[tuple[str, str], TinyModel] = {}


@pytest.fixture(params=MODELS)
def tiny(request: pytest.FixtureRequest, device: str, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    key = (request.param, device)
    if key not in _loaded:
        model = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
        model.model.to(device)
        _loaded[key] = model
    return _loaded[key]


@pytest.fixture(scope="module")
def sparsemm_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SparseMM table in the published format for the tiny models (3 layers x 4 query heads, 2 samples)."""
    g = torch.Generator().manual_seed(5)
    table = {f"{layer}-{head}": torch.rand(2, generator=g).tolist() for layer in range(3) for head in range(4)}
    path = tmp_path_factory.mktemp("tables") / "sparsemm.json"
    path.write_text(json.dumps(table))
    return path


def _cache(tiny: TinyModel, policy: str, sparsemm: Path | None = None, **options: object) -> MixKVCache:
    if policy == "sparsemm":
        options["sparsemm_table"] = sparsemm
    options.setdefault("window", WINDOW)
    options.setdefault("budget", BUDGET)
    return MixKVCache(tiny.model, policy=policy, **options)


def _prompt_lengths(inputs: dict[str, torch.Tensor]) -> list[int]:
    return inputs["attention_mask"].sum(dim=1).tolist()


# --- reference capacities, straight from the SPEC formulas (independent of the ops) -----------------


def _spec_snapkv(prefix: int, base: int) -> int:
    return min(base, prefix)


def _spec_pyramidkv(prefix: int, base: int, layer: int, num_layers: int, beta: int = 20) -> int:
    low = base // beta
    high = 2 * base - low
    if high >= prefix:
        high = prefix
        low = 2 * base - high
    step = (high - low) // (num_layers - 1)
    return max(0, min(prefix, high - layer * step))


def _spec_sparsemm(path: Path, prefix: int, base: int, layer: int, kv_head: int, ratio: float = 0.1) -> int:
    raw = json.loads(path.read_text())
    mean = {k: sum(v) / len(v) for k, v in raw.items()}
    total = sum(mean.values())
    group = [mean[f"{layer}-{q}"] / total for q in (2 * kv_head, 2 * kv_head + 1)]  # 4 query heads, 2 kv heads
    min_c = int(base * ratio)
    pool = (base - min_c) * 3 * 2
    return max(0, min(prefix, round(sum(group) * pool + min_c)))


# --- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "adakv"])
def test_budget_covering_the_prompt_matches_the_full_cache(tiny: TinyModel, policy: str) -> None:
    inputs = tiny.make_inputs([44])
    n = _prompt_lengths(inputs)[0]
    full = generate(tiny, inputs, output_logits=True, return_dict_in_generate=True)
    cache = _cache(tiny, policy, budget=n + 4)
    out = generate(tiny, inputs, cache, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, full.sequences)
    for a, b in zip(out.logits, full.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for layer in range(tiny.num_layers):
        assert cache.lengths(layer).tolist() == [[n + 15] * tiny.num_kv_heads]
    assert cache.get_seq_length() == n + 15


def test_prompt_shorter_than_the_window_keeps_everything(tiny: TinyModel) -> None:
    inputs = tiny.make_inputs([6])
    n = _prompt_lengths(inputs)[0]
    full = generate(tiny, inputs)
    cache = _cache(tiny, "snapkv", window=n + 1, budget=n + 1)
    assert torch.equal(generate(tiny, inputs, cache), full)
    assert cache.lengths(0).tolist() == [[n + 15] * tiny.num_kv_heads]


@pytest.mark.parametrize("policy", POLICIES)
def test_stored_tokens_follow_the_policy(tiny: TinyModel, policy: str, sparsemm_json: Path) -> None:
    inputs = tiny.make_inputs(BATCH_TEXT)
    cache = _cache(tiny, policy, sparsemm_json, record=True)
    generate(tiny, inputs, cache, new_tokens=1)  # prefill only
    base = BUDGET - WINDOW
    for layer in range(tiny.num_layers):
        lengths = cache.lengths(layer).cpu()
        assert lengths.shape == (3, tiny.num_kv_heads)
        for b, n in enumerate(_prompt_lengths(inputs)):
            prefix = n - WINDOW
            for h in range(tiny.num_kv_heads):
                if policy == "snapkv":
                    expected = _spec_snapkv(prefix, base)
                elif policy == "pyramidkv":
                    expected = _spec_pyramidkv(prefix, base, layer, tiny.num_layers)
                elif policy == "sparsemm":
                    expected = _spec_sparsemm(sparsemm_json, prefix, base, layer, h)
                else:
                    continue
                assert int(lengths[b, h]) == expected + WINDOW, (layer, b, h)
        if policy == "adakv":
            record = cache.layers[layer].record
            assert record is not None and record.importance is not None
            valid = record.valid_lengths
            caps = mixkv.ops.capacities(
                "adakv",
                record.importance,
                budget=BUDGET,
                window=WINDOW,
                layer_idx=layer,
                num_layers=tiny.num_layers,
                valid_lengths=valid,
                floor=0.2,
                normalize=True,
                skip=0,
            )
            assert torch.equal(lengths, caps.cpu().to(lengths.dtype) + WINDOW)
            # heads share the layer's budget: the slots sum to Hkv * base up to rounding and the floor
            for b in range(3):
                total = int(caps[b].sum())
                assert abs(total - tiny.num_kv_heads * base) <= tiny.num_kv_heads, (layer, b, total)


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_and_mix_generates(tiny: TinyModel, policy: str, mix: bool, sparsemm_json: Path) -> None:
    inputs = tiny.make_inputs([40])
    n = _prompt_lengths(inputs)[0]
    cache = _cache(tiny, policy, sparsemm_json, mix=mix)
    out = generate(tiny, inputs, cache)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 16)
    assert cache.get_seq_length() == n + 15
    dtype_bytes = 4  # float32 models
    expected_bytes = 0
    for layer in range(tiny.num_layers):
        lengths = cache.lengths(layer)
        assert bool((lengths >= WINDOW + 15).all())
        expected_bytes += int(lengths.sum()) * tiny.head_dim * 2 * dtype_bytes
    assert cache.nbytes == expected_bytes
    assert cache.full_nbytes == tiny.num_layers * tiny.num_kv_heads * (n + 15) * tiny.head_dim * 2 * dtype_bytes
    assert cache.nbytes < cache.full_nbytes


@pytest.mark.parametrize(("policy", "mix"), [("adakv", True), ("pyramidkv", "keydiff")])
def test_left_padded_batch_equals_sequences_alone(tiny: TinyModel, policy: str, mix: object) -> None:
    batch = tiny.make_inputs(BATCH_TEXT)
    cache = _cache(tiny, policy, mix=mix)
    out = generate(tiny, batch, cache)
    batch_lengths = [cache.lengths(layer).cpu() for layer in range(tiny.num_layers)]
    width = batch["input_ids"].shape[1]
    for i, text in enumerate(BATCH_TEXT):
        alone_inputs = tiny.make_inputs([text])
        alone_cache = _cache(tiny, policy, mix=mix)
        alone = generate(tiny, alone_inputs, alone_cache)
        assert torch.equal(out[i, width:], alone[0, alone_inputs["input_ids"].shape[1] :]), i
        for layer in range(tiny.num_layers):
            assert torch.equal(batch_lengths[layer][i], alone_cache.lengths(layer)[0].cpu()), (i, layer)


def test_dynamic_cache_unchanged_after_a_mixkv_run(tiny: TinyModel) -> None:
    inputs = tiny.make_inputs(BATCH_TEXT[:2])
    before = generate(tiny, inputs, output_logits=True, return_dict_in_generate=True)
    generate(tiny, inputs, _cache(tiny, "adakv"))
    after = generate(tiny, inputs, DynamicCache(), output_logits=True, return_dict_in_generate=True)
    assert torch.equal(before.sequences, after.sequences)
    for a, b in zip(before.logits, after.logits, strict=True):
        assert torch.equal(a, b)
    config = tiny.model.config
    text_config = config.get_text_config(decoder=True)
    assert text_config._attn_implementation == "mixkv"
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key)
        if sub is not text_config:
            assert sub._attn_implementation == "sdpa", key  # vision towers keep their attention


def _manual_decode(tiny: TinyModel, inputs: dict[str, torch.Tensor], cache: object, steps: int) -> list[torch.Tensor]:
    """Prefill, then greedy forward calls with only the new token (the model derives positions from the cache).

    Returns the position ids the text decoder's rotary embedding saw at each decoding step.
    """
    rotary = tiny.model.get_decoder().rotary_emb
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        seen.append(position_ids.detach().cpu().clone())

    device = tiny.model.device
    keyword = cache_keyword(tiny.model)
    handle = rotary.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = tiny.model(**{k: v.to(device) for k, v in inputs.items()}, **{keyword: cache}, use_cache=True)
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(dim=-1)
                out = tiny.model(input_ids=token, **{keyword: cache}, use_cache=True)
    finally:
        handle.remove()
    return seen[1:]


def test_positions_during_decoding_are_those_of_the_full_sequence(tiny: TinyModel) -> None:
    """RoPE (M-RoPE for Qwen2-VL) positions the model derives from the cache do not depend on compression."""
    inputs = tiny.make_inputs([44])
    full = _manual_decode(tiny, inputs, DynamicCache(), steps=4)
    cache = _cache(tiny, "snapkv")
    compressed = _manual_decode(tiny, inputs, cache, steps=4)
    assert int(cache.lengths(0).max()) < cache.get_seq_length()
    assert len(compressed) == len(full) == 4
    for a, b in zip(compressed, full, strict=True):
        assert torch.equal(a, b)


def test_second_turn_appends_and_attends_causally(tiny: TinyModel) -> None:
    """A follow-up prompt on the same cache (multi-token append) matches the full cache when nothing is dropped."""
    inputs = tiny.make_inputs([30])
    first_full_cache = DynamicCache()
    first = generate(tiny, inputs, first_full_cache, new_tokens=4)
    n = first.shape[1]
    cache = _cache(tiny, "adakv", budget=4 * n)
    assert torch.equal(generate(tiny, inputs, cache, new_tokens=4), first)
    follow = torch.randint(3, 280, (1, 9), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([first.cpu(), follow], dim=1)
    second_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = generate(tiny, second_inputs, first_full_cache, new_tokens=5)
    got = generate(tiny, second_inputs, cache, new_tokens=5)
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == first_full_cache.get_seq_length()


def test_beam_search_reorders_the_store(tiny: TinyModel) -> None:
    inputs = tiny.make_inputs([36])
    n = _prompt_lengths(inputs)[0]
    full = generate(tiny, inputs, new_tokens=6, num_beams=2)
    cache = _cache(tiny, "snapkv", budget=n + 8)
    assert torch.equal(generate(tiny, inputs, cache, new_tokens=6, num_beams=2), full)
    assert math.prod(cache.lengths(0).shape) == 2 * tiny.num_kv_heads


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decoding_backends_agree_on_cuda(tmp_path_factory: pytest.TempPathFactory, dtype) -> None:
    """On the GPU: every decode backend of the store gives the same logits on a half-precision model."""
    from mixkv import _backends

    tiny = BUILDERS["qwen2_vl"](tmp_path_factory.mktemp("half"))
    tiny.model.to("cuda", dtype)
    inputs = tiny.make_inputs(BATCH_TEXT)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    runs = {}
    for backend in _backends.available(torch.device("cuda"), dtype):
        cache = _cache(tiny, "adakv", backend=backend)
        out = generate(tiny, inputs, cache, new_tokens=8, output_logits=True, return_dict_in_generate=True)
        runs[backend] = (out.sequences, torch.stack(out.logits).float())
        assert cache.nbytes == sum(int(cache.lengths(la).sum()) for la in range(3)) * tiny.head_dim * 2 * 2
    ref_tokens, ref_logits = runs.pop("mixkv")
    for backend, (tokens, logits) in runs.items():
        # logits of step i depend on the tokens before it: compare while the greedy tokens agree
        same = (tokens == ref_tokens).all(dim=0)
        agree = int(same.long().cumprod(0).sum()) - inputs["input_ids"].shape[1]
        steps = min(agree + 1, logits.shape[0])
        assert steps >= 2
        torch.testing.assert_close(logits[:steps], ref_logits[:steps], rtol=0, atol=5e-2, msg=backend)
