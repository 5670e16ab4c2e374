"""Conversion of an autoregressive Qwen3-VL checkpoint into a BARD-VL checkpoint (DESIGN 2, 5, 6).

The weights do not change (block diffusion needs no new parameter): when `<|mask|>` fits inside the existing embedding
rows the safetensors shards are copied byte for byte; only when it does not fit is the model loaded, resized and saved.
Everything is written into a temporary folder beside the target and renamed into place at the end, so a failure
never leaves a half-written checkpoint.

The source is only ever read (issue 39): an output folder that is, holds or lies inside it is refused, as is the
current folder; `overwrite` replaces only an earlier conversion's output (`_check_output`). A source whose tokenizer
does not load with its vocabulary, or whose mask id would land on a token the model already uses, is refused too
(`_load_tokenizer`, `_mask_token_id`): its conversion would not reproduce it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer
from transformers.dynamic_module_utils import custom_object_save

from .checkpoint_files import check_output_dir, check_safetensors_files
from .models.bard_vl.configuration_bard_vl import (
    MASK_TOKEN,
    PROMPT_ATTENTION_CHOICES,
    QWEN_VOCAB_SIZE,
    UPSTREAM_MASK_TOKEN_ID,
    BardVLConfig,
)
from .models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration, model_card

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "bard_vl")
# Files carried over unchanged from the source when present (tokenizer, processor, chat template).
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)
# Everything else a conversion writes, besides the `*.safetensors` weights and the model code (`*_bard_vl.py`): a
# folder of these names only, with a BARD-VL config.json, is an earlier conversion's output, which `overwrite` replaces.
WRITTEN_FILES = frozenset(CARRIED_FILES) | {
    "config.json",
    "generation_config.json",
    "README.md",
    "model.safetensors.index.json",
}
# The files a tokenizer loads from, named in the errors about it.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# Text any byte-level BPE (Qwen's) encodes and decodes back unchanged; a tokenizer loaded without its vocabulary does not.
TOKENIZER_PROBE = "The 3 red squares are at the left, 42 blue ones."


def _resolve_source(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"`source`={str(source)!r} is a file; pass the checkpoint directory that holds config.json.")
    text = str(source)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"`source`={text!r} does not exist. Pass a Qwen3-VL checkpoint directory.")
    # A Hub id such as "Qwen/Qwen3-VL-4B-Instruct": download it (needs network).
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text))
    except Exception as error:  # offline, unknown repo, no access
        raise FileNotFoundError(
            f"`source`={text!r} is not a local directory and could not be downloaded from the Hub ({error}). "
            "Pass a local checkpoint directory."
        ) from error


def _check_arguments(source_dir: Path, block_size, prompt_attention, prediction_shift) -> dict:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be an integer >= 1, got {block_size!r}. The paper starts at 4.")
    if prediction_shift is not None and not isinstance(prediction_shift, bool):
        raise ValueError(
            f"`prediction_shift` must be True, False or None (keep a BARD-VL source's setting), got "
            f"{prediction_shift!r}."
        )
    if prompt_attention not in PROMPT_ATTENTION_CHOICES:
        raise ValueError(f"`prompt_attention` must be one of {PROMPT_ATTENTION_CHOICES}, got {prompt_attention!r}.")
    config_file = source_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"`source`={str(source_dir)!r} has no config.json; it is not a transformers checkpoint.")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type == "qwen3_vl_moe":
        raise ValueError(
            "`source` is a Qwen3-VL-MoE checkpoint (model_type 'qwen3_vl_moe'); transformers-bard converts dense "
            "Qwen3-VL models only. Use a dense Qwen3-VL checkpoint (e.g. Qwen/Qwen3-VL-4B-Instruct)."
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"`source` has model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES} (a Qwen3-VL checkpoint). "
            "Only Qwen3-VL checkpoints (e.g. Qwen/Qwen3-VL-4B-Instruct) can be converted."
        )
    weights = list(source_dir.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"`source`={str(source_dir)!r} has no .safetensors weights; convert .bin weights first.")
    # the shards are copied without being read: check their headers now, so a damaged source writes nothing
    check_safetensors_files(source_dir, "source")
    return config


def _check_output(source, source_dir: Path, output_dir, overwrite: bool) -> Path:
    """The folder the checkpoint goes to, links resolved: refused if it is, holds or lies inside the source, is the
    current folder (or holds it), is a file, or holds anything but an earlier conversion's output (which it may
    replace only with `overwrite`)."""
    check_output_dir(output_dir, "output_dir", {"source": [source, source_dir]}, replaced=True, suffix="bard")
    target = Path(output_dir).expanduser().resolve()
    if not target.exists():
        return target
    if not target.is_dir():
        raise FileExistsError(
            f"`output_dir`={str(output_dir)!r} ({target}) is a file, not a folder. Choose a folder path; nothing was "
            "written."
        )
    entries = sorted(entry.name for entry in target.iterdir())
    if not entries:
        return target
    foreign = _not_written_by_a_conversion(target, entries)
    if foreign == entries:
        raise FileExistsError(
            f"`output_dir`={str(output_dir)!r} ({target}) is not the output of a conversion (it holds {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}): `overwrite` replaces only an earlier conversion's output. Choose "
            "a new folder; nothing was written."
        )
    if foreign:
        raise FileExistsError(
            f"`output_dir`={str(output_dir)!r} ({target}) holds files a conversion does not write: {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}; `overwrite` replaces only an earlier conversion's output. Move "
            "them out or choose a new folder; nothing was written."
        )
    if not overwrite:
        raise FileExistsError(
            f"`output_dir`={str(output_dir)!r} holds an earlier conversion. Choose another folder, or pass "
            "overwrite=True (CLI: --overwrite) to replace it."
        )
    return target


def _not_written_by_a_conversion(folder: Path, entries: list[str]) -> list[str]:
    """The entries of `folder` a conversion does not write: all of them unless config.json is a BARD-VL config."""
    try:
        is_bard = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "bard_vl"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        is_bard = False
    if not is_bard:
        return entries

    def written(name: str) -> bool:
        path = folder / name
        if path.is_symlink() or not path.is_file():
            return False
        return name in WRITTEN_FILES or name.endswith((".safetensors", "_bard_vl.py"))

    return [name for name in entries if not written(name)]


def _tokenizer_files(source_dir: Path) -> str:
    """The tokenizer files `source_dir` holds, for the errors, and whether its vocabulary file is missing."""
    present = [str(source_dir / name) for name in TOKENIZER_FILES if (source_dir / name).is_file()]
    has_vocabulary = (source_dir / "tokenizer.json").is_file() or (
        (source_dir / "vocab.json").is_file() and (source_dir / "merges.txt").is_file()
    )
    return ", ".join(present) + ("" if has_vocabulary else "; missing: tokenizer.json (or vocab.json and merges.txt)")


def _load_tokenizer(source_dir: Path, source_config: dict):
    """The source's tokenizer, refused (naming its files) if it does not load with its vocabulary: text must round-trip
    through it and the vision placeholder tokens must carry the ids config.json gives them (DESIGN 2)."""
    from .models.bard_vl.processing_bard_vl import VISION_TOKEN_DEFAULTS

    files = _tokenizer_files(source_dir)
    fix = "Restore the tokenizer files (tokenizer.json, or vocab.json and merges.txt) from the original checkpoint."
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except Exception as error:  # a damaged or missing file surfaces as any of JSON, OS, value or import errors
        raise ValueError(
            f"`source`: the tokenizer ({files}) does not load ({type(error).__name__}: {error}). {fix}"
        ) from error
    ids = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
    if not ids or tokenizer.decode(ids) != TOKENIZER_PROBE:
        raise ValueError(
            f"`source`: the tokenizer ({files}) does not load with its vocabulary: {TOKENIZER_PROBE!r} encodes to "
            f"{ids[:8]}{' ...' if len(ids) > 8 else ''} and decodes to {tokenizer.decode(ids)!r} "
            f"({len(tokenizer)} tokens). {fix}"
        )
    for kind, default in VISION_TOKEN_DEFAULTS.items():
        key = f"{kind}_token_id"
        expected = source_config.get(key)
        token = getattr(tokenizer, f"{kind}_token", None) or default
        if expected is not None and tokenizer.convert_tokens_to_ids(token) != expected:
            raise ValueError(
                f"`source` config.json has {key}={expected}, but the tokenizer ({files}) maps {token!r} to "
                f"{tokenizer.convert_tokens_to_ids(token)}: they are not the same model's. {fix}"
            )
    return tokenizer


def _token_roles(tokenizer, source_config: dict, token_id: int) -> list[str]:
    """What `token_id` already is to the model: a special token of the tokenizer (`<|im_end|>`, `<|im_start|>`, ...),
    an id of config.json (`image_token_id`, ...), or a token text can contain. Empty for a fresh id and for a mask
    token (a special token with no other use)."""
    roles = [
        name for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
        if getattr(tokenizer, name, None) is not None and getattr(tokenizer, f"{name}_id", None) == token_id
    ]
    for config, where in ((source_config, "config.json"), (source_config.get("text_config") or {}, "text_config")):
        for key, value in config.items():
            if key.endswith("_token_id") and key != "mask_token_id" and token_id in (
                value if isinstance(value, list) else [value]
            ):
                roles.append(f"{where} {key}")
    string = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
    if string is not None:
        added = tokenizer.added_tokens_decoder.get(token_id)
        if added is None or not added.special:
            roles.append(f"a token text can contain ({string!r})")
        elif string in tokenizer.all_special_tokens and string not in (MASK_TOKEN, tokenizer.mask_token) and not roles:
            roles.append(f"the special token {string!r}")
    return roles


def _mask_token_id(source_dir: Path, source_config: dict, tokenizer, mask_token: str, vocab_rows: int) -> int:
    """The id of the mask token (DESIGN 2), refused if it would land on a token the model already uses.

    A BARD-VL source keeps the id its weights were trained with (a new token would point the config at an untrained
    row); an autoregressive source reuses its tokenizer's `mask_token` if that is a special token with no other use,
    else gets a new one (added to `tokenizer`; the tokenizer was checked complete, so the new id is past every token).
    """
    files = _tokenizer_files(source_dir)
    mask_id = _existing_mask_token_id(source_config, vocab_rows)
    if mask_id is not None:
        string = tokenizer.convert_ids_to_tokens(mask_id) if mask_id < len(tokenizer) else None
        roles = _token_roles(tokenizer, source_config, mask_id)
        if roles or string not in (None, mask_token, MASK_TOKEN):
            raise ValueError(
                f"`source` config.json has mask_token_id={mask_id}, which is the token {string!r} in its tokenizer "
                f"({files}){': ' + ', '.join(roles) if roles else ''}. Masked positions would read as that token. "
                f"Fix `mask_token_id` in config.json to the id of {MASK_TOKEN!r}, or convert the autoregressive "
                "checkpoint it came from."
            )
        return mask_id
    mask_id = tokenizer.convert_tokens_to_ids(mask_token)
    if mask_id is not None and mask_id != tokenizer.unk_token_id:
        roles = _token_roles(tokenizer, source_config, mask_id)
        if roles:
            raise ValueError(
                f"`mask_token`={mask_token!r} is id {mask_id} in the tokenizer of `source` ({files}), a token the "
                f"model already uses: {', '.join(roles)}. Masked positions would read as that token. Pass a "
                f"`mask_token` the tokenizer does not have (default {MASK_TOKEN!r})."
            )
        return mask_id
    tokenizer.add_tokens([AddedToken(mask_token, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(mask_token)


def _existing_mask_token_id(source_config: dict, vocab_rows: int) -> int | None:
    """The mask id a BARD-VL source was trained with (DESIGN 2): its `mask_token_id`, or, when absent (upstream
    layout) and the vocabulary is Qwen-sized, the upstream id 151671, which has no string in the tokenizer. None for
    an autoregressive source."""
    if source_config.get("model_type") != "bard_vl":
        return None
    mask_id = source_config.get("mask_token_id")
    if mask_id is not None:
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < vocab_rows:
            raise ValueError(
                f"`source` config.json has mask_token_id={mask_id!r}, which is not a row of its embedding "
                f"(vocab_size={vocab_rows}). Fix `mask_token_id` in config.json to the id of `<|mask|>` in its "
                "tokenizer, or convert the autoregressive checkpoint it came from."
            )
        return mask_id
    return UPSTREAM_MASK_TOKEN_ID if vocab_rows >= QWEN_VOCAB_SIZE else None


def _bard_config(
    source_config: dict, block_size: int, mask_token_id: int, prompt_attention: str, prediction_shift, source_name
):
    fields = dict(source_config)
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    if prediction_shift is None:  # keep a BARD-VL source's setting; an AR source gets the paper's (False)
        prediction_shift = bool(source_config.get("prediction_shift", False))
    fields.update(
        block_size=block_size,
        mask_token_id=mask_token_id,
        prompt_attention=prompt_attention,
        prediction_shift=prediction_shift,
        source_model=source_name,
    )
    config = BardVLConfig.from_dict(fields)
    config.architectures = ["BardVLForConditionalGeneration"]
    # `register_for_auto_class` names one Auto class per class (AutoModel, what the model card uses, and AutoConfig);
    # image-text-to-text pipelines look the model up as AutoModelForImageTextToText, so the checkpoint names it too.
    # Saving adds the other entries to this dict and keeps this one.
    config.auto_map = {"AutoModelForImageTextToText": "modeling_bard_vl.BardVLForConditionalGeneration"}
    return config


def _source_name(source, source_config: dict) -> str:
    name = source_config.get("source_model") or source_config.get("_name_or_path")
    return str(name or source)


def convert_from_autoregressive(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    block_size: int = 4,
    *,
    prompt_attention: str = "block_causal",
    prediction_shift: bool | None = None,
    mask_token: str = MASK_TOKEN,
    overwrite: bool = False,
) -> Path:
    """Turn a Qwen3-VL checkpoint (Hub layout) into a BARD-VL checkpoint.

    Args:
        source: a local checkpoint directory (config.json, safetensors shards + index, tokenizer, processor files,
            chat template, generation config) or a Hub id (downloaded; needs network).
        output_dir: where to write the BARD checkpoint: absent, an empty folder, or (with `overwrite=True`) an earlier
            conversion's output. It may not be, hold or lie inside the source, nor be the current folder (or hold it).
        block_size: the block size B written to the config (DESIGN 3.5 starts at 4).
        prompt_attention: `"block_causal"` (reference) or `"causal"` (DESIGN 3.2). `"causal"` is the only prompt mask
            vLLM can serve (`transformers_bard.integrations.vllm`); the demo's `causal_prompt` ablation found no
            consistent difference at B = 32 (final model -2.5 and +0.2 points on the digits task at two seeds, +2.0
            on the choice task; each interval about +-2 points), so the reference's block-causal prompt stays the
            default.
        prediction_shift: `True` keeps the AR head's meaning (the hidden state at i predicts token i + 1, DESIGN
            4.1), `False` is the paper's (i predicts i). None (default): a BARD-VL source's own setting, else False.
            False stays the default for AR sources by measurement (the demo's `shift` ablation, 400 test rows): the
            shifted B = 4 stage reaches 98% of the AR source's exact match sooner on the digits task (300 against
            500 steps; 500 against 600 in the earlier run) but not on the choice task (500 both), and the final
            B = 32 models end level (digits PBM+SWD 1.000 both; choice 0.018 vs 0.010, both at the floor), so the
            shift buys a faster first stage, not a better model; upstream BARD checkpoints are unshifted.
        mask_token: the mask token string added to the tokenizer if absent (DESIGN 2). A BARD-VL source keeps the
            mask id it was trained with (its `mask_token_id`, or 151671 for an upstream checkpoint without one),
            even when the tokenizer has no string for it; nothing is added then.
        overwrite: replace an earlier conversion's output in `output_dir` (only that: a folder holding any other file
            is refused).

    Returns:
        The output directory. It loads with `AutoModel`/`AutoModelForImageTextToText`/`AutoProcessor` after
        `import transformers_bard`, and with `trust_remote_code=True` anywhere.

    Example:

    ```python
    >>> from transformers_bard import convert_from_autoregressive
    >>> convert_from_autoregressive("Qwen/Qwen3-VL-4B-Instruct", "bard-vl-4b-b4", block_size=4)
    PosixPath('bard-vl-4b-b4')
    >>> # for vLLM: convert_from_autoregressive(source, "bard-vl-4b-b4-causal", prompt_attention="causal")
    ```
    """
    source_dir = _resolve_source(source)
    target = _check_output(source, source_dir, output_dir, overwrite)
    source_config = _check_arguments(source_dir, block_size, prompt_attention, prediction_shift)

    # 1. the tokenizer, with <|mask|> (DESIGN 2): its id must fall inside the embedding rows, on no token in use
    tokenizer = _load_tokenizer(source_dir, source_config)
    vocab_rows = (source_config.get("text_config") or {}).get("vocab_size", source_config.get("vocab_size"))
    mask_id = _mask_token_id(source_dir, source_config, tokenizer, mask_token, vocab_rows)
    needs_resize = mask_id >= vocab_rows

    # beside the real output folder (links resolved): outside the source and the output, on the output's file system
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # when <|mask|> needs new embedding rows, the config takes its id only after the resize
        config = _bard_config(
            source_config, block_size, None if needs_resize else mask_id, prompt_attention, prediction_shift,
            _source_name(source, source_config),
        )
        # 2. carried-over files, then our tokenizer (overwrites the tokenizer files with <|mask|> added)
        for name in CARRIED_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp_dir / name)
        tokenizer.save_pretrained(tmp_dir)
        _mark_processor(tmp_dir)
        # 3. weights: unchanged shards copied as they are, or a resize when <|mask|> does not fit
        if needs_resize:
            config = _resize_and_save(source_dir, tmp_dir, config, len(tokenizer), mask_id)
        else:
            for shard in source_dir.glob("*.safetensors"):
                shutil.copyfile(shard, tmp_dir / shard.name)
            if (source_dir / "model.safetensors.index.json").is_file():
                shutil.copyfile(source_dir / "model.safetensors.index.json", tmp_dir / "model.safetensors.index.json")
            _export_model_code(tmp_dir, config)
            config.save_pretrained(tmp_dir)
        # 4. decoding defaults of DESIGN 4.6 (the AR sampling settings do not carry over) and the model card
        _write_generation_config(source_dir, tmp_dir, config, tokenizer)
        model_card(config).save(tmp_dir / "README.md")
        # 5. move into place
        _move_into_place(tmp_dir, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Converted %s to a BARD-VL checkpoint at %s (block_size=%d)", source, output_dir, block_size)
    return Path(output_dir)


def _move_into_place(tmp_dir: Path, target: Path) -> None:
    """Rename `tmp_dir` to `target`. An earlier conversion there (the only non-empty folder `_check_output` lets
    through) is renamed aside first and removed once the new one is in place; an empty folder is replaced by the
    rename itself."""
    if not (target.is_dir() and any(target.iterdir())):
        os.replace(tmp_dir, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old)
    os.replace(tmp_dir, target)
    shutil.rmtree(old)


def _export_model_code(folder: Path, config: BardVLConfig) -> None:
    """What `save_pretrained` does for a class registered with `register_for_auto_class`, without the weights (they
    are copied byte for byte): copy the modeling file and its relative imports into `folder` and add the model to
    `config.auto_map` (DESIGN 5). The model is built on the meta device, so no memory is allocated."""
    with torch.device("meta"):
        model = BardVLForConditionalGeneration(config)
    custom_object_save(model, folder, config=config)


def _mark_processor(folder: Path) -> None:
    """Point the processor files at `BardVLProcessor` (torchvision-free) for both the package and remote code."""
    from .models.bard_vl.processing_bard_vl import mark_processor_files

    mark_processor_files(folder)


def _resize_and_save(source_dir: Path, tmp_dir: Path, config: BardVLConfig, new_rows: int, mask_id: int):
    """Load, grow the embedding and LM head to hold `<|mask|>` (rounded up to a multiple of 64), save."""
    model = BardVLForConditionalGeneration.from_pretrained(source_dir, config=config)
    model.resize_token_embeddings(new_rows, pad_to_multiple_of=64)
    model.config.mask_token_id = mask_id
    model.config.validate_bard_fields()
    model.save_pretrained(tmp_dir)
    return model.config


def _write_generation_config(source_dir: Path, tmp_dir: Path, config: BardVLConfig, tokenizer) -> None:
    from .models.bard_vl.generation_bard_vl import bard_generation_config

    source = None
    if (source_dir / "generation_config.json").is_file():
        source = json.loads((source_dir / "generation_config.json").read_text())
    bard_generation_config(config, source, tokenizer).save_pretrained(tmp_dir)


__all__ = ["convert_from_autoregressive", "MASK_TOKEN"]
