"""``mixkv fidelity``: what it measures (step alignment, teacher forcing, metrics) and its reports (CPU, tiny model)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from mixkv.cli import main as cli_main
from mixkv.tools._cache import CacheSpec, mixkv_cache_class
from mixkv.tools._fidelity_report import (
    Result,
    compact_markdown,
    effect_markdown,
    mix_effect,
    summarize,
    summary_markdown,
)
from mixkv.tools._models import attention_modules, load_model, prepare_inputs, synthetic_image
from mixkv.tools.fidelity import PROMPT, Trace, _trace, compare, kl_divergence

needs_cache = pytest.mark.skipif(mixkv_cache_class() is None, reason="this build has no MixKVCache")
CPU = torch.device("cpu")


def _err(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_argument_errors(capsys):
    _err(capsys, ["fidelity", "--budgets", "0"], "--budget")
    _err(capsys, ["fidelity", "--budgets", "6x"], "--budgets")
    _err(capsys, ["fidelity", "--policies", "nope"], "--policy")
    _err(capsys, ["fidelity", "--mix", "maybe"], "--mix")
    _err(capsys, ["fidelity", "--images", "clouds"], "--images")
    _err(capsys, ["fidelity", "--steps", "1"], "--steps")
    _err(capsys, ["fidelity", "--dims", "huge"], "--dims")
    _err(capsys, ["fidelity", "--models", "qwen2-vl-7b"], "--models")
    _err(capsys, ["fidelity", "--dims", "real", "--models", "gpt-5", "--policies", "full"], "--models")
    _err(capsys, ["fidelity", "--seeds", "1,x"], "--seeds")
    _err(capsys, ["fidelity", "--seeds", "1,1"], "--seeds")
    _err(capsys, ["fidelity", "--merge", "missing.json"], "--merge")
    _err(capsys, ["fidelity", "--image-size", "10"], "--image-size")


# ------------------------------------------------------------------------------------------- what a trace holds


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    loaded = load_model(None, device=CPU, dtype=torch.float32, seed=3)
    prepared = prepare_inputs(loaded, synthetic_image("noise", 112, seed=3), PROMPT, image_size=112)
    return loaded, prepared


def test_trace_steps_line_up_with_one_full_forward(tiny):
    """Decode forward k is fed token k and yields logits[k] (which predicts token k + 1) and attn[l][k]:
    checked against one uncached forward over the prompt plus the generated tokens."""
    loaded, prepared = tiny
    steps = 5
    ref = _trace(loaded, prepared, CacheSpec(policy=None), steps, force=None)
    assert ref.tokens.shape == (steps + 1,) and ref.logits.shape[0] == steps
    assert all(a.shape[0] == steps for a in ref.attn.values())
    n = prepared.prompt_length
    inputs = dict(prepared.inputs)
    ids = torch.cat([inputs["input_ids"], ref.tokens[:steps].view(1, -1)], dim=1)
    inputs["input_ids"] = ids
    inputs["attention_mask"] = torch.ones_like(ids)
    inputs["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros(1, steps, dtype=inputs["mm_token_type_ids"].dtype)], dim=1
    )
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out[0][0]))
        for i, m in attention_modules(loaded.model).items()
    ]
    try:
        with torch.no_grad():
            logits = loaded.model(**inputs, use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(ref.prefill_logits, logits[n - 1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref.logits, logits[n : n + steps], rtol=1e-4, atol=1e-5)
    # greedy on the processed scores: min_new_tokens masks the end-of-sequence token
    eos = loaded.text_config.eos_token_id
    masked = logits[n - 1 : n + steps].clone()
    masked[:, eos] = float("-inf")
    assert torch.equal(ref.tokens, masked.argmax(-1))
    for layer, a in ref.attn.items():
        torch.testing.assert_close(a, seen[layer][n : n + steps], rtol=1e-4, atol=1e-5)


def test_teacher_forcing_follows_any_token_stream(tiny):
    loaded, prepared = tiny
    forced = torch.tensor([5, 9, 9, 40, 7, 11])
    got = _trace(loaded, prepared, CacheSpec(policy=None), 5, force=forced)
    assert torch.equal(got.tokens, forced)
    greedy = _trace(loaded, prepared, CacheSpec(policy=None), 5, force=None)
    # the prefill distribution does not depend on the forced tokens; the decode ones do
    torch.testing.assert_close(got.prefill_logits, greedy.prefill_logits)
    if not torch.equal(greedy.tokens, forced):
        assert not torch.allclose(got.logits, greedy.logits)


@needs_cache
def test_compressed_trace_differs_only_after_the_prefill(tiny):
    loaded, prepared = tiny
    ref = _trace(loaded, prepared, CacheSpec(policy=None), 4, force=None)
    got = _trace(loaded, prepared, CacheSpec(policy="snapkv", budget=24, window=8), 4, force=ref.tokens)
    assert torch.equal(got.tokens, ref.tokens)
    c = compare(ref, got)
    assert c.prefill_kl < 1e-9  # compression takes effect after the prompt's own attention
    assert len(c.kl_per_step) == 4 and c.kl_mean > 0.0
    assert max(c.attn_rel_err_per_layer) > 1e-3


# ------------------------------------------------------------------------------------------------------ metrics


def test_compare_metrics_against_formulas():
    g = torch.Generator().manual_seed(0)
    steps, vocab, hidden = 5, 11, 6
    logits = torch.randn(steps, vocab, generator=g)
    attn = {0: torch.randn(steps, hidden, generator=g), 1: torch.randn(steps, hidden, generator=g)}
    prefill = torch.randn(vocab, generator=g)
    ref = Trace(torch.zeros(steps + 1, dtype=torch.long), logits, attn, 0, 0, prefill_logits=prefill)
    other = logits.clone()
    other[2] = -other[2]
    noise = torch.randn(steps, hidden, generator=g)
    got = Trace(ref.tokens, other, {0: attn[0] + noise, 1: attn[1]}, 0, 0, prefill_logits=prefill + 1.0)
    c = compare(ref, got)
    for t in range(steps):
        p = torch.softmax(logits[t].double(), -1)
        q = torch.softmax(other[t].double(), -1)
        assert c.kl_per_step[t] == pytest.approx(float((p * (p / q).log()).sum()), abs=1e-12)
    assert c.kl_per_step[2] > 0 and all(c.kl_per_step[t] == 0.0 for t in (0, 1, 3, 4))
    assert c.kl_mean == pytest.approx(c.kl_per_step[2] / steps)
    assert c.top1_agreement == pytest.approx(1.0 - float(logits[2].argmax() != other[2].argmax()) / steps)
    diff = got.attn[0].double() - attn[0].double()  # noise, up to float32 rounding of the sum
    rel = [float(diff[t].norm() / attn[0][t].double().norm()) for t in range(steps)]
    assert c.attn_rel_err_per_layer[0] == pytest.approx(statistics.fmean(rel), rel=1e-9)
    assert c.attn_rel_err_per_layer[1] == 0.0
    assert c.prefill_kl == pytest.approx(0.0, abs=1e-12)  # a constant shift leaves softmax unchanged
    with pytest.raises(ValueError, match="different steps"):
        compare(ref, Trace(ref.tokens, logits[:4], {0: attn[0][:4], 1: attn[1][:4]}, 0, 0))


def test_kl_direction():
    p = torch.tensor([[4.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.0]])
    pp, qq = torch.softmax(p.double(), -1), torch.softmax(q.double(), -1)
    assert float(kl_divergence(p, q)) == pytest.approx(float((pp * (pp / qq).log()).sum()))
    assert float(kl_divergence(p, q)) != pytest.approx(float((qq * (qq / pp).log()).sum()))


# ------------------------------------------------------------------------------------------------------ reports


def _result(seed: int, mix: str, budget: int, kl: float, top1: float, err: float, image: str = "tiles") -> Result:
    cache = "snapkv" if mix == "off" else f"snapkv+{mix}"
    return Result(
        model="tiny",
        image=image,
        seed=seed,
        cache=cache,
        policy="snapkv",
        mix=mix,
        budget=budget,
        prompt_tokens=300,
        steps=4,
        kl_mean=kl,
        kl_max=kl,
        top1_agreement=top1,
        attn_rel_err_mean=err,
        cache_bytes=budget,
        full_cache_bytes=300,
    )


def test_summary_and_mix_effect_by_hand():
    rs = [
        _result(0, "off", 64, 2.0, 0.5, 0.4),
        _result(1, "off", 64, 4.0, 0.75, 0.2),
        _result(0, "mixkv", 64, 1.0, 1.0, 0.5),
        _result(1, "mixkv", 64, 6.0, 0.25, 0.1),
        _result(0, "off", 128, 1.0, 1.0, 0.1, image="noise"),  # no MixKV partner: no effect row
    ]
    rows = {(r["cache"], r["budget"], r["image"]): r for r in summarize(rs)}
    assert len(rows) == 3
    off = rows[("snapkv", 64, "tiles")]
    assert off["seeds"] == 2 and off["cache_fraction"] == pytest.approx(64 / 300)
    assert off["kl_mean"] == {"mean": 3.0, "std": pytest.approx(math.sqrt(2.0)), "lo": 2.0, "hi": 4.0}
    assert off["top1_agreement"]["mean"] == pytest.approx(0.625)
    (eff,) = mix_effect(rs)
    assert (eff["policy"], eff["budget"], eff["image"], eff["seeds"]) == ("snapkv", 64, "tiles", 2)
    assert eff["kl_ratio"]["mean"] == pytest.approx((0.5 + 1.5) / 2)
    assert eff["kl_wins"] == 1 and eff["attn_wins"] == 1
    assert eff["top1_diff"]["mean"] == pytest.approx((0.5 - 0.5) / 2)
    assert "| tiny | tiles | snapkv | 64 | 1.000 ± 0.707 | 1/2 | 1/2 |" in effect_markdown([eff])
    compact = compact_markdown(summarize(rs)).splitlines()
    assert compact[0] == "| tiny: policy | budget | noise | noise +MixKV | tiles | tiles +MixKV |"
    assert "| snapkv | 64 |  |  | 3.00e+00 ± 1.41e+00 | 3.50e+00 ± 3.54e+00 |" in compact
    assert "| snapkv | 128 | 1.00e+00 |  |  |  |" in compact  # one seed: the mean alone
    assert "| tiny | tiles | snapkv+mixkv | 64 | 300 | 21.3% | 3.50e+00 ± 3.54e+00 |" in summary_markdown(summarize(rs))


# ------------------------------------------------------------------------------------------------- the command


def test_full_control_is_exact(capsys, tmp_path):
    out = tmp_path / "f.json"
    argv = ["fidelity", "--policies", "full", "--steps", "6", "--images", "tiles", "--image-size", "112"]
    assert cli_main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["kl_mean"] == 0.0 and row["top1_agreement"] == 1.0 and row["prefill_kl"] == 0.0
    assert row["kl_per_step"] == [0.0] * 6 and row["steps"] == 6
    assert row["attn_rel_err_per_layer"] == [0.0] * 4
    assert "## Summary" in (tmp_path / "f.md").read_text()


@needs_cache
def test_budget_above_prompt_is_exact(tmp_path):
    out = tmp_path / "f.json"
    argv = ["fidelity", "--policies", "snapkv,adakv,pyramidkv,sparsemm", "--budgets", "4096", "--steps", "4"]
    assert cli_main([*argv, "--images", "tiles", "--image-size", "112", "--out", str(out)]) == 0
    for row in json.loads(out.read_text())["results"]:
        assert row["kl_mean"] < 1e-6, row
        assert row["top1_agreement"] == 1.0, row
        assert max(row["attn_rel_err_per_layer"]) < 1e-4, row


@needs_cache
def test_small_budget_two_seeds_and_merge(tmp_path):
    out = tmp_path / "f.json"
    argv = ["fidelity", "--policies", "snapkv", "--mix", "off,on", "--budgets", "40", "--window", "8", "--steps", "4"]
    argv += ["--images", "noise", "--image-size", "112", "--seeds", "0,1", "--out", str(out)]
    assert cli_main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert sorted((r["seed"], r["mix"]) for r in rows) == [(0, "mixkv"), (0, "off"), (1, "mixkv"), (1, "off")]
    for row in rows:
        assert row["prompt_tokens"] > 40 and row["cache_bytes"] < row["full_cache_bytes"]
        assert row["prefill_kl"] < 1e-9 and len(row["kl_per_step"]) == 4
        assert max(row["attn_rel_err_per_layer"]) > 0.0
    assert data["meta"]["seeds"] == [0, 1]
    assert {r["seeds"] for r in data["summary"]} == {2} and len(data["mix_effect"]) == 1
    # the two seeds differ (weights and image both depend on the seed)
    assert rows[0]["kl_mean"] != rows[2]["kl_mean"]
    # merge: re-reading the results gives the same summary; two halves merge into the whole
    half = [dict(data, results=[r for r in rows if r["seed"] == s]) for s in (0, 1)]
    parts = []
    for s, h in zip((0, 1), half, strict=True):
        parts.append(tmp_path / f"part{s}.json")
        parts[-1].write_text(json.dumps(h))
    merged = tmp_path / "m.json"
    assert cli_main(["fidelity", "--merge", f"{parts[0]},{parts[1]}", "--out", str(merged)]) == 0
    again = json.loads(merged.read_text())
    assert again["summary"] == data["summary"] and again["mix_effect"] == data["mix_effect"]
    assert len(again["results"]) == 4


@needs_cache
def test_progress_reports_every_result(tiny):
    from mixkv.tools.fidelity import run_fidelity

    loaded, _prepared = tiny
    seen: list[int] = []
    specs = [CacheSpec("snapkv", False, 24, 8), CacheSpec("snapkv", True, 24, 8)]
    rows = run_fidelity(loaded, "tiny", "tiles", 112, specs, 2, seed=5, progress=lambda rs: seen.append(len(rs)))
    assert seen == [1, 2] and [r.mix for r in rows] == ["off", "mixkv"] and {r.seed for r in rows} == {5}
