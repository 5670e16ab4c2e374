"""DiffusionDistillTrainer: stage-wise intra-dVLM distillation (DESIGN 3.6) on the tiny BARD-VL models.

Student: the tiny BARD-VL model at B_s = 8 (`tiny_bard_vl_b8_dir`); teacher: a perturbed copy at B_t = 4
(`tiny_bard_vl_teacher_dir`), or the stock tiny Qwen3-VL for the autoregressive-teacher ablation. The config is tested
in test_diffusion_distill_config.py, the losses in test_losses.py, 2 processes in test_multiprocess.py.
"""

import json
import math
import re
import shutil

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainerCallback
from trl import ModelConfig, ScriptArguments, TrlParser

from conftest import EXAMPLES, load_example_script, tiny_chat_rows, tiny_trainer_kwargs
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

LM_PARAM = "model.language_model.layers.0.self_attn.q_proj.weight"
VISION_PARAM = "model.visual.blocks.0.attn.qkv.weight"
MODEL_KEYS = ("input_ids", "segment_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def make_args(output_dir, **overrides):
    overrides = {"max_warmup_steps": 0, "max_steps": 2, **overrides}
    return DiffusionDistillConfig(**tiny_trainer_kwargs(output_dir, **overrides))


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def indexed_rows(num_rows):
    return [{**row, SAMPLE_INDEX_COLUMN: index} for index, row in enumerate(tiny_chat_rows(num_rows))]


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.done = []

    def on_step_end(self, args, state, control, **kwargs):
        self.done.append(state.global_step)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(tiny_chat_rows(6))


# ---------------------------------------------------------------------- the loss
def test_loss_equals_separate_teacher_and_student_forwards(
    tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, dataset, tmp_path
):
    """DESIGN 3.6 by loops over two full forwards of the same packed row: the student at B_s = 8, the teacher with its
    own B_t = 4 mask; positions = the masked xt tokens only (the `mix` prior also substitutes tokens, excluded)."""
    args = make_args(tmp_path, noise_prior="mix", teacher_topk=5, kd_on_eos_padding=True)  # KD everywhere first
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

    # KD off at the EOS padding past the real end: CE everywhere, KD only before the padding, same denominator
    padding = batch["is_eos_padding"].bool()
    assert (masked & padding).any() and (masked & ~padding).any()
    trainer.args.kd_on_eos_padding = False
    ce_all = reference(teacher_logits[4], masked)[1]
    kd_kept = reference(teacher_logits[4], masked & ~padding)[2] * (masked & ~padding).sum() / masked.sum()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss, ce_all + 0.5 * kd_kept, rtol=1e-5, atol=1e-5)
    trainer.args.kd_on_eos_padding = True

    # per-sample normalisation: each row's terms are averaged over its own masked positions, then over the rows
    trainer.args.loss_normalization = "sample"
    assert trainer.num_loss_items(batch) == masked.any(-1).sum().item() == 3
    per_row = [reference(teacher_logits[4], masked & (torch.arange(3) == s)[:, None])[0] for s in range(3)]
    expected_sample = torch.stack(per_row).mean()
    assert not torch.allclose(expected_sample, expected, atol=1e-4)  # the rows have different masked counts
    loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss, expected_sample, rtol=1e-5, atol=1e-5)
    step_samples = torch.tensor(6)
    half = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=step_samples)
    torch.testing.assert_close(half, expected_sample / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # FlexAttention compiles its kernel on first use
def test_flex_attention_teacher_and_student_give_the_sdpa_loss(
    tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, dataset, tmp_path, fresh_compile
):
    """SWD with the B = 4 teacher on FlexAttention (its BlockMask at its own block size) and then the B = 8 student
    on it too: the same loss as with sdpa on the same batch."""
    sdpa_trainer = DiffusionDistillTrainer(
        str(tiny_bard_vl_b8_dir), str(tiny_bard_vl_teacher_dir), args=make_args(tmp_path), train_dataset=dataset
    )
    flex_args = make_args(tmp_path, teacher_model_init_kwargs={"attn_implementation": "flex_attention"})
    flex_trainer = DiffusionDistillTrainer(
        str(tiny_bard_vl_b8_dir), str(tiny_bard_vl_teacher_dir), args=flex_args, train_dataset=dataset
    )
    assert flex_trainer.teacher_model.config.get_text_config()._attn_implementation == "flex_attention"
    batch = sdpa_trainer.data_collator(indexed_rows(3))
    with torch.no_grad():
        want = sdpa_trainer.compute_loss(sdpa_trainer.model, dict(batch))
        torch.testing.assert_close(flex_trainer.compute_loss(flex_trainer.model, dict(batch)), want, rtol=1e-5,
                                   atol=1e-6)
        flex_trainer.model.set_attn_implementation("flex_attention")
        torch.testing.assert_close(flex_trainer.compute_loss(flex_trainer.model, dict(batch)), want, rtol=1e-5,
                                   atol=1e-6)


def test_shifted_prediction_distills_each_target_from_its_source(
    tiny_qwen3_vl_dir, tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, dataset, tmp_path
):
    """prediction_shift (DESIGN 4.1, issue 13): student (B_s = 8) and teacher (B_t = 4) each score a masked xt token
    with the hidden state before it under their own block size (a block's first token from the last clean token
    before the block or the last prompt token); CE and KD otherwise as DESIGN 3.6. A dVLM teacher whose setting
    differs from the student's is refused; the AR source (shifted by nature) teaches either."""
    student = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_b8_dir, prediction_shift=True)
    teacher = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_teacher_dir, prediction_shift=True)
    args = make_args(tmp_path, teacher_topk=5, kd_on_eos_padding=True)  # the reference below distils every position
    trainer = DiffusionDistillTrainer(student, teacher, args=args, train_dataset=dataset,
                                      processing_class=BardVLProcessor.from_pretrained(tiny_bard_vl_b8_dir))
    batch = trainer.data_collator(indexed_rows(3))
    masked = distillation_positions(batch["logits_mask"], batch["input_ids"], student.config.mask_token_id)
    P, R = packed_lengths(batch["segment_ids"])
    inputs = {key: batch[key] for key in MODEL_KEYS}
    with torch.no_grad():
        student_logits = student(**inputs).logits  # [b, L, V]: the raw head, position i predicts i + 1
        teacher_logits = teacher(**inputs, block_size=4).logits

    def source(j, block_size):
        return P + R + j - 1 if j % block_size else (P - 1 if j == 0 else P + j - 1)

    ce, kd = [], []
    for s, i in masked.nonzero().tolist():
        log_p = student_logits[s, source(i - P - R, 8)].log_softmax(-1)
        ce.append(-log_p[batch["labels"][s, i]])
        values, ids = teacher_logits[s, source(i - P - R, 4)].topk(5)
        kd.append(-(values.softmax(-1) * log_p[ids]).sum())
    expected = torch.stack(ce).mean() + 0.5 * torch.stack(kd).mean()
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)), expected, rtol=1e-5, atol=1e-5)

    unshifted_teacher = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_teacher_dir)
    with pytest.raises(ValueError, match=re.escape("has prediction_shift=False but the student has True")):
        DiffusionDistillTrainer(student, unshifted_teacher, args=make_args(tmp_path), train_dataset=dataset)
    DiffusionDistillTrainer(
        student, str(tiny_qwen3_vl_dir), args=make_args(tmp_path, teacher_type="autoregressive"), train_dataset=dataset
    )


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


@pytest.mark.parametrize("normalization", ["token", "sample"])
def test_gradient_accumulation_equals_one_large_batch(
    tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, tmp_path, normalization
):
    """Batch 4 vs 2 micro-batches of 2 with different masked-token counts (SGD, no clipping): same loss and update,
    whether the step's mean runs over its masked tokens or over its samples."""
    data = Dataset.from_list(tiny_chat_rows(4))
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = make_args(
            tmp_path / f"b{batch_size}",
            loss_normalization=normalization,
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
    out = tmp_path / "out"  # apart from the teacher made under tmp_path below (an output may not hold a teacher)
    args = make_args(out)

    def refused(message, student=student, teacher=teacher, args=args, error=ValueError, **kwargs):
        with pytest.raises(error, match=re.escape(message)):
            DiffusionDistillTrainer(student, teacher, args=args, train_dataset=dataset, **kwargs)

    refused("No teacher: pass `teacher_model`", teacher=None)
    refused(
        "has no mask token (`config.mask_token_id`): teacher_type='diffusion' needs", teacher=str(tiny_qwen3_vl_dir)
    )
    refused(
        "`teacher_block_size`=3 does not divide the student's block size 8",
        args=make_args(out, teacher_block_size=3),
    )
    refused("does not match the student's `config.block_size`=8", args=make_args(out, block_sizes=[4]))
    refused("The student (qwen3_vl) has no `config.block_size`", student=str(tiny_qwen3_vl_dir))
    refused("`args` must be a DiffusionDistillConfig", args=make_args(out).to_dict(), error=TypeError)

    config = BardVLConfig.from_pretrained(teacher)
    config.text_config.vocab_size += 8
    refused("has vocab_size 520 but the student has 512", teacher=BardVLForConditionalGeneration(config))
    other_mask = BardVLForConditionalGeneration.from_pretrained(teacher, mask_token_id=475)
    refused("has mask_token_id 475 but the student has 474", teacher=other_mask)
    refused(
        "`teacher_model_init_kwargs`={'dtype': 'float32'} was set but the teacher is already instantiated",
        teacher=other_mask,
        args=make_args(out, teacher_model_init_kwargs={"dtype": "float32"}),
    )
    same = BardVLForConditionalGeneration.from_pretrained(student)
    refused("The teacher shares parameters with the student", student=same, teacher=same)

    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(teacher, other_tokenizer)
    processor = BardVLProcessor.from_pretrained(other_tokenizer)
    processor.tokenizer.add_tokens(["<|extra|>"])
    processor.save_pretrained(other_tokenizer)
    refused("The teacher's tokenizer", teacher=str(other_tokenizer))
    # a config reused for another student: each trainer reads its student's block size and leaves the config as is
    reused = make_args(out)
    assert DiffusionDistillTrainer(student, teacher, args=reused, train_dataset=dataset).block_sizes == [8]
    other = DiffusionDistillTrainer(str(tiny_bard_vl_dir), teacher, args=reused, train_dataset=dataset)
    assert other.block_sizes == [4]
    assert reused.block_sizes is None
    # the autoregressive source has no <|mask|> in its tokenizer: that difference alone is accepted
    DiffusionDistillTrainer(
        student, str(tiny_qwen3_vl_dir), args=make_args(out, teacher_type="autoregressive"), train_dataset=dataset
    )


# ---------------------------------------------------------------------- the example script
@pytest.mark.slow
def test_tiny_distillation_recipe_runs(tmp_path):
    """make_tiny_assets.py gives the B=4 anchor; a copy at B=8 stands in for the PBM stage-b8 student."""
    model_dir, data_dir = load_example_script("make_tiny_assets").main(str(tmp_path / "assets"), num_rows=8)
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
    trainer = load_example_script("diffusion_distill").main(
        *TrlParser((ScriptArguments, DiffusionDistillConfig, ModelConfig)).parse_args_and_config(arguments)
    )
    assert trainer.block_sizes == [8] and trainer.args.block_sizes is None and trainer.args.teacher_block_size == 4
    assert AutoModelForImageTextToText.from_pretrained(output / "stage-b8").config.block_size == 8
    assert sum("kd" in entry for entry in trainer.state.log_history) == 2
