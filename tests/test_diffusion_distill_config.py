"""DiffusionDistillConfig (DESIGN 3.6): the reference defaults, named errors, and the paper recipes that set it."""

import re

import pytest
import yaml
from trl import ModelConfig, ScriptArguments, TrlParser

from conftest import EXAMPLES
from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig


def parse(arguments):
    return TrlParser((ScriptArguments, DiffusionDistillConfig, ModelConfig)).parse_args_and_config(arguments)


def test_config_defaults_follow_the_reference_and_bad_values_are_named(tmp_path):
    args = DiffusionDistillConfig(str(tmp_path), use_cpu=True, bf16=False)
    assert (args.learning_rate, args.vision_learning_rate, args.num_train_epochs) == (6e-6, 6e-6, 3)
    assert args.warmup_steps_of_stage(5000) == 100 and args.warmup_steps_of_stage(40) == 40
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs["min_lr_rate"] == 0.5
    assert (args.noise_prior, args.noise_min_rate, args.noise_max_rate) == ("mask", 0.1, 0.5)
    assert (args.teacher_type, args.teacher_block_size, args.teacher_topk, args.temperature) == ("diffusion", 4, 16, 1)
    assert (args.ce_weight, args.kd_weight, args.reverse_kd, args.loss_normalization) == (1.0, 0.5, False, "token")
    assert args.kd_on_eos_padding is False  # measured (the demo's kd_eos_padding ablation); DESIGN 3.6: True
    assert (args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.95, 0.0, 1.0)
    assert args.gradient_checkpointing and args.block_sizes is None
    assert DiffusionDistillConfig(str(tmp_path), use_cpu=True, block_sizes=[8]).block_sizes == [8]
    parsed = DiffusionDistillConfig(str(tmp_path), use_cpu=True, teacher_model_init_kwargs='{"dtype": "bfloat16"}')
    assert parsed.teacher_model_init_kwargs == {"dtype": "bfloat16"}  # JSON from the command line

    for overrides, message in [
        (dict(teacher_type="ar"), "`teacher_type` must be one of ('diffusion', 'autoregressive'), got 'ar'"),
        (dict(teacher_topk=0), "`teacher_topk` must be an integer >= 1, got 0"),
        (dict(temperature=0.0), "`temperature` must be a number > 0, got 0.0"),
        (dict(kd_weight=-1.0), "`kd_weight` must be a number >= 0, got -1.0"),
        (dict(ce_weight=0.0, kd_weight=0.0), "are both 0"),
        (dict(teacher_block_size=0), "`teacher_block_size` must be an integer >= 1, got 0"),
        (dict(block_sizes=[8, 16]), "`block_sizes` must be unset or one block size [B_s]"),
        (dict(block_sizes=[6]), "`teacher_block_size`=4 does not divide the student's block size 6"),
        (dict(noise_min_rate=0.6), "Invalid noise settings"),
        (dict(teacher_model_init_kwargs=[1]), "`teacher_model_init_kwargs` must be a dict"),
        (dict(kd_on_eos_padding="no"), "`kd_on_eos_padding` must be a bool, got 'no'"),
        (dict(loss_normalization="mean"), "`loss_normalization` must be one of ('token', 'sample'), got 'mean'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            DiffusionDistillConfig(str(tmp_path), use_cpu=True, **overrides)
    # a sibling of BlockMergeConfig, not a subclass: PBM's schedule and loss knobs do not exist here
    for name in ("stage_steps", "loss_min_rate", "use_fused_lm_head"):
        with pytest.raises(TypeError, match=name):
            DiffusionDistillConfig(str(tmp_path), use_cpu=True, **{name: 1})


@pytest.mark.parametrize("size", ["2b", "4b", "8b"])
def test_paper_recipes_parse_with_the_reference_hyperparameters(size):
    path = EXAMPLES / "configs" / f"distill_qwen3_vl_{size}.yaml"
    script_args, args, model_args = parse(["--config", str(path), "--use_cpu", "true", "--bf16", "false"])
    assert script_args.dataset_name
    assert re.search(rf"bard-vl-{size}-pbm/stage-b(8|16|32)$", model_args.model_name_or_path)
    assert args.teacher_model_name_or_path.endswith("bard-vl-8b-pbm/stage-b4")  # the 8B B=4 anchor teaches all
    assert args.teacher_model_init_kwargs["dtype"] == "bfloat16"
    assert (args.teacher_type, args.teacher_block_size, args.teacher_topk, args.temperature) == ("diffusion", 4, 16, 1)
    assert (args.ce_weight, args.kd_weight, args.reverse_kd) == (1.0, 0.5, False)
    assert (args.learning_rate, args.vision_learning_rate, args.num_train_epochs) == (6e-6, 6e-6, 3)
    assert args.warmup_steps_of_stage(10_000) == 100 and args.lr_scheduler_kwargs["min_lr_rate"] == 0.5
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.9, 0.95, 0.0, 1.0)
    assert (args.noise_prior, args.noise_min_rate, args.noise_max_rate) == ("mask", 0.1, 0.5)
    assert args.gradient_checkpointing and args.max_length == 8192
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 64  # 8 GPUs, as the reference
    assert yaml.safe_load(path.read_text())["bf16"] is True
