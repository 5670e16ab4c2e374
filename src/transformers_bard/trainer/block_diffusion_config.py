"""BlockDiffusionConfig: the knobs both BARD trainers share (DESIGN 3.1-3.3, 3.5), on top of TRL's `SFTConfig`.

`BlockMergeConfig` (progressive block merging) and `DiffusionDistillConfig` (stage-wise distillation) are siblings on
this class: both train on the packed, noised ``[prefix ; x0 ; xt]`` rows of `BlockDiffusionCollator`, with the vision
tower at its own learning rate and a warmup (capped) + cosine schedule per stage. Each sibling adds only its own
fields (schedule and loss for PBM, teacher and objective for SWD) and its own defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import SFTConfig

from ..noise import MixedNoiseScheduler


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class BlockDiffusionConfig(SFTConfig):
    r"""
    Shared configuration of the BARD trainers: block-diffusion training on packed rows (DESIGN 3.1-3.3), with the
    optimiser groups and the per-stage schedule of DESIGN 3.5. Use [`BlockMergeConfig`] or [`DiffusionDistillConfig`].

    Defaults that differ from `SFTConfig`'s follow the paper's reference runs (DESIGN 3.5): AdamW betas (0.9, 0.95),
    weight decay 0, gradient clipping 1.0, a warmup of min(`max_warmup_steps`, `warmup_ratio` of the stage's steps)
    then cosine decay to `min_lr_rate` of the peak, restarted at every stage; `max_length` 8192;
    `remove_unused_columns=False` (the collator needs the raw `messages`/`images`).

    Parameters:
        > Schedule

        warmup_ratio (`float`, *optional*, defaults to `0.1`):
            Linear warmup length as a fraction of each stage's steps (capped by `max_warmup_steps`).
        max_warmup_steps (`int`, *optional*, defaults to `1000`):
            Upper bound of each stage's warmup: warmup = min(max_warmup_steps, ceil(warmup_ratio * stage steps)).
        min_lr_rate (`float`, *optional*, defaults to `0.05`):
            Final learning rate of the cosine decay, as a fraction of the peak (`lr_scheduler_type` "cosine_with_min_lr").

        > Optimisation

        vision_learning_rate (`float`, *optional*, defaults to `2e-6`):
            Peak learning rate of the vision tower, except its mergers (the merger and the DeepStack mergers), which
            train with `learning_rate` like the language model and the LM head.
        on_nonfinite (`str`, *optional*, defaults to `"stop"`):
            What an optimizer step with a non-finite (NaN or infinite) loss or gradient norm does. `"stop"` raises a
            `NonFiniteTrainingError` naming the step, the stage and the last checkpoint to resume from; `"skip"` drops
            the step's gradients, so the weights and the optimizer state stay as they were, and trains on (the step
            still counts, and the learning-rate schedule advances). Checkpoints with non-finite weights are never
            written, whatever the setting.

        > Noise (DESIGN 3.3)

        noise_prior (`str`, *optional*, defaults to `"mask"`):
            `"mask"`, `"mix"` (mask + random substitutes, teaches revision) or `"uniform"`.
        noise_min_rate (`float`, *optional*, defaults to `0.001`):
            Lower clamp of the per-block uniform draw.
        noise_max_rate (`float`, *optional*, defaults to `1.0`):
            Upper clamp of the per-block uniform draw.
        noise_switch_prior (`str`, *optional*):
            Prior used from `noise_switch_at` (a fraction of each stage) on, e.g. `"mix"` after `"mask"`.
        noise_switch_at (`float`, *optional*):
            Fraction of each stage's steps at which `noise_switch_prior` takes over.
        noise_mix_min_prob (`float`, *optional*, defaults to `0.001`):
            Floor of each `mix` probability before renormalising.
        noise_seed (`int`, *optional*):
            Base seed of the per-sample noise; defaults to `seed`. A sample's noise depends only on this seed, the
            block size, the epoch and the sample's dataset index, not on the batch split.
    """

    # ------------------------------------------------------------------ defaults overridden (DESIGN 3.5)
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (paper: 0.95)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (paper: 0 at 4B, 0.01 at 8B)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (paper: 1.0)."})
    # TRL's configs default the deprecated `gradient_checkpointing` to True, which makes transformers >= 5.24 warn on
    # every config; here the old name defaults to unset and `__post_init__` applies TRL's default (on) to the new name,
    # `activation_checkpointing`. Passing the old name still works and warns, as in transformers.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (on by default, as in TRL).", "nargs": "?",
                  "const": True},
    )
    lr_scheduler_type: str = field(
        default="cosine_with_min_lr",
        metadata={"help": "Learning-rate schedule of each stage (paper: warmup then cosine to `min_lr_rate`)."},
    )
    max_length: int | None = field(
        default=8192,
        metadata={
            "help": "Bound on prompt + EOS-padded response tokens per row (the packed row is prompt + 2 x response). "
            "Longer rows raise a ValueError naming the row; None for no bound."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the collator reads the raw `messages` and `images` columns."},
    )

    # ------------------------------------------------------------------ schedule
    warmup_ratio: float = field(
        default=0.1,
        metadata={"help": "Warmup as a fraction of each stage's steps, capped by `max_warmup_steps` (paper: 0.1)."},
    )
    max_warmup_steps: int = field(default=1000, metadata={"help": "Cap of each stage's warmup steps (paper: 1000)."})
    min_lr_rate: float = field(
        default=0.05,
        metadata={"help": "Final learning rate of the cosine decay as a fraction of the peak (paper: 0.05)."},
    )

    # ------------------------------------------------------------------ optimisation
    vision_learning_rate: float = field(
        default=2e-6,
        metadata={
            "help": "Peak learning rate of the vision tower except its mergers (paper: 2e-6); the language model, "
            "LM head and vision mergers use `learning_rate` (paper: 2e-5)."
        },
    )

    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "Optimizer step with a NaN/inf loss or gradient norm: 'stop' raises (naming the step and the last "
            "checkpoint), 'skip' drops its gradients and trains on.",
            "choices": ["stop", "skip"],
        },
    )

    # ------------------------------------------------------------------ noise
    noise_prior: str = field(
        default="mask",
        metadata={
            "help": "Noise prior: 'mask', 'mix' or 'uniform' (DESIGN 3.3).",
            "choices": ["mask", "mix", "uniform"],
        },
    )
    noise_min_rate: float = field(default=0.001, metadata={"help": "Lower clamp of the per-block noise draw."})
    noise_max_rate: float = field(default=1.0, metadata={"help": "Upper clamp of the per-block noise draw."})
    noise_switch_prior: str | None = field(
        default=None, metadata={"help": "Prior used from `noise_switch_at` (fraction of each stage) on."}
    )
    noise_switch_at: float | None = field(
        default=None, metadata={"help": "Fraction of each stage's steps at which `noise_switch_prior` takes over."}
    )
    noise_mix_min_prob: float = field(
        default=0.001, metadata={"help": "Floor of each 'mix' probability before renormalising (paper: 0.001)."}
    )
    noise_seed: int | None = field(
        default=None, metadata={"help": "Base seed of the per-sample noise; defaults to `seed`."}
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, under transformers' current name
        super().__post_init__()
        self._validate_warmup()
        self._validate_batches()
        self.noise_scheduler()  # validates the noise fields
        # The collator reads the raw chat columns; TRL must neither tokenize nor drop them.
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if self.lr_scheduler_type == "cosine_with_min_lr":
            self.lr_scheduler_kwargs = {**(self.lr_scheduler_kwargs or {})}
            self.lr_scheduler_kwargs.setdefault("min_lr_rate", self.min_lr_rate)

    def _validate_warmup(self) -> None:
        if not _is_number(self.warmup_ratio) or not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"`warmup_ratio` must be in [0, 1], got {self.warmup_ratio!r} (paper: 0.1).")
        if not _is_int(self.max_warmup_steps) or self.max_warmup_steps < 0:
            raise ValueError(
                f"`max_warmup_steps` must be an integer >= 0, got {self.max_warmup_steps!r} (paper: 1000)."
            )
        if self.warmup_steps:
            raise ValueError(
                f"`warmup_steps`={self.warmup_steps} is not used by {type(self).__name__}: each stage warms up for "
                "min(max_warmup_steps, ceil(warmup_ratio * stage steps)). Set `warmup_ratio`/`max_warmup_steps`."
            )
        if not _is_number(self.min_lr_rate) or not 0.0 <= self.min_lr_rate <= 1.0:
            raise ValueError(f"`min_lr_rate` must be in [0, 1], got {self.min_lr_rate!r} (paper: 0.05).")

    def _validate_batches(self) -> None:
        if self.packing:
            raise ValueError(
                "`packing=True` is not supported: block diffusion already packs each sample as [prefix ; x0 ; xt] "
                "and samples must not attend to each other. Set `packing=False`."
            )
        if self.padding_free:
            raise ValueError(
                "`padding_free=True` is not supported: the block-diffusion mask is a padded 4-D mask. Set "
                "`padding_free=False`."
            )
        if self.loss_type != "nll":
            raise ValueError(
                f"`loss_type`={self.loss_type!r} does not apply: the BARD losses are the masked cross-entropies of "
                "DESIGN 3.4 and 3.6. Leave `loss_type='nll'`."
            )
        if self.label_smoothing_factor:
            raise ValueError(
                f"`label_smoothing_factor`={self.label_smoothing_factor} is not supported by the block-diffusion "
                "losses. Set it to 0."
            )
        if self.remove_unused_columns:
            raise ValueError(
                "`remove_unused_columns` must be False: the collator reads the raw `messages`/`images` columns."
            )
        if not _is_number(self.vision_learning_rate) or self.vision_learning_rate < 0:
            raise ValueError(
                f"`vision_learning_rate` must be a number >= 0, got {self.vision_learning_rate!r} (paper: 2e-6)."
            )
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(
                f"`on_nonfinite` must be 'stop' or 'skip', got {self.on_nonfinite!r}. 'stop' (the default) raises at "
                "the first non-finite loss or gradient; 'skip' drops that step's update and trains on."
            )
        if self.noise_seed is not None and not _is_int(self.noise_seed):
            raise ValueError(f"`noise_seed` must be None or an integer, got {self.noise_seed!r}.")

    # ------------------------------------------------------------------ derived values
    def noise_scheduler(self) -> MixedNoiseScheduler:
        """The `MixedNoiseScheduler` described by the `noise_*` fields."""
        try:
            return MixedNoiseScheduler(
                prior=self.noise_prior,
                min_rate=self.noise_min_rate,
                max_rate=self.noise_max_rate,
                switch_prior=self.noise_switch_prior,
                switch_at=self.noise_switch_at,
                mix_min_prob=self.noise_mix_min_prob,
            )
        except ValueError as error:
            # the scheduler names its own arguments; here they are the `noise_*` fields
            raise ValueError(
                f"Invalid noise settings (field `noise_<name>` for argument `<name>`): {error}"
            ) from error

    def steps_of_stage(self, stage: int) -> int | None:
        """Optimizer steps of stage `stage` (0-based): `max_steps` if set, else None (`num_train_epochs` epochs)."""
        return self.max_steps if self.max_steps > 0 else None

    def warmup_steps_of_stage(self, num_training_steps: int) -> int:
        """Warmup of a stage with `num_training_steps` steps: min(max_warmup_steps, ceil(warmup_ratio * steps))."""
        # round first: 30 * 0.1 is 3.0000000000000004 in floating point, which must not become 4
        return min(self.max_warmup_steps, math.ceil(round(num_training_steps * self.warmup_ratio, 6)))


__all__ = ["BlockDiffusionConfig"]
