"""DiffusionDistillConfig: every knob of stage-wise intra-dVLM distillation (SWD, DESIGN 3.6) with the paper's defaults.

A sibling of `BlockMergeConfig` on `BlockDiffusionConfig`: SWD trains on the very same packed, noised block-diffusion
batches as progressive block merging (DESIGN 3.1-3.3) with the same optimiser groups (vision learning rate) and the
same warmup + cosine schedule shape. It adds the teacher and the objective, and the SWD reference defaults; it has no
multi-stage schedule (one stage at the student's block size) and no PBM loss knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .block_diffusion_config import BlockDiffusionConfig, _is_int, _is_number

TEACHER_TYPES = ("diffusion", "autoregressive")
LOSS_NORMALIZATIONS = ("token", "sample")


@dataclass
class DiffusionDistillConfig(BlockDiffusionConfig):
    r"""
    Configuration of [`DiffusionDistillTrainer`]: a frozen small-block dVLM (the B_t = 4 anchor) teaches a large-block
    student (a PBM checkpoint at B_s) on the identical noised packed input (DESIGN 3.6). The objective at the masked
    response positions is `ce_weight * CE + kd_weight * KD` (plain token-mean cross-entropy, top-k KD).

    Only the parameters specific to SWD are listed; the others are those of [`BlockDiffusionConfig`] (noise, vision
    learning rate, warmup cap, ...), [`trl.SFTConfig`] and [`transformers.TrainingArguments`]. Defaults that differ
    from `BlockDiffusionConfig`'s follow the reference SWD runs (DESIGN 3.6): learning rate 6e-6 for every parameter
    (the reference uses one learning rate), 100 warmup steps then cosine decay to 0.5x the peak, 3 epochs, mask rates
    in [0.1, 0.5]. AdamW (0.9, 0.95), no weight decay, clipping 1.0 and gradient checkpointing (SFTConfig's default)
    are inherited and match the reference.

    Parameters:
        > Teacher

        teacher_model_name_or_path (`str`, *optional*):
            Path or Hub id of the teacher, loaded with `AutoModelForImageTextToText` (after `import transformers_bard`)
            when the trainer is not given a teacher model. For `teacher_type="diffusion"`: a BARD-VL checkpoint (the
            B = 4 anchor); for `"autoregressive"`: the AR source (a stock Qwen3-VL) or a BARD-VL model used causally.
        teacher_model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments of the teacher's `from_pretrained` (e.g. `{"dtype": "bfloat16"}`); only with a path.
        teacher_type (`str`, *optional*, defaults to `"diffusion"`):
            `"diffusion"`: the teacher sees the student's packed row with its own block-size mask. `"autoregressive"`
            (the ablation that shows it hurts): the teacher reads `[prefix ; x0]` causally and its logit at position
            p - 1 is the target for student position p.
        teacher_block_size (`int`, *optional*, defaults to `4`):
            Block size B_t of the diffusion teacher's attention mask; must divide the student's block size.

        > Objective

        teacher_topk (`int`, *optional*, defaults to `16`):
            Number k of teacher logits kept per position; the teacher distribution is renormalised over them.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature T of both distributions in the KD term (no T^2 rescaling).
        ce_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the token-mean cross-entropy against the clean tokens (no 1/t weight).
        kd_weight (`float`, *optional*, defaults to `0.5`):
            Weight of the top-k KD term.
        reverse_kd (`bool`, *optional*, defaults to `False`):
            Use the reverse KL restricted to the teacher's top-k ids instead of the forward cross-entropy.
        kd_on_eos_padding (`bool`, *optional*, defaults to `False`):
            Whether the KD term also covers the masked EOS padding past the response's real end. The student's rows
            are EOS-padded to a multiple of B_s, up to B_s - 1 EOS tokens, while the B_t = 4 anchor was trained with
            at most 3: past its own padding the teacher's predictions are out of distribution (on a B = 32 batch of
            the digits demo its top-1 is right at 13% of the masked EOS paddings, at 100% of the other masked
            positions). `False` (the default) keeps the CE term there, whose target EOS is certain, and drops KD;
            `True` distils every masked position as DESIGN 3.6 and the reference code do. The default departs from
            DESIGN 3.6 by measurement (the demo's `kd_eos_padding` ablation, same student and anchor, 400 test rows,
            paired 95% intervals): on the digits task KD at the padding cost 3.0 points [-5.2, -1.4] at B = 32 and
            41% of the tokens per forward (24.8 against 41.7), and 13 points in the earlier SWD study; on the choice
            task it made no difference under mixed noise (-1.3 [-5.9, +3.4] at seed 0, +2.0 [-1.7, +5.7] at
            seed 1) and +1.8 [+0.3, +3.7] between two mask-only models near zero (0.028 vs 0.010).
        loss_normalization (`str`, *optional*, defaults to `"token"`):
            How `ce_weight * CE + kd_weight * KD` is averaged over an optimizer step (all micro-batches and ranks).
            `"token"` (DESIGN 3.6, the reference): a mean over the step's masked positions, so every masked token
            weighs the same and long answers dominate the step. `"sample"`: a mean over each sample's masked
            positions, then a mean over the step's samples (those with at least one masked position), so a
            one-token answer weighs as much as a 77-token one. `"token"` stays the default by measurement: the
            demo's `sample_norm` ablation found no difference four times (same B = 32 student and anchor, 400 test
            rows, paired 95% intervals): digits 0.000 [-0.010, +0.010] at today's defaults and -0.005 [-0.017,
            +0.005] at the old ones, choice +0.005 [-0.005, +0.018] under mask-only noise and -0.015 [-0.047,
            +0.017] under mixed noise (docs/demo_results/README.md).

        > Schedule and noise

        block_sizes (`list[int]`, *optional*):
            Leave unset: SWD trains one block size, the student's `config.block_size`. When set it must be `[B_s]`
            and is checked against the student. The trainer never writes it (see `DiffusionDistillTrainer.block_sizes`).
        noise_min_rate (`float`, *optional*, defaults to `0.1`) / noise_max_rate (`float`, *optional*, defaults to `0.5`):
            Clamp of the per-block uniform draw (the reference SWD configuration; its code effectively trained with
            [0.001, 1.0]). Kept by measurement: the demo's `wide_mask_rates` ablation ([0.001, 1.0] on the same
            student and anchor) found no difference each time: digits 0.000 [-0.010, +0.010] at today's defaults,
            -0.002 [-0.017, +0.011] and +0.003 [-0.016, +0.021] before, choice -0.003 [-0.017, +0.011] under
            mask-only noise; under mixed noise the wide rates cost 9 points at seed 0 (-0.090 [-0.134, -0.046])
            and nothing at seed 1 (0.000 [-0.032, +0.032]).
        learning_rate (`float`, *optional*, defaults to `6e-6`):
            The reference SWD runs' rate for 2B-8B students, kept for models of that size. The demo's 2.5M-parameter
            model uses 3e-5 (`PipelineConfig.swd_learning_rate`), measured there: from an AR-level B = 32 student,
            1e-4 cost 3 points even with a near-zero loss (AdamW moves every weight by about the learning rate per
            step), 3e-5 kept it exact. Tune it with the student's size, and watch exact match, not the loss.

    Example:

    ```python
    >>> from transformers_bard import DiffusionDistillConfig
    >>> args = DiffusionDistillConfig("bard-vl-4b-swd-b16", teacher_model_name_or_path="bard-vl-8b-pbm/stage-b4",
    ...                               per_device_train_batch_size=8)  # LR 6e-6, 100 warmup steps, cosine to 0.5x, 3 epochs
    >>> args.teacher_block_size, args.teacher_topk, args.ce_weight, args.kd_weight, args.kd_on_eos_padding
    (4, 16, 1.0, 0.5, False)
    ```
    """

    _VALID_DICT_FIELDS = BlockDiffusionConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    # ------------------------------------------------------------------ defaults overridden (DESIGN 3.6)
    learning_rate: float = field(
        default=6e-6,
        metadata={"help": "Peak learning rate of the language model, LM head and vision mergers (SWD: 6e-6)."},
    )
    vision_learning_rate: float = field(
        default=6e-6,
        metadata={
            "help": "Peak learning rate of the vision tower except its mergers (SWD: 6e-6, the reference uses one "
            "learning rate for every parameter)."
        },
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the distillation data (SWD: 3)."})
    warmup_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Warmup as a fraction of the run's steps, capped by `max_warmup_steps`. With the defaults the "
            "warmup is min(100, all steps): the reference's 100 warmup steps."
        },
    )
    max_warmup_steps: int = field(default=100, metadata={"help": "Cap of the warmup steps (SWD: 100)."})
    min_lr_rate: float = field(
        default=0.5,
        metadata={"help": "Final learning rate of the cosine decay as a fraction of the peak (SWD: 0.5)."},
    )
    block_sizes: list[int] | None = field(
        default=None,
        metadata={
            "help": "Leave unset: distillation trains at the student's `config.block_size`. When set, it must be "
            "[B_s] and match the student."
        },
    )
    noise_min_rate: float = field(
        default=0.1, metadata={"help": "Lower clamp of the per-block noise draw (SWD mask rates: 0.1)."}
    )
    noise_max_rate: float = field(
        default=0.5, metadata={"help": "Upper clamp of the per-block noise draw (SWD mask rates: 0.5)."}
    )

    # ------------------------------------------------------------------ teacher
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Path or Hub id of the teacher (loaded with AutoModelForImageTextToText) when the trainer gets "
            "no teacher model: the B=4 BARD-VL anchor, or the AR source with teacher_type='autoregressive'."
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'Keyword arguments of the teacher\'s `from_pretrained` (e.g. \'{"dtype": "bfloat16"}\'); only '
            "when the teacher is given as a path."
        },
    )
    teacher_type: str = field(
        default="diffusion",
        metadata={
            "help": "'diffusion' (a BARD-VL teacher on the same packed row with its own block-size mask, DESIGN 3.6) "
            "or 'autoregressive' (the AR source reads [prefix ; x0] causally; logit at p-1 targets position p).",
            "choices": list(TEACHER_TYPES),
        },
    )
    teacher_block_size: int = field(
        default=4,
        metadata={
            "help": "Block size B_t of the diffusion teacher's attention mask (SWD: 4); must divide the student's "
            "block size. Unused with teacher_type='autoregressive'."
        },
    )

    # ------------------------------------------------------------------ objective
    teacher_topk: int = field(
        default=16, metadata={"help": "Teacher logits kept per position; renormalised over these k ids (SWD: 16)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the KD term, no T^2 rescaling (SWD: 1.0)."}
    )
    ce_weight: float = field(
        default=1.0, metadata={"help": "Weight of the plain token-mean cross-entropy, no 1/t (SWD: 1.0)."}
    )
    kd_weight: float = field(default=0.5, metadata={"help": "Weight of the top-k KD term (SWD: 0.5)."})
    reverse_kd: bool = field(
        default=False,
        metadata={"help": "Reverse KL restricted to the teacher's top-k ids instead of the forward cross-entropy."},
    )
    kd_on_eos_padding: bool = field(
        default=False,
        metadata={
            "help": "KD also at the masked EOS padding past the real end (True: DESIGN 3.6 and the reference). "
            "False (default, measured: -3.0 points at B=32 on the digits demo with it): CE only there, where a "
            "B_t-block teacher sees more EOS padding than it was trained with."
        },
    )
    loss_normalization: str = field(
        default="token",
        metadata={
            "help": "'token': CE + KD averaged over the step's masked positions (DESIGN 3.6, the reference). "
            "'sample': averaged over each sample's masked positions, then over the step's samples.",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_block_sizes()
        self._validate_distillation()

    def _validate_block_sizes(self) -> None:
        requested = self.block_sizes
        if requested is None:
            return
        if (
            not isinstance(requested, (list, tuple))
            or len(requested) != 1
            or not _is_int(requested[0])
            or requested[0] < 1
        ):
            raise ValueError(
                f"`block_sizes` must be unset or one block size [B_s] (distillation trains at the student's "
                f"block size), got {requested!r}. Leave it unset to use the student's `config.block_size`."
            )
        self.block_sizes = list(requested)

    def _validate_distillation(self) -> None:
        if self.teacher_type not in TEACHER_TYPES:
            raise ValueError(
                f"`teacher_type` must be one of {TEACHER_TYPES}, got {self.teacher_type!r}. Use 'diffusion' for SWD "
                "(DESIGN 3.6) or 'autoregressive' for the AR-teacher ablation."
            )
        if self.teacher_model_name_or_path is not None and not isinstance(self.teacher_model_name_or_path, str):
            raise ValueError(
                f"`teacher_model_name_or_path` must be a string (path or Hub id), got "
                f"{type(self.teacher_model_name_or_path).__name__}. Pass a model object to the trainer instead."
            )
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError(
                f"`teacher_model_init_kwargs` must be a dict (or a JSON object string), got "
                f"{self.teacher_model_init_kwargs!r}. Use e.g. {{'dtype': 'bfloat16'}}."
            )
        if not _is_int(self.teacher_block_size) or self.teacher_block_size < 1:
            raise ValueError(
                f"`teacher_block_size` must be an integer >= 1, got {self.teacher_block_size!r} (SWD: 4)."
            )
        if self.block_sizes is not None and self.teacher_type == "diffusion":
            student = self.block_sizes[0]
            if student % self.teacher_block_size:
                raise ValueError(
                    f"`teacher_block_size`={self.teacher_block_size} does not divide the student's block size "
                    f"{student} (`block_sizes`={self.block_sizes}). Use a teacher block size that divides it, e.g. 4."
                )
        if not _is_int(self.teacher_topk) or self.teacher_topk < 1:
            raise ValueError(f"`teacher_topk` must be an integer >= 1, got {self.teacher_topk!r} (SWD: 16).")
        if not _is_number(self.temperature) or not self.temperature > 0:
            raise ValueError(f"`temperature` must be a number > 0, got {self.temperature!r} (SWD: 1.0).")
        for name in ("ce_weight", "kd_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r} (SWD: ce_weight 1.0, kd_weight 0.5).")
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("`ce_weight` and `kd_weight` are both 0: nothing would be trained. SWD uses 1.0 and 0.5.")
        if not isinstance(self.reverse_kd, bool):
            raise ValueError(f"`reverse_kd` must be a bool, got {self.reverse_kd!r}.")
        if not isinstance(self.kd_on_eos_padding, bool):
            raise ValueError(f"`kd_on_eos_padding` must be a bool, got {self.kd_on_eos_padding!r}.")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"`loss_normalization` must be one of {LOSS_NORMALIZATIONS}, got {self.loss_normalization!r}. Use "
                "'token' (a mean over the step's masked tokens, DESIGN 3.6) or 'sample' (a mean per sample, then "
                "over the step's samples)."
            )


__all__ = ["DiffusionDistillConfig", "LOSS_NORMALIZATIONS", "TEACHER_TYPES"]
