"""A real lmms-eval run, offline: its command line evaluates a tiny random-weight Qwen2-VL through the
mixkv model (AdaKV + MixKV cache) on two synthetic tasks, and the numbers it records are the wrapper's.

Skipped when lmms-eval is not installed (it is not a dependency of mixkv)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed (pip install lmms-eval): the end-to-end evaluation run needs it",
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MODEL_ARGS = "policy=adakv,mix=true,budget=48,window=16"


def _tiny_module() -> Any:
    spec = importlib.util.spec_from_file_location("lmms_eval_tiny", SCRIPTS / "lmms_eval_tiny.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Req:
    args: tuple[Any, ...]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, str]:
    tiny = _tiny_module()
    root = tmp_path_factory.mktemp("lmms")
    tiny.write_model(root / "model")
    tiny.write_tasks(root / "tasks")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf"))
    import mixkv

    here = str(Path(mixkv.__file__).resolve().parents[1])  # the run must import this mixkv
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        tiny.command(root, MODEL_ARGS), capture_output=True, text=True, env=env, timeout=600, check=False
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "Error during evaluation" not in log, log[-4000:]
    return root, tiny, log


def _only(pattern: str, root: Path) -> Path:
    (path,) = sorted((root / "results").rglob(pattern))
    return path


def _samples(root: Path, task: str) -> list[dict[str, Any]]:
    path = _only(f"*_samples_{task}.jsonl", root)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wrapper(root: Path) -> Any:
    """The same model, built in-process on a stand-in base class, with the run's model_args."""
    from mixkv.tools import lmms_eval_plugin as plugin

    class Base:
        def __init__(self) -> None:
            self.task_dict: dict[str, Any] = {}

    args = dict(kv.split("=", 1) for kv in MODEL_ARGS.split(","))
    cls = plugin.lmms_class(Base)
    return cls(pretrained=str(root / "model"), dtype="float32", device="cpu", image_size=224, **args)


def _docs(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "tasks" / "data.jsonl").read_text().splitlines()]


def _visual(root: Path) -> Any:
    from PIL import Image

    def to_visual(doc: dict[str, Any]) -> list[Any]:
        with Image.open(root / "tasks" / doc["image"]) as im:
            return [im.convert("RGB")]

    return to_visual


def test_results_cover_both_tasks(run):
    root, tiny, log = run
    data = json.loads(_only("*_results.json", root).read_text())
    assert set(data["results"]) == set(tiny.TASKS)
    assert 0.0 <= data["results"]["mixkv_tiny_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= data["results"]["mixkv_tiny_mc"]["acc,none"] <= 1.0
    assert data["n-samples"]["mixkv_tiny_gen"]["effective"] == 2
    assert "policy=adakv" in log and "mix=true" in log


def test_the_cache_compresses_these_prompts(run):
    root, _tiny, _log = run
    model = _wrapper(root)
    doc = _docs(root)[0]
    prepared = model._prepare(doc["question"], _visual(root)(doc))
    assert prepared.prompt_length > 48 * 2, prepared.prompt_length  # budget 48: most tokens are dropped
    assert model.spec.policy == "adakv" and model.spec.mix is True and model.spec.budget == 48


def test_generate_until_answers_are_the_wrappers(run):
    root, _tiny, _log = run
    model = _wrapper(root)
    docs = _docs(root)
    model.task_dict = {"mixkv_tiny_gen": {"test": docs}}
    samples = _samples(root, "mixkv_tiny_gen")
    assert [s["doc_id"] for s in samples] == [0, 1]
    for s in samples:
        doc = docs[s["doc_id"]]
        req = Req(
            (
                doc["question"],
                {"max_new_tokens": 4, "until": ["\n"]},
                _visual(root),
                s["doc_id"],
                "mixkv_tiny_gen",
                "test",
            )
        )
        (answer,) = model.generate_until([req])
        assert s["filtered_resps"] == answer.strip()
        assert len(answer.split()) == 4  # token ids: no processor, so the answer is the ids


def test_multiple_choice_scores_are_the_wrappers_and_ranked_lowest_first(run):
    root, _tiny, _log = run
    model = _wrapper(root)
    docs = _docs(root)
    model.task_dict = {"mixkv_tiny_mc": {"test": docs}}
    for s in _samples(root, "mixkv_tiny_mc"):
        doc = docs[s["doc_id"]]
        reqs = [
            Req((doc["question"], " " + c, _visual(root), s["doc_id"], "mixkv_tiny_mc", "test")) for c in doc["choices"]
        ]
        mine = model.loglikelihood(reqs)
        logged = [(float(v), str(g) == "True") for v, g in s["filtered_resps"]]
        assert [v for v, _ in logged] == pytest.approx([v for v, _ in mine], rel=1e-5)
        assert [g for _, g in logged] == [g for _, g in mine]
        assert all(v > 0 for v, _ in mine)  # mean negative log-likelihood per token
        best = min(range(len(mine)), key=lambda i: mine[i][0])
        assert s["acc"] == float(best == doc["label"])


def _entry_point_declared() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "mixkv" for ep in entry_points(group="lmms_eval.models"))


@pytest.mark.skipif(not _entry_point_declared(), reason="mixkv is not installed with its lmms_eval.models entry point")
def test_plain_lmms_eval_command_finds_the_model(run):
    """``python -m lmms_eval --model mixkv`` (no mixkv launcher): the installed entry point registers it."""
    root, tiny, _log = run
    argv = tiny.command(root, MODEL_ARGS, limit=1)
    argv[1:3] = ["-m", "lmms_eval"]
    out_dir = root / "results_plain"
    argv[argv.index("--output_path") + 1] = str(out_dir)
    argv[argv.index("--tasks") + 1] = "mixkv_tiny_gen"
    import mixkv

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf"))
    here = str(Path(mixkv.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "Error during evaluation" not in log, log[-4000:]
    (path,) = sorted(out_dir.rglob("*_results.json"))
    assert "exact_match,none" in json.loads(path.read_text())["results"]["mixkv_tiny_gen"]
