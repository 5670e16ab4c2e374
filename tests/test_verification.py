"""Verified decoding (DESIGN 4.2 a, `verification_bard_vl`): `bard.generate(**inputs, verifier=ar)` equals
`ar.generate(**inputs, do_sample=False)` token for token, whatever the drafts are.

The drafters: an unrelated random BARD model (its drafts are almost always rejected), an oracle drafter that proposes
the AR answer except at chosen positions (accept/redraft paths with exact forward counts), and, in the slow test, a
BARD model trained by block merging from the shipped digits AR model, verified by that AR model.
"""

import pytest
import torch
from transformers import LogitsProcessorList, Qwen3VLForConditionalGeneration, TopKLogitsWarper

from test_generation import CONFIDENT, left_pad, make_model, make_prompt
from transformers_bard.models.bard_vl.verification_bard_vl import accept_prefix, place_verified
from transformers_bard.testing import tiny_qwen3_vl_config

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_NEW = 11  # not a multiple of the block size


@pytest.fixture(scope="module")
def ar_model():
    """A stock tiny Qwen3-VL (another seed than the drafters), LM head scaled so its argmax has clear margins."""
    config = tiny_qwen3_vl_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(CONFIDENT)
    return model


def inputs_of(prompts):
    ids, attention, pixels, grid = left_pad(prompts)
    inputs = {"input_ids": ids, "attention_mask": attention}
    if pixels is not None:  # as the processor returns them: the AR model needs the token types for M-RoPE
        inputs.update(pixel_values=pixels, image_grid_thw=grid,
                      mm_token_type_ids=(ids == tiny_qwen3_vl_config().image_token_id).int())
    return inputs


def ar_answer(ar_model, inputs, **options):
    options = {"max_new_tokens": MAX_NEW, "eos_token_id": None, "pad_token_id": 0, **options}
    return ar_model.generate(**inputs, do_sample=False, **options)


# ---------------------------------------------------------------------------------------------- the rule
def test_accept_prefix_and_place_verified_by_hand():
    drafts = torch.tensor([5, 6, 7])
    assert accept_prefix(drafts, torch.tensor([5, 6, 7, 8])) == (3, 8)  # all agree: the token after them
    assert accept_prefix(drafts, torch.tensor([5, 9, 7, 8])) == (1, 9)  # first mismatch at draft 1
    assert accept_prefix(drafts, torch.tensor([4, 6, 7, 8])) == (0, 4)  # agreeing later does not count
    assert accept_prefix(drafts[:0], torch.tensor([3])) == (0, 3)  # nothing drafted: one verifier token
    block = torch.tensor([1, 5, 6, 7])
    new, fixed, position = place_verified(block, 1, 1, 9, mask_token_id=0)
    assert new.tolist() == [1, 5, 9, 0] and fixed == 3 and position == 2
    new, fixed, position = place_verified(block, 1, 3, 8, mask_token_id=0)
    assert new.tolist() == [1, 5, 6, 7] and fixed == 4 and position == 4  # position B: the next block's first
    with pytest.raises(ValueError, match="one entry more"):
        accept_prefix(drafts, drafts)


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("with_image", [False, True])
def test_random_drafter_gives_the_ar_answer_batched_and_per_row(ar_model, block_size, with_image):
    """An unrelated untrained drafter: the output is still the AR answer; a left-padded batch (different prompt
    lengths, images) equals the AR's batched `generate` and each row's own verified run."""
    drafter = make_model(block_size, seed=0)
    prompts = [make_prompt(seed, 4 + 3 * seed, with_image) for seed in range(3)]
    inputs = inputs_of(prompts)
    want = ar_answer(ar_model, inputs)
    got = drafter.generate(**inputs, verifier=ar_model, max_new_tokens=MAX_NEW, pad_token_id=0,
                           return_dict_in_generate=True)
    assert torch.equal(got.sequences, want)
    assert got.num_generated_tokens.tolist() == [MAX_NEW] * 3
    assert torch.equal(got.num_forwards, got.num_draft_forwards + got.num_verify_forwards)
    assert [len(a) - 1 for a in got.accepted_lengths] == got.num_verify_forwards.tolist()  # + the prefill's check
    for row, prompt in enumerate(prompts):
        one = inputs_of([prompt])
        single = drafter.generate(**one, verifier=ar_model, max_new_tokens=MAX_NEW, pad_token_id=0)
        assert torch.equal(single[0, one["input_ids"].shape[1]:], got.sequences[row, inputs["input_ids"].shape[1]:])


def test_eos_inside_a_block_and_eos_lists(ar_model):
    """EOS ids taken from the AR answer (so it stops inside a block, at different places per row): the verified
    output stops at the same first EOS and pads the same way; a list of EOS ids works like the AR's."""
    drafter = make_model(4, seed=0)
    prompts = [make_prompt(seed, 5 + seed, seed % 2 == 1) for seed in range(3)]
    inputs = inputs_of(prompts)
    P = inputs["input_ids"].shape[1]
    free = ar_answer(ar_model, inputs, max_new_tokens=16)[:, P:]
    # row 0 stops at its 6th token (inside block 1), row 1 at its first (decided by the verifier's prefill: no
    # forward after it), row 2 at its first token of that id, if any
    eos = [int(free[0, 5]), int(free[1, 0]), int(free[2, 2])]
    want = ar_answer(ar_model, inputs, max_new_tokens=16, eos_token_id=eos)
    got = drafter.generate(**inputs, verifier=ar_model, max_new_tokens=16, eos_token_id=eos, pad_token_id=0,
                           return_dict_in_generate=True)
    assert torch.equal(got.sequences, want)
    assert int(got.num_generated_tokens[0]) <= 6 and len(set(got.num_generated_tokens.tolist())) == 3
    assert int(got.num_generated_tokens[1]) == 1 and int(got.num_verify_forwards[1]) == 0


def scripted_drafter(drafter, monkeypatch, answer, response_start, wrong_at=()):
    """Patch the drafter so that every position it is asked about gets the AR `answer` token (one-hot logits), or a
    wrong token at the response offsets in `wrong_at`. Offsets come from the text axis of the position ids."""
    real_forward, vocab = drafter.forward, drafter.config.text_config.vocab_size

    def scripted(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        wanted = kwargs["logits_mask"]
        if wanted.any():
            offsets = (kwargs["position_ids"][0][wanted] - response_start).tolist()
            logits = torch.full((len(offsets), vocab), -1e4)
            for i, j in enumerate(offsets):
                token = answer[j] if j < len(answer) else 0
                logits[i, (token + 1) % 400 if j in wrong_at else token] = 0.0
            out.logits = logits
        return out

    monkeypatch.setattr(drafter, "forward", scripted)


def test_accepted_drafts_and_redrafts_count_exactly(ar_model, monkeypatch):
    """B = 4, 11 tokens, an oracle drafter: blocks are accepted whole ([4, 3, 2]: block 0's four drafts are checked
    in the verifier's prefill; position 0 of a later block is the verifier's token; block 2's last draft lies past
    `max_new_tokens` and is not checked), 2 draft forwards (block 0's drafts ride in BARD's prefill) and 2 checks
    after the verifier's prefill. A wrong draft at offset 5 is rejected, the verifier's token replaces it, positions
    6-7 are redrafted: [4, 0, 2, 2] and one draft and one check more."""
    drafter = make_model(4, seed=0)
    prompt = make_prompt(3, 6, False)
    inputs = inputs_of([prompt])
    P = inputs["input_ids"].shape[1]
    want = ar_answer(ar_model, inputs)
    answer = want[0, P:].tolist()
    scripted_drafter(drafter, monkeypatch, answer, response_start=P)
    out = drafter.generate(**inputs, verifier=ar_model, max_new_tokens=MAX_NEW, pad_token_id=0,
                           return_dict_in_generate=True, output_trace=True)
    assert torch.equal(out.sequences, want)
    assert out.accepted_lengths == [[4, 3, 2]]
    assert (int(out.num_draft_forwards[0]), int(out.num_verify_forwards[0])) == (2, 2)
    assert out.tokens_per_forward.tolist() == pytest.approx([MAX_NEW / 4])
    scripted_drafter(drafter, monkeypatch, answer, response_start=P, wrong_at={5})
    out = drafter.generate(**inputs, verifier=ar_model, max_new_tokens=MAX_NEW, pad_token_id=0,
                           return_dict_in_generate=True, output_trace=True)
    assert torch.equal(out.sequences, want)
    assert out.accepted_lengths == [[4, 0, 2, 2]]
    assert (int(out.num_draft_forwards[0]), int(out.num_verify_forwards[0])) == (3, 3)
    trace = out.trace[0]
    assert len(trace) == int(out.num_forwards[0]) + 2
    checks = [event for event in trace if event["kind"] in ("verify", "verifier_prefill")]
    assert [event["kind"] for event in checks] == ["verifier_prefill"] + ["verify"] * 3
    assert [event["accepted"] for event in checks] == [4, 0, 2, 2]
    rejected = checks[1]
    assert rejected["rejected"] == [[1, (answer[5] + 1) % 400]] and rejected["verified"] == [[1, answer[5]]]
    assert rejected["block_tokens"][2:] == [drafter.config.mask_token_id] * 2  # masked again, then redrafted


@pytest.mark.parametrize("index", [0, 5])
def test_a_verified_mask_id_is_decoded_by_the_verifier_alone(ar_model, monkeypatch, index):
    """The AR model may emit the mask id (nothing stops an AR model from predicting any id): BARD's canvas cannot
    hold it as a decided token, so the verifier decodes the rest of that block alone; the output is still the AR's,
    whether the mask id is the answer's first token (the verifier's prefill) or a later one."""
    drafter = make_model(4, seed=0)
    inputs = inputs_of([make_prompt(3, 6, False)])
    P = inputs["input_ids"].shape[1]
    want = ar_answer(ar_model, inputs)
    mask_id = int(want[0, P + index])  # pretend this AR token is the mask id
    monkeypatch.setattr(drafter.config, "mask_token_id", mask_id)
    got = drafter.generate(**inputs, verifier=ar_model, max_new_tokens=MAX_NEW, pad_token_id=0,
                           return_dict_in_generate=True)
    assert torch.equal(got.sequences, want)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"temperature": 0.7}, "greedy"),
        ({"do_sample": True, "temperature": 1.0}, "greedy"),
        ({"logits_processor": LogitsProcessorList([TopKLogitsWarper(3)])}, "logits_processor"),
        ({"generator": torch.Generator()}, "generator"),
    ],
)
def test_what_verification_cannot_reproduce_is_refused(ar_model, options, match):
    drafter = make_model(4, seed=0)
    with pytest.raises(ValueError, match=match):
        drafter.generate(**inputs_of([make_prompt(0, 5, False)]), verifier=ar_model, max_new_tokens=4, **options)


def test_bad_verifiers_are_refused(ar_model, monkeypatch):
    drafter = make_model(4, seed=0)
    inputs = inputs_of([make_prompt(0, 5, False)])
    with pytest.raises(ValueError, match="not a name or path"):
        drafter.generate(**inputs, verifier="Qwen/Qwen3-VL-2B-Instruct", max_new_tokens=4)
    with pytest.raises(ValueError, match="block-diffusion model"):
        drafter.generate(**inputs, verifier=make_model(4, seed=1), max_new_tokens=4)
    monkeypatch.setattr(ar_model.generation_config, "repetition_penalty", 1.2)
    with pytest.raises(ValueError, match="repetition_penalty"):
        drafter.generate(**inputs, verifier=ar_model, max_new_tokens=4)


# ---------------------------------------------------------------------------------------------- a trained drafter
@pytest.mark.slow
def test_trained_drafter_gives_the_ar_answer_and_is_accepted(trained_digits_b8):
    """The digits AR model, and a BARD model trained from it (block merging, B = 8, 30 steps): on 8 test rows with
    images, verified decoding returns the AR model's own greedy answer, and the trained drafts are accepted often
    enough that it takes fewer forwards than AR decoding (one per token)."""
    from transformers_bard.demo.digits import build_digits_dataset, load_digits_ar_path, prompt_messages

    model, processor = trained_digits_b8
    ar = Qwen3VLForConditionalGeneration.from_pretrained(load_digits_ar_path()).eval()
    tokens = drafted = 0
    for row in build_digits_dataset("test", 8, seed=1):
        text = processor.apply_chat_template(prompt_messages(row["messages"]), add_generation_prompt=True)
        inputs = processor(images=row["images"], text=[text], return_tensors="pt")
        options = dict(max_new_tokens=48, eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
        want = ar.generate(**inputs, do_sample=False, **options)
        got = model.generate(**inputs, verifier=ar, threshold=0.9, return_dict_in_generate=True, **options)
        assert torch.equal(got.sequences, want), row["question_type"]
        tokens += int(got.num_generated_tokens[0])
        drafted += sum(got.accepted_lengths[0])
    assert drafted / tokens > 0.3  # measured 0.49 (131 of 268 tokens)


def test_draft_threshold_changes_the_cost_not_the_answer(ar_model):
    """`draft_threshold` sets the drafts' tau under a verifier only: tau 1.0 drafts one token per forward, tau 0.01
    nearly a block per forward; both give the AR answer, the second with fewer draft forwards."""
    drafter = make_model(8, seed=0)
    inputs = inputs_of([make_prompt(seed, 6, False) for seed in range(2)])
    want = ar_answer(ar_model, inputs, max_new_tokens=16)
    outs = {tau: drafter.generate(**inputs, verifier=ar_model, max_new_tokens=16, pad_token_id=0,
                                  draft_threshold=tau, return_dict_in_generate=True) for tau in (1.0, 0.01)}
    for out in outs.values():
        assert torch.equal(out.sequences, want)
    assert int(outs[0.01].num_draft_forwards.sum()) < int(outs[1.0].num_draft_forwards.sum())
    with pytest.raises(ValueError, match="draft_threshold"):
        drafter.generate(**inputs, verifier=ar_model, max_new_tokens=4, draft_threshold=0.0)
