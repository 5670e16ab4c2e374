"""BardVLForConditionalGeneration: the central block-diffusion invariant and the selective LM head.

The invariant (DESIGN 3.1, 3.2, 4): the logits of a noisy block computed in the packed training row
``[prefix ; x0 ; xt]`` equal the logits of the same block computed the way decoding computes them: prefill of the
prompt into a KV cache, commit of the earlier clean blocks, then the noisy block alone against the cache. It holds
for both values of `prediction_shift` (DESIGN 4.1): shifted, a block's first logit is the last logit of the forward
before it (the prefill's last prompt token or the commit's last token), the others come from its noisy positions.
"""

import math

import pytest
import torch
from transformers import DynamicCache

from transformers_bard import BardVLConfig, BardVLForConditionalGeneration
from transformers_bard.models.bard_vl import (
    CLEAN,
    NOISY,
    PAD,
    PREFIX,
    attention_mask_from_labels,
    packed_segment_ids,
)

VOCAB = 96
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 90, 91, 92, 93
MASK_TOKEN = 94
PATCH_DIM = 3 * 2 * 16 * 16  # channels * temporal_patch * patch * patch


def tiny_config(block_size=4, prompt_attention="block_causal", prediction_shift=False):
    return BardVLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, block_size=block_size, mask_token_id=MASK_TOKEN,
        prompt_attention=prompt_attention, prediction_shift=prediction_shift,
    )


def make_model(block_size=4, prompt_attention="block_causal", seed=0, prediction_shift=False):
    torch.manual_seed(seed)
    config = tiny_config(block_size, prompt_attention, prediction_shift)
    config._attn_implementation = "sdpa"
    model = BardVLForConditionalGeneration(config).eval()
    return model


def make_prompt(gen, length, with_image):
    """Token ids and mm types of a prompt; an image of grid (1, 4, 4) gives 4 merged image tokens."""
    text = torch.randint(0, 80, (length,), generator=gen)
    if not with_image:
        return text, torch.zeros(length, dtype=torch.int), None
    ids = torch.cat([text[:2], torch.tensor([VISION_START] + [IMAGE_TOKEN] * 4 + [VISION_END]), text[2:]])
    mm = (ids == IMAGE_TOKEN).int()
    return ids, mm, torch.tensor([[1, 4, 4]])


def pack_batch(prompts, responses, noisy, block_size):
    """Left-padded prefixes, right-padded x0 and xt: the packed layout of DESIGN 3.1."""
    P = max(len(p[0]) for p in prompts)
    R = max(len(r) for r in responses)
    batch = len(prompts)
    prefix_ids = torch.zeros(batch, P, dtype=torch.long)
    prefix_mm = torch.zeros(batch, P, dtype=torch.int)
    prefix_att = torch.zeros(batch, P, dtype=torch.long)
    x0 = torch.zeros(batch, R, dtype=torch.long)
    xt = torch.zeros(batch, R, dtype=torch.long)
    resp = torch.zeros(batch, R, dtype=torch.long)
    for i, ((ids, mm, _), r, n) in enumerate(zip(prompts, responses, noisy)):
        prefix_ids[i, P - len(ids):] = ids
        prefix_mm[i, P - len(ids):] = mm
        prefix_att[i, P - len(ids):] = 1
        x0[i, : len(r)] = r
        xt[i, : len(n)] = n
        resp[i, : len(r)] = 1
    input_ids = torch.cat([prefix_ids, x0, xt], 1)
    mm = torch.cat([prefix_mm, torch.zeros(batch, 2 * R, dtype=torch.int)], 1)
    segments = packed_segment_ids(prefix_att, resp)
    grids = [p[2] for p in prompts if p[2] is not None]
    grid = torch.cat(grids) if grids else None
    return input_ids, mm, segments, grid, P, R


def decode_style_block_logits(model, prompt, x0, xt_block, block_index, pixel_values):
    """Logits ``[B, V]`` of noisy block `block_index` as decoding computes them: prefill, commits, then the block
    alone. Shifted (DESIGN 4.1): the last logit of the previous forward, then the block's logits but its last."""
    ids, mm, grid = prompt
    B = model.config.block_size
    pa = model.config.prompt_attention
    P = len(ids)
    cache = DynamicCache(config=model.config)
    prefix_seg = torch.full((1, P), PREFIX)
    prefix_blk = (torch.arange(P) // B)[None]
    pos, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=mm[None], image_grid_thw=grid)
    mask = attention_mask_from_labels(prefix_seg, prefix_blk, prefix_seg, prefix_blk, pa)
    previous = model(input_ids=ids[None], attention_mask=mask, position_ids=pos, cache=cache,
                     pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=mm[None], use_cache=True).logits
    key_seg, key_blk = prefix_seg, prefix_blk
    start = int(pos.max()) + 1
    first_block = math.ceil(P / B)
    for b in range(block_index + 1):
        seg_value = CLEAN if b < block_index else NOISY
        tokens = x0[b * B:(b + 1) * B] if b < block_index else xt_block
        q_seg = torch.full((1, B), seg_value)
        q_blk = torch.full((1, B), first_block + b)
        k_seg, k_blk = torch.cat([key_seg, q_seg], 1), torch.cat([key_blk, q_blk], 1)
        mask = attention_mask_from_labels(q_seg, q_blk, k_seg, k_blk, pa)
        p = (start + b * B + torch.arange(B))[None, None].expand(3, 1, B)
        out = model(input_ids=tokens[None], attention_mask=mask, position_ids=p, cache=cache, use_cache=True)
        if b < block_index:
            key_seg, key_blk = k_seg, k_blk
            previous = out.logits
        elif model.config.prediction_shift:
            return torch.cat([previous[0, -1:], out.logits[0, :-1]])
        else:
            return out.logits[0]


@pytest.mark.parametrize("prediction_shift", [False, True])
@pytest.mark.parametrize("prompt_attention", ["block_causal", "causal"])
@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_packed_logits_equal_decode_logits(block_size, prompt_attention, prediction_shift):
    model = make_model(block_size, prompt_attention, prediction_shift=prediction_shift)
    gen = torch.Generator().manual_seed(block_size)
    B = block_size
    # three rows: with image / text only / with image, different prompt and response lengths
    prompts = [make_prompt(gen, 7, True), make_prompt(gen, 3, False), make_prompt(gen, 10, True)]
    n_blocks = [3, 2, 1] if B < 8 else [2, 1, 2]
    responses = [torch.randint(0, 80, (n * B,), generator=gen) for n in n_blocks]
    noisy = []
    for r in responses:
        n = r.clone()
        n[torch.rand(len(r), generator=gen) < 0.5] = MASK_TOKEN
        noisy.append(n)
    pixel_rows = [torch.randn(16, PATCH_DIM, generator=gen) for p in prompts if p[2] is not None]
    pixel_values = torch.cat(pixel_rows)
    input_ids, mm, segments, grid, P, R = pack_batch(prompts, responses, noisy, B)
    logits_mask = segments == NOISY
    with torch.no_grad():
        out = model(input_ids=input_ids, segment_ids=segments, mm_token_type_ids=mm, pixel_values=pixel_values,
                    image_grid_thw=grid, logits_mask=logits_mask)
    assert out.logits.shape == (int(logits_mask.sum()), VOCAB)
    packed = torch.full((len(prompts), R, VOCAB), float("nan"))
    packed[logits_mask[:, P + R:]] = out.logits
    pixel_iter = iter(pixel_rows)
    for row, prompt in enumerate(prompts):
        pv = next(pixel_iter) if prompt[2] is not None else None
        for b in range(n_blocks[row]):
            with torch.no_grad():
                ref = decode_style_block_logits(model, prompt, responses[row], noisy[row][b * B:(b + 1) * B], b, pv)
            torch.testing.assert_close(packed[row, b * B:(b + 1) * B], ref, atol=2e-5, rtol=1e-4)


def test_noisy_block_does_not_depend_on_later_blocks():
    """Changing a later noisy block or a later clean block leaves an earlier noisy block's logits unchanged."""
    model = make_model(4)
    gen = torch.Generator().manual_seed(0)
    prompt = make_prompt(gen, 5, False)
    x0 = torch.randint(0, 80, (12,), generator=gen)
    xt = torch.full((12,), MASK_TOKEN)
    input_ids, mm, seg, grid, P, R = pack_batch([prompt], [x0], [xt], 4)
    with torch.no_grad():
        base = model(input_ids=input_ids, segment_ids=seg, logits_mask=seg == NOISY).logits
        changed = input_ids.clone()
        changed[0, P + 8:P + 12] = 1  # last clean block
        changed[0, P + R + 4:] = 2  # later noisy blocks
        other = model(input_ids=changed, segment_ids=seg, logits_mask=seg == NOISY).logits
    torch.testing.assert_close(base[:4], other[:4])
    assert not torch.allclose(base[4:], other[4:])


def test_selective_head_matches_full_head_and_unshifted_loss():
    model = make_model(4)
    gen = torch.Generator().manual_seed(1)
    prompt = make_prompt(gen, 6, False)
    x0 = torch.randint(0, 80, (8,), generator=gen)
    input_ids, mm, seg, grid, P, R = pack_batch([prompt], [x0], [x0.clone()], 4)
    keep = seg == NOISY
    labels = torch.full_like(input_ids, -100)
    labels[keep] = x0
    with torch.no_grad():
        full = model(input_ids=input_ids, segment_ids=seg).logits  # [1, L, V]
        sel = model(input_ids=input_ids, segment_ids=seg, logits_mask=keep, labels=labels)
        hidden_only = model(input_ids=input_ids, segment_ids=seg, logits_mask=keep, skip_logits=True)
    torch.testing.assert_close(sel.logits, full[keep])
    assert hidden_only.logits is None
    torch.testing.assert_close(model.lm_head(hidden_only.selected_hidden_states), sel.logits)
    # no shift: CE of logit i against the clean token at i
    expected = torch.nn.functional.cross_entropy(full[keep].float(), x0)
    torch.testing.assert_close(sel.loss, expected)


def test_shifted_head_scores_each_target_at_its_source(tmp_path):
    """prediction_shift (DESIGN 4.1): the selective head returns, in target order, the full head's logits at the
    source columns (first token of a block <- last prompt / last clean token of the block before; others <- the
    noisy token before), and `labels` are scored against them; the flag is validated and saved."""
    model = make_model(4, prediction_shift=True)
    gen = torch.Generator().manual_seed(1)
    prompt = make_prompt(gen, 6, False)
    x0 = torch.randint(0, 80, (8,), generator=gen)
    xt = x0.clone()
    xt[[0, 2, 4, 5, 7]] = MASK_TOKEN
    input_ids, mm, seg, grid, P, R = pack_batch([prompt], [x0], [xt], 4)
    keep = input_ids == MASK_TOKEN
    labels = torch.full_like(input_ids, -100)
    labels[keep] = x0[[0, 2, 4, 5, 7]]
    with torch.no_grad():
        full = model(input_ids=input_ids, segment_ids=seg).logits[0]  # [L, V], the raw head: i predicts i + 1
        sel = model(input_ids=input_ids, segment_ids=seg, logits_mask=keep, labels=labels)
    sources = [P - 1, P + R + 1, P + 3, P + R + 4, P + R + 6]  # targets at offsets 0, 2, 4, 5, 7
    torch.testing.assert_close(sel.logits, full[sources])
    expected = torch.nn.functional.cross_entropy(full[sources].float(), x0[[0, 2, 4, 5, 7]])
    torch.testing.assert_close(sel.loss, expected)
    with pytest.raises(ValueError, match="logits_mask"):
        model(input_ids=input_ids, segment_ids=seg, labels=labels)
    with pytest.raises(ValueError, match="prediction_shift"):
        model(input_ids=input_ids, segment_ids=seg, logits_mask=seg == CLEAN)
    model.save_pretrained(tmp_path)
    assert BardVLConfig.from_pretrained(tmp_path).prediction_shift is True
    assert tiny_config().prediction_shift is False
    with pytest.raises(Exception, match="prediction_shift"):
        tiny_config(prediction_shift="yes")


def test_eager_attention_matches_sdpa():
    model = make_model(4)
    gen = torch.Generator().manual_seed(2)
    prompt = make_prompt(gen, 6, False)
    x0 = torch.randint(0, 80, (8,), generator=gen)
    xt = x0.clone()
    xt[::2] = MASK_TOKEN
    input_ids, mm, seg, grid, P, R = pack_batch([prompt], [x0], [xt], 4)
    with torch.no_grad():
        sdpa = model(input_ids=input_ids, segment_ids=seg, logits_mask=seg == NOISY).logits
        model.config._attn_implementation = "eager"
        model.model.language_model.config._attn_implementation = "eager"
        eager = model(input_ids=input_ids, segment_ids=seg, logits_mask=seg == NOISY).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # FlexAttention compiles its kernel on first use (about 20 s on 2 CPU cores)
@pytest.mark.parametrize("prediction_shift", [False, True])
def test_flex_attention_matches_sdpa_on_a_packed_batch(prediction_shift, fresh_compile):
    """Same weights, `attn_implementation="flex_attention"` against sdpa on a packed batch with images, left-padded
    prompts and right-padded responses: the same loss and logits. Forward only: torch has no FlexAttention backward
    on CPU (the trainers refuse flex for training there)."""
    inputs = _packed_inputs()
    sdpa = make_model(4, prediction_shift=prediction_shift)
    flex = make_model(4, prediction_shift=prediction_shift)
    flex.set_attn_implementation("flex_attention")
    assert flex.model.language_model.config._attn_implementation == "flex_attention"
    from torch.nn.attention.flex_attention import BlockMask

    assert isinstance(flex.block_diffusion_attention_mask(inputs["segment_ids"]), BlockMask)
    with torch.no_grad():
        want, got = sdpa(**inputs), flex(**inputs)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_segment_ids_and_attention_mask_are_exclusive():
    model = make_model(4)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_ids"):
        model(input_ids=ids, segment_ids=torch.full((1, 4), PREFIX), attention_mask=torch.ones(1, 4))


def test_padding_rows_are_finite():
    model = make_model(4)
    seg = torch.tensor([[PAD, PAD, PREFIX, PREFIX, CLEAN, CLEAN, CLEAN, CLEAN, NOISY, NOISY, NOISY, NOISY]])
    ids = torch.randint(0, 80, seg.shape)
    with torch.no_grad():
        out = model(input_ids=ids, segment_ids=seg)
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------------- the transformers model contract (issue 16)
def _packed_inputs(seed=3):
    gen = torch.Generator().manual_seed(seed)
    prompts = [make_prompt(gen, 6, True), make_prompt(gen, 3, False)]
    responses = [torch.randint(0, 80, (8,), generator=gen), torch.randint(0, 80, (4,), generator=gen)]
    noisy = [torch.where(torch.rand(len(r), generator=gen) < 0.5, MASK_TOKEN, r) for r in responses]
    input_ids, mm, seg, grid, P, R = pack_batch(prompts, responses, noisy, 4)
    labels = torch.full_like(input_ids, -100)
    labels[:, P + R:] = torch.where(seg[:, P + R:] == NOISY, input_ids[:, P:P + R], -100)
    pixel_values = torch.randn(16, PATCH_DIM, generator=gen)
    return dict(input_ids=input_ids, segment_ids=seg, mm_token_type_ids=mm, pixel_values=pixel_values,
                image_grid_thw=grid, labels=labels, logits_mask=seg == NOISY)


@pytest.mark.parametrize("forward", ["block_diffusion", "plain"])
def test_return_dict_false_gives_the_tuple_of_the_output(forward):
    model = make_model(4)
    inputs = _packed_inputs()
    if forward == "plain":
        inputs = dict(input_ids=inputs["input_ids"], attention_mask=torch.ones_like(inputs["input_ids"]),
                      labels=inputs["input_ids"], use_cache=True)
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()
    names = [name for name, value in as_dict.items() if value is not None]
    assert len(as_tuple) == len(expected) and names[:2] == ["loss", "logits"]
    for name, got, want in zip(names, as_tuple, expected):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    if forward == "block_diffusion":
        assert names[-1] == "selected_hidden_states" and as_tuple[1].shape == (int(inputs["logits_mask"].sum()), VOCAB)
    else:
        assert "cache" in names and as_tuple[names.index("cache")].get_seq_length() == inputs["input_ids"].shape[1]


def _gradients(model, inputs):
    model.zero_grad()
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("how", ["config", "activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_gives_equal_gradients(how):
    inputs = _packed_inputs()
    reference = make_model(4).train()
    assert not reference.is_activation_checkpointing
    expected = _gradients(reference, inputs)
    torch.manual_seed(0)
    config = tiny_config(4)
    config._attn_implementation = "sdpa"
    if how == "config":
        config.gradient_checkpointing = True  # the backward-compatible way: consumed by `post_init`
    model = BardVLForConditionalGeneration(config)
    if how == "activation_checkpointing_enable":
        model.activation_checkpointing_enable()
    elif how == "gradient_checkpointing_enable":
        with pytest.warns(FutureWarning, match="gradient_checkpointing_enable"):  # transformers' deprecated alias
            model.gradient_checkpointing_enable()
    model.load_state_dict(reference.state_dict())
    model.train()
    assert model.is_activation_checkpointing
    layers = model.model.language_model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    calls = []
    checkpoint = layers[0]._gradient_checkpointing_func
    layers[0]._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    got = _gradients(model, inputs)
    assert calls, "the decoder layer did not run under activation checkpointing"
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("module", ["model", "backbone"])
def test_past_key_values_is_deprecated_for_cache(module):
    """Both forwards rename `past_key_values` to `cache` with transformers' warning, as stock Qwen3-VL does; the
    backbone's override of the stock forward once passed it on next to `cache=None`, which dropped the cache."""
    model = make_model(4)
    model = model.model if module == "backbone" else model
    ids = torch.randint(0, 80, (1, 6))
    cache = DynamicCache(config=model.config)
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated") as record:
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert not [w for w in record if "Both `past_key_values` and `cache`" in str(w.message)]
    assert out.cache is cache and cache.get_seq_length() == 6
    with torch.no_grad():
        reference = model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True)
    output = "logits" if module == "model" else "last_hidden_state"
    torch.testing.assert_close(getattr(out, output), getattr(reference, output))


@pytest.mark.parametrize("forward", ["block_diffusion", "plain"])
def test_sharded_vision_tower_runs_on_text_only_batches_without_changing_values(forward, monkeypatch):
    """With a sharded vision tower (FSDP2 / ZeRO-3; `vision_tower_is_sharded` patched to True here), a batch without
    images still runs the tower, between the token embeddings and the language model as a real image does (the
    collectives of all ranks then line up), and the logits and every gradient equal those of the plain forward; the
    vision weights get exact-zero gradients instead of none."""
    model = make_model(4).train()
    inputs = _packed_inputs()
    inputs = {key: value for key, value in inputs.items() if key not in ("pixel_values", "image_grid_thw")}
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["mm_token_type_ids"].bool(), 0)  # no image tokens
    inputs["mm_token_type_ids"] = torch.zeros_like(inputs["mm_token_type_ids"])
    if forward == "plain":
        inputs = dict(input_ids=inputs["input_ids"], attention_mask=torch.ones_like(inputs["input_ids"]),
                      labels=inputs["input_ids"])
    plain_loss = model(**inputs).loss
    plain = _gradients(model, inputs)
    assert not any(name.startswith("model.visual.") for name in plain)

    order = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args, name=name: order.append(name))
        for name, module in (
            ("embeddings", model.model.get_input_embeddings()),
            ("vision", model.model.visual),
            ("language model", model.model.language_model),
        )
    ]
    monkeypatch.setattr(type(model.model), "vision_tower_is_sharded", lambda self: True)
    sharded_loss = model(**inputs).loss
    assert order == ["embeddings", "vision", "language model"]
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(sharded_loss, plain_loss, rtol=0, atol=0)
    sharded = _gradients(model, inputs)
    vision = {name for name in sharded if name.startswith("model.visual.")}
    assert vision == {name for name, _ in model.named_parameters() if name.startswith("model.visual.")}
    for name in vision:
        assert not sharded[name].any(), name
    for name, grad in plain.items():
        torch.testing.assert_close(sharded[name], grad, rtol=0, atol=0, msg=name)


def test_vision_tower_is_sharded_detects_fully_shard_and_zero3_parameters():
    model = make_model(4)
    assert not model.model.vision_tower_is_sharded()
    param = next(model.model.visual.parameters())
    param.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert model.model.vision_tower_is_sharded()
    del param.ds_id
