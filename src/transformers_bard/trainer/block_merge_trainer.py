"""BlockMergeTrainer: progressive block merging (PBM, DESIGN 3.1-3.5) on the shared `BlockDiffusionTrainer`.

One `train()` runs the whole schedule of `BlockMergeConfig.block_sizes`: for each block size B it sets
`model.config.block_size = B` and the collator's block size, trains the stage with a fresh optimizer and a fresh
warmup + cosine schedule, and writes a complete, loadable checkpoint ``{output_dir}/stage-b{B}``. Each stage starts
from the previous stage's weights. With `block_sizes=[B]` it is plain block-diffusion fine-tuning. Stage layout and
resume: `stages.py`.

Hooks: `compute_loss` (the ELBO-weighted masked cross-entropy of DESIGN 3.4, `losses.block_merge_loss`) and
`num_loss_items` (the loss is normalised by the samples of the optimizer step). The supervised positions are scored
either by the model's selective head (`logits_mask`: ``[N, V]`` logits) or, with `use_fused_lm_head`, by TRL's fused
LM head (`trl.trainer.utils.add_fused_lm_head`, which `SFTTrainer` installs on the model): it returns per-position
log-probabilities without ever building the logits, and the 1/t weights are applied to them here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, TrainerCallback

from .block_diffusion_trainer import BlockDiffusionTrainer, is_vision_tower_parameter
from .block_merge_config import BlockMergeConfig
from .collator import LOSS_KEYS
from .losses import block_merge_loss
from .stages import STAGE_STATE_NAME, merged_lora_state_dict, stage_checkpoints_dir_name, stage_dir_name


def fused_lm_head_inputs(model: PreTrainedModel, inputs: dict, labels: torch.LongTensor) -> dict:
    """Inputs of `model(..., fused_lm_head=True)` (TRL's fused LM head) for a packed block-diffusion batch.

    The fused forward runs the backbone (`model.model`) directly, so the block-diffusion mask and the packed M-RoPE
    positions that `BardVLForConditionalGeneration.forward` would build from `segment_ids` are built here (DESIGN
    3.1-3.2). The labels go in as `shift_labels`, which TRL scores at their own position without its causal shift:
    exactly the unshifted block-diffusion targets; -100 everywhere but the supervised (`logits_mask`) positions.
    Under `config.prediction_shift` (DESIGN 4.1) each label sits at the column of the hidden state that predicts it
    (`model.logit_positions`), so the scores are read back at those columns.

    Args:
        model: the (unwrapped, non-PEFT) `BardVLForConditionalGeneration`, for its mask and positions.
        inputs: the collated model inputs (`input_ids`, `segment_ids`, `logits_mask`, multimodal inputs).
        labels: ``[b, L]`` clean tokens.
    """
    inputs = dict(inputs)
    segment_ids = inputs.pop("segment_ids")
    logits_mask = inputs.pop("logits_mask").bool()  # [b, L]
    if inputs.get("position_ids") is None:
        with torch.no_grad():
            inputs["position_ids"] = model.get_packed_position_ids(
                inputs["input_ids"],
                segment_ids,
                inputs.get("mm_token_type_ids"),
                inputs.get("image_grid_thw"),
                inputs.get("video_grid_thw"),
            )  # [3, b, L]
    inputs["attention_mask"] = model.block_diffusion_attention_mask(segment_ids)  # [b, 1, L, L]
    if model.config.prediction_shift:
        shift_labels = torch.full_like(labels, -100)
        shift_labels[model.logit_positions(segment_ids, logits_mask)] = labels[logits_mask]  # label at its source
        inputs["shift_labels"] = shift_labels  # [b, L]
    else:
        inputs["shift_labels"] = labels.masked_fill(~logits_mask, -100)  # [b, L]
    return inputs


class BlockMergeTrainer(BlockDiffusionTrainer):
    """Trainer for progressive block merging (DESIGN 3.5): block-diffusion SFT over growing block sizes.

    Args:
        model: a `BardVLForConditionalGeneration` (or its path) with `config.mask_token_id` set, e.g. the output of
            `transformers_bard.convert_from_autoregressive`.
        args: a `BlockMergeConfig`.
        data_collator: defaults to a `BlockDiffusionCollator` built from `processing_class` and `args`.
        train_dataset / eval_dataset: chat datasets in TRL's vision format (`messages`, optional `images`). The
            trainer adds a `bard_sample_index` column (see `collator.add_sample_index`).
        processing_class: defaults to `BardVLProcessor.from_pretrained(model path)`.
        callbacks: extra `TrainerCallback`s.
        peft_config: a `peft.LoraConfig` to train LoRA adapters; each stage checkpoint then holds the merged model
            (and the adapter under ``adapter/``).

    After `train()`, `stage_log_history[B]` holds each stage's `log_history` (steps restart at 0 in every stage).

    Example:

    ```python
    >>> from datasets import load_dataset
    >>> from transformers_bard import BlockMergeConfig, BlockMergeTrainer
    >>> dataset = load_dataset("your-org/your-vlm-sft-mixture", split="train")  # `messages` (+ `images`), TRL's format
    >>> args = BlockMergeConfig(output_dir="bard-vl-4b-pbm", block_sizes=[4, 8, 16, 32], num_train_epochs=1,
    ...                         per_device_train_batch_size=4, gradient_accumulation_steps=8, bf16=True)
    >>> trainer = BlockMergeTrainer("bard-vl-4b-b4", args=args, train_dataset=dataset)  # a converted checkpoint
    >>> trainer.train()  # bard-vl-4b-pbm/stage-b4, stage-b8, stage-b16, stage-b32
    >>> trainer.train(resume_from_checkpoint=True)  # after an interruption: the right stage, the right step
    ```
    """

    config_class = BlockMergeConfig
    _tag_names = ["trl", "sft", "bard", "block-diffusion"]
    _name = "BlockMerge"

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
        args = self.resolve_args(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset)
        super().__init__(
            model,
            args=args,
            block_sizes=args.block_sizes,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )

    # ------------------------------------------------------------------ loss (DESIGN 3.4)
    def num_loss_items(self, batch: dict) -> int | None:
        """Samples of a micro-batch: the PBM loss is a mean over the samples of the optimizer step."""
        return batch["response_lengths"].numel() if "response_lengths" in batch else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        targets = {key: inputs.pop(key) for key in LOSS_KEYS if key in inputs}
        logits_mask = inputs["logits_mask"].bool()  # [b, L]
        if self.args.use_fused_lm_head:
            fused_inputs = fused_lm_head_inputs(self._base_model, inputs, targets["labels"])
            outputs = model(**fused_inputs, fused_lm_head=True)
            # [b, L] per-position log-probabilities and top-1 flags, zero off the supervised positions -> [N]
            # ([N], [N]): the column scoring each target, in the targets' row-major order (shifted: its source)
            scored_at = self._base_model.logit_positions(inputs["segment_ids"], logits_mask)
            scored = {"ce": -outputs.log_probs[scored_at], "correct": outputs.is_top1[scored_at].bool()}
        else:
            outputs = model(**inputs, use_cache=False)
            scored = {"logits": outputs.logits}  # [N, V]
        num_samples, scale = self.loss_normaliser(num_items_in_batch, targets["response_lengths"].numel())
        loss, stats = block_merge_loss(
            targets["labels"],
            logits_mask,
            targets["rates"],
            targets["is_eos_padding"],
            targets["response_lengths"],
            num_samples,
            min_rate=self.args.loss_min_rate,
            **scored,
        )
        loss = loss * scale

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


__all__ = [
    "BlockMergeTrainer",
    "fused_lm_head_inputs",
    # re-exported from their modules (stages, losses, block_diffusion_trainer) for existing imports
    "STAGE_STATE_NAME",
    "block_merge_loss",
    "is_vision_tower_parameter",
    "merged_lora_state_dict",
    "stage_checkpoints_dir_name",
    "stage_dir_name",
]
