"""Progressive block merging (BARD, DESIGN 3.5): block-diffusion fine-tuning of a BARD-VL model at B = 4, 8, 16, 32.

The model must already be a BARD-VL checkpoint (`transformers-bard convert` / `convert_from_autoregressive`). Every
`BlockMergeConfig` field is a command-line flag; a YAML recipe sets many at once and flags override it:

    # one process
    python examples/scripts/block_merge.py --config examples/configs/block_merge_tiny.yaml

    # 8 GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file examples/accelerate_configs/zero2.yaml \
        examples/scripts/block_merge.py --config examples/configs/block_merge_qwen3_vl_4b.yaml

    # 2 CPU processes (gloo), e.g. to check a setup without GPUs
    accelerate launch --config_file examples/accelerate_configs/multi_cpu.yaml \
        examples/scripts/block_merge.py --config examples/configs/block_merge_tiny.yaml

`--dataset_name` is anything `datasets.load_dataset` reads: a Hub id or a local folder of parquet/json files with a
`messages` column (TRL's chat format) and an optional `images` column. Each stage ends in `{output_dir}/stage-b{B}`.
"""

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

import transformers_bard  # noqa: F401  (registers the BARD-VL Auto classes)
from transformers_bard.trainer.block_merge_config import BlockMergeConfig
from transformers_bard.trainer.block_merge_trainer import BlockMergeTrainer


def main(script_args: ScriptArguments, training_args: BlockMergeConfig, model_args: ModelConfig):
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    training_args.model_init_kwargs = model_init_kwargs

    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )
    trainer = BlockMergeTrainer(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print(
        f"Stages written: {', '.join(f'stage-b{b}' for b in training_args.block_sizes)} in {training_args.output_dir}"
    )
    trainer.end()  # flush the trackers and close the process group
    return trainer


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, BlockMergeConfig, ModelConfig))
    main(*parser.parse_args_and_config())
