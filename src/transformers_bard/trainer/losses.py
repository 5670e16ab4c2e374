"""Loss functions of block-merging training and stage-wise distillation (DESIGN 3.4, 3.6).

Pure torch, no model or trainer: the trainers gather the supervised positions, run the LM head there, and call these.
Every cross-entropy is computed in fp32. Shapes: N supervised positions, V vocabulary, H hidden size, k top-k ids.

The SWD objective (DESIGN 3.6) is `distillation_objective(masked_token_mean_ce(...), topk_distillation_loss(...))`,
i.e. 1.0 * CE + 0.5 * KD by default.
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
    weights = block_diffusion_weights(rates, sample_index, response_lengths, is_eos_padding, min_rate)  # [N]
    if isinstance(num_samples, torch.Tensor):
        num_samples = num_samples.to(device=ce.device, dtype=torch.float32)
    loss = (ce * weights).sum() / num_samples
    with torch.no_grad():
        stats = {
            "ce_sum": ce.detach().sum(),
            "num_tokens": torch.tensor(num_positions, device=ce.device),
            "num_correct": (logits.detach().argmax(dim=-1) == labels).sum(),
        }
    return loss, stats


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """CE(hidden @ weight.T, labels) per position, computed chunk by chunk in forward and backward.

    Only `[chunk, V]` logits exist at any time; the backward recomputes them from the saved inputs and the saved
    log-sum-exp `[N]`, using d CE / d logits = softmax(logits) - onehot(label).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        num_positions = hidden.shape[0]
        ce = torch.empty(num_positions, dtype=torch.float32, device=hidden.device)  # [N]
        lse = torch.empty_like(ce)  # [N]
        correct = torch.empty(num_positions, dtype=torch.bool, device=hidden.device)  # [N]
        for start in range(0, num_positions, chunk_size):
            stop = min(start + chunk_size, num_positions)
            logits = (hidden[start:stop] @ weight.T).float()  # [chunk, V]
            chunk_lse = torch.logsumexp(logits, dim=-1)  # [chunk]
            target = logits.gather(1, labels[start:stop, None]).squeeze(1)  # [chunk]
            ce[start:stop] = chunk_lse - target
            lse[start:stop] = chunk_lse
            correct[start:stop] = logits.argmax(dim=-1) == labels[start:stop]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(correct)
        return ce, correct

    @staticmethod
    def backward(ctx, grad_ce, grad_correct):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulate the weight gradient in fp32 across chunks, cast once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            chunk = hidden[start:stop]  # [chunk, H]
            probs = torch.exp((chunk @ weight.T).float() - lse[start:stop, None])  # [chunk, V]
            rows = torch.arange(stop - start, device=hidden.device)
            probs[rows, labels[start:stop]] -= 1.0
            grad_logits = probs * grad_ce[start:stop, None].float()  # [chunk, V]
            if need_hidden:
                grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T @ chunk.float()  # [V, H]
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.LongTensor,
    chunk_size: int = 1024,
    return_correct: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.BoolTensor]:
    """Memory-friendly LM head + cross-entropy: CE_i = logsumexp(h_i W^T) - (h_i W^T)[y_i] (DESIGN 1, item 4).

    Equal in value and gradient (w.r.t. `hidden` and `weight`) to
    `F.cross_entropy((hidden @ weight.T).float(), labels, reduction="none")`, but neither forward nor backward ever
    holds more than `[chunk_size, V]` logits: with V ~ 152k a full `[N, V]` fp32 logit matrix is the largest tensor of
    a training step.

    Args:
        hidden: `[N, H]` final hidden states at the supervised positions.
        weight: `[V, H]` LM-head weight (no bias: Qwen3-VL's head has none).
        labels: `[N]` target ids.
        chunk_size: positions per chunk.
        return_correct: also return `[N]` bool flags, True where the argmax equals the label (for accuracy logging).

    Returns:
        `[N]` fp32 CE, or `(ce, correct)`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"`hidden` must be [N, H] and `weight` [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}."
        )
    _check_positions("labels", labels, hidden.shape[0])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an integer >= 1, got {chunk_size!r}.")
    ce, correct = _ChunkedLinearCrossEntropy.apply(hidden, weight, labels.long(), chunk_size)
    return (ce, correct) if return_correct else ce


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


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.LongTensor,
    temperature: float = 1.0,
    reverse: bool = False,
) -> torch.Tensor:
    """Top-k knowledge distillation of SWD (DESIGN 3.6), in fp32.

    q_j = softmax_j(teacher_topk_logits / T): the teacher renormalised over its k ids. Per position:

    - forward (default): KD_i = -sum_j q_j log p_j, with log p = log_softmax(student_logits / T) over the FULL
      vocabulary, gathered at the k ids. This is the cross-entropy of q against the student; it differs from
      KL(q || p) by q's entropy, a constant of the teacher, so the gradient is that of the forward KL.
    - `reverse=True`: KD_i = sum_j p~_j (log p~_j - log q_j), the reverse KL restricted to the k ids, where
      p~_j = softmax_j(student_logits[ids] / T) is the student renormalised over the same k ids.

    The loss is the mean of KD_i over the N positions (0 when N = 0). It is NOT multiplied by T^2 (Hinton's gradient
    rescaling): DESIGN 3.6 writes the loss without it and uses T = 1, where both agree; a caller training at T != 1 who
    wants Hinton's scaling multiplies by T**2 itself.

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
    return per_position.sum() / max(per_position.shape[0], 1)


def distillation_objective(
    ce: torch.Tensor, kd: torch.Tensor, ce_weight: float = 1.0, kd_weight: float = 0.5
) -> torch.Tensor:
    """SWD loss (DESIGN 3.6): ce_weight * CE + kd_weight * KD, paper weights 1.0 and 0.5."""
    return ce_weight * ce + kd_weight * kd
