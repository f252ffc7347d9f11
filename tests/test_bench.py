"""CPU tests of the benchmark machinery: plan path, prompt builders, writers, batch search, tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PretrainedConfig

import mixkv
from mixkv.bench import main as bench_main
from mixkv.bench.compress import COMPRESS_POLICIES, bench_compress
from mixkv.bench.figure import draw_efficiency, have_matplotlib
from mixkv.bench.methods import ALL_METHODS, Method, parse_method
from mixkv.bench.models import MODELS, ModelSpec, attention_dims, build_model, load_config
from mixkv.bench.prompts import build_inputs, choose_image
from mixkv.bench.report import write_results
from mixkv.bench.runner import run_all
from mixkv.bench.summary import median_rows, mix_overhead, prefill_cost_row
from mixkv.bench.throughput import largest_batch
from models import IMAGE_TOKEN, internvl_config, llava_next_config, qwen2_vl_config


def tiny_qwen() -> PretrainedConfig:
    return qwen2_vl_config(num_layers=2)


def tiny_llava(pinpoints: list[list[int]]) -> PretrainedConfig:
    return llava_next_config(num_layers=2, pinpoints=pinpoints, vision={"projection_dim": 32})


def tiny_internvl() -> PretrainedConfig:
    return internvl_config(num_layers=2, image_size=28)


# (config factory, prompt length, image tokens expected from the published formulas, by hand)
CASES = [
    # Qwen2-VL: side = isqrt(length - 10) rounded down to even; tokens = side^2 / 4
    pytest.param(tiny_qwen, 40, 25, id="qwen-40"),  # isqrt(30)=5 -> side 10 -> 25
    pytest.param(tiny_qwen, 90, 64, id="qwen-90"),  # isqrt(80)=8 -> side 16 -> 64
    # LLaVA-NeXT, 28-pixel tiles of 2x2 patches: base 4 + rows*2 * (cols*2 + 1)
    pytest.param(lambda: tiny_llava([[28, 28]]), 40, 10, id="llava-28x28"),
    pytest.param(lambda: tiny_llava([[28, 56]]), 40, 14, id="llava-28x56"),
    pytest.param(lambda: tiny_llava([[56, 28]]), 40, 16, id="llava-56x28"),
    pytest.param(lambda: tiny_llava([[28, 28], [56, 56]]), 60, 24, id="llava-56x56"),
    # InternVL, 28-pixel tiles of 2x2 patches at downsample 0.5: 1 token a tile, at most 13 tiles
    pytest.param(tiny_internvl, 12, 4, id="internvl-12"),
    pytest.param(tiny_internvl, 60, 13, id="internvl-60"),
]


@pytest.mark.parametrize(("factory", "length", "expected"), CASES)
def test_prompt_image_tokens_match_the_model(factory, length: int, expected: int) -> None:
    config = factory()
    inputs, info = build_inputs(config, length, batch=2, dtype=torch.float32, seed=3)
    ids = inputs["input_ids"]
    assert ids.shape == (2, length)
    assert info.image_tokens == expected
    assert ((ids == IMAGE_TOKEN).sum(dim=1) == expected).all()
    assert info.image_tokens + info.text_tokens == length
    torch.manual_seed(0)
    model = build_model(config, "cpu", torch.float32)
    with torch.no_grad():
        out = model(**inputs)  # raises when the image features and image tokens disagree
    assert out.logits.shape[:2] == (2, length)
    broken = dict(inputs)
    broken["input_ids"] = ids.clone()
    first = int((ids[0] == IMAGE_TOKEN).nonzero()[0, 0])
    broken["input_ids"][:, first] = 5
    if "mm_token_type_ids" in broken:
        broken["mm_token_type_ids"] = (broken["input_ids"] == IMAGE_TOKEN).int()
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError, IndexError)):
        model(**broken)


def test_real_dimension_image_tokens() -> None:
    llava = load_config(MODELS["llava-next-mistral-7b"])
    assert choose_image(llava, 32000).tokens == 576 + 48 * (48 + 1)
    assert choose_image(llava, 2000).tokens == 576 + 48 * (24 + 1)
    qwen = load_config(MODELS["qwen2-vl-7b"])
    assert choose_image(qwen, 32000).tokens == 96 * 96 // 4
    internvl = load_config(MODELS["internvl3-8b"])
    assert choose_image(internvl, 32000).tokens == 13 * 256
    assert attention_dims(llava)["kv_heads"] == 8


def test_real_dimension_prompt_lengths() -> None:
    for spec in MODELS.values():
        config = load_config(spec)
        for length in (2000, 4096, 8000):  # 4096 is the warm-up prompt, 2000 the shortest default
            inputs, info = build_inputs(config, length, seed=1)
            assert inputs["input_ids"].shape == (1, length)
            assert info.text_tokens > 0


def test_plan_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_main.main([]) == 0
    out = capsys.readouterr().out
    assert "plan" in out and "LLaVA-NeXT" in out and "2928 image tokens" in out
    assert bench_main.main(["--quick", "--models", "qwen", "--lengths", "4000"]) == 0
    assert "Qwen2-VL" in capsys.readouterr().out


def test_bad_arguments_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_main.main(["--methods", "nope"])
    with pytest.raises(SystemExit):
        bench_main.main(["--models", "gpt"])
    with pytest.raises(SystemExit):
        bench_main.main(["--new-tokens", "0"])


def test_methods() -> None:
    assert ALL_METHODS[0].name == "full"
    assert len(ALL_METHODS) == 9
    assert parse_method("AdaKV+mix") == Method("adakv", True)
    assert parse_method("snapkv") == Method("snapkv", False)
    with pytest.raises(ValueError, match="methods"):
        parse_method("h2o")


def _fake_rows() -> list[dict]:
    rows = []
    for m_idx, model in enumerate(("llava-next-mistral-7b", "qwen2-vl-7b")):
        for i, method in enumerate(ALL_METHODS):
            rows.append(
                {
                    "model": model,
                    "length": 32000,
                    "batch": 1,
                    "method": method.name,
                    "total_s": 20.0 + i + m_idx,
                    "peak_bytes": int((17 + i * 0.1) * 1e9),
                }
            )
    rows.append({"model": "qwen2-vl-7b", "length": 32000, "batch": 1, "method": "sparsemm", "error": "OOM"})
    return rows


def test_results_writer(tmp_path: Path) -> None:
    rows = _fake_rows()
    path = write_results(tmp_path / "sub" / "bench.json", {"device": "fake"}, {"e2e": rows})
    data = json.loads(path.read_text())
    assert data["meta"] == {"device": "fake"}
    assert data["e2e"] == rows
    assert data["compress"] == [] and data["throughput"] == [] and data["memory"] == []


def test_figure(tmp_path: Path) -> None:
    if not have_matplotlib():
        pytest.skip("matplotlib is not installed")
    path = draw_efficiency(_fake_rows(), tmp_path / "fig.png", length=32000)
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert draw_efficiency(_fake_rows(), tmp_path / "none.png", length=7) is None


def test_figure_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mixkv.bench.figure.have_matplotlib", lambda: False)
    assert draw_efficiency(_fake_rows(), tmp_path / "fig.png", length=32000) is None
    assert not (tmp_path / "fig.png").exists()


def test_largest_batch_doubles_then_bisects() -> None:
    for limit in (1, 2, 5, 13, 16, 100):
        tried: list[int] = []

        def fits(batch: int, limit: int = limit, tried: list[int] = tried) -> bool:
            tried.append(batch)
            return batch <= limit

        result = largest_batch(fits, cap_s=1e9, max_batch=1024)
        assert result.largest == limit and not result.capped
        assert len(tried) == len(set(tried))
    assert largest_batch(lambda b: False, cap_s=1e9).largest == 0
    capped = largest_batch(lambda b: True, cap_s=1e9, max_batch=8)
    assert capped.largest == 8 and capped.capped


def test_largest_batch_time_cap() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    def fits(batch: int) -> bool:
        now[0] += 10.0
        return batch <= 100

    result = largest_batch(fits, cap_s=25.0, clock=clock)
    assert result.capped and result.largest == 4 and [b for b, _ in result.trials] == [1, 2, 4]


def _settings(tmp_path: Path, methods: list[str], parts: list[str]) -> bench_main.Settings:
    args = bench_main.build_parser().parse_args(
        [
            "--lengths",
            "48",
            "--new-tokens",
            "5",
            "--budget",
            "40",  # below the 48-token prompt (window 32), so compressed methods drop tokens
            "--methods",
            *methods,
            "--parts",
            *parts,
            "--throughput-length",
            "40",
            "--throughput-new-tokens",
            "3",
            "--throughput-max-batch",
            "2",
            "--throughput-methods",
            *methods,
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    settings = bench_main.resolve(args)
    settings.models = [ModelSpec("tiny-qwen2-vl", "qwen2_vl", "tiny Qwen2-VL")]
    return settings


def _run_tiny(tmp_path: Path, methods: list[str], parts: list[str], device: str = "cpu") -> dict:
    saved: list[int] = []
    settings = _settings(tmp_path, methods, parts)
    config = tiny_qwen()
    results = run_all(
        settings, torch.device(device), lambda r: saved.append(len(r["e2e"])), configs={"tiny-qwen2-vl": config}
    )
    assert saved, "results are saved as the run goes"
    return results


def test_tiny_end_to_end_full_cache(tmp_path: Path, device: str) -> None:
    torch.manual_seed(0)
    results = _run_tiny(tmp_path, ["full"], ["e2e", "memory", "throughput"], device)
    (row,) = results["e2e"]
    assert "error" not in row, row
    assert row["new_tokens"] == 5 and row["prompt_tokens"] == 48 and row["batch"] == 1
    assert 0 < row["prefill_s"] <= row["total_s"]
    assert row["decode_ms_per_token"] > 0
    # bf16 keys and values of 2 layers x 2 kv heads x head dim 16 over prompt + 4 appended tokens
    assert row["cache_bytes"] == row["full_cache_bytes"] == 2 * 2 * 2 * 16 * (48 + 4) * 2
    (tp,) = results["throughput"]
    if device == "cpu":
        assert row["peak_bytes"] is None
        (mem,) = results["memory"]
        assert "CUDA" in mem["error"] and mem["weights_bytes"] > 0
    else:
        assert row["peak_bytes"] > row["cache_bytes"]
        assert tp["peak_bytes"] > 0
        # the memory probe needs a compressed method: with only the full cache it reports why
        (mem,) = results["memory"]
        assert "compressed" in mem["error"]
    assert tp["max_batch"] == 2 and tp["search_capped"] and tp["measured_batch"] == 2
    assert tp["decode_tokens_per_s"] > 0
    write_results(tmp_path / "bench.json", {}, results)
    assert json.loads((tmp_path / "bench.json").read_text())["e2e"][0]["method"] == "full"


def test_tiny_end_to_end_compressed(tmp_path: Path, device: str) -> None:
    if not hasattr(mixkv, "MixKVCache"):
        pytest.skip("mixkv.MixKVCache is not in this build yet")
    torch.manual_seed(0)
    parts = ["e2e"] if device == "cpu" else ["e2e", "memory"]
    results = _run_tiny(tmp_path, ["full", "snapkv", "adakv+mixkv"], parts, device)
    rows = {r["method"]: r for r in results["e2e"]}
    for name in ("snapkv", "adakv+mixkv"):
        row = rows[name]
        assert "error" not in row, row
        assert row["new_tokens"] == 5
        assert row["cache_bytes"] < row["full_cache_bytes"]
    if device == "cuda":
        mem = results["memory"]
        assert mem and all("error" not in m for m in mem), mem
        assert all(m["layer_working_set_bytes"] > 0 for m in mem)


def test_compress_rows(device: str) -> None:
    dims = {"layers": 4, "q_heads": 4, "kv_heads": 2, "head_dim": 16}
    rows = bench_compress("tiny", dims, length=80, budget=40, device=torch.device(device), reps=1, loop_reps=1)
    assert [(r["policy"], r["mix"]) for r in rows] == [(p, m) for p, m in COMPRESS_POLICIES]
    for row in rows:
        assert row["loop_ms"] > 0 and row["length"] == 80
        assert ("error" in row) != ("mixkv_ms" in row)
        if "mixkv_ms" in row:
            assert row["speedup_vs_loop"] > 0


def test_repeated_runs_are_interleaved_and_summarised(tmp_path: Path) -> None:
    if not hasattr(mixkv, "MixKVCache"):
        pytest.skip("mixkv.MixKVCache is not in this build yet")
    torch.manual_seed(0)
    settings = _settings(tmp_path, ["snapkv", "snapkv+mixkv"], ["e2e"])
    settings.repeats = 2
    results = run_all(settings, torch.device("cpu"), lambda r: None, configs={"tiny-qwen2-vl": tiny_qwen()})
    order = [(r["repeat"], r["method"]) for r in results["e2e"]]
    assert order == [(0, "snapkv"), (0, "snapkv+mixkv"), (1, "snapkv"), (1, "snapkv+mixkv")]
    medians = {r["method"]: r for r in results["e2e_median"]}
    assert set(medians) == {"snapkv", "snapkv+mixkv"} and all(r["runs"] == 2 for r in medians.values())
    (cost,) = results["mix_overhead"]
    assert cost["policy"] == "snapkv" and cost["rounds"] == 2


def _row(method: str, repeat: int, total: float, prefill: float, **extra: object) -> dict:
    policy, _, mix = method.partition("+")
    return {
        "model": "m",
        "length": 100,
        "method": method,
        "policy": None if policy == "full" else policy,
        "mix": bool(mix),
        "batch": 1,
        "repeat": repeat,
        "total_s": total,
        "prefill_s": prefill,
        "decode_ms_per_token": 10.0 * total,
        "peak_bytes": 1000 + repeat,
        "cache_bytes": 64,
    } | extra


def test_median_rows_and_mix_overhead_pair_rounds() -> None:
    rows = [
        _row("full", 0, 9.0, 1.0),
        _row("adakv", 0, 10.0, 1.0),
        _row("adakv+mixkv", 0, 10.5, 1.25),
        _row("full", 1, 9.5, 1.0),
        _row("adakv", 1, 20.0, 1.0),  # a slow round: both methods of it are slow
        _row("adakv+mixkv", 1, 20.2, 1.5),
        _row("full", 2, 30.0, 1.0, error="OutOfMemoryError"),
        _row("adakv", 2, 12.0, 1.0),
        _row("adakv+mixkv", 2, 11.4, 1.0),
    ]
    medians = {r["method"]: r for r in median_rows(rows)}
    assert medians["full"]["runs"] == 2 and medians["full"]["total_s"] == pytest.approx(9.25)
    assert medians["adakv"]["total_s"] == 12.0 and medians["adakv"]["runs"] == 3
    assert medians["adakv"]["total_s_min"] == 10.0 and medians["adakv"]["total_s_max"] == 20.0
    assert medians["adakv"]["peak_bytes"] == 1001 and isinstance(medians["adakv"]["peak_bytes"], int)
    assert "repeat" not in medians["adakv"]
    (cost,) = mix_overhead(rows)
    # per-round ratios 1.05, 1.01, 0.95 -> median 1.01; prefill deltas 0.25, 0.5, 0.0 -> 0.25
    assert cost["rounds"] == 3 and cost["policy"] == "adakv"
    assert cost["total_ratio"] == pytest.approx(1.01)
    assert cost["total_ratio_min"] == pytest.approx(0.95) and cost["total_ratio_max"] == pytest.approx(1.05)
    assert cost["prefill_delta_s"] == pytest.approx(0.25)
    assert cost["within_tolerance"] is True
    assert mix_overhead(rows, tolerance=0.005)[0]["within_tolerance"] is False
    # a MixKV run without its base policy's run has nothing to be compared with
    assert mix_overhead([_row("snapkv+mixkv", 0, 1.0, 0.1)]) == []


def test_prefill_cost_row_uses_round_differences() -> None:
    row = prefill_cost_row("m", 100, "adakv", [1.0, 2.0, 1.1], [1.2, 2.05, 1.1], base_total_s=10.0)
    # per-round deltas 0.2, 0.05, 0.0 -> median 0.05 (the medians' difference would be 0.1)
    assert row["prefill_delta_s"] == pytest.approx(0.05) and row["rounds"] == 3
    assert row["prefill_delta_min_s"] == pytest.approx(0.0) and row["prefill_delta_max_s"] == pytest.approx(0.2)
    assert row["total_share"] == pytest.approx(0.005) and row["within_tolerance"] is True
    assert prefill_cost_row("m", 100, "adakv", [1.0], [1.5], base_total_s=10.0)["within_tolerance"] is False
    assert prefill_cost_row("m", 100, "adakv", [1.0], [1.5])["total_share"] is None
    assert "error" in prefill_cost_row("m", 100, "adakv", [], [1.0])


def test_mix_cost_part_runs_interleaved_prefills(tmp_path: Path) -> None:
    if not hasattr(mixkv, "MixKVCache"):
        pytest.skip("mixkv.MixKVCache is not in this build yet")
    torch.manual_seed(0)
    settings = _settings(tmp_path, ["full", "adakv", "adakv+mixkv"], ["e2e", "mixcost"])
    settings.mix_cost_rounds = 2
    results = run_all(settings, torch.device("cpu"), lambda r: None, configs={"tiny-qwen2-vl": tiny_qwen()})
    (row,) = results["mix_cost"]
    assert row["policy"] == "adakv" and row["rounds"] == 2 and "error" not in row
    assert row["base_total_s"] == next(r["total_s"] for r in results["e2e"] if r["method"] == "adakv")
    assert row["total_share"] == pytest.approx(row["prefill_delta_s"] / row["base_total_s"])


@pytest.mark.parametrize("warm", [True, False])
def test_full_cache_is_warmed_at_each_length_before_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warm: bool
) -> None:
    from mixkv.bench.runner import Runner

    calls: list[tuple[str, int]] = []

    def fake(self: Runner, model: object, inputs: dict, method: Method, dims: dict, new: int) -> dict:
        calls.append((method.name, new))
        return {"prefill_s": 0.1, "total_s": 1.0, "decode_ms_per_token": 1.0, "peak_bytes": None, "cache_bytes": 1}

    monkeypatch.setattr(Runner, "_generate", fake)
    settings = _settings(tmp_path, ["full", "snapkv"], ["e2e"])
    settings.warm_full = warm
    results = run_all(settings, torch.device("cpu"), lambda r: None, configs={"tiny-qwen2-vl": tiny_qwen()})
    timed = [("full", 5), ("snapkv", 5)]
    warm_up = [("full", 4), ("snapkv", 4)]  # the model's warm-up (kernels, allocator)
    assert calls == warm_up + ([("full", 5)] if warm else []) + timed
    assert [r["method"] for r in results["e2e"]] == ["full", "snapkv"]
