"""An offline lmms-eval setup in one directory: a tiny random-weight Qwen2-VL and two synthetic tasks.

    python scripts/lmms_eval_tiny.py DIR

writes
- DIR/model: the packaged tiny Qwen2-VL configuration with random weights (save_pretrained; no processor,
  so mixkv builds the inputs itself and answers are token ids);
- DIR/tasks: ``mixkv_tiny_gen`` (generate_until, exact_match) and ``mixkv_tiny_mc`` (multiple_choice,
  acc) over a JSON-lines file read by the ``datasets`` json loader, with PNG images made here;

and prints the lmms-eval command that evaluates the model with a MixKVCache on both tasks.
The scores are meaningless (random weights); the run checks that the whole evaluation path works.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS: tuple[str, ...] = ("mixkv_tiny_gen", "mixkv_tiny_mc")

_UTILS = '''"""Document hooks of the mixkv tiny tasks."""

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    with Image.open(HERE / doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return list(doc["choices"])
'''

_GEN_YAML = """task: mixkv_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until:
    - "\\n"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

_MC_YAML = """task: mixkv_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_model(directory: Path, seed: int = 0) -> Path:
    """The packaged tiny Qwen2-VL configuration with random weights, saved with save_pretrained."""
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from mixkv.tools._models import packaged_config_dir

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(packaged_config_dir("tiny")))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def write_tasks(directory: Path, docs: int = 4, image_size: int = 224) -> Path:
    """Task YAMLs, their hooks, a JSON-lines data file and the PNG images it names."""
    from mixkv.tools._models import synthetic_image

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    rows = []
    for i in range(docs):
        kind = ("tiles", "noise")[i % 2]
        name = f"images/{i}_{kind}.png"
        synthetic_image(kind, image_size, seed=i).save(directory / name)
        rows.append(
            {
                "id": i,
                "image": name,
                "question": "Is this picture made of one repeated tile? Answer yes or no.",
                "answer": "yes" if kind == "tiles" else "no",
                "choices": ["yes", "no"],
                "label": 0 if kind == "tiles" else 1,
            }
        )
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "utils.py").write_text(_UTILS)
    (directory / "mixkv_tiny_gen.yaml").write_text(_GEN_YAML.format(data=json.dumps(str(data.resolve()))))
    (directory / "mixkv_tiny_mc.yaml").write_text(_MC_YAML.format(data=json.dumps(str(data.resolve()))))
    return directory


def command(root: Path, model_args: str = "policy=adakv,mix=true,budget=48,window=16", limit: int = 2) -> list[str]:
    """The evaluation command (run with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1)."""
    args = f"pretrained={root / 'model'},{model_args},dtype=float32,device=cpu,image_size=224,max_new_tokens=4"
    return [
        sys.executable,
        "-m",
        "mixkv.tools.lmms_eval_plugin",
        "--model",
        "mixkv",
        "--model_args",
        args,
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        str(root / "tasks"),
        "--limit",
        str(limit),
        "--batch_size",
        "1",
        "--output_path",
        str(root / "results"),
        "--log_samples",
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0]).resolve()
    write_model(root / "model")
    write_tasks(root / "tasks")
    print("HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 " + " ".join(command(root)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
