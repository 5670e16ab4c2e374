"""Stage layout on disk and stage checkpoints of the BARD trainers (DESIGN 3.5).

A run over `block_sizes` writes, under `output_dir`:

- ``checkpoints-b{B}/checkpoint-{step}``: the Trainer's mid-stage checkpoints of the stage at block size B (steps
  count within the stage). The trainer writes ``bard_stage.json`` (naming the stage) into each one last, once every
  process has written its files: a checkpoint folder without it is incomplete (a process killed while saving) and is
  never resumed from (`last_complete_checkpoint`);
- ``stage-b{B}``: the finished stage, a complete `save_pretrained` folder (model, processor, noise scheduler,
  ``trainer_state.json``, ``bard_stage.json`` marked complete), written to a temporary folder and renamed, so it
  exists only when complete (`publish_stage`).

`resume_point` reads this layout back for `resume_from_checkpoint`. A LoRA run's stage folder holds the merged model
(`merged_lora_state_dict`) and the adapter under ``adapter/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STAGE_STATE_NAME = "bard_stage.json"


def stage_dir_name(block_size: int) -> str:
    """Folder (under `output_dir`) of the finished stage at `block_size`."""
    return f"stage-b{block_size}"


def stage_checkpoints_dir_name(block_size: int) -> str:
    """Folder (under `output_dir`) of the mid-stage checkpoints of the stage at `block_size`."""
    return f"checkpoints-b{block_size}"


def stage_state(block_sizes: list[int], stage: int, global_step: int, complete: bool) -> dict:
    """Content of ``bard_stage.json``."""
    return {
        "stage": stage,
        "block_size": block_sizes[stage],
        "block_sizes": list(block_sizes),
        "global_step": global_step,
        "complete": complete,
    }


def write_stage_state(folder: str | os.PathLike, state: dict) -> None:
    """Write ``bard_stage.json`` into `folder` atomically (temporary file, then rename): it marks the folder complete."""
    path = os.path.join(folder, STAGE_STATE_NAME)
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)
        handle.write("\n")
    os.replace(f"{path}.tmp", path)


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The ``checkpoint-{step}`` folder of `folder` with the highest step that holds ``bard_stage.json``, or None.

    Folders without it were being written when their process died; they are skipped with a warning.
    """
    if not os.path.isdir(folder):
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(folder)
        if (match := pattern.match(name)) and os.path.isdir(os.path.join(folder, name))
    )
    for _, name in reversed(steps):
        path = os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, STAGE_STATE_NAME)):
            return path
        logger.warning(
            "Skipping %s: it has no %s, so its save was interrupted (the process died while writing it).",
            path,
            STAGE_STATE_NAME,
        )
    return None


def publish_stage(staging: str, final: str) -> None:
    """Rename the complete `staging` folder to `final`, replacing an older run's stage without a half-written state."""
    if os.path.exists(final):
        old = f"{staging}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def resume_point(
    output_dir: str, block_sizes: list[int], resume_from_checkpoint
) -> tuple[int, str | None, str | None]:
    """(first stage to train, mid-stage checkpoint to resume, finished-stage folder to load weights from).

    `resume_from_checkpoint=True` skips the finished stages, continues the first unfinished one from its last
    mid-stage checkpoint or, without one, from the previous stage's weights; with nothing complete at all (killed
    inside the first save) it warns and starts from the beginning. A path names a ``checkpoint-*`` or ``stage-b*``
    folder of this layout.
    """
    sizes = block_sizes
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() == "true":
        resume_from_checkpoint = True  # `--resume_from_checkpoint true` on the command line
    if resume_from_checkpoint in (None, False):
        return 0, None, None
    if resume_from_checkpoint is True:
        for stage, block_size in enumerate(sizes):
            final = os.path.join(output_dir, stage_dir_name(block_size))
            if os.path.isfile(os.path.join(final, STAGE_STATE_NAME)):
                continue
            checkpoints = os.path.join(output_dir, stage_checkpoints_dir_name(block_size))
            last = last_complete_checkpoint(checkpoints)
            if last is not None:
                return stage, last, None
            if stage == 0:
                # nothing complete yet: a run killed inside its first checkpoint save, or not started, which a
                # requeued job resumes with the same command; the half-written folder is replaced when its step is
                # saved again (`_save_checkpoint`)
                logger.warning(
                    "`resume_from_checkpoint=True` but output_dir=%r holds no complete checkpoint (neither %s/ nor "
                    "%s/checkpoint-* with %s): training starts from the beginning (step 0).",
                    output_dir, stage_dir_name(block_size), stage_checkpoints_dir_name(block_size), STAGE_STATE_NAME,
                )
                return 0, None, None
            return stage, None, os.path.join(output_dir, stage_dir_name(sizes[stage - 1]))
        return len(sizes), None, None
    path = str(resume_from_checkpoint)
    state_file = os.path.join(path, STAGE_STATE_NAME)
    if not os.path.isfile(state_file):
        raise ValueError(
            f"`resume_from_checkpoint`={path!r} has no {STAGE_STATE_NAME}: it is not a BARD trainer checkpoint, or "
            "its save was interrupted (the trainer writes that file last). Pass a complete "
            "`checkpoints-b{B}/checkpoint-{step}` or `stage-b{B}` folder, or True (the last complete one)."
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


__all__ = [
    "STAGE_STATE_NAME",
    "last_complete_checkpoint",
    "merged_lora_state_dict",
    "publish_stage",
    "resume_point",
    "stage_checkpoints_dir_name",
    "stage_dir_name",
    "stage_state",
    "write_stage_state",
]
