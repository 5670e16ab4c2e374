"""BlockDiffusionTrainer: what the BARD trainers share, on top of TRL's `SFTTrainer` (DESIGN 3.1-3.5).

`BlockMergeTrainer` (progressive block merging) and `DiffusionDistillTrainer` (stage-wise distillation) are siblings
on this class. It owns:

- the data: the `bard_sample_index` column (`add_sample_index`) and a `BlockDiffusionCollator` built from the config,
  kept in step with the trainer by `NoiseScheduleCallback` (noise seed = epoch, curriculum = stage progress);
- the optimiser groups (the vision tower at `vision_learning_rate`, DESIGN 3.5) and the per-stage warmup + schedule;
- the stage loop: one `train()` runs every block size of `block_sizes` with a fresh optimizer and schedule, and
  writes a complete ``stage-b{B}`` folder after each (`stages.py`: layout, the ``bard_stage.json`` written last into
  every mid-stage checkpoint, resume point, merged LoRA weights);
- numerical faults: a step with a non-finite loss or gradient norm stops the run or is skipped (`on_nonfinite`,
  `NonFiniteStepCallback`), and no checkpoint with non-finite weights is ever written (`_refuse_nonfinite_weights`);
- the per-step normalisation: `_get_num_items_in_batch` sums `num_loss_items` (the subclass's unit: samples for PBM,
  masked tokens for SWD) over the micro-batches and ranks of an optimizer step.

A subclass passes its stage schedule to `__init__` and implements `compute_loss` and `num_loss_items`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import textwrap
from collections.abc import Callable

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoModelForImageTextToText, PreTrainedModel, TrainerCallback
from transformers.optimization import get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints
from trl import SFTTrainer
from trl.trainer.utils import create_model_from_path

from ..checkpoint_files import check_model_type, check_output_dir, check_safetensors_files
from ..models.bard_vl.processing_bard_vl import BardVLProcessor
from .block_diffusion_config import BlockDiffusionConfig
from .collator import BlockDiffusionCollator, add_sample_index
from .stages import (
    last_complete_checkpoint,
    merged_lora_state_dict,
    publish_stage,
    resume_point,
    stage_checkpoints_dir_name,
    stage_dir_name,
    stage_state,
    write_stage_state,
)

logger = logging.getLogger(__name__)


# What the trainers load: BARD-VL checkpoints, and Qwen3-VL ones (an autoregressive teacher; a student or a
# `BlockMergeTrainer` model that is one is then refused for its missing mask token, with the conversion to run).
LOADABLE_MODEL_TYPES = ("bard_vl", "qwen3_vl")


def load_pretrained_model(
    model_id: str | os.PathLike, init_kwargs: dict | None, args, argument: str = "model"
) -> PreTrainedModel:
    """`AutoModelForImageTextToText` from a path or Hub id, placed as the distributed setting needs (as SFTTrainer).

    A local folder is checked first (`argument` names it in the errors): its architecture, and every safetensors
    file's header (a truncated or corrupted shard is refused before anything is built or written).
    """
    if os.path.isdir(model_id):
        check_model_type(
            model_id,
            argument,
            LOADABLE_MODEL_TYPES,
            "The BARD trainers train BARD-VL checkpoints: convert a Qwen3-VL checkpoint first with "
            "`transformers-bard convert SOURCE OUTPUT` (an autoregressive teacher may be Qwen3-VL itself).",
        )
        check_safetensors_files(model_id, argument)
    init_kwargs = dict(init_kwargs or {})
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None  # distributed training places the model itself ("auto" fails)
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(str(model_id), architecture=AutoModelForImageTextToText, **init_kwargs)


def input_paths(value) -> list[str]:
    """The local paths a trainer input reads: a path as given, a model's folder (`name_or_path`), the folders of the
    files a dataset was loaded from (`cache_files`; one per split of a dict). Hub ids are filtered out later (they
    do not exist locally); an in-memory dataset has none."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    if isinstance(value, dict):
        return [path for split in value.values() for path in input_paths(split)]
    if isinstance(value, torch.nn.Module):  # a model, PEFT-wrapped or not
        base = value.get_base_model() if is_peft_model(value) else value
        name = getattr(getattr(base, "config", None), "_name_or_path", None)
        return [name] if name else []
    return sorted({os.path.dirname(entry["filename"]) for entry in getattr(value, "cache_files", None) or []})


def is_vision_tower_parameter(name: str) -> bool:
    """Whether a parameter trains at `vision_learning_rate`: in the vision tower, outside its mergers (DESIGN 3.5).

    Works on plain, PEFT-wrapped and FSDP/DDP-prefixed names (`...model.visual.blocks.0...`); the merger and the
    DeepStack mergers (`merger`, `deepstack_merger_list`) map vision features into the language model and train at the
    language model's rate.
    """
    return ".visual." in f".{name}" and "merger" not in name


class NoiseScheduleCallback(TrainerCallback):
    """Keeps the collator's `epoch` (noise seed) and `progress` (noise curriculum) in step with the trainer.

    The epoch is set before the epoch's data loader iterator starts, so every batch of epoch e is seeded with e. The
    progress is the stage's fraction of steps done when a step begins; the data loader collates ahead (one batch,
    `prefetch_factor` per worker with workers), so a curriculum switch reaches the batches a few steps late.
    """

    def __init__(self, collator: BlockDiffusionCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is `epoch + fraction done`; whole at an epoch start, and floor gives the epoch on resume
        self.collator.epoch = int(state.epoch or 0)

    def on_step_begin(self, args, state, control, **kwargs):
        self.collator.progress = min(1.0, state.global_step / max(state.max_steps, 1))


class NonFiniteTrainingError(FloatingPointError):
    """A training step met a non-finite loss or gradient norm (`on_nonfinite="stop"`), or a checkpoint to be written
    holds non-finite weights. The message names the step, the stage and the last checkpoint to resume from."""


class NonFiniteStepCallback(TrainerCallback):
    """Checks every optimizer step before the optimizer applies it (`BlockDiffusionTrainer.check_step_is_finite`).

    `on_pre_optimizer_step` runs after the gradients of the whole step are accumulated (and clipped, with the norm
    computed), right before `optimizer.step()`: the last point where a bad update can still be refused.
    """

    def __init__(self, trainer: BlockDiffusionTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.check_step_is_finite()


class BlockDiffusionTrainer(SFTTrainer):
    """Shared base of `BlockMergeTrainer` and `DiffusionDistillTrainer`; see the module docstring.

    Args:
        model: a `BardVLForConditionalGeneration` (or its path) with `config.mask_token_id` set.
        args: the subclass's config (a `BlockDiffusionConfig`).
        block_sizes: the stage schedule (one block size per stage).
        data_collator: defaults to a `BlockDiffusionCollator` built from `processing_class` and `args`.
        train_dataset / eval_dataset: chat datasets in TRL's vision format (`messages`, optional `images`); the
            trainer adds a `bard_sample_index` column (see `add_sample_index`).
        processing_class: defaults to `BardVLProcessor.from_pretrained(model path)`.
        callbacks: extra `TrainerCallback`s.
        optimizers: must stay `(None, None)`: every stage creates its own.
        peft_config: a `peft.LoraConfig`; each stage folder then holds the merged model and the adapter.

    After `train()`, `stage_log_history[B]` holds each stage's `log_history` (steps restart at 0 in every stage).
    """

    config_class = BlockDiffusionConfig
    _paper = {
        "title": "BARD: Bridging AutoRegressive and Diffusion Vision-Language Models Via Highly Efficient Progressive "
        "Block Merging and Stage-Wise Distillation",
        "id": "2604.16514",
        "citation": textwrap.dedent("""\
            @article{bard2026,
                title   = {{BARD: Bridging AutoRegressive and Diffusion Vision-Language Models Via Highly Efficient
                            Progressive Block Merging and Stage-Wise Distillation}},
                journal = {arXiv preprint arXiv:2604.16514},
                year    = 2026,
            }"""),
    }
    # compute_loss divides by the loss items of the whole optimizer step (DESIGN 3.4, 3.6): no further division by
    # the number of accumulation steps
    loss_is_scaled_for_ga = True

    @classmethod
    def resolve_args(cls, model, args, **inputs):
        """`args`, or the config class's defaults with ``output_dir`` = ``{model name}-{trainer name}``.

        Its ``output_dir`` is checked against `model` and the other `inputs` (name -> a path, a model or a dataset)
        before anything is written: it may not be, hold or lie inside any of them (`check_output_dir`).
        """
        if args is None:
            name = model if isinstance(model, (str, os.PathLike)) else model.config._name_or_path
            args = cls.config_class(f"{os.path.basename(str(name).rstrip('/')) or 'model'}-{cls._name}")
        elif not isinstance(args, cls.config_class):
            raise TypeError(f"`args` must be a {cls.config_class.__name__}, got {type(args).__name__}.")
        named = {"model": model, **inputs}
        check_output_dir(args.output_dir, "output_dir", {name: input_paths(value) for name, value in named.items()},
                         suffix=cls._name)
        return args

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: BlockDiffusionConfig,
        block_sizes: list[int],
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict | None = None,
        processing_class=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        peft_config=None,
    ):
        if optimizers != (None, None):
            raise ValueError(
                f"`optimizers` cannot be passed: {type(self).__name__} creates a fresh optimizer and schedule for "
                f"every stage. Configure them through {type(args).__name__} (learning_rate, vision_learning_rate, "
                "optim, ...)."
            )
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a chat dataset with `messages` (and optional `images`).")
        if isinstance(model, (str, os.PathLike)):
            model = load_pretrained_model(model, args.model_init_kwargs, args)
            # consumed here: SFTTrainer would warn that they are ignored for an instantiated model
            args.model_init_kwargs = None
        base_config = (model.get_base_model() if is_peft_model(model) else model).config
        mask_token_id = getattr(base_config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(
                f"The model ({type(model).__name__}) has no `config.mask_token_id`: block diffusion needs a `<|mask|>` "
                "token. Convert the autoregressive checkpoint first with "
                "`transformers_bard.convert_from_autoregressive(source, output_dir)`."
            )
        if processing_class is None:
            processing_class = BardVLProcessor.from_pretrained(base_config._name_or_path)
        if peft_config is not None:
            from peft import LoraConfig

            if not isinstance(peft_config, LoraConfig) or peft_config.use_dora:
                raise ValueError(
                    f"`peft_config` must be a peft.LoraConfig without DoRA (got {type(peft_config).__name__}): each "
                    "stage checkpoint merges the adapter into the weights."
                )

        train_dataset = add_sample_index(train_dataset)
        eval_dataset = add_sample_index(eval_dataset)
        if data_collator is None:
            data_collator = BlockDiffusionCollator(
                processing_class,
                mask_token_id=mask_token_id,
                block_size=block_sizes[0],
                noise_scheduler=args.noise_scheduler(),
                max_length=args.max_length,
                seed=args.seed if args.noise_seed is None else args.noise_seed,
            )
        first_row = next(iter(train_dataset), None)
        if first_row is None:
            raise ValueError(
                "`train_dataset` is empty: there is nothing to train on. Pass a chat dataset with at least one row."
            )
        if isinstance(data_collator, BlockDiffusionCollator):
            problem = data_collator.example_problem(first_row)
            if problem is not None:
                raise ValueError(
                    f"`train_dataset` cannot be trained on: its first row {problem}. The dataset must hold chats "
                    "whose last assistant turn is the response to learn (TRL's `messages` format)."
                )

        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            peft_config=peft_config,
        )
        self._check_distributed_setting()
        self._check_attention_backend()
        self.block_sizes = list(block_sizes)
        self.stage = 0
        self.stage_log_history: dict[int, list[dict]] = {}
        self.run_dir = args.output_dir  # the stage layout's root (`args.output_dir` moves into each stage)
        self.nonfinite_steps_skipped: list[tuple[int, int]] = []  # (block size, global step) under "skip"
        self._step_loss_finite: torch.Tensor | None = None  # all micro-batch losses of the current step finite
        self._step_grad_norm = None
        self.add_callback(NonFiniteStepCallback(self))
        if isinstance(self.data_collator, BlockDiffusionCollator):
            self.add_callback(NoiseScheduleCallback(self.data_collator))

    def create_accelerator_and_postprocess(self):
        """Transformers' accelerator, plus FSDP2 on CPU processes, which accelerate leaves off (see `enable_cpu_fsdp2`)."""
        version = os.environ.get("FSDP_VERSION", "1")
        if self.args.use_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and version != "2":
            # accelerate's FSDP1 plugin itself fails on CPU with an unrelated-looking device error: say it first
            raise ValueError(_CPU_FSDP_VERSION_ERROR.format(version=version))
        super().create_accelerator_and_postprocess()
        if enable_cpu_fsdp2(self.accelerator):
            self.is_fsdp_enabled = True
            if self.accelerator.state.fsdp_plugin.activation_checkpointing and self.args.activation_checkpointing:
                raise ValueError(
                    "`fsdp_activation_checkpointing` (FSDP's own activation checkpointing) and the "
                    "`activation_checkpointing` training argument are both on. Keep one: set "
                    "`fsdp_activation_checkpointing: false` in the accelerate config."
                )

    # ------------------------------------------------------------------ numerical faults
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Transformers' step, noting whether the micro-batch loss is finite (read before the optimizer step)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss).all()  # a device tensor: no synchronisation per micro-batch
        self._step_loss_finite = finite if self._step_loss_finite is None else self._step_loss_finite & finite
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Transformers' gradient norm of the step (before clipping; over all ranks), kept for `check_step_is_finite`."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._step_grad_norm = grad_norm
        return grad_norm

    def check_step_is_finite(self) -> None:
        """Before `optimizer.step()`: stop the run or drop the step's gradients if its loss or gradient norm is not
        finite (`on_nonfinite`). Every rank takes the same decision (the flags are reduced over ranks)."""
        loss_finite, grad_norm = self._step_loss_finite, self._step_grad_norm
        self._step_loss_finite = self._step_grad_norm = None
        device = self.accelerator.device
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        # None: not computed on this step (no micro-batch, or a backend without a norm): nothing to check
        loss_flag = torch.ones((), device=device) if loss_finite is None else loss_finite.to(device).float()
        grad_flag = torch.ones((), device=device)
        if grad_norm is not None:
            grad_flag = torch.isfinite(torch.as_tensor(grad_norm, device=device)).all().float()
        flags = torch.stack([loss_flag, grad_flag])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(flags[None]).amin(0)
        loss_ok, grad_ok = (bool(flag) for flag in flags.tolist())
        if loss_ok and grad_ok:
            return
        step, block_size = self.state.global_step + 1, self.block_sizes[self.stage]
        what = "loss" if not loss_ok else f"gradient norm ({float(grad_norm)}, with a finite loss)"
        where = f"global step {step} of stage {self.stage} (block size {block_size})"
        if self.args.on_nonfinite == "skip":
            self.optimizer.zero_grad(set_to_none=True)  # no gradient: AdamW leaves weights and moments untouched
            self.nonfinite_steps_skipped.append((block_size, step))
            logger.warning("Non-finite %s at %s: step skipped (on_nonfinite='skip').", what, where)
            return
        raise NonFiniteTrainingError(
            f"Non-finite {what} at {where}: training stopped before applying it (on_nonfinite='stop'). "
            f"{self._last_good_checkpoint_text()} Lower `learning_rate`, check the data of that step, or set "
            "`on_nonfinite='skip'` to drop such steps and train on."
        )

    def _last_good_checkpoint_text(self) -> str:
        """Where a stopped run can resume from: the last complete checkpoint of this stage, else the last finished
        stage folder, else none (every checkpoint written holds finite weights: see `_refuse_nonfinite_weights`)."""
        folder = last_complete_checkpoint(self.args.output_dir)
        if folder is None:
            for block_size in reversed(self.block_sizes[: self.stage]):
                candidate = os.path.join(self.run_dir, stage_dir_name(block_size))
                if os.path.isdir(candidate):
                    folder = candidate
                    break
        if folder is None:
            return (
                f"No checkpoint of this run was written before it (nothing under {self.run_dir!r}): restart from the "
                "model you started from."
            )
        return f"Last good checkpoint: {folder!r} (resume with `resume_from_checkpoint=True`)."

    def _refuse_nonfinite_weights(self, output_dir: str) -> None:
        """Raise before anything is written to `output_dir` if a weight is NaN or infinite (checked on every rank's
        own shards, then reduced, so every rank raises together)."""
        bad = None
        for name, param in self.model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor shard under FSDP2
            if not torch.isfinite(local).all():
                bad = name
                break
        flag = torch.tensor([0.0 if bad is None else 1.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.gather(flag).amax()
        if bool(flag.item()):
            raise NonFiniteTrainingError(
                f"Refusing to write {output_dir!r}: the weights hold non-finite values"
                f"{f' (first: {bad})' if bad else ' (on another rank)'} at global step {self.state.global_step} of "
                f"stage {self.stage} (block size {self.block_sizes[self.stage]}). "
                f"{self._last_good_checkpoint_text()} Lower `learning_rate` and resume from there."
            )

    # ------------------------------------------------------------------ saving
    def _save_checkpoint(self, model, trial) -> None:
        """Transformers' checkpoint, made safe to kill: ``bard_stage.json`` is written last, once every rank is done.

        Transformers writes ``checkpoint-{step}`` in place, file by file: a process killed while saving leaves a
        half-written folder under the name resuming picks. Here a folder counts as a checkpoint only once it holds
        ``bard_stage.json`` (`stages.last_complete_checkpoint`): a stale folder of the same step (an earlier, killed
        run) is removed first so that its marker cannot vouch for the new files, and older checkpoints are rotated
        out (`save_total_limit`) only after the new one is complete.
        """
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._refuse_nonfinite_weights(folder)
        if self.args.should_save and os.path.isdir(folder):
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (optimizer shards, RNG states) are written
        if self.args.should_save:
            write_stage_state(folder, stage_state(self.block_sizes, self.stage, self.state.global_step, complete=False))
            rotate_checkpoints(
                output_dir=self.args.output_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Transformers' `save_model`, refused for non-finite weights; for FSDP2 on CPU processes, the full state dict
        is copied before it is written.

        accelerate gathers it with `cpu_offload=True`, a no-op copy on CPU: the gathered tensors then alias buffers
        that FSDP frees again, and safetensors finds invalid storages.
        """
        if not _internal_call:  # `_save_checkpoint` checked already
            self._refuse_nonfinite_weights(output_dir if output_dir is not None else self.args.output_dir)
        if not (self.is_fsdp_enabled and self.accelerator.device.type == "cpu"):
            return super().save_model(output_dir, _internal_call=_internal_call)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(self.model, options=options)  # full on rank 0, empty elsewhere
        state_dict = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Transformers' `_save`, with an FSDP2-sharded model saved under its own class (see `unsharded_class`)."""
        with unsharded_class(self.model):
            return super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Transformers' loader; under FSDP2, the checkpoint's safetensors weights, sharded onto every rank.

        A BARD checkpoint (mid-stage or a stage folder) always holds the full model as `save_pretrained` writes it.
        Under FSDP2 every rank reads it and keeps its own shards (`set_model_state_dict` with a full state dict), on
        the sharded model as on one not sharded yet. (Transformers' FSDP path reads accelerate's pickled
        `pytorch_model_fsdp.bin` with a rank-0 broadcast, which deadlocks on gloo.)
        """
        if not (self.is_fsdp_enabled and self.accelerator.is_fsdp2):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state_dict = load_safetensors_weights(resume_from_checkpoint)
        model = self.model_wrapped if model is None else model
        result = set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=False))
        self._issue_warnings_after_load(result)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Transformers' optimizer and scheduler files; under FSDP2 without a second, pickled copy of the weights.

        Under FSDP transformers also writes the model with accelerate's `save_fsdp_model` (`pytorch_model_fsdp.bin`,
        the full state dict again) next to the `model.safetensors` that `save_model` wrote. Under FSDP2 resuming
        reads the safetensors (`_load_from_checkpoint`), so a checkpoint keeps only those. (FSDP1 resumes through
        transformers' loader, which needs the pickled copy: left as it is.)
        """
        if not (self.is_fsdp_enabled and self.accelerator.is_fsdp2):
            return super()._save_optimizer_and_scheduler(output_dir)
        import warnings

        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME
        from transformers.trainer_pt_utils import reissue_pt_warnings

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            with warnings.catch_warnings(record=True) as caught_warnings:  # as transformers: torch's save warnings
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            reissue_pt_warnings(caught_warnings)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Transformers' loader; under FSDP2, an optimizer without per-parameter state (plain SGD) loads too.

        torch's `set_optimizer_state_dict` with a full state dict (accelerate's FULL_STATE_DICT) takes the device to
        distribute the saved tensors to from the optimizer's own state tensors, and fails ("Expected device to be
        set") when there are none. Such a checkpoint holds only `param_groups` (learning rates, momentum, ... keyed
        by parameter names), identical in the full and the sharded form: it is loaded as the sharded form, which
        moves no tensors.
        """
        optimizer_file = os.path.join(checkpoint or "", "optimizer.bin")  # accelerate's FULL_STATE_DICT file
        if not (checkpoint and self.is_fsdp_enabled and self.accelerator.is_fsdp2 and os.path.isfile(optimizer_file)):
            return super()._load_optimizer_and_scheduler(checkpoint)
        saved = torch.load(optimizer_file, weights_only=True, mmap=True)  # mapped: AdamW's state is not read here
        if saved["state"]:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from transformers.trainer import SCHEDULER_NAME

        set_optimizer_state_dict(self.model, self.optimizer, saved, options=StateDictOptions(full_state_dict=False))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _check_attention_backend(self) -> None:
        """FlexAttention trains only on accelerators: torch has no flex-attention backward on CPU."""
        impl = self._base_model.config.get_text_config()._attn_implementation
        if impl == "flex_attention" and self.accelerator.device.type == "cpu":
            raise ValueError(
                "The model uses attn_implementation='flex_attention', which torch cannot train on CPU (FlexAttention "
                "has no CPU backward). Load it with attn_implementation='sdpa' for CPU training (in "
                "`model_init_kwargs`), or train on a GPU."
            )

    def _check_distributed_setting(self) -> None:
        """Refuse the launches that would not train as asked (DESIGN 6): sharding that accelerate did not enable,
        and LoRA under parameter sharding."""
        for name, variable, enabled in (
            ("FSDP", "ACCELERATE_USE_FSDP", self.is_fsdp_enabled),
            ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", self.is_deepspeed_enabled),
        ):
            if os.environ.get(variable, "false").lower() == "true" and not enabled:
                # accelerate turns FSDP / DeepSpeed on only for accelerator devices (GPU, XPU, NPU, ...); on CPU the
                # processes would silently train replicated, with DDP
                raise ValueError(
                    f"The accelerate config asks for {name}, but accelerate runs "
                    f"{self.accelerator.distributed_type.value} on {self.accelerator.device.type}: it enables {name} "
                    "only on accelerator devices (GPUs), so this run would train without sharding. On CPU launch with "
                    "examples/accelerate_configs/multi_cpu.yaml (DDP over gloo); shard on GPUs."
                )
        sharded = self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if sharded and is_peft_model(self.model):
            raise ValueError(
                "LoRA with FSDP or DeepSpeed ZeRO-3 is not supported: the stage checkpoints merge the adapter into "
                "full weights, which needs every rank's LoRA and base shards. Use DDP or ZeRO-2 for LoRA, or train "
                "the full model under FSDP / ZeRO-3."
            )

    # ------------------------------------------------------------------ helpers
    @property
    def _base_model(self) -> PreTrainedModel:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    # ------------------------------------------------------------------ per-step normalisation (DESIGN 3.4, 3.6)
    def num_loss_items(self, batch: dict) -> int | None:
        """The loss's unit in one collated micro-batch (samples, masked tokens, ...), or None if it has none."""
        raise NotImplementedError(f"{type(self).__name__} must define `num_loss_items`.")

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """`num_loss_items` of the whole optimizer step: all micro-batches of this rank, summed over ranks."""
        counts = [self.num_loss_items(batch) for batch in batch_samples]
        if not counts or any(count is None for count in counts):
            return None
        total = torch.tensor([sum(counts)], device=device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total)
        return total.sum()

    def loss_normaliser(self, num_items_in_batch, local_items: int) -> tuple[int | torch.Tensor, int]:
        """``(denominator, scale)`` of a micro-batch's summed loss.

        In training, the denominator counts the step's items over all micro-batches and ranks, and the loss is
        multiplied back by the number of processes because DDP/FSDP/DeepSpeed average gradients over ranks: the
        result is the gradient of sum / N_step. Without it (evaluation), the mean over this batch's items.
        """
        if num_items_in_batch is None:
            return max(local_items, 1), 1
        return torch.as_tensor(num_items_in_batch).float().clamp(min=1), self.accelerator.num_processes

    # ------------------------------------------------------------------ optimizer and schedule (DESIGN 3.5)
    def create_optimizer(self, model=None):
        """AdamW (by default) with the vision tower, except its mergers, at `vision_learning_rate`."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[bool, bool], list] = {}
            for name, param in opt_model.named_parameters():
                if param.requires_grad:
                    groups.setdefault((is_vision_tower_parameter(name), name in decay), []).append(param)
            param_groups = []
            # language-model groups first: the logged learning rate is that of the first group
            for (vision, decays), params in sorted(groups.items()):
                param_groups.append(
                    {
                        "params": params,
                        "lr": self.args.vision_learning_rate if vision else self.args.learning_rate,
                        "weight_decay": self.args.weight_decay if decays else 0.0,
                    }
                )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The stage's schedule: warmup of min(max_warmup_steps, ceil(warmup_ratio * steps)), then `lr_scheduler_type`."""
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=self.optimizer if optimizer is None else optimizer,
                num_warmup_steps=self.args.warmup_steps_of_stage(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ stage checkpoints
    def save_stage(self, stage: int, root: str) -> str:
        """Write the finished stage's complete checkpoint to ``{root}/stage-b{B}`` (temporary folder, then rename)."""
        block_size = self.block_sizes[stage]
        final = os.path.join(root, stage_dir_name(block_size))
        staging = os.path.join(root, f".{stage_dir_name(block_size)}.tmp")
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        unwrapped = self.accelerator.unwrap_model(self.model)
        if is_peft_model(unwrapped):
            self.save_model(os.path.join(staging, "adapter"))  # on every rank (it gathers where needed)
            if self.args.should_save:
                unwrapped.get_base_model().save_pretrained(staging, state_dict=merged_lora_state_dict(unwrapped))
                self.processing_class.save_pretrained(staging)
        else:
            self.save_model(staging)
        if self.args.should_save:
            noise_scheduler = getattr(self.data_collator, "noise_scheduler", None)
            if noise_scheduler is not None:
                noise_scheduler.save_pretrained(staging)
            self.state.save_to_json(os.path.join(staging, "trainer_state.json"))
            write_stage_state(staging, stage_state(self.block_sizes, stage, self.state.global_step, complete=True))
            publish_stage(staging, final)
        self.accelerator.wait_for_everyone()
        return final

    def _load_stage_weights(self, folder: str) -> None:
        if self.is_deepspeed_enabled or (self.is_fsdp_enabled and not self.accelerator.is_fsdp2):
            raise ValueError(
                f"Resuming at a stage boundary (from {folder!r}) is not supported with DeepSpeed or FSDP version 1. "
                "Start a new run from that folder's model with `block_sizes` set to the remaining stages, or use "
                "FSDP2 (`fsdp_version: 2`)."
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._load_from_checkpoint(os.path.join(folder, "adapter") if is_peft_model(unwrapped) else folder)

    # ------------------------------------------------------------------ the stage loop
    def _begin_stage(self, stage: int, root: str) -> None:
        block_size = self.block_sizes[stage]
        self.stage = stage
        self._base_model.config.block_size = block_size  # the model builds its mask with it (and saves it)
        if hasattr(self.data_collator, "block_size"):
            self.data_collator.block_size = block_size
        steps = self.args.steps_of_stage(stage)
        self.args.max_steps = -1 if steps is None else steps
        self.args.output_dir = os.path.join(root, stage_checkpoints_dir_name(block_size))
        # a fresh optimizer and schedule per stage (DESIGN 3.5); Trainer creates them when they are None
        self.optimizer = None
        self.lr_scheduler = None

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run every stage of `block_sizes`, writing ``stage-b{B}`` after each (see `stages.resume_point` for resume).

        Returns the last stage's `TrainOutput` (per-stage histories are in `stage_log_history`).
        """
        root = self.run_dir = self.args.output_dir
        start, checkpoint, weights_from = resume_point(root, self.block_sizes, resume_from_checkpoint)
        if start >= len(self.block_sizes):
            logger.warning("Every stage of block_sizes=%s is already complete in %s.", self.block_sizes, root)
            return TrainOutput(global_step=0, training_loss=0.0, metrics={})
        if weights_from is not None:
            self._load_stage_weights(weights_from)
        saved = (self.args.output_dir, self.args.max_steps)
        output = None
        try:
            for stage in range(start, len(self.block_sizes)):
                self._begin_stage(stage, root)
                output = super().train(
                    resume_from_checkpoint=checkpoint if stage == start else None,
                    trial=trial,
                    ignore_keys_for_eval=ignore_keys_for_eval,
                    **kwargs,
                )
                self.stage_log_history[self.block_sizes[stage]] = list(self.state.log_history)
                self.save_stage(stage, root)
        finally:
            self.args.output_dir, self.args.max_steps = saved
        return output


def load_safetensors_weights(folder: str) -> dict[str, torch.Tensor]:
    """The full state dict of a `save_pretrained` folder: ``model.safetensors`` or its shards (with their index)."""
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index):
        raise ValueError(
            f"No safetensors weights in {folder!r} (model.safetensors or model.safetensors.index.json): it is not a "
            "checkpoint written by this trainer. Resume from a `checkpoints-b{B}/checkpoint-N` or `stage-b{B}` folder."
        )
    with open(index) as handle:
        files = sorted(set(json.load(handle)["weight_map"].values()))
    state_dict = {}
    for name in files:
        state_dict.update(load_file(os.path.join(folder, name)))
    return state_dict


@contextlib.contextmanager
def unsharded_class(model):
    """Give an FSDP2-sharded model its own class back for the duration of the block (a no-op for any other model).

    `fully_shard` swaps a module's class for a generated subclass, ``FSDP{Name}`` (defined in torch). Saved as is,
    `save_pretrained` would write that class into `config.json`'s `auto_map` and copy torch's FSDP files instead of the
    model's own (`modeling_bard_vl.py`, ...), and the folder would no longer load with `trust_remote_code=True`.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        yield model
        return
    sharded = type(model)
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.__class__ = next(base for base in sharded.__mro__[1:] if not issubclass(base, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = sharded


_CPU_FSDP_VERSION_ERROR = (
    "The accelerate config asks for FSDP version {version} on CPU processes. Only FSDP2 runs on CPU: set "
    "`fsdp_version: 2` (examples/accelerate_configs/fsdp2_cpu.yaml), or shard on GPUs."
)


def enable_cpu_fsdp2(accelerator) -> bool:
    """Turn on FSDP2 for CPU processes (gloo) that `accelerate launch` started with an FSDP config; True if it did.

    accelerate enables FSDP only on accelerator devices: with `use_cpu` its state stays MULTI_CPU and the processes
    would train replicated (DDP) although the config asks for sharding. PyTorch's FSDP2 (`fully_shard`) runs on CPU
    with gloo, so for FSDP version 2 this sets the state accelerate would set on GPUs: distributed type FSDP and the
    plugin built from the launcher's environment (`FSDP_*` variables). `accelerator.prepare` then shards the model with
    accelerate's own FSDP2 path. FSDP version 1 on CPU is refused (its CPU support is partial and deprecated).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables of `accelerate launch`
    if plugin.fsdp_version != 2:
        raise ValueError(_CPU_FSDP_VERSION_ERROR.format(version=plugin.fsdp_version))
    if plugin.cpu_offload is not None and getattr(plugin.cpu_offload, "pin_memory", False):
        raise ValueError("`fsdp_offload_params: true` has no meaning on CPU processes; set it to false.")
    # Both singletons: a later `AcceleratorState()` copies the process-level state (PartialState's) over its own.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    if accelerator.is_main_process:
        logger.warning(
            "FSDP2 on %d CPU processes (gloo): accelerate leaves FSDP off on CPU, so the trainer turns it on itself.",
            accelerator.num_processes,
        )
    return True


__all__ = [
    "BlockDiffusionTrainer",
    "NoiseScheduleCallback",
    "NonFiniteStepCallback",
    "NonFiniteTrainingError",
    "enable_cpu_fsdp2",
    "input_paths",
    "is_vision_tower_parameter",
    "load_pretrained_model",
    "unsharded_class",
]
