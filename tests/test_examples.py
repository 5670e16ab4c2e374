"""The example scripts and recipes: the tiny recipe runs end to end; every recipe and accelerate config parses."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from trl import ModelConfig, ScriptArguments, TrlParser

from transformers_bard.trainer.block_merge_config import BlockMergeConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(arguments):
    return TrlParser((ScriptArguments, BlockMergeConfig, ModelConfig)).parse_args_and_config(arguments)


def test_tiny_recipe_runs(tmp_path):
    """make_tiny_assets.py (tiny Qwen3-VL -> BARD-VL conversion + a chat dataset), then the tiny recipe, shortened."""
    model_dir, data_dir = load_script("make_tiny_assets").main(str(tmp_path / "assets"), num_rows=8)
    output = tmp_path / "run"
    arguments = [
        "--config",
        str(EXAMPLES / "configs" / "block_merge_tiny.yaml"),
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data_dir),
        "--output_dir",
        str(output),
        "--stage_steps",
        "2",
        "--disable_tqdm",
        "true",
    ]
    trainer = load_script("block_merge").main(*parse(arguments))
    assert trainer.args.block_sizes == [4, 8]
    for block_size in (4, 8):
        assert (output / f"stage-b{block_size}" / "model.safetensors").is_file()
        assert any("loss" in entry for entry in trainer.stage_log_history[block_size])


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_paper_recipes_parse_with_the_paper_hyperparameters(size):
    path = EXAMPLES / "configs" / f"block_merge_qwen3_vl_{size}.yaml"
    script_args, args, model_args = parse(["--config", str(path), "--use_cpu", "true", "--bf16", "false"])
    assert script_args.dataset_name and model_args.model_name_or_path.endswith(f"bard-vl-{size}-b4")
    assert args.block_sizes == [4, 8, 16, 32]
    assert (args.learning_rate, args.vision_learning_rate) == (2e-5, 2e-6)
    assert (args.adam_beta1, args.adam_beta2, args.max_grad_norm) == (0.9, 0.95, 1.0)
    assert args.weight_decay == (0.0 if size == "4b" else 0.01)
    assert (args.warmup_ratio, args.max_warmup_steps, args.min_lr_rate) == (0.1, 1000, 0.05)
    assert args.max_length == 8192 and args.gradient_checkpointing
    world = 8  # the recipes assume 8 GPUs: global batch 256
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * world == 256
    assert yaml.safe_load(path.read_text())["bf16"] is True


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp2_cpu", "zero2", "zero3", "multi_cpu"])
def test_accelerate_configs_load(name):
    path = EXAMPLES / "accelerate_configs" / f"{name}.yaml"
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    config = load_config_from_file(str(path))  # accelerate's own loader rejects unknown keys
    expected = {
        "ddp": "MULTI_GPU",
        "fsdp2": "FSDP",
        "fsdp2_cpu": "FSDP",
        "zero2": "DEEPSPEED",
        "zero3": "DEEPSPEED",
        "multi_cpu": "MULTI_GPU",
    }
    assert config.distributed_type.value == expected[name]
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name.startswith("fsdp2"):
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # stage folders are unsharded
        assert config.fsdp_config["fsdp_activation_checkpointing"] is False  # the trainer's own is used instead


def test_cli_block_merge_then_distill(tmp_path):
    """`transformers-bard block-merge` and `transformers-bard distill` run the tiny recipes (one step each)."""
    from transformers_bard.cli import main as cli

    model_dir, data_dir = load_script("make_tiny_assets").main(str(tmp_path / "assets"), num_rows=8)
    pbm = tmp_path / "pbm"
    common = ["--dataset_name", str(data_dir), "--disable_tqdm", "true"]
    assert cli(["block-merge", "--config", str(EXAMPLES / "configs" / "block_merge_tiny.yaml"),
                "--model_name_or_path", str(model_dir), "--output_dir", str(pbm), "--stage_steps", "1", *common]) == 0
    assert (pbm / "stage-b8" / "config.json").is_file()
    swd = tmp_path / "swd"
    assert cli(["distill", "--config", str(EXAMPLES / "configs" / "distill_tiny.yaml"),
                "--model_name_or_path", str(pbm / "stage-b8"), "--teacher_model_name_or_path", str(pbm / "stage-b4"),
                "--output_dir", str(swd), "--max_steps", "1", *common]) == 0
    assert (swd / "stage-b8" / "config.json").is_file()
