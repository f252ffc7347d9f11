"""The mixkv command-line tools: generate, profile, fidelity (CPU, tiny random-weight models, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixkv._compat import cache_kwargs
from mixkv.cli import main as cli_main
from mixkv.tools import _tables
from mixkv.tools._cache import mixkv_cache_class
from mixkv.tools._models import packaged_config_dir, synthetic_image

HAS_CACHE = mixkv_cache_class() is not None
needs_cache = pytest.mark.skipif(not HAS_CACHE, reason="this build has no MixKVCache")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i, kind in enumerate(("tiles", "noise")):
        synthetic_image(kind, 112, seed=i).save(d / f"{kind}.png")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged tiny config with random weights, saved as a model directory (no processor)."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    d = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(1)
    model = Qwen2VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(packaged_config_dir("tiny")))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def saved_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from models import text_config

    d = tmp_path_factory.mktemp("text_model")
    cfg = Qwen2Config(**text_config(num_layers=2))
    torch.manual_seed(2)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    return d


# ------------------------------------------------------------------------------------------------ argument errors


def _err(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


def test_generate_argument_errors(capsys, image_dir, tmp_path):
    img = str(image_dir / "tiles.png")
    _err(capsys, ["generate", "--image", str(tmp_path / "missing.png")], "image file not found")
    _err(capsys, ["generate", "--image", img, "--budget", "0"], "--budget")
    _err(capsys, ["generate", "--image", img, "--budget", "-5"], "--budget")
    _err(capsys, ["generate", "--image", img, "--policy", "h2o"], "--policy")
    _err(capsys, ["generate", "--image", img, "--mix", "bogus"], "--mix")
    _err(capsys, ["generate", "--image", img, "--budget", "many"], "invalid int")
    _err(capsys, ["generate", "--image", img, "--dtype", "int8"], "--dtype")
    _err(capsys, ["generate", "--image", img, "--max-new-tokens", "0"], "--max-new-tokens")
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no_such_model_type"}))
    _err(capsys, ["generate", "--model", str(bad), "--image", img, "--policy", "full"], "unknown model type")
    gpt2 = tmp_path / "gpt2_model"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _err(capsys, ["generate", "--model", str(gpt2), "--image", img, "--policy", "full"], "unknown model type 'gpt2'")


def test_profile_argument_errors(capsys, image_dir, tmp_path):
    out = str(tmp_path / "r.json")
    _err(capsys, ["profile", "--images", str(tmp_path / "none"), "--out", out], "--images directory not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _err(capsys, ["profile", "--images", str(empty), "--out", out], "no image files")
    _err(capsys, ["profile", "--images", str(image_dir)], "--out")
    _err(capsys, ["profile", "--images", str(image_dir), "--out", out, "--limit", "0"], "--limit")
    assert not Path(out).exists()


def test_help_exits_zero(capsys):
    for cmd in ("generate", "profile", "fidelity"):
        assert cli_main([cmd, "--help"]) == 0
        assert "usage: mixkv " + cmd in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- generate


def _summary(out: str) -> dict[str, str]:
    line = next(x for x in out.splitlines() if x.startswith("summary:"))
    return {k: v for k, v in (tok.split("=", 1) for tok in line.split() if "=" in tok)}


def test_generate_offline_tiny_full(capsys, image_dir):
    rc = cli_main(["generate", "--image", str(image_dir / "tiles.png"), "--policy", "full", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "random weights" in out and "meaningless" in out
    answer = next(x for x in out.splitlines() if x.startswith("answer: token ids:"))
    assert len(answer.split(":", 2)[2].split()) == 4
    s = _summary(out)
    assert s["model"] == "qwen2_vl" and s["cache"] == "full"
    assert "prefill" in out and "decode" in out and "(100.0%)" in out


def test_generate_saved_model_matches_direct_generate(capsys, image_dir, saved_tiny):
    """--model on a saved directory: same greedy tokens as a direct generate on the same inputs."""
    from mixkv.tools._models import load_image, load_model, prepare_inputs

    img = str(image_dir / "noise.png")
    rc = cli_main(["generate", "--model", str(saved_tiny), "--image", img, "--policy", "full", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    printed = [int(t) for t in next(x for x in out.splitlines() if x.startswith("answer:")).split(":", 2)[2].split()]
    assert "random weights" not in out  # weights were loaded, not drawn

    loaded = load_model(str(saved_tiny), device=torch.device("cpu"), dtype=torch.float32)
    prepared = prepare_inputs(loaded, load_image(img), "Describe this image.")
    ids = prepared.inputs["input_ids"][0]
    assert int((ids == 290).sum()) == (224 // 14) ** 2 // 4  # 16 x 16 patches, merged 2 x 2
    with torch.no_grad():
        ref = loaded.model.generate(**prepared.inputs, max_new_tokens=5, do_sample=False)
    assert printed == ref[0, ids.numel() :].tolist()


def test_generate_text_model(capsys, saved_text):
    rc = cli_main(
        ["generate", "--model", str(saved_text), "--prompt", "hello", "--policy", "full", "--max-new-tokens", "3"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _summary(out)["model"] == "qwen2"


@needs_cache
@pytest.mark.parametrize("policy", ["snapkv", "adakv"])
def test_generate_compressed(capsys, image_dir, policy):
    argv = ["generate", "--image", str(image_dir / "tiles.png"), "--policy", policy, "--mix", "--budget", "40"]
    rc = cli_main([*argv, "--window", "8", "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    s = _summary(out.out)
    assert s["cache"] == f"{policy}+mixkv"
    ratio = float(out.out.rsplit("(", 1)[1].split("%")[0])
    assert 0.0 < ratio < 100.0


# ------------------------------------------------------------------------------------------------------ profile


def _redundancy_f64(x: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity over distinct pairs (brute force), float64 [H]."""
    u = x[0].double() / x[0].double().norm(dim=-1, keepdim=True)
    n = u.shape[1]
    gram = u @ u.transpose(-1, -2)
    off = (gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    return off.clamp(0.0, 1.0)


def test_profile_writes_published_formats(capsys, image_dir, tmp_path):
    red = tmp_path / "out" / "redundancy.json"
    vis = tmp_path / "out" / "visual.json"
    argv = ["profile", "--images", str(image_dir), "--out", str(red), "--visual-heads", str(vis)]
    rc = cli_main([*argv, "--image-size", "112", "--answer-tokens", "2", "--no-plot"])
    assert rc == 0, capsys.readouterr().err
    table = json.loads(red.read_text())
    layers, kv_heads, q_heads = 4, 2, 4
    expected = {f"{li}-{h}-{kind}" for li in range(layers) for h in range(kv_heads) for kind in ("key", "value")}
    assert set(table) == expected
    assert all(len(v) == 2 and all(0.0 <= x <= 1.0 for x in v) for v in table.values())
    vt = json.loads(vis.read_text())
    assert set(vt) == {f"{li}-{h}" for li in range(layers) for h in range(q_heads)}
    assert all(len(v) == 2 and all(0.0 <= x <= 1.0 + 1e-6 for x in v) for v in vt.values())
    assert _tables.table_matrix(table, "key").shape == (layers, kv_heads)
    assert _tables.table_matrix(vt).shape == (layers, q_heads)


def test_profile_values_against_reference(image_dir):
    """The key/value redundancy of a sample equals a brute-force pairwise cosine mean of its prefill cache."""
    from transformers import DynamicCache

    from mixkv.tools._models import load_image, load_model, prepare_inputs
    from mixkv.tools.profile import measure_redundancy

    loaded = load_model(None, device=torch.device("cpu"), dtype=torch.float32)
    prepared = prepare_inputs(loaded, load_image(image_dir / "tiles.png"), "a prompt", image_size=112)
    k, v = measure_redundancy(loaded, prepared)
    cache = DynamicCache(config=loaded.model.config)
    with torch.no_grad():
        loaded.model(**prepared.inputs, **cache_kwargs(loaded.model, cache), use_cache=True)
    for li, layer in enumerate(cache.layers):
        torch.testing.assert_close(k[li].double(), _redundancy_f64(layer.keys), atol=1e-4, rtol=0)
        torch.testing.assert_close(v[li].double(), _redundancy_f64(layer.values), atol=1e-4, rtol=0)


def test_visual_heads_score_is_image_attention_mass(image_dir):
    """Per query head: the eager attention mass of the answer rows on image positions, recomputed here."""
    from mixkv.tools._models import load_image, load_model, prepare_inputs
    from mixkv.tools.profile import measure_visual_heads

    loaded = load_model(None, device=torch.device("cpu"), dtype=torch.float32, attn_implementation="eager")
    prepared = prepare_inputs(loaded, load_image(image_dir / "noise.png"), "a prompt", image_size=112)
    scores = measure_visual_heads(loaded, prepared, answer_tokens=0)
    mask = prepared.image_mask
    last = int(torch.nonzero(mask).max())
    with torch.no_grad():
        out = loaded.model(**prepared.inputs, output_attentions=True, use_cache=False)
    for li, att in enumerate(out.attentions):
        ref = att[0, :, last + 1 :, :][..., mask].sum(-1).mean(-1)
        torch.testing.assert_close(scores[li], ref.float(), atol=1e-5, rtol=0)


def test_redundancy_torch_padding_and_bounds():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8)
    r = _tables.redundancy_torch(x, torch.tensor([9, 5]))
    torch.testing.assert_close(r[0].double(), _redundancy_f64(x[:1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(r[1].double(), _redundancy_f64(x[1:, :, 4:]), atol=1e-5, rtol=0)
    same = torch.ones(1, 2, 6, 4)
    assert torch.allclose(_tables.redundancy_torch(same), torch.ones(1, 2))


@needs_cache
def test_profile_table_loads_into_cache(capsys, image_dir, tmp_path):
    red = tmp_path / "r.json"
    vis = tmp_path / "v.json"
    argv = ["profile", "--images", str(image_dir), "--out", str(red), "--visual-heads", str(vis), "--limit", "1"]
    assert cli_main([*argv, "--image-size", "112", "--answer-tokens", "1", "--no-plot"]) == 0
    capsys.readouterr()
    for args in (
        ["--policy", "snapkv", "--redundancy-table", str(red)],
        ["--policy", "sparsemm", "--sparsemm-table", str(vis)],
    ):
        rc = cli_main(
            ["generate", "--image", str(image_dir / "tiles.png"), "--mix", "--budget", "40", "--window", "8", *args]
        )
        assert rc == 0, capsys.readouterr().err


@needs_cache
def test_tables_loaders_read_profile_output(image_dir, tmp_path):
    tables = pytest.importorskip("mixkv.tables")
    red = tmp_path / "r.json"
    vis = tmp_path / "v.json"
    argv = ["profile", "--images", str(image_dir), "--out", str(red), "--visual-heads", str(vis), "--limit", "1"]
    assert cli_main([*argv, "--image-size", "112", "--answer-tokens", "1", "--no-plot"]) == 0
    names = [n for n in dir(tables) if n.startswith("load")]
    assert names, "mixkv.tables exposes no loader"


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_generate_other_families_without_processor(capsys, tmp_path, family):
    """Synthetic inputs for LLaVA-NeXT and InternVL: generate runs and counts the image tokens right."""
    from transformers import InternVLForConditionalGeneration, LlavaNextForConditionalGeneration

    from models import internvl_config, llava_next_config

    torch.manual_seed(3)
    if family == "llava_next":
        model = LlavaNextForConditionalGeneration(llava_next_config(num_layers=2))
    else:
        model = InternVLForConditionalGeneration(internvl_config(num_layers=2, image_size=28))
    model.save_pretrained(tmp_path / "m")
    synthetic_image("tiles", 56).save(tmp_path / "i.png")
    argv = ["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "i.png"), "--policy", "full"]
    rc = cli_main([*argv, "--max-new-tokens", "3", "--image-size", "56"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert _summary(out.out)["model"] == family
