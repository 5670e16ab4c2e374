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

from trl import ModelConfig, ScriptArguments, TrlParser

from transformers_bard.trainer.block_merge_config import BlockMergeConfig
from transformers_bard.trainer.scripts import block_merge_main as main

__all__ = ["main"]

if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, BlockMergeConfig, ModelConfig))
    main(*parser.parse_args_and_config())
