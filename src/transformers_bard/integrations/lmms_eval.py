"""lmms-eval integration: the models' manifests and the digits task as lmms-eval tasks (issue 12).

The `lmms_eval.models` entry point is `transformers_bard_lmms_eval:model_manifests` (re-exported here): lmms-eval loads
every such entry point on each `import lmms_eval.models`, and a target inside this package would import torch and
transformers through the package's `__init__`. This module imports only the standard library at the top. The adapters
themselves live in `lmms_eval_models` and are imported by lmms-eval only when one of their names is requested.

Models (`pip install "transformers-bard[lmms]"`):
- `bard_vl` (alias `transformers_bard`): a BARD-VL checkpoint with block-diffusion `generate`;
- `bard_vl_ar`: the autoregressive source of the same family with stock `generate`, through the same prompts.
Each has a chat implementation (the default) and a simple one (`--force_simple`).

Tasks: `write_digits_tasks()` materialises the digits task (`transformers_bard.demo.digits`) as an lmms-eval task
folder for `--include_path`: a group `bard_digits` with one subtask `bard_digits_<type>` per entry of
`QUESTION_TYPES` (exact match after whitespace normalisation, the demo's `score_answer`). Everything is built
locally from the packaged UCI digits, so the run is offline:

    lmms-eval --model bard_vl --model_args pretrained=PATH --tasks bard_digits \\
        --include_path "$(python -c 'from transformers_bard.integrations.lmms_eval import write_digits_tasks as w; print(w())')"
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# the entry point itself lives outside the package so that loading it imports neither torch nor transformers
from transformers_bard_lmms_eval import model_manifests

__all__ = [
    "DIGITS_GROUP",
    "lmms_eval_command",
    "digits_doc_to_target",
    "digits_doc_to_text",
    "digits_doc_to_visual",
    "digits_process_results",
    "digits_task_names",
    "model_manifests",
    "write_digits_tasks",
]

DIGITS_GROUP = "bard_digits"
# Bump when the generated YAML or data layout changes, so cached task folders are rebuilt.
_TASK_FORMAT = 1


# ---------------------------------------------------------------------------------------------- digits task
def digits_task_names(question_types=None) -> list[str]:
    """Subtask names, one per question type (default: the current `QUESTION_TYPES` of the digits task)."""
    if question_types is None:
        from ..demo.digits import QUESTION_TYPES as question_types
    return [f"{DIGITS_GROUP}_{name}" for name in question_types]


def _user_text(doc) -> str:
    # The question is the text block of the first user turn (build_digits_dataset's layout).
    user = next(message for message in doc["messages"] if message["role"] == "user")
    return "".join(block["text"] for block in user["content"] if block["type"] == "text")


def digits_doc_to_visual(doc) -> list:
    """The grid image(s) of a row, as RGB PIL images."""
    return [image.convert("RGB") for image in doc["images"]]


def digits_doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    """The question, exactly as the demo prompts it (no pre- or post-prompt)."""
    del lmms_eval_specific_kwargs
    return _user_text(doc)


def digits_doc_to_target(doc) -> str:
    """The reference answer: the text of the last assistant turn."""
    return doc["messages"][-1]["content"][-1]["text"]


def digits_process_results(doc, results) -> dict:
    """`exact_match` (0 or 1) of the model's answer, scored as the demo scores it (`score_answer`)."""
    from ..demo.digits import score_answer

    return {"exact_match": float(score_answer(results[0], digits_doc_to_target(doc)))}


def _subtask_yaml(task: str, data_dir: Path, split: str, max_new_tokens: int) -> str:
    functions = "transformers_bard.integrations.lmms_eval"
    return "\n".join(
        [
            f"task: {task}",
            f"dataset_path: {json.dumps(str(data_dir))}",
            "dataset_kwargs:",
            "  load_from_disk: true",
            f"test_split: {split}",
            "output_type: generate_until",
            f"doc_to_visual: !function {functions}.digits_doc_to_visual",
            f"doc_to_text: !function {functions}.digits_doc_to_text",
            f"doc_to_target: !function {functions}.digits_doc_to_target",
            f"process_results: !function {functions}.digits_process_results",
            "generation_kwargs:",
            f"  max_new_tokens: {max_new_tokens}",
            "  temperature: 0",
            "  do_sample: false",
            # No stop string: answers are single lines and end with EOS.
            "  until: []",
            "metric_list:",
            "  - metric: exact_match",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            f"  version: {_TASK_FORMAT}",
            "",
        ]
    )


def _group_yaml(tasks: list[str]) -> str:
    lines = [f"group: {DIGITS_GROUP}", "task:"] + [f"  - {task}" for task in tasks]
    lines += [
        "aggregate_metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        # Weighted by subtask size: the group score is the exact match over all samples, as the demo reports it.
        "    weight_by_size: true",
        "metadata:",
        f"  version: {_TASK_FORMAT}",
        "",
    ]
    return "\n".join(lines)


def write_digits_tasks(
    output_dir: str | os.PathLike | None = None,
    num_samples: int | None = None,
    seed: int | None = None,
    split: str = "test",
    max_new_tokens: int | None = None,
    **dataset_kwargs,
) -> Path:
    """Write the digits task as an lmms-eval task folder and return its path (for `--include_path`).

    The rows are `build_digits_dataset(split, num_samples, seed=seed, balanced=True, **dataset_kwargs)`: by default
    the demo pipeline's test set and budget (`PipelineConfig`'s `eval_samples`, `seed`, `max_new_tokens`). They are
    saved with `save_to_disk` as one
    split per question type, and one YAML per type present (in `QUESTION_TYPES` order) plus the group `bard_digits`
    point at them. The subtasks therefore follow `QUESTION_TYPES` and the dataset builder as they change.

    Args:
        output_dir: the folder to write. Default: a folder under `~/.cache/transformers_bard/lmms_eval_tasks` named
            after the arguments, reused when it already holds the same task (rebuilt otherwise).
        num_samples, seed, split: as in `build_digits_dataset` (defaults: the demo pipeline's).
        max_new_tokens: the tasks' generation budget (lmms-eval `generation_kwargs`; default: the demo pipeline's).
        dataset_kwargs: further `build_digits_dataset` arguments (JSON-serialisable); `balanced=True` unless given,
            as the pipeline builds its test set.
    """
    from ..demo.digits import QUESTION_TYPES, build_digits_dataset
    from ..demo.pipeline import PipelineConfig

    demo = PipelineConfig()
    num_samples = demo.eval_samples if num_samples is None else num_samples
    seed = demo.seed if seed is None else seed
    max_new_tokens = demo.max_new_tokens if max_new_tokens is None else max_new_tokens
    # The pipeline's test set takes the question types in turn (`balanced`): the same count per subtask.
    dataset_kwargs = {"balanced": True, **dataset_kwargs}
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
    spec = dict(
        format=_TASK_FORMAT, num_samples=num_samples, seed=seed, split=split, max_new_tokens=max_new_tokens,
        question_types=list(QUESTION_TYPES), dataset_kwargs=dataset_kwargs,
    )
    try:
        spec = json.loads(json.dumps(spec))
    except TypeError as error:
        raise ValueError(f"`dataset_kwargs` must be JSON-serialisable (they name the cached folder), got "
                         f"{dataset_kwargs!r}.") from error
    if output_dir is None:
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transformers_bard" / "lmms_eval_tasks"
        output_dir = root / f"digits_{split}_{num_samples}_{seed}_{digest}"
    output_dir = Path(output_dir).expanduser().resolve()
    spec_file = output_dir / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()) and not spec_file.is_file():
        raise FileExistsError(
            f"`output_dir`={str(output_dir)!r} is a non-empty folder that was not written by write_digits_tasks; "
            "pass an empty or new folder (lmms-eval reads every YAML under --include_path)."
        )

    # Checks the arguments (raises ValueError naming them) before anything is written.
    dataset = build_digits_dataset(split, num_samples, seed=seed, **dataset_kwargs)
    from datasets import DatasetDict

    # One split per question type present; a type without rows gets no subtask (lmms-eval cannot score 0 docs).
    present = [name for name in QUESTION_TYPES if name in set(dataset["question_type"])]
    splits = DatasetDict(
        {name: dataset.filter(lambda kind, name=name: kind == name, input_columns="question_type") for name in present}
    )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then swap it in: a concurrent run never sees a half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        data_dir = output_dir / "data"
        splits.save_to_disk(staging / "data")
        tasks = digits_task_names(present)
        for name, task in zip(present, tasks):
            (staging / f"{task}.yaml").write_text(_subtask_yaml(task, data_dir, name, max_new_tokens))
        (staging / f"{DIGITS_GROUP}.yaml").write_text(_group_yaml(tasks))
        (staging / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def lmms_eval_command(
    pretrained: str,
    tasks: str = DIGITS_GROUP,
    autoregressive: bool = False,
    model_args: str = "",
    extra_args=(),
    python: str = "python",
) -> list[str]:
    """The lmms-eval command line for a checkpoint (what `transformers-bard eval` runs).

    `--model bard_vl` (or `bard_vl_ar` with `autoregressive`), `--model_args pretrained=...[,model_args]`, `--tasks`;
    when a task of the digits group is requested, the digits task folder is written (`write_digits_tasks()`, demo
    defaults) and passed as `--include_path`. `extra_args` are appended unchanged (e.g. `--batch_size 16
    --output_path out --log_samples`).
    """
    if not tasks:
        raise ValueError("`tasks` must name at least one lmms-eval task, e.g. 'bard_digits' or 'mme'.")
    model_args = ",".join(part for part in (f"pretrained={pretrained}", model_args) if part)
    command = [python, "-m", "lmms_eval", "--model", "bard_vl_ar" if autoregressive else "bard_vl",
               "--model_args", model_args, "--tasks", tasks]
    if any(task.strip().startswith(DIGITS_GROUP) for task in tasks.split(",")) and "--include_path" not in extra_args:
        command += ["--include_path", str(write_digits_tasks())]
    return command + list(extra_args)
