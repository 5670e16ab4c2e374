"""BlockMergeConfig: every knob of progressive block merging (PBM, DESIGN 3.1-3.5) with the paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_diffusion_config import BlockDiffusionConfig, _is_int, _is_number


@dataclass
class BlockMergeConfig(BlockDiffusionConfig):
    r"""
    Configuration of [`BlockMergeTrainer`]: supervised block-diffusion fine-tuning over a schedule of growing block
    sizes, each stage initialised from the previous one (DESIGN 3.5). With `block_sizes=[B]` it is plain
    block-diffusion fine-tuning at block size B.

    The defaults follow the paper's reference runs (DESIGN 3.5): peak learning rate 2e-5 (2e-6 for the vision tower
    except its mergers), AdamW betas (0.9, 0.95), weight decay 0, clipping 1.0, a warmup of min(1000, 10% of the
    stage's steps) then cosine decay to 5% of the peak, restarted at every stage.

    Only the parameters specific to PBM are listed; see [`BlockDiffusionConfig`] (warmup cap, vision learning rate,
    noise), [`trl.SFTConfig`] and [`transformers.TrainingArguments`] for the others.

    Parameters:
        > Schedule

        block_sizes (`list[int]`, *optional*, defaults to `[4, 8, 16, 32]`):
            Block size of each stage, in training order. Strictly increasing, each a multiple of the previous one.
        stage_steps (`list[int]`, *optional*):
            Optimizer steps of each stage: one value per block size, or a single value for every stage. When unset,
            each stage runs `max_steps` steps if that is set, else `num_train_epochs` epochs.

        > Loss (DESIGN 3.4)

        use_fused_lm_head (`bool`, *optional*, defaults to `False`):
            Score the supervised positions with TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, installed
            by `SFTTrainer`): the LM head and the log-softmax run in tiles, so the `[N, vocab]` logits never exist.
            Works sharded (FSDP2 gathers the head weight). False: the model's selective head (`logits_mask`) returns
            `[N, vocab]` logits. Both give the same loss and gradients.
        loss_min_rate (`float`, *optional*):
            Lower clamp of the noise rate t in the 1/t loss weight (DESIGN 3.4). Unset: no clamp (t >= noise_min_rate
            / number of blocks is guaranteed by the scheduler anyway).

    Example:

    ```python
    >>> from transformers_bard import BlockMergeConfig
    >>> args = BlockMergeConfig(output_dir="bard-vl-4b-pbm", block_sizes=[4, 8, 16, 32], stage_steps=[2000],
    ...                         per_device_train_batch_size=4, gradient_accumulation_steps=8, noise_prior="mix",
    ...                         use_fused_lm_head=True)  # every other field: the paper's recipe (see above)
    >>> args.learning_rate, args.vision_learning_rate
    (2e-05, 2e-06)
    ```
    """

    # ------------------------------------------------------------------ schedule
    block_sizes: list[int] = field(
        default_factory=lambda: [4, 8, 16, 32],
        metadata={
            "help": "Block size of each stage in training order; strictly increasing, each a multiple of the "
            "previous (paper: 4 8 16 32). One value gives plain block-diffusion fine-tuning."
        },
    )
    stage_steps: list[int] | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of each stage (one value per block size, or one value for all). Unset: each "
            "stage runs `max_steps` if set, else `num_train_epochs` epochs."
        },
    )

    # ------------------------------------------------------------------ loss
    use_fused_lm_head: bool = field(
        default=False,
        metadata={
            "help": "Score the supervised positions with TRL's fused LM head (tiles; the [N, vocab] logits never "
            "exist; works with FSDP2). False: the model's selective head returns [N, vocab] logits."
        },
    )
    loss_min_rate: float | None = field(
        default=None, metadata={"help": "Lower clamp of the noise rate t in the 1/t loss weight; unset: no clamp."}
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_schedule()
        if not isinstance(self.use_fused_lm_head, bool):
            raise ValueError(f"`use_fused_lm_head` must be a bool, got {self.use_fused_lm_head!r}.")
        if self.loss_min_rate is not None and (
            not _is_number(self.loss_min_rate) or not 0.0 < self.loss_min_rate <= 1.0
        ):
            raise ValueError(f"`loss_min_rate` must be None or in (0, 1], got {self.loss_min_rate!r}.")

    def _validate_schedule(self) -> None:
        sizes = self.block_sizes
        if not isinstance(sizes, (list, tuple)) or not sizes or not all(_is_int(b) and b >= 1 for b in sizes):
            raise ValueError(
                f"`block_sizes` must be a non-empty list of integers >= 1, got {sizes!r}. Use e.g. [4, 8, 16, 32]."
            )
        self.block_sizes = list(sizes)
        for previous, current in zip(sizes, sizes[1:]):
            if current <= previous or current % previous:
                raise ValueError(
                    f"`block_sizes` must be strictly increasing with each a multiple of the previous one, got "
                    f"{sizes!r} ({current} after {previous}). Use e.g. [4, 8, 16, 32]."
                )
        if self.stage_steps is not None:
            steps = self.stage_steps
            if not isinstance(steps, (list, tuple)) or not all(_is_int(s) and s >= 1 for s in steps):
                raise ValueError(f"`stage_steps` must be a list of integers >= 1, got {steps!r}.")
            if len(steps) not in (1, len(sizes)):
                raise ValueError(
                    f"`stage_steps` must have one value, or one per block size ({len(sizes)} for block_sizes="
                    f"{sizes}), got {list(steps)!r}."
                )
            if self.max_steps > 0:
                raise ValueError(
                    f"Set either `stage_steps` ({list(steps)}) or `max_steps` ({self.max_steps}), not both: "
                    "`max_steps` alone gives every stage that many steps."
                )
            self.stage_steps = list(steps)

    def steps_of_stage(self, stage: int) -> int | None:
        """Optimizer steps of stage `stage` (0-based), or None when it runs `num_train_epochs` epochs."""
        if self.stage_steps is not None:
            return self.stage_steps[stage] if len(self.stage_steps) > 1 else self.stage_steps[0]
        return super().steps_of_stage(stage)


__all__ = ["BlockMergeConfig"]
