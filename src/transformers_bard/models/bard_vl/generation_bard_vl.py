"""Block-diffusion decoding for BARD-VL (DESIGN 4): `BardVLGenerationConfig`, `BardVLGenerationOutput` and the
`generate` of `BardVLGenerationMixin`.

Decoding runs block by block. A block starts as B `<|mask|>` tokens; each denoising step runs only those B tokens
against the KV cache of the prompt and the finished blocks (without committing them), then unmasks the confident
positions. A finished block is committed to the cache by one forward, fused with the first step of the next block;
block 0's first step rides in the prompt's forward. Rows of a batch advance independently (DESIGN 4.4). With
`config.prediction_shift` (DESIGN 4.1) the hidden state at i predicts token i + 1: the same forwards, scored one
position earlier.

Configuration ownership (DESIGN 6): `BardVLGenerationConfig` subclasses `GenerationConfig`, so everything that reads a
generation config (saving, TRL, pipelines) still finds every standard attribute, but it validates its own way and
rejects autoregressive-only options. The model owns it through `generation_config_class` and
`BardVLGenerationMixin.adjust_generation_fn`, so `from_pretrained` loads `generation_config.json` as this class.

A plain (autoregressive) generation config is mapped two ways, on purpose:
- *read from a file* (`generation_config.json` without BARD fields, e.g. Qwen3-VL's `do_sample: true`,
  `temperature: 0.7`, `top_k: 20`, `top_p: 0.8`): it described the AR model, not this one, so only the token ids and
  lengths are kept and the BARD defaults apply (temperature 0, threshold 0.9); a warning lists what was dropped
  (DESIGN 4.6);
- *passed to `generate(generation_config=...)`* (e.g. TRL's GKD on-policy sampling): it is the caller's request for
  this call, so its lengths, token ids and sampling (`do_sample` with `temperature`/`top_k`/`top_p`) are honoured on
  top of the model's BARD settings (block size, unmasking, threshold).

This file is exported next to the weights for ``trust_remote_code``: torch, transformers and siblings only.
"""

import copy
import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput, logging

from .masking_bard_vl import CLEAN, NOISY, PAD, PREFIX, block_ids_from_segments
from .verification_bard_vl import ARVerifier, check_verifier, split_vision_inputs, verified_generate_row

logger = logging.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
UNMASKING_CHOICES = ("threshold", "static")
UNMASK_ORDER_CHOICES = ("left_to_right", "confidence")
# Fields of BardVLGenerationConfig that GenerationConfig does not have. A saved BARD config always contains them
# (they are not in `GenerationConfig()`, so `to_diff_dict` keeps them); a file with none of them is an AR config.
BARD_FIELDS = (
    "block_size",
    "steps_per_block",
    "unmasking",
    "unmask_order",
    "threshold",
    "edit_threshold",
    "fuse_commit",
    "eos_fill",
    "eos_tail_fill",
    "prefill_step",
    "output_trace",
    "draft_threshold",
)
# What survives from an AR generation_config.json read from disk (DESIGN 4.6).
KEPT_FROM_AR_FILE = ("max_new_tokens", "max_length", "bos_token_id", "eos_token_id", "pad_token_id")
# Extra model inputs `generate` forwards to the prefill.
PREFILL_KWARGS = ("pixel_values_videos", "video_grid_thw")
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
_METADATA_KEYS = ("transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash")

_LOGITS_FIX = "Pass an equivalent `LogitsProcessor` in `logits_processor=` (it sees every block position) instead."
_STOP_FIX = "Pass an equivalent `StoppingCriteria` in `stopping_criteria=` (checked after each block) instead."
# GenerationConfig fields BARD decoding does not implement: field -> (values meaning "off", what it is, the fix).
UNSUPPORTED_OPTIONS = {
    "num_beams": ((None, 1), "beam search", "Block diffusion decodes one hypothesis per row: unset it or use 1."),
    "num_beam_groups": ((None, 1), "group beam search", "Unset it or use 1."),
    "diversity_penalty": ((None, 0.0), "group beam search", "Unset it."),
    "early_stopping": ((None, False), "beam search", "Unset it."),
    "length_penalty": ((None, 1.0), "beam search", "Unset it."),
    "constraints": ((None,), "constrained beam search", "Unset it."),
    "force_words_ids": ((None,), "constrained beam search", "Unset it."),
    "penalty_alpha": ((None, 0, 0.0), "contrastive search", "Unset it."),
    "dola_layers": ((None,), "DoLa decoding", "Unset it."),
    "prompt_lookup_num_tokens": ((None,), "assisted decoding", "Unset it: a block already drafts B tokens at once."),
    "assistant_early_exit": ((None,), "assisted decoding", "Unset it."),
    "use_mtp": ((None, False), "assisted decoding", "Unset it."),
    "is_assistant": ((None, False), "assisted decoding", "Unset it."),
    "num_return_sequences": ((None, 1), "several sequences per prompt", "Repeat the rows of the batch instead."),
    "min_length": ((None, 0), "a minimum length", _LOGITS_FIX),
    "min_new_tokens": ((None, 0), "a minimum length", _LOGITS_FIX),
    "max_time": ((None,), "a time limit", _STOP_FIX),
    "stop_strings": ((None,), "stop strings", _STOP_FIX),
    "min_p": ((None,), "min-p sampling", _LOGITS_FIX),
    "top_h": ((None,), "top-h sampling", _LOGITS_FIX),
    "typical_p": ((None, 1.0), "typical sampling", _LOGITS_FIX),
    "epsilon_cutoff": ((None, 0.0), "epsilon sampling", _LOGITS_FIX),
    "eta_cutoff": ((None, 0.0), "eta sampling", _LOGITS_FIX),
    "repetition_penalty": ((None, 1.0), "a repetition penalty", _LOGITS_FIX),
    "encoder_repetition_penalty": ((None, 1.0), "an encoder repetition penalty", _LOGITS_FIX),
    "no_repeat_ngram_size": ((None, 0), "n-gram blocking", _LOGITS_FIX),
    "encoder_no_repeat_ngram_size": ((None, 0), "n-gram blocking", _LOGITS_FIX),
    "bad_words_ids": ((None,), "banned words", _LOGITS_FIX),
    "suppress_tokens": ((None,), "suppressed tokens", _LOGITS_FIX),
    "begin_suppress_tokens": ((None,), "suppressed tokens", _LOGITS_FIX),
    "sequence_bias": ((None,), "sequence bias", _LOGITS_FIX),
    "forced_bos_token_id": ((None,), "a forced first token", _LOGITS_FIX),
    "forced_eos_token_id": ((None,), "a forced last token", _LOGITS_FIX),
    "exponential_decay_length_penalty": ((None,), "a length penalty", _LOGITS_FIX),
    "renormalize_logits": ((None, False), "logit renormalisation", "Unset it."),
    "remove_invalid_values": ((None, False), "NaN/inf removal", "Unset it."),
    "guidance_scale": ((None, 1.0), "classifier-free guidance", "Unset it."),
    "watermarking_config": ((None,), "watermarking", "Unset it."),
    "token_healing": ((None, False), "token healing", "Unset it."),
    "low_memory": ((None, False), "sequential beam search", "Unset it."),
    "output_scores": ((None, False), "per-step scores", "Unset it; the output reports `tokens_per_forward`."),
    "output_logits": ((None, False), "per-step logits", "Unset it."),
    "output_attentions": ((None, False), "attention outputs", "Unset it."),
    "output_hidden_states": ((None, False), "hidden-state outputs", "Unset it."),
    "cache_implementation": ((None, "dynamic"), "another cache type", "BARD decoding uses a DynamicCache: unset it."),
    "cache_config": ((None,), "cache options", "Unset it."),
    "max_cache_len": ((None,), "a static cache", "Unset it."),
    "prefill_chunk_size": ((None,), "chunked prefill", "Unset it."),
    "decoder_start_token_id": ((None,), "encoder-decoder decoding", "Unset it."),
}
# Arguments of the AR `generate` that are not generation-config fields and that BARD decoding does not take.
_AR_GENERATE_ARGUMENTS = (
    "assistant_model",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class BardVLGenerationConfig(GenerationConfig):
    r"""
    Generation settings of block-diffusion decoding (DESIGN 4). Every `GenerationConfig` attribute exists; the ones
    used are the length (`max_new_tokens`, or `max_length` when it is unset), the token ids (`eos_token_id`, which may
    be a list, `pad_token_id`), sampling (`temperature`, `top_k`, `top_p`, `do_sample`) and `return_dict_in_generate`.
    Autoregressive-only options (beam search, contrastive search, assisted decoding, ...) are rejected.

    New fields:

    block_size (`int`, *optional*):
        Tokens decoded in parallel per block (B). `None` (default) uses the model's `config.block_size`. The prompt is
        chunked with the same B (DESIGN 3.2), so decode with the block size the model was trained with.
    steps_per_block (`int`, *optional*):
        Denoising steps per block S, in [1, B]. `None` (default) means B. Step s unmasks at least k_s tokens, where
        k_s spreads B over S steps: B // S each, the first B % S steps one more (B = 8, S = 3: 3, 3, 2).
    unmasking (`str`, defaults to `"threshold"`):
        `"threshold"`: the masked positions whose confidence exceeds `threshold` (under the default `unmask_order`
        only those before the block's first uncertain one), and at least k_s positions.
        `"static"`: exactly k_s masked positions (the leftmost or the most confident: `unmask_order`).
    unmask_order (`str`, defaults to `"left_to_right"`):
        Which masked positions a step unmasks. `"left_to_right"`: the k_s leftmost, plus (under `"threshold"`) the
        positions above tau that come before the block's first masked position at or below tau, so a block grows as a
        left-to-right prefix, many tokens per forward where the model is sure; a token after an undecided uncertain
        one waits for it, because its confidence is a marginal over that one's choices. `"confidence"`: the k_s most
        confident plus every position above tau, wherever it is (DESIGN 4.2 as first written; ties go to the earlier
        position). Changes answers against `"confidence"`; it is the default because of its measurement
        (docs/demo_results/choice_probe/README.md, 400 test rows each): on the choice task, whose answers name their own
        choice (`row 3 : 5 3 5 8`), `"confidence"` commits digits before the choice, then the choice from a
        conditional the model never learned (p(choice | digits) stays at chance while p(digits | choice) is exact):
        PBM B = 32 scores 0.020 with `"confidence"` and 0.990 with `"left_to_right"` (tau 0.9, 3.23 against 7.51
        tokens per forward); on the digits task both give the same exact match on every model but PBM B = 8
        (+2.2 to +2.7 points for `"left_to_right"`), the final B = 32 models 1.000 at 41.72 against 41.86 tokens
        per forward.
    threshold (`float`, defaults to 0.9):
        Confidence threshold tau in (0, 1] of `"threshold"` unmasking. 1.0 unmasks k_s tokens per step (one per step
        with the default S = B), the setting of the reference accuracy numbers.
    edit_threshold (`float`, *optional*):
        Revision (for models trained with mixed noise, DESIGN 3.3): an already-decoded token of the current block is
        replaced when the model now predicts a different token with confidence above this value. `None` (default)
        disables revision.
    fuse_commit (`bool`, defaults to `True`):
        Commit a finished block in the same forward as the first step of the next block (2B tokens, exact; saves one
        forward per committed block). `False` commits with a forward of its own.
    eos_fill (`bool`, defaults to `True`):
        EOS fill (DESIGN 4.4): training pads every response with EOS to the end of its block, so once a step leaves
        an EOS at position j of the block, every later position is EOS padding and is filled with that EOS at once;
        the block is then done as soon as the positions before j are decoded. A one-token answer at B = 32 thereby
        costs a few forwards instead of 32. The output is cut after the first EOS anyway, so on a model trained that
        way the tokens are the ones of `eos_fill=False` (the filled positions are what the model would decode
        there); on a model that was not, the earlier positions may come out differently. No effect without
        `eos_token_id`.
    eos_tail_fill (`bool`, defaults to `True`):
        Also act on *predicted* EOS (DESIGN 4, step 4): when the model's current choice at every undecided position
        from some position j to the end of the block is an EOS (decided positions there already being EOS), those
        positions become EOS at once, however confident. A trained model is most sure of the far EOS padding, so at
        `threshold=1.0` plain EOS fill commits the last position first and saves little; this rule ends a short
        answer's padding in one step. Not exact in general: it changes the output where a later forward would have
        decoded a token there. On by default because it changed no answer and saved forwards on both demo tasks
        (final B = 32 models, tau 1.0, 400 test rows each, `unmask_order="left_to_right"`; docs/generation.md,
        "Short answers at tau 1.0"): forwards per answer after the prompt's 30.50 -> 30.00 (digits) and 19.98 ->
        18.98 (choice), exact match unchanged (paired difference +0.000 [-0.010, +0.010] and [-0.009, +0.009]); on
        one-digit answers it costs one forward (1.00 -> 2.00). No effect without `eos_token_id`.
    prefill_step (`bool`, defaults to `True`):
        Take the first denoising step of block 0 inside the prompt's forward (DESIGN 4.4): the B mask tokens are
        appended to the prompt, their logits taken and their keys/values cropped again. Exact (prompt queries never
        see noisy keys), and one forward fewer per prompt. `False` runs the prompt alone first.
    draft_threshold (`float`, *optional*, defaults to 0.1):
        The threshold tau of the drafts when `generate` is given a `verifier` (verified decoding, DESIGN 4.2 a): a
        wrong draft then costs a redraft instead of a wrong answer, so a low tau drafts a block in fewer forwards.
        `None` drafts with `threshold`. Never changes the answer (the verifier's greedy answer either way); no effect
        without a verifier. The default by measurement (`benchmarks/verified_rows.py`, the demo tasks' 400 test rows,
        final B = 32 models; `benchmarks/decode.py --verify`, batch 1, one thread): on the choice task 0.1 against
        0.9 takes PBM B = 32 from 4.14 to 7.95 tokens per forward and its verified tokens/s from 0.88-1.20x to
        1.16-1.66x the AR source's (per question type); on the digits task, whose drafts are accepted in one step
        either way, 20.86 against 20.93 tokens per forward and the same tokens/s within noise.
    output_trace (`bool`, defaults to `False`):
        With `return_dict_in_generate=True`, record every forward of every row in `BardVLGenerationOutput.trace`
        (what was unmasked, with which confidence, what was revised or EOS-filled; format in the output's
        docstring). Off: nothing is recorded.

    Sampling: `temperature` 0 (default) takes the argmax; `temperature` > 0 samples after temperature, `top_k`
    (0/`None` = off) and `top_p` (1/`None` = off). The confidence of a position is the probability of its chosen
    token under that distribution (at temperature 1 when greedy). `do_sample`, when set, must agree with
    `temperature` (`True` needs `temperature` > 0, `False` needs 0).

    `max_new_tokens` defaults to 256. Decoding runs whole blocks: when `max_new_tokens` is not a multiple of B the
    last block is decoded completely and cut to `max_new_tokens` (its forwards still count in `tokens_per_forward`).
    """

    def __init__(self, **kwargs):
        # BARD fields first: GenerationConfig.__init__ ends with `self.validate()`, which reads them.
        self.block_size = kwargs.pop("block_size", None)
        self.steps_per_block = kwargs.pop("steps_per_block", None)
        self.unmasking = kwargs.pop("unmasking", "threshold")
        self.unmask_order = kwargs.pop("unmask_order", "left_to_right")
        self.threshold = kwargs.pop("threshold", 0.9)
        self.edit_threshold = kwargs.pop("edit_threshold", None)
        self.fuse_commit = kwargs.pop("fuse_commit", True)
        self.eos_fill = kwargs.pop("eos_fill", True)
        self.eos_tail_fill = kwargs.pop("eos_tail_fill", True)
        self.prefill_step = kwargs.pop("prefill_step", True)
        self.output_trace = kwargs.pop("output_trace", False)
        self.draft_threshold = kwargs.pop("draft_threshold", 0.1)
        kwargs.setdefault("temperature", 0.0)
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ validation
    def validate(self, strict: bool = False, user_set_attributes: set | None = None):
        """Raise a ValueError naming the field, the value and the fix. `strict`/`user_set_attributes` are accepted
        for `GenerationConfig` compatibility; every problem is an error here."""
        del strict, user_set_attributes
        if self.block_size is not None and (not _is_int(self.block_size) or self.block_size < 1):
            raise ValueError(f"`block_size` must be an integer >= 1 or None (the model's), got {self.block_size!r}.")
        if self.steps_per_block is not None:
            if not _is_int(self.steps_per_block) or self.steps_per_block < 1:
                raise ValueError(
                    f"`steps_per_block` must be an integer >= 1 or None (= block size), got {self.steps_per_block!r}."
                )
            if self.block_size is not None and self.steps_per_block > self.block_size:
                raise ValueError(
                    f"`steps_per_block`={self.steps_per_block} exceeds `block_size`={self.block_size}: a step unmasks "
                    "at least one token. Use a value in [1, block_size]."
                )
        if self.unmasking not in UNMASKING_CHOICES:
            raise ValueError(f"`unmasking` must be one of {UNMASKING_CHOICES}, got {self.unmasking!r}.")
        if self.unmask_order not in UNMASK_ORDER_CHOICES:
            raise ValueError(
                f"`unmask_order` must be one of {UNMASK_ORDER_CHOICES}, got {self.unmask_order!r}: 'left_to_right' "
                "decodes each block as a growing prefix (the default), 'confidence' the most confident positions first."
            )
        if not _is_number(self.threshold) or not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"`threshold` must be in (0, 1], got {self.threshold!r}. Use e.g. 0.9 (1.0 = one token "
                             "per step).")
        if self.draft_threshold is not None and (
            not _is_number(self.draft_threshold) or not 0.0 < self.draft_threshold <= 1.0
        ):
            raise ValueError(f"`draft_threshold` must be in (0, 1] or None (= `threshold`), got "
                             f"{self.draft_threshold!r}.")
        if self.edit_threshold is not None and (
            not _is_number(self.edit_threshold) or not 0.0 < self.edit_threshold <= 1.0
        ):
            raise ValueError(f"`edit_threshold` must be in (0, 1] or None (no revision), got {self.edit_threshold!r}.")
        for field in ("fuse_commit", "eos_fill", "eos_tail_fill", "prefill_step", "output_trace"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"`{field}` must be True or False, got {getattr(self, field)!r}.")
        self._validate_sampling()
        self._validate_lengths_and_ids()
        for field, (neutral, what, fix) in UNSUPPORTED_OPTIONS.items():
            value = getattr(self, field, None)
            if not any(value is off or (off is not None and value == off) for off in neutral):
                raise ValueError(f"`{field}`={value!r} asks for {what}, which BARD-VL generate does not offer. {fix}")
        for argument in ("logits_processor", "stopping_criteria", "streamer", *_AR_GENERATE_ARGUMENTS):
            if hasattr(self, argument):
                raise ValueError(f"`{argument}` is not a generation config field; pass it to `generate()` directly.")

    def _validate_sampling(self):
        temperature = 0.0 if self.temperature is None else self.temperature
        if not _is_number(temperature) or temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (0 = argmax), got {self.temperature!r}.")
        if self.do_sample is True and temperature == 0:
            raise ValueError("`do_sample=True` needs `temperature` > 0 (BARD uses temperature 0 for argmax); set e.g. "
                             "temperature=0.7, or unset do_sample.")
        if self.do_sample is False and temperature > 0:
            raise ValueError(f"`do_sample=False` contradicts `temperature`={temperature} (> 0 samples). Set "
                             "temperature=0 for argmax decoding, or unset do_sample.")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise ValueError(f"`top_k` must be an integer >= 0 (0 or None = off), got {self.top_k!r}.")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"`top_p` must be in (0, 1] (1 or None = off), got {self.top_p!r}.")

    def _validate_lengths_and_ids(self):
        for field in ("max_new_tokens", "max_length"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"`{field}` must be an integer >= 1, got {value!r}.")
        eos = self.eos_token_id
        eos_list = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        if not all(_is_int(token) and token >= 0 for token in eos_list):
            raise ValueError(f"`eos_token_id` must be a token id, a list of them or None, got {eos!r}.")
        for field in ("pad_token_id", "bos_token_id"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"`{field}` must be a token id >= 0 or None, got {value!r}.")

    # ------------------------------------------------------------------ construction from other configs
    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Like `GenerationConfig.from_dict`; a dict without BARD fields is an AR config read from a file: only its
        token ids and lengths are kept (DESIGN 4.6)."""
        if not any(field in config_dict or field in kwargs for field in BARD_FIELDS):
            config_dict = _bard_dict_from_ar_dict(config_dict)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> "BardVLGenerationConfig":
        """The generation config of a freshly built model: BARD defaults plus the model config's token ids.

        (`GenerationConfig.from_model_config` would compare our extra fields with a plain `GenerationConfig()` and
        fail, DESIGN 6.)
        """
        values = model_config if isinstance(model_config, dict) else model_config.to_dict()
        text = values.get("text_config") or {}
        if not isinstance(text, dict):
            text = text.to_dict()
        ids = {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = values.get(key) if values.get(key) is not None else text.get(key)
            if value is not None:
                ids[key] = value
        config = cls(**ids)
        config._original_object_hash = hash(config)
        return config

    @classmethod
    def from_generation_config(
        cls, generation_config: GenerationConfig, base: "BardVLGenerationConfig | None" = None
    ) -> "BardVLGenerationConfig":
        """Apply a plain `GenerationConfig` *passed by a caller* on top of `base` (default: BARD defaults).

        Its lengths, token ids and output flags are taken as given; `do_sample=True` means sampling with its
        `temperature` (1.0 if unset), `top_k` (0 = off) and `top_p`; `do_sample=False` means argmax; an unset
        `do_sample` keeps the sampling of `base`. Unsupported options raise (see `validate`).
        """
        if isinstance(generation_config, BardVLGenerationConfig):
            config = copy.deepcopy(base) if base is not None else cls()
            config.update(**_set_values(generation_config))
            return config
        values = _set_values(generation_config)
        do_sample = values.pop("do_sample", None)
        temperature = values.pop("temperature", None)
        top_k = values.pop("top_k", None)
        top_p = values.pop("top_p", None)
        if do_sample is True:
            values.update(
                do_sample=None,
                temperature=1.0 if temperature is None else temperature,
                top_k=top_k or None,
                top_p=None if top_p is None or top_p >= 1.0 else top_p,
            )
        elif do_sample is False:
            values.update(do_sample=None, temperature=0.0, top_k=None, top_p=None)
        # `use_cache=False` (TRL under gradient checkpointing) only concerns training forwards: decoding always caches.
        values.pop("use_cache", None)
        config = copy.deepcopy(base) if base is not None else cls()
        config.update(**values)
        return config

    # ------------------------------------------------------------------ GenerationMixin-only helpers
    def get_generation_mode(self, *args, **kwargs):
        raise NotImplementedError(
            "BardVLGenerationConfig has no autoregressive generation mode: BARD-VL decodes by block diffusion "
            "(`BardVLGenerationMixin.generate`)."
        )


def _set_values(generation_config: GenerationConfig) -> dict:
    """The attributes of a generation config that are set (not None), without metadata."""
    return {
        key: value
        for key, value in generation_config.to_dict().items()
        if value is not None and key not in _METADATA_KEYS
    }


def _bard_dict_from_ar_dict(config_dict: dict) -> dict:
    """Keep the token ids and lengths of an AR generation config read from a file; warn about what is dropped."""
    kept = {key: config_dict[key] for key in KEPT_FROM_AR_FILE if config_dict.get(key) is not None}
    neutral_values = {"use_cache": (True,), "repetition_penalty": (1.0,), "do_sample": (False,)}
    dropped = {
        key: value
        for key, value in config_dict.items()
        if key not in kept
        and key not in _METADATA_KEYS
        and value is not None
        and value not in neutral_values.get(key, ())
        and not (key in UNSUPPORTED_OPTIONS and value in UNSUPPORTED_OPTIONS[key][0])
    }
    if dropped:
        logger.warning(
            "The generation config has no BARD fields (it was written for the autoregressive model), so only its "
            "token ids and lengths are used and BARD decoding defaults apply (temperature 0, threshold 0.9). "
            f"Ignored: {dropped}. Write a BARD config with `bard_generation_config(...).save_pretrained(path)` (conversion "
            "does this), or pass sampling options to `generate` explicitly."
        )
    if "transformers_version" in config_dict:
        kept["transformers_version"] = config_dict["transformers_version"]
    return kept


def bard_generation_config(model_config, source: dict | GenerationConfig | None = None, tokenizer=None):
    """The generation config a converted checkpoint ships with (DESIGN 4.6).

    Decoding defaults: temperature 0 (argmax), threshold unmasking at 0.9, `steps_per_block` = B and
    `block_size=None`, which follows `model_config.block_size` (a later block-merging stage that changes the model's
    B then decodes at its own B without a stale value here). The AR source's sampling settings are dropped; its token
    ids are kept, else taken from `tokenizer`, else from `model_config`.

    Args:
        model_config: the `BardVLConfig` of the converted model.
        source: the AR `generation_config.json` as a dict (or a `GenerationConfig`), if the source has one.
        tokenizer: the converted tokenizer (fallback for `eos_token_id`/`pad_token_id`/`bos_token_id`).
    """
    if isinstance(source, GenerationConfig):
        source = source.to_dict()
    source = source or {}
    fallback = BardVLGenerationConfig.from_model_config(model_config)
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = source.get(key)
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, key, None)
        if value is None:
            value = getattr(fallback, key)
        if value is not None:
            ids[key] = value
    lengths = {key: source[key] for key in ("max_new_tokens",) if source.get(key) is not None}
    return BardVLGenerationConfig(unmasking="threshold", threshold=0.9, temperature=0.0, **ids, **lengths)


@dataclass
class BardVLGenerationOutput(ModelOutput):
    """
    Output of [`BardVLGenerationMixin.generate`] with `return_dict_in_generate=True`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch, prompt_length + new_length)`):
            The (left-padded) prompt followed by the generated tokens, cut after the first EOS and right-padded with
            `pad_token_id`; `new_length` is the longest row's number of generated tokens.
        tokens_per_forward (`torch.FloatTensor` of shape `(batch,)`):
            `num_generated_tokens / num_forwards` per row (DESIGN 4.5).
        num_forwards (`torch.LongTensor` of shape `(batch,)`):
            Forward passes spent on the row after the prompt's forward (the prefill, which also takes block 0's first
            denoising step unless `prefill_step=False`, is not counted): denoising steps plus commits (a fused commit
            shares the forward of the next block's first step and counts once). Rows never wait for each other: in
            every batched forward each running row either commits or takes a denoising step, and stopped rows leave.
        num_generated_tokens (`torch.LongTensor` of shape `(batch,)`):
            Generated tokens of the row, up to and including the first EOS (pad tokens excluded).
        trace (`list[list[dict]]`, *optional*):
            With `output_trace=True`: `trace[row]` lists the forwards the row took part in, in order, the prefill
            first, so `len(trace[row]) == num_forwards[row] + 1`. Each event is a JSON-serialisable dict:
            `forward` (its index in the list), `kind` (`"prefill"`, `"denoise"` or `"commit"`: the forward that
            appends the previous block to the cache, fused with the first step of `block` unless
            `fuse_commit=False`), `block` (the response block the unmasking applies to; for a commit-only forward
            the committed block), `step` (denoising step within `block`, 0-based; -1 when the forward took no
            step), `block_start` (offset of the block in the generated tokens), `unmasked` (`[[position, token,
            confidence], ...]`, positions 0..B-1 of the block), `revised` (`[[position, old, new, confidence],
            ...]`), `eos_filled` (positions set to EOS by EOS fill: after the block's first EOS, or a predicted EOS
            tail with `eos_tail_fill`) and `block_tokens` (the block after the forward, `mask_token_id` where still
            masked). Replaying `unmasked`, then
            `revised`, then `eos_filled` block by block rebuilds the generated tokens.
            With `verifier=`: BARD's events as above, and after every check an event of `kind` `"verify"` (the
            first check, inside the verifier's prefill: `"verifier_prefill"`; `step` -1): `block`, `block_start`,
            `checked_from` (first checked position of the block), `drafts` (the checked tokens), `accepted` (how many of them were accepted), `rejected`
            (`[[position, draft]]` of the first rejected draft, empty when all agreed), `verified` (`[[position,
            token]]`: the verifier's token placed there; empty when it came after the block), `next_block_first`
            (that token when every draft agreed, so it starts the next block, else None) and `block_tokens` (the
            block after the check, masked again after `verified`); for viewers the rejected draft also appears in
            `revised` (replaced by the verifier's token, confidence 1) and an unopposed verifier token in `unmasked`.
            `len(trace[row]) == num_forwards[row] + 2` (two prefills).
        num_draft_forwards, num_verify_forwards (`torch.LongTensor` of shape `(batch,)`, *optional*):
            With `verifier=`: BARD's forwards after its prefill (denoising steps and commits) and the verifier's
            forwards after its prefill (one per check but the first, which rides in the prefill); `num_forwards` is
            their sum.
        accepted_lengths (`list[list[int]]`, *optional*):
            With `verifier=`: per row, the number of drafts each check accepted, in order (the first: the check
            inside the verifier's prefill).
    """

    sequences: torch.LongTensor | None = None
    tokens_per_forward: torch.FloatTensor | None = None
    num_forwards: torch.LongTensor | None = None
    num_generated_tokens: torch.LongTensor | None = None
    trace: list | None = None
    num_draft_forwards: torch.LongTensor | None = None
    num_verify_forwards: torch.LongTensor | None = None
    accepted_lengths: list | None = None


@dataclass
class _DecodingPlan:
    """Scalars of one `generate` call, resolved from the generation config and the model config."""

    block_size: int
    steps_per_block: int
    max_new_tokens: int
    num_blocks: int
    mask_token_id: int
    eos_token_ids: torch.Tensor | None  # [num_eos]
    pad_token_id: int | None
    unmasking: str
    unmask_order: str  # "left_to_right" (a block grows as a prefix) or "confidence" (most confident first)
    threshold: float
    edit_threshold: float | None
    temperature: float
    warpers: LogitsProcessorList  # temperature / top-k / top-p, empty when greedy
    fuse_commit: bool
    eos_fill: bool
    eos_tail_fill: bool
    prefill_step: bool
    output_trace: bool
    prediction_shift: bool  # DESIGN 4.1: the hidden state at i predicts token i + 1

    def tokens_at_step(self, steps: torch.Tensor) -> torch.Tensor:
        """k_s per row for rows at step `steps` ``[m]``: B // S tokens per step, the first B % S steps one more
        (DESIGN 4.2)."""
        base, extra = divmod(self.block_size, self.steps_per_block)
        return (base + (steps < extra).long()).clamp(min=1)


@dataclass
class _Rows:
    """Decoding state of the rows still running; the cache holds exactly these rows, in this order.

    Every row moves through its blocks on its own (DESIGN 4.4: a row whose block is finished does not wait for the
    others): rows of one batch may denoise different blocks in the same forward.
    """

    index: torch.Tensor  # [m] row of the batch
    block: torch.Tensor  # [m, B] the block being denoised; mask_token_id where undecided
    block_index: torch.Tensor  # [m] which response block that is
    steps: torch.Tensor  # [m] denoising steps taken in it
    committing: torch.Tensor  # [m] bool: the previous block is finished but not yet in the cache
    finished: torch.Tensor  # [m, B] that previous block
    response_start: torch.Tensor  # [m] M-RoPE position of response offset 0 (DESIGN 2)
    first_block: torch.Tensor  # [m] block id of response block 0 (DESIGN 3.2)
    key_segments: torch.Tensor  # [m, K] labels of the cached keys (PAD where a row had nothing to commit)
    key_blocks: torch.Tensor  # [m, K]
    # [m, vocab] under prediction_shift (DESIGN 4.1): the logits of the current block's first token, computed by the
    # forward that ended the previous block (the prefill's last prompt token, or the commit's last token) and kept
    # for every step of the block; [m, 0] otherwise
    first_logits: torch.Tensor
    # [m] the row's length limit: `max_new_tokens` of the call that prefilled it (rows a server batches together differ)
    max_new_tokens: torch.Tensor

    def select(self, keep: torch.Tensor) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name)[keep])


def resolve_decoding_plan(config: BardVLGenerationConfig, model_config, input_ids, stopping_criteria) -> _DecodingPlan:
    """The scalars of one `generate` call (`_DecodingPlan`) from its generation config and the model config
    (`block_size`, `mask_token_id`, `prediction_shift`); `input_ids` ``[batch, prompt]`` gives the device and, for
    `max_length`, the prompt length. Also used by engine integrations, one request at a time."""
    B = config.block_size if config.block_size is not None else model_config.block_size
    steps = config.steps_per_block if config.steps_per_block is not None else B
    if not 1 <= steps <= B:
        raise ValueError(f"`steps_per_block`={steps} must be in [1, block_size={B}]: each step unmasks at least "
                         "one token of the block.")
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None and config.max_length is not None:
        max_new_tokens = config.max_length - input_ids.shape[1]
        if max_new_tokens < 1:
            raise ValueError(f"`max_length`={config.max_length} leaves no room after the prompt of "
                             f"{input_ids.shape[1]} tokens. Set `max_new_tokens` instead.")
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    eos = config.eos_token_id
    eos_list = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_list[0] if eos_list else None)
    if pad is None and stopping_criteria and input_ids.shape[0] > 1:
        raise ValueError("Rows stopped by `stopping_criteria` need padding, but neither `pad_token_id` nor "
                         "`eos_token_id` is set. Pass pad_token_id=... .")
    temperature = float(config.temperature or 0.0)
    warpers = LogitsProcessorList()
    if temperature > 0:
        warpers.append(TemperatureLogitsWarper(temperature))
        if config.top_k:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
    return _DecodingPlan(
        block_size=B,
        steps_per_block=steps,
        max_new_tokens=max_new_tokens,
        num_blocks=math.ceil(max_new_tokens / B),
        mask_token_id=model_config.mask_token_id,
        eos_token_ids=torch.tensor(eos_list, device=input_ids.device) if eos_list else None,
        pad_token_id=pad,
        unmasking=config.unmasking,
        unmask_order=config.unmask_order,
        threshold=float(config.threshold),
        edit_threshold=None if config.edit_threshold is None else float(config.edit_threshold),
        temperature=temperature,
        warpers=warpers,
        fuse_commit=config.fuse_commit,
        eos_fill=config.eos_fill,
        eos_tail_fill=config.eos_tail_fill,
        prefill_step=config.prefill_step,
        output_trace=config.output_trace,
        prediction_shift=model_config.prediction_shift,
    )


def propose_tokens(logits, plan: _DecodingPlan, generator=None, process=None):
    """A token and its confidence per decided position (DESIGN 4.2); both ``[N]``, from `logits` ``[N, vocab]``.

    The mask token is never a candidate. `process` (``scores -> scores``, optional) applies logits processors and
    the sampling warpers; `generate` passes its processors (`_scores_processor`), an engine without processors
    passes `plan.warpers`. Greedy takes the argmax and its softmax probability, sampling draws from the
    (processed) distribution and reports the drawn token's probability under it.
    """
    scores = logits.float()  # [N, vocab]
    scores[:, plan.mask_token_id] = -float("inf")
    if process is not None:
        scores = process(scores)
    if plan.temperature == 0:
        # max softmax probability = exp(max - logsumexp): no second (N, vocab) tensor
        best, tokens = scores.max(dim=-1)
        confidence = torch.exp(best - torch.logsumexp(scores, dim=-1))
    else:
        probs = torch.softmax(scores, dim=-1)
        tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, confidence


def apply_block_step(block, decide, tokens, confidence, steps, plan: _DecodingPlan):
    """One denoising step's decision on the blocks ``[m, B]`` (DESIGN 4.2, 4.4): the proposals `tokens` and
    `confidence` ``[N]`` (row-major over the True entries of `decide` ``[m, B]``) are placed, `threshold`/`static`
    unmasking with k_s of each row's step `steps` ``[m]`` (and revision) fills positions, then EOS fill.

    The one step rule of `generate`, the continuous-batching server and engine integrations
    (`transformers_bard.integrations.vllm`). Returns the new blocks, the blocks after unmasking (before EOS fill),
    the EOS-filled positions ``[m, B]`` (None when no fill applies) and the confidence ``[m, B]`` (-inf where not
    decided).
    """
    stepping = decide.any(-1)  # [m]
    entry_row, entry_pos = decide.nonzero(as_tuple=True)
    proposals = block.index_put((entry_row, entry_pos), tokens)  # [m, B]
    full_confidence = torch.full(block.shape, -float("inf"), device=block.device).index_put(
        (entry_row, entry_pos), confidence
    )
    mixin = BardVLGenerationMixin
    chosen = mixin._unmask_tokens(block, proposals, full_confidence, stepping, plan.tokens_at_step(steps), plan)
    updated, filled = chosen, None
    if plan.eos_tail_fill and plan.eos_token_ids is not None:
        updated, filled = mixin._fill_predicted_eos_tail(chosen, proposals, stepping, plan)
    if plan.eos_fill and plan.eos_token_ids is not None:
        updated, filled_after = mixin._fill_after_eos(updated, plan)
        filled = filled_after if filled is None else filled | filled_after
    return updated, chosen, filled, full_confidence


class BardVLGenerationMixin:
    """Block-diffusion `generate` (DESIGN 4). Placed before `Qwen3VLForConditionalGeneration` in the model's bases, so
    its `generate` and `adjust_generation_fn` replace the autoregressive ones."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer=None,
        return_dict_in_generate: bool | None = None,
        generator: torch.Generator | None = None,
        verifier=None,
        **kwargs,
    ) -> torch.LongTensor | BardVLGenerationOutput:
        r"""
        Decode responses block by block:

        ```
        0. Resolve the generation config (model default < `generation_config` < keyword options) and check inputs.
        1. Prefill the left-padded prompt (and images) into a DynamicCache with the prefix mask of DESIGN 3.2 and
           M-RoPE positions from `get_rope_index(..., attention_mask=...)`; block 0's B mask tokens ride along and
           take its first denoising step (`prefill_step`), their keys/values cropped off again.
        2. Each denoising step runs a row's B block tokens against the cache and crops them off again; the LM head
           runs only at still-masked positions (all B with revision); the mask token's logit is set to -inf, logits
           processors run, a token and a confidence are chosen per position, and `threshold`/`static` unmasking
           (plus optional revision) fills positions. EOS fill then sets every position after the block's first EOS
           to EOS (`eos_fill`).
        3. A finished block is committed to the cache in the row's next forward, fused with the first step of its
           next block (one forward of 2B tokens) or, with `fuse_commit=False`, alone. Rows advance independently: in
           one batched forward some rows commit while others denoise (a row with nothing to commit fills its commit
           slot with padding keys, which nothing attends to). The last block of a row is never committed.
           Under `config.prediction_shift` (DESIGN 4.1) block position j >= 1 is scored at position j - 1 and
           position 0 by the last token before the block: the prefill scores the last prompt token, a commit the
           committed block's last token, kept for every step of the next block; no forward is added.
        4. A row stops when its finished block holds an EOS (cut after it), when a stopping criterion fires, or at
           `max_new_tokens`; stopped rows leave the batch and the cache.
        5. Return `sequences` (prompt + new tokens, pad-filled) or a `BardVLGenerationOutput` with
           `tokens_per_forward` (and the `trace` with `output_trace=True`).
        ```

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, prompt_length)`):
                Left-padded prompts (processor output, with image placeholder tokens for images).
            attention_mask (`torch.Tensor` of shape `(batch, prompt_length)`, *optional*):
                1 on real tokens; must be left padding. Defaults to all ones.
            pixel_values, image_grid_thw, mm_token_type_ids:
                The processor's image inputs. `mm_token_type_ids` is derived from the image/video token ids if absent.
            generation_config (`GenerationConfig`, *optional*):
                A `BardVLGenerationConfig`, or a plain `GenerationConfig` applied on top of the model's config (see the
                module docstring). Keyword options of the config (`max_new_tokens=`, `threshold=`, ...) override both.
            logits_processor (`LogitsProcessorList`, *optional*):
                Applied to the block's logits (mask token already at -inf) before choosing tokens. Every position the
                step decides (the still-masked ones; all B with revision) is a row of its own: `input_ids` is the
                row's prompt plus its finished blocks, `scores` is `(positions, vocab)`; one call per group of rows
                at the same block.
            stopping_criteria (`StoppingCriteriaList`, *optional*):
                Checked whenever rows finish a block, with `input_ids` = prompt + generated tokens of those rows (one
                call per group of rows at the same block); rows for which it returns True stop.
            streamer (`BaseStreamer`, *optional*):
                Receives the prompt, then each finished block's kept tokens, then `end()`. Batch size 1 only.
            return_dict_in_generate (`bool`, *optional*):
                Return a `BardVLGenerationOutput` instead of the `sequences` tensor.
            generator (`torch.Generator`, *optional*):
                Random source of sampling (temperature > 0); the global RNG (`torch.manual_seed`) otherwise.
            verifier (`Qwen3VLForConditionalGeneration`, *optional*):
                Verified decoding (DESIGN 4.2 a, `verification_bard_vl`): this model drafts each block, the
                autoregressive `verifier` (the AR source, same tokenizer) checks it, and the output equals
                `verifier.generate(**inputs, do_sample=False)` token for token (the same `eos_token_id`,
                `pad_token_id` and `max_new_tokens`). Greedy only; no `logits_processor`/`stopping_criteria`.
                Costs: both models in memory, two prefills, one verifier forward per check; rows are decoded one
                after another. The output adds `num_draft_forwards`, `num_verify_forwards` and `accepted_lengths`.
            kwargs:
                Generation config fields, and `pixel_values_videos` / `video_grid_thw`.

        Returns:
            `torch.LongTensor` of shape `(batch, prompt_length + new_length)` or a [`BardVLGenerationOutput`].
        """
        # 0. configuration and inputs
        generation_config, model_kwargs = self._resolve_generation_config(generation_config, kwargs)
        if return_dict_in_generate is None:
            return_dict_in_generate = bool(generation_config.return_dict_in_generate)
        if generation_config.output_trace and not return_dict_in_generate:
            raise ValueError("`output_trace=True` needs `return_dict_in_generate=True`: the trace is a field of "
                             "the returned BardVLGenerationOutput.")
        attention_mask, mm_token_type_ids = self._check_generate_inputs(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, model_kwargs, streamer
        )
        plan = self._decoding_plan(generation_config, input_ids, attention_mask, stopping_criteria)
        if verifier is not None:
            check_verifier(self, verifier, generation_config, logits_processor, stopping_criteria, generator)
            if generation_config.draft_threshold is not None:
                plan.threshold = float(generation_config.draft_threshold)
            return self._verified_generate(verifier, input_ids, attention_mask, pixel_values, image_grid_thw,
                                           mm_token_type_ids, model_kwargs, plan, streamer, return_dict_in_generate)
        B = plan.block_size
        batch = input_ids.shape[0]
        device = input_ids.device
        fill = plan.pad_token_id if plan.pad_token_id is not None else 0
        generated = input_ids.new_full((batch, plan.num_blocks * B), fill)  # [batch, num_blocks * B]
        lengths = torch.zeros(batch, dtype=torch.long, device=device)  # kept tokens per row
        forwards = torch.zeros(batch, dtype=torch.long, device=device)
        trace = [[] for _ in range(batch)] if plan.output_trace else None

        # 1. prefill (+ block 0's first denoising step)
        cache, rows, logits = self._prefill_prompt(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, model_kwargs, plan
        )
        if streamer is not None:
            streamer.put(input_ids.cpu())
        decide = torch.full((batch, B), plan.prefill_step, dtype=torch.bool, device=device)
        self._take_step(rows, logits, decide, input_ids, generated, plan, logits_processor, generator, trace,
                        "prefill")

        step_mask = None  # reused while the cached keys and the rows stay the same
        while True:
            # 4. rows whose block has no mask left: keep its tokens, then stop or move on to the next block
            stop = self._end_finished_blocks(rows, input_ids, generated, lengths, plan, stopping_criteria, streamer)
            if stop.all():
                break
            if stop.any():
                keep = (~stop).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows.select(keep)
                step_mask = None
            # 2.-3. one forward, then choose and unmask tokens
            step_mask = self._decoding_step(rows, cache, step_mask, forwards, input_ids, generated, plan,
                                            logits_processor, generator, trace)

        if streamer is not None:
            streamer.end()
        # 5. outputs
        return self._outputs(input_ids, generated, lengths, forwards, plan, return_dict_in_generate, trace)

    @staticmethod
    def _outputs(input_ids, generated, lengths, forwards, plan: _DecodingPlan, return_dict_in_generate, trace,
                 **verified):
        """The prompt followed by each row's kept tokens ``[batch, P + longest]`` (pad-filled after a row's end), or
        with `return_dict_in_generate` the `BardVLGenerationOutput` (`verified`: the fields of verified decoding)."""
        width = int(lengths.max())
        new_tokens = generated[:, :width]
        if plan.pad_token_id is not None:
            beyond = torch.arange(width, device=generated.device)[None, :] >= lengths[:, None]
            new_tokens = new_tokens.masked_fill(beyond, plan.pad_token_id)
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        if not return_dict_in_generate:
            return sequences
        return BardVLGenerationOutput(
            sequences=sequences,
            tokens_per_forward=lengths.float() / forwards.clamp(min=1).float(),
            num_forwards=forwards,
            num_generated_tokens=lengths,
            trace=trace,
            **verified,
        )

    def _verified_generate(self, verifier, input_ids, attention_mask, pixel_values, image_grid_thw,
                           mm_token_type_ids, model_kwargs, plan, streamer, return_dict_in_generate):
        """Verified decoding (DESIGN 4.2 a): each row on its own (`verified_generate_row`: unpadded, with its own
        images), then the rows are put together as `generate` does."""
        batch = input_ids.shape[0]
        merge = self.config.vision_config.spatial_merge_size
        images = split_vision_inputs(input_ids, attention_mask, self.config.image_token_id, pixel_values,
                                     image_grid_thw, merge)
        videos = split_vision_inputs(input_ids, attention_mask, self.config.video_token_id,
                                     model_kwargs.get("pixel_values_videos"), model_kwargs.get("video_grid_thw"), merge)
        fill = plan.pad_token_id if plan.pad_token_id is not None else 0
        generated = input_ids.new_full((batch, plan.num_blocks * plan.block_size), fill)
        lengths, drafts, checks = (torch.zeros(batch, dtype=torch.long, device=input_ids.device) for _ in range(3))
        trace = [[] for _ in range(batch)] if plan.output_trace else None
        accepted = []
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for row in range(batch):
            real = attention_mask[row].bool()
            vision = {}
            if images[row][0] is not None:
                vision.update(pixel_values=images[row][0], image_grid_thw=images[row][1])
            if videos[row][0] is not None:
                vision.update(pixel_values_videos=videos[row][0], video_grid_thw=videos[row][1])
            out, length, draft_forwards, verify_forwards, accepted_row = verified_generate_row(
                self, ARVerifier(verifier), input_ids[row : row + 1, real], mm_token_type_ids[row : row + 1, real],
                vision, plan, streamer, trace[row] if trace is not None else None,
            )
            generated[row], lengths[row], drafts[row], checks[row] = out[0], length, draft_forwards, verify_forwards
            accepted.append(accepted_row)
        if streamer is not None:
            streamer.end()
        return self._outputs(input_ids, generated, lengths, drafts + checks, plan, return_dict_in_generate, trace,
                             num_draft_forwards=drafts, num_verify_forwards=checks, accepted_lengths=accepted)

    # ------------------------------------------------------------------ 0. configuration and inputs
    def _resolve_generation_config(self, generation_config, kwargs: dict):
        """Model default < `generation_config` < keyword options; returns (config, remaining model kwargs)."""
        default = self.generation_config
        if not isinstance(default, BardVLGenerationConfig):
            # someone replaced the model's config by a plain one: read it like an AR file (DESIGN 4.6)
            default = BardVLGenerationConfig.from_dict(default.to_dict()) if default is not None else None
        # a shallow copy is enough (`update` replaces attributes, never mutates them) and, unlike a deep copy, costs
        # nothing next to a short answer's few forwards
        config = copy.copy(default) if default is not None else BardVLGenerationConfig()
        if generation_config is not None:
            if not isinstance(generation_config, GenerationConfig):
                raise TypeError(
                    f"`generation_config` must be a GenerationConfig (ideally a BardVLGenerationConfig), got "
                    f"{type(generation_config).__name__}. Pass options as keywords instead, e.g. threshold=0.9."
                )
            config = BardVLGenerationConfig.from_generation_config(generation_config, base=config)
        for argument in _AR_GENERATE_ARGUMENTS:
            if kwargs.get(argument) is not None:
                raise ValueError(f"`{argument}` is an autoregressive `generate` argument that BARD-VL does not take.")
        model_kwargs = config.update(**kwargs)  # validates the result
        unknown = sorted(key for key, value in model_kwargs.items() if key not in PREFILL_KWARGS and value is not None)
        if unknown:
            raise ValueError(
                f"generate() got unexpected keyword arguments {unknown}. It takes input_ids, attention_mask, "
                f"pixel_values, image_grid_thw, mm_token_type_ids, {', '.join(PREFILL_KWARGS)} and the fields of "
                "BardVLGenerationConfig."
            )
        return config, {key: value for key, value in model_kwargs.items() if value is not None}

    def _check_generate_inputs(
        self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, model_kwargs, streamer
    ):
        """Validate the inputs; returns (attention_mask, mm_token_type_ids) with defaults filled in."""
        if input_ids is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = None if input_ids is None else tuple(getattr(input_ids, "shape", ()))
            raise ValueError(f"`input_ids` must be a (batch, length) tensor of token ids, got {got}. Build the prompt "
                             "with the processor (`apply_chat_template(..., return_tensors='pt')`).")
        if input_ids.shape[1] == 0:
            raise ValueError("`input_ids` is empty: generate needs a prompt of at least one token.")
        if self.config.mask_token_id is None:
            raise ValueError("The model config has no `mask_token_id`, so it cannot decode by block diffusion. "
                             "Convert the checkpoint with `transformers_bard.convert_from_autoregressive` (adds "
                             "`<|mask|>`).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)}, `input_ids` "
                             f"{tuple(input_ids.shape)}; they must match.")
        real = attention_mask.bool()
        if not real.any(-1).all():
            raise ValueError("A row of `attention_mask` is all zeros: every prompt needs at least one real token.")
        if (real[:, :-1] & ~real[:, 1:]).any():
            raise ValueError("`attention_mask` has right padding; generate needs left-padded prompts. Set "
                             "`processor.tokenizer.padding_side = 'left'` before building the batch.")
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError(f"`streamer` supports batch size 1 only (like transformers' streamers), got a batch of "
                             f"{input_ids.shape[0]}. Stream one prompt at a time or drop the streamer.")
        self._check_vision_inputs(input_ids, real, "image", pixel_values, image_grid_thw)
        self._check_vision_inputs(
            input_ids, real, "video", model_kwargs.get("pixel_values_videos"), model_kwargs.get("video_grid_thw")
        )
        if mm_token_type_ids is None:
            # Qwen3-VL's token types: text 0, image 1, video 2 (get_rope_index)
            mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
            mm_token_type_ids[input_ids == self.config.image_token_id] = 1
            mm_token_type_ids[input_ids == self.config.video_token_id] = 2
        return attention_mask, mm_token_type_ids

    def _check_vision_inputs(self, input_ids, real, kind, pixels, grid):
        token_id = getattr(self.config, f"{kind}_token_id")
        num_tokens = int(((input_ids == token_id) & real).sum())
        pixels_name = "pixel_values" if kind == "image" else "pixel_values_videos"
        if pixels is None and num_tokens == 0:
            return
        if pixels is None:
            raise ValueError(f"The prompt holds {num_tokens} {kind} tokens (id {token_id}) but `{pixels_name}` is "
                             f"missing. Pass the processor's `{pixels_name}` and `{kind}_grid_thw` to generate.")
        if grid is None:
            raise ValueError(f"`{pixels_name}` needs `{kind}_grid_thw` (from the processor).")
        if num_tokens == 0:
            raise ValueError(f"`{pixels_name}` was given but the prompt holds no {kind} token (id {token_id}). Build "
                             f"the prompt with the processor's chat template so each {kind} gets its placeholders.")
        merge = self.config.vision_config.spatial_merge_size
        expected = int((grid.prod(-1) // (merge * merge)).sum())
        if expected != num_tokens:
            raise ValueError(f"The prompt holds {num_tokens} {kind} tokens but `{kind}_grid_thw` describes {expected} "
                             "merged patches. Build the prompt and the pixels with the same processor call.")

    def _decoding_plan(self, config: BardVLGenerationConfig, input_ids, attention_mask, stopping_criteria):
        return resolve_decoding_plan(config, self.config, input_ids, stopping_criteria)

    # ------------------------------------------------------------------ 1. prefill
    def _prefill_prompt(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                        model_kwargs, plan, first_tokens=None):
        """Run the prompt into a new DynamicCache (DESIGN 4.1), with block 0's B mask tokens appended when
        `plan.prefill_step` (DESIGN 4.4).

        The appended block is labelled NOISY with block id ceil(real prompt length / B), so the mask of DESIGN 3.2
        lets it see the whole prompt and itself while no prompt query sees it: the prompt's keys/values are those of
        a prompt-only forward, and the block's logits those of a first denoising step. Its keys/values are cropped
        off afterwards. `first_tokens` ``[batch]`` (optional) decides block 0's position 0 beforehand (verified decoding,
        DESIGN 4.2: the verifier's first token). Returns the cache, the rows' state (`_Rows`, prompt key labels ``[batch, P]``) and the
        block's logits ``[batch * B, vocab]`` (None without `prefill_step`).
        """
        B = plan.block_size
        batch, P = input_ids.shape
        segments = torch.where(attention_mask.bool(), PREFIX, PAD)  # [batch, P]
        blocks = block_ids_from_segments(segments, B)  # prompt chunks counted from each row's first real token
        positions, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=model_kwargs.get("video_grid_thw"),
            attention_mask=attention_mask,
        )  # [3, batch, P]
        real = attention_mask.bool()[None]  # [1, batch, P]
        response_start = positions.masked_fill(~real, torch.iinfo(positions.dtype).min).amax(dim=(0, 2)) + 1
        first_block = torch.div(real[0].sum(-1) + B - 1, B, rounding_mode="floor")  # [batch]
        zero = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        rows = _Rows(
            index=torch.arange(batch, device=input_ids.device),
            block=torch.full((batch, B), plan.mask_token_id, dtype=torch.long, device=input_ids.device),
            block_index=zero,
            steps=zero,
            committing=torch.zeros(batch, dtype=torch.bool, device=input_ids.device),
            finished=torch.zeros((batch, B), dtype=torch.long, device=input_ids.device),
            response_start=response_start,
            first_block=first_block,
            key_segments=segments,
            key_blocks=blocks,
            first_logits=torch.empty(batch, 0, device=input_ids.device),
            max_new_tokens=torch.full((batch,), plan.max_new_tokens, dtype=torch.long, device=input_ids.device),
        )
        if first_tokens is not None:
            rows.block[:, 0] = first_tokens
        q_ids, q_segments, q_blocks, q_positions, mm_types = input_ids, segments, blocks, positions, mm_token_type_ids
        wanted = torch.zeros_like(attention_mask, dtype=torch.bool)  # no logits needed from the prompt
        if plan.prediction_shift:
            wanted[:, -1] = True  # the last prompt token predicts the first response token (prompts are left-padded)
        if plan.prefill_step:
            noisy_segments, noisy_blocks = self._block_labels(NOISY, first_block, B)
            q_ids = torch.cat([input_ids, rows.block], dim=1)  # [batch, P + B]
            q_segments = torch.cat([segments, noisy_segments], dim=1)
            q_blocks = torch.cat([blocks, noisy_blocks], dim=1)
            q_positions = torch.cat([positions, self._block_positions(response_start, zero, B)], dim=2)
            mm_types = torch.cat([mm_token_type_ids, mm_token_type_ids.new_zeros(batch, B)], dim=1)
            # shifted, noisy position j predicts j + 1, so the block's last position predicts nothing in it
            noisy_wanted = torch.ones_like(rows.block, dtype=torch.bool)
            if plan.prediction_shift:
                noisy_wanted[:, -1] = False
            wanted = torch.cat([wanted, noisy_wanted], dim=1)
        mask = self.attention_mask_from_labels(q_segments, q_blocks, q_segments, q_blocks)
        cache = DynamicCache(config=self.config)
        logits = self(
            input_ids=q_ids,
            attention_mask=mask,
            position_ids=q_positions,
            cache=cache,
            use_cache=True,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_types,
            logits_mask=wanted,
            **model_kwargs,
        ).logits  # [batch * B, vocab], or [0, vocab]; shifted, per row: last prompt token, then noisy 0 .. B-2
        if plan.prediction_shift:
            # row-major, so the rows of `logits` already are the block's targets 0 .. B-1 in order
            # a copy: the step below may process `logits` in place (mask token, logits processors)
            rows.first_logits = logits[:: B if plan.prefill_step else 1].clone()  # [batch, vocab]
        if not plan.prefill_step:
            return cache, rows, None
        cache.crop(-B)
        return cache, rows, logits

    # ------------------------------------------------------------------ 2.-3. forwards
    @staticmethod
    def _block_positions(response_start, block_index, block_size: int) -> torch.Tensor:
        """Positions ``[3, m, B]`` of each row's block `block_index` ``[m]``: response offset j sits at
        response_start + j (DESIGN 2)."""
        offsets = block_index[:, None] * block_size + torch.arange(block_size, device=response_start.device)
        return (response_start[:, None] + offsets)[None].expand(3, -1, -1)

    @staticmethod
    def _block_labels(segment, block_ids, block_size: int):
        """Segment and block-id labels ``[m, B]`` of one block per row; `segment` is a label or a per-row ``[m]``
        tensor of labels, `block_ids` ``[m]``."""
        segments = torch.as_tensor(segment, dtype=torch.long, device=block_ids.device).expand(block_ids.shape)
        return segments[:, None].expand(-1, block_size), block_ids[:, None].expand(-1, block_size)

    def _mask_after_cache(self, q_segments, q_blocks, key_segments, key_blocks):
        """Mask ``[m, 1, q, K + q]`` of queries placed after the K cached keys (DESIGN 3.2), and the labels of all
        K + q keys ``[m, K + q]``."""
        k_segments = torch.cat([key_segments, q_segments], dim=1)
        k_blocks = torch.cat([key_blocks, q_blocks], dim=1)
        mask = self.attention_mask_from_labels(q_segments, q_blocks, k_segments, k_blocks)
        return mask, k_segments, k_blocks

    def _decoding_forward(self, rows: _Rows, denoising, cache, step_mask, plan: _DecodingPlan):
        """One batched forward after the prefill: ``[commit slot ; noisy slot]``, each B tokens per row.

        Commit slot (present when some row commits, DESIGN 4.3): the finished block of committing rows, CLEAN, and
        padding for the others; it stays in the cache. Noisy slot (present when some row denoises, DESIGN 4.2): the
        current block of `denoising` rows ``[m]``, NOISY, padding for the others; cropped off after the call.
        Exact for every row: clean queries never see noisy keys, nothing sees padding keys, so each row computes
        what it would alone. The LM head runs only at the noisy positions still masked (every position of the
        block with revision). Returns the logits ``[N, vocab]`` (row-major over the True entries of `decide`),
        `decide` ``[m, B]`` and the mask to reuse in the next forward (None when the keys changed).

        Under `prediction_shift` (DESIGN 4.1) block position j >= 1 takes its logits from noisy position j - 1 and
        position 0 from `rows.first_logits`; a commit computes the head only at the committed block's last token,
        which becomes the next block's `first_logits`. No forward is added.
        """
        B = plan.block_size
        committing = rows.committing
        has_commit, has_noisy = bool(committing.any()), bool(denoising.any())
        ids, positions, segments, blocks, wanted = [], [], [], [], []
        decide = torch.zeros_like(rows.block, dtype=torch.bool)
        if has_commit:
            committed = (rows.block_index - 1).clamp(min=0)  # rows in block 0 have padding here
            seg, blk = self._block_labels(torch.where(committing, CLEAN, PAD), rows.first_block + committed, B)
            ids.append(rows.finished)
            positions.append(self._block_positions(rows.response_start, committed, B))
            segments.append(seg)
            blocks.append(blk)
            commit_wanted = torch.zeros_like(decide)  # the committed half needs no logits ...
            if plan.prediction_shift:
                commit_wanted[:, -1] = committing  # ... but its last token when it predicts the next block's first
            wanted.append(commit_wanted)
        if has_noisy:
            seg, blk = self._block_labels(torch.where(denoising, NOISY, PAD), rows.first_block + rows.block_index, B)
            decide = denoising[:, None] & (rows.block == plan.mask_token_id)
            if plan.edit_threshold is not None:  # revision may replace any decoded token of the block
                decide = denoising[:, None].expand_as(decide)
            ids.append(rows.block)
            positions.append(self._block_positions(rows.response_start, rows.block_index, B))
            segments.append(seg)
            blocks.append(blk)
            if plan.prediction_shift:  # target j's logits sit at noisy position j - 1
                wanted.append(torch.cat([decide[:, 1:], torch.zeros_like(decide[:, :1])], dim=1))
            else:
                wanted.append(decide)
        q_segments, q_blocks = torch.cat(segments, dim=1), torch.cat(blocks, dim=1)
        if has_commit or step_mask is None:  # the keys only change at a commit
            step_mask, k_segments, k_blocks = self._mask_after_cache(
                q_segments, q_blocks, rows.key_segments, rows.key_blocks
            )  # [m, 1, q, K + q]
        wanted = torch.cat(wanted, dim=1)  # [m, q]
        logits = self(
            input_ids=torch.cat(ids, dim=1),
            attention_mask=step_mask,
            position_ids=torch.cat(positions, dim=2),
            cache=cache,
            use_cache=True,
            logits_mask=wanted,
        ).logits  # [N, vocab]
        if plan.prediction_shift:
            logits = self._shifted_step_logits(rows, logits, wanted, decide, has_commit, B)
        if has_noisy:
            cache.crop(-B)
        if has_commit:
            K = rows.key_segments.shape[1]
            rows.key_segments, rows.key_blocks = k_segments[:, : K + B], k_blocks[:, : K + B]
            rows.committing = torch.zeros_like(committing)
            step_mask = None
        return logits, decide, step_mask

    @staticmethod
    def _shifted_step_logits(rows: _Rows, logits, wanted, decide, has_commit: bool, block_size: int):
        """Under `prediction_shift`: store the commit slot's last-token logits as the committing rows'
        `first_logits`, then return the logits of the `decide` positions ``[N, vocab]`` in their row-major order:
        `first_logits` for position 0, the noisy slot's position j - 1 for position j (DESIGN 4.1)."""
        entry_row, entry_column = wanted.nonzero(as_tuple=True)  # the rows of `logits`, row-major
        from_commit = entry_column < block_size if has_commit else torch.zeros_like(entry_column, dtype=torch.bool)
        if has_commit:
            rows.first_logits = rows.first_logits.index_copy(0, entry_row[from_commit], logits[from_commit])
        m = decide.shape[0]
        # rows of `table`: first_logits of each row, then the noisy-slot logits; source[r, j] = the row of target j
        table = torch.cat([rows.first_logits, logits[~from_commit]])  # [m + N', vocab]
        source = torch.zeros_like(decide, dtype=torch.long)
        source[:, 0] = torch.arange(m, device=decide.device)
        noisy_column = entry_column[~from_commit] - (block_size if has_commit else 0)  # position j - 1 of target j
        source[entry_row[~from_commit], noisy_column + 1] = m + torch.arange(noisy_column.numel(), device=decide.device)
        return table[source[decide]]  # [N, vocab]

    # ------------------------------------------------------------------ 2. choosing tokens
    def _take_step(self, rows: _Rows, logits, decide, input_ids, generated, plan, logits_processor, generator,
                   trace, kind):
        """Choose tokens at the `decide` positions ``[m, B]`` from `logits` ``[N, vocab]``, unmask (DESIGN 4.2),
        EOS-fill (DESIGN 4.4), record the trace and advance the rows' blocks."""
        stepping = decide.any(-1)  # [m]
        before = rows.block
        chosen = filled = confidence = None
        if logits is not None and bool(stepping.any()):
            entry_row = decide.nonzero(as_tuple=True)[0]  # [N]: row-major, the order of `logits`
            process = self._scores_processor(rows, entry_row, input_ids, generated, plan, logits_processor)
            tokens, confidence = propose_tokens(logits, plan, generator, process)
            rows.block, chosen, filled, confidence = apply_block_step(before, decide, tokens, confidence, rows.steps,
                                                                      plan)
        if trace is not None:
            self._record_trace(trace, rows, kind, stepping, before, chosen, filled, confidence, plan)
        rows.steps = rows.steps + stepping.long()

    @staticmethod
    def _scores_processor(rows: _Rows, entry_row, input_ids, generated, plan: _DecodingPlan, logits_processor):
        """The `process` argument of `propose_tokens` for `generate`: logits processors, then the sampling warpers,
        on ``(positions, vocab)`` scores with each position's row prompt and finished blocks as `input_ids` (one call
        per group of rows at the same block, so `input_ids` is rectangular). None when there is nothing to apply."""
        if not (logits_processor or plan.warpers):
            return None

        def process(scores):
            B = plan.block_size
            block_of = rows.block_index[entry_row]  # [N]
            for index in block_of.unique().tolist():
                group = (block_of == index).nonzero().squeeze(-1)
                batch_rows = rows.index[entry_row[group]]
                context = torch.cat([input_ids[batch_rows], generated[batch_rows, : index * B]], dim=1)
                part = scores[group]
                if logits_processor:
                    part = logits_processor(context, part)
                if plan.temperature > 0:
                    part = plan.warpers(context, part)
                scores[group] = part
            return scores

        return process

    @staticmethod
    def _unmask_tokens(block, tokens, confidence, stepping, k, plan: _DecodingPlan):
        """Fill masked positions (DESIGN 4.2): `static` takes k of them (`k` ``[m]`` per row), `threshold` also
        those above tau. Under `unmask_order="left_to_right"` the k are the leftmost masked positions and only the
        above-tau positions before the first masked one at or below tau count; under `"confidence"` the k are the
        most confident (ties go to the earlier position) and every above-tau position counts. Revision replaces decoded tokens
        the model now contradicts with confidence above `edit_threshold`. Rows not `stepping` are left unchanged."""
        masked = block == plan.mask_token_id  # [m, B]
        if plan.unmask_order == "left_to_right":
            # the k leftmost masked positions (the stable sort keeps column order among equal keys) ...
            ranked = masked.float().masked_fill(~masked, -float("inf"))
        else:
            ranked = confidence.masked_fill(~masked, -float("inf"))
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
        columns = torch.arange(block.shape[1], device=block.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, columns)  # [m, B]; 0 = the first position to fill
        chosen = masked & (rank < k[:, None])
        if plan.unmasking == "threshold":
            above = masked & (confidence > plan.threshold)
            if plan.unmask_order == "left_to_right":
                # ... and the confident ones only up to the first masked position that is not: a token after an
                # undecided uncertain one may depend on it, so it waits (its marginal mixes that one's choices)
                uncertain = masked & ~above
                above = above & (uncertain.long().cumsum(-1) == 0)
            chosen = chosen | above
        updated = torch.where(chosen, tokens, block)
        if plan.edit_threshold is not None:
            revise = ~masked & (tokens != block) & (confidence > plan.edit_threshold)
            updated = torch.where(revise, tokens, updated)
        return torch.where(stepping[:, None], updated, block)

    @staticmethod
    def _fill_predicted_eos_tail(block, proposals, stepping, plan: _DecodingPlan):
        """`eos_tail_fill`: in each stepping row, the longest tail of the block in which every position is EOS,
        decided or proposed (`proposals` ``[m, B]``: this step's choice at the decided positions, the block
        elsewhere), becomes EOS at its undecided positions. Returns the block and the positions that changed."""
        masked = block == plan.mask_token_id  # [m, B]
        current = torch.where(masked, proposals, block)
        is_eos = torch.isin(current, plan.eos_token_ids) & (current != plan.mask_token_id)  # [m, B]
        tail = is_eos.flip(-1).int().cumprod(-1).flip(-1).bool()  # [m, B]: position j and all after it are EOS
        fill = tail & masked & stepping[:, None]
        return torch.where(fill, proposals, block), fill

    @staticmethod
    def _fill_after_eos(block, plan: _DecodingPlan):
        """EOS fill (DESIGN 4.4): every position after a block's first EOS becomes that EOS. Returns the block and
        the positions that changed ``[m, B]``."""
        is_eos = torch.isin(block, plan.eos_token_ids)  # [m, B]
        first = is_eos.int().argmax(-1, keepdim=True)  # [m, 1]
        eos = block.gather(1, first)  # [m, 1]
        after = is_eos.any(-1, keepdim=True) & (torch.arange(block.shape[1], device=block.device)[None] > first)
        return torch.where(after, eos, block), after & (block != eos)

    def _record_trace(self, trace, rows: _Rows, kind, stepping, before, chosen, filled, confidence, plan):
        """Append one event per row of this forward to `trace` (format: `BardVLGenerationOutput.trace`)."""
        B, mask = plan.block_size, plan.mask_token_id
        after = rows.block.tolist()
        columns = {"before": before.tolist(), "block_index": rows.block_index.tolist(), "steps": rows.steps.tolist()}
        if chosen is not None:
            columns.update(chosen=chosen.tolist(), confidence=confidence.tolist())
        if filled is not None:
            columns["filled"] = filled.tolist()
        finished = rows.finished.tolist()
        for r, (row, steps) in enumerate(zip(rows.index.tolist(), stepping.tolist())):
            event_kind = kind if isinstance(kind, str) else kind[r]
            block_index = columns["block_index"][r]
            event = {"forward": len(trace[row]), "kind": event_kind, "block": block_index, "step": -1,
                     "block_start": block_index * B, "unmasked": [], "revised": [], "eos_filled": [],
                     "block_tokens": after[r]}
            if steps:
                old, new, conf = columns["before"][r], columns["chosen"][r], columns["confidence"][r]
                event["step"] = columns["steps"][r]
                event["unmasked"] = [[j, new[j], conf[j]] for j in range(B) if old[j] == mask and new[j] != mask]
                event["revised"] = [[j, old[j], new[j], conf[j]] for j in range(B) if old[j] != mask and new[j] != old[j]]
                if "filled" in columns:
                    event["eos_filled"] = [j for j in range(B) if columns["filled"][r][j]]
            elif event_kind == "commit":  # a commit of its own (fuse_commit=False): the committed block
                event.update(block=block_index - 1, block_start=(block_index - 1) * B, block_tokens=finished[r])
            trace[row].append(event)

    # ------------------------------------------------------------------ 2.-4. one decoding iteration
    # `generate` and the continuous-batching server (`transformers_bard.serving`) share these two steps; the server
    # adds and removes rows between them.
    def _decoding_step(self, rows: _Rows, cache, step_mask, forwards, input_ids, generated, plan: _DecodingPlan,
                       logits_processor, generator, trace):
        """Steps 2.-3.: one forward in which committing rows append their finished block (with their next block's
        first step unless `fuse_commit=False`) and every other row takes a denoising step; then choose and unmask
        tokens. Counts the forward in `forwards` ``[batch]``; returns the mask to reuse in the next forward."""
        denoising = ~rows.committing if not plan.fuse_commit else torch.ones_like(rows.committing)
        kind = ["commit" if c else "denoise" for c in rows.committing.tolist()] if trace is not None else None
        logits, decide, step_mask = self._decoding_forward(rows, denoising, cache, step_mask, plan)
        forwards[rows.index] += 1
        self._take_step(rows, logits, decide, input_ids, generated, plan, logits_processor, generator, trace, kind)
        return step_mask

    def _end_finished_blocks(self, rows: _Rows, input_ids, generated, lengths, plan: _DecodingPlan,
                             stopping_criteria, streamer, complete=None):
        """Step 4: rows whose block has no mask left (or the rows `complete` ``[m]`` says are done: verified decoding
        decides that itself) keep its tokens (`_finish_blocks`), then stop or move on to their next block (committed
        by their next forward). Returns which rows stop ``[m]``; the caller removes them."""
        if complete is None:
            complete = (rows.block != plan.mask_token_id).all(-1)  # [m]
        if not complete.any():
            return torch.zeros_like(complete)
        stop = self._finish_blocks(rows, complete, input_ids, generated, lengths, plan, stopping_criteria, streamer)
        go_on = complete & ~stop
        rows.committing = rows.committing | go_on
        rows.finished = torch.where(go_on[:, None], rows.block, rows.finished)
        rows.block = rows.block.masked_fill(go_on[:, None], plan.mask_token_id)
        rows.block_index = rows.block_index + go_on.long()
        rows.steps = rows.steps.masked_fill(go_on, 0)
        return stop

    # ------------------------------------------------------------------ 4. finishing a block
    @staticmethod
    def _finish_blocks(rows: _Rows, complete, input_ids, generated, lengths, plan: _DecodingPlan, stopping_criteria,
                       streamer):
        """Write the kept tokens of the `complete` rows' blocks (cut after the first EOS and at `max_new_tokens`)
        into `generated`, update `lengths`, stream them; returns which rows stop ``[m]``."""
        B = plan.block_size
        done = complete.nonzero().squeeze(-1)  # [d]
        block, batch_rows = rows.block[done], rows.index[done]
        offset = rows.block_index[done] * B  # [d]
        if plan.eos_token_ids is not None:
            is_eos = torch.isin(block, plan.eos_token_ids)
        else:
            is_eos = torch.zeros_like(block, dtype=torch.bool)
        has_eos = is_eos.any(-1)
        first_eos = is_eos.int().argmax(-1)
        keep = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, B))
        limit = rows.max_new_tokens[done]  # [d]
        keep = torch.minimum(keep, limit - offset)  # [d]
        columns = torch.arange(B, device=block.device)[None, :]
        fill = plan.pad_token_id if plan.pad_token_id is not None else 0
        generated[batch_rows[:, None], offset[:, None] + columns] = block.masked_fill(columns >= keep[:, None], fill)
        lengths[batch_rows] = offset + keep
        if streamer is not None:
            streamer.put(block[0, : int(keep[0])].cpu())
        stop_done = has_eos | (offset + B >= limit)
        if stopping_criteria:
            for index in rows.block_index[done].unique().tolist():
                group = (rows.block_index[done] == index).nonzero().squeeze(-1)
                so_far = torch.cat([input_ids[batch_rows[group]], generated[batch_rows[group], : (index + 1) * B]], 1)
                stop_done[group] |= stopping_criteria(so_far, None).to(stop_done.device)
        stop = torch.zeros_like(complete)
        stop[done] = stop_done
        return stop

    # ------------------------------------------------------------------ loading
    def adjust_generation_fn(
        self,
        generation_config,
        from_auto_class,
        from_pipeline,
        pretrained_model_name_or_path,
        trust_remote_code=None,
        **kwargs,
    ):
        """Called by `from_pretrained`: load `generation_config.json` as a `BardVLGenerationConfig` (DESIGN 6).

        An explicit `generation_config=` is applied like one passed to `generate`; a file without BARD fields keeps
        only its token ids and lengths; without a file the config built from the model config stays.
        """
        del trust_remote_code  # no custom generate functions
        if generation_config is not None:
            self.generation_config = BardVLGenerationConfig.from_generation_config(
                generation_config, base=self.generation_config
            )
            return
        if pretrained_model_name_or_path is None:
            return
        download_kwargs = {key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs}
        try:
            self.generation_config = BardVLGenerationConfig.from_pretrained(
                pretrained_model_name_or_path, _from_auto=from_auto_class, _from_pipeline=from_pipeline,
                **download_kwargs,
            )
        except OSError:
            logger.info("No generation_config.json found; using the BARD defaults with the model config's token ids.")


__all__ = [
    "BardVLGenerationConfig",
    "BardVLGenerationMixin",
    "BardVLGenerationOutput",
    "bard_generation_config",
]
