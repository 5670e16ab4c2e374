"""More than one process: `accelerate launch` with 2 CPU processes (gloo) trains exactly like 1 process.

2 processes x per-device batch 2 must give the same logged losses and the same updated weights as 1 process x batch 4:
the losses are normalised by the items of the whole optimizer step across ranks (samples for PBM, DESIGN 3.4; masked
tokens for SWD, DESIGN 3.6) and each sample's noise is seeded by its dataset index, not by the batch it lands in.
Every run uses SGD without clipping: the update is proportional to the gradient, so a normalisation error shows.
"""

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from trl import ModelConfig, ScriptArguments, TrlParser

from conftest import EXAMPLES, accelerate_available, accelerate_launch, load_example_script, tiny_chat_rows
from transformers_bard.trainer.block_merge_config import BlockMergeConfig
from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not accelerate_available(), reason="no accelerate"),
]

LM_PARAM = "model.language_model.layers.0.self_attn.q_proj.weight"
SGD = [
    "--optim",
    "sgd",
    "--learning_rate",
    "0.5",
    "--vision_learning_rate",
    "0.5",
    "--lr_scheduler_type",
    "constant",
    "--max_grad_norm",
    "0",
    "--max_warmup_steps",
    "0",
    "--disable_tqdm",
    "true",
]


def write_dataset(tmp_path, num_rows: int = 8):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    Dataset.from_list(tiny_chat_rows(num_rows)).to_parquet(str(data_dir / "train.parquet"))
    return data_dir


def logged(stage_dir, keys=("loss",)) -> list[float]:
    """The logged values of `keys` at every logging step, flattened in step order."""
    history = json.loads((stage_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if "loss" in entry for key in keys]


def assert_same_weights(expected_dir, got_dir, initial_dir):
    expected = load_file(str(expected_dir / "model.safetensors"))
    got = load_file(str(got_dir / "model.safetensors"))
    initial = load_file(str(initial_dir / "model.safetensors"))
    assert not torch.allclose(expected[LM_PARAM], initial[LM_PARAM])  # the runs did update the weights
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6, msg=key)


def test_block_merge_two_processes_equal_one_process(tiny_bard_vl_dir, tmp_path):
    """DDP, the fused LM head (TRL's, computed inside the forward as DDP needs)."""
    common = [
        "--config",
        str(EXAMPLES / "configs" / "block_merge_tiny.yaml"),
        "--model_name_or_path",
        str(tiny_bard_vl_dir),
        "--dataset_name",
        str(write_dataset(tmp_path)),
        "--block_sizes",
        "4",
        "--stage_steps",
        "2",
        "--use_fused_lm_head",
        "true",
        *SGD,
    ]
    one = tmp_path / "one"
    parser = TrlParser((ScriptArguments, BlockMergeConfig, ModelConfig))
    load_example_script("block_merge").main(
        *parser.parse_args_and_config(common + ["--output_dir", str(one), "--per_device_train_batch_size", "4"])
    )
    two = tmp_path / "two"
    result = accelerate_launch(
        "multi_cpu", "block_merge", common + ["--output_dir", str(two), "--per_device_train_batch_size", "2"]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    assert len(logged(one / "stage-b4")) == 2
    assert logged(two / "stage-b4") == pytest.approx(logged(one / "stage-b4"), rel=1e-5)
    assert_same_weights(one / "stage-b4", two / "stage-b4", tiny_bard_vl_dir)


def test_diffusion_distill_two_processes_equal_one_process(tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, tmp_path):
    """DDP, the teacher placed by accelerate on each rank; the masked tokens of the step are counted over both."""
    common = [
        "--config",
        str(EXAMPLES / "configs" / "distill_tiny.yaml"),
        "--model_name_or_path",
        str(tiny_bard_vl_b8_dir),
        "--teacher_model_name_or_path",
        str(tiny_bard_vl_teacher_dir),
        "--dataset_name",
        str(write_dataset(tmp_path)),
        "--max_steps",
        "2",
        *SGD,
    ]
    one = tmp_path / "one"
    parser = TrlParser((ScriptArguments, DiffusionDistillConfig, ModelConfig))
    load_example_script("diffusion_distill").main(
        *parser.parse_args_and_config(common + ["--output_dir", str(one), "--per_device_train_batch_size", "4"])
    )
    two = tmp_path / "two"
    result = accelerate_launch(
        "multi_cpu", "diffusion_distill", common + ["--output_dir", str(two), "--per_device_train_batch_size", "2"]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    keys = ("loss", "ce", "kd")
    assert len(logged(one / "stage-b8", keys)) == 2 * len(keys)
    assert logged(two / "stage-b8", keys) == pytest.approx(logged(one / "stage-b8", keys), rel=1e-5)
    assert_same_weights(one / "stage-b8", two / "stage-b8", tiny_bard_vl_b8_dir)


def test_fsdp2_sharded_step_equals_one_process(tiny_bard_vl_dir, tiny_bard_vl_teacher_dir, tmp_path):
    """FSDP2 (`fully_shard`, accelerate's TRANSFORMER_BASED_WRAP units) on 2 gloo processes vs 1 unsharded process,
    the same 4 samples (see tests/fsdp2_step.py): equal losses for the selective head and TRL's fused head (which
    gathers the sharded LM-head weight), equal gradient norms, equal weights after one SGD step, equal top-k targets
    of the sharded teacher, and a complete unsharded checkpoint that loads with the Auto classes."""
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText

    from conftest import REPO, free_port, offline_env

    worker = str(REPO / "tests" / "fsdp2_step.py")
    folders = {"one": tmp_path / "one", "two": tmp_path / "two"}
    for folder in folders.values():
        folder.mkdir()
    paths = [str(tiny_bard_vl_dir), str(tiny_bard_vl_teacher_dir)]
    commands = {
        "one": [sys.executable, worker, *paths, str(folders["one"])],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            worker,
            *paths,
            str(folders["two"]),
        ],
    }
    for name, command in commands.items():
        result = subprocess.run(command, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, name + result.stdout[-3000:] + result.stderr[-6000:]

    one = json.loads((folders["one"] / "rank0.json").read_text())
    ranks = [json.loads((folders["two"] / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for key in ("loss_selective", "loss_fused"):  # each rank's loss is its share of sum_s L_s / 4
        assert sum(rank[key] for rank in ranks) == pytest.approx(one[key], rel=1e-5), key
    assert one["loss_fused"] == pytest.approx(one["loss_selective"], rel=1e-5)
    for key in ("grad_norm", "grad_norm_fused"):
        assert ranks[0][key] == ranks[1][key] == pytest.approx(one[key], rel=1e-5), key
    sharded_topk = torch.tensor(ranks[0]["teacher_topk"] + ranks[1]["teacher_topk"])
    torch.testing.assert_close(sharded_topk, torch.tensor(one["teacher_topk"]), rtol=1e-5, atol=1e-5)
    assert_same_weights(folders["one"], folders["two"], tiny_bard_vl_dir)
    config = json.loads((folders["two"] / "config.json").read_text())
    assert config["architectures"] == ["BardVLForConditionalGeneration"]
    loaded = AutoModelForImageTextToText.from_pretrained(folders["two"])
    assert type(loaded).__name__ == "BardVLForConditionalGeneration"


def test_fsdp_config_on_cpu_is_refused(tiny_bard_vl_dir, tmp_path):
    """accelerate enables FSDP only on GPUs: `accelerate launch --config_file fsdp2.yaml` on CPU would train replicated
    (DDP) without a word, so the trainer refuses it and names the CPU alternative."""
    arguments = [
        "--config",
        str(EXAMPLES / "configs" / "block_merge_tiny.yaml"),
        "--model_name_or_path",
        str(tiny_bard_vl_dir),
        "--dataset_name",
        str(write_dataset(tmp_path, 4)),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    result = accelerate_launch(
        "fsdp2", "block_merge", arguments, launch_arguments=["--num_processes", "2", "--mixed_precision", "no"]
    )
    assert result.returncode != 0
    assert "The accelerate config asks for FSDP, but accelerate runs MULTI_CPU on cpu" in result.stderr
    assert "multi_cpu.yaml" in result.stderr
    assert not (tmp_path / "out" / "stage-b4").exists()
