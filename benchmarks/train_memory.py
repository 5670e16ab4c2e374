"""Peak memory and step time of one block-diffusion training step: packed layout vs the duplicated "vanilla 2L" one.

Layouts compared (DESIGN 3.1), all forward + backward of one sample with the loss at the same supervised positions:

- ``packed+selective``: our row ``[prefix ; x0 ; xt]`` (length P + 2R), LM head only at the corrupted xt positions
  (`BardVLForConditionalGeneration(..., logits_mask=...)`) and the PBM loss (`block_merge_loss`);
- ``packed+fused``: the same with TRL's fused LM head (`use_fused_lm_head`, `trl.trainer.utils.add_fused_lm_head`):
  per-position log-probabilities from ``[tokens, 32768]`` vocabulary tiles, never the ``[N, vocab]`` logits. On CPU
  (no Triton) TRL scores every position of the row and masks afterwards; on CUDA only the supervised ones;
- ``vanilla 2L``: the prompt duplicated, ``[Q, x0] + [Q, xt]`` (length 2(P + R)) under an equivalent dense 4-D mask,
  with the full-sequence logits ``[2(P + R), vocab]`` and a masked cross-entropy, as a stock HF forward computes them;
- ``AR SFT (full logits)``: a plain autoregressive step on ``[Q, x0]`` (length P + R), causal mask, full logits and
  the shifted cross-entropy on the response (HF's default causal-LM loss);
- ``AR SFT (response head)``: the same with the LM head only at the response positions.

Memory: the peak of live CPU allocations made during the step, from `torch.profiler` with `profile_memory=True`
(every allocation and free of the step is replayed in time order; weights allocated before the step are not counted,
weight gradients are). Time: median wall time of `--repeats` steps after one warm-up, without the profiler.

The model is a Qwen3-VL architecture with a Qwen-sized vocabulary (151,936 rows) but a tiny hidden size, so it runs
on a laptop CPU; the layout-dependent costs (sequence length, attention mask, logits) are what the table shows.

    python benchmarks/train_memory.py                       # default lengths
    python benchmarks/train_memory.py --lengths 256:64 2048:256 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from trl.trainer.utils import add_fused_lm_head

from transformers_bard import BardVLConfig, BardVLForConditionalGeneration
from transformers_bard.models.bard_vl.masking_bard_vl import packed_segment_ids
from transformers_bard.noise import MixedNoiseScheduler
from transformers_bard.trainer.block_merge_trainer import fused_lm_head_inputs
from transformers_bard.trainer.losses import block_merge_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import peak_memory  # noqa: E402  (the sibling benchmark: one memory probe for both)

QWEN_VOCAB = 151_936
MASK_ID = 151_671


def build_model(vocab: int, hidden: int, layers: int) -> BardVLForConditionalGeneration:
    config = BardVLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [hidden // 16, hidden // 32, hidden // 32],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=151_655,
        video_token_id=151_656,
        vision_start_token_id=151_652,
        vision_end_token_id=151_653,
        block_size=4,
        mask_token_id=MASK_ID,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return BardVLForConditionalGeneration(config).train()


def make_sample(P: int, R: int, B: int, vocab: int, seed: int = 0):
    """Random prompt [P] and response [R] ids, the noised response and the corrupted positions (mask prior)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 150_000, (P,), generator=gen)
    x0 = torch.randint(0, 150_000, (1, R), generator=gen)
    noise = MixedNoiseScheduler().add_noise(x0, torch.ones(1, R, dtype=torch.bool), B, MASK_ID, generator=gen)
    return prompt, x0[0], noise


# ---------------------------------------------------------------------- the steps
def packed_step(model, prompt, x0, noise, B, fused=False):
    P, R = len(prompt), len(x0)
    input_ids = torch.cat([prompt, x0, noise.noisy_input_ids[0]])[None]  # [1, P + 2R]
    segment_ids = packed_segment_ids(torch.ones(1, P), torch.ones(1, R))
    logits_mask = torch.zeros_like(segment_ids, dtype=torch.bool)
    logits_mask[:, P + R :] = noise.corrupted
    labels = torch.full_like(input_ids, -100)
    labels[logits_mask] = x0[noise.corrupted[0]]
    rates = torch.zeros(1, P + 2 * R)
    rates[:, P + R :] = noise.rates
    eos = torch.zeros_like(logits_mask)
    lengths = torch.tensor([R])
    inputs = {"input_ids": input_ids, "segment_ids": segment_ids, "logits_mask": logits_mask}
    if not fused:
        out = model(**inputs, use_cache=False)
        loss, _ = block_merge_loss(labels, logits_mask, rates, eos, lengths, 1, logits=out.logits)
    else:
        out = model(**fused_lm_head_inputs(model, inputs, labels), fused_lm_head=True)
        ce, correct = -out.log_probs[logits_mask], out.is_top1[logits_mask]
        loss, _ = block_merge_loss(labels, logits_mask, rates, eos, lengths, 1, ce=ce, correct=correct)
    loss.backward()


def vanilla_mask_and_positions(P: int, R: int, B: int):
    """Dense ``[1, 1, 2L, 2L]`` mask and ``[3, 1, 2L]`` positions of ``[Q, x0, Q', xt]`` (L = P + R).

    The visibility of the packed row with the prompt stored twice: [Q, x0] block-causal over itself; Q' block-causal
    over itself; a noisy block b sees all of Q', the clean blocks < b of the first half and its own noisy block.
    """
    L = P + R
    index = torch.arange(L)
    block = torch.where(index < P, index // B, -(-P // B) + (index - P) // B).repeat(2)  # [2L]
    second = torch.arange(2 * L) >= L  # [2L], the [Q', xt] half
    response = (index >= P).repeat(2)  # [2L], x0 or xt
    q_block, k_block = block[:, None], block[None, :]
    q_second, k_second = second[:, None], second[None, :]
    q_response, k_response = response[:, None], response[None, :]
    first_half = ~q_second & ~k_second & (k_block <= q_block)
    prompt_copy = q_second & ~q_response & k_second & ~k_response & (k_block <= q_block)
    noisy = (
        q_second
        & q_response
        & (
            (k_second & ~k_response)
            | (~k_second & k_response & (k_block < q_block))
            | (k_second & k_response & (k_block == q_block))
        )
    )
    mask = (first_half | prompt_copy | noisy)[None, None]
    positions = torch.arange(L).repeat(2)[None, None].expand(3, 1, 2 * L)
    return mask, positions


def vanilla_step(model, prompt, x0, noise, B):
    P, R = len(prompt), len(x0)
    input_ids = torch.cat([prompt, x0, prompt, noise.noisy_input_ids[0]])[None]  # [1, 2(P + R)]
    mask, pos = vanilla_mask_and_positions(P, R, B)
    labels = torch.full_like(input_ids, -100)
    labels[0, 2 * P + R :][noise.corrupted[0]] = x0[noise.corrupted[0]]
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), reduction="none")  # [2L]
    weights = torch.zeros_like(ce)
    weights[labels.view(-1) != -100] = 1.0 / (noise.rates[noise.corrupted] * R)
    (ce * weights).sum().backward()


def ar_step(model, prompt, x0, response_head_only=False):
    P, R = len(prompt), len(x0)
    input_ids = torch.cat([prompt, x0])[None]  # [1, P + R], causal mask by default
    targets = torch.full_like(input_ids, -100)
    targets[0, P - 1 : P + R - 1] = x0  # next-token targets: logit at i predicts token i + 1
    if response_head_only:
        keep = targets != -100
        logits = model(input_ids=input_ids, logits_mask=keep, use_cache=False).logits  # [R, V]
        loss = F.cross_entropy(logits.float(), targets[keep])
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits  # [1, P + R, V]
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
    loss.backward()


# ---------------------------------------------------------------------- measurement
def peak_step_memory(model, step) -> int:
    """Peak bytes of live allocations during `step()` (allocations before it, e.g. the weights, excluded)."""
    model.zero_grad(set_to_none=True)
    return peak_memory(step)


def step_time(model, step, repeats: int) -> float:
    times = []
    for index in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        if index:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--lengths",
        nargs="+",
        default=["128:32", "512:128", "1024:256"],
        help="prompt:response lengths P:R (the response is a multiple of the block size)",
    )
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    cli = parser.parse_args(argv)
    if cli.threads:
        torch.set_num_threads(cli.threads)

    model = build_model(cli.vocab, cli.hidden, cli.layers)
    fused = build_model(cli.vocab, cli.hidden, cli.layers)
    add_fused_lm_head(fused, outputs=("log_probs", "is_top1"))
    B = cli.block_size
    print(
        f"vocab {cli.vocab:,}, hidden {cli.hidden}, {cli.layers} layers, block size {B}, fp32, CPU, "
        f"{torch.get_num_threads()} threads; batch 1; peak = live allocations during forward + backward\n"
    )
    grad_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        f"weight gradients, allocated by every step alike: {grad_mb:,.0f} MB (dense embedding + LM head at this "
        "vocabulary); 'excl. grads' subtracts them\n"
    )
    header = (
        "| P | R | layout | tokens | supervised | peak MB | peak excl. grads MB | step ms | peak / AR full "
        "| peak / AR head | time / AR full |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for spec in cli.lengths:
        P, R = (int(x) for x in spec.split(":"))
        if R % B:
            raise SystemExit(f"response length {R} must be a multiple of the block size {B}")
        results = measure(model, fused, P, R, B, cli)
        ar_full, ar_head = results["AR SFT (full logits)"], results["AR SFT (response head)"]
        for name, (peak, seconds, tokens, supervised) in results.items():
            print(
                f"| {P} | {R} | {name} | {tokens} | {supervised} | {peak / 2**20:,.0f} "
                f"| {peak / 2**20 - grad_mb:,.0f} | {seconds * 1e3:,.0f} "
                f"| {peak / ar_full[0]:.2f} | {peak / ar_head[0]:.2f} | {seconds / ar_full[1]:.2f} |"
            )


def measure(model, fused, P: int, R: int, B: int, cli) -> dict[str, tuple[int, float, int, int]]:
    """{layout: (peak bytes, median step seconds, tokens per row, supervised positions)} for one P:R."""
    prompt, x0, noise = make_sample(P, R, B, cli.vocab)
    n = int(noise.corrupted.sum())
    runs = {
        "AR SFT (full logits)": (model, lambda: ar_step(model, prompt, x0), P + R, R),
        "AR SFT (response head)": (model, lambda: ar_step(model, prompt, x0, True), P + R, R),
        "vanilla 2L (full logits)": (model, lambda: vanilla_step(model, prompt, x0, noise, B), 2 * (P + R), n),
        "packed + selective head": (model, lambda: packed_step(model, prompt, x0, noise, B), P + 2 * R, n),
        "packed + fused head (TRL)": (fused, lambda: packed_step(fused, prompt, x0, noise, B, True), P + 2 * R, n),
    }
    return {
        name: (peak_step_memory(net, step), step_time(net, step, cli.repeats), tokens, supervised)
        for name, (net, step, tokens, supervised) in runs.items()
    }


if __name__ == "__main__":
    main()
