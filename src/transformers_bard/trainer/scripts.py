"""Training entry points shared by `transformers-bard block-merge|distill` and `examples/scripts/*.py`.

Each takes TRL's `ScriptArguments` (dataset), the trainer's config and TRL's `ModelConfig` (model loading, LoRA), the
same triple as TRL's own example scripts, so `--config recipe.yaml` and every field as a flag work everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence


def _model_init_kwargs(training_args, model_args) -> dict:
    """How the student (and by default the teacher) is loaded: from `ModelConfig`, overridden by the config's own."""
    base = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    return {**base, **(training_args.model_init_kwargs or {})}


def _check_output_dir(script_args, training_args, model_args) -> None:
    """Refuse an `--output_dir` that is, holds or lies inside the model, the teacher or the dataset folder, before the
    dataset or a model is loaded (the trainer checks the model and the teacher again, under their Python names)."""
    from ..checkpoint_files import check_output_dir

    inputs = {
        "--model_name_or_path": model_args.model_name_or_path,
        "--teacher_model_name_or_path": getattr(training_args, "teacher_model_name_or_path", None),
        "--dataset_name": script_args.dataset_name,
    }
    check_output_dir(training_args.output_dir, "--output_dir", inputs)


def _load_splits(script_args, training_args):
    from datasets import load_dataset

    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )
    train = dataset[script_args.dataset_train_split]
    evaluation = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None
    return train, evaluation


def _train(trainer, training_args):
    """Train every stage, say where the stage folders are, and close the trackers and the process group."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    stages = ", ".join(f"stage-b{block_size}" for block_size in trainer.block_sizes)
    trainer.accelerator.print(f"Stages written: {stages} in {training_args.output_dir}")
    trainer.end()
    return trainer


def block_merge_main(script_args, training_args, model_args):
    """Progressive block merging (DESIGN 3.5); every stage ends in `{output_dir}/stage-b{B}`."""
    from trl import get_peft_config

    import transformers_bard  # noqa: F401  (registers the BARD-VL Auto classes)

    from .block_merge_trainer import BlockMergeTrainer

    _check_output_dir(script_args, training_args, model_args)
    training_args.model_init_kwargs = _model_init_kwargs(training_args, model_args)
    train, evaluation = _load_splits(script_args, training_args)
    trainer = BlockMergeTrainer(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
    )
    return _train(trainer, training_args)


def diffusion_distill_main(script_args, training_args, model_args):
    """Stage-wise distillation (DESIGN 3.6); the student is written to `{output_dir}/stage-b{B_s}`."""
    from trl import get_peft_config

    import transformers_bard  # noqa: F401

    from .diffusion_distill_trainer import DiffusionDistillTrainer

    _check_output_dir(script_args, training_args, model_args)
    training_args.model_init_kwargs = _model_init_kwargs(training_args, model_args)
    # the teacher loads like the student (dtype, attention) unless `teacher_model_init_kwargs` says otherwise
    shared = {
        key: training_args.model_init_kwargs[key] for key in ("trust_remote_code", "attn_implementation", "dtype")
    }
    training_args.teacher_model_init_kwargs = {**shared, **(training_args.teacher_model_init_kwargs or {})}
    train, evaluation = _load_splits(script_args, training_args)
    trainer = DiffusionDistillTrainer(
        model_args.model_name_or_path,
        training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
    )
    return _train(trainer, training_args)


def parse(config_class, argv: Sequence[str] | None = None):
    """(ScriptArguments, config, ModelConfig) from `argv` (default: sys.argv), with `--config recipe.yaml`."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    return TrlParser((ScriptArguments, config_class, ModelConfig)).parse_args_and_config(args=argv)


def run_block_merge(argv: Sequence[str] | None = None):
    from .block_merge_config import BlockMergeConfig

    return block_merge_main(*parse(BlockMergeConfig, argv))


def run_diffusion_distill(argv: Sequence[str] | None = None):
    from .diffusion_distill_config import DiffusionDistillConfig

    return diffusion_distill_main(*parse(DiffusionDistillConfig, argv))
