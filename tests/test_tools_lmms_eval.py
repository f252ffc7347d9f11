"""The lmms-eval model wrapper on a tiny random-weight model (stand-in base class; the real one if installed)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from mixkv.tools import lmms_eval_plugin as plugin
from mixkv.tools._models import synthetic_image


class StandInLmms:
    """The parts of lmms_eval.api.model.lmms the wrapper relies on."""

    def __init__(self) -> None:
        self._rank = 0
        self._world_size = 1
        self.task_dict: dict[str, Any] = {}


@dataclass
class Req:
    arguments: tuple[Any, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def args(self) -> tuple[Any, ...]:
        return self.arguments


TASK = {"toy": {"test": [{"image": synthetic_image("tiles", 112, 0), "q": "what repeats?", "a": "tiles"}]}}


@pytest.fixture(scope="module")
def model() -> Any:
    cls = plugin.lmms_class(StandInLmms)
    m = cls(policy="full", dtype="float32", device="cpu", image_size=112, max_new_tokens=6)
    m.task_dict = TASK
    return m


def _visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"]]


def test_import_is_lazy():
    code = "import sys, mixkv.tools.lmms_eval_plugin as p; assert 'lmms_eval' not in sys.modules; print(p.MODEL_NAME)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "mixkv", out.stderr


def test_model_args_are_parsed_and_checked():
    cls = plugin.lmms_class(StandInLmms)
    m = cls(policy="adakv", mix="true", budget="96", window="16", dtype="float32", device="cpu")
    assert m.spec.policy == "adakv" and m.spec.mix is True and m.spec.budget == 96 and m.spec.window == 16
    assert cls(policy="snapkv", mix="keydiff", dtype="float32", device="cpu").spec.mix == "keydiff"
    with pytest.raises(ValueError, match="budget"):
        cls(budget="0", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="policy"):
        cls(policy="streaming", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="mix"):
        cls(mix="sometimes", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="sparsemm_table"):
        cls(policy="sparsemm", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="score"):
        cls(score="perplexity", dtype="float32", device="cpu")
    assert cls(dtype="float32", device="cpu").score == "loss"


def test_generate_until_matches_direct_generate(model):
    req = Req(("what repeats?", {"max_new_tokens": 5, "until": []}, _visual, 0, "toy", "test"))
    (answer,) = model.generate_until([req])
    prepared = model._prepare("what repeats?", [TASK["toy"]["test"][0]["image"]])
    with torch.no_grad():
        ref = model.loaded.model.generate(**prepared.inputs, max_new_tokens=5, do_sample=False)
    assert answer == " ".join(str(i) for i in ref[0, prepared.prompt_length :].tolist())
    stop = answer.split()[1]
    (cut,) = model.generate_until(
        [Req(("what repeats?", {"max_new_tokens": 5, "until": [" " + stop]}, _visual, 0, "toy", "test"))]
    )
    assert cut == answer.split(" " + stop, 1)[0]


@pytest.mark.parametrize("score", ["loss", "logprob"])
def test_loglikelihood_matches_one_forward(model, score):
    req = Req(("what repeats?", lambda doc: doc["a"], _visual, 0, "toy", "test"))
    model.score = score
    try:
        ((value, greedy),) = model.loglikelihood([req])
    finally:
        model.score = "loss"
    prepared = model._prepare("what repeats?", [TASK["toy"]["test"][0]["image"]])
    target = model._encode_text("tiles")
    n = prepared.prompt_length
    inputs = dict(prepared.inputs)
    ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
    inputs["input_ids"] = ids
    inputs["attention_mask"] = torch.ones_like(ids)
    inputs["mm_token_type_ids"] = (ids == 290).int()
    with torch.no_grad():
        logits = model.loaded.model(**inputs, use_cache=False).logits[0, n - 1 : -1].double()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(target).view(-1, 1)).sum()
    expected = float(ref) if score == "logprob" else -float(ref) / len(target)
    assert value == pytest.approx(expected, abs=1e-3)
    assert greedy == bool((logits.argmax(-1) == torch.tensor(target)).all())


def test_multi_round_is_refused(model):
    with pytest.raises(NotImplementedError):
        model.generate_until_multi_round([])


def test_registers_with_installed_lmms_eval():
    pytest.importorskip("lmms_eval.api.model")
    pytest.importorskip("lmms_eval.models")
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    plugin.register()
    for name in (plugin.MODEL_NAME, *plugin.ALIASES):
        cls = get_model(name)
        assert issubclass(cls, lmms) and issubclass(cls, plugin.MixKVEvalModel)
    m = get_model("mixkv").create_from_arg_string("policy=full,dtype=float32,device=cpu,image_size=112")
    m.task_dict = TASK
    (answer,) = m.generate_until([Req(("q", {"max_new_tokens": 2}, _visual, 0, "toy", "test"))])
    assert len(answer.split()) == 2
