"""BardVLGenerationMixin.generate and BardVLGenerationConfig (DESIGN 4, 6).

The central check: `generate` (KV cache, crop after each step, block 0's first step inside the prefill, fused commits,
LM head at masked positions only, EOS fill, left-padded batches whose rows advance independently and leave as they
stop) returns exactly the tokens of a slow reference decoder written here from DESIGN 4, which keeps no cache and
recomputes the whole sequence [prompt ; committed blocks ; current block] with a mask built by loops at every step.
"""

import json
import math

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from transformers_bard import BardVLConfig, BardVLForConditionalGeneration
from transformers_bard.models.bard_vl.generation_bard_vl import (
    BardVLGenerationConfig,
    BardVLGenerationOutput,
    bard_generation_config,
)
from transformers_bard.testing import tiny_qwen3_vl_config

PREFIX, CLEAN, NOISY = "prefix", "clean", "noisy"
MASK = 500  # a spare embedding row of the tiny config (512 rows, 474 tokenizer ids)
TEXT_IDS = 440  # prompts draw ordinary BPE ids below this
PATCH_DIM = 3 * 2 * 16 * 16  # channels * temporal patch * patch * patch
# Scaled LM head: the untrained tiny model then emits confident tokens, so thresholds < 1 unmask several per step.
CONFIDENT = 100.0


def bard_config(block_size=4, prompt_attention="block_causal", mask_token_id=MASK, prediction_shift=False):
    fields = tiny_qwen3_vl_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    config = BardVLConfig(
        **fields, block_size=block_size, mask_token_id=mask_token_id, prompt_attention=prompt_attention,
        prediction_shift=prediction_shift,
    )
    config._attn_implementation = "sdpa"
    return config


_MODELS = {}


def make_model(block_size=4, prompt_attention="block_causal", scale=CONFIDENT, seed=0, prediction_shift=False):
    """A tiny BARD-VL model (cached per arguments: building one costs more than decoding with it)."""
    key = (block_size, prompt_attention, scale, seed, prediction_shift)
    if key not in _MODELS:
        torch.manual_seed(seed)
        config = bard_config(block_size, prompt_attention, prediction_shift=prediction_shift)
        model = BardVLForConditionalGeneration(config).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        _MODELS[key] = model
    model = _MODELS[key]
    model.generation_config = BardVLGenerationConfig(eos_token_id=None, pad_token_id=0)
    return model


def make_prompt(seed, length, with_image):
    """(ids [L], pixel_values [16, PATCH_DIM] or None, image_grid_thw [1, 3] or None); an image is 4 merged tokens."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, TEXT_IDS, (length,), generator=gen)
    if not with_image:
        return text, None, None
    config = tiny_qwen3_vl_config()
    vision = [config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id]
    ids = torch.cat([text[:2], torch.tensor(vision), text[2:]])
    return ids, torch.randn(16, PATCH_DIM, generator=gen), torch.tensor([[1, 4, 4]])


def left_pad(prompts, pad_id=0):
    width = max(len(p[0]) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (prompt_ids, _, _) in enumerate(prompts):
        ids[row, width - len(prompt_ids):] = prompt_ids
        attention[row, width - len(prompt_ids):] = 1
    pixels = [p[1] for p in prompts if p[1] is not None]
    grids = [p[2] for p in prompts if p[2] is not None]
    return ids, attention, (torch.cat(pixels) if pixels else None), (torch.cat(grids) if grids else None)


# ---------------------------------------------------------------------------------------------- slow reference
def reference_mask(segments, blocks, prompt_attention):
    """DESIGN 3.2 by loops: [1, 1, L, L] boolean."""
    length = len(segments)
    mask = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(length):
            qs, ks, qb, kb = segments[q], segments[k], blocks[q], blocks[k]
            if qs == NOISY:
                mask[q, k] = ks == PREFIX or (ks == CLEAN and kb < qb) or (ks == NOISY and kb == qb)
            elif prompt_attention == "causal" and qs == PREFIX and ks == PREFIX:
                mask[q, k] = k <= q
            else:
                mask[q, k] = ks in (PREFIX, CLEAN) and kb <= qb
    return mask[None, None]


def reference_select(block, logits, step, *, B, steps, unmasking, threshold, edit_threshold, eos=None,
                     eos_fill=True, eos_tail=True, unmask_order="left_to_right"):
    """One step of DESIGN 4.2 on one row, greedy (`left_to_right`: the k_s leftmost masked positions and the
    above-tau ones before the first masked one at or below tau; `confidence`: the k_s most confident and every
    above-tau one), then (when `eos` is given) the predicted-EOS tail fill
    (`eos_tail`, `reference_eos_tail`) and EOS fill (DESIGN 4.4): returns the new block (a list)."""
    logits = logits.float().clone()
    logits[:, MASK] = -float("inf")
    confidence, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
    masked = [j for j in range(B) if block[j] == MASK]
    k = B // steps + (1 if step < B % steps else 0)
    ranked = masked if unmask_order == "left_to_right" else sorted(masked, key=lambda j: (-float(confidence[j]), j))
    chosen = set(ranked[:k])
    if unmasking == "threshold" and unmask_order == "left_to_right":
        for j in masked:  # the confident prefix: stop at the first masked position at or below tau
            if confidence[j] <= threshold:
                break
            chosen.add(j)
    elif unmasking == "threshold":
        chosen |= {j for j in masked if confidence[j] > threshold}
    new = list(block)
    for j in chosen:
        new[j] = int(tokens[j])
    if edit_threshold is not None:
        for j in range(B):
            if j not in masked and int(tokens[j]) != block[j] and confidence[j] > edit_threshold:
                new[j] = int(tokens[j])
    if eos is not None and eos_tail:
        new = reference_eos_tail(new, [int(t) for t in tokens], MASK, (eos,))
    if eos is not None and eos_fill and eos in new:
        first = new.index(eos)
        new = new[: first + 1] + [eos] * (B - first - 1)
    return new


@torch.no_grad()
def reference_decode(model, prompt, *, max_new_tokens, steps=None, unmasking="threshold", threshold=0.9,
                     edit_threshold=None, eos=None, eos_fill=True, eos_tail_fill=True, unmask_order="left_to_right"):
    """Tokens of one prompt decoded without a cache, and the number of denoising steps of each block. Under
    `prediction_shift` (DESIGN 4.1) block position j takes the logits of the sequence position before it: the last
    prompt or committed token for j = 0, the block's position j - 1 otherwise."""
    ids, pixels, grid = prompt
    B = model.config.block_size
    steps = steps or B
    P = len(ids)
    mm = (ids == model.config.image_token_id).int()
    prompt_positions, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=mm[None], image_grid_thw=grid)
    start = int(prompt_positions.max()) + 1
    first_block = math.ceil(P / B)
    committed, out, block_steps = [], [], []
    for b in range(math.ceil(max_new_tokens / B)):
        segments = [PREFIX] * P + [CLEAN] * len(committed) + [NOISY] * B
        blocks = [i // B for i in range(P)] + [first_block + j // B for j in range(len(committed))]
        blocks += [first_block + b] * B
        mask = reference_mask(segments, blocks, model.config.prompt_attention)
        response = (start + torch.arange(len(committed) + B))[None, None].expand(3, 1, -1)
        positions = torch.cat([prompt_positions, response], dim=2)
        mm_all = torch.cat([mm, torch.zeros(len(committed) + B, dtype=torch.int)])[None]
        block, step = [MASK] * B, 0
        while MASK in block:
            seq = torch.tensor([ids.tolist() + committed + block])
            logits = model(input_ids=seq, attention_mask=mask, position_ids=positions, pixel_values=pixels,
                           image_grid_thw=grid, mm_token_type_ids=mm_all).logits[0]  # [L, vocab]
            logits = logits[-B - 1: -1] if model.config.prediction_shift else logits[-B:]
            block = reference_select(block, logits, step, B=B, steps=steps, unmasking=unmasking,
                                     threshold=threshold, edit_threshold=edit_threshold,
                                     eos=eos, eos_fill=eos_fill, eos_tail=eos_tail_fill,
                                     unmask_order=unmask_order)
            step += 1
        block_steps.append(step)
        kept = block[: max_new_tokens - b * B]
        if eos is not None and eos in kept:
            out += kept[: kept.index(eos) + 1]
            break
        out += kept
        committed += block
    return out, block_steps


def generated(output, prompt_width, row=0):
    """A row's generated tokens (without padding) of a BardVLGenerationOutput."""
    length = int(output.num_generated_tokens[row])
    return output.sequences[row, prompt_width: prompt_width + length].tolist()


# ---------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("unmask_order", ["left_to_right", "confidence"])
@pytest.mark.parametrize("prediction_shift", [False, True])
@pytest.mark.parametrize("with_image", [False, True])
@pytest.mark.parametrize("prompt_attention", ["block_causal", "causal"])
@pytest.mark.parametrize("unmasking", ["threshold", "static"])
@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_generate_matches_reference(block_size, unmasking, prompt_attention, with_image, prediction_shift,
                                    unmask_order):
    model = make_model(block_size, prompt_attention, prediction_shift=prediction_shift)
    prompt = make_prompt(block_size, 7, with_image)
    # static: S = ceil(B / 3) steps (B = 8: 3, 3, 2 tokens); threshold: tau 0.6, at least one per step
    options = (dict(unmasking="static", steps_per_block=max(1, math.ceil(block_size / 3)))
               if unmasking == "static" else dict(unmasking="threshold", threshold=0.6))
    ids, attention, pixels, grid = left_pad([prompt])
    out = model.generate(ids, attention_mask=attention, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=10,
                         return_dict_in_generate=True, unmask_order=unmask_order, **options)
    expected, block_steps = reference_decode(model, prompt, max_new_tokens=10, steps=options.get("steps_per_block"),
                                             unmasking=unmasking, threshold=options.get("threshold", 0.9),
                                             unmask_order=unmask_order)
    assert generated(out, ids.shape[1]) == expected
    assert out.sequences.shape == (1, ids.shape[1] + 10)
    # fused commits: the forwards are exactly the denoising steps, less the one inside the prefill
    assert out.num_forwards.tolist() == [sum(block_steps) - 1]
    torch.testing.assert_close(out.tokens_per_forward, torch.tensor([10 / (sum(block_steps) - 1)]))


@pytest.mark.parametrize("prediction_shift", [False, True])
def test_revision_and_eos_fill_match_reference(prediction_shift):
    """Revision (edit_threshold) and EOS fill against the slow reference, both prediction settings (DESIGN 4.1,
    4.2, 4.4); the shifted and unshifted heads decode different tokens from the same weights."""
    model = make_model(4, prediction_shift=prediction_shift)
    prompt = make_prompt(40, 6, True)
    ids, attention, pixels, grid = left_pad([prompt])
    free, _ = reference_decode(model, prompt, max_new_tokens=12, threshold=0.6, edit_threshold=0.5)
    eos = free[6]
    out = model.generate(ids, attention_mask=attention, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=12,
                         threshold=0.6, edit_threshold=0.5, eos_token_id=eos, pad_token_id=0,
                         return_dict_in_generate=True)
    expected, block_steps = reference_decode(model, prompt, max_new_tokens=12, threshold=0.6, edit_threshold=0.5,
                                             eos=eos)
    assert generated(out, ids.shape[1]) == expected and out.num_forwards.tolist() == [sum(block_steps) - 1]
    other = make_model(4, prediction_shift=not prediction_shift)
    assert reference_decode(other, prompt, max_new_tokens=12, threshold=0.6, edit_threshold=0.5)[0] != free


def test_thresholds_below_one_decode_several_tokens_per_forward():
    """Guards the tests above: with the confident tiny model, tau < 1 really takes multi-token steps."""
    model = make_model(8)
    ids, attention, _, _ = left_pad([make_prompt(0, 9, False)])
    out = model.generate(ids, max_new_tokens=32, threshold=0.6, return_dict_in_generate=True)
    assert out.tokens_per_forward.item() > 1.5


def test_eos_stops_a_row_and_cuts_after_it():
    model = make_model(4)
    # a prompt and an EOS that its free decoding first emits inside a later block, not at its end: the cut is
    # exercised (searched, so that re-initialised tiny weights do not silently weaken the test)
    for seed in range(9, 40):
        prompt = make_prompt(seed, 8, True)
        free, _ = reference_decode(model, prompt, max_new_tokens=24, threshold=0.6)
        candidates = [t for t in free if 8 <= free.index(t) < 23 and free.index(t) % 4 != 3]
        if candidates:
            break
    eos = candidates[0]
    cut = free.index(eos)
    ids, attention, pixels, grid = left_pad([prompt])
    for eos_fill in (False, True):
        out = model.generate(ids, attention_mask=attention, pixel_values=pixels, image_grid_thw=grid, threshold=0.6,
                             max_new_tokens=24, eos_token_id=[eos, 499], pad_token_id=0, eos_fill=eos_fill,
                             return_dict_in_generate=True)
        expected, block_steps = reference_decode(model, prompt, max_new_tokens=24, threshold=0.6, eos=eos,
                                                 eos_fill=eos_fill)
        if not eos_fill:
            assert expected == free[: cut + 1]
        assert generated(out, ids.shape[1]) == expected
        assert out.sequences.shape[1] == ids.shape[1] + len(expected)  # nothing after EOS in a batch of one
        assert out.num_forwards.item() == sum(block_steps) - 1  # blocks after the stop cost nothing


@pytest.mark.parametrize("unmasking", ["threshold", "static"])
def test_fused_and_unfused_commits_give_identical_tokens(unmasking):
    model = make_model(4)
    prompts = [make_prompt(2, 5, True), make_prompt(3, 9, False)]
    ids, attention, pixels, grid = left_pad(prompts)
    options = dict(max_new_tokens=14, threshold=0.6, unmasking=unmasking, steps_per_block=2,
                   return_dict_in_generate=True, pixel_values=pixels, image_grid_thw=grid, attention_mask=attention)
    fused = model.generate(ids, fuse_commit=True, **options)
    unfused = model.generate(ids, fuse_commit=False, **options)
    assert torch.equal(fused.sequences, unfused.sequences)
    # one forward fewer per committed block: 14 tokens = 4 blocks, the last one is never committed
    assert (unfused.num_forwards - fused.num_forwards).tolist() == [3, 3]


@pytest.mark.parametrize("prediction_shift", [False, True])
@pytest.mark.parametrize("block_size", [4, 8])
def test_threshold_one_costs_block_size_forwards_per_block(block_size, prediction_shift):
    model = make_model(block_size, prediction_shift=prediction_shift)
    ids, attention, _, _ = left_pad([make_prompt(4, 6, False), make_prompt(5, 11, False)])
    blocks = 3
    options = dict(attention_mask=attention, max_new_tokens=blocks * block_size, threshold=1.0,
                   steps_per_block=block_size, return_dict_in_generate=True)
    fused = model.generate(ids, **options)
    unfused = model.generate(ids, fuse_commit=False, **options)
    no_prefill_step = model.generate(ids, prefill_step=False, **options)
    # B forwards per block, less block 0's first step (inside the prefill), plus one per commit when unfused
    assert fused.num_forwards.tolist() == [blocks * block_size - 1] * 2
    assert unfused.num_forwards.tolist() == [blocks * (block_size + 1) - 2] * 2
    assert no_prefill_step.num_forwards.tolist() == [blocks * block_size] * 2
    assert torch.equal(fused.sequences, unfused.sequences) and torch.equal(fused.sequences, no_prefill_step.sequences)


def count_forwards(model, monkeypatch):
    """Patch `model.forward` to count its calls; returns the list that grows by one per call."""
    calls, real_forward = [], model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return calls


@pytest.mark.parametrize("prediction_shift", [False, True])
@pytest.mark.parametrize("fuse_commit", [True, False])
def test_left_padded_batch_matches_single_rows_and_reference(fuse_commit, prediction_shift, monkeypatch):
    """Batch of 3 (two images, different prompt lengths) with one row stopping early: each row equals its own run,
    and rows never wait for each other (DESIGN 4.4): the batch costs as many forwards as its busiest row."""
    model = make_model(4, prediction_shift=prediction_shift)
    others = [make_prompt(11, 12, False), make_prompt(12, 7, True)]
    singles = [reference_decode(model, p, max_new_tokens=20, threshold=0.6)[0] for p in others]
    # a first row that emits, after its first block, a token (the EOS) that the others never emit: it stops early,
    # the others run on (searched, so that re-initialised tiny weights do not silently weaken the test)
    for seed in range(10, 60):
        first = make_prompt(seed, 4, True)
        free = reference_decode(model, first, max_new_tokens=20, threshold=0.6)[0]
        eos = next((t for t in free[4:16] if t not in free[:4] and all(t not in s for s in singles)), None)
        if eos is not None:
            break
    prompts = [first, *others]
    options = dict(max_new_tokens=20, threshold=0.6, return_dict_in_generate=True, eos_token_id=eos, pad_token_id=0,
                   fuse_commit=fuse_commit)
    ids, attention, pixels, grid = left_pad(prompts)
    calls = count_forwards(model, monkeypatch)
    batch = model.generate(ids, attention_mask=attention, pixel_values=pixels, image_grid_thw=grid, **options)
    assert len(calls) == 1 + int(batch.num_forwards.max())  # the prefill, then one forward per step of the busiest
    steps_per_row = []
    for row, prompt in enumerate(prompts):
        expected, block_steps = reference_decode(model, prompt, max_new_tokens=20, threshold=0.6, eos=eos)
        steps_per_row.append(block_steps)
        one_ids, one_attention, one_pixels, one_grid = left_pad([prompt])
        single = model.generate(one_ids, attention_mask=one_attention, pixel_values=one_pixels,
                                image_grid_thw=one_grid, **options)
        commits = 0 if fuse_commit else len(block_steps) - 1
        assert generated(batch, ids.shape[1], row) == generated(single, one_ids.shape[1]) == expected
        assert batch.num_forwards[row] == single.num_forwards[0] == sum(block_steps) - 1 + commits
        assert torch.equal(batch.sequences[row, : ids.shape[1]], ids[row])
        assert (batch.sequences[row, ids.shape[1] + len(expected):] == 0).all()  # pad after the cut
    assert len(generated(batch, ids.shape[1], 0)) < 20 and len(generated(batch, ids.shape[1], 1)) == 20
    # the rows needed different numbers of steps per block, so waiting for each other would have cost forwards
    assert len({tuple(s[:2]) for s in steps_per_row}) > 1


@pytest.mark.slow  # FlexAttention compiles its kernels on first use (about 30 s on 2 CPU cores)
@pytest.mark.parametrize("prediction_shift", [False, True])
def test_flex_attention_generates_the_same_tokens_as_sdpa(prediction_shift, fresh_compile):
    """A left-padded batch with images decoded with `attn_implementation="flex_attention"` (block-sparse BlockMasks
    for the prefill, denoising and fused commit forwards) equals sdpa token for token and forward for forward."""
    model = make_model(4, prediction_shift=prediction_shift)
    prompts = [make_prompt(11, 12, False), make_prompt(12, 7, True), make_prompt(13, 4, True)]
    ids, attention, pixels, grid = left_pad(prompts)
    options = dict(max_new_tokens=20, threshold=0.6, return_dict_in_generate=True, pad_token_id=0)
    want = model.generate(ids, attention_mask=attention, pixel_values=pixels, image_grid_thw=grid, **options)
    model.set_attn_implementation("flex_attention")
    try:
        got = model.generate(ids, attention_mask=attention, pixel_values=pixels, image_grid_thw=grid, **options)
    finally:
        model.set_attn_implementation("sdpa")  # the model is shared with other tests
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.num_forwards, want.num_forwards)
    assert int(want.num_forwards.max()) > 3  # several denoising and commit forwards were compared


# ---------------------------------------------------------------------------------------------- EOS fill
def scripted_forward(model, monkeypatch, script, block_size):
    """Patch `model.forward` so that the k-th call with block logits returns `script[k]` ``[1, B, vocab]``, restricted
    to the positions the call asks logits for; returns the list of those positions per call."""
    asked, real_forward = [], model.forward

    def scripted(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        wanted = kwargs["logits_mask"][0, -block_size:]
        if wanted.any():
            out.logits = script[len(asked)][0, wanted]
            asked.append(wanted.nonzero().squeeze(-1).tolist())
        return out

    monkeypatch.setattr(model, "forward", scripted)
    return asked


def scripted_logits(choices, vocab):
    """Logits [1, B, vocab] giving position j token t with probability p for (t, p) in choices."""
    logits = torch.full((1, len(choices), vocab), -1e4)
    for j, (token, p) in enumerate(choices):
        logits[0, j, :] = math.log((1 - p) / (vocab - 2))
        logits[0, j, token] = math.log(p)
    return logits


def test_eos_fill_fills_after_the_first_eos_and_ends_the_block(monkeypatch):
    """B = 8, one token per step (tau = 1). Step 1 decodes EOS at position 2 (the most confident): positions 3-7
    become EOS at once, and only positions 0 and 1 are left: 3 steps in all (the first inside the prefill) instead of
    8. Steps 2 and 3 ask logits only for the positions still masked. Without EOS fill the block takes 8 steps."""
    model = make_model(8, scale=1.0)
    vocab = model.config.text_config.vocab_size
    EOS = 9
    step = scripted_logits([(5, 0.5), (6, 0.4), (EOS, 0.9)] + [(EOS, 0.8)] * 5, vocab)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    # the most confident position goes first: EOS fill as seen by the confidence order
    options = dict(max_new_tokens=16, threshold=1.0, eos_token_id=EOS, pad_token_id=0, return_dict_in_generate=True,
                   unmask_order="confidence")
    asked = scripted_forward(model, monkeypatch, [step] * 8, 8)
    out = model.generate(ids, output_trace=True, **options)
    assert generated(out, 5) == [5, 6, EOS] and out.num_forwards.tolist() == [2]
    assert asked == [list(range(8)), [0, 1], [1]]
    events = out.trace[0]
    assert [e["eos_filled"] for e in events] == [[3, 4, 5, 6, 7], [], []]
    assert [e["unmasked"][0][:2] for e in events] == [[2, EOS], [0, 5], [1, 6]]
    asked.clear()
    unfilled = model.generate(ids, eos_fill=False, eos_tail_fill=False, **options)
    assert generated(unfilled, 5) == [5, 6, EOS] and unfilled.num_forwards.tolist() == [7]


def test_unmask_order_picks_the_leftmost_or_the_most_confident(monkeypatch):
    """B = 8, no EOS, scripted confidences rising to the right (0.30, 0.38, ..., 0.86); the tokens do not depend on
    the block. At tau = 1 (one token per step) `left_to_right` (the default) unmasks positions 0, 1, ..., 7 and
    `confidence` 7, 6, ..., 0. At tau = 0.5 positions 3-7 clear tau: `confidence` takes them at once, then 2, 1, 0;
    `left_to_right` lets them wait behind the uncertain positions 0-2 (one per step), then takes them at once."""
    model = make_model(8, scale=1.0)
    vocab = model.config.text_config.vocab_size
    step = scripted_logits([(10 + j, 0.3 + 0.08 * j) for j in range(8)], vocab)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    scripted_forward(model, monkeypatch, [step] * 100, 8)  # enough scripted forwards for every call below
    expected = {
        ("left_to_right", 1.0): [[0], [1], [2], [3], [4], [5], [6], [7]],
        ("confidence", 1.0): [[7], [6], [5], [4], [3], [2], [1], [0]],
        ("left_to_right", 0.5): [[0], [1], [2], [3, 4, 5, 6, 7]],
        ("confidence", 0.5): [[3, 4, 5, 6, 7], [2], [1], [0]],
    }
    for (order, tau), steps in expected.items():
        out = model.generate(ids, unmask_order=order, threshold=tau, max_new_tokens=8, return_dict_in_generate=True,
                             output_trace=True)
        assert generated(out, 5) == [10 + j for j in range(8)]
        assert [sorted(p for p, _, _ in e["unmasked"]) for e in out.trace[0]] == steps, (order, tau)


def reference_eos_tail(block, proposals, mask, eos_ids):
    """`eos_tail_fill` by loops: from the end of the block, while the position is EOS (decided, or proposed where
    undecided), fill it with its proposal."""
    block = list(block)
    for j in reversed(range(len(block))):
        token = proposals[j] if block[j] == mask else block[j]
        if token not in eos_ids:
            break
        block[j] = token
    return block


def test_eos_tail_fill_matches_loops():
    """The tail rule on hand-made blocks against `reference_eos_tail`: a tail of proposed EOS is filled; a decided
    non-EOS or a proposed non-EOS stops it; a row that does not step is left alone."""
    from transformers_bard.models.bard_vl.generation_bard_vl import BardVLGenerationMixin

    M, E, F = 500, 9, 10  # mask, EOS, a second EOS id
    blocks = torch.tensor([[M, M, M, M, M, M], [3, M, E, M, M, M], [M, M, 4, M, M, M], [M, M, M, M, M, M],
                           [M, M, M, M, M, 7], [M, M, M, M, M, M]])
    proposals = torch.tensor([[5, E, E, E, E, E], [3, E, E, F, E, E], [E, E, 4, E, E, E], [E, E, E, E, E, E],
                              [E, E, E, E, E, 7], [E, E, 6, E, E, E]])
    stepping = torch.tensor([True, True, True, True, True, False])
    plan = type("Plan", (), {"mask_token_id": M, "eos_token_ids": torch.tensor([E, F])})()
    got, filled = BardVLGenerationMixin._fill_predicted_eos_tail(blocks, proposals, stepping, plan)
    for row in range(len(blocks)):
        want = blocks[row].tolist() if not stepping[row] else reference_eos_tail(
            blocks[row].tolist(), proposals[row].tolist(), M, (E, F))
        assert got[row].tolist() == want, row
        assert filled[row].tolist() == [a != b for a, b in zip(blocks[row].tolist(), want)], row
    assert got[0].tolist() == [M, E, E, E, E, E] and got[3].tolist() == [E] * 6 and got[4].tolist() == blocks[4].tolist()


def test_eos_tail_fill_ends_a_short_answer_in_one_step(monkeypatch):
    """B = 8, one token per step (tau = 1), the far padding the most confident: plain EOS fill commits position 7
    first (nothing after it to fill) and needs 7 forwards after the prompt's; with `eos_tail_fill` the proposed EOS
    tail 2..7 is filled in the prefill step (the default), and positions 0 and 1 take one step each."""
    model = make_model(8, scale=1.0)
    vocab = model.config.text_config.vocab_size
    EOS = 9
    step = scripted_logits([(5, 0.5), (6, 0.4)] + [(EOS, 0.3 + 0.1 * j) for j in range(6)], vocab)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    options = dict(max_new_tokens=16, threshold=1.0, eos_token_id=EOS, pad_token_id=0, return_dict_in_generate=True,
                   unmask_order="confidence")
    asked = scripted_forward(model, monkeypatch, [step] * 8, 8)
    plain = model.generate(ids, eos_tail_fill=False, **options)
    assert generated(plain, 5) == [5, 6, EOS] and plain.num_forwards.tolist() == [7]
    asked.clear()
    tail = model.generate(ids, output_trace=True, **options)  # eos_tail_fill is on by default
    assert generated(tail, 5) == [5, 6, EOS] and tail.num_forwards.tolist() == [2]
    assert asked == [list(range(8)), [0, 1], [1]]
    assert tail.trace[0][0]["eos_filled"] == [2, 3, 4, 5, 6]  # 7 was unmasked by the step itself
    assert replay_trace(tail.trace[0], 8)[:3] == [5, 6, EOS]


# ---------------------------------------------------------------------------------------------- trace
def replay_trace(events, block_size):
    """Rebuild a row's blocks from its trace events (unmasked, then revised, then eos_filled); checks each event's
    `block_tokens` on the way. Returns the concatenated blocks."""
    blocks = {}
    for event in events:
        if event["step"] == -1:  # the prompt alone, or a commit of its own: nothing decided
            continue
        block = blocks.setdefault(event["block"], [MASK] * block_size)
        for position, token, confidence in event["unmasked"]:
            assert block[position] == MASK and 0 < confidence <= 1
            block[position] = token
        for position, old, new, confidence in event["revised"]:
            assert block[position] == old != new and 0 < confidence <= 1
            block[position] = new
        for position in event["eos_filled"]:
            block[position] = event["block_tokens"][position]
        assert block == event["block_tokens"]
    return [token for index in sorted(blocks) for token in blocks[index]]


@pytest.mark.parametrize(
    "options",
    [dict(), dict(fuse_commit=False), dict(prefill_step=False), dict(edit_threshold=0.5), dict(eos_fill=False),
     dict(unmask_order="confidence")],
)
@pytest.mark.parametrize("prediction_shift", [False, True])
def test_trace_agrees_with_sequences_and_forwards(options, prediction_shift):
    model = make_model(4, prediction_shift=prediction_shift)
    # a first row that first emits some token (the EOS) in a later block, so that it stops early (searched, so that
    # re-initialised tiny weights do not silently weaken the test)
    for seed in range(20, 80):
        first = make_prompt(seed, 4, True)
        one_ids, _, one_pixels, one_grid = left_pad([first])
        free = model.generate(one_ids, pixel_values=one_pixels, image_grid_thw=one_grid, max_new_tokens=14,
                              threshold=0.6, **options)[0, one_ids.shape[1]:].tolist()
        cut = next((j for j in range(4, 13) if free[j] not in free[:j]), None)
        if cut is not None:
            break
    eos = free[cut]
    prompts = [first, make_prompt(21, 9, False), make_prompt(22, 6, True)]
    ids, attention, pixels, grid = left_pad(prompts)
    common = dict(attention_mask=attention, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=14,
                  threshold=0.6, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, **options)
    out = model.generate(ids, output_trace=True, **common)
    plain = model.generate(ids, **common)
    assert plain.trace is None
    assert torch.equal(out.sequences, plain.sequences) and torch.equal(out.num_forwards, plain.num_forwards)
    json.dumps(out.trace)  # plain JSON
    for row, events in enumerate(out.trace):
        assert len(events) == int(out.num_forwards[row]) + 1
        assert [e["forward"] for e in events] == list(range(len(events)))
        assert events[0]["kind"] == "prefill" and all(e["kind"] != "prefill" for e in events[1:])
        assert (events[0]["step"] == 0) == options.get("prefill_step", True)
        assert all(e["block_start"] == 4 * e["block"] for e in events)
        tokens = generated(out, ids.shape[1], row)
        replayed = replay_trace(events, 4)
        assert replayed[: len(tokens)] == tokens
        assert (eos in tokens) == (tokens[-1] == eos) and (eos in tokens or len(tokens) == 14)
        # one commit per block after the first; a fused one takes the next block's step 0
        commits = [e["block"] for e in events if e["kind"] == "commit"]
        fused = options.get("fuse_commit", True)
        assert commits == list(range(1, len(replayed) // 4) if fused else range(len(replayed) // 4 - 1))
        steps = [e["step"] for e in events if e["step"] >= 0]
        assert sum(step == 0 for step in steps) == len(replayed) // 4
    assert len(generated(out, ids.shape[1], 0)) == cut + 1
    if "edit_threshold" in options:
        assert any(e["revised"] for events in out.trace for e in events), "revision is exercised"
    if options == dict(unmask_order="confidence"):  # it decodes the EOS before the positions after it
        assert any(e["eos_filled"] for e in out.trace[0]), "EOS fill is exercised"


@pytest.mark.parametrize("prediction_shift", [False, True])
@pytest.mark.parametrize("edit_threshold", [None, 0.5])
def test_lm_head_runs_only_where_a_step_decides(edit_threshold, prediction_shift):
    """Each forward's LM head rows are the block's still-masked positions (all B with revision); the prefill's prompt
    and the committed half of a fused commit get none (DESIGN 4.2, 4.3). Shifted (DESIGN 4.1): position j >= 1 is
    scored at position j - 1, and position 0 only once per block, at the last token of the prompt (prefill) or of the
    committed block (fused commit), so every forward scores its positions 1.. still masked (all but 0 with
    revision), plus one row when it starts a block."""
    model = make_model(8, prediction_shift=prediction_shift)
    ids, attention, _, _ = left_pad([make_prompt(30, 6, False), make_prompt(31, 9, False)])
    rows_per_call = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: rows_per_call.append(args[0].shape[0]))
    try:
        out = model.generate(ids, attention_mask=attention, max_new_tokens=24, threshold=0.6, output_trace=True,
                             edit_threshold=edit_threshold, return_dict_in_generate=True)
    finally:
        handle.remove()
    expected = [0] * len(rows_per_call)
    for events in out.trace:
        masked_before = [MASK] * 8
        for event in events:
            if event["step"] == 0:
                masked_before = [MASK] * 8
            decided = list(range(8)) if edit_threshold is not None else [j for j in range(8) if masked_before[j] == MASK]
            if prediction_shift:
                decided = [j for j in decided if j > 0] + ([0] if event["step"] == 0 else [])
            expected[event["forward"]] += len(decided)
            masked_before = event["block_tokens"]
    assert rows_per_call == expected
    assert edit_threshold is not None or sum(rows_per_call) < 8 * sum(len(events) for events in out.trace)


# ---------------------------------------------------------------------------------------------- revision
def test_revision_replaces_a_decoded_token_with_scripted_logits(monkeypatch):
    """B = 4, one token per step (tau = 1). Step 1 decodes position 0 as token 5; step 2 predicts token 7 there with
    confidence 0.95: replaced when edit_threshold = 0.9, kept without revision or with edit_threshold = 0.99."""
    model = make_model(4, scale=1.0)
    vocab = model.config.text_config.vocab_size
    real_forward = model.forward

    def probabilities(choices):
        """Logits [1, 4, vocab] giving position j token t with probability p for (t, p) in choices."""
        logits = torch.full((1, 4, vocab), -1e4)
        for j, (token, p) in enumerate(choices):
            logits[0, j, :] = math.log((1 - p) / (vocab - 2))
            logits[0, j, token] = math.log(p)
            logits[0, j, MASK] = 50.0  # the mask token is never a candidate, however large its logit
        return logits

    script = [
        probabilities([(5, 0.8), (20, 0.3), (21, 0.3), (22, 0.3)]),  # step 1: position 0 <- 5
        probabilities([(7, 0.95), (20, 0.6), (21, 0.3), (22, 0.3)]),  # step 2: position 1 <- 20; revise 0 -> 7?
        probabilities([(7, 0.5), (20, 0.5), (21, 0.6), (22, 0.3)]),  # step 3: position 2 <- 21
        probabilities([(7, 0.5), (20, 0.5), (21, 0.5), (22, 0.6)]),  # step 4: position 3 <- 22
    ]

    def run(**options):
        calls = []

        def scripted(*args, **kwargs):
            out = real_forward(*args, **kwargs)
            wanted = kwargs["logits_mask"][0, -4:]  # the block's positions that get logits in this step
            if wanted.any():  # a denoising step (the first one inside the prefill)
                out.logits = script[len(calls)][0, wanted]
                calls.append(1)
            return out

        monkeypatch.setattr(model, "forward", scripted)
        ids = torch.tensor([[3, 4, 5, 6, 7]])
        out = model.generate(ids, max_new_tokens=4, threshold=1.0, return_dict_in_generate=True, **options)
        monkeypatch.setattr(model, "forward", real_forward)
        return generated(out, 5), len(calls)

    assert run() == ([5, 20, 21, 22], 4)
    assert run(edit_threshold=0.9) == ([7, 20, 21, 22], 4)
    assert run(edit_threshold=0.99) == ([5, 20, 21, 22], 4)


# ---------------------------------------------------------------------------------------------- hooks
class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("prediction_shift", [False, True])
def test_streamer_receives_prompt_then_blocks(prediction_shift):
    model = make_model(4, prediction_shift=prediction_shift)
    prompt = make_prompt(6, 6, True)
    ids, attention, pixels, grid = left_pad([prompt])
    streamer = CollectingStreamer()
    out = model.generate(ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=10, threshold=0.6,
                         streamer=streamer, return_dict_in_generate=True)
    assert streamer.ended
    assert streamer.chunks[0] == ids[0].tolist()
    assert [len(c) for c in streamer.chunks[1:]] == [4, 4, 2]  # one chunk per finished block, cut at 10
    assert sum(streamer.chunks, []) == out.sequences[0].tolist()


class BanToken(LogitsProcessor):
    def __init__(self, token):
        self.token, self.shapes = token, []

    def __call__(self, input_ids, scores):
        self.shapes.append((tuple(input_ids.shape), tuple(scores.shape)))
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


@pytest.mark.parametrize("prediction_shift", [False, True])
def test_logits_processor_is_applied_to_every_block_position(prediction_shift):
    model = make_model(4, prediction_shift=prediction_shift)
    ids, attention, _, _ = left_pad([make_prompt(7, 5, False), make_prompt(8, 8, False)])
    plain = model.generate(ids, attention_mask=attention, max_new_tokens=8, threshold=0.6)
    banned = int(plain[0, ids.shape[1]:].mode().values)
    processor = BanToken(banned)
    out = model.generate(ids, attention_mask=attention, max_new_tokens=8, threshold=0.6,
                         logits_processor=LogitsProcessorList([processor]))
    assert (plain[:, ids.shape[1]:] == banned).any() and not (out[:, ids.shape[1]:] == banned).any()
    vocab = model.config.text_config.vocab_size
    # every still-masked position of a block is a row; input_ids = prompt (+ finished blocks) per row; the first
    # step (inside the prefill) sees every position of both rows
    assert processor.shapes[0] == ((2 * 4, ids.shape[1]), (2 * 4, vocab))
    assert all(ids_shape[0] == scores_shape[0] for ids_shape, scores_shape in processor.shapes)
    assert {ids_shape[1] for ids_shape, _ in processor.shapes} == {ids.shape[1], ids.shape[1] + 4}


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length, self.seen = length, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(input_ids.shape[1])
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length)


def test_stopping_criteria_are_checked_after_each_block():
    model = make_model(4)
    ids, attention, _, _ = left_pad([make_prompt(9, 6, False)])
    criteria = StopAfter(ids.shape[1] + 8)
    out = model.generate(ids, max_new_tokens=20, threshold=0.6, return_dict_in_generate=True,
                         stopping_criteria=StoppingCriteriaList([criteria]))
    assert criteria.seen == [ids.shape[1] + 4, ids.shape[1] + 8]
    assert out.num_generated_tokens.tolist() == [8]
    assert out.sequences.shape[1] == ids.shape[1] + 8


@pytest.mark.parametrize("prediction_shift", [False, True])
def test_seeded_sampling_is_reproducible(prediction_shift):
    model = make_model(4, scale=1.0, prediction_shift=prediction_shift)
    ids, attention, _, _ = left_pad([make_prompt(13, 6, False), make_prompt(14, 9, False)])
    options = dict(attention_mask=attention, max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
    torch.manual_seed(0)
    first = model.generate(ids, **options)
    torch.manual_seed(0)
    second = model.generate(ids, **options)
    third = model.generate(ids, generator=torch.Generator().manual_seed(0), **options)
    fourth = model.generate(ids, generator=torch.Generator().manual_seed(0), **options)
    other = model.generate(ids, generator=torch.Generator().manual_seed(1), **options)
    assert torch.equal(first, second) and torch.equal(third, fourth)
    assert not torch.equal(third, other)
    greedy = model.generate(ids, attention_mask=attention, max_new_tokens=12)
    assert not torch.equal(first, greedy)


# ---------------------------------------------------------------------------------------------- configuration
def test_generation_config_and_keyword_paths_agree():
    model = make_model(4)
    ids, attention, _, _ = left_pad([make_prompt(15, 6, False)])
    by_kwargs = model.generate(ids, max_new_tokens=9, threshold=0.6, unmasking="static", steps_per_block=2)
    config = BardVLGenerationConfig(max_new_tokens=9, threshold=0.6, unmasking="static", steps_per_block=2)
    by_config = model.generate(ids, generation_config=config)
    assert torch.equal(by_kwargs, by_config)
    # keywords override the config; neither changes the model's own config
    overridden = model.generate(ids, generation_config=config, max_new_tokens=4)
    assert overridden.shape[1] == ids.shape[1] + 4
    assert model.generation_config.max_new_tokens is None and model.generation_config.threshold == 0.9
    # without max_new_tokens, max_length counts the prompt (HF meaning); 7 new tokens = 2 blocks of 4, cut
    assert model.generate(ids, max_length=ids.shape[1] + 7).shape[1] == ids.shape[1] + 7


def test_plain_generation_config_passed_to_generate_keeps_lengths_ids_and_sampling():
    """TRL GKD's call: generate(..., generation_config=GenerationConfig(do_sample=True, ...), return_dict=True)."""
    model = make_model(4)
    model.generation_config = BardVLGenerationConfig(block_size=2, threshold=0.7, eos_token_id=[498], pad_token_id=0)
    gkd = GenerationConfig(max_new_tokens=6, temperature=0.9, do_sample=True, top_k=0, top_p=1.0, use_cache=False,
                           pad_token_id=3)
    resolved, _ = model._resolve_generation_config(gkd, {})
    assert isinstance(resolved, BardVLGenerationConfig)
    assert (resolved.temperature, resolved.top_k, resolved.top_p) == (0.9, None, None)
    assert (resolved.max_new_tokens, resolved.pad_token_id, resolved.eos_token_id) == (6, 3, [498])
    assert (resolved.block_size, resolved.threshold) == (2, 0.7)  # BARD settings stay the model's
    greedy, _ = model._resolve_generation_config(GenerationConfig(do_sample=False, max_new_tokens=5), {})
    assert greedy.temperature == 0.0
    ids, attention, _, _ = left_pad([make_prompt(16, 5, False), make_prompt(17, 8, False)])
    out = model.generate(input_ids=ids, attention_mask=attention, generation_config=gkd, return_dict_in_generate=True)
    assert isinstance(out, BardVLGenerationOutput) and out.sequences.shape[1] <= ids.shape[1] + 6


def test_config_save_load_round_trip(tmp_path):
    config = BardVLGenerationConfig(block_size=8, steps_per_block=4, unmasking="static", threshold=0.8,
                                    edit_threshold=0.95, temperature=0.5, top_k=10, top_p=0.9, fuse_commit=False,
                                    eos_fill=False, prefill_step=False, output_trace=True,
                                    eos_token_id=[1, 2], pad_token_id=0, max_new_tokens=64)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["unmasking"] == "static" and saved["edit_threshold"] == 0.95
    loaded = BardVLGenerationConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BardVLGenerationConfig) and loaded == config
    defaults = BardVLGenerationConfig()
    defaults.save_pretrained(tmp_path / "defaults")
    assert BardVLGenerationConfig.from_pretrained(tmp_path / "defaults") == defaults


def test_model_from_pretrained_loads_a_bard_generation_config(tmp_path):
    model = make_model(4)
    model.generation_config = BardVLGenerationConfig(threshold=0.7, edit_threshold=0.99, eos_token_id=[450, 448],
                                                     pad_token_id=448)
    model.save_pretrained(tmp_path)
    loaded = BardVLForConditionalGeneration.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, BardVLGenerationConfig)
    assert loaded.generation_config == model.generation_config
    # a freshly built model gets a BARD config with the model config's token ids (from_model_config must not fail)
    fresh = BardVLForConditionalGeneration(bard_config())
    assert isinstance(fresh.generation_config, BardVLGenerationConfig)
    assert fresh.generation_config.eos_token_id == tiny_qwen3_vl_config().text_config.eos_token_id


def test_autoregressive_generation_config_file_does_not_carry_over(tmp_path, caplog):
    """Qwen3-VL ships do_sample/temperature 0.7/top-k 20/top-p 0.8: read from a file, only ids and lengths stay."""
    model = make_model(4)
    model.save_pretrained(tmp_path)
    qwen = {"bos_token_id": 448, "do_sample": True, "eos_token_id": [450, 448], "pad_token_id": 448,
            "repetition_penalty": 1.0, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "transformers_version": "4.56.0"}
    (tmp_path / "generation_config.json").write_text(json.dumps(qwen))
    with caplog.at_level("WARNING"):
        loaded = BardVLForConditionalGeneration.from_pretrained(tmp_path)
    config = loaded.generation_config
    assert isinstance(config, BardVLGenerationConfig)
    assert (config.temperature, config.do_sample, config.top_k, config.top_p) == (0.0, None, None, None)
    assert (config.eos_token_id, config.pad_token_id, config.unmasking, config.threshold) == ([450, 448], 448,
                                                                                              "threshold", 0.9)
    assert "temperature" in caplog.text
    # a config given to from_pretrained explicitly is the caller's choice: its sampling is honoured
    explicit = BardVLForConditionalGeneration.from_pretrained(
        tmp_path, generation_config=GenerationConfig(do_sample=True, temperature=0.5, max_new_tokens=7)
    ).generation_config
    assert isinstance(explicit, BardVLGenerationConfig)
    assert (explicit.temperature, explicit.max_new_tokens, explicit.threshold) == (0.5, 7, 0.9)
    # the helper conversion calls writes the BARD defaults of DESIGN 4.6
    written = bard_generation_config(bard_config(block_size=8), qwen)
    assert (written.temperature, written.unmasking, written.threshold, written.block_size) == (0.0, "threshold",
                                                                                               0.9, None)
    assert (written.eos_token_id, written.pad_token_id, written.top_k) == ([450, 448], 448, None)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(output_trace=True), "return_dict_in_generate"),
        (dict(eos_fill="yes"), "eos_fill"),
        (dict(prefill_step=None), "prefill_step"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(steps_per_block=0), "steps_per_block"),
        (dict(steps_per_block=5), r"steps_per_block.*\[1, block_size=4\]"),
        (dict(unmasking="random"), "unmasking"),
        (dict(edit_threshold=2.0), "edit_threshold"),
        (dict(temperature=-1.0), "temperature"),
        (dict(do_sample=True), "do_sample"),
        (dict(top_p=0.0), "top_p"),
        (dict(num_beams=2), "beam search"),
        (dict(penalty_alpha=0.6, top_k=4), "contrastive search"),
        (dict(prompt_lookup_num_tokens=3), "assisted decoding"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(repetition_penalty=1.2), "LogitsProcessor"),
        (dict(assistant_model=object()), "assistant_model"),
        (dict(past_key_values=None, foo=1), "unexpected keyword"),
    ],
)
def test_bad_options_raise(options, match):
    model = make_model(4)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1, 2, 3]]), **options)


def test_config_rejects_autoregressive_options_at_construction():
    with pytest.raises(ValueError, match="num_beams"):
        BardVLGenerationConfig(num_beams=4)
    with pytest.raises(ValueError, match="steps_per_block"):
        BardVLGenerationConfig(block_size=4, steps_per_block=8)
    with pytest.raises(ValueError, match="num_beams"):
        BardVLGenerationConfig.from_generation_config(GenerationConfig(num_beams=3))


def test_bad_inputs_raise():
    model = make_model(4)
    ids, _, pixels, grid = left_pad([make_prompt(18, 5, True)])
    text_only = torch.randint(0, TEXT_IDS, (1, 9))
    with pytest.raises(ValueError, match="no image token"):
        model.generate(text_only, pixel_values=pixels, image_grid_thw=grid)
    with pytest.raises(ValueError, match="pixel_values` is missing"):
        model.generate(ids)
    with pytest.raises(ValueError, match="merged patches"):
        model.generate(ids, pixel_values=torch.cat([pixels, pixels]), image_grid_thw=torch.tensor([[1, 4, 8]]))
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(torch.ones(2, 4, dtype=torch.long), streamer=CollectingStreamer())
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(None)
    no_mask = BardVLForConditionalGeneration(bard_config(mask_token_id=None)).eval()
    with pytest.raises(ValueError, match="mask_token_id"):
        no_mask.generate(text_only)


# ---------------------------------------------------------------------------------------------- processor
def test_processor_batch_with_images(tiny_qwen3_vl_dir):
    """The README path: processor outputs (left-padded batch, images of two sizes) go straight into generate."""
    from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
    from transformers_bard.testing import make_image, tiny_chat_messages

    processor = BardVLProcessor.from_pretrained(tiny_qwen3_vl_dir)
    processor.tokenizer.padding_side = "left"
    conversations = [
        tiny_chat_messages([make_image(0, (64, 64))], turns=(("What is in the image?", None),)),
        tiny_chat_messages([make_image(1, (32, 64))], turns=(("Describe it in detail, please.", None),)),
    ]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", padding=True)
    model = make_model(4)
    out = model.generate(**inputs, max_new_tokens=8, threshold=0.6, return_dict_in_generate=True)
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        grid = inputs["image_grid_thw"][row: row + 1]
        patches = inputs["image_grid_thw"].prod(-1).tolist()
        start = sum(patches[:row])
        single = model.generate(inputs["input_ids"][row: row + 1, real], image_grid_thw=grid,
                                pixel_values=inputs["pixel_values"][start: start + patches[row]],
                                max_new_tokens=8, threshold=0.6, return_dict_in_generate=True)
        assert generated(out, width, row) == generated(single, int(real.sum()))


# ---------------------------------------------------------------------------------------------- a trained model
@pytest.mark.slow
def test_eos_fill_leaves_the_output_of_a_trained_model_unchanged(trained_digits_b8):
    """EOS fill is exact only for a model that learned EOS padding (DESIGN 3.1, 4.4), so check it on one: the shipped
    digits AR model converted to B = 8 and trained with block merging for 30 steps (conftest's `trained_digits_b8`).
    Outputs with and without EOS fill are identical at tau = 1.0 and 0.9, and EOS fill saves forwards."""
    from transformers_bard.demo.digits import build_digits_dataset, prompt_messages

    model, processor = trained_digits_b8
    forwards = {True: 0, False: 0}
    for row in build_digits_dataset("test", 8, seed=1):
        text = processor.apply_chat_template(prompt_messages(row["messages"]), add_generation_prompt=True)
        inputs = processor(images=row["images"], text=[text], return_tensors="pt")
        for threshold in (1.0, 0.9):
            out = {fill: model.generate(**inputs, max_new_tokens=48, threshold=threshold, eos_fill=fill,
                                        eos_tail_fill=False, return_dict_in_generate=True) for fill in (True, False)}
            assert torch.equal(out[True].sequences, out[False].sequences), row["question_type"]
            for fill in out:
                forwards[fill] += int(out[fill].num_forwards[0])
    assert forwards[True] < forwards[False]
