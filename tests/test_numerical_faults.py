"""Numerical faults, injected on purpose (issue 23): a NaN loss or gradient at step 3 of a tiny run stops it with a
message naming the step, the stage and the last good checkpoint (`on_nonfinite="stop"`), or is skipped without
touching the weights (`"skip"`); a checkpoint with non-finite weights is never written. Both trainers share this code
(`BlockDiffusionTrainer`); each is run once."""

import math

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import tiny_chat_rows, tiny_trainer_kwargs
from transformers_bard import BardVLForConditionalGeneration
from transformers_bard.trainer.block_diffusion_trainer import NonFiniteTrainingError
from transformers_bard.trainer.block_merge_config import BlockMergeConfig
from transformers_bard.trainer.block_merge_trainer import BlockMergeTrainer
from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig
from transformers_bard.trainer.diffusion_distill_trainer import DiffusionDistillTrainer
from transformers_bard.trainer.stages import STAGE_STATE_NAME, resume_point

LM_PARAM = "model.language_model.layers.0.self_attn.q_proj.weight"
BAD_STEP = 3  # the optimizer step whose loss or gradient is made NaN


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(tiny_chat_rows(6))


class WeightRecorder(TrainerCallback):
    """A copy of one weight after every optimizer step: {global step: tensor}."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = model.get_parameter(LM_PARAM).detach().clone()


def make_trainer(kind, folder, dirs, dataset, callbacks=(), **overrides):
    """A tiny BlockMergeTrainer (block size 4) or DiffusionDistillTrainer (student B=8, teacher B=4), 4 steps, a
    checkpoint every step."""
    overrides = {"save_strategy": "steps", "save_steps": 1, "max_warmup_steps": 0, **overrides}
    kwargs = tiny_trainer_kwargs(folder, **overrides)
    if kind == "merge":
        args = BlockMergeConfig(**kwargs, block_sizes=[4], stage_steps=[4])
        return BlockMergeTrainer(str(dirs["merge"]), args=args, train_dataset=dataset, callbacks=list(callbacks))
    args = DiffusionDistillConfig(**kwargs, max_steps=4)
    return DiffusionDistillTrainer(
        str(dirs["student"]), str(dirs["teacher"]), args=args, train_dataset=dataset, callbacks=list(callbacks)
    )


def inject(trainer, fault):
    """Make step `BAD_STEP`'s loss ("loss") or one weight's gradient only ("grad": the loss stays finite) NaN."""
    def bad_step():
        return trainer.state.global_step == BAD_STEP - 1  # global_step counts the steps already applied

    if fault == "loss":
        compute_loss = trainer.compute_loss

        def nan_loss(*args, **kwargs):
            loss = compute_loss(*args, **kwargs)
            return loss * float("nan") if bad_step() else loss

        trainer.compute_loss = nan_loss
    else:
        param = trainer.model.get_parameter(LM_PARAM)
        param.register_hook(lambda grad: grad * float("nan") if bad_step() else grad)


@pytest.fixture(scope="module")
def dirs(tiny_bard_vl_dir, tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir):
    return {"merge": tiny_bard_vl_dir, "student": tiny_bard_vl_b8_dir, "teacher": tiny_bard_vl_teacher_dir}


def test_on_nonfinite_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"`on_nonfinite` must be 'stop' or 'skip', got 'ignore'"):
        BlockMergeConfig(**tiny_trainer_kwargs(tmp_path, on_nonfinite="ignore"))
    assert BlockMergeConfig(**tiny_trainer_kwargs(tmp_path)).on_nonfinite == "stop"


@pytest.mark.parametrize(("kind", "fault"), [("merge", "loss"), ("merge", "grad"), ("distill", "loss")])
def test_stop_names_step_stage_and_last_checkpoint(kind, fault, dirs, dataset, tmp_path):
    recorder = WeightRecorder()
    trainer = make_trainer(kind, tmp_path, dirs, dataset, callbacks=[recorder])
    inject(trainer, fault)
    block_size = 4 if kind == "merge" else 8
    checkpoints = tmp_path / f"checkpoints-b{block_size}"
    last_good = checkpoints / f"checkpoint-{BAD_STEP - 1}"
    what = "loss" if fault == "loss" else "gradient norm (nan, with a finite loss)"
    with pytest.raises(NonFiniteTrainingError) as error:
        trainer.train()
    message = str(error.value)
    assert f"Non-finite {what} at global step {BAD_STEP} of stage 0 (block size {block_size})" in message
    assert f"Last good checkpoint: '{last_good}'" in message and "on_nonfinite='skip'" in message

    # nothing was written after the fault; the last checkpoint is complete, finite, loadable and resumable
    assert sorted(path.name for path in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / f"stage-b{block_size}").exists()
    assert (last_good / STAGE_STATE_NAME).is_file()
    saved = load_file(str(last_good / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())
    torch.testing.assert_close(saved[LM_PARAM], recorder.after[BAD_STEP - 1], rtol=0, atol=0)
    BardVLForConditionalGeneration.from_pretrained(last_good)
    assert resume_point(str(tmp_path), [block_size], True) == (0, str(last_good), None)


def test_stop_without_a_checkpoint_says_so(dirs, dataset, tmp_path):
    trainer = make_trainer("merge", tmp_path, dirs, dataset, save_strategy="no")
    inject(trainer, "loss")
    with pytest.raises(NonFiniteTrainingError, match="No checkpoint of this run was written before it"):
        trainer.train()


@pytest.mark.parametrize(("kind", "fault"), [("merge", "loss"), ("merge", "grad"), ("distill", "grad")])
def test_skip_leaves_the_weights_unchanged_and_trains_on(kind, fault, dirs, dataset, tmp_path):
    recorder = WeightRecorder()
    trainer = make_trainer(kind, tmp_path, dirs, dataset, callbacks=[recorder], on_nonfinite="skip")
    inject(trainer, fault)
    trainer.train()
    block_size = 4 if kind == "merge" else 8
    assert trainer.nonfinite_steps_skipped == [(block_size, BAD_STEP)]
    assert sorted(recorder.after) == [1, 2, 3, 4]
    torch.testing.assert_close(recorder.after[BAD_STEP], recorder.after[BAD_STEP - 1], rtol=0, atol=0)
    assert not torch.equal(recorder.after[BAD_STEP + 1], recorder.after[BAD_STEP])  # trained on
    final = load_file(str(tmp_path / f"stage-b{block_size}" / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in final.values())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


class PoisonWeights(TrainerCallback):
    """Make a weight NaN right after step `at` (as an overflowing update would), before that step's checkpoint."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                model.get_parameter(LM_PARAM)[0, 0] = float("inf")


def test_checkpoint_with_nonfinite_weights_is_never_written(dirs, dataset, tmp_path):
    trainer = make_trainer("merge", tmp_path, dirs, dataset, callbacks=[PoisonWeights(at=2)])
    checkpoints = tmp_path / "checkpoints-b4"
    with pytest.raises(NonFiniteTrainingError) as error:
        trainer.train()
    message = str(error.value)
    assert f"Refusing to write '{checkpoints / 'checkpoint-2'}'" in message and f"(first: {LM_PARAM})" in message
    assert f"Last good checkpoint: '{checkpoints / 'checkpoint-1'}'" in message
    assert sorted(path.name for path in checkpoints.glob("checkpoint-*")) == ["checkpoint-1"]

    # an explicit save_model is refused too, before the folder is created
    with pytest.raises(NonFiniteTrainingError, match="Refusing to write"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
