"""DiffusionDistillTrainer: stage-wise intra-dVLM distillation (SWD, DESIGN 3.6) on the shared `BlockDiffusionTrainer`.

A frozen small-block dVLM (the B_t = 4 anchor) teaches a large-block student (the PBM checkpoint at B_s) on the very
same noised packed row ``[prefix ; x0 ; xt]`` (DESIGN 3.1): same tokens, pixels and M-RoPE positions; only the
teacher's attention mask is rebuilt with B_t. The noise is drawn per *student* block (the collator runs at B_s).

A sibling of `BlockMergeTrainer`: the shared base runs it as a one-stage schedule at the student's block size
(`self.block_sizes = [B_s]`), with the packed collator, the optimiser groups (vision learning rate), the warmup +
cosine schedule, mid-run checkpoints, resume, the LoRA merge and the final checkpoint ``{output_dir}/stage-b{B_s}``
(complete, loadable with the Auto classes, `config.block_size` = B_s). Hooks: `compute_loss` (the SWD objective,
`losses.swd_loss`) and `num_loss_items` (masked tokens, not samples). The teacher is `self.teacher_model`: frozen, in eval mode, never in the optimiser, placed by accelerate
(moved to the device under DDP, `prepare_deepspeed` under DeepSpeed, sharded with `prepare_fsdp` under FSDP).

Loss on one optimizer step with masked positions ``M`` (all micro-batches, all ranks; DESIGN 3.6):

    loss = ce_weight * (1/|M|) sum_{i in M} CE_i + kd_weight * (1/|M|) sum_{i in M} KD_i

with ``M`` = the xt positions holding ``<|mask|>`` (EOS padding included; substituted tokens of the `mix`/`uniform`
priors and clean xt tokens excluded), CE against the clean token (no 1/t weight) and KD the top-k distillation of
`losses.topk_distillation_per_position`. Each micro-batch contributes its sums divided by ``|M|`` of the whole step
(`_get_num_items_in_batch`), so gradient accumulation and data parallelism give the gradient of one large batch.
With `loss_normalization="sample"` each sample's terms are first averaged over its own masked positions and the
step's mean runs over its samples instead (`losses.swd_loss`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, PreTrainedModel, TrainerCallback
from trl.models import prepare_deepspeed, prepare_fsdp

from ..models.bard_vl.masking_bard_vl import CLEAN, NOISY, PAD, PREFIX, block_diffusion_mask
from ..models.bard_vl.modeling_bard_vl import additive_attention_mask
from .block_diffusion_trainer import BlockDiffusionTrainer, load_pretrained_model
from .collator import LOSS_KEYS
from .diffusion_distill_config import DiffusionDistillConfig
from .losses import swd_loss, teacher_topk

logger = logging.getLogger(__name__)

# vision settings that shape `pixel_values` and the image-token count: teacher and student read the same pixels
_VISION_KEYS = ("patch_size", "temporal_patch_size", "spatial_merge_size")


def distillation_positions(
    logits_mask: torch.Tensor, input_ids: torch.LongTensor, mask_token_id: int
) -> torch.BoolTensor:
    """SWD positions (DESIGN 3.6): the supervised xt positions that hold ``<|mask|>``, EOS padding included.

    The collator's `logits_mask` marks every corrupted xt position; under the `mix`/`uniform` priors that includes
    random substitutes, which SWD does not supervise (neither CE nor KD).

    Args:
        logits_mask: ``[b, L]`` the collator's supervised (corrupted xt) positions.
        input_ids: ``[b, L]`` the packed row.
        mask_token_id: id of ``<|mask|>``.

    Returns:
        ``[b, L]`` bool.
    """
    return logits_mask.bool() & (input_ids == mask_token_id)


def packed_lengths(segment_ids: torch.Tensor) -> tuple[int, int]:
    """``(P, R)``: widths of the prefix and of x0 (= of xt) in a packed batch ``[prefix ; x0 ; xt]`` (DESIGN 3.1).

    The longest response fills its R columns, so R is the largest per-row count of noisy tokens and P = L - 2R.
    Raises a `ValueError` when the columns do not follow `BlockDiffusionCollator`'s layout.
    """
    width = segment_ids.shape[1]
    R = int((segment_ids == NOISY).sum(-1).max()) if segment_ids.numel() else 0
    P = width - 2 * R
    blocks = ((0, P, PREFIX), (P, P + R, CLEAN), (P + R, width, NOISY))
    if P < 0 or not all(
        ((segment_ids[:, a:b] == PAD) | (segment_ids[:, a:b] == label)).all() for a, b, label in blocks
    ):
        raise ValueError(
            "`segment_ids` is not a packed [prefix ; x0 ; xt] batch (left-padded prefix, then x0 and xt, each "
            "right-padded to the same width R), as BlockDiffusionCollator builds it."
        )
    return P, R


def autoregressive_teacher_inputs(inputs: dict, positions: torch.BoolTensor) -> tuple[dict, torch.BoolTensor]:
    """Inputs of an autoregressive teacher reading ``[prefix ; x0]`` causally (DESIGN 3.6, the AR-teacher ablation).

    In the packed batch, xt token j of a row sits at column P + R + j and its clean copy at column P + j. A causal
    model predicts the token at column c with its logit at column c - 1, so the target of student position P + R + j
    is the teacher's logit at column P + j - 1 (for j = 0 that is column P - 1, the row's last prompt token: prompts
    are left-padded). The teacher reads the student's own M-RoPE positions of those columns: the positions a causal
    model gives ``[prompt ; response]`` (the response continues after the prompt, DESIGN 2).

    Args:
        inputs: the packed batch: ``input_ids``/``segment_ids`` ``[b, L]``, ``position_ids`` ``[3, b, L]`` and, when
            present, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``.
        positions: ``[b, L]`` the student's supervised positions, all in the xt columns.

    Returns:
        ``(kwargs, targets)``. `kwargs` for the teacher's forward: ``input_ids`` ``[b, P+R]``, a boolean causal
        ``attention_mask`` ``[b, 1, P+R, P+R]`` (padding keys hidden, a padding query sees itself only),
        ``position_ids`` ``[3, b, P+R]``, the multimodal inputs and ``logits_to_keep`` = columns P-1 .. P+R-2, so its
        logits are ``[b, R, V]`` with row r predicting x0 token r. `targets` ``[b, R]`` bool: ``logits[targets]`` is
        ``[N, V]`` in the order of the student's ``hidden[positions]`` (row-major, both).
    """
    segment_ids = inputs["segment_ids"]
    P, R = packed_lengths(segment_ids)
    width = P + R
    if positions[:, :width].any():
        raise ValueError("Distillation positions must lie in the xt columns of the packed batch.")
    if P == 0 or not (segment_ids[:, P - 1] == PREFIX).all():
        raise ValueError(
            "Every row needs a non-empty prompt: an autoregressive teacher predicts the first response token from "
            "the last prompt token."
        )
    # Block size 1 turns the block-diffusion mask into a token-causal mask over prefix and clean tokens (DESIGN 3.2):
    # a token of block i sees the prefix/clean keys of blocks <= i, never a padding key.
    mask = block_diffusion_mask(segment_ids[:, :width], 1, "causal")  # [b, 1, P+R, P+R]
    kwargs = {
        "input_ids": inputs["input_ids"][:, :width],
        "attention_mask": mask,
        "position_ids": inputs["position_ids"][:, :, :width],
        "logits_to_keep": torch.arange(P - 1, width - 1, device=segment_ids.device),
    }
    if inputs.get("mm_token_type_ids") is not None:
        kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, :width]
    for key in ("pixel_values", "image_grid_thw"):
        if inputs.get(key) is not None:
            kwargs[key] = inputs[key]  # images live in the prefix: all of them are in the teacher's columns
    return kwargs, positions[:, width:].bool()


def _source_tokenizer(source):
    """The teacher's tokenizer, for the vocabulary check: from the teacher's path, or from the local folder a teacher
    model was loaded from; None when there is none (e.g. a folder with weights only, or an uncached Hub id offline)."""
    path = (
        source
        if isinstance(source, (str, os.PathLike))
        else getattr(getattr(source, "config", None), "_name_or_path", None)
    )
    if not path or (not isinstance(source, (str, os.PathLike)) and not os.path.isdir(path)):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return None  # a folder or repository with weights only: nothing to compare


class DiffusionDistillTrainer(BlockDiffusionTrainer):
    """Trainer for stage-wise intra-dVLM distillation (SWD, DESIGN 3.6).

    Args:
        model: the student: a `BardVLForConditionalGeneration` (or its path), normally the PBM checkpoint at B_s
            (``stage-b{B_s}``). Its `config.block_size` is the block size trained and saved.
        teacher_model: the teacher, a model or a path (default: `args.teacher_model_name_or_path`), loaded with
            `AutoModelForImageTextToText` and `args.teacher_model_init_kwargs`. For `teacher_type="diffusion"` a
            BARD-VL model (the anchor, trained at `teacher_block_size`); for `"autoregressive"` the AR source or a
            BARD-VL model used causally. It must share the student's vocabulary and tokenizer.
        args: a `DiffusionDistillConfig`.
        data_collator, train_dataset, eval_dataset, processing_class, callbacks, optimizers, peft_config: as
            `BlockMergeTrainer` (a LoRA student's final checkpoint is merged; the teacher is never adapted).

    `block_sizes` is ``[B_s]``, read from the student (the config's `block_sizes`, when set, is only checked).
    After `train()`, ``{output_dir}/stage-b{B_s}`` holds the distilled student. Logged (train and eval): `loss`,
    `ce`, `kd`, `mean_token_accuracy` (student argmax = clean token), `teacher_agreement` (student argmax = teacher
    argmax) and `num_masked_tokens`, each over the masked positions of an optimizer step.

    Example:

    ```python
    >>> from transformers_bard import DiffusionDistillConfig, DiffusionDistillTrainer
    >>> trainer = DiffusionDistillTrainer(
    ...     "bard-vl-4b-pbm/stage-b16",  # student: the PBM stage at B_s (block size read from its config)
    ...     "bard-vl-8b-pbm/stage-b4",   # teacher: the B = 4 anchor (a model object works too)
    ...     args=DiffusionDistillConfig("bard-vl-4b-swd-b16", bf16=True),
    ...     train_dataset=dataset,       # chats in TRL's vision format, as for BlockMergeTrainer
    ... )
    >>> trainer.train()  # bard-vl-4b-swd-b16/stage-b16
    ```
    """

    config_class = DiffusionDistillConfig
    _tag_names = ["trl", "sft", "bard", "block-diffusion", "distillation"]
    _name = "DiffusionDistill"

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: str | PreTrainedModel | None = None,
        args: DiffusionDistillConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict | None = None,
        processing_class=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        peft_config=None,
    ):
        teacher = (
            {"teacher_model": teacher_model}
            if teacher_model is not None
            else {"teacher_model_name_or_path": getattr(args, "teacher_model_name_or_path", None)}
        )
        args = self.resolve_args(model, args, **teacher, train_dataset=train_dataset, eval_dataset=eval_dataset)
        # 1. the student, and its block size B_s: the one stage trained, the block size of the noise and of the
        #    checkpoint
        if isinstance(model, (str, os.PathLike)):
            model = load_pretrained_model(model, args.model_init_kwargs, args)
            args.model_init_kwargs = None  # consumed (as the base does for a path)
        student_config = self._check_student(model)
        block_size = student_config.block_size
        if args.block_sizes is not None and list(args.block_sizes) != [block_size]:
            raise ValueError(
                f"`block_sizes`={args.block_sizes} does not match the student's `config.block_size`={block_size}. "
                "Leave `block_sizes` unset (distillation trains at the student's block size)."
            )
        # 2. the teacher, checked against the student
        source = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        teacher = self._load_teacher(source, args)
        self._check_teacher(teacher, student_config, args)

        super().__init__(
            model,
            args=args,
            block_sizes=[block_size],
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        self._check_tokenizers(source, args)
        student_params = {id(param) for param in self.model.parameters()}
        if any(id(param) in student_params for param in teacher.parameters()):
            raise ValueError(
                "The teacher shares parameters with the student: freezing it would freeze the student. Load the "
                "teacher separately (e.g. pass its path as `teacher_model`)."
            )
        self._teacher_dtype = teacher.dtype
        self._teacher_attn_implementation = teacher.config._attn_implementation or "sdpa"
        self.teacher_model = self._prepare_teacher(teacher)
        # sums (ce, kd, tokens, correct, agreement) of the optimizer step in progress, for exact per-step metrics
        self._step_sums: torch.Tensor | None = None
        self._step_key: int | None = None

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_student(model: PreTrainedModel):
        config = (model.get_base_model() if is_peft_model(model) else model).config
        if getattr(config, "block_size", None) is None or getattr(config, "mask_token_id", None) is None:
            raise ValueError(
                f"The student ({getattr(config, 'model_type', type(config).__name__)}) has no `config.block_size` / "
                "`config.mask_token_id`: it must be a BARD-VL checkpoint, normally a progressive-block-merging stage "
                "(`stage-b{B}` of BlockMergeTrainer)."
            )
        return config

    @staticmethod
    def _load_teacher(source, args: DiffusionDistillConfig) -> PreTrainedModel:
        if source is None:
            raise ValueError(
                "No teacher: pass `teacher_model` (a model or a path) or set `teacher_model_name_or_path`, e.g. the "
                "B=4 anchor (`stage-b4` of BlockMergeTrainer)."
            )
        if isinstance(source, (str, os.PathLike)):
            return load_pretrained_model(source, args.teacher_model_init_kwargs, args, argument="teacher_model")
        if args.teacher_model_init_kwargs is not None:
            raise ValueError(
                f"`teacher_model_init_kwargs`={args.teacher_model_init_kwargs} was set but the teacher is already "
                "instantiated. Pass the teacher as a path, or drop `teacher_model_init_kwargs`."
            )
        return source

    @staticmethod
    def _check_teacher(teacher, student_config, args: DiffusionDistillConfig) -> None:
        """Vocabulary, pixels, mask token, block sizes and attention implementation (errors name both sides)."""
        name = getattr(teacher.config, "_name_or_path", None) or type(teacher).__name__
        teacher_vocab = teacher.config.get_text_config().vocab_size
        student_vocab = student_config.get_text_config().vocab_size
        if teacher_vocab != student_vocab:
            raise ValueError(
                f"The teacher ({name}) has vocab_size {teacher_vocab} but the student has {student_vocab}: KD "
                "compares the two distributions id by id, so both need the same vocabulary. Use a teacher of the "
                "same model family (e.g. Qwen3-VL 2B/4B/8B share 151,936 ids)."
            )
        teacher_image, student_image = (
            getattr(config, "image_token_id", None) for config in (teacher.config, student_config)
        )
        if teacher_image != student_image:
            raise ValueError(
                f"The teacher ({name}) has image_token_id={teacher_image} but the student has {student_image}: both "
                "read the same packed tokens, so both need the same image placeholder id."
            )
        teacher_vision = getattr(teacher.config, "vision_config", None)
        student_vision = getattr(student_config, "vision_config", None)
        for key in _VISION_KEYS:
            ours, theirs = getattr(student_vision, key, None), getattr(teacher_vision, key, None)
            if ours != theirs:
                raise ValueError(
                    f"The teacher ({name}) has vision_config.{key}={theirs} but the student has {ours}: both read "
                    "the same `pixel_values`, so their image patching must agree."
                )
        impl = teacher.config._attn_implementation or "sdpa"
        if impl not in ("sdpa", "eager", "flex_attention"):
            raise ValueError(
                f"The teacher ({name}) uses attn_implementation={impl!r}, which cannot take the 4-D block-diffusion "
                "or causal mask built here. Load it with attn_implementation='sdpa' or 'flex_attention' (in "
                "`teacher_model_init_kwargs`)."
            )
        if args.teacher_type == "autoregressive":
            return
        teacher_mask = getattr(teacher.config, "mask_token_id", None)
        if teacher_mask is None or not hasattr(teacher, "block_diffusion_attention_mask"):
            raise ValueError(
                f"The teacher ({name}, {type(teacher).__name__}) has no mask token (`config.mask_token_id`): "
                "teacher_type='diffusion' needs a BARD-VL dVLM teacher, e.g. the B=4 anchor. For the autoregressive "
                "source model set `teacher_type='autoregressive'`."
            )
        if teacher_mask != student_config.mask_token_id:
            raise ValueError(
                f"The teacher ({name}) has mask_token_id {teacher_mask} but the student has "
                f"{student_config.mask_token_id}: both read the same noised row. Use checkpoints converted with the "
                "same tokenizer."
            )
        teacher_shift = getattr(teacher.config, "prediction_shift", False)
        student_shift = getattr(student_config, "prediction_shift", False)
        if teacher_shift != student_shift:
            # the AR source is shifted by nature and is handled above; two dVLMs must mean the same thing by a logit
            raise ValueError(
                f"The teacher ({name}) has prediction_shift={teacher_shift} but the student has "
                f"{student_shift}: their logits at a position predict different tokens (DESIGN "
                "4.1). Use an anchor trained with the same setting, or the autoregressive source with "
                "teacher_type='autoregressive'."
            )
        if student_config.block_size % args.teacher_block_size:
            raise ValueError(
                f"`teacher_block_size`={args.teacher_block_size} does not divide the student's block size "
                f"{student_config.block_size}: a teacher block must not straddle two student blocks (DESIGN 3.6). "
                "Use e.g. teacher_block_size=4."
            )
        trained_at = getattr(teacher.config, "block_size", None)
        if trained_at != args.teacher_block_size:
            logger.warning(
                "The teacher (%s) was trained at block size %s but distills with teacher_block_size=%d.",
                name,
                trained_at,
                args.teacher_block_size,
            )

    def _check_tokenizers(self, source, args: DiffusionDistillConfig) -> None:
        """Same token -> id map, when the teacher's tokenizer is available (the AR source lacks ``<|mask|>``)."""
        teacher_tokenizer = _source_tokenizer(source)
        if teacher_tokenizer is None:
            return
        student_tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if args.teacher_type == "autoregressive":
            # conversion adds <|mask|> to the student's tokenizer (DESIGN 2); the AR source does not have it
            mask_token = student_tokenizer.convert_ids_to_tokens(self._base_model.config.mask_token_id)
            student_vocab.pop(mask_token, None)
            teacher_vocab.pop(mask_token, None)
        if student_vocab != teacher_vocab:
            differing = sorted(
                token
                for token in student_vocab.keys() | teacher_vocab.keys()
                if student_vocab.get(token) != teacher_vocab.get(token)
            )
            examples = ", ".join(
                f"{token!r}: student {student_vocab.get(token)} / teacher {teacher_vocab.get(token)}"
                for token in differing[:3]
            )
            raise ValueError(
                f"The teacher's tokenizer ({teacher_tokenizer.name_or_path}) differs from the student's in "
                f"{len(differing)} token(s) ({examples}): KD compares logits id by id, so both must map tokens to the "
                "same ids. Use a teacher converted from the same tokenizer."
            )

    def _prepare_teacher(self, teacher: PreTrainedModel):
        """Frozen, eval mode, placed for the current distributed setting, outside the student's optimizer."""
        teacher.requires_grad_(False)
        teacher.eval()
        sharded = self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if sharded and not hasattr(getattr(teacher, "model", None), "dummy_vision_output"):
            # a sharded vision tower must run on every rank (BardVLModel runs it on a dummy image for text-only
            # batches); a stock Qwen3-VL teacher would skip it and leave the ranks' collectives out of step
            raise ValueError(
                f"The teacher ({type(teacher).__name__}) would be sharded, which needs a BARD-VL model: its vision "
                "tower runs on every rank even for batches without images. Convert the AR source first "
                "(`transformers-bard convert`) and pass the converted model; it works as an autoregressive teacher "
                "too (teacher_type='autoregressive'). Or train with DDP."
            )
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)  # ZeRO-3 shards it; other stages replicate it
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        # DDP / single device: moved to the device, not wrapped (evaluation mode)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ------------------------------------------------------------------ teacher targets
    @property
    def _mask_token_id(self) -> int:
        return self._base_model.config.mask_token_id

    def _format_teacher_mask(self, mask: torch.Tensor) -> torch.Tensor:
        # eager attention adds the mask to the scores, and so does flex attention given a tensor: they need an
        # additive float mask (DESIGN 3.2)
        if self._teacher_attn_implementation in ("eager", "flex_attention"):
            return additive_attention_mask(mask, self._teacher_dtype)
        return mask

    @torch.no_grad()
    def teacher_targets(self, inputs: dict, positions: torch.BoolTensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """The teacher's top-k logits ``[N, k]`` (fp32) and their ids ``[N, k]`` at the N student `positions`.

        `inputs` is the packed batch with ``position_ids`` (the student's). Rows follow the row-major order of
        `positions`, like the student's selected logits. Under `prediction_shift` (DESIGN 4.1) both dVLMs score each
        target from the hidden state that predicts it under their own block size (`logit_positions`); the AR teacher
        is shifted by nature. The teacher's full logits are dropped before returning.
        Every rank runs the teacher even when it has no position (ZeRO-3 gathers parameters collectively).
        """
        if self.args.teacher_type == "diffusion":
            # same row, its own block-size mask (DESIGN 3.6); the head runs only at the positions
            inputs = {**inputs, "logits_mask": positions}
            outputs = self.teacher_model(**inputs, block_size=self.args.teacher_block_size, use_cache=False)
            logits = outputs.logits  # [N, V]
        else:
            kwargs, targets = autoregressive_teacher_inputs(inputs, positions)
            kwargs["attention_mask"] = self._format_teacher_mask(kwargs["attention_mask"])
            outputs = self.teacher_model(**kwargs, use_cache=False)
            logits = outputs.logits[targets]  # [b, R, V] -> [N, V]
        del outputs
        return teacher_topk(logits, self.args.teacher_topk)

    # ------------------------------------------------------------------ loss (DESIGN 3.6)
    def num_loss_items(self, batch: dict) -> int | None:
        """The SWD loss's items in a micro-batch (DESIGN 3.6): its masked positions, or with
        `loss_normalization="sample"` its samples (rows) that have at least one masked position."""
        if "logits_mask" not in batch:
            return None
        positions = distillation_positions(batch["logits_mask"], batch["input_ids"], self._mask_token_id)  # [b, L]
        if self.args.loss_normalization == "sample":
            return int(positions.any(dim=-1).sum())
        return int(positions.sum())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        targets = {key: inputs.pop(key) for key in LOSS_KEYS if key in inputs}
        positions = distillation_positions(inputs["logits_mask"], inputs["input_ids"], self._mask_token_id)  # [b, L]
        inputs["logits_mask"] = positions
        if inputs.get("position_ids") is None:
            # computed once and given to both models: identical M-RoPE positions (DESIGN 2, 3.6)
            with torch.no_grad():
                inputs["position_ids"] = self._base_model.get_packed_position_ids(
                    inputs["input_ids"],
                    inputs["segment_ids"],
                    inputs.get("mm_token_type_ids"),
                    inputs.get("image_grid_thw"),
                )  # [3, b, L]

        # 1. teacher first: only its top-k survive, so its [N, V] logits are freed before the student's graph exists
        topk_values, topk_ids = self.teacher_targets(inputs, positions)  # [N, k], [N, k]
        # 2. student at B_s (its config), LM head at the same positions
        outputs = model(**inputs, use_cache=False)
        logits = outputs.logits  # [N, V]
        labels = targets["labels"][positions]  # [N] clean tokens

        per_sample = self.args.loss_normalization == "sample"
        sample_index = positions.nonzero()[:, 0] if per_sample else None  # [N], row (= sample) of each position
        local_items = int(positions.any(dim=-1).sum()) if per_sample else labels.shape[0]
        denominator, scale = self.loss_normaliser(num_items_in_batch, local_items)
        loss, sums = swd_loss(
            logits,
            labels,
            topk_values,
            topk_ids,
            denominator,
            ce_weight=self.args.ce_weight,
            kd_weight=self.args.kd_weight,
            temperature=self.args.temperature,
            reverse=self.args.reverse_kd,
            sample_index=sample_index,
            kd_positions=None if self.args.kd_on_eos_padding else ~targets["is_eos_padding"][positions].bool(),
        )
        loss = loss * scale
        self._record_metrics(mode, sums, num_items_in_batch)
        if return_outputs:
            return loss, outputs
        return loss

    def _record_metrics(self, mode: str, sums: torch.Tensor, num_items_in_batch) -> None:
        """Push (ce, kd, accuracy, agreement, tokens) of an optimizer step into `_metrics` once the step is complete.

        The micro-batches of a step are summed over all ranks and divided by the step's masked-token count, the
        same normalisation as the loss with `loss_normalization="token"`, so a logged step then satisfies
        loss = ce_weight * ce + kd_weight * kd. With `"sample"`, `ce` and `kd` stay token means (comparable across
        both settings) and the loss is the per-sample mean.
        """
        if mode == "train":
            sums = self.accelerator.gather(sums[None]).sum(0)
        else:
            sums = self.accelerator.gather_for_metrics(sums[None]).sum(0)
        if num_items_in_batch is not None:
            if self._step_key != self.state.global_step:
                self._step_sums, self._step_key = torch.zeros_like(sums), self.state.global_step
            self._step_sums += sums
            if self._step_sums[5] < float(num_items_in_batch):
                return  # more micro-batches of this step to come
            sums, self._step_sums, self._step_key = self._step_sums, None, None
        ce_sum, kd_sum, num_tokens, num_correct, num_agree, _ = sums.tolist()
        if num_tokens == 0:
            return
        metrics = self._metrics[mode]
        metrics["ce"].append(ce_sum / num_tokens)
        metrics["kd"].append(kd_sum / num_tokens)
        metrics["mean_token_accuracy"].append(num_correct / num_tokens)
        metrics["teacher_agreement"].append(num_agree / num_tokens)
        metrics["num_masked_tokens"].append(num_tokens)


__all__ = [
    "DiffusionDistillTrainer",
    "autoregressive_teacher_inputs",
    "distillation_positions",
    "packed_lengths",
]
