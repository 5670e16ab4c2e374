"""lmms-eval integration (issue 12): the entry point, the adapter's arguments, the digits tasks, and real lmms-eval
command-line runs (BARD chat, BARD simple, AR) on a converted digits checkpoint, checked against direct decoding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="the `lmms` extra is not installed")

NUM_SAMPLES = 6
MAX_NEW_TOKENS = 40


# ---------------------------------------------------------------------------------------------- registration
def test_entry_point_resolves_chat_simple_alias_and_ar():
    from lmms_eval.models import get_model

    from transformers_bard.integrations import lmms_eval_models as adapters

    assert get_model("bard_vl") is adapters.BardVLChat
    assert get_model("bard_vl", force_simple=True) is adapters.BardVLSimple
    assert get_model("transformers_bard") is adapters.BardVLChat
    assert get_model("bard_vl_ar") is adapters.BardVLARChat
    assert get_model("bard_vl_ar", force_simple=True) is adapters.BardVLARSimple


def test_integration_module_is_import_light():
    # the digits-task helpers and the manifests import neither lmms-eval's model classes nor the adapters
    code = (
        "import sys; import transformers_bard.integrations.lmms_eval as m; "
        "print('lmms_eval' in sys.modules, 'transformers_bard.integrations.lmms_eval_models' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_entry_point_imports_neither_torch_nor_transformers():
    # lmms-eval loads every `lmms_eval.models` entry point on each `import lmms_eval.models`: ours, loaded the way
    # lmms-eval loads it, must not make every lmms-eval user pay for torch and transformers (it once ran the package's
    # `__init__`, 5 s of imports on this machine)
    code = (
        "import sys; from importlib.metadata import entry_points\n"
        "(ep,) = [ep for ep in entry_points(group='lmms_eval.models') if ep.name == 'bard_vl']\n"
        "names = [m.model_id for m in ep.load()()]\n"
        "loaded = [name for name in ('torch', 'transformers', 'transformers_bard') if name in sys.modules]\n"
        "import lmms_eval.models\n"
        "print(ep.value, names, loaded, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "transformers_bard_lmms_eval:model_manifests ['bard_vl', 'bard_vl_ar'] [] False"


def test_manifests_are_re_exported_by_the_integration_module():
    import transformers_bard_lmms_eval
    from transformers_bard.integrations import lmms_eval

    assert lmms_eval.model_manifests is transformers_bard_lmms_eval.model_manifests


# ---------------------------------------------------------------------------------------------- model_args
def test_model_args_reference_aliases_map_to_ours():
    from transformers_bard.integrations.lmms_eval_models import BardVLEvalArgs

    args = BardVLEvalArgs.from_model_args(
        pretrained="x", confidence_threshold=0.5, denoising_steps=2, remasking_strategy="low_confidence_static",
        device="cpu", max_batch_size=None,
    )
    assert (args.threshold, args.steps_per_block, args.unmasking) == (0.5, 2, "static")
    dynamic = BardVLEvalArgs.from_model_args(pretrained="x", remasking_strategy="low_confidence_dynamic")
    assert dynamic.unmasking == "threshold"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pretrained=""), "pretrained"),
        (dict(pretrained="x", confidence_threshold=0.5, threshold=0.7), "conflict"),
        (dict(pretrained="x", remasking_strategy="random"), "remasking_strategy"),
        (dict(pretrained="x", max_pixels=100), "max_pixels"),
        (dict(pretrained="x", batch_size="auto"), "batch_size"),
        (dict(pretrained="x", dtype="fp8"), "dtype"),
        (dict(pretrained="x", source="y"), "autoregressive"),
        (dict(pretrained="x", verifier="y", autoregressive=True), "verifier"),
    ],
)
def test_model_args_errors_name_the_argument(kwargs, message):
    from transformers_bard.integrations.lmms_eval_models import BardVLEvalArgs

    with pytest.raises(ValueError, match=message):
        BardVLEvalArgs.from_model_args(**kwargs)


# ---------------------------------------------------------------------------------------------- digits tasks
@pytest.fixture(scope="module")
def digits_tasks(tmp_path_factory):
    from transformers_bard.integrations.lmms_eval import write_digits_tasks

    return write_digits_tasks(tmp_path_factory.mktemp("tasks") / "digits", num_samples=NUM_SAMPLES,
                              max_new_tokens=MAX_NEW_TOKENS)


def test_digits_tasks_follow_question_types_and_hold_the_demo_rows(digits_tasks):
    from datasets import load_from_disk

    from transformers_bard.demo.digits import QUESTION_TYPES, build_digits_dataset
    from transformers_bard.integrations.lmms_eval import DIGITS_GROUP, digits_doc_to_text, write_digits_tasks

    rows = build_digits_dataset("test", NUM_SAMPLES, seed=0, balanced=True)
    present = [kind for kind in QUESTION_TYPES if kind in set(rows["question_type"])]
    splits = load_from_disk(str(digits_tasks / "data"))
    assert list(splits) == present
    assert sorted(path.stem for path in digits_tasks.glob("*.yaml")) == sorted(
        [DIGITS_GROUP] + [f"{DIGITS_GROUP}_{kind}" for kind in present]
    )
    # Together the subtasks hold exactly the demo's test rows.
    stored = sorted((digits_doc_to_text(doc), doc["messages"][-1]["content"][-1]["text"]) for s in splits.values()
                    for doc in s)
    expected = sorted((digits_doc_to_text(doc), doc["messages"][-1]["content"][-1]["text"]) for doc in rows)
    assert stored == expected
    # Same arguments: the folder is reused; a foreign non-empty folder is refused.
    assert write_digits_tasks(digits_tasks, num_samples=NUM_SAMPLES, max_new_tokens=MAX_NEW_TOKENS) == digits_tasks
    with pytest.raises(FileExistsError, match="output_dir"):
        write_digits_tasks(digits_tasks / "data", num_samples=NUM_SAMPLES)


# ---------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def converted_digits(tmp_path_factory):
    from transformers_bard import convert_from_autoregressive
    from transformers_bard.demo.digits import load_digits_ar_path

    return convert_from_autoregressive(load_digits_ar_path(), tmp_path_factory.mktemp("bard") / "digits_b4",
                                       block_size=4)


def _lmms_eval(model: str, model_args: str, tasks_dir: Path, output: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", "bard_digits",
        "--include_path", str(tasks_dir), "--output_path", str(output), "--log_samples", *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_run(process: subprocess.Popen, output: Path) -> tuple[dict, dict]:
    log = process.communicate(timeout=600)[0]
    # lmms-eval exits 0 even when the evaluation failed: the results file is the evidence.
    results_files = list(output.glob("*/*_results.json"))
    assert len(results_files) == 1, log[-3000:]
    results = json.loads(results_files[0].read_text())
    samples = {}
    for path in output.glob("*/*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return results, samples


def _answers(samples: dict) -> dict:
    """{(task, doc_id): raw response} over all subtasks."""
    out = {}
    for task, rows in samples.items():
        for row in rows:
            response = row.get("resps", row["filtered_resps"])
            while isinstance(response, list):
                response = response[0]
            out[(task, row["doc_id"])] = response
    return out


def _direct_answers(model, processor, autoregressive: bool) -> dict:
    """The same rows decoded without lmms-eval, as the demo prompts them (batch 1)."""
    import torch

    from transformers_bard.demo.digits import QUESTION_TYPES, build_digits_dataset, prompt_messages

    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    answers, seen = {}, {}
    for row in build_digits_dataset("test", NUM_SAMPLES, seed=0, balanced=True):
        text = processor.apply_chat_template(prompt_messages(row["messages"]), add_generation_prompt=True)
        inputs = processor(images=row["images"], text=[text], return_tensors="pt")
        options = (
            dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
            if autoregressive else {}
        )
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True, **options)
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        ends = [i for i, token in enumerate(new) if token in eos]
        answer = tokenizer.decode(new[: ends[0]] if ends else new, skip_special_tokens=True)
        # A subtask's doc_id counts the rows of its question type in dataset order.
        kind = row["question_type"]
        assert kind in QUESTION_TYPES
        seen[kind] = seen.get(kind, -1) + 1
        answers[(f"bard_digits_{kind}", seen[kind])] = (answer, row["messages"][-1]["content"][-1]["text"])
    return answers


def _check_results(results: dict, samples: dict, direct: dict, autoregressive: bool) -> None:
    from transformers_bard.demo.digits import score_answer

    # Every subtask and the group report exact match; the group is the mean over all samples.
    scores = [row["exact_match"] for rows in samples.values() for row in rows]
    assert len(scores) == NUM_SAMPLES
    assert results["results"]["bard_digits"]["exact_match,none"] == pytest.approx(sum(scores) / len(scores))
    for task, rows in samples.items():
        assert results["results"][task]["exact_match,none"] == pytest.approx(
            sum(row["exact_match"] for row in rows) / len(rows)
        )
    # lmms-eval's answers equal direct decoding of the same prompts, and are scored as the demo scores them.
    answers = _answers(samples)
    assert set(answers) == set(direct)
    for key, (answer, reference) in direct.items():
        assert answers[key].strip() == answer.strip(), key
        row = next(r for r in samples[key[0]] if r["doc_id"] == key[1])
        assert row["exact_match"] == float(score_answer(answer, reference))
    # Efficiency: per-sample token counts and the throughput block from the adapter's log_metrics.
    output_tokens = [row["token_counts"][0]["output_tokens"] for rows in samples.values() for row in rows]
    assert all(count >= 1 for count in output_tokens)
    assert all(row["token_counts"][0]["input_tokens"] > 16 for rows in samples.values() for row in rows)
    assert results["efficiency"]["overall"]["total_output_tokens"] == sum(output_tokens)
    throughput = results["throughput"]
    assert throughput["total_gen_tokens"] == sum(output_tokens)
    assert throughput["avg_speed"] > 0 and throughput["total_elapsed_time"] > 0
    assert throughput["avg_num_forwards"] >= 1
    assert throughput["avg_tokens_per_forward"] == pytest.approx(sum(output_tokens) / throughput["avg_num_forwards"])
    if autoregressive:
        assert throughput["avg_tokens_per_forward"] == 1.0


def test_lmms_eval_runs_bard_and_ar_on_digits(converted_digits, digits_tasks, tmp_path):
    from transformers import AutoModelForImageTextToText

    import transformers_bard  # noqa: F401
    from transformers_bard import BardVLProcessor
    from transformers_bard.demo.digits import load_digits_ar_path

    # Four lmms-eval command lines at once (separate processes: lmms-eval patches global state on import).
    bard_args = f"pretrained={converted_digits},device=cpu"
    runs = {
        "bard": _lmms_eval("bard_vl", bard_args, digits_tasks, tmp_path / "bard", "--batch_size", "4"),
        "simple": _lmms_eval("transformers_bard", bard_args, digits_tasks, tmp_path / "simple", "--force_simple"),
        # The AR source is found through the converted checkpoint's `source_model`.
        "ar": _lmms_eval("bard_vl_ar", bard_args, digits_tasks, tmp_path / "ar", "--batch_size", "4"),
        # Verified decoding (DESIGN 4.2 a) with the recorded source as the verifier: the AR model's answers.
        "verified": _lmms_eval("bard_vl", bard_args + ",verifier=source", digits_tasks, tmp_path / "verified",
                               "--batch_size", "4"),
    }
    outputs = {name: _read_run(process, tmp_path / name) for name, process in runs.items()}

    bard = AutoModelForImageTextToText.from_pretrained(converted_digits).eval()
    direct_bard = _direct_answers(bard, BardVLProcessor.from_pretrained(converted_digits), autoregressive=False)
    _check_results(*outputs["bard"], direct_bard, autoregressive=False)
    _check_results(*outputs["simple"], direct_bard, autoregressive=False)
    assert outputs["bard"][0]["throughput"]["avg_tokens_per_forward"] > 1.0  # several tokens per forward

    ar_dir = load_digits_ar_path()
    ar = AutoModelForImageTextToText.from_pretrained(ar_dir).eval()
    direct_ar = _direct_answers(ar, BardVLProcessor.from_pretrained(ar_dir), autoregressive=True)
    _check_results(*outputs["ar"], direct_ar, autoregressive=True)
    _check_results(*outputs["verified"], direct_ar, autoregressive=False)


def test_lmms_eval_command_for_transformers_bard_eval():
    from transformers_bard.integrations.lmms_eval import lmms_eval_command

    command = lmms_eval_command("ckpt", "mme", autoregressive=True, model_args="threshold=0.7",
                                extra_args=["--batch_size", "8"], python="py")
    assert command == ["py", "-m", "lmms_eval", "--model", "bard_vl_ar", "--model_args",
                       "pretrained=ckpt,threshold=0.7", "--tasks", "mme", "--batch_size", "8"]
    # A digits task with the user's own --include_path: nothing is written or added.
    command = lmms_eval_command("ckpt", "bard_digits_read", extra_args=["--include_path", "mine"])
    assert command.count("--include_path") == 1 and command[-1] == "mine" and "bard_vl" in command
    with pytest.raises(ValueError, match="tasks"):
        lmms_eval_command("ckpt", "")
