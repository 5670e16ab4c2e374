"""BlockMergeTrainer: progressive block merging (PBM, DESIGN 3.1-3.5) on top of TRL's `SFTTrainer`.

One `train()` runs the whole schedule of `BlockMergeConfig.block_sizes`: for each block size B it sets
`model.config.block_size = B` and the collator's block size, trains the stage with a fresh optimizer and a fresh
warmup + cosine schedule, and writes a complete, loadable checkpoint ``{output_dir}/stage-b{B}``. Each stage starts
from the previous stage's weights. With `block_sizes=[B]` it is plain block-diffusion fine-tuning.

Hooks overridden: `train` (the stage loop), `compute_loss` (DESIGN 3.4), `create_optimizer` (vision learning rate),
`create_scheduler` (per-stage warmup cap), `_get_num_items_in_batch` (samples, not tokens) and `_save_checkpoint`
(stage bookkeeping). The loss math is in `block_merge_loss` (and `trainer.losses`), testable without a trainer.

Stage bookkeeping (for `resume_from_checkpoint`):

- mid-stage checkpoints go to ``{output_dir}/checkpoints-b{B}/checkpoint-{step}`` (steps count within the stage) and
  hold a ``bard_stage.json`` naming the stage;
- a finished stage is ``{output_dir}/stage-b{B}`` (written to a temporary folder and renamed, so it exists only when
  complete) with ``bard_stage.json`` marked complete.

`resume_from_checkpoint=True` skips the finished stages, continues the first unfinished one from its last mid-stage
checkpoint (weights, optimizer, scheduler, RNG, step), or, without one, starts it from the previous stage's weights.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoModelForImageTextToText, PreTrainedModel, TrainerCallback
from transformers.optimization import get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint
from transformers.utils import ModelOutput
from trl import SFTTrainer
from trl.trainer.utils import create_model_from_path

from ..models.bard_vl.processing_bard_vl import BardVLProcessor
from .block_merge_config import BlockMergeConfig
from .collator import LOSS_KEYS, SAMPLE_INDEX_COLUMN, BlockDiffusionCollator
from .losses import block_diffusion_loss, block_diffusion_weights, chunked_cross_entropy

logger = logging.getLogger(__name__)

STAGE_STATE_NAME = "bard_stage.json"


def stage_dir_name(block_size: int) -> str:
    """Folder (under `output_dir`) of the finished stage at `block_size`."""
    return f"stage-b{block_size}"


def stage_checkpoints_dir_name(block_size: int) -> str:
    """Folder (under `output_dir`) of the mid-stage checkpoints of the stage at `block_size`."""
    return f"checkpoints-b{block_size}"


def block_merge_loss(
    labels: torch.LongTensor,
    logits_mask: torch.BoolTensor,
    rates: torch.Tensor,
    is_eos_padding: torch.BoolTensor,
    response_lengths: torch.LongTensor,
    num_samples: int | torch.Tensor,
    logits: torch.Tensor | None = None,
    ce: torch.Tensor | None = None,
    correct: torch.BoolTensor | None = None,
    min_rate: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PBM loss of a packed batch (DESIGN 3.4), from the selected logits or from per-position cross-entropies.

    Args:
        labels, rates, is_eos_padding: ``[b, L]`` collator outputs (clean token / block rate / EOS-padding flag).
        logits_mask: ``[b, L]`` supervised (corrupted xt) positions; its N True entries, row-major, are the rows of
            `logits` (and the entries of `ce` / `correct`).
        response_lengths: ``[b]`` padded response length R_s of each sample.
        num_samples: samples in the whole optimizer step (all micro-batches, all ranks).
        logits: ``[N, V]`` from `model(..., logits_mask=...)`; or
        ce, correct: ``[N]`` fp32 cross-entropies and argmax hits from the chunked LM head (`add_chunked_lm_head`).
        min_rate: optional clamp of t in 1/t.

    Returns:
        `(loss, stats)` as `losses.block_diffusion_loss`: the fp32 loss and detached `ce_sum`, `num_tokens`,
        `num_correct`.
    """
    logits_mask = logits_mask.bool()
    targets = labels[logits_mask]  # [N]
    position_rates = rates[logits_mask]  # [N]
    position_eos = is_eos_padding[logits_mask].bool()  # [N]
    sample_index = logits_mask.nonzero()[:, 0]  # [N], row of each supervised position
    if logits is not None:
        return block_diffusion_loss(
            logits, targets, position_rates, sample_index, response_lengths, position_eos, num_samples, min_rate
        )
    if ce is None or correct is None:
        raise ValueError("Pass `logits`, or the per-position `ce` and `correct` of the chunked LM head.")
    weights = block_diffusion_weights(position_rates, sample_index, response_lengths, position_eos, min_rate)  # [N]
    if isinstance(num_samples, torch.Tensor):
        num_samples = num_samples.to(device=ce.device, dtype=torch.float32)
    loss = (ce.float() * weights).sum() / num_samples
    stats = {
        "ce_sum": ce.detach().float().sum(),
        "num_tokens": torch.tensor(ce.shape[0], device=ce.device),
        "num_correct": correct.sum(),
    }
    return loss, stats


@dataclass
class ChunkedLMHeadOutput(ModelOutput):
    """Forward output under `add_chunked_lm_head`: ``[N]`` fp32 cross-entropies and ``[N]`` argmax hits."""

    ce: torch.FloatTensor | None = None
    correct: torch.BoolTensor | None = None


def add_chunked_lm_head(model: PreTrainedModel) -> None:
    """Let `model(..., ce_labels=[N], ce_chunk_size=c)` return per-position `ce` and `correct` from a chunked LM head.

    The backbone runs with `skip_logits=True` (the model's `logits_mask` selects the N positions) and
    `losses.chunked_cross_entropy` applies the LM head chunk by chunk *inside* the forward call: DDP then sees the LM
    head weight used in its forward (computing it outside, after the call, makes DDP mark that weight ready twice).
    Returns a `ChunkedLMHeadOutput` then (DDP rebuilds output objects from their fields, so no extra keys can ride
    on the model's own output). Without `ce_labels` the forward is unchanged. Patch the model before wrapping it with PEFT (as TRL's fused head).
    """
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, ce_labels=None, ce_chunk_size=None, **kwargs):
        if ce_labels is None:
            return original_forward(*args, **kwargs)
        outputs = original_forward(*args, skip_logits=True, **kwargs)
        # looked up per call: PEFT and FSDP replace modules after patching
        weight = self.get_output_embeddings().weight
        ce, correct = chunked_cross_entropy(
            outputs.selected_hidden_states, weight, ce_labels, ce_chunk_size, return_correct=True
        )  # [N], [N]
        return ChunkedLMHeadOutput(ce=ce, correct=correct)

    model.forward = types.MethodType(forward, model)


def is_vision_tower_parameter(name: str) -> bool:
    """Whether a parameter trains at `vision_learning_rate`: in the vision tower, outside its mergers (DESIGN 3.5).

    Works on plain, PEFT-wrapped and FSDP/DDP-prefixed names (`...model.visual.blocks.0...`); the merger and the
    DeepStack mergers (`merger`, `deepstack_merger_list`) map vision features into the language model and train at the
    language model's rate.
    """
    return ".visual." in f".{name}" and "merger" not in name


def merged_lora_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """State dict of the base model with the active LoRA adapter merged in, without touching the training model.

    Adds each LoRA layer's `get_delta_weight` to its base weight (``W + scale * B @ A``, computed in fp32-safe PEFT
    code), drops the adapter tensors, unwraps `modules_to_save` copies, and restores the plain module names, so the
    result loads into the model class as a full checkpoint.
    """
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    base = peft_model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A and not module.merged:
            deltas[f"{name}.weight"] = module.get_delta_weight(adapter)
    merged = {}
    for key, value in base.state_dict().items():
        parts = key.split(".")
        if any(part.startswith("lora_") for part in parts) or "original_module" in parts:
            continue
        key = key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        merged[key] = value.detach()
    return merged


def add_sample_index(dataset):
    """Add the `bard_sample_index` column (row index) that seeds each sample's noise and names it in errors.

    `Dataset.add_column` adds an in-memory column next to the (memory-mapped) data; an `IterableDataset` gets it
    lazily. Datasets that already have the column keep theirs.
    """
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return type(dataset)({name: add_sample_index(split) for name, split in dataset.items()})
    if SAMPLE_INDEX_COLUMN in (dataset.column_names or []):
        return dataset
    if isinstance(dataset, Dataset):
        return dataset.add_column(SAMPLE_INDEX_COLUMN, list(range(len(dataset))))
    if isinstance(dataset, IterableDataset):
        return dataset.map(lambda _, index: {SAMPLE_INDEX_COLUMN: index}, with_indices=True)
    raise TypeError(f"`train_dataset` must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")


class _NoiseScheduleCallback(TrainerCallback):
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


class BlockMergeTrainer(SFTTrainer):
    """Trainer for progressive block merging (DESIGN 3.5): block-diffusion SFT over growing block sizes.

    Args:
        model: a `BardVLForConditionalGeneration` (or its path) with `config.mask_token_id` set, e.g. the output of
            `transformers_bard.convert_from_autoregressive`.
        args: a `BlockMergeConfig`.
        data_collator: defaults to a `BlockDiffusionCollator` built from `processing_class` and `args`.
        train_dataset / eval_dataset: chat datasets in TRL's vision format (`messages`, optional `images`). The
            trainer adds a `bard_sample_index` column (see `add_sample_index`).
        processing_class: defaults to `BardVLProcessor.from_pretrained(model path)`.
        callbacks: extra `TrainerCallback`s.
        peft_config: a `peft.LoraConfig` to train LoRA adapters; each stage checkpoint then holds the merged model
            (and the adapter under ``adapter/``).

    After `train()`, `stage_log_history[B]` holds each stage's `log_history` (steps restart at 0 in every stage).
    """

    _tag_names = ["trl", "sft", "bard", "block-diffusion"]
    _name = "BlockMerge"
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
    # compute_loss divides by the samples of the whole optimizer step (DESIGN 3.4): no further division by the
    # number of accumulation steps
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: BlockMergeConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict | None = None,
        processing_class=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = BlockMergeConfig(f"{os.path.basename(str(name).rstrip('/')) or 'model'}-BlockMerge")
        elif not isinstance(args, BlockMergeConfig):
            raise TypeError(f"`args` must be a BlockMergeConfig, got {type(args).__name__}.")
        if optimizers != (None, None):
            raise ValueError(
                "`optimizers` cannot be passed: BlockMergeTrainer creates a fresh optimizer and schedule for every "
                "stage. Configure them through BlockMergeConfig (learning_rate, vision_learning_rate, optim, ...)."
            )
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a chat dataset with `messages` (and optional `images`).")

        if isinstance(model, str):
            model_id = model
            init_kwargs = dict(args.model_init_kwargs or {})
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init_kwargs["device_map"] = None  # as SFTTrainer: distributed training requires it
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = create_model_from_path(model, architecture=AutoModelForImageTextToText, **init_kwargs)
            # consumed here: SFTTrainer would warn that they are ignored for an instantiated model
            args.model_init_kwargs = None
        else:
            model_id = model.config._name_or_path
        base_config = (model.get_base_model() if is_peft_model(model) else model).config
        mask_token_id = getattr(base_config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(
                f"The model ({type(model).__name__}) has no `config.mask_token_id`: block diffusion needs a `<|mask|>` "
                "token. Convert the autoregressive checkpoint first with "
                "`transformers_bard.convert_from_autoregressive(source, output_dir)`."
            )
        if processing_class is None:
            processing_class = BardVLProcessor.from_pretrained(model_id)

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
                block_size=args.block_sizes[0],
                noise_scheduler=args.noise_scheduler(),
                max_length=args.max_length,
                seed=args.seed if args.noise_seed is None else args.noise_seed,
            )
        if isinstance(data_collator, BlockDiffusionCollator):
            first = next(iter(train_dataset))
            problem = data_collator.example_problem(first)
            if problem is not None:
                raise ValueError(
                    f"`train_dataset` cannot be trained on: its first row {problem}. The dataset must hold chats "
                    "whose last assistant turn is the response to learn (TRL's `messages` format)."
                )

        if args.ce_chunk_size is not None:
            add_chunked_lm_head(model.get_base_model() if is_peft_model(model) else model)
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

        sharded = self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if sharded and args.ce_chunk_size is not None:
            raise ValueError(
                f"`ce_chunk_size`={args.ce_chunk_size} needs the whole LM-head weight outside the forward, which FSDP "
                "and DeepSpeed ZeRO-3 shard. Unset `ce_chunk_size` (or use DDP / ZeRO-2)."
            )
        if sharded and is_peft_model(self.model):
            raise ValueError(
                "LoRA with FSDP or DeepSpeed ZeRO-3 is not supported: the stage checkpoints merge the adapter into "
                "full weights. Use DDP or ZeRO-2 for LoRA."
            )
        if isinstance(self.data_collator, BlockDiffusionCollator):
            self.add_callback(_NoiseScheduleCallback(self.data_collator))
        self.stage = 0
        self.stage_log_history: dict[int, list[dict]] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def _base_model(self) -> PreTrainedModel:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    @property
    def _root_output_dir(self) -> str:
        return getattr(self, "_stage_root", None) or self.args.output_dir

    def _stage_state(self, stage: int, complete: bool) -> dict:
        return {
            "stage": stage,
            "block_size": self.args.block_sizes[stage],
            "block_sizes": list(self.args.block_sizes),
            "global_step": self.state.global_step,
            "complete": complete,
        }

    def _write_json(self, folder: str, payload: dict) -> None:
        with open(os.path.join(folder, STAGE_STATE_NAME), "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")

    # ------------------------------------------------------------------ loss (DESIGN 3.4)
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Samples of the whole optimizer step: all micro-batches of this rank, summed over ranks (DESIGN 3.4)."""
        if not batch_samples or "response_lengths" not in batch_samples[0]:
            return None
        count = torch.tensor([sum(batch["response_lengths"].numel() for batch in batch_samples)], device=device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count)
        return count.sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        targets = {key: inputs.pop(key) for key in LOSS_KEYS if key in inputs}
        chunk_size = self.args.ce_chunk_size
        if chunk_size is None:
            outputs = model(**inputs, use_cache=False)
        else:
            ce_labels = targets["labels"][inputs["logits_mask"].bool()]  # [N]
            outputs = model(**inputs, use_cache=False, ce_labels=ce_labels, ce_chunk_size=chunk_size)
        if num_items_in_batch is None:
            # evaluation, or a step without accumulation bookkeeping: mean over this batch's samples
            num_samples, rank_scale = targets["response_lengths"].numel(), 1
        else:
            # DDP/FSDP/DeepSpeed average gradients over ranks: multiply back so the result is sum_s L_s / N_step
            num_samples, rank_scale = num_items_in_batch, self.accelerator.num_processes
        loss, stats = block_merge_loss(
            targets["labels"],
            inputs["logits_mask"],
            targets["rates"],
            targets["is_eos_padding"],
            targets["response_lengths"],
            num_samples,
            logits=None if chunk_size is not None else outputs.logits,
            ce=outputs.get("ce"),
            correct=outputs.get("correct"),
            min_rate=self.args.loss_min_rate,
        )
        loss = loss * rank_scale

        # masked-token metrics over all ranks (SFTTrainer's `_metrics`, averaged and emitted by `log`)
        totals = self.accelerator.gather_for_metrics(
            torch.stack([stats["ce_sum"].float(), stats["num_tokens"].float(), stats["num_correct"].float()])[None]
        ).sum(0)
        ce_sum, num_tokens, num_correct = totals.tolist()
        self._metrics[mode]["mean_token_accuracy"].append(num_correct / num_tokens if num_tokens else 0.0)
        self._metrics[mode]["masked_token_ce"].append(ce_sum / num_tokens if num_tokens else 0.0)
        self._metrics[mode]["num_masked_tokens"].append(num_tokens)
        self._metrics[mode]["block_size"].append(float(self._base_model.config.block_size))
        if return_outputs:
            return loss, outputs
        return loss

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

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            self._write_json(folder, self._stage_state(self.stage, complete=False))

    def _save_stage(self, stage: int) -> str:
        """Write the finished stage's complete checkpoint to ``stage-b{B}`` (temporary folder, then rename)."""
        block_size = self.args.block_sizes[stage]
        root = self._root_output_dir
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
            self._save_noise_scheduler(staging)
            self.state.save_to_json(os.path.join(staging, "trainer_state.json"))
            self._write_json(staging, self._stage_state(stage, complete=True))
            if os.path.exists(final):
                # replace an older run's stage: move it aside first, so `final` is never half-written
                old = f"{staging}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(staging, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, final)
        self.accelerator.wait_for_everyone()
        return final

    def _save_noise_scheduler(self, folder: str) -> None:
        scheduler = getattr(self.data_collator, "noise_scheduler", None)
        if scheduler is not None:
            scheduler.save_pretrained(folder)

    # ------------------------------------------------------------------ the stage loop
    def _resume_point(self, resume_from_checkpoint) -> tuple[int, str | None, str | None]:
        """(first stage to train, mid-stage checkpoint to resume, finished-stage folder to load weights from)."""
        sizes = self.args.block_sizes
        root = self.args.output_dir
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() == "true":
            resume_from_checkpoint = True  # `--resume_from_checkpoint true` on the command line
        if resume_from_checkpoint in (None, False):
            return 0, None, None
        if resume_from_checkpoint is True:
            for stage, block_size in enumerate(sizes):
                final = os.path.join(root, stage_dir_name(block_size))
                if os.path.isfile(os.path.join(final, STAGE_STATE_NAME)):
                    continue
                checkpoints = os.path.join(root, stage_checkpoints_dir_name(block_size))
                last = get_last_checkpoint(checkpoints) if os.path.isdir(checkpoints) else None
                if last is not None:
                    return stage, last, None
                if stage == 0:
                    raise ValueError(
                        f"`resume_from_checkpoint=True` but no checkpoint was found in output_dir={root!r} (neither "
                        f"{stage_dir_name(block_size)}/ nor {stage_checkpoints_dir_name(block_size)}/checkpoint-*). "
                        "Start without `resume_from_checkpoint`."
                    )
                return stage, None, os.path.join(root, stage_dir_name(sizes[stage - 1]))
            return len(sizes), None, None
        path = str(resume_from_checkpoint)
        state_file = os.path.join(path, STAGE_STATE_NAME)
        if not os.path.isfile(state_file):
            raise ValueError(
                f"`resume_from_checkpoint`={path!r} has no {STAGE_STATE_NAME}: it is not a BlockMergeTrainer "
                "checkpoint. Pass a `checkpoints-b{B}/checkpoint-{step}` or `stage-b{B}` folder, or True."
            )
        with open(state_file, encoding="utf-8") as handle:
            saved = json.load(handle)
        stage = saved["stage"]
        if stage >= len(sizes) or sizes[stage] != saved["block_size"]:
            raise ValueError(
                f"Checkpoint {path!r} is stage {stage} at block size {saved['block_size']} of the schedule "
                f"{saved['block_sizes']}, which does not match `block_sizes`={sizes}. Resume with the same schedule."
            )
        if saved["complete"]:
            return stage + 1, None, path
        return stage, path, None

    def _load_stage_weights(self, folder: str) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                f"Resuming at a stage boundary (from {folder!r}) is not supported with FSDP or DeepSpeed. Start a new "
                "run from that folder's model with `block_sizes` set to the remaining stages."
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._load_from_checkpoint(os.path.join(folder, "adapter") if is_peft_model(unwrapped) else folder)

    def _begin_stage(self, stage: int) -> None:
        block_size = self.args.block_sizes[stage]
        self.stage = stage
        self._base_model.config.block_size = block_size  # the model builds its mask with it (and saves it)
        if hasattr(self.data_collator, "block_size"):
            self.data_collator.block_size = block_size
        steps = self.args.steps_of_stage(stage)
        self.args.max_steps = -1 if steps is None else steps
        self.args.output_dir = os.path.join(self._stage_root, stage_checkpoints_dir_name(block_size))
        # a fresh optimizer and schedule per stage (DESIGN 3.5); Trainer creates them when they are None
        self.optimizer = None
        self.lr_scheduler = None

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run every stage of `block_sizes`, writing ``stage-b{B}`` after each; see the module docstring for resume.

        Returns the last stage's `TrainOutput` (per-stage histories are in `stage_log_history`).
        """
        start, checkpoint, weights_from = self._resume_point(resume_from_checkpoint)
        sizes = self.args.block_sizes
        if start >= len(sizes):
            logger.warning("Every stage of block_sizes=%s is already complete in %s.", sizes, self.args.output_dir)
            return TrainOutput(global_step=0, training_loss=0.0, metrics={})
        if weights_from is not None:
            self._load_stage_weights(weights_from)
        self._stage_root = self.args.output_dir
        saved = (self.args.output_dir, self.args.max_steps)
        output = None
        try:
            for stage in range(start, len(sizes)):
                self._begin_stage(stage)
                output = super().train(
                    resume_from_checkpoint=checkpoint if stage == start else None,
                    trial=trial,
                    ignore_keys_for_eval=ignore_keys_for_eval,
                    **kwargs,
                )
                self.stage_log_history[sizes[stage]] = list(self.state.log_history)
                self._save_stage(stage)
        finally:
            self.args.output_dir, self.args.max_steps = saved
            self._stage_root = None
        return output


__all__ = [
    "BlockMergeTrainer",
    "STAGE_STATE_NAME",
    "add_chunked_lm_head",
    "add_sample_index",
    "block_merge_loss",
    "is_vision_tower_parameter",
    "merged_lora_state_dict",
    "stage_checkpoints_dir_name",
    "stage_dir_name",
]
