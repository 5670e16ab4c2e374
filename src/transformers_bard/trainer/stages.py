"""Stage layout on disk and stage checkpoints of the BARD trainers (DESIGN 3.5).

A run over `block_sizes` writes, under `output_dir`:

- ``checkpoints-b{B}/checkpoint-{step}``: the Trainer's mid-stage checkpoints of the stage at block size B (steps
  count within the stage), each with a ``bard_stage.json`` naming the stage (`StageStateCallback`);
- ``stage-b{B}``: the finished stage, a complete `save_pretrained` folder (model, processor, noise scheduler,
  ``trainer_state.json``, ``bard_stage.json`` marked complete), written to a temporary folder and renamed, so it
  exists only when complete (`publish_stage`).

`resume_point` reads this layout back for `resume_from_checkpoint`. A LoRA run's stage folder holds the merged model
(`merged_lora_state_dict`) and the adapter under ``adapter/``.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

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
    with open(os.path.join(folder, STAGE_STATE_NAME), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)
        handle.write("\n")


class StageStateCallback(TrainerCallback):
    """Marks every mid-stage checkpoint with the stage it belongs to (``bard_stage.json``), on the saving process.

    `on_save` runs right after the Trainer wrote ``{output_dir}/checkpoint-{global_step}``; the trainer points
    `output_dir` at the stage's ``checkpoints-b{B}`` folder while the stage trains and sets `stage` here.
    """

    def __init__(self, block_sizes: list[int]):
        self.block_sizes = list(block_sizes)
        self.stage = 0

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            write_stage_state(folder, stage_state(self.block_sizes, self.stage, state.global_step, complete=False))


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
    mid-stage checkpoint or, without one, from the previous stage's weights. A path names a ``checkpoint-*`` or
    ``stage-b*`` folder of this layout.
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
            last = get_last_checkpoint(checkpoints) if os.path.isdir(checkpoints) else None
            if last is not None:
                return stage, last, None
            if stage == 0:
                raise ValueError(
                    f"`resume_from_checkpoint=True` but no checkpoint was found in output_dir={output_dir!r} "
                    f"(neither {stage_dir_name(block_size)}/ nor {stage_checkpoints_dir_name(block_size)}/"
                    "checkpoint-*). Start without `resume_from_checkpoint`."
                )
            return stage, None, os.path.join(output_dir, stage_dir_name(sizes[stage - 1]))
        return len(sizes), None, None
    path = str(resume_from_checkpoint)
    state_file = os.path.join(path, STAGE_STATE_NAME)
    if not os.path.isfile(state_file):
        raise ValueError(
            f"`resume_from_checkpoint`={path!r} has no {STAGE_STATE_NAME}: it is not a BARD trainer checkpoint. "
            "Pass a `checkpoints-b{B}/checkpoint-{step}` or `stage-b{B}` folder, or True."
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
    "StageStateCallback",
    "merged_lora_state_dict",
    "publish_stage",
    "resume_point",
    "stage_checkpoints_dir_name",
    "stage_dir_name",
    "stage_state",
    "write_stage_state",
]
