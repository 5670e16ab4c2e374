"""BlockMergeTrainer: the progressive block-merging schedule (DESIGN 3.4, 3.5) on the tiny BARD-VL model."""

import json
import math

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainerCallback

from conftest import interrupted_copies, tiny_chat_rows, tiny_trainer_kwargs
from transformers_bard import BardVLForConditionalGeneration
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.trainer.block_diffusion_trainer import is_vision_tower_parameter
from transformers_bard.trainer.block_merge_config import BlockMergeConfig
from transformers_bard.trainer.block_merge_trainer import BlockMergeTrainer, fused_lm_head_inputs
from transformers_bard.trainer.collator import SAMPLE_INDEX_COLUMN, BlockDiffusionCollator
from transformers_bard.trainer.losses import block_merge_loss
from transformers_bard.trainer.stages import STAGE_STATE_NAME, resume_point

LM_PARAM = "model.language_model.layers.0.self_attn.q_proj.weight"
VISION_PARAM = "model.visual.blocks.0.attn.qkv.weight"
MERGER_PARAM = "model.visual.merger.linear_fc1.weight"


def make_args(output_dir, **overrides):
    return BlockMergeConfig(**tiny_trainer_kwargs(output_dir, **overrides))


class StepRecorder(TrainerCallback):
    """Records (block size, step) of every optimizer step taken."""

    def __init__(self):
        self.done = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.done.append((model.config.block_size, state.global_step))


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def saved_weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(tiny_chat_rows(6))


# ---------------------------------------------------------------------- the loss, without a trainer
def test_block_merge_loss_matches_per_sample_reference(tiny_bard_vl_dir):
    """DESIGN 3.4 by loops: L_s = (1/R_s) sum_i CE_i / t_i (t doubled on EOS padding); loss = sum_s L_s / n."""
    processor = BardVLProcessor.from_pretrained(tiny_bard_vl_dir)
    model = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir)
    collator = BlockDiffusionCollator(processor, model.config.mask_token_id, block_size=4)
    rows = [{**row, SAMPLE_INDEX_COLUMN: i} for i, row in enumerate(tiny_chat_rows(3))]
    batch = collator(rows)
    labels, rates, eos = batch.pop("labels"), batch.pop("rates"), batch.pop("is_eos_padding")
    lengths = batch.pop("response_lengths")
    batch.pop("sample_ids")
    with torch.no_grad():
        full = model(**{k: v for k, v in batch.items() if k != "logits_mask"}).logits  # [b, L, V]
        selected = model(**batch).logits
    loss, stats = block_merge_loss(labels, batch["logits_mask"], rates, eos, lengths, num_samples=5, logits=selected)
    expected = 0.0
    for s in range(3):
        for i in torch.nonzero(batch["logits_mask"][s]).flatten().tolist():
            ce = torch.nn.functional.cross_entropy(full[s, i].float(), labels[s, i])
            t = rates[s, i] * (2 if eos[s, i] else 1)
            expected += ce / t / lengths[s]
    torch.testing.assert_close(loss, torch.as_tensor(expected / 5, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert stats["num_tokens"] == batch["logits_mask"].sum()


def test_fused_lm_head_gives_the_same_loss_and_gradients(tiny_bard_vl_dir, dataset, tmp_path):
    """TRL's fused LM head (per-position log-probs, `shift_labels` scored unshifted) weighted by 1/t equals the
    selective head's PBM loss, and so do its gradients: fp32, loss to rtol 1e-5, gradients to rtol 1e-4 / atol 1e-7."""
    from trl.trainer.utils import add_fused_lm_head

    processor = BardVLProcessor.from_pretrained(tiny_bard_vl_dir)
    model = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir)
    collator = BlockDiffusionCollator(processor, model.config.mask_token_id, block_size=4)
    batch = collator([{**row, SAMPLE_INDEX_COLUMN: i} for i, row in enumerate(tiny_chat_rows(3))])
    targets = {key: batch.pop(key) for key in ("labels", "rates", "is_eos_padding", "response_lengths", "sample_ids")}
    common = (targets["labels"], batch["logits_mask"], targets["rates"], targets["is_eos_padding"])

    loss, stats = block_merge_loss(*common, targets["response_lengths"], 3, logits=model(**batch).logits)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    out = model(**fused_lm_head_inputs(model, batch, targets["labels"]), fused_lm_head=True)
    mask = batch["logits_mask"]
    assert torch.equal(out.label_mask, mask)  # scored exactly at the supervised positions, unshifted
    fused, fused_stats = block_merge_loss(
        *common, targets["response_lengths"], 3, ce=-out.log_probs[mask], correct=out.is_top1[mask]
    )
    fused.backward()
    torch.testing.assert_close(fused, loss, rtol=1e-5, atol=1e-7)
    assert fused_stats["num_correct"] == stats["num_correct"]
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-7)

    # the same through the trainer: SFTTrainer installs the fused head, `use_fused_lm_head` switches to it
    trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=make_args(tmp_path), train_dataset=dataset)
    rows = collator([{**row, SAMPLE_INDEX_COLUMN: i} for i, row in enumerate(tiny_chat_rows(3))])
    selective = trainer.compute_loss(trainer.model, dict(rows))
    trainer.args.use_fused_lm_head = True
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(rows)), selective, rtol=1e-5, atol=1e-7)


def test_shifted_prediction_loss_matches_loops_and_the_fused_head(tiny_bard_vl_dir, dataset, tmp_path):
    """prediction_shift (DESIGN 4.1, issue 13): the PBM loss scores each corrupted xt token with the logit of the
    hidden state before it (the last prompt token for offset 0, the last clean token of the previous block at a block
    start, else the noisy token before it), 1/t weights and normalisation unchanged; the fused LM head gives the same
    loss, directly and through the trainer."""
    from trl.trainer.utils import add_fused_lm_head

    processor = BardVLProcessor.from_pretrained(tiny_bard_vl_dir)
    model = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir, prediction_shift=True)
    B = 4
    collator = BlockDiffusionCollator(processor, model.config.mask_token_id, block_size=B)
    batch = collator([{**row, SAMPLE_INDEX_COLUMN: i} for i, row in enumerate(tiny_chat_rows(3))])
    targets = {key: batch.pop(key) for key in ("labels", "rates", "is_eos_padding", "response_lengths", "sample_ids")}
    labels, rates, eos, lengths = (targets[k] for k in ("labels", "rates", "is_eos_padding", "response_lengths"))
    mask = batch["logits_mask"]
    R = int(lengths.max())
    P = batch["segment_ids"].shape[1] - 2 * R  # packed row [prefix ; x0 ; xt], prompts left-padded
    with torch.no_grad():
        full = model(**{k: v for k, v in batch.items() if k != "logits_mask"}).logits  # [b, L, V]
    selected = model(**batch).logits
    loss, stats = block_merge_loss(labels, mask, rates, eos, lengths, num_samples=3, logits=selected)
    expected = 0.0
    for s in range(3):
        for i in torch.nonzero(mask[s]).flatten().tolist():
            j = i - P - R  # response offset of the target
            source = P + R + j - 1 if j % B else (P - 1 if j == 0 else P + j - 1)
            ce = torch.nn.functional.cross_entropy(full[s, source].float(), labels[s, i])
            expected += ce / (rates[s, i] * (2 if eos[s, i] else 1)) / lengths[s]
    torch.testing.assert_close(loss, torch.as_tensor(expected / 3, dtype=torch.float32), rtol=1e-5, atol=1e-6)

    add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    out = model(**fused_lm_head_inputs(model, batch, labels), fused_lm_head=True)
    scored_at = model.logit_positions(batch["segment_ids"], mask)
    fused, fused_stats = block_merge_loss(
        labels, mask, rates, eos, lengths, 3, ce=-out.log_probs[scored_at], correct=out.is_top1[scored_at]
    )
    torch.testing.assert_close(fused, loss, rtol=1e-5, atol=1e-7)
    assert fused_stats["num_correct"] == stats["num_correct"]

    trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=make_args(tmp_path), train_dataset=dataset)
    trainer._base_model.config.prediction_shift = True
    rows = collator([{**row, SAMPLE_INDEX_COLUMN: i} for i, row in enumerate(tiny_chat_rows(3))])
    shifted = trainer.compute_loss(trainer.model, dict(rows))
    trainer.args.use_fused_lm_head = True
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(rows)), shifted, rtol=1e-5, atol=1e-7)
    trainer._base_model.config.prediction_shift = False
    assert not torch.allclose(trainer.compute_loss(trainer.model, dict(rows)), shifted)


def test_gradient_checkpointing_gives_equal_gradients(tiny_bard_vl_dir):
    """The 4-D block-diffusion mask survives recomputation: same loss and gradients with checkpointing."""
    processor = BardVLProcessor.from_pretrained(tiny_bard_vl_dir)
    collator = BlockDiffusionCollator(processor, 474, block_size=4)
    batch = collator([{**row, SAMPLE_INDEX_COLUMN: i} for i, row in enumerate(tiny_chat_rows(3))])
    targets = {key: batch.pop(key) for key in ("labels", "rates", "is_eos_padding", "response_lengths", "sample_ids")}

    def loss_and_grads(checkpointing):
        model = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        calls = []
        # the layer forward is checkpointed, its submodules run again in backward
        model.model.language_model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        loss, _ = block_merge_loss(
            targets["labels"],
            batch["logits_mask"],
            targets["rates"],
            targets["is_eos_padding"],
            targets["response_lengths"],
            3,
            logits=model(**batch, use_cache=False).logits,
        )
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}, len(calls)

    plain_loss, plain_grads, plain_calls = loss_and_grads(False)
    ckpt_loss, ckpt_grads, ckpt_calls = loss_and_grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the layer really was recomputed in backward
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_vision_parameters_are_told_apart():
    assert is_vision_tower_parameter(VISION_PARAM)
    assert is_vision_tower_parameter("base_model.model.model.visual.patch_embed.proj.weight")
    assert not is_vision_tower_parameter(MERGER_PARAM)
    assert not is_vision_tower_parameter("model.visual.deepstack_merger_list.0.linear_fc1.weight")
    assert not is_vision_tower_parameter(LM_PARAM) and not is_vision_tower_parameter("lm_head.weight")


# ---------------------------------------------------------------------- the schedule
def test_progressive_schedule_smoke(tiny_bard_vl_dir, dataset, tmp_path):
    """Two stages from a model path: loss and block size logged per stage, parameters move, and each stage ends in a
    complete `stage-b{B}` checkpoint that loads with AutoModelForImageTextToText at its block size."""
    initial = weights(BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir))
    args = make_args(tmp_path, block_sizes=[4, 8], stage_steps=[2], activation_checkpointing=True)
    trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_block_size"] == 8
    assert 0 <= metrics["eval_mean_token_accuracy"] <= 1

    for block_size in (4, 8):
        history = trainer.stage_log_history[block_size]
        losses = [entry["loss"] for entry in history if "loss" in entry]
        assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
        assert all(entry["block_size"] == block_size for entry in history if "loss" in entry)
        assert all(0 <= entry["mean_token_accuracy"] <= 1 for entry in history if "loss" in entry)

        folder = tmp_path / f"stage-b{block_size}"
        assert json.loads((folder / STAGE_STATE_NAME).read_text())["complete"] is True
        loaded = AutoModelForImageTextToText.from_pretrained(folder)
        assert type(loaded).__name__ == "BardVLForConditionalGeneration"
        assert loaded.config.block_size == block_size and loaded.config.mask_token_id == 474
        assert (folder / "noise_scheduler_config.json").is_file() and (folder / "processor_config.json").is_file()
    final = weights(trainer.model)
    for name in (LM_PARAM, VISION_PARAM, MERGER_PARAM):
        assert not torch.equal(initial[name], final[name]), name
    stage_4, stage_8 = saved_weights(tmp_path / "stage-b4"), saved_weights(tmp_path / "stage-b8")
    assert not torch.equal(stage_4[LM_PARAM], stage_8[LM_PARAM])  # stage 8 trained on from stage 4
    for name, tensor in stage_8.items():
        torch.testing.assert_close(tensor, final[name])
    assert trainer.args.output_dir == str(tmp_path)  # the per-stage bookkeeping is undone


def test_learning_rates_and_per_stage_schedule(tiny_bard_vl_dir, dataset, tmp_path):
    """LM/head/mergers at learning_rate, the rest of the vision tower at vision_learning_rate; each stage warms up
    for min(max_warmup_steps, ceil(10%)) steps, then decays by cosine to 5% of the peak."""
    args = make_args(tmp_path, learning_rate=2e-5, vision_learning_rate=2e-6, max_warmup_steps=3)
    trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=args, train_dataset=dataset)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    group_of = {names[id(p)]: group for group in optimizer.param_groups for p in group["params"]}
    assert group_of[LM_PARAM]["lr"] == group_of[MERGER_PARAM]["lr"] == group_of["lm_head.weight"]["lr"] == 2e-5
    assert group_of[VISION_PARAM]["lr"] == 2e-6
    assert len(group_of) == sum(p.requires_grad for p in trainer.model.parameters())
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)

    scheduler = trainer.create_scheduler(num_training_steps=100)  # warmup min(3, 10) = 3
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    assert [r[0] for r in rates[:4]] == pytest.approx([0, 2e-5 / 3, 4e-5 / 3, 2e-5])
    peaks = [group["initial_lr"] for group in optimizer.param_groups]
    assert sorted(set(peaks)) == [2e-6, 2e-5]
    assert [lr / peak for lr, peak in zip(rates[50], peaks)] == pytest.approx([rates[50][0] / 2e-5] * len(peaks))
    assert rates[-1][0] == pytest.approx(2e-5 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 96 / 97))))


def test_gradient_accumulation_equals_one_large_batch(tiny_bard_vl_dir, tmp_path):
    """Batch 4 vs 2 micro-batches of 2 (SGD, no clipping): same logged loss, same update (DESIGN 3.4 pitfall)."""
    data = Dataset.from_list(tiny_chat_rows(4))  # responses of different lengths
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = make_args(
            tmp_path / f"b{batch_size}",
            block_sizes=[4],
            stage_steps=[1],
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            vision_learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            max_warmup_steps=0,
        )
        trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=args, train_dataset=data)
        trainer.train()
        results.append((trainer.stage_log_history[4][0]["loss"], weights(trainer.model)))
    initial = weights(BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, tensor in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], tensor, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(results[0][1][LM_PARAM], initial[LM_PARAM])


def test_resume_continues_in_the_right_stage_at_the_right_step(tiny_bard_vl_dir, dataset, tmp_path):
    """An interrupted run resumed with `resume_from_checkpoint=True` ends with the same weights as an uninterrupted
    one: mid-stage (from `checkpoints-b8/checkpoint-1`) and at a stage boundary (from `stage-b4`)."""
    common = dict(block_sizes=[4, 8], stage_steps=[2], save_strategy="steps", save_steps=1)
    full = tmp_path / "full"
    BlockMergeTrainer(str(tiny_bard_vl_dir), args=make_args(full, **common), train_dataset=dataset).train()
    expected = saved_weights(full / "stage-b8")
    saved = json.loads((full / "checkpoints-b8" / "checkpoint-1" / STAGE_STATE_NAME).read_text())
    assert (saved["stage"], saved["block_size"], saved["global_step"], saved["complete"]) == (1, 8, 1, False)

    mid, boundary = interrupted_copies(full, tmp_path)

    full_history = json.loads((full / "stage-b8" / "trainer_state.json").read_text())["log_history"]
    full_losses = [entry["loss"] for entry in full_history if "loss" in entry]
    for folder, trained_steps in ((mid, [2]), (boundary, [1, 2])):
        steps = StepRecorder()
        trainer = BlockMergeTrainer(
            str(tiny_bard_vl_dir), args=make_args(folder, **common), train_dataset=dataset, callbacks=[steps]
        )
        trainer.train(resume_from_checkpoint=True)
        assert steps.done == [(8, step) for step in trained_steps]  # stage b4 not again, b8 from the right step
        losses = [entry["loss"] for entry in trainer.stage_log_history[8] if "loss" in entry]
        assert losses == pytest.approx(full_losses, rel=1e-5)
        resumed = saved_weights(folder / "stage-b8")
        for name, tensor in expected.items():
            torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7, msg=f"{folder.name}: {name}")

    # an explicit mid-stage checkpoint resumes the same way; a finished run has nothing left to do
    trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=make_args(full, **common), train_dataset=dataset)
    assert trainer.train(resume_from_checkpoint=True).global_step == 0
    checkpoint = str(full / "checkpoints-b8" / "checkpoint-1")
    assert resume_point(str(full), [4, 8], checkpoint)[:2] == (1, checkpoint)
    assert resume_point(str(full), [4, 8], str(full / "stage-b4")) == (1, None, str(full / "stage-b4"))


def test_lora_trains_adapters_and_merges(tiny_bard_vl_dir, dataset, tmp_path):
    from peft import LoraConfig

    initial = weights(BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir))
    args = make_args(tmp_path, block_sizes=[4], stage_steps=[2], learning_rate=5e-2)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=args, train_dataset=dataset, peft_config=peft_config)
    trainer.train()
    trained = dict(trainer.model.named_parameters())
    base_name = "base_model.model." + LM_PARAM.replace(".weight", ".base_layer.weight")
    assert torch.equal(trained[base_name], initial[LM_PARAM])  # frozen base
    assert not trained[base_name.replace("base_layer", "lora_B.default")].eq(0).all()  # adapter trained

    # the stage checkpoint is the merged model (and the adapter); it equals PEFT's own merge
    stage = tmp_path / "stage-b4"
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
    merged = trainer.model.merge_and_unload()
    merged_dir = tmp_path / "merged"
    merged.save_pretrained(merged_dir)
    from_stage = AutoModelForImageTextToText.from_pretrained(stage)
    from_merge = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert from_stage.config.block_size == 4
    assert not torch.equal(from_stage.state_dict()[LM_PARAM], initial[LM_PARAM])
    for name, tensor in from_merge.state_dict().items():
        torch.testing.assert_close(from_stage.state_dict()[name], tensor)


# ---------------------------------------------------------------------- bad inputs
def test_errors(tiny_qwen3_vl_dir, tiny_bard_vl_dir, dataset, tmp_path):
    args = make_args(tmp_path, block_sizes=[4])
    no_mask = BardVLForConditionalGeneration.from_pretrained(tiny_qwen3_vl_dir)
    assert no_mask.config.mask_token_id is None
    processor = BardVLProcessor.from_pretrained(tiny_bard_vl_dir)
    with pytest.raises(ValueError, match="no `config.mask_token_id`.*convert_from_autoregressive"):
        BlockMergeTrainer(no_mask, args=args, train_dataset=dataset, processing_class=processor)

    no_reply = Dataset.from_list([{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}])
    with pytest.raises(ValueError, match="`train_dataset` cannot be trained on: its first row it has no assistant"):
        BlockMergeTrainer(str(tiny_bard_vl_dir), args=args, train_dataset=no_reply)
    with pytest.raises(ValueError, match="`packing=True` is not supported"):
        make_args(tmp_path, packing=True)
    with pytest.raises(ValueError, match="`optimizers` cannot be passed"):
        BlockMergeTrainer(str(tiny_bard_vl_dir), args=args, train_dataset=dataset, optimizers=(object(), None))
    with pytest.raises(TypeError, match="BlockMergeConfig"):
        BlockMergeTrainer(str(tiny_bard_vl_dir), args=object(), train_dataset=dataset)

    from peft import LoraConfig, PromptTuningConfig

    with pytest.raises(ValueError, match="LoraConfig without DoRA"):
        BlockMergeTrainer(
            str(tiny_bard_vl_dir),
            args=args,
            train_dataset=dataset,
            peft_config=LoraConfig(target_modules=["q_proj"], use_dora=True),
        )
    with pytest.raises(ValueError, match="LoraConfig"):
        BlockMergeTrainer(
            str(tiny_bard_vl_dir),
            args=args,
            train_dataset=dataset,
            peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        )

    trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=args, train_dataset=dataset)
    with pytest.raises(ValueError, match="not a BARD trainer checkpoint"):
        trainer.train(resume_from_checkpoint=str(tiny_bard_vl_dir))
    # a bad row met during training names its dataset index
    bad = Dataset.from_list(tiny_chat_rows(2) + [{"messages": no_reply[0]["messages"], "images": []}])
    trainer = BlockMergeTrainer(
        str(tiny_bard_vl_dir),
        args=make_args(tmp_path, block_sizes=[4], stage_steps=[2], per_device_train_batch_size=3),
        train_dataset=bad,
    )
    with pytest.raises(ValueError, match="Row 2 of the training data cannot be trained on: it has no assistant turn"):
        trainer.train()


@pytest.mark.slow  # FlexAttention compiles its kernel on first use
def test_flex_attention_gives_the_sdpa_loss_and_is_refused_for_cpu_training(
    tiny_bard_vl_dir, dataset, tmp_path, fresh_compile
):
    """The PBM loss of a collated batch is the same with the model switched to FlexAttention (its BlockMask built
    from the same labels); training with it on CPU is refused before any work, naming the fix."""
    trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=make_args(tmp_path), train_dataset=dataset)
    rows = trainer.data_collator([{**row, SAMPLE_INDEX_COLUMN: i} for i, row in enumerate(tiny_chat_rows(3))])
    with torch.no_grad():
        sdpa = trainer.compute_loss(trainer.model, dict(rows))
        trainer.model.set_attn_implementation("flex_attention")
        flex = trainer.compute_loss(trainer.model, dict(rows))
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-6)
    args = make_args(tmp_path, model_init_kwargs={"attn_implementation": "flex_attention"})
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*CPU.*'sdpa'"):
        BlockMergeTrainer(str(tiny_bard_vl_dir), args=args, train_dataset=dataset)


def test_deepspeed_combinations_that_cannot_train_are_refused(monkeypatch):
    """`deepspeed` cannot be installed here, so the refusals are checked on a stand-in trainer state: a DeepSpeed
    config that accelerate left off (CPU processes would train replicated) and LoRA under ZeRO-3 (the stage
    checkpoints merge the adapter into full weights); LoRA under ZeRO-2 is allowed."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from transformers_bard.trainer.block_diffusion_trainer import BlockDiffusionTrainer

    def state(zero_stage, enabled=True, model=None):
        accelerator = SimpleNamespace(
            distributed_type=SimpleNamespace(value="MULTI_CPU"),
            device=torch.device("cpu"),
            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)),
        )
        return SimpleNamespace(
            is_fsdp_enabled=False, is_deepspeed_enabled=enabled, accelerator=accelerator, model=model
        )

    lora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(target_modules=["0"], r=2))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="asks for DeepSpeed, but accelerate runs MULTI_CPU on cpu"):
        BlockDiffusionTrainer._check_distributed_setting(state(3, enabled=False))
    with pytest.raises(ValueError, match="LoRA with FSDP or DeepSpeed ZeRO-3 is not supported.*Use DDP or ZeRO-2"):
        BlockDiffusionTrainer._check_distributed_setting(state(3, model=lora))
    BlockDiffusionTrainer._check_distributed_setting(state(2, model=lora))  # ZeRO-2 replicates the weights
