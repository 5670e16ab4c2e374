"""BlockMergeConfig: paper defaults (DESIGN 3.5) and validation errors that name the field, the value and the fix."""

import pytest

from transformers_bard.noise import MixedNoiseScheduler
from transformers_bard.trainer.block_merge_config import BlockMergeConfig


def config(**kwargs):
    return BlockMergeConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none", **kwargs)


def test_paper_defaults():
    args = config()
    assert args.block_sizes == [4, 8, 16, 32]
    assert (args.learning_rate, args.vision_learning_rate) == (2e-5, 2e-6)
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.9, 0.95, 0.0, 1.0)
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.05}
    assert (args.warmup_ratio, args.max_warmup_steps) == (0.1, 1000)
    assert args.remove_unused_columns is False and args.packing is False
    assert args.dataset_kwargs == {"skip_prepare_dataset": True}
    assert args.max_length == 8192
    assert args.noise_scheduler() == MixedNoiseScheduler(prior="mask", min_rate=0.001, max_rate=1.0)


def test_activation_checkpointing_defaults_on_without_the_deprecation_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' own warnings too, not only ours
        args = config()
        off = config(activation_checkpointing=False)
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True  # TRL's default
    assert off.activation_checkpointing is False and off.gradient_checkpointing is False
    # the deprecated name still works, with transformers' warning
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        old = config(gradient_checkpointing=False)
    assert old.activation_checkpointing is False


def test_stage_steps_and_warmup():
    args = config(block_sizes=[4, 8, 16], stage_steps=[10, 20, 30])
    assert [args.steps_of_stage(i) for i in range(3)] == [10, 20, 30]
    assert config(stage_steps=[7]).steps_of_stage(3) == 7
    assert config(max_steps=5).steps_of_stage(2) == 5
    assert config().steps_of_stage(0) is None  # epochs
    # min(1000, ceil(10% of the stage's steps)), without floating-point surprises (30 * 0.1 = 3.0000000000000004)
    assert [args.warmup_steps_of_stage(n) for n in (30, 35, 9, 100_000)] == [3, 4, 1, 1000]


def test_noise_fields_build_the_scheduler():
    args = config(noise_prior="mask", noise_switch_prior="mix", noise_switch_at=0.5, noise_min_rate=0.1)
    scheduler = args.noise_scheduler()
    assert (scheduler.prior_at(0.2), scheduler.prior_at(0.6), scheduler.min_rate) == ("mask", "mix", 0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_sizes": [4, 6]}, r"`block_sizes` must be strictly increasing with each a multiple.*\[4, 6\]"),
        ({"block_sizes": [8, 4]}, r"`block_sizes` must be strictly increasing"),
        ({"block_sizes": []}, r"`block_sizes` must be a non-empty list"),
        ({"block_sizes": [0, 4]}, r"`block_sizes` must be a non-empty list of integers >= 1"),
        ({"stage_steps": [1, 2]}, r"`stage_steps` must have one value, or one per block size"),
        ({"stage_steps": [0]}, r"`stage_steps` must be a list of integers >= 1"),
        ({"stage_steps": [5], "max_steps": 5}, r"Set either `stage_steps`.*or `max_steps`"),
        ({"packing": True}, r"`packing=True` is not supported.*Set `packing=False`"),
        ({"padding_free": True}, r"`padding_free=True` is not supported"),
        ({"remove_unused_columns": True}, r"`remove_unused_columns` must be False"),
        ({"warmup_steps": 10}, r"`warmup_steps`=10 is not used.*warmup_ratio"),
        ({"warmup_ratio": 1.5}, r"`warmup_ratio` must be in \[0, 1\], got 1.5"),
        ({"vision_learning_rate": -1.0}, r"`vision_learning_rate` must be a number >= 0, got -1.0"),
        ({"use_fused_lm_head": 1}, r"`use_fused_lm_head` must be a bool, got 1"),
        ({"loss_min_rate": 0.0}, r"`loss_min_rate` must be None or in \(0, 1\], got 0.0"),
        ({"noise_prior": "blur"}, r"Invalid noise settings.*`prior` must be one of"),
        ({"noise_switch_prior": "mix"}, r"`switch_prior` and `switch_at` must be set together"),
        ({"label_smoothing_factor": 0.1}, r"`label_smoothing_factor`=0.1 is not supported"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(**kwargs)
