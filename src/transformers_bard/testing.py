"""Tiny Qwen3-VL checkpoints built offline, for tests, docs and the demo (DESIGN 6).

Nothing can be downloaded from a model hub here, so every test model is built from scratch: a byte-level BPE trained
on a small generated corpus (wrapped in transformers' `Qwen2Tokenizer`), a Qwen3-VL config of about 0.2M parameters,
random weights and the Hub's file layout of `Qwen/Qwen3-VL-*-Instruct` (sharded safetensors plus index,
`chat_template.json`, `preprocessor_config.json`, `video_preprocessor_config.json`, `generation_config.json`).

The special tokens keep Qwen's order (`<|endoftext|>` first, `</think>` last) right after the BPE vocabulary, and the
embedding has more rows than the tokenizer has ids, like Qwen's 151,936 rows for 151,669 ids, so conversion can add
`<|mask|>` without resizing (DESIGN 2).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.utils import logging as hf_logging

__all__ = [
    "QWEN3_VL_CHAT_TEMPLATE",
    "TINY_BPE_VOCAB_SIZE",
    "VLLM_CPU_CONFIG_OVERRIDES",
    "build_tiny_qwen3_vl",
    "build_tiny_tokenizer",
    "make_image",
    "published_qwen3_vl_config",
    "published_widths",
    "tiny_chat_messages",
    "tiny_qwen3_vl_config",
]

# Size of the trained byte-level BPE vocabulary: the 256 byte symbols plus 192 merges. The special tokens follow it.
TINY_BPE_VOCAB_SIZE = 448

# `config_overrides` of `build_tiny_qwen3_vl` for a checkpoint vLLM can serve on CPU: its CPU attention refuses head
# sizes below 32 (the tiny default is 8), so hidden 128, 2 heads of 64, 1 KV head, M-RoPE sections [16, 8, 8].
VLLM_CPU_CONFIG_OVERRIDES = {
    "text_config": {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [16, 8, 8],
                                        "mrope_interleaved": True}},
    "vision_config": {"out_hidden_size": 128},
}

# Qwen2/Qwen3 added tokens in their Hub order (ids 151643..151668 there, TINY_BPE_VOCAB_SIZE + 0..25 here).
# The first 14 are special (skipped by `decode(skip_special_tokens=True)`); the rest are ordinary added tokens.
_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_PLAIN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# Spare embedding rows past the last tokenizer id, so `<|mask|>` fits without a resize (DESIGN 2).
_SPARE_EMBEDDING_ROWS = 16
_EMBEDDING_ROW_MULTIPLE = 64

# Vision geometry shared by the config and the image processor files: one merged image token covers
# (patch * merge) ** 2 = 32 x 32 pixels.
_PATCH_SIZE = 16
_MERGE_SIZE = 2
_TEMPORAL_PATCH_SIZE = 2

# Chat template with the same output as Qwen3-VL-Instruct's (ChatML turns; an image renders as
# <|vision_start|><|image_pad|><|vision_end|>, a video with <|video_pad|>; the system message is rendered only when it
# comes first; no default system prompt; tool calls and responses as Qwen writes them). Like the real template it has
# no {% generation %} markers (DESIGN 3.1).
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}\n"
    "{%- macro text_of(content) -%}\n"
    "    {%- if content is string -%}{{- content -}}\n"
    "    {%- else -%}{%- for part in content -%}{%- if 'text' in part -%}{{- part.text -}}{%- endif -%}{%- endfor -%}\n"
    "    {%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{%- macro media_and_text_of(content) -%}\n"
    "    {%- if content is string -%}{{- content -}}\n"
    "    {%- else -%}\n"
    "        {%- for part in content -%}\n"
    "            {%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}\n"
    "                {%- set counts.image = counts.image + 1 -%}\n"
    "                {%- if add_vision_id -%}{{- 'Picture ' ~ counts.image ~ ': ' -}}{%- endif -%}\n"
    "                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "            {%- elif part.type == 'video' or 'video' in part -%}\n"
    "                {%- set counts.video = counts.video + 1 -%}\n"
    "                {%- if add_vision_id -%}{{- 'Video ' ~ counts.video ~ ': ' -}}{%- endif -%}\n"
    "                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "            {%- elif 'text' in part -%}{{- part.text -}}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{%- set system_first = messages | length > 0 and messages[0].role == 'system' -%}\n"
    "{%- if tools -%}\n"
    "    {{- '<|im_start|>system\\n' -}}\n"
    "    {%- if system_first -%}{{- text_of(messages[0].content) ~ '\\n\\n' -}}{%- endif -%}\n"
    "    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
    " ~ 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}\n"
    "    {%- for tool in tools -%}{{- '\\n' ~ (tool | tojson) -}}{%- endfor -%}\n"
    "    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within'"
    ' ~ \' <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments":\''
    " ~ ' <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}\n"
    "{%- elif system_first -%}\n"
    "    {{- '<|im_start|>system\\n' ~ text_of(messages[0].content) ~ '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message.role == 'user' -%}\n"
    "        {{- '<|im_start|>user\\n' ~ media_and_text_of(message.content) ~ '<|im_end|>\\n' -}}\n"
    "    {%- elif message.role == 'assistant' -%}\n"
    "        {{- '<|im_start|>assistant\\n' ~ text_of(message.content) -}}\n"
    "        {%- for call in message.tool_calls or [] -%}\n"
    "            {%- if not loop.first or message.content -%}{{- '\\n' -}}{%- endif -%}\n"
    "            {%- set fn = call.function if call.function else call -%}\n"
    '            {{- \'<tool_call>\\n{"name": "\' ~ fn.name ~ \'", "arguments": \' -}}\n'
    "            {{- fn.arguments if fn.arguments is string else (fn.arguments | tojson) -}}\n"
    "            {{- '}\\n</tool_call>' -}}\n"
    "        {%- endfor -%}\n"
    "        {{- '<|im_end|>\\n' -}}\n"
    "    {%- elif message.role == 'tool' -%}\n"
    "        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}\n"
    "        {{- '\\n<tool_response>\\n' ~ media_and_text_of(message.content) ~ '\\n</tool_response>' -}}\n"
    "        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
)

# Word lists of the generated training corpus: captions, questions, arithmetic and chat role names, so that the
# tokens the tests and the demo use get merged into few BPE pieces.
_COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray", "pink", "brown")
_SHAPES = ("square", "circle", "triangle", "line", "dot", "star", "cross", "ring", "box", "stripe")
_PLACES = ("left", "right", "top", "bottom", "center", "corner", "middle", "edge")
_NOUNS = ("picture", "image", "photo", "cat", "dog", "bird", "tree", "house", "car", "boat", "sky", "sun")
_VERBS = ("shows", "contains", "has", "depicts", "displays")
_QUESTIONS = (
    "What is in the {noun}?",
    "What color is the {shape}?",
    "Describe the {noun}.",
    "How many {shape}s are there?",
    "Where is the {color} {shape}?",
    "Is there a {noun} in the {noun2}?",
)
_ANSWERS = (
    "The {noun} {verb} a {color} {shape}.",
    "It is {color}.",
    "There are {n} {shape}s.",
    "The {color} {shape} is at the {place}.",
    "Yes, there is a {noun} near the {place}.",
    "No, I see a {color} {noun2} instead.",
)
_CHAT_WORDS = "system user assistant You are a helpful assistant. Answer the question about the image briefly."


def _tiny_corpus(num_lines: int = 600, seed: int = 0) -> list[str]:
    """Deterministic English/digit lines for BPE training (seeded `random.Random`, no global state)."""
    rng = random.Random(seed)
    lines = [_CHAT_WORDS]
    for _ in range(num_lines):
        slots = {
            "color": rng.choice(_COLORS),
            "shape": rng.choice(_SHAPES),
            "place": rng.choice(_PLACES),
            "noun": rng.choice(_NOUNS),
            "noun2": rng.choice(_NOUNS),
            "verb": rng.choice(_VERBS),
            "n": rng.randint(0, 99),
        }
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(rng.choice(_QUESTIONS).format(**slots))
        lines.append(rng.choice(_ANSWERS).format(**slots))
        lines.append(f"{a} plus {b} is {a + b}. {a} times 3 is {3 * a}.")
    return lines


def build_tiny_tokenizer(vocab_size: int = TINY_BPE_VOCAB_SIZE) -> Qwen2Tokenizer:
    """Train a byte-level BPE on the built-in corpus and wrap it in `Qwen2Tokenizer` with Qwen3-VL's added tokens.

    Args:
        vocab_size: size of the BPE vocabulary (byte alphabet plus merges), from 257 to 512 (the most merges the
            built-in corpus supports). The 26 Qwen added tokens get the ids `vocab_size .. vocab_size + 25`, so
            `len(tokenizer) == vocab_size + 26`.

    Returns:
        A `Qwen2Tokenizer` whose pre-tokenizer, decoder and special tokens match Qwen3-VL's: eos `<|im_end|>`,
        pad `<|endoftext|>`, no bos, no unk, and no `<|mask|>` (conversion adds it, DESIGN 2).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 257 <= vocab_size <= 512:
        raise ValueError(f"`vocab_size` must be an integer in [257, 512], got {vocab_size!r}. Use the default 448.")
    # Same pre-tokenization as Qwen2Tokenizer (regex split, then byte-level), so the trained merges apply unchanged
    # once Qwen2Tokenizer rebuilds its own pipeline around them.
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trainer_tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    bpe = json.loads(trainer_tokenizer.to_str())["model"]
    vocab, merges = bpe["vocab"], [tuple(merge) for merge in bpe["merges"]]
    if len(vocab) != vocab_size:
        raise RuntimeError(f"BPE training produced {len(vocab)} tokens instead of {vocab_size}; enlarge the corpus.")

    added = [AddedToken(token, special=True, normalized=False) for token in _SPECIAL_TOKENS]
    added += [AddedToken(token, special=False, normalized=False) for token in _PLAIN_ADDED_TOKENS]
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        added_tokens_decoder={vocab_size + index: token for index, token in enumerate(added)},
        # Qwen lists every special token except <|endoftext|> as an additional special token.
        extra_special_tokens=list(_SPECIAL_TOKENS[1:]),
        errors="replace",
        split_special_tokens=False,
        model_max_length=262144,
    )


def _tiny_token_ids(bpe_vocab_size: int) -> dict[str, int]:
    """Ids of the added tokens for a tokenizer built by `build_tiny_tokenizer(bpe_vocab_size)`."""
    return {token: bpe_vocab_size + index for index, token in enumerate(_SPECIAL_TOKENS + _PLAIN_ADDED_TOKENS)}


def _padded_vocab_size(num_token_ids: int) -> int:
    """Embedding rows for a tokenizer with `num_token_ids` ids: spare rows for `<|mask|>`, rounded up to 64."""
    return math.ceil((num_token_ids + _SPARE_EMBEDDING_ROWS) / _EMBEDDING_ROW_MULTIPLE) * _EMBEDDING_ROW_MULTIPLE


def tiny_qwen3_vl_config(vocab_size: int | None = None, *, tokenizer=None, **overrides) -> Qwen3VLConfig:
    """A `Qwen3VLConfig` of about 0.2M parameters with the real model's structure.

    Text: hidden 32, 2 layers, 4 query / 2 key-value heads of dim 8, MLP 64, interleaved M-RoPE with
    `mrope_section` [2, 1, 1] (it must sum to head_dim / 2 = 4). Vision: depth 2, hidden 32, 4 heads, MLP 64, patch 16,
    spatial merge 2, temporal patch 2, an 8 x 8 learned position grid (bilinearly resampled to every image's grid),
    DeepStack taps after both vision blocks, output width 32 (= text hidden).

    Args:
        vocab_size: embedding rows. Defaults to the tiny tokenizer's id count plus 16 spare rows, rounded up to a
            multiple of 64 (512 for the default tokenizer), so a `<|mask|>` token added later needs no resize.
        tokenizer: a tokenizer to take the vision token ids from; defaults to the ids of `build_tiny_tokenizer()`.
        **overrides: top-level `Qwen3VLConfig` fields; `text_config` / `vision_config` dicts are merged into the
            tiny defaults rather than replacing them.
    """
    if tokenizer is not None:
        token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS}
        num_token_ids = len(tokenizer)
    else:
        token_ids = _tiny_token_ids(TINY_BPE_VOCAB_SIZE)
        num_token_ids = TINY_BPE_VOCAB_SIZE + len(_SPECIAL_TOKENS) + len(_PLAIN_ADDED_TOKENS)
    if vocab_size is None:
        vocab_size = _padded_vocab_size(num_token_ids)
    if vocab_size < num_token_ids:
        raise ValueError(
            f"`vocab_size`={vocab_size} is smaller than the tokenizer ({num_token_ids} ids). Leave it unset for the "
            "default, which leaves spare rows for `<|mask|>`."
        )
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        # Interleaved M-RoPE over head_dim / 2 = 4 frequencies: (t, h, w) get 2, 1, 1 of them ([24, 20, 20] at 128).
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": _PATCH_SIZE,
        "spatial_merge_size": _MERGE_SIZE,
        "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
        "out_hidden_size": 32,
        # A square grid (8 x 8) is what the vision tower's bilinear position interpolation expects.
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    }
    text_config.update(overrides.pop("text_config", None) or {})
    vision_config.update(overrides.pop("vision_config", None) or {})
    fields = {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        **overrides,
    }
    config = Qwen3VLConfig(**fields)
    # The pitfalls of DESIGN 3.2 (boolean 4-D masks) assume sdpa; eager would need additive float masks.
    config._attn_implementation = "sdpa"
    return config


# The published configurations of Qwen/Qwen3-VL-{2B,4B}-Instruct (their `config.json` on the Hub; the 2B at commit
# 89644892e4d85e24eaac8bacfd4f463576704203), the fields that decide the architecture. Shared by both sizes: the
# vocabulary (151,936 rows), head_dim 128, interleaved M-RoPE [24, 20, 20] with theta 5e6, a 262,144-position
# context, tied embeddings, and the 24-block, 1024-wide vision tower (patch 16, merge 2, DeepStack taps 5/11/17).
_PUBLISHED_TEXT = {
    "2b": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
           "num_key_value_heads": 8},
    "4b": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
           "num_key_value_heads": 8},
}
QWEN3_VL_VOCAB_SIZE = 151936


def published_qwen3_vl_config(
    size: str, *, text_layers: int | None = None, vision_depth: int | None = None
) -> Qwen3VLConfig:
    """Qwen3-VL-2B-Instruct's or Qwen3-VL-4B-Instruct's published configuration (``size`` "2b" or "4b"), for random
    weights at real width: benchmarks build it offline with the real vocabulary, widths, heads and vision tower.

    `text_layers` / `vision_depth` cut the depth only (to fit a small machine where a figure needs the width); the
    vision tower's DeepStack taps are then the last `len(taps)` blocks kept, so it still feeds three text layers.
    Everything else is the published value. The special token ids are Qwen's (151643 ...).
    """
    if size not in _PUBLISHED_TEXT:
        raise ValueError(f"`size` must be one of {sorted(_PUBLISHED_TEXT)}, got {size!r}.")
    text = _PUBLISHED_TEXT[size]
    vision_blocks = 24 if vision_depth is None else vision_depth
    taps = [5, 11, 17] if vision_blocks == 24 else list(range(max(vision_blocks - 3, 0), vision_blocks))
    config = Qwen3VLConfig(
        text_config={
            **text,
            "num_hidden_layers": text["num_hidden_layers"] if text_layers is None else text_layers,
            "vocab_size": QWEN3_VL_VOCAB_SIZE,
            "head_dim": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True},
            "tie_word_embeddings": True,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        vision_config={
            "depth": vision_blocks,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": text["hidden_size"],
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": taps,
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return config


def published_widths(size: str, *, text_layers: int | None = None, vision_depth: int | None = None) -> dict:
    """`tiny_qwen3_vl_config` overrides that give `published_qwen3_vl_config`'s architecture (widths, heads, depth,
    vocabulary, M-RoPE, vision tower) while keeping the tiny tokenizer's special token ids."""
    published = published_qwen3_vl_config(size, text_layers=text_layers, vision_depth=vision_depth)
    text = {key: value for key, value in published.text_config.to_dict().items()
            if key not in ("bos_token_id", "eos_token_id", "pad_token_id", "model_type", "transformers_version")}
    vision = {key: value for key, value in published.vision_config.to_dict().items()
              if key not in ("model_type", "transformers_version")}
    return {"text_config": text, "vision_config": vision, "tie_word_embeddings": published.tie_word_embeddings}


def _shard_size_for(state_dict: dict[str, torch.Tensor], num_shards: int) -> int:
    """Smallest `max_shard_size` (bytes) that splits `state_dict` into at most `num_shards` files.

    The split is greedy in key order, so the file count only falls as the size grows: bisect on it.
    """
    low = max(tensor.numel() * tensor.element_size() for tensor in state_dict.values())
    high = sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values())
    while low < high:
        middle = (low + high) // 2
        split = split_torch_state_dict_into_shards(state_dict, max_shard_size=middle)
        if len(split.filename_to_tensors) <= num_shards:
            high = middle
        else:
            low = middle + 1
    return low


def _image_processor_files(image_size: int) -> tuple[dict, dict]:
    """`preprocessor_config.json` and `video_preprocessor_config.json` as Qwen3-VL's Hub repos have them.

    Only the pixel bounds are tiny: images keep between one merged token (32 x 32 pixels) and
    (image_size / 32) ** 2 tokens.
    """
    common = {
        "patch_size": _PATCH_SIZE,
        "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
        "merge_size": _MERGE_SIZE,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
    }
    min_pixels = (_PATCH_SIZE * _MERGE_SIZE) ** 2
    image = {
        "size": {"longest_edge": image_size * image_size, "shortest_edge": min_pixels},
        **common,
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }
    video = {
        "size": {"longest_edge": 4 * image_size * image_size, "shortest_edge": min_pixels},
        **common,
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    return image, video


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_qwen3_vl(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_shards: int = 2,
    image_size: int = 64,
    config_overrides: dict | None = None,
) -> Path:
    """Write a random tiny Qwen3-VL checkpoint in the Hub layout of `Qwen/Qwen3-VL-*-Instruct`.

    Files: `config.json`, `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` (float32),
    `generation_config.json` (Qwen3-VL's autoregressive sampling defaults), `tokenizer.json` + `tokenizer_config.json`
    (`tokenizer_class` Qwen2Tokenizer, no chat template: like the Hub's, AutoTokenizer alone has none),
    `chat_template.json`, `preprocessor_config.json` and `video_preprocessor_config.json`.

    Args:
        output_dir: target folder; must not exist yet or be empty. Files are written to a temporary folder beside it
            and renamed into place, so a failure leaves no half-written checkpoint.
        seed: `torch.manual_seed` for the random weights; the same seed gives byte-identical weight files.
        num_shards: number of safetensors shards (1 writes a single `model.safetensors`, as small Hub repos do).
        image_size: side (pixels) of the largest square image kept at full resolution; multiple of 32, at least 32.
            Larger images are downscaled to at most `image_size ** 2` pixels, i.e. `(image_size / 32) ** 2` tokens.
        config_overrides: passed to `tiny_qwen3_vl_config` (e.g. `published_widths("2b")` for a checkpoint at
            Qwen3-VL-2B's width with the tiny tokenizer, for GPU benchmarks through the trainers).

    Returns:
        The checkpoint folder as a `Path`.
    """
    output_dir = Path(output_dir)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an integer, got {seed!r}.")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or not 1 <= num_shards <= 16:
        raise ValueError(f"`num_shards` must be an integer in [1, 16], got {num_shards!r}.")
    grid = _PATCH_SIZE * _MERGE_SIZE
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < grid or image_size % grid:
        raise ValueError(f"`image_size` must be a multiple of {grid} and at least {grid}, got {image_size!r}.")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"`output_dir`={str(output_dir)!r} exists and is not an empty folder; pass a new path.")

    tokenizer = build_tiny_tokenizer()
    config = tiny_qwen3_vl_config(tokenizer=tokenizer, **(config_overrides or {}))
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|im_end|>")}

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # Qwen3-VL-Instruct's shipped sampling settings; a BARD conversion replaces them (DESIGN 4.6).
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["<|endoftext|>"],
        pad_token_id=token_ids["<|endoftext|>"],
        eos_token_id=[token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.8,
        repetition_penalty=1.0,
    )
    max_shard_size = _shard_size_for(model.state_dict(), num_shards)
    image_processor_json, video_processor_json = _image_processor_files(image_size)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    # A progress bar for writing a sub-megabyte checkpoint is noise in test and demo output.
    progress_bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        _write_json(staging / "chat_template.json", {"chat_template": QWEN3_VL_CHAT_TEMPLATE})
        _write_json(staging / "preprocessor_config.json", image_processor_json)
        _write_json(staging / "video_preprocessor_config.json", video_processor_json)
        written = sorted(staging.glob("model*.safetensors"))
        if len(written) != num_shards:
            raise RuntimeError(f"Wrote {len(written)} weight shards instead of `num_shards`={num_shards}.")
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if progress_bars_were_enabled:
            hf_logging.enable_progress_bar()
    return output_dir


def make_image(seed: int = 0, size: tuple[int, int] = (32, 32), color: tuple[int, int, int] | None = None):
    """A deterministic RGB `PIL.Image` of `size` = (width, height).

    Random pixels from `numpy.random.default_rng(seed)`; with `color` = (r, g, b), a flat image of that colour with
    the same small seeded noise (+-8), so captions like "a red image" can be learned in the demo.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    if color is None:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    else:
        noise = rng.integers(-8, 9, size=(height, width, 3))
        pixels = np.clip(np.asarray(color, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def tiny_chat_messages(
    images: Sequence | None = None,
    *,
    system: str | None = None,
    turns: Sequence[tuple[str, str | None]] = (("What is in the image?", "A red square."),),
) -> list[dict]:
    """A conversation in TRL's structured vision format (what `trl.data_utils.prepare_multimodal_messages` returns).

    Every content is a list of blocks: `{"type": "image", "image": PIL.Image}` blocks (all `images`, at the start of
    the first user turn), then `{"type": "text", "text": ...}`. `turns` are (user, assistant) pairs; an assistant text
    of `None` ends the conversation on that user turn (for `add_generation_prompt=True`). Feed it to
    `processor.apply_chat_template(..., tokenize=True, return_dict=True)`.
    """
    if not turns:
        raise ValueError("`turns` must hold at least one (user, assistant) pair, got an empty sequence.")
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    for index, (user_text, assistant_text) in enumerate(turns):
        content = [{"type": "image", "image": image} for image in (images or [])] if index == 0 else []
        content.append({"type": "text", "text": user_text})
        messages.append({"role": "user", "content": content})
        if assistant_text is None:
            if index != len(turns) - 1:
                raise ValueError(f"Only the last turn may have no assistant text; turn {index} has None.")
            break
        messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant_text}]})
    return messages
