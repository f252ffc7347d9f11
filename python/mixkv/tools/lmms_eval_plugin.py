"""lmms-eval integration: a model ``mixkv`` that evaluates any supported model with a compressed KV cache.

lmms-eval is imported lazily: this module imports without it, and the registered class
(``MixKV``, a subclass of ``lmms_eval.api.model.lmms``) is built on first access.

Use (see docs/tools.md): with mixkv installed, its ``lmms_eval.models`` entry point (``manifests``)
makes the model known to lmms-eval's own command::

    python -m lmms_eval --model mixkv \
        --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,policy=adakv,mix=true,budget=64 --tasks textvqa_val

From a source tree, ``python -m mixkv.tools.lmms_eval_plugin`` takes the same arguments and registers
the model first; a launcher of your own can call ``register()``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from mixkv._compat import cache_kwargs
from mixkv.tools._cache import MIX_VARIANTS, CacheSpec, check_spec, make_cache
from mixkv.tools._models import (
    LoadedModel,
    Prepared,
    ToolError,
    _text_ids,
    load_model,
    parse_device,
    parse_dtype,
    prepare_inputs,
)

MODEL_NAME = "mixkv"
# what loglikelihood reports: "loss" = mean negative log-likelihood per continuation token (what
# lmms-eval 0.7's own models return, and what its multiple_choice scoring ranks, lowest first);
# "logprob" = the summed log-probability (the lm-evaluation-harness convention, highest first)
SCORES: tuple[str, ...] = ("loss", "logprob")
ALIASES: tuple[str, ...] = ("mixkv_qwen2_vl", "mixkv_llava_next", "mixkv_internvl")


def _as_bool_or_variant(value: object) -> bool | str:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", "none", ""):
        return False
    if text in MIX_VARIANTS:
        return text
    raise ValueError(f"mix must be true, false or one of {', '.join(MIX_VARIANTS)}, got {value!r}")


def _flatten(items: object) -> list[Any]:
    if items is None:
        return []
    if isinstance(items, (list, tuple)):
        out: list[Any] = []
        for item in items:
            out += _flatten(item)
        return out
    return [items]


class MixKVEvalModel:
    """The evaluation logic, independent of lmms-eval (mixed into its ``lmms`` base class by ``MixKV``).

    model_args: pretrained (directory or id; default the tiny packaged configuration), policy (snapkv,
    pyramidkv, adakv, sparsemm or full), mix (true/false or a variant), budget, window, sparsemm_table,
    redundancy_table, device, dtype, max_new_tokens, image_size (inputs built without a processor),
    score (what ``loglikelihood`` reports, see there).
    """

    is_simple: bool = True

    def __init__(
        self,
        pretrained: str | None = None,
        policy: str = "snapkv",
        mix: object = False,
        budget: int | str = 64,
        window: int | str = 32,
        sparsemm_table: str | None = None,
        redundancy_table: str | None = None,
        device: str | None = None,
        dtype: str = "bfloat16",
        max_new_tokens: int | str = 128,
        image_size: int | str = 448,
        batch_size: int | str = 1,
        score: str = "loss",
        **unused: object,
    ) -> None:
        super().__init__()
        if int(batch_size) != 1:
            raise ValueError(f"batch_size must be 1 (each request gets its own cache), got {batch_size}")
        if str(score) not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        self.score = str(score)
        self.spec = CacheSpec(
            policy=None if str(policy) == "full" else str(policy),
            mix=_as_bool_or_variant(mix),
            budget=int(budget),
            window=int(window),
            sparsemm_table=sparsemm_table,
            redundancy_table=redundancy_table,
        )
        if self.spec.policy == "sparsemm" and sparsemm_table is None:
            raise ValueError("policy=sparsemm needs sparsemm_table=<visual-head JSON> (see `mixkv profile`)")
        try:
            check_spec(self.spec)
            dev = parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.loaded: LoadedModel = load_model(pretrained, device=dev, dtype=parse_dtype(str(dtype)))
        except ToolError as exc:
            raise ValueError(str(exc)) from exc
        self.max_new_tokens = int(max_new_tokens)
        self.image_size = int(image_size)
        self.unused_args = sorted(unused)
        if not hasattr(self, "task_dict"):
            self.task_dict: dict[str, Any] = {}
        if not hasattr(self, "_rank"):
            self._rank, self._world_size = 0, 1

    # -- helpers --------------------------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        doc = self.task_dict[task][split][doc_id]
        return [v for v in _flatten(doc_to_visual(doc)) if v is not None]

    def _prepare(self, context: str, visuals: list[Any]) -> Prepared:
        images = [v.convert("RGB") if hasattr(v, "convert") else v for v in visuals]
        image = images[0] if images and self.loaded.is_vision else None
        return prepare_inputs(self.loaded, image, context, image_size=self.image_size)

    def _encode_text(self, text: str) -> list[int]:
        proc = self.loaded.processor
        if proc is not None:
            tok = getattr(proc, "tokenizer", proc)
            return [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
        vocab = int(self.loaded.text_config.vocab_size)
        floor = min([vocab, *(i for i in (self.loaded.image_token_id,) if i is not None)])
        return _text_ids(text, floor)

    def _decode(self, ids: torch.Tensor) -> str:
        proc = self.loaded.processor
        if proc is not None:
            return str(getattr(proc, "tokenizer", proc).decode(ids.tolist(), skip_special_tokens=True))
        return " ".join(str(int(i)) for i in ids.tolist())

    # -- lmms interface -------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers: list[str] = []
        model = self.loaded.model
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            prepared = self._prepare(context, self._visuals(doc_to_visual, doc_id, task, split))
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            sample: dict[str, Any] = {"do_sample": False}
            if temperature > 0:
                sample = {"do_sample": True, "temperature": temperature}
                if kwargs.get("top_p") is not None:
                    sample["top_p"] = float(kwargs["top_p"])
            max_new = int(kwargs.pop("max_new_tokens", self.max_new_tokens) or self.max_new_tokens)
            with torch.no_grad():
                out = model.generate(
                    **prepared.inputs,
                    **cache_kwargs(model, make_cache(model, self.spec)),
                    max_new_tokens=max_new,
                    **sample,
                )
            text = self._decode(out[0, prepared.prompt_length :])
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            answers.append(text)
        return answers

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """(score, is_greedy) of each continuation given its context; the context is prefilled (and
        compressed), the continuation decoded through the cache. score: the mean negative log-likelihood
        per continuation token (``score=loss``, lmms-eval's convention: lower is likelier) or the summed
        log-probability (``score=logprob``)."""
        results: list[tuple[float, bool]] = []
        model = self.loaded.model
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            continuation = doc_to_target
            if callable(doc_to_target):
                continuation = doc_to_target(self.task_dict[task][split][doc_id])
            prepared = self._prepare(context, self._visuals(doc_to_visual, doc_id, task, split))
            target = self._encode_text(str(continuation))
            if not target:
                results.append((0.0, True))
                continue
            cache = make_cache(model, self.spec)
            device = prepared.inputs["input_ids"].device
            with torch.no_grad():
                first = model(**prepared.inputs, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:]
                logits = [first]
                if len(target) > 1:
                    ids = torch.tensor([target[:-1]], device=device)
                    logits.append(model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits)
            all_logits = torch.cat(logits, dim=1)[0].float()  # [T, V]
            tgt = torch.tensor(target, device=all_logits.device)
            logp = torch.log_softmax(all_logits.double(), -1).gather(-1, tgt.view(-1, 1)).sum()
            greedy = bool((all_logits.argmax(-1) == tgt).all())
            results.append((float(logp) if self.score == "logprob" else -float(logp) / len(target), greedy))
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the mixkv model does not implement multi-round generation")


_CLASS: type | None = None


def _lmms_base() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError as exc:
        raise ImportError(
            "lmms-eval is not installed (pip install lmms-eval); the mixkv evaluation model needs its base class"
        ) from exc
    return lmms


def _score_carrier() -> Callable[[tuple[float, bool]], Any] | None:
    """How to hand a ``(logprob, is_greedy)`` pair to the installed lmms-eval's evaluator intact.

    lmms-eval 0.7.3 passes every model response through ``unwrap_generation_output``, which keeps
    strings and ``GenerationResult``s but turns any other value into its ``str``; a multiple_choice
    task then fails unpacking the string. A ``GenerationResult`` whose ``text`` is the pair comes
    through unchanged. None (return the pairs as they are) when the evaluator keeps a plain pair.
    """
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return None
    probe = (-1.5, True)
    if unwrap_generation_output(probe)[0] == probe:
        return None
    if unwrap_generation_output(GenerationResult(text=probe))[0] is not probe:  # type: ignore[arg-type]
        return None
    return lambda pair: GenerationResult(text=pair)  # type: ignore[arg-type]


def _lmms_loglikelihood(carrier: Callable[[tuple[float, bool]], Any]) -> Callable[..., list[Any]]:
    def loglikelihood(self: MixKVEvalModel, requests: list[Any]) -> list[Any]:
        return [carrier(pair) for pair in MixKVEvalModel.loglikelihood(self, requests)]

    loglikelihood.__doc__ = MixKVEvalModel.loglikelihood.__doc__
    return loglikelihood


def lmms_class(base: type | None = None) -> type:
    """The lmms-eval model class: ``MixKVEvalModel`` on top of ``base`` (default: lmms-eval's ``lmms``)."""
    global _CLASS
    if base is None:
        if _CLASS is None:
            namespace: dict[str, Any] = {"__module__": __name__}
            carrier = _score_carrier()
            if carrier is not None:
                namespace["loglikelihood"] = _lmms_loglikelihood(carrier)
            _CLASS = type("MixKV", (MixKVEvalModel, _lmms_base()), namespace)
        return _CLASS
    return type("MixKV", (MixKVEvalModel, base), {"__module__": __name__})


def __getattr__(name: str) -> Any:
    if name == "MixKV":
        return lmms_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def manifests() -> list[Any]:
    """Model manifests for lmms-eval's ``lmms_eval.models`` entry-point group."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.MixKV", aliases=ALIASES)]


def register() -> None:
    """Make ``--model mixkv`` (and its aliases) resolvable by an installed lmms-eval."""
    try:
        from lmms_eval.models import MODEL_REGISTRY_V2
    except ImportError:  # older lmms-eval: the decorator registry
        from lmms_eval.api.registry import register_model

        register_model(MODEL_NAME, *ALIASES)(lmms_class())
        return
    for manifest in manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)


def main(argv: list[str]) -> int:
    """Run lmms-eval's command line with the mixkv model registered."""
    register()
    from lmms_eval.cli.dispatch import main as lmms_main

    sys.argv = ["lmms-eval", *argv]
    lmms_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
