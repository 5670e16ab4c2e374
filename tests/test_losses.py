"""Tests of the PBM and SWD loss functions (DESIGN 3.4, 3.6) against hand-computed cases and loop references."""

import math

import pytest
import torch
import torch.nn.functional as F

from transformers_bard.trainer.losses import (
    block_diffusion_loss,
    block_diffusion_weights,
    block_merge_loss,
    distillation_objective,
    masked_token_mean_ce,
    swd_loss,
    teacher_topk,
    topk_distillation_loss,
)

LN3 = math.log(3)


def log_softmax_list(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def ref_block_diffusion_loss(logits, labels, rates, sample_index, lengths, eos, num_samples, min_rate=None):
    """DESIGN 3.4 written per sample with loops: L_s = (1/R_s) sum_i CE_i / t_i', loss = sum_s L_s / num_samples."""
    per_sample = {}
    for i in range(len(labels)):
        ce = -log_softmax_list(logits[i].tolist())[int(labels[i])]
        t = float(rates[i])
        if min_rate is not None:
            t = max(t, min_rate)
        if eos[i]:
            t *= 2
        s = int(sample_index[i])
        per_sample[s] = per_sample.get(s, 0.0) + ce / t
    return sum(total / float(lengths[s]) for s, total in per_sample.items()) / num_samples


def random_batch(seed=0, lengths=(8, 4, 12, 4), vocab=11):
    """Supervised positions of a batch: a few corrupted positions per sample, with rates and EOS-padding flags."""
    g = torch.Generator().manual_seed(seed)
    sample_index, eos = [], []
    for s, length in enumerate(lengths):
        count = int(torch.randint(1, length + 1, (1,), generator=g))
        sample_index += [s] * count
        eos += torch.rand(count, generator=g).lt(0.3).tolist()
    n = len(sample_index)
    return {
        "logits": torch.randn(n, vocab, generator=g) * 2,
        "labels": torch.randint(0, vocab, (n,), generator=g),
        "rates": torch.rand(n, generator=g) * 0.99 + 0.01,
        "sample_index": torch.tensor(sample_index),
        "response_lengths": torch.tensor(lengths),
        "is_eos_padding": torch.tensor(eos),
    }


def select_samples(batch, samples):
    """The positions of `samples` only, re-indexed as a smaller batch."""
    keep = torch.isin(batch["sample_index"], torch.tensor(samples))
    remap = {old: new for new, old in enumerate(samples)}
    out = {key: value[keep] for key, value in batch.items() if key != "response_lengths"}
    out["sample_index"] = torch.tensor([remap[int(s)] for s in out["sample_index"]])
    out["response_lengths"] = batch["response_lengths"][samples]
    return out


# ---------------------------------------------------------------------------- PBM loss


def hand_case():
    # V = 2. Sample 0 (R = 4): position a: logits [0, ln3], label 1 -> CE = ln(4/3), t = 0.5, real token.
    #                          position b: logits [ln3, 0], label 1 -> CE = ln 4, t = 0.25, EOS padding (t doubled).
    # Sample 1 (R = 2):        position c: logits [0, ln3], label 0 -> CE = ln 4, t = 1.0, real token.
    return {
        "logits": torch.tensor([[0.0, LN3], [LN3, 0.0], [0.0, LN3]]),
        "labels": torch.tensor([1, 1, 0]),
        "rates": torch.tensor([0.5, 0.25, 1.0]),
        "sample_index": torch.tensor([0, 0, 1]),
        "response_lengths": torch.tensor([4, 2]),
        "is_eos_padding": torch.tensor([False, True, False]),
    }


def test_block_diffusion_loss_hand_computed():
    loss, stats = block_diffusion_loss(**hand_case(), num_samples=2)
    # L_0 = (ln(4/3)/0.5 + ln4/(2*0.25)) / 4 = ln(16/3)/2 = 0.836988; L_1 = (ln4/1) / 2 = ln2 = 0.693147.
    # loss = (L_0 + L_1) / 2 = 0.765068.
    assert loss.item() == pytest.approx(0.765068, abs=1e-6)
    assert loss.item() == pytest.approx((math.log(16 / 3) / 2 + math.log(2)) / 2, rel=1e-6)
    assert loss.dtype == torch.float32
    # Unweighted CE sum ln(4/3) + 2 ln 4 = 3.060271; only position a's argmax equals its label.
    assert stats["ce_sum"].item() == pytest.approx(3.060271, abs=1e-6)
    assert stats["num_tokens"].item() == 3
    assert stats["num_correct"].item() == 1
    assert not any(value.requires_grad for value in stats.values())


def test_block_diffusion_loss_hand_computed_with_clamp():
    loss, _ = block_diffusion_loss(**hand_case(), num_samples=2, min_rate=0.4)
    # Clamp first, then double: position b's t = max(0.25, 0.4) * 2 = 0.8 (a and c are above the clamp).
    # L_0 = (2 ln(4/3) + ln4/0.8) / 4 = 0.577058; loss = (0.577058 + ln2) / 2 = 0.635103.
    assert loss.item() == pytest.approx(0.635103, abs=1e-6)


def test_block_diffusion_weights_half_weight_for_eos_padding():
    weights = block_diffusion_weights(
        rates=torch.tensor([0.2, 0.2, 0.01, 0.01]),
        sample_index=torch.tensor([0, 0, 1, 1]),
        response_lengths=torch.tensor([4, 8]),
        is_eos_padding=torch.tensor([False, True, False, True]),
        min_rate=0.1,
    )
    torch.testing.assert_close(weights, torch.tensor([1 / (4 * 0.2), 1 / (4 * 0.4), 1 / (8 * 0.1), 1 / (8 * 0.2)]))


@pytest.mark.parametrize("min_rate", [None, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_diffusion_loss_matches_loop_reference(seed, min_rate):
    batch = random_batch(seed)
    loss, stats = block_diffusion_loss(**batch, num_samples=4, min_rate=min_rate)
    expected = ref_block_diffusion_loss(
        batch["logits"],
        batch["labels"],
        batch["rates"],
        batch["sample_index"],
        batch["response_lengths"],
        batch["is_eos_padding"],
        4,
        min_rate,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["ce_sum"].item() == pytest.approx(F.cross_entropy(batch["logits"], batch["labels"], reduction="sum"))


def test_block_diffusion_loss_is_independent_of_batch_composition():
    batch = random_batch(3)
    full, _ = block_diffusion_loss(**batch, num_samples=4)
    separate = [block_diffusion_loss(**select_samples(batch, [s]), num_samples=4)[0] for s in range(4)]
    torch.testing.assert_close(full, torch.stack(separate).sum())
    # The same in another grouping and order.
    pairs = [block_diffusion_loss(**select_samples(batch, group), num_samples=4)[0] for group in ([3, 1], [0, 2])]
    torch.testing.assert_close(full, pairs[0] + pairs[1])


def test_gradient_accumulation_equivalence():
    # Logits come from a linear head, so the gradients reach a shared parameter as in a real model.
    batch = random_batch(4, lengths=(8, 4, 16, 4))
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(batch["labels"].shape[0], 6, generator=g)
    head = torch.randn(11, 6, generator=g)

    def grad_of(part_batch, part_hidden):
        weight = head.clone().requires_grad_(True)
        loss, _ = block_diffusion_loss(**{**part_batch, "logits": part_hidden @ weight.T}, num_samples=4)
        loss.backward()
        return weight.grad

    full = grad_of(batch, hidden)
    accumulated = torch.zeros_like(head)
    for group in ([0, 1], [2, 3]):
        keep = torch.isin(batch["sample_index"], torch.tensor(group))
        accumulated += grad_of(select_samples(batch, group), hidden[keep])
    torch.testing.assert_close(full, accumulated)


def test_block_diffusion_loss_num_samples_tensor_and_empty():
    batch = hand_case()
    as_int, _ = block_diffusion_loss(**batch, num_samples=2)
    as_tensor, _ = block_diffusion_loss(**batch, num_samples=torch.tensor(2))
    torch.testing.assert_close(as_int, as_tensor)
    logits = torch.zeros(0, 5, requires_grad=True)
    empty, stats = block_diffusion_loss(
        logits,
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
        torch.tensor([4]),
        torch.zeros(0, dtype=torch.bool),
        num_samples=1,
    )
    assert empty.item() == 0 and stats["num_tokens"].item() == 0
    empty.backward()


def test_block_diffusion_loss_computes_in_fp32():
    batch = hand_case()
    loss, _ = block_diffusion_loss(**{**batch, "logits": batch["logits"].bfloat16()}, num_samples=2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.765068, abs=1e-2)


def test_block_diffusion_loss_validation():
    batch = hand_case()
    with pytest.raises(ValueError, match="rates"):
        block_diffusion_loss(**{**batch, "rates": torch.ones(2)}, num_samples=2)
    with pytest.raises(ValueError, match="num_samples"):
        block_diffusion_loss(**batch, num_samples=0)


# ---------------------------------------------------------------------------- packed batches


def test_block_merge_loss_from_per_position_ce_equals_the_logits_path():
    """The fused head's path (per-position CE and top-1 flags) and the logits path share one reduction: equal loss,
    gradient and stats; positions are the row-major True entries of `logits_mask`."""
    g = torch.Generator().manual_seed(3)
    logits_mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 1, 1]], dtype=torch.bool)  # [b=2, L=5], N = 6
    labels = torch.randint(0, 7, (2, 5), generator=g)
    rates = torch.rand(2, 5, generator=g) * 0.9 + 0.1
    eos = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    lengths = torch.tensor([3, 4])
    logits = torch.randn(6, 7, generator=g, requires_grad=True)
    args = (labels, logits_mask, rates, eos, lengths, 2)
    loss, stats = block_merge_loss(*args, logits=logits)
    (grad,) = torch.autograd.grad(loss, logits)
    ce = F.cross_entropy(logits, labels[logits_mask], reduction="none")
    correct = logits.argmax(-1) == labels[logits_mask]
    per_position, per_position_stats = block_merge_loss(*args, ce=ce, correct=correct)
    (per_position_grad,) = torch.autograd.grad(per_position, logits)
    torch.testing.assert_close(per_position, loss)
    torch.testing.assert_close(per_position_grad, grad)
    for key in stats:
        torch.testing.assert_close(per_position_stats[key], stats[key])
    with pytest.raises(ValueError, match="Pass `logits`, or the per-position `ce` and `correct`"):
        block_merge_loss(*args)
    with pytest.raises(ValueError, match="`ce` must be 1-D with N=6"):
        block_merge_loss(*args, ce=ce[:5], correct=correct[:5])


def test_swd_loss_of_micro_batches_sums_to_the_whole_batch_loop_reference():
    """DESIGN 3.6 by loops: (1/|M|) sum_i [CE_i + 0.5 * KD_i] over a step of 5 positions, split 2 + 3."""
    g = torch.Generator().manual_seed(4)
    student = torch.randn(5, 9, generator=g)
    teacher = torch.randn(5, 9, generator=g)
    labels = torch.randint(0, 9, (5,), generator=g)
    expected = 0.0
    for i in range(5):
        log_p = log_softmax_list(student[i].tolist())
        values, ids = teacher[i].topk(3)
        q = [math.exp(x) for x in log_softmax_list(values.tolist())]
        kd = -sum(q_j * log_p[j] for q_j, j in zip(q, ids.tolist()))
        expected += (-log_p[labels[i]] + 0.5 * kd) / 5
    parts = []
    for rows in (slice(0, 2), slice(2, 5)):
        values, ids = teacher_topk(teacher[rows], 3)
        parts.append(swd_loss(student[rows], labels[rows], values, ids, num_tokens=torch.tensor(5.0)))
    loss = parts[0][0] + parts[1][0]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    sums = parts[0][1] + parts[1][1]  # CE, KD, positions, hits, agreement, items
    assert sums[2].item() == 5 and sums[5].item() == 5
    assert (sums[0] + 0.5 * sums[1]).item() / 5 == pytest.approx(expected, rel=1e-5)
    assert sums[3].item() == (student.argmax(-1) == labels).sum().item()
    assert sums[4].item() == (student.argmax(-1) == teacher.argmax(-1)).sum().item()


def test_swd_loss_per_sample_normalisation_matches_a_loop_reference():
    """Per sample: (1/S) sum_s (1/n_s) sum_{i in s} [CE_i + 0.5 KD_i], a step of 3 samples (1, 4 and 2 masked
    positions) split into micro-batches by sample; the short sample weighs as much as the long one."""
    g = torch.Generator().manual_seed(7)
    student = torch.randn(7, 9, generator=g)
    teacher = torch.randn(7, 9, generator=g)
    labels = torch.randint(0, 9, (7,), generator=g)
    samples = [[0], [1, 2, 3, 4], [5, 6]]
    expected = 0.0
    for positions in samples:
        per_sample = 0.0
        for i in positions:
            log_p = log_softmax_list(student[i].tolist())
            values, ids = teacher[i].topk(3)
            q = [math.exp(x) for x in log_softmax_list(values.tolist())]
            kd = -sum(q_j * log_p[j] for q_j, j in zip(q, ids.tolist()))
            per_sample += (-log_p[labels[i]] + 0.5 * kd) / len(positions)
        expected += per_sample / len(samples)
    parts = []
    for rows, index in ((slice(0, 1), [0]), (slice(1, 7), [0, 0, 0, 0, 2, 2])):  # micro-batch rows 0 and {0, 2}
        values, ids = teacher_topk(teacher[rows], 3)
        parts.append(
            swd_loss(
                student[rows],
                labels[rows],
                values,
                ids,
                num_tokens=torch.tensor(3.0),
                sample_index=torch.tensor(index),
            )
        )
    loss = parts[0][0] + parts[1][0]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    sums = parts[0][1] + parts[1][1]  # CE, KD, positions, hits, agreement, samples
    assert sums[2].item() == 7 and sums[5].item() == 3
    # the token mean differs on this step: the 4-position sample dominates it
    values, ids = teacher_topk(teacher, 3)
    token_mean = swd_loss(student, labels, values, ids, num_tokens=7)[0]
    assert abs(token_mean.item() - expected) > 1e-3
    assert (sums[0] + 0.5 * sums[1]).item() / 7 == pytest.approx(token_mean.item(), rel=1e-5)
    with pytest.raises(ValueError, match="`sample_index` must be 1-D with N=7"):
        swd_loss(student, labels, values, ids, num_tokens=3, sample_index=torch.zeros(6, dtype=torch.long))


def test_swd_loss_kd_positions_drop_kd_but_keep_ce_and_the_denominator():
    """kd_positions False -> that position contributes CE only, and still counts in the step's denominator."""
    g = torch.Generator().manual_seed(9)
    student = torch.randn(5, 9, generator=g)
    teacher = torch.randn(5, 9, generator=g)
    labels = torch.randint(0, 9, (5,), generator=g)
    keep = torch.tensor([True, False, True, True, False])
    expected = 0.0
    for i in range(5):
        log_p = log_softmax_list(student[i].tolist())
        values, ids = teacher[i].topk(3)
        q = [math.exp(x) for x in log_softmax_list(values.tolist())]
        kd = -sum(q_j * log_p[j] for q_j, j in zip(q, ids.tolist())) if keep[i] else 0.0
        expected += (-log_p[labels[i]] + 0.5 * kd) / 5
    values, ids = teacher_topk(teacher, 3)
    loss, sums = swd_loss(student, labels, values, ids, num_tokens=5, kd_positions=keep)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    everywhere = swd_loss(student, labels, values, ids, num_tokens=5)[0]
    assert everywhere.item() > loss.item()  # KD >= 0: dropping it lowers the loss
    with pytest.raises(ValueError, match="`kd_positions` must be 1-D with N=5"):
        swd_loss(student, labels, values, ids, num_tokens=5, kd_positions=keep[:4])


# ---------------------------------------------------------------------------- distillation


def test_teacher_topk():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 4.0, 3.0, 2.0]], requires_grad=True)
    values, ids = teacher_topk(logits, k=2)
    assert ids.tolist() == [[1, 3], [0, 1]]
    torch.testing.assert_close(values, torch.tensor([[3.0, 2.0], [5.0, 4.0]]))
    assert not values.requires_grad and values.dtype == torch.float32
    with pytest.raises(ValueError, match="k"):
        teacher_topk(logits, k=5)


def test_topk_kd_hand_computed():
    # Teacher top-2 logits [ln3, 0] at ids [0, 2] -> q = [3/4, 1/4].
    # Position 1: student uniform over V = 3 -> log p = -ln3 at both ids -> KD = ln3 = 1.098612.
    # Position 2: student logits [ln2, 0, 0] -> p = [1/2, 1/4, 1/4] -> KD = 3/4 ln2 + 1/4 ln4 = 5/4 ln2 = 0.866434.
    student = torch.tensor([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]])
    teacher_values = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    teacher_ids = torch.tensor([[0, 2], [0, 2]])
    kd = topk_distillation_loss(student, teacher_values, teacher_ids)
    assert kd.item() == pytest.approx((1.098612 + 0.866434) / 2, abs=1e-6)


def test_topk_kd_equals_teacher_entropy_when_student_is_teacher_and_k_is_vocab():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, generator=g) * 3
    values, ids = teacher_topk(logits, k=7)
    kd = topk_distillation_loss(logits, values, ids)
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(kd, entropy)


def ref_forward_kd(student, teacher, k, temperature):
    """Loop reference: q over the teacher's top-k renormalised; p the student's full-vocabulary softmax."""
    total = 0.0
    for row in range(student.shape[0]):
        teacher_row = (teacher[row] / temperature).tolist()
        top = sorted(range(len(teacher_row)), key=lambda j: -teacher_row[j])[:k]
        norm = sum(math.exp(teacher_row[j]) for j in top)
        log_p = log_softmax_list((student[row] / temperature).tolist())
        total += -sum(math.exp(teacher_row[j]) / norm * log_p[j] for j in top)
    return total / student.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_topk_kd_matches_cross_entropy_of_renormalised_teacher(temperature):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(5, 9, generator=g) * 2
    teacher = torch.randn(5, 9, generator=g) * 2
    values, ids = teacher_topk(teacher, k=3)
    kd = topk_distillation_loss(student, values, ids, temperature=temperature)
    assert kd.item() == pytest.approx(ref_forward_kd(student, teacher, 3, temperature), rel=1e-5)


def test_topk_kd_temperature_scales_both_distributions_without_t_squared():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(4, 8, generator=g)
    values, ids = teacher_topk(torch.randn(4, 8, generator=g), k=4)
    hot = topk_distillation_loss(student, values, ids, temperature=2.0)
    # T divides both sets of logits; no T^2 factor is applied.
    torch.testing.assert_close(hot, topk_distillation_loss(student / 2, values / 2, ids))
    assert not torch.allclose(hot, topk_distillation_loss(student, values, ids))
    # A very high temperature flattens q to uniform over the k ids and p to uniform over V: KD -> ln V.
    flat = topk_distillation_loss(student, values, ids, temperature=1e6)
    assert flat.item() == pytest.approx(math.log(8), rel=1e-4)


def ref_reverse_kd(student, values, ids, temperature):
    total = 0.0
    for row in range(student.shape[0]):
        log_p = log_softmax_list([student[row, j].item() / temperature for j in ids[row].tolist()])
        log_q = log_softmax_list([v / temperature for v in values[row].tolist()])
        total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    return total / student.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_topk_kd_reverse(temperature):
    g = torch.Generator().manual_seed(3)
    student = torch.randn(5, 9, generator=g) * 2
    values, ids = teacher_topk(torch.randn(5, 9, generator=g) * 2, k=4)
    kd = topk_distillation_loss(student, values, ids, temperature=temperature, reverse=True)
    assert kd.item() == pytest.approx(ref_reverse_kd(student, values, ids, temperature), rel=1e-5)
    assert kd.item() > 0
    # Zero when the student, renormalised over the k ids, equals q, whatever it puts on the other ids.
    matching = torch.randn(5, 9, generator=g)
    matching.scatter_(1, ids, values + 1.7)
    assert topk_distillation_loss(matching, values, ids, reverse=True).item() == pytest.approx(0.0, abs=1e-6)


def test_topk_kd_gradient_reaches_student_only():
    g = torch.Generator().manual_seed(4)
    student = torch.randn(3, 6, generator=g, requires_grad=True)
    teacher = torch.randn(3, 6, generator=g, requires_grad=True)
    values, ids = teacher_topk(teacher, k=2)
    topk_distillation_loss(student, values, ids).backward()
    assert student.grad is not None and teacher.grad is None
    # Gradient of the forward KD w.r.t. student logits (T = 1): (p - q scattered) / N.
    q = torch.zeros(3, 6).scatter(1, ids, values.softmax(-1))
    torch.testing.assert_close(student.grad, (student.detach().softmax(-1) - q) / 3)


def test_topk_kd_validation_and_empty():
    with pytest.raises(ValueError, match="temperature"):
        topk_distillation_loss(torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="teacher_topk"):
        topk_distillation_loss(torch.zeros(2, 3), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long))
    empty = topk_distillation_loss(torch.zeros(0, 3), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long))
    assert empty.item() == 0


def test_masked_token_mean_ce_and_objective():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 5, generator=g)
    labels = torch.randint(0, 5, (6,), generator=g)
    ce = masked_token_mean_ce(logits, labels)
    torch.testing.assert_close(ce, F.cross_entropy(logits, labels))
    # A global token count (gradient accumulation) replaces N in the denominator.
    torch.testing.assert_close(masked_token_mean_ce(logits, labels, num_tokens=12), ce / 2)
    assert masked_token_mean_ce(logits.bfloat16(), labels).dtype == torch.float32
    assert masked_token_mean_ce(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).item() == 0
    # Hand case: logits [0, ln3] label 1 -> ln(4/3) = 0.287682.
    assert masked_token_mean_ce(torch.tensor([[0.0, LN3]]), torch.tensor([1])).item() == pytest.approx(0.287682, 1e-5)
    # SWD: 1.0 * CE + 0.5 * KD.
    assert distillation_objective(torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(3.5)
    assert distillation_objective(torch.tensor(2.0), torch.tensor(3.0), 0.5, 1.0).item() == pytest.approx(4.0)
