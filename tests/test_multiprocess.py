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
