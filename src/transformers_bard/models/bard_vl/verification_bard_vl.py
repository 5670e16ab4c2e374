"""Verified decoding (DESIGN 4.2 a): BARD drafts each block, a causal (AR) model checks it, and the output is the AR
model's greedy answer token for token.

One accept/redraft rule serves every verifier (`accept_prefix`, `place_verified`): a verifier is anything that, fed
the last verified token and the drafts after it, returns its greedy next-token choice at each of those positions
(`ARVerifier` for a separate AR model such as the Qwen3-VL source; DESIGN 4.2 b's self-verification gives the same
predictions from the commit forward).

The loop of one row (`verified_generate_row`):

```
1. BARD prefills the prompt (block 0's first denoising step rides along), as without a verifier.
2. BARD denoises the block's masked positions (the generation config's unmasking rule) until none is left.
3. One verifier forward checks the drafts: the first one is the verifier's prefill, [prompt ; block 0's drafts];
   later ones run [newest verified token ; drafts] against its cache. Accept the longest prefix of drafts equal to
   the verifier's argmax, then the verifier's token at the first mismatch (or, when every draft agreed, after the
   block). Drafts after the first EOS or past `max_new_tokens` are not checked: they cannot be in the answer.
4. Mismatch at j: positions < j stay, the verifier's token goes to j, the rest is masked again: back to 2.
   Whole block verified: it is committed to BARD's cache by the next forward (fused with the next block's first
   step), whose position 0 is the verifier's token when every draft agreed: back to 2.
5. The row stops at its first verified EOS or at `max_new_tokens`.
```

DESIGN 4.2 a prefills the verifier first, for its token 0; checking block 0 inside that prefill gives the same
tokens with one verifier forward less per answer.

A verified token that is the mask id (an AR model may predict any id) cannot sit in BARD's canvas as a decided token
(it would read as masked): from there to the end of that block the verifier decodes alone, one token per forward.

Rows are decoded one after another (each row's caches are its own), so a batch gives exactly the per-row results;
the cost is that a batch gains nothing from batching.

This file is exported next to the weights for ``trust_remote_code``: torch, transformers and siblings only.
"""

import torch
from transformers import DynamicCache

# Generation-config fields of the verifier whose non-neutral values would make `verifier.generate(do_sample=False)`
# differ from the argmax of its logits; verified decoding reproduces the plain argmax, so these are refused.
_VERIFIER_PROCESSORS = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "exponential_decay_length_penalty": (None,),
}


def accept_prefix(drafts: torch.Tensor, predicted: torch.Tensor) -> tuple[int, int]:
    """The accept rule of speculative greedy decoding (DESIGN 4.2 a, step 3).

    `predicted` ``[n + 1]`` is the verifier's argmax after the last verified token and after each of the `drafts`
    ``[n]``: `predicted[i]` is its choice for the position of `drafts[i]`, `predicted[n]` for the position after them.
    Returns (number of drafts accepted, the verifier's token at the first rejected position or after the last draft).
    """
    if predicted.shape[0] != drafts.shape[0] + 1:
        raise ValueError(f"`predicted` needs one entry more than `drafts`, got {predicted.shape[0]} and "
                         f"{drafts.shape[0]}.")
    agree = (drafts == predicted[:-1]).long()  # [n]
    accepted = int(agree.cumprod(0).sum())
    return accepted, int(predicted[accepted])


def place_verified(block: torch.Tensor, fixed: int, accepted: int, token: int, mask_token_id: int):
    """The redraft rule (DESIGN 4.2 a, step 4) on one row's block ``[B]`` whose positions < `fixed` were verified and
    whose positions from `fixed` on were checked: the `accepted` drafts stay, the verifier's `token` takes the first
    rejected position and everything after it is masked again. Returns (new block, new `fixed`, position of `token`)
    where a position of B means `token` belongs to the next block (the whole block was accepted)."""
    position = fixed + accepted
    block = block.clone()
    if position < block.shape[0]:
        block[position] = token
        block[position + 1 :] = mask_token_id
    return block, min(position + 1, block.shape[0]), position


def check_verifier(model, verifier, generation_config, logits_processor, stopping_criteria, generator) -> None:
    """Refuse what verified decoding cannot reproduce, naming the argument and the fix."""
    if isinstance(verifier, str):
        raise ValueError(f"`verifier`={verifier!r}: pass the autoregressive model itself (e.g. the "
                         "Qwen3VLForConditionalGeneration the checkpoint was converted from), not a name or path. "
                         "Load it with Qwen3VLForConditionalGeneration.from_pretrained(path) first.")
    if type(verifier) is type(model) or getattr(verifier.config, "mask_token_id", None) is not None:
        raise ValueError("`verifier` is a block-diffusion model; verified decoding needs the autoregressive source "
                         "(a stock Qwen3VLForConditionalGeneration with the same tokenizer).")
    inner = getattr(verifier, "model", None)
    if not callable(getattr(inner, "get_rope_index", None)):
        raise ValueError(f"`verifier` must be a Qwen3-VL model with M-RoPE (`verifier.model.get_rope_index`), got "
                         f"{type(verifier).__name__}. Load the AR source with Qwen3VLForConditionalGeneration.")
    vocab = model.get_output_embeddings().weight.shape[0]
    verifier_vocab = verifier.get_output_embeddings().weight.shape[0]
    if vocab != verifier_vocab:
        raise ValueError(f"`verifier` has a vocabulary of {verifier_vocab} ids and this model {vocab}: the two must "
                         "share the tokenizer. Verify with the AR model this checkpoint was converted from.")
    temperature = float(generation_config.temperature or 0.0)
    if generation_config.do_sample or temperature > 0:
        raise ValueError(f"Verified decoding is greedy: `temperature`={generation_config.temperature!r}, "
                         f"`do_sample`={generation_config.do_sample!r}. Set temperature=0 (the default), or drop "
                         "`verifier` to sample from the diffusion model.")
    if generator is not None:
        raise ValueError("`generator` has no use with `verifier` (verified decoding is greedy): drop it.")
    if logits_processor:
        raise ValueError("`logits_processor` is not supported with `verifier`: the answer is the verifier's plain "
                         "argmax. Drop it, or decode without a verifier.")
    if stopping_criteria:
        raise ValueError("`stopping_criteria` is not supported with `verifier`; use `eos_token_id` and "
                         "`max_new_tokens`, or decode without a verifier.")
    own = getattr(verifier, "generation_config", None)
    for field, neutral in _VERIFIER_PROCESSORS.items():
        value = getattr(own, field, None)
        if not any(value is off or (off is not None and value == off) for off in neutral):
            raise ValueError(f"The verifier's generation config sets `{field}`={value!r}, which changes its greedy "
                             f"answer; verified decoding reproduces the plain argmax. Set "
                             f"`verifier.generation_config.{field} = None`.")


def load_verifier(path, **load_kwargs):
    """The autoregressive Qwen3-VL checkpoint at `path` as a verifier, in eval mode (`load_kwargs` go to
    `from_pretrained`); anything else is refused naming the path."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    model_type = getattr(AutoConfig.from_pretrained(path), "model_type", None)
    if model_type != "qwen3_vl":
        raise ValueError(f"--verifier / verifier= {path}: expected an autoregressive Qwen3-VL checkpoint (model_type 'qwen3_vl'), "
                         f"found model_type {model_type!r}. Pass the AR source the BARD model was converted from.")
    return Qwen3VLForConditionalGeneration.from_pretrained(path, **load_kwargs).eval()


class ARVerifier:
    """A separate autoregressive Qwen3-VL model as the verifier of one row: its own vision tower and DynamicCache.

    The cache holds the prompt and the verified response tokens except the newest one (the *pending* token, which is
    the first input of the next check). Positions follow the AR model's `generate`: a text row (the sequence index,
    for the causal mask) and the three M-RoPE rows, where response token j sits at `response_start + j`.
    """

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.prompt_length = 0
        self.response_start = 0

    def prefill(self, input_ids, mm_token_type_ids, drafts, pixel_values=None, image_grid_thw=None,
                video_grid_thw=None, pixel_values_videos=None) -> torch.Tensor:
        """Run the prompt ``[1, P]`` followed by the first `drafts` ``[n]`` (response offsets 0 .. n - 1) into a new
        cache: the first check rides in the prefill. Returns the argmax at the last prompt token and after each draft
        ``[n + 1]`` (entry i: the verifier's choice for response offset i)."""
        P, n = input_ids.shape[1], drafts.shape[0]
        rope, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, attention_mask=torch.ones_like(input_ids),
        )  # [3, 1, P]
        self.prompt_length, self.response_start = P, int(rope.max()) + 1
        text = torch.arange(P + n, device=input_ids.device)[None, None]  # [1, 1, P + n]
        rope = torch.cat([rope, (self.response_start + torch.arange(n, device=rope.device)).expand(3, 1, n)], dim=2)
        self.cache = DynamicCache(config=self.model.config)
        vision = {}
        if pixel_values is not None:
            vision.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        if pixel_values_videos is not None:
            vision.update(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        logits = self.model(
            input_ids=torch.cat([input_ids, drafts[None]], dim=1), position_ids=torch.cat([text, rope]),
            cache=self.cache, use_cache=True, logits_to_keep=n + 1,
            mm_token_type_ids=torch.cat([mm_token_type_ids, mm_token_type_ids.new_zeros(1, n)], dim=1), **vision,
        ).logits  # [1, n + 1, vocab]
        return logits[0].argmax(-1)

    def check(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:  # after `prefill`
        """Append `tokens` ``[n]`` (response offsets `offset` .. `offset` + n - 1; the cache holds the ones before) and
        return the argmax after each ``[n]``: entry i is the verifier's choice for offset `offset` + i + 1."""
        n = tokens.shape[0]
        steps = torch.arange(n, device=tokens.device)
        text = (self.prompt_length + offset + steps)[None, None]  # [1, 1, n]
        rope = (self.response_start + offset + steps)[None, None].expand(3, 1, n)
        logits = self.model(
            input_ids=tokens[None], position_ids=torch.cat([text, rope]), cache=self.cache, use_cache=True,
        ).logits  # [1, n, vocab]
        return logits[0].argmax(-1)

    def keep(self, num_response_tokens: int) -> None:
        """Crop the cache to the prompt and the first `num_response_tokens` response tokens."""
        self.cache.crop(self.prompt_length + num_response_tokens - self.cache.get_seq_length())  # <= 0: tokens to drop


def split_vision_inputs(input_ids, attention_mask, token_id, pixels, grid, merge_size):
    """Per row of a batch: (pixels, grid) of the images (or videos) whose placeholder tokens are in that row, or
    (None, None). The processor concatenates every item's patches in order; item k has `grid[k].prod()` patches and
    `grid[k].prod() // merge_size**2` placeholder tokens."""
    batch = input_ids.shape[0]
    if pixels is None:
        return [(None, None)] * batch
    counts = ((input_ids == token_id) & attention_mask.bool()).sum(-1).tolist()  # placeholder tokens per row
    patches = grid.prod(-1)  # [items]
    tokens = (patches // (merge_size * merge_size)).tolist()
    offsets = [0, *patches.cumsum(0).tolist()]
    out, item = [], 0
    for count in counts:
        first = item
        while count > 0:
            count -= tokens[item]
            item += 1
        out.append((pixels[offsets[first] : offsets[item]], grid[first:item]) if item > first else (None, None))
    return out


def verified_generate_row(model, verifier: ARVerifier, input_ids, mm_token_type_ids, vision: dict, plan,
                          streamer=None, trace=None):
    """Verified decoding of one prompt ``[1, P]`` (no padding); see the module docstring for the loop.

    Returns (generated ``[1, num_blocks * B]``, kept length, draft forwards, verify forwards, accepted drafts per
    verification). `trace` (a list, or None) receives the draft events of `generate`'s trace plus one event per
    verification.
    """
    B, mask = plan.block_size, plan.mask_token_id
    eos = plan.eos_token_ids
    fill = plan.pad_token_id if plan.pad_token_id is not None else 0
    generated = input_ids.new_full((1, plan.num_blocks * B), fill)
    lengths = torch.zeros(1, dtype=torch.long, device=input_ids.device)
    forwards = torch.zeros(1, dtype=torch.long, device=input_ids.device)
    traces = [trace] if trace is not None else None
    accepted_lengths = []

    # 1. BARD's prefill with block 0's first denoising step, as without a verifier
    bard_vision = {key: vision[key] for key in ("pixel_values", "image_grid_thw") if key in vision}
    model_kwargs = {key: vision[key] for key in ("pixel_values_videos", "video_grid_thw") if key in vision}
    cache, rows, logits = model._prefill_prompt(
        input_ids, torch.ones_like(input_ids), bard_vision.get("pixel_values"), bard_vision.get("image_grid_thw"),
        mm_token_type_ids, model_kwargs, plan,
    )
    decide = torch.full((1, B), plan.prefill_step, dtype=torch.bool, device=input_ids.device)
    model._take_step(rows, logits, decide, input_ids, generated, plan, None, None, traces, "prefill")
    # positions < `fixed` of the current block are verified; `pending` is the newest verified token (not yet in the
    # verifier's cache: the first input of its next check; before the verifier's prefill, the prompt's last token);
    # `verified` counts the verified response tokens
    fixed, verified, pending = 0, 0, None
    known = input_ids.new_zeros(0)  # the block's verified tokens (a step with revision may touch them)
    step_mask = None
    draft_forwards = verify_forwards = 0
    one = torch.ones(1, dtype=torch.bool, device=input_ids.device)

    def draft_step():
        nonlocal step_mask, draft_forwards
        step_mask = model._decoding_step(rows, cache, step_mask, forwards, input_ids, generated, plan, None, None,
                                         traces)
        rows.block[0, :fixed] = known
        draft_forwards += 1

    def stops(new_tokens: torch.Tensor) -> bool:
        return verified >= plan.max_new_tokens or (eos is not None and bool(torch.isin(new_tokens, eos).any()))

    while True:
        # 2. denoise the block's drafts (none when a verified token is the mask id: the verifier goes alone)
        alone = bool((known == mask).any())
        while not alone and bool((rows.block[0, fixed:] == mask).any()):
            draft_step()
        if bool(rows.committing.any()):  # nothing was drafted since the last block was verified: commit it now
            draft_step()
        # 3. verify [newest verified token, drafts]; drafts after the first EOS or past `max_new_tokens` cannot be
        # part of the answer, so they are not checked
        block_start = int(rows.block_index[0]) * B
        drafts = rows.block[0, fixed : fixed if alone else min(B, plan.max_new_tokens - block_start)]
        if eos is not None and drafts.numel() and bool(torch.isin(drafts, eos).any()):
            drafts = drafts[: int(torch.isin(drafts, eos).int().argmax()) + 1]
        if pending is None:  # the verifier's prefill: the prompt, then block 0's drafts
            predicted = verifier.prefill(input_ids, mm_token_type_ids, drafts, **vision)
        else:
            inputs = torch.cat([torch.tensor([pending], device=drafts.device), drafts])
            predicted = verifier.check(inputs, offset=block_start + fixed - 1)
            verify_forwards += 1
        accepted, token = accept_prefix(drafts, predicted)
        accepted_lengths.append(accepted)
        verifier.keep(block_start + fixed + accepted)
        new_block, new_fixed, position = place_verified(rows.block[0], fixed, accepted, token, mask)
        verified = block_start + position + 1
        stop = stops(torch.cat([drafts[:accepted], torch.tensor([token], device=drafts.device)]))
        if traces is not None:
            rejected = [[position, int(drafts[accepted])]] if accepted < drafts.shape[0] else []
            trace.append({
                "forward": len(trace), "kind": "verify" if pending is not None else "verifier_prefill",
                "block": block_start // B, "step": -1,
                "block_start": block_start, "checked_from": fixed, "drafts": drafts.tolist(), "accepted": accepted,
                "rejected": rejected, "verified": [[position, token]] if position < B else [],
                "next_block_first": token if position == B else None, "block_tokens": new_block.tolist(),
                # for trace viewers: the rejected draft as a revision to the verifier's token (confidence 1)
                "unmasked": [[position, token, 1.0]] if position < B and not rejected else [],
                "revised": [[position, rejected[0][1], token, 1.0]] if rejected else [], "eos_filled": [],
            })
        rows.block[0] = new_block
        fixed, known, pending = new_fixed, new_block[:new_fixed].clone(), token
        if not stop and position < B - 1:
            continue  # 4. redraft the rest of the block
        # 5. a verified block: keep it (the row stops here at EOS or the length limit), else move on; the next block
        # starts with the verifier's token when it came after the block, else fully masked
        if bool(model._end_finished_blocks(rows, input_ids, generated, lengths, plan, None, streamer, one)[0]):
            break
        fixed, known = 0, rows.block[0, :0].clone()
        if position == B:
            rows.block[0, 0] = token
            fixed, known = 1, rows.block[0, :1].clone()
            if stops(known):
                model._end_finished_blocks(rows, input_ids, generated, lengths, plan, None, streamer, one)
                break
    return generated, int(lengths[0]), draft_forwards, verify_forwards, accepted_lengths
