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

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

import transformers_bard  # noqa: F401  (registers the BARD-VL Auto classes)
from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig
from transformers_bard.trainer.diffusion_distill_trainer import DiffusionDistillTrainer


def main(script_args: ScriptArguments, training_args: DiffusionDistillConfig, model_args: ModelConfig):
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    # the teacher loads like the student (dtype, attention) unless `teacher_model_init_kwargs` says otherwise
    teacher_init_kwargs = {
        key: model_init_kwargs[key] for key in ("trust_remote_code", "attn_implementation", "dtype")
    }
    training_args.teacher_model_init_kwargs = {
        **teacher_init_kwargs,
        **(training_args.teacher_model_init_kwargs or {}),
    }

    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )
    trainer = DiffusionDistillTrainer(
        model_args.model_name_or_path,
        training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print(
        f"Distilled student written to {training_args.output_dir}/stage-b{training_args.block_sizes[0]}"
    )
    trainer.end()  # flush the trackers and close the process group
    return trainer


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DiffusionDistillConfig, ModelConfig))
    main(*parser.parse_args_and_config())
