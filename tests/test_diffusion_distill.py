"""DiffusionDistillTrainer: stage-wise intra-dVLM distillation (DESIGN 3.6) on the tiny BARD-VL models.

Student: the tiny BARD-VL model at B_s = 8 (`tiny_bard_vl_b8_dir`); teacher: a perturbed copy at B_t = 4
(`tiny_bard_vl_teacher_dir`), or the stock tiny Qwen3-VL for the autoregressive-teacher ablation.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainerCallback
from trl import ModelConfig, ScriptArguments, TrlParser

from conftest import tiny_chat_rows
from transformers_bard import BardVLConfig, BardVLForConditionalGeneration
from transformers_bard.models.bard_vl.masking_bard_vl import NOISY
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.trainer.collator import SAMPLE_INDEX_COLUMN
from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig
from transformers_bard.trainer.diffusion_distill_trainer import (
    DiffusionDistillTrainer,
    distillation_positions,
    packed_lengths,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LM_PARAM = "model.language_model.layers.0.self_attn.q_proj.weight"
VISION_PARAM = "model.visual.blocks.0.attn.qkv.weight"
MODEL_KEYS = ("input_ids", "segment_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def make_args(output_dir, **overrides):
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="no",
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        vision_learning_rate=1e-4,
        max_warmup_steps=0,
        max_length=512,
        gradient_checkpointing=False,
        max_steps=2,
        seed=0,
    )
    return DiffusionDistillConfig(**{**defaults, **overrides})


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def indexed_rows(num_rows):
    return [{**row, SAMPLE_INDEX_COLUMN: index} for index, row in enumerate(tiny_chat_rows(num_rows))]


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.done = []

    def on_step_end(self, args, state, control, **kwargs):
        self.done.append(state.global_step)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and two threads on two shared cores slow them down a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(tiny_chat_rows(6))


# ---------------------------------------------------------------------- config
def test_config_defaults_follow_the_reference_and_bad_values_are_named(tmp_path):
    args = DiffusionDistillConfig(str(tmp_path), use_cpu=True, bf16=False)
    assert (args.learning_rate, args.vision_learning_rate, args.num_train_epochs) == (6e-6, 6e-6, 3)
    assert args.warmup_steps_of_stage(5000) == 100 and args.warmup_steps_of_stage(40) == 40
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs["min_lr_rate"] == 0.5
    assert (args.noise_prior, args.noise_min_rate, args.noise_max_rate) == ("mask", 0.1, 0.5)
    assert (args.teacher_type, args.teacher_block_size, args.teacher_topk, args.temperature) == ("diffusion", 4, 16, 1)
    assert (args.ce_weight, args.kd_weight, args.reverse_kd) == (1.0, 0.5, False)
    assert (args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.95, 0.0, 1.0)
    assert args.gradient_checkpointing and args.block_sizes is None
    assert DiffusionDistillConfig(str(tmp_path), use_cpu=True, block_sizes=[8]).block_sizes == [8]
    parsed = DiffusionDistillConfig(str(tmp_path), use_cpu=True, teacher_model_init_kwargs='{"dtype": "bfloat16"}')
    assert parsed.teacher_model_init_kwargs == {"dtype": "bfloat16"}  # JSON from the command line

    for overrides, message in [
        (dict(teacher_type="ar"), "`teacher_type` must be one of ('diffusion', 'autoregressive'), got 'ar'"),
        (dict(teacher_topk=0), "`teacher_topk` must be an integer >= 1, got 0"),
        (dict(temperature=0.0), "`temperature` must be a number > 0, got 0.0"),
        (dict(kd_weight=-1.0), "`kd_weight` must be a number >= 0, got -1.0"),
        (dict(ce_weight=0.0, kd_weight=0.0), "are both 0"),
        (dict(teacher_block_size=0), "`teacher_block_size` must be an integer >= 1, got 0"),
        (dict(block_sizes=[8, 16]), "`block_sizes` must be unset or one block size [B_s]"),
        (dict(block_sizes=[6]), "`teacher_block_size`=4 does not divide the student's block size 6"),
        (dict(ce_chunk_size=64), "`ce_chunk_size`=64 is not supported by DiffusionDistillTrainer"),
        (dict(loss_min_rate=0.1), "`loss_min_rate`=0.1 does not apply"),
        (dict(noise_min_rate=0.6), "Invalid noise settings"),
        (dict(teacher_model_init_kwargs=[1]), "`teacher_model_init_kwargs` must be a dict"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            DiffusionDistillConfig(str(tmp_path), use_cpu=True, **overrides)


# ---------------------------------------------------------------------- the loss
def test_loss_equals_separate_teacher_and_student_forwards(
    tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, dataset, tmp_path
):
    """DESIGN 3.6 by loops over two full forwards of the same packed row: the student at B_s = 8, the teacher with its
    own B_t = 4 mask; positions = the masked xt tokens only (the `mix` prior also substitutes tokens, excluded)."""
    args = make_args(tmp_path, noise_prior="mix", teacher_topk=5)
    trainer = DiffusionDistillTrainer(
        str(tiny_bard_vl_b8_dir), str(tiny_bard_vl_teacher_dir), args=args, train_dataset=dataset
    )
    assert trainer.data_collator.block_size == 8  # noise drawn per student block
    batch = trainer.data_collator(indexed_rows(3))
    mask_id = trainer.model.config.mask_token_id
    masked = (batch["segment_ids"] == NOISY) & (batch["input_ids"] == mask_id)  # [b, L]
    substituted = batch["logits_mask"] & ~masked
    assert masked.any() and substituted.any()
    assert torch.equal(distillation_positions(batch["logits_mask"], batch["input_ids"], mask_id), masked)

    student = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_b8_dir)
    teacher = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_teacher_dir)
    inputs = {key: batch[key] for key in MODEL_KEYS}
    with torch.no_grad():
        student_logits = student(**inputs).logits  # [b, L, V], mask at the config's B = 8
        teacher_logits = {size: teacher(**inputs, block_size=size).logits for size in (4, 8)}

    def reference(teacher_logits, positions):
        ce, kd = [], []
        for s, i in positions.nonzero().tolist():
            log_p = student_logits[s, i].log_softmax(-1)  # [V]
            ce.append(-log_p[batch["labels"][s, i]])
            values, ids = teacher_logits[s, i].topk(5)
            kd.append(-(values.softmax(-1) * log_p[ids]).sum())
        ce, kd = torch.stack(ce).mean(), torch.stack(kd).mean()
        return ce + 0.5 * kd, ce, kd

    expected, expected_ce, expected_kd = reference(teacher_logits[4], masked)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    mode = "train" if trainer.model.training else "eval"
    metrics = trainer._metrics[mode]
    assert metrics["ce"][-1] == pytest.approx(expected_ce.item(), rel=1e-5)
    assert metrics["kd"][-1] == pytest.approx(expected_kd.item(), rel=1e-5)
    # substituted tokens are corrupted but not supervised: fewer positions than the collator's logits_mask
    assert metrics["num_masked_tokens"][-1] == masked.sum().item() < batch["logits_mask"].sum().item()
    # the teacher's targets come from its own B_t = 4 mask, not the student's B_s = 8
    inputs["position_ids"] = trainer.model.get_packed_position_ids(
        batch["input_ids"], batch["segment_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"]
    )
    values, ids = trainer.teacher_targets(inputs, masked)  # [N, 5]
    own = teacher_logits[4][masked].topk(5)
    torch.testing.assert_close(values, own.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, own.indices)
    assert not torch.allclose(values, teacher_logits[8][masked].topk(5).values, atol=1e-3)

    # normalised by the masked tokens of the whole optimizer step: a step with twice the tokens halves the loss
    step_tokens = torch.tensor(2 * masked.sum().item())
    half = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=step_tokens)
    torch.testing.assert_close(half, expected / 2, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- training
def test_distillation_trains_the_student_only_and_saves_a_loadable_checkpoint(
    tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, dataset, tmp_path
):
    initial = weights(BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_b8_dir))
    args = make_args(tmp_path, gradient_accumulation_steps=2)
    trainer = DiffusionDistillTrainer(
        str(tiny_bard_vl_b8_dir), str(tiny_bard_vl_teacher_dir), args=args, train_dataset=dataset, eval_dataset=dataset
    )
    teacher_before = weights(trainer.teacher_model)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        # per-step metrics with the loss's normalisation, across the step's 2 micro-batches
        assert entry["loss"] == pytest.approx(entry["ce"] + 0.5 * entry["kd"], rel=1e-5)
        assert entry["ce"] > 0 and entry["kd"] > 0 and entry["num_masked_tokens"] > 0
        assert 0 <= entry["mean_token_accuracy"] <= 1 and 0 <= entry["teacher_agreement"] <= 1

    trained = weights(trainer.model)
    for name in (LM_PARAM, VISION_PARAM, "lm_head.weight"):
        assert not torch.equal(initial[name], trained[name]), name
    teacher = trainer.teacher_model
    assert not teacher.training and not any(param.requires_grad for param in teacher.parameters())
    optimized = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    assert optimized and not any(id(param) in optimized for param in teacher.parameters())
    for name, tensor in weights(teacher).items():
        assert torch.equal(tensor, teacher_before[name]), name

    folder = tmp_path / "stage-b8"
    loaded = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(loaded).__name__ == "BardVLForConditionalGeneration"
    assert loaded.config.block_size == 8 and loaded.config.mask_token_id == 474
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])

    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce"] + 0.5 * metrics["eval_kd"], rel=1e-5)


def test_gradient_accumulation_equals_one_large_batch(tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, tmp_path):
    """Batch 4 vs 2 micro-batches of 2 with different masked-token counts (SGD, no clipping): same loss, same update."""
    data = Dataset.from_list(tiny_chat_rows(4))
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = make_args(
            tmp_path / f"b{batch_size}",
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            vision_learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
        )
        trainer = DiffusionDistillTrainer(
            str(tiny_bard_vl_b8_dir), str(tiny_bard_vl_teacher_dir), args=args, train_dataset=data
        )
        trainer.train()
        results.append((trainer.state.log_history[0], weights(trainer.model)))
    (big, big_weights), (accumulated, accumulated_weights) = results
    for key in ("loss", "ce", "kd", "num_masked_tokens"):
        assert accumulated[key] == pytest.approx(big[key], rel=1e-5), key
    for name, tensor in big_weights.items():
        torch.testing.assert_close(accumulated_weights[name], tensor, rtol=1e-4, atol=1e-6)


def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(
    tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, dataset, tmp_path
):
    common = dict(save_strategy="steps", save_steps=1)
    full = tmp_path / "full"
    DiffusionDistillTrainer(
        str(tiny_bard_vl_b8_dir), str(tiny_bard_vl_teacher_dir), args=make_args(full, **common), train_dataset=dataset
    ).train()
    expected = load_file(str(full / "stage-b8" / "model.safetensors"))

    interrupted = tmp_path / "interrupted"  # stopped after step 1
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "stage-b8")
    shutil.rmtree(interrupted / "checkpoints-b8" / "checkpoint-2")
    steps = StepRecorder()
    trainer = DiffusionDistillTrainer(
        str(tiny_bard_vl_b8_dir),
        str(tiny_bard_vl_teacher_dir),
        args=make_args(interrupted, **common),
        train_dataset=dataset,
        callbacks=[steps],
    )
    trainer.train(resume_from_checkpoint=True)
    assert steps.done == [2]
    resumed = load_file(str(interrupted / "stage-b8" / "model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def test_lora_student_merges_and_loads(tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, dataset, tmp_path):
    from peft import LoraConfig

    initial = weights(BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_b8_dir))
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = DiffusionDistillTrainer(
        str(tiny_bard_vl_b8_dir),
        str(tiny_bard_vl_teacher_dir),
        args=make_args(tmp_path, learning_rate=5e-2),
        train_dataset=dataset,
        peft_config=peft_config,
    )
    trainer.train()
    assert not any("lora" in name for name, _ in trainer.teacher_model.named_parameters())
    stage = tmp_path / "stage-b8"
    merged = trainer.model.merge_and_unload().state_dict()
    from_stage = AutoModelForImageTextToText.from_pretrained(stage)
    assert from_stage.config.block_size == 8
    assert not torch.equal(from_stage.state_dict()[LM_PARAM], initial[LM_PARAM])
    for name, tensor in merged.items():
        torch.testing.assert_close(from_stage.state_dict()[name], tensor)


# ---------------------------------------------------------------------- the autoregressive teacher
@pytest.mark.parametrize("teacher_kind", ["stock_qwen3_vl", "bard_vl_used_causally"])
def test_autoregressive_teacher_targets_are_the_shifted_logits(
    teacher_kind, tiny_qwen3_vl_dir, tiny_bard_vl_teacher_dir, tiny_bard_vl_b8_dir, dataset, tmp_path
):
    """The target of xt token j is the logit the AR model gives at the token before x0 token j: checked against each
    row alone, unpadded, through the model's ordinary causal forward with its own default positions. The stock
    teacher runs with eager attention (an additive mask), the BARD one with SDPA (a boolean mask)."""
    stock = teacher_kind == "stock_qwen3_vl"
    teacher_dir = tiny_qwen3_vl_dir if stock else tiny_bard_vl_teacher_dir
    args = make_args(
        tmp_path,
        teacher_type="autoregressive",
        teacher_topk=4,
        max_steps=1,
        teacher_model_init_kwargs={"attn_implementation": "eager" if stock else "sdpa"},
    )
    trainer = DiffusionDistillTrainer(str(tiny_bard_vl_b8_dir), str(teacher_dir), args=args, train_dataset=dataset)
    collator = trainer.data_collator
    rows = indexed_rows(3)
    batch = collator(rows)
    positions = distillation_positions(batch["logits_mask"], batch["input_ids"], trainer.model.config.mask_token_id)
    inputs = {key: batch[key] for key in MODEL_KEYS}
    inputs["position_ids"] = trainer.model.get_packed_position_ids(
        batch["input_ids"], batch["segment_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"]
    )
    values, ids = trainer.teacher_targets(inputs, positions)  # [N, 4]

    reference = AutoModelForImageTextToText.from_pretrained(teacher_dir)
    P, R = packed_lengths(batch["segment_ids"])
    shifted, unshifted = [], []
    for s, row in enumerate(rows):
        example = collator.tokenize(row, 8)
        length = batch["response_lengths"][s].item()
        x0 = example.response_ids + [collator.end_id] * (length - len(example.response_ids))
        kwargs = {
            "input_ids": torch.tensor([example.prefix_ids + x0]),
            "mm_token_type_ids": torch.tensor([example.prefix_mm_token_type_ids + [0] * len(x0)]),
        }
        if example.pixel_values is not None:
            kwargs.update(pixel_values=example.pixel_values, image_grid_thw=example.image_grid_thw)
        with torch.no_grad():
            logits = reference(**kwargs).logits[0]  # [P_s + R_s, V]
        start = len(example.prefix_ids)
        for j in positions[s, P + R :].nonzero().flatten().tolist():
            shifted.append(logits[start + j - 1])
            unshifted.append(logits[start + j])
    expected = torch.stack(shifted).topk(4)
    torch.testing.assert_close(values, expected.values, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids, expected.indices)
    assert not torch.allclose(values, torch.stack(unshifted).topk(4).values, atol=1e-3)

    if stock:
        assert trainer.teacher_model.config._attn_implementation == "eager"
        trainer.train()  # one step end to end
        assert trainer.state.log_history[0]["kd"] > 0


# ---------------------------------------------------------------------- bad inputs
def test_bad_teachers_and_students_are_refused(
    tiny_qwen3_vl_dir, tiny_bard_vl_dir, tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, dataset, tmp_path
):
    student, teacher = str(tiny_bard_vl_b8_dir), str(tiny_bard_vl_teacher_dir)
    args = make_args(tmp_path)

    def refused(message, student=student, teacher=teacher, args=args, error=ValueError, **kwargs):
        with pytest.raises(error, match=re.escape(message)):
            DiffusionDistillTrainer(student, teacher, args=args, train_dataset=dataset, **kwargs)

    refused("No teacher: pass `teacher_model`", teacher=None)
    refused(
        "has no mask token (`config.mask_token_id`): teacher_type='diffusion' needs", teacher=str(tiny_qwen3_vl_dir)
    )
    refused(
        "`teacher_block_size`=3 does not divide the student's block size 8",
        args=make_args(tmp_path, teacher_block_size=3),
    )
    refused("does not match the student's `config.block_size`=8", args=make_args(tmp_path, block_sizes=[4]))
    refused("The student (qwen3_vl) has no `config.block_size`", student=str(tiny_qwen3_vl_dir))
    refused("`args` must be a DiffusionDistillConfig", args=make_args(tmp_path).to_dict(), error=TypeError)

    config = BardVLConfig.from_pretrained(teacher)
    config.text_config.vocab_size += 8
    refused("has vocab_size 520 but the student has 512", teacher=BardVLForConditionalGeneration(config))
    other_mask = BardVLForConditionalGeneration.from_pretrained(teacher, mask_token_id=475)
    refused("has mask_token_id 475 but the student has 474", teacher=other_mask)
    refused(
        "`teacher_model_init_kwargs`={'dtype': 'float32'} was set but the teacher is already instantiated",
        teacher=other_mask,
        args=make_args(tmp_path, teacher_model_init_kwargs={"dtype": "float32"}),
    )
    same = BardVLForConditionalGeneration.from_pretrained(student)
    refused("The teacher shares parameters with the student", student=same, teacher=same)

    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(teacher, other_tokenizer)
    processor = BardVLProcessor.from_pretrained(other_tokenizer)
    processor.tokenizer.add_tokens(["<|extra|>"])
    processor.save_pretrained(other_tokenizer)
    refused("The teacher's tokenizer", teacher=str(other_tokenizer))
    # a config reused for another student takes that student's block size (only a user's value is checked)
    reused = make_args(tmp_path)
    DiffusionDistillTrainer(student, teacher, args=reused, train_dataset=dataset)
    DiffusionDistillTrainer(str(tiny_bard_vl_dir), teacher, args=reused, train_dataset=dataset)
    assert reused.block_sizes == [4]
    # the autoregressive source has no <|mask|> in its tokenizer: that difference alone is accepted
    DiffusionDistillTrainer(
        student, str(tiny_qwen3_vl_dir), args=make_args(tmp_path, teacher_type="autoregressive"), train_dataset=dataset
    )


# ---------------------------------------------------------------------- the example script and recipes
def load_script(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(arguments):
    return TrlParser((ScriptArguments, DiffusionDistillConfig, ModelConfig)).parse_args_and_config(arguments)


def test_tiny_distillation_recipe_runs(tmp_path):
    """make_tiny_assets.py gives the B=4 anchor; a copy at B=8 stands in for the PBM stage-b8 student."""
    model_dir, data_dir = load_script("make_tiny_assets").main(str(tmp_path / "assets"), num_rows=8)
    student_dir = tmp_path / "student-b8"
    shutil.copytree(model_dir, student_dir)
    config = json.loads((student_dir / "config.json").read_text())
    (student_dir / "config.json").write_text(json.dumps({**config, "block_size": 8}))
    output = tmp_path / "run"
    arguments = [
        "--config",
        str(EXAMPLES / "configs" / "distill_tiny.yaml"),
        "--model_name_or_path",
        str(student_dir),
        "--teacher_model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data_dir),
        "--output_dir",
        str(output),
        "--max_steps",
        "2",
        "--disable_tqdm",
        "true",
    ]
    trainer = load_script("diffusion_distill").main(*parse(arguments))
    assert trainer.args.block_sizes == [8] and trainer.args.teacher_block_size == 4
    assert AutoModelForImageTextToText.from_pretrained(output / "stage-b8").config.block_size == 8
    assert sum("kd" in entry for entry in trainer.state.log_history) == 2


@pytest.mark.parametrize("size", ["2b", "4b", "8b"])
def test_paper_recipes_parse_with_the_reference_hyperparameters(size):
    path = EXAMPLES / "configs" / f"distill_qwen3_vl_{size}.yaml"
    script_args, args, model_args = parse(["--config", str(path), "--use_cpu", "true", "--bf16", "false"])
    assert script_args.dataset_name
    assert re.search(rf"bard-vl-{size}-pbm/stage-b(8|16|32)$", model_args.model_name_or_path)
    assert args.teacher_model_name_or_path.endswith("bard-vl-8b-pbm/stage-b4")  # the 8B B=4 anchor teaches all
    assert args.teacher_model_init_kwargs["dtype"] == "bfloat16"
    assert (args.teacher_type, args.teacher_block_size, args.teacher_topk, args.temperature) == ("diffusion", 4, 16, 1)
    assert (args.ce_weight, args.kd_weight, args.reverse_kd) == (1.0, 0.5, False)
    assert (args.learning_rate, args.vision_learning_rate, args.num_train_epochs) == (6e-6, 6e-6, 3)
    assert args.warmup_steps_of_stage(10_000) == 100 and args.lr_scheduler_kwargs["min_lr_rate"] == 0.5
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.9, 0.95, 0.0, 1.0)
    assert (args.noise_prior, args.noise_min_rate, args.noise_max_rate) == ("mask", 0.1, 0.5)
    assert args.gradient_checkpointing and args.max_length == 8192
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 64  # 8 GPUs, as the reference
    assert yaml.safe_load(path.read_text())["bf16"] is True


# ---------------------------------------------------------------------- data parallel
@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None, reason="no accelerate")
def test_two_processes_equal_one_process(tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, tmp_path):
    """DDP over 2 CPU processes (gloo), the teacher placed by accelerate on each: 2 x batch 2 gives the logged loss and
    the update of 1 x batch 4 (the masked tokens of the step are counted over both ranks)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    Dataset.from_list(tiny_chat_rows(8)).to_parquet(str(data_dir / "train.parquet"))
    common = [
        "--config",
        str(EXAMPLES / "configs" / "distill_tiny.yaml"),
        "--model_name_or_path",
        str(tiny_bard_vl_b8_dir),
        "--teacher_model_name_or_path",
        str(tiny_bard_vl_teacher_dir),
        "--dataset_name",
        str(data_dir),
        "--max_steps",
        "2",
        "--optim",
        "sgd",
        "--learning_rate",
        "0.5",
        "--vision_learning_rate",
        "0.5",
        "--lr_scheduler_type",
        "constant",
        "--max_grad_norm",
        "0",
        "--max_warmup_steps",
        "0",
        "--disable_tqdm",
        "true",
    ]
    one = tmp_path / "one"
    load_script("diffusion_distill").main(
        *parse(common + ["--output_dir", str(one), "--per_device_train_batch_size", "4"])
    )
    two = tmp_path / "two"
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        accelerate,
        "launch",
        "--config_file",
        str(EXAMPLES / "accelerate_configs" / "multi_cpu.yaml"),
        "--main_process_port",
        str(port),
        str(EXAMPLES / "scripts" / "diffusion_distill.py"),
        *common,
        "--output_dir",
        str(two),
        "--per_device_train_batch_size",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=EXAMPLES.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    def logged(folder):
        history = json.loads((folder / "stage-b8" / "trainer_state.json").read_text())["log_history"]
        return [(entry["loss"], entry["ce"], entry["kd"]) for entry in history if "loss" in entry]

    assert len(logged(one)) == 2
    for got, expected in zip(logged(two), logged(one), strict=True):
        assert got == pytest.approx(expected, rel=1e-5)
    expected = load_file(str(one / "stage-b8" / "model.safetensors"))
    got = load_file(str(two / "stage-b8" / "model.safetensors"))
    initial = load_file(str(tiny_bard_vl_b8_dir / "model.safetensors"))
    assert not torch.allclose(expected[LM_PARAM], initial[LM_PARAM])
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
