"""BARD decoding for a one-sequence-per-request engine (`transformers_bard.integrations.vllm.request`).

An engine like vLLM keeps one KV cache per request over logical positions and drops the KV of trailing tokens it
rejects. Two checks that need no engine: (1) the mask over logical positions (`logical_visible`) is the mask of
DESIGN 3.2 that `generate` builds from segment labels, on every forward layout `generate` uses; (2) a reference
engine written here (the transformers model, one DynamicCache per request, cropped to what the request keeps) that
follows `BardRequest` answers exactly what `model.generate` answers, token for token and forward for forward, for
every decoding setting.
"""

import pytest
import torch

from transformers_bard.integrations.vllm.request import BardRequest, decoding_plan, logical_visible
from transformers_bard.models.bard_vl.masking_bard_vl import (
    CLEAN,
    NOISY,
    PAD,
    PREFIX,
    attention_mask_from_labels,
    block_ids_from_segments,
)
from transformers_bard.testing import make_image

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- the logical mask
def label_layout(prompt_length: int, block_size: int, committed: int, kind: str):
    """The keys and queries of one `generate` forward as segment/block labels (the reference) and as logical
    positions: the prompt, `committed` clean blocks, then per `kind` the prefill (prompt + noisy block 0), a
    denoising step (the noisy block after the cache) or a fused commit (clean block, then the next noisy block)."""
    P, B = prompt_length, block_size
    if kind == "prefill":
        segments = [PREFIX] * P + [NOISY] * B
        queries = P + B
    elif kind == "denoise":
        segments = [PREFIX] * P + [CLEAN] * (committed * B) + [NOISY] * B
        queries = B
    else:  # fused commit of block `committed`
        segments = [PREFIX] * P + [CLEAN] * ((committed + 1) * B) + [NOISY] * B
        queries = 2 * B
    segments = torch.tensor([segments])
    blocks = block_ids_from_segments(torch.where(segments == NOISY, PAD, segments), B)
    # as `generate` labels it: the noisy block gets the id of the response block it denoises
    noisy_block = committed + (1 if kind == "fused" else 0)
    blocks[segments == NOISY] = -(-P // B) + noisy_block
    positions = torch.arange(segments.shape[1])  # the noisy block sits where it will be committed
    if kind == "fused":
        positions[-B:] = P + (committed + 1) * B + torch.arange(B)
    return segments, blocks, positions, queries


@pytest.mark.parametrize("prompt_attention", ["block_causal", "causal"])
def test_logical_mask_is_the_label_mask_of_every_generate_forward(prompt_attention):
    checked = 0
    for B in (1, 2, 3, 4, 8):
        for P in range(1, 11):
            for committed in range(3):
                for kind in ("prefill", "denoise", "fused"):
                    if kind == "prefill" and committed:
                        continue
                    segments, blocks, positions, q = label_layout(P, B, committed, kind)
                    reference = attention_mask_from_labels(
                        segments[:, -q:], blocks[:, -q:], segments, blocks, prompt_attention
                    )[0, 0]
                    got = logical_visible(positions[-q:, None], positions[None, :], P, B, prompt_attention)
                    assert torch.equal(got, reference), (B, P, committed, kind)
                    checked += 1
    assert checked == 5 * 10 * 7


def test_logical_mask_is_not_causal_inside_a_block():
    """The rule is not the causal mask: a response block is bidirectional, later blocks are hidden."""
    P, B = 5, 4
    q = torch.arange(P, P + 3 * B)
    got = logical_visible(q[:, None], torch.arange(P + 3 * B)[None, :], P, B)
    assert got[0, P + 3]  # the first token of block 0 sees the last one
    assert not got[3, P + B]  # ... but not block 1
    assert got[B, P - 1] and got[B, P + B - 1]  # block 1 sees the prompt and block 0


# ---------------------------------------------------------------------------------------------- the reference engine
@pytest.fixture(scope="module")
def confident(tiny_bard_vl_dir):
    """The tiny checkpoint with its LM head scaled (x30), so that steps unmask several tokens at once and blocks end
    at different steps, and its processor."""
    from transformers_bard import BardVLForConditionalGeneration, BardVLProcessor

    model = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.generation_config.threshold = 0.6
    return model, BardVLProcessor.from_pretrained(tiny_bard_vl_dir)


def prompt_inputs(processor, text, image=None):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt")


def prompt_rope(model, inputs):
    """The prompt's token types (image 1, text 0), its M-RoPE positions ``[3, 1, P]`` from `get_rope_index` and the
    M-RoPE position of response offset 0 (DESIGN 2)."""
    input_ids = inputs["input_ids"]
    mm_types = torch.zeros_like(input_ids, dtype=torch.int)
    mm_types[input_ids == model.config.image_token_id] = 1
    prompt_positions, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_types, image_grid_thw=inputs.get("image_grid_thw"),
        attention_mask=torch.ones_like(input_ids),
    )
    return mm_types, prompt_positions, int(prompt_positions.max()) + 1


def run_engine(model, inputs, request: BardRequest) -> None:
    """Drive `request` to the end with the transformers model as a one-sequence engine: logical positions, the mask
    of `logical_visible`, M-RoPE positions (the prompt's from `get_rope_index`, then one per position on all three
    axes) and a DynamicCache cropped to the tokens each forward keeps."""
    from transformers import DynamicCache

    input_ids = inputs["input_ids"]
    P = input_ids.shape[1]
    mm_types, prompt_positions, response_start = prompt_rope(model, inputs)
    cache = DynamicCache(config=model.config)
    B = request.plan.block_size
    while not request.finished:
        forward = request.next_forward()
        new = torch.tensor([forward.new_tokens], dtype=torch.long)
        extra = {}
        if forward.kind == "prefill":
            ids = torch.cat([input_ids, new], dim=1)
            logical = torch.arange(ids.shape[1])
            positions = torch.cat([prompt_positions, (response_start + torch.arange(new.shape[1]))[None, None]
                                   .expand(3, 1, -1)], dim=2)
            extra = {"pixel_values": inputs.get("pixel_values"), "image_grid_thw": inputs.get("image_grid_thw"),
                     "mm_token_type_ids": torch.cat([mm_types, mm_types.new_zeros(1, new.shape[1])], dim=1)}
        else:
            ids = new
            logical = forward.cached + torch.arange(new.shape[1])
            positions = (response_start + logical - P)[None, None].expand(3, 1, -1)
        keys = torch.arange(forward.cached + ids.shape[1])
        mask = logical_visible(logical[:, None], keys[None, :], P, B, request.prompt_attention)[None, None]
        wanted = torch.isin(logical, torch.tensor(forward.logit_positions, dtype=torch.long))[None]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                           logits_mask=wanted, **extra).logits
        dropped = ids.shape[1] - forward.num_kept
        if dropped:
            cache.crop(-dropped)
        request.take_logits(logits)


CASES = {
    "defaults": {},
    "unfused": {"fuse_commit": False, "prefill_step": False},  # the forwards of vLLM's diffusion path
    "static": {"unmasking": "static", "steps_per_block": 2},
    "revision": {"edit_threshold": 0.5},
    "eos_tail_fill": {"eos_tail_fill": True},
    "no_eos_fill": {"eos_fill": False, "fuse_commit": False},
    "length_cut": {"max_new_tokens": 10},
    "sampling": {"temperature": 0.8, "top_k": 50, "top_p": 0.9},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model_change", ["none", "causal_prompt", "prediction_shift"])
def test_engine_following_the_request_answers_what_generate_answers(confident, case, model_change):
    model, processor = confident
    options = {"max_new_tokens": 24, **CASES[case]}
    original = model.config.prompt_attention, model.config.prediction_shift
    if model_change == "causal_prompt":
        model.config.prompt_attention = "causal"
    elif model_change == "prediction_shift":
        model.config.prediction_shift = True
    try:
        checked_forwards = 0
        for text, size in [("What color is the square?", (32, 32)), ("hello there, how are you doing today?", None),
                           ("x", None)]:
            inputs = prompt_inputs(processor, text, make_image(3, size) if size else None)
            seed = torch.Generator().manual_seed(7)
            out = model.generate(**inputs, return_dict_in_generate=True, generator=seed, **options)
            expected = out.sequences[0, inputs["input_ids"].shape[1]:][: int(out.num_generated_tokens[0])].tolist()

            generation_config = model.generation_config
            plan = decoding_plan(generation_config.__class__.from_dict({**generation_config.to_dict(), **options}),
                                 model.config)
            request = BardRequest(inputs["input_ids"].shape[1], plan, model.config.prompt_attention,
                                  generator=torch.Generator().manual_seed(7))
            run_engine(model, inputs, request)
            assert request.output_ids == expected, (text, case)
            assert request.num_forwards == int(out.num_forwards[0])
            eos = plan.eos_token_ids.tolist()
            assert request.finish_reason == ("stop" if expected[-1] in eos else "length")
            checked_forwards += request.num_forwards
        assert checked_forwards > 6  # the answers took several blocks, not one forward each
    finally:
        model.config.prompt_attention, model.config.prediction_shift = original


def test_request_validates_and_refuses_misuse(confident):
    model, _ = confident
    plan = decoding_plan(model.generation_config, model.config, max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt_length"):
        BardRequest(0, plan)
    with pytest.raises(ValueError, match="prompt_attention"):
        BardRequest(3, plan, prompt_attention="bidirectional")
    request = BardRequest(3, plan)
    with pytest.raises(RuntimeError, match="next_forward"):
        request.take_logits(torch.zeros(0, 10))
    forward = request.next_forward()
    assert forward.kind == "prefill" and forward.num_kept == 3 and len(forward.new_tokens) == plan.block_size
    assert request.next_forward() is forward  # asked again, the same forward
    with pytest.raises(ValueError, match="Expected logits for 4 positions"):
        request.take_logits(torch.zeros(2, 10))


def test_decoding_plan_follows_the_request_length_and_the_checkpoint(confident):
    model, _ = confident
    plan = decoding_plan(model.generation_config, model.config, max_new_tokens=10)
    assert plan.max_new_tokens == 10 and plan.num_blocks == 3
    assert plan.block_size == model.config.block_size and plan.mask_token_id == model.config.mask_token_id
    assert plan.threshold == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------- vLLM's contract
def run_vllm_contract(model, inputs, slot, max_tokens: int, max_model_len: int, stop_ids) -> list[int]:
    """Drive a `CanvasSlot` the way vLLM 0.33's diffusion runner does (docs/serving/engines.md), with the
    transformers model as the engine: a causal prefill that returns no logits; then canvas forwards of B tokens after
    the cache (fewer where the context ends), bidirectional over cache and canvas, whose logit rows go to the slot;
    the KV of the first k canvas tokens stays where the slot emits k tokens, the rest is dropped; the request stops on
    a token of `stop_ids`, at `max_tokens` or at `max_model_len` (vLLM's `check_stop`). Returns the emitted tokens."""
    from transformers import DynamicCache

    input_ids = inputs["input_ids"]
    P = input_ids.shape[1]
    mm_types, prompt_positions, response_start = prompt_rope(model, inputs)
    cache = DynamicCache(config=model.config)
    causal = torch.ones(P, P, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=causal, position_ids=prompt_positions, cache=cache, use_cache=True,
              pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
              mm_token_type_ids=mm_types, logits_mask=torch.zeros_like(input_ids, dtype=torch.bool))
    canvas, emitted, cached = slot.finish_prefill(), [], P
    while True:
        width = min(slot.block_size, max_model_len - cached)
        canvas = (canvas or [0] * slot.block_size)[:width]  # a finished slot's canvas is whatever is left
        positions = (response_start + cached - P + torch.arange(width))[None, None].expand(3, 1, -1)
        everything = torch.ones(1, 1, width, cached + width, dtype=torch.bool)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([canvas]), attention_mask=everything, position_ids=positions,
                           cache=cache, use_cache=True).logits[0]  # [width, vocab]
        emit, canvas = slot.step(logits)
        assert len(emit) <= width
        if width - len(emit):
            cache.crop(-(width - len(emit)))
        cached += len(emit)
        for token in emit:
            emitted.append(token)
            if token in stop_ids or len(emitted) >= max_tokens or cached >= max_model_len:
                return emitted  # vLLM trims anything after the stop


@pytest.mark.parametrize("case", ["defaults", "static", "revision", "eos_tail_fill", "length_cut"])
def test_vllm_contract_answers_what_generate_answers_unfused(confident, case):
    """The forwards vLLM's diffusion runner allows (causal prefill, bidirectional canvas, KV kept only for emitted
    tokens) decode exactly `generate(fuse_commit=False, prefill_step=False)` for a causal-prompt checkpoint."""
    from transformers_bard.integrations.vllm.canvas import CanvasSlot

    model, processor = confident
    options = {"max_new_tokens": 24, **CASES[case], "fuse_commit": False, "prefill_step": False}
    model.config.prompt_attention = "causal"
    try:
        for text, size in [("What color is the square?", (32, 32)), ("hello there, how are you doing today?", None)]:
            inputs = prompt_inputs(processor, text, make_image(3, size) if size else None)
            out = model.generate(**inputs, return_dict_in_generate=True, **options)
            expected = out.sequences[0, inputs["input_ids"].shape[1]:][: int(out.num_generated_tokens[0])].tolist()
            config = model.generation_config.__class__.from_dict({**model.generation_config.to_dict(), **options})
            slot = CanvasSlot(inputs["input_ids"].shape[1], decoding_plan(config, model.config),
                              max_model_len=4096, end_token=-1)
            got = run_vllm_contract(model, inputs, slot, options["max_new_tokens"], 4096,
                                    model.generation_config.eos_token_id)
            assert got == expected, (text, case)
            assert not slot.cut_by_context and not slot.sent_end_token
    finally:
        model.config.prompt_attention = "block_causal"


def test_vllm_contract_limits_the_answer_to_blocks_that_fit_the_context(confident):
    from transformers_bard.integrations.vllm.canvas import CanvasSlot

    model, processor = confident
    model.config.prompt_attention = "causal"
    try:
        inputs = prompt_inputs(processor, "hello there, how are you doing today?")
        P, B = inputs["input_ids"].shape[1], model.config.block_size
        max_model_len = P + 2 * B + 1  # room for two whole blocks, not three
        options = {"max_new_tokens": 3 * B, "fuse_commit": False, "prefill_step": False}
        # generate's answer, limited to the two blocks that fit
        out = model.generate(**inputs, return_dict_in_generate=True, **{**options, "max_new_tokens": 2 * B})
        expected = out.sequences[0, P:][: int(out.num_generated_tokens[0])].tolist()
        config = model.generation_config.__class__.from_dict({**model.generation_config.to_dict(), **options})
        slot = CanvasSlot(P, decoding_plan(config, model.config), max_model_len=max_model_len, end_token=99)
        assert slot.cut_by_context
        got = run_vllm_contract(model, inputs, slot, 3 * B, max_model_len, [*model.generation_config.eos_token_id, 99])
        stopped_by_eos = expected[-1] in model.generation_config.eos_token_id
        assert got == (expected if stopped_by_eos else expected + [99])
        assert slot.sent_end_token == (not stopped_by_eos)
        assert slot.request.finish_reason == ("stop" if stopped_by_eos else "length")
        # no whole block fits: an empty answer, ended by the end token at the first canvas
        slot = CanvasSlot(P, decoding_plan(config, model.config), max_model_len=P + B - 1, end_token=99)
        assert run_vllm_contract(model, inputs, slot, 3 * B, P + B - 1, [99]) == [99]
    finally:
        model.config.prompt_attention = "block_causal"


def test_vllm_path_refuses_what_it_cannot_decode_exactly(confident):
    from transformers_bard.integrations.vllm.canvas import check_servable

    model, _ = confident
    with pytest.raises(ValueError, match="prompt_attention.*'block_causal'.*prompt_attention='causal'"):
        check_servable(model.config)
    config = model.config.__class__.from_dict({**model.config.to_dict(), "prompt_attention": "causal"})
    check_servable(config)
    config.prediction_shift = True
    with pytest.raises(ValueError, match="prediction_shift"):
        check_servable(config)
