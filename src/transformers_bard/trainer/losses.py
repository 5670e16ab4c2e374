"""Loss functions of block-merging training and stage-wise distillation (DESIGN 3.4, 3.6).

Pure torch, no model or trainer: the trainers run the LM head at the supervised positions and call these. Every
cross-entropy is computed in fp32. Shapes: N supervised positions, V vocabulary, k top-k ids.

- PBM (DESIGN 3.4): `block_merge_loss` (a packed batch) -> `weighted_block_diffusion_loss` (the one reduction), fed
  either by `[N, V]` logits (`block_diffusion_loss`) or by the per-position log-probabilities of TRL's fused LM head.
- SWD (DESIGN 3.6): `swd_loss` = `distillation_objective(CE, KD)` from per-position cross-entropies and
  `topk_distillation_per_position`, i.e. 1.0 * CE + 0.5 * KD by default, normalised by the masked positions of the
  optimizer step (or per sample, then by the step's samples). `masked_token_mean_ce` and `topk_distillation_loss` are
  the token means of the two terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_positions(name: str, tensor: torch.Tensor, num_positions: int) -> None:
    if tensor.dim() != 1 or tensor.shape[0] != num_positions:
        raise ValueError(f"`{name}` must be 1-D with N={num_positions} entries, got shape {tuple(tensor.shape)}.")


def block_diffusion_weights(
    rates: torch.Tensor,
    sample_index: torch.LongTensor,
    response_lengths: torch.Tensor,
    is_eos_padding: torch.BoolTensor,
    min_rate: float | None = None,
) -> torch.Tensor:
    """Per-position weights of the PBM loss (DESIGN 3.4): w_i = 1 / (R_s(i) * t_i').

    t_i' = max(t_i, min_rate) * (2 if i is EOS padding past the real end else 1). The clamp applies to the block rate
    itself and the doubling comes after, so an EOS-padding position always weighs exactly half of a real position of
    the same block, clamped or not.

    Args:
        rates: `[N]` rate t of each position's block.
        sample_index: `[N]` sample of the batch each position belongs to.
        response_lengths: `[batch]` padded response length R_s of each sample.
        is_eos_padding: `[N]` bool, True for EOS padding past the real end of the response.
        min_rate: optional lower clamp of t (guards 1/t when rates can be ~0).

    Returns:
        `[N]` fp32 weights.
    """
    rates = rates.float()
    if min_rate is not None:
        rates = rates.clamp(min=min_rate)
    rates = torch.where(is_eos_padding.bool(), 2.0 * rates, rates)  # [N]
    lengths = response_lengths.to(rates.device).float()[sample_index]  # [N], R_s of each position's sample
    return 1.0 / (rates * lengths)


def block_diffusion_loss(
    logits: torch.Tensor,
    labels: torch.LongTensor,
    rates: torch.Tensor,
    sample_index: torch.LongTensor,
    response_lengths: torch.Tensor,
    is_eos_padding: torch.BoolTensor,
    num_samples: int | torch.Tensor,
    min_rate: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ELBO-weighted masked cross-entropy of progressive block merging (DESIGN 3.4).

    For sample s with padded response length R_s, L_s = (1 / R_s) * sum over its corrupted positions i of CE_i / t_i'
    (t_i' as in `block_diffusion_weights`: clamped by `min_rate`, then doubled for EOS padding), and

        loss = sum_s L_s / num_samples.

    `num_samples` counts the samples of the whole optimizer step (all gradient-accumulation micro-batches and all
    data-parallel ranks), so summing the gradients of the micro-batches gives the gradient of the full-batch mean,
    independent of how samples are split.

    Args:
        logits: `[N, V]` logits at the corrupted positions only.
        labels: `[N]` clean token at each position.
        rates, sample_index, response_lengths, is_eos_padding, min_rate: see `block_diffusion_weights`.
        num_samples: number of samples in the optimizer step (int or scalar tensor).

    Returns:
        `(loss, stats)`: the scalar fp32 loss and detached logging sums: `ce_sum` (unweighted CE summed over
        positions), `num_tokens` (N) and `num_correct` (positions whose argmax equals the label).
    """
    if logits.dim() != 2:
        raise ValueError(f"`logits` must be 2-D [N, V], got shape {tuple(logits.shape)}.")
    num_positions = logits.shape[0]
    for name, tensor in (
        ("labels", labels),
        ("rates", rates),
        ("sample_index", sample_index),
        ("is_eos_padding", is_eos_padding),
    ):
        _check_positions(name, tensor, num_positions)
    if isinstance(num_samples, int) and (isinstance(num_samples, bool) or num_samples < 1):
        raise ValueError(f"`num_samples` must be >= 1 (samples in the optimizer step), got {num_samples!r}.")

    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # [N]
    correct = logits.detach().argmax(dim=-1) == labels  # [N]
    return weighted_block_diffusion_loss(
        ce, correct, rates, sample_index, response_lengths, is_eos_padding, num_samples, min_rate
    )


def weighted_block_diffusion_loss(
    ce: torch.Tensor,
    correct: torch.BoolTensor,
    rates: torch.Tensor,
    sample_index: torch.LongTensor,
    response_lengths: torch.Tensor,
    is_eos_padding: torch.BoolTensor,
    num_samples: int | torch.Tensor,
    min_rate: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reduction of the PBM loss (DESIGN 3.4) from per-position cross-entropies: sum_i w_i CE_i / num_samples.

    The one code path of the PBM loss: `block_diffusion_loss` feeds it the CE of `[N, V]` logits, and
    `block_merge_loss` either that or `-log_probs` of TRL's fused LM head (which never builds the logits).

    Args:
        ce: `[N]` cross-entropy of each supervised position (any float dtype; reduced in fp32).
        correct: `[N]` bool, argmax == label (for the accuracy metric).
        rates, sample_index, response_lengths, is_eos_padding, min_rate: see `block_diffusion_weights`.
        num_samples: number of samples in the optimizer step (int or scalar tensor).

    Returns:
        `(loss, stats)` as `block_diffusion_loss`.
    """
    weights = block_diffusion_weights(rates, sample_index, response_lengths, is_eos_padding, min_rate)  # [N]
    if isinstance(num_samples, torch.Tensor):
        num_samples = num_samples.to(device=ce.device, dtype=torch.float32)
    loss = (ce.float() * weights).sum() / num_samples
    stats = {
        "ce_sum": ce.detach().float().sum(),
        "num_tokens": torch.tensor(ce.shape[0], device=ce.device),
        "num_correct": correct.detach().sum(),
    }
    return loss, stats


def block_merge_loss(
    labels: torch.LongTensor,
    logits_mask: torch.BoolTensor,
    rates: torch.Tensor,
    is_eos_padding: torch.BoolTensor,
    response_lengths: torch.LongTensor,
    num_samples: int | torch.Tensor,
    logits: torch.Tensor | None = None,
    ce: torch.Tensor | None = None,
    correct: torch.BoolTensor | None = None,
    min_rate: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PBM loss of a packed batch (DESIGN 3.4), from the selected logits or from per-position cross-entropies.

    Args:
        labels, rates, is_eos_padding: ``[b, L]`` collator outputs (clean token / block rate / EOS-padding flag).
        logits_mask: ``[b, L]`` supervised (corrupted xt) positions; its N True entries, row-major, are the rows of
            `logits` (and the entries of `ce` / `correct`).
        response_lengths: ``[b]`` padded response length R_s of each sample.
        num_samples: samples in the whole optimizer step (all micro-batches, all ranks).
        logits: ``[N, V]`` from `model(..., logits_mask=...)`; or
        ce, correct: ``[N]`` cross-entropies and argmax hits (e.g. ``-log_probs`` and ``is_top1`` of TRL's fused LM
            head at the same positions).
        min_rate: optional clamp of t in 1/t.

    Returns:
        `(loss, stats)` as `block_diffusion_loss`: the fp32 loss and detached `ce_sum`, `num_tokens`,
        `num_correct`.
    """
    logits_mask = logits_mask.bool()
    targets = labels[logits_mask]  # [N]
    position_rates = rates[logits_mask]  # [N]
    position_eos = is_eos_padding[logits_mask].bool()  # [N]
    sample_index = logits_mask.nonzero()[:, 0]  # [N], row of each supervised position
    if logits is not None:
        return block_diffusion_loss(
            logits, targets, position_rates, sample_index, response_lengths, position_eos, num_samples, min_rate
        )
    if ce is None or correct is None:
        raise ValueError("Pass `logits`, or the per-position `ce` and `correct` (e.g. of the fused LM head).")
    _check_positions("ce", ce, targets.shape[0])
    return weighted_block_diffusion_loss(
        ce, correct, position_rates, sample_index, response_lengths, position_eos, num_samples, min_rate
    )


def masked_token_mean_ce(
    logits: torch.Tensor, labels: torch.LongTensor, num_tokens: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Plain token-mean cross-entropy in fp32, no 1/t weight (SWD's CE term, DESIGN 3.6).

    CE = sum_i CE(logits_i, labels_i) / num_tokens, with `num_tokens` = N by default. Pass the number of supervised
    positions of the whole optimizer step to make gradient accumulation match one large batch. Zero when N = 0.

    Args:
        logits: `[N, V]`.
        labels: `[N]`.
        num_tokens: optional denominator (int or scalar tensor).
    """
    if logits.dim() != 2:
        raise ValueError(f"`logits` must be 2-D [N, V], got shape {tuple(logits.shape)}.")
    _check_positions("labels", labels, logits.shape[0])
    total = F.cross_entropy(logits.float(), labels, reduction="sum")
    if num_tokens is None:
        num_tokens = max(logits.shape[0], 1)
    return total / num_tokens


def teacher_topk(logits: torch.Tensor, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k teacher logits for SWD (DESIGN 3.6, k = 16).

    Args:
        logits: `[N, V]` teacher logits.
        k: number of ids kept.

    Returns:
        `(values, ids)`: `[N, k]` detached fp32 logits and `[N, k]` their vocabulary ids, largest first.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"`k` must be an integer in [1, V={logits.shape[-1]}], got {k!r}. DESIGN 3.6 uses k=16.")
    values, ids = torch.topk(logits.detach(), k, dim=-1)
    return values.float(), ids


def topk_distillation_per_position(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.LongTensor,
    temperature: float = 1.0,
    reverse: bool = False,
) -> torch.Tensor:
    """Top-k knowledge distillation of SWD (DESIGN 3.6) at each position, in fp32: `[N]`.

    q_j = softmax_j(teacher_topk_logits / T): the teacher renormalised over its k ids. Per position:

    - forward (default): KD_i = -sum_j q_j log p_j, with log p = log_softmax(student_logits / T) over the FULL
      vocabulary, gathered at the k ids. This is the cross-entropy of q against the student; it differs from
      KL(q || p) by q's entropy, a constant of the teacher, so the gradient is that of the forward KL.
    - `reverse=True`: KD_i = sum_j p~_j (log p~_j - log q_j), the reverse KL restricted to the k ids, where
      p~_j = softmax_j(student_logits[ids] / T) is the student renormalised over the same k ids.

    KD_i is NOT multiplied by T^2 (Hinton's gradient rescaling): DESIGN 3.6 writes the loss without it and uses
    T = 1, where both agree; a caller training at T != 1 who wants Hinton's scaling multiplies by T**2 itself.

    Args:
        student_logits: `[N, V]`.
        teacher_topk_logits: `[N, k]` (from `teacher_topk`).
        teacher_topk_ids: `[N, k]` vocabulary ids of those logits.
        temperature: T > 0.
        reverse: use the restricted reverse KL instead of the forward cross-entropy.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"`student_logits` must be 2-D [N, V], got shape {tuple(student_logits.shape)}.")
    if teacher_topk_logits.shape != teacher_topk_ids.shape or teacher_topk_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"`teacher_topk_logits` and `teacher_topk_ids` must both be [N={student_logits.shape[0]}, k], got "
            f"{tuple(teacher_topk_logits.shape)} and {tuple(teacher_topk_ids.shape)}."
        )
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}. DESIGN 3.6 uses 1.0.")
    log_q = torch.log_softmax(teacher_topk_logits.detach().float() / temperature, dim=-1)  # [N, k]
    if reverse:
        student_topk = student_logits.float().gather(1, teacher_topk_ids) / temperature  # [N, k]
        log_p_tilde = torch.log_softmax(student_topk, dim=-1)  # [N, k]
        per_position = (log_p_tilde.exp() * (log_p_tilde - log_q)).sum(dim=-1)  # [N]
    else:
        log_p = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(1, teacher_topk_ids)  # [N, k]
        per_position = -(log_q.exp() * log_p).sum(dim=-1)  # [N]
    return per_position


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.LongTensor,
    temperature: float = 1.0,
    reverse: bool = False,
) -> torch.Tensor:
    """Mean over the N positions of `topk_distillation_per_position` (0 when N = 0)."""
    per_position = topk_distillation_per_position(
        student_logits, teacher_topk_logits, teacher_topk_ids, temperature=temperature, reverse=reverse
    )
    return per_position.sum() / max(per_position.shape[0], 1)


def distillation_objective(
    ce: torch.Tensor, kd: torch.Tensor, ce_weight: float = 1.0, kd_weight: float = 0.5
) -> torch.Tensor:
    """SWD loss (DESIGN 3.6): ce_weight * CE + kd_weight * KD, paper weights 1.0 and 0.5."""
    return ce_weight * ce + kd_weight * kd


def swd_loss(
    student_logits: torch.Tensor,
    labels: torch.LongTensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.LongTensor,
    num_tokens: int | torch.Tensor,
    ce_weight: float = 1.0,
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    reverse: bool = False,
    sample_index: torch.LongTensor | None = None,
    kd_positions: torch.BoolTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SWD loss of one micro-batch (DESIGN 3.6), normalised over the whole optimizer step.

    Per masked position, ell_i = ce_weight * CE_i + kd_weight * KD_i (CE against the clean token, KD as in
    `topk_distillation_per_position`). Two normalisations:

    - per token (the default, `sample_index=None`): loss = sum_i ell_i / num_tokens, where `num_tokens` counts the
      masked positions of the optimizer step (all micro-batches, all ranks). Every masked token weighs the same, so a
      sample with a long response weighs more than a short one.
    - per sample (`sample_index` given): loss = sum_s (1 / n_s) sum_{i in s} ell_i / num_tokens, where n_s counts the
      masked positions of sample s (all of them are in this micro-batch: a sample is never split) and `num_tokens`
      now counts the samples of the step that have at least one masked position. Every sample weighs the same.

    Either way, summing the micro-batches' losses gives the loss of one large batch. With `kd_positions`, KD_i = 0
    where it is False (e.g. EOS padding that the teacher never saw; `DiffusionDistillConfig.kd_on_eos_padding`): those
    positions keep their CE term and still count in the denominators.

    Args:
        student_logits: `[N, V]`.
        labels: `[N]` clean tokens.
        teacher_topk_logits, teacher_topk_ids: `[N, k]` (from `teacher_topk`).
        num_tokens: the step's masked positions, or its samples with `sample_index` (>= 1; int or scalar tensor).
        ce_weight, kd_weight, temperature, reverse: see `distillation_objective`, `topk_distillation_per_position`.
        sample_index: optional `[N]` sample of each position: switches to the per-sample normalisation.
        kd_positions: optional `[N]` bool, the positions that get the KD term (all by default).

    Returns:
        `(loss, sums)`: the fp32 loss and detached fp32 sums `[6]` of this micro-batch: CE, KD (both summed over
        positions, unweighted), positions, argmax hits on the clean token, argmax agreement with the teacher's
        top-1, and the loss's items (positions, or samples with a masked position).
    """
    num_positions = labels.shape[0]
    kd = topk_distillation_per_position(  # validates the logits' shapes
        student_logits, teacher_topk_logits, teacher_topk_ids, temperature=temperature, reverse=reverse
    )  # [N]
    _check_positions("labels", labels, num_positions)
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")  # [N]
    if kd_positions is not None:
        _check_positions("kd_positions", kd_positions, num_positions)
        kd = kd * kd_positions.to(kd.dtype)
    if sample_index is None:
        weights = None
        items = float(num_positions)
    else:
        _check_positions("sample_index", sample_index, num_positions)
        counts = torch.bincount(sample_index)  # [S], masked positions n_s of each sample
        weights = 1.0 / counts.float().clamp(min=1)[sample_index]  # [N], 1 / n_s(i)
        items = (counts > 0).sum().float()
    weighted_ce = ce if weights is None else ce * weights
    weighted_kd = kd if weights is None else kd * weights
    loss = distillation_objective(
        weighted_ce.sum() / num_tokens, weighted_kd.sum() / num_tokens, ce_weight, kd_weight
    )
    with torch.no_grad():
        predicted = student_logits.argmax(dim=-1)  # [N]
        device = student_logits.device
        sums = torch.stack(
            [
                ce.detach().sum(),
                kd.detach().sum(),
                torch.tensor(float(num_positions), device=device),
                (predicted == labels).sum().float(),
                (predicted == teacher_topk_ids[:, 0]).sum().float(),
                torch.as_tensor(items, dtype=torch.float32, device=device),
            ]
        )
    return loss, sums
