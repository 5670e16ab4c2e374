"""BlockDiffusionCollator: packed [prefix ; x0 ; xt] batches from chat rows (DESIGN 3.1, 3.3)."""

import math

import pytest
import torch
from datasets import Dataset

from conftest import tiny_chat_rows
from transformers_bard.models.bard_vl import CLEAN, NOISY, PAD, PREFIX
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.noise import MixedNoiseScheduler
from transformers_bard.testing import make_image
from transformers_bard.trainer.collator import (
    SAMPLE_INDEX_COLUMN,
    BlockDiffusionCollator,
    ordinary_token_ids,
    sample_noise_seed,
)


@pytest.fixture(scope="module")
def processor(tiny_bard_vl_dir):
    return BardVLProcessor.from_pretrained(tiny_bard_vl_dir)


@pytest.fixture(scope="module")
def mask_id(processor):
    return processor.tokenizer.convert_tokens_to_ids("<|mask|>")


def chat(user, answer, images=0, earlier=()):
    """A TRL vision-format row; `earlier` holds (user, assistant) turns before the last one."""
    messages = []
    for question, reply in earlier:
        messages += [
            {"role": "user", "content": [{"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]},
        ]
    content = [{"type": "image"}] * images + [{"type": "text", "text": user}]
    messages += [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {"messages": messages, "images": [make_image(i, (32 * (i + 1), 32)) for i in range(images)]}


def with_index(rows, start=0):
    return [{**row, SAMPLE_INDEX_COLUMN: start + i} for i, row in enumerate(rows)]


def reference_split(processor, row):
    """Prefix/response token ids computed independently: the prefix is the chat without its last assistant turn,
    rendered with the generation prompt; the response is the tokenized answer plus <|im_end|>."""
    head = processor.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
    encoded = processor(text=[head], images=row["images"] or None, return_tensors="pt")
    answer = row["messages"][-1]["content"][0]["text"]
    tokenizer = processor.tokenizer
    response = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return encoded, response


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_packed_layout_matches_independent_split(processor, mask_id, block_size):
    rows = with_index(
        [
            chat("What color is the box?", "The box is red.", images=1),
            chat("Say hi.", "Hi there, how are you today? I am fine.", earlier=[("First?", "Yes, first.")]),
            chat("Two pictures?", "Two.", images=2),
        ]
    )
    collator = BlockDiffusionCollator(processor, mask_id, block_size=block_size)
    batch = collator(rows)
    end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    refs = [reference_split(processor, row) for row in rows]
    P = max(ref[0]["input_ids"].shape[1] for ref in refs)
    lengths = [math.ceil(len(ref[1]) / block_size) * block_size for ref in refs]
    R = max(lengths)
    assert batch["input_ids"].shape == (3, P + 2 * R)
    assert batch["response_lengths"].tolist() == lengths
    for i, (encoded, response) in enumerate(refs):
        ids, seg = batch["input_ids"][i], batch["segment_ids"][i]
        n = encoded["input_ids"].shape[1]
        # left-padded prefix equal to the independently rendered prompt, image tokens marked
        assert ids[P - n : P].tolist() == encoded["input_ids"][0].tolist()
        assert (seg[: P - n] == PAD).all() and (seg[P - n : P] == PREFIX).all()
        assert batch["mm_token_type_ids"][i, P - n : P].tolist() == encoded["mm_token_type_ids"][0].tolist()
        assert (batch["mm_token_type_ids"][i, P:] == 0).all()
        # x0: response + EOS padding to a multiple of B, then PAD
        x0 = ids[P : P + R]
        padded = response + [end_id] * (lengths[i] - len(response))
        assert x0[: lengths[i]].tolist() == padded
        assert (seg[P : P + lengths[i]] == CLEAN).all() and (seg[P + lengths[i] : P + R] == PAD).all()
        assert (seg[P + R : P + R + lengths[i]] == NOISY).all() and (seg[P + R + lengths[i] :] == PAD).all()
        # xt: mask prior -> each position is the clean token or <|mask|>; loss exactly at the masked positions
        xt = ids[P + R : P + R + lengths[i]]
        masked = xt == mask_id
        assert torch.equal(xt[~masked], x0[: lengths[i]][~masked])
        assert torch.equal(batch["logits_mask"][i, P + R : P + R + lengths[i]], masked)
        assert not batch["logits_mask"][i, : P + R].any() and not batch["logits_mask"][i, P + R + lengths[i] :].any()
        labels = batch["labels"][i]
        assert torch.equal(labels[batch["logits_mask"][i]], x0[: lengths[i]][masked])
        assert (labels[~batch["logits_mask"][i]] == -100).all()
        # rates: one value per block, inside (0, 1]; EOS padding flagged past the real end
        rates = batch["rates"][i, P + R : P + R + lengths[i]].view(-1, block_size)
        assert (rates == rates[:, :1]).all() and (rates > 0).all() and (rates <= 1).all()
        assert (batch["rates"][i, : P + R] == 0).all()
        eos = batch["is_eos_padding"][i, P + R : P + R + lengths[i]]
        assert eos.tolist() == [False] * len(response) + [True] * (lengths[i] - len(response))
    # images of the batch: rows in order, each row's images in order
    expected_pixels = torch.cat([ref[0]["pixel_values"] for ref in refs if "pixel_values" in ref[0]])
    expected_grid = torch.cat([ref[0]["image_grid_thw"] for ref in refs if "image_grid_thw" in ref[0]])
    torch.testing.assert_close(batch["pixel_values"], expected_pixels)
    assert torch.equal(batch["image_grid_thw"], expected_grid)
    assert batch["sample_ids"].tolist() == [0, 1, 2]


def test_text_only_batch_has_no_pixels(processor, mask_id):
    batch = BlockDiffusionCollator(processor, mask_id)(with_index([chat("Hi?", "Hello.")]))
    assert "pixel_values" not in batch and "image_grid_thw" not in batch


def test_string_contents_get_image_placeholders_like_trl(processor, mask_id):
    """TRL's vision format also allows string contents: the images go before the first user text."""
    row = {
        "messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A red box."}],
        "images": [make_image(0)],
        SAMPLE_INDEX_COLUMN: 0,
    }
    batch = BlockDiffusionCollator(processor, mask_id)([row])
    assert batch["image_grid_thw"].shape == (1, 3)
    assert (batch["mm_token_type_ids"] == 1).sum() == batch["image_grid_thw"].prod() // 4


def test_rows_from_an_arrow_dataset(processor, mask_id):
    """`datasets` stores content blocks with the union of their keys (None-filled) and images as an Image feature."""
    dataset = Dataset.from_list(tiny_chat_rows(3)).add_column(SAMPLE_INDEX_COLUMN, [0, 1, 2])
    batch = BlockDiffusionCollator(processor, mask_id)([dataset[i] for i in range(3)])
    assert batch["image_grid_thw"].shape[0] == 2  # rows 0 and 1 have an image, row 2 is text-only


def test_noise_depends_on_the_sample_not_the_batch(processor, mask_id):
    """Per-sample seeding (index, epoch, block size): same sample, same noise in any batch, position or split."""
    scheduler = MixedNoiseScheduler(prior="mix")
    collator = BlockDiffusionCollator(processor, mask_id, noise_scheduler=scheduler, seed=3)
    rows = with_index([chat("Q?", "A long answer with many words in it."), chat("R?", "Other answer words.")])

    def noisy_response(batch, row):
        P_plus_R = batch["input_ids"].shape[1] - batch["response_lengths"].max()
        length = batch["response_lengths"][row]
        return batch["input_ids"][row, P_plus_R : P_plus_R + length], batch["rates"][row, P_plus_R : P_plus_R + length]

    alone = noisy_response(collator([rows[1]]), 0)
    together = noisy_response(collator([rows[0], rows[1]]), 1)
    swapped = noisy_response(collator([rows[1], rows[0]]), 0)
    for other in (together, swapped):
        assert torch.equal(alone[0], other[0]) and torch.equal(alone[1], other[1])
    collator.epoch = 1
    assert not torch.equal(noisy_response(collator([rows[1]]), 0)[1], alone[1])  # new epoch, new noise
    assert sample_noise_seed(3, 1, 0, 4) != sample_noise_seed(3, 2, 0, 4) != sample_noise_seed(3, 1, 0, 8)


def test_block_size_is_settable_between_stages(processor, mask_id):
    collator = BlockDiffusionCollator(processor, mask_id, block_size=4)
    rows = with_index([chat("Q?", "An answer.")])
    assert collator(rows)["response_lengths"].item() % 4 == 0
    collator.block_size = 16
    assert collator(rows)["response_lengths"].item() == 16
    with pytest.raises(ValueError, match="block_size"):
        collator.block_size = 0


def test_random_substitutes_are_ordinary_tokens(processor, mask_id):
    tokenizer = processor.tokenizer
    ordinary = ordinary_token_ids(tokenizer, exclude=(mask_id,))
    special = set(tokenizer.added_tokens_decoder)
    assert mask_id in special and not special & set(ordinary.tolist())
    assert len(ordinary) == len(tokenizer) - len(special)
    collator = BlockDiffusionCollator(processor, mask_id, noise_scheduler=MixedNoiseScheduler(prior="uniform"))
    batch = collator(with_index([chat("Q?", " ".join(["word"] * 40))]))
    R = batch["response_lengths"].item()
    x0, xt = batch["input_ids"][0, -2 * R : -R], batch["input_ids"][0, -R:]
    corrupted = batch["logits_mask"][0, -R:]
    assert corrupted.any()
    assert not (xt == mask_id).any()  # uniform prior: substitutes only
    assert torch.isin(xt[corrupted], ordinary).all()
    assert torch.equal(xt[~corrupted], x0[~corrupted])


def test_bad_rows_raise_naming_the_row(processor, mask_id):
    collator = BlockDiffusionCollator(processor, mask_id, max_length=40)
    good = chat("Q?", "Fine.")
    no_reply = {"messages": good["messages"][:1], "images": []}
    too_long = chat("Q?", " ".join(["word"] * 60))
    placeholder_without_image = {**chat("Q?", "A.", images=1), "images": []}
    image_without_placeholder = {**chat("Q?", "A."), "images": [make_image(0)]}
    cases = {
        "no assistant turn": no_reply,
        "exceeds max_length=40": too_long,
        "does not match number of image placeholders": placeholder_without_image,
        "Number of images provided": image_without_placeholder,
    }
    assert collator.example_problem(good) is None
    for message, row in cases.items():
        assert message in collator.example_problem(row)
        with pytest.raises(ValueError, match=rf"Row 7 of the training data cannot be trained on: .*{message}"):
            collator(with_index([good, row], start=6))
    # the length bound depends on the block size: a row may fit at B = 4 and not at B = 32
    collator.max_length = 30
    short = chat("Q?", "It is.")
    assert collator.example_problem(short, block_size=4) is None
    assert "max_length" in collator.example_problem(short, block_size=32)
    with pytest.raises(ValueError, match=SAMPLE_INDEX_COLUMN):
        collator([good])


def test_constructor_checks(processor, mask_id):
    with pytest.raises(ValueError, match="mask_token_id"):
        BlockDiffusionCollator(processor, None)
    with pytest.raises(ValueError, match="tokenizer"):
        BlockDiffusionCollator(processor.tokenizer, mask_id)
    with pytest.raises(ValueError, match="max_length"):
        BlockDiffusionCollator(processor, mask_id, max_length=0)


def test_workers_see_epoch_and_progress_updates(processor, mask_id):
    """Persistent DataLoader workers collate in other processes: the trainer's updates must reach them."""
    scheduler = MixedNoiseScheduler(prior="mask", switch_prior="uniform", switch_at=0.5)
    collator = BlockDiffusionCollator(processor, mask_id, noise_scheduler=scheduler)
    rows = with_index([chat("Q?", " ".join(["word"] * 30))])
    loader = torch.utils.data.DataLoader(
        rows, batch_size=1, collate_fn=collator, num_workers=1, persistent_workers=True
    )
    first = next(iter(loader))
    collator.epoch = 1
    second = next(iter(loader))
    collator.progress = 0.75  # past switch_at: random substitutes instead of masks
    third = next(iter(loader))
    assert not torch.equal(first["rates"], second["rates"])
    assert (first["input_ids"] == mask_id).any() and not (third["input_ids"] == mask_id).any()
