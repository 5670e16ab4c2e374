"""Stage-wise intra-dVLM distillation (BARD SWD, DESIGN 3.6): a frozen B = 4 anchor teaches a large-block student.

The student is a progressive-block-merging checkpoint at its target block size B_s (`stage-b{B_s}` of
`examples/scripts/block_merge.py`); the teacher is a B = 4 dVLM (in the paper the 8B `stage-b4` teaches the 2B, 4B and
8B students). Every `DiffusionDistillConfig` field is a command-line flag; a YAML recipe sets many at once and flags
override it:

    # one process, the built-in tiny model
    python examples/scripts/diffusion_distill.py --config examples/configs/distill_tiny.yaml

    # 8 GPUs, DeepSpeed ZeRO-2 (the teacher is replicated; with zero3.yaml it is sharded as well)
    accelerate launch --config_file examples/accelerate_configs/zero2.yaml \
        examples/scripts/diffusion_distill.py --config examples/configs/distill_qwen3_vl_4b.yaml

    # ablation: the autoregressive source as teacher (DESIGN 3.6 shows it hurts)
    accelerate launch --config_file examples/accelerate_configs/zero2.yaml \
        examples/scripts/diffusion_distill.py --config examples/configs/distill_qwen3_vl_4b.yaml \
        --teacher_type autoregressive --teacher_model_name_or_path Qwen/Qwen3-VL-4B-Instruct \
        --output_dir checkpoints/bard-vl-4b-swd-b16-ar-teacher

`--dataset_name` is anything `datasets.load_dataset` reads (a `messages` column in TRL's chat format and an optional
`images` column). The distilled student is written to `{output_dir}/stage-b{B_s}`.
"""

from trl import ModelConfig, ScriptArguments, TrlParser

from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig
from transformers_bard.trainer.scripts import diffusion_distill_main as main

__all__ = ["main"]

if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DiffusionDistillConfig, ModelConfig))
    main(*parser.parse_args_and_config())
