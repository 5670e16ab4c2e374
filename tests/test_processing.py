"""Tests of BardVLProcessor: Qwen3-VL's processor for images without torchvision (DESIGN 5, 6)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from transformers_bard.models.bard_vl import processing_bard_vl
from transformers_bard.models.bard_vl.processing_bard_vl import (
    BardVLProcessor,
    assistant_tokens_mask,
    mark_processor_files,
)
from transformers_bard.testing import QWEN3_VL_CHAT_TEMPLATE, make_image, tiny_chat_messages

IMAGE_PAD, VISION_START, VISION_END, IM_START, IM_END = 460, 457, 458, 449, 450

# Hand-computed with Qwen's smart_resize (multiples of 32 pixels, 32 * 32 <= pixels <= 64 * 64 for the tiny
# checkpoint): (width, height) -> image_grid_thw in 16-pixel patches.
EXPECTED_GRIDS = {
    (32, 32): [1, 2, 2],
    (64, 64): [1, 4, 4],
    (64, 32): [1, 2, 4],
    (16, 16): [1, 2, 2],  # upscaled to the 32 * 32 minimum
    (200, 200): [1, 4, 4],  # downscaled to the 64 * 64 maximum
    (100, 50): [1, 2, 4],
}

# Same output as QWEN3_VL_CHAT_TEMPLATE for plain user/assistant turns, with {% generation %} markers around each
# reply and its <|im_end|>: the reference for transformers' own assistant mask.
MARKED_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.role == 'assistant' -%}"
    "{% generation %}{%- for part in message.content -%}{{- part.text -}}{%- endfor -%}{{- '<|im_end|>' -}}"
    "{% endgeneration %}"
    "{%- else -%}"
    "{%- for part in message.content -%}"
    "{%- if part.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{{- '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def processor(tiny_qwen3_vl_dir):
    return BardVLProcessor.from_pretrained(tiny_qwen3_vl_dir)


def test_loads_from_a_stock_qwen3_vl_folder(processor, tiny_qwen3_vl_dir):
    # The folder declares Qwen3VLProcessor, the torchvision image processor and a video processor.
    declared = json.loads((tiny_qwen3_vl_dir / "preprocessor_config.json").read_text())
    assert declared["image_processor_type"] == "Qwen2VLImageProcessorFast"
    assert type(processor.image_processor) is Qwen2VLImageProcessorPil
    assert processor.get_attributes() == ["image_processor", "tokenizer"]
    assert not hasattr(processor, "video_processor")
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (16, 2)
    assert processor.image_processor.size["shortest_edge"] == 32 * 32
    assert processor.image_processor.size["longest_edge"] == 64 * 64
    # The chat template comes from chat_template.json and is shared with the tokenizer.
    assert processor.chat_template == QWEN3_VL_CHAT_TEMPLATE
    assert processor.tokenizer.chat_template == QWEN3_VL_CHAT_TEMPLATE
    assert (processor.image_token_id, processor.video_token_id) == (IMAGE_PAD, 461)
    assert (processor.vision_start_token_id, processor.vision_end_token_id) == (VISION_START, VISION_END)


@pytest.mark.parametrize("size", sorted(EXPECTED_GRIDS))
def test_image_token_count_is_grid_product_over_merge_squared(processor, size):
    inputs = processor(images=[make_image(0, size)], text=["a <|image_pad|> b"], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [EXPECTED_GRIDS[size]]
    num_tokens = int(grid.prod()) // 2**2
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(IMAGE_PAD) == num_tokens
    start = ids.index(IMAGE_PAD)
    assert ids[start : start + num_tokens] == [IMAGE_PAD] * num_tokens
    assert inputs["mm_token_type_ids"][0].tolist() == [int(token == IMAGE_PAD) for token in ids]
    # [patches, channels * temporal_patch * patch * patch]
    assert inputs["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 16 * 16)


def test_pixels_are_normalised_with_mean_and_std_one_half(processor):
    image = Image.new("RGB", (32, 32), (255, 0, 51))
    pixels = processor(images=[image], text=["<|image_pad|>"], return_tensors="pt")["pixel_values"]
    # Each patch row is laid out (channel, time, row, column): 512 values per channel.
    expected = torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]).repeat_interleave(512)
    torch.testing.assert_close(pixels, expected.expand(4, -1))


def test_text_only_matches_the_tokenizer(processor):
    text = "The red square is at the top."
    inputs = processor(text=[text])
    assert inputs["input_ids"] == [processor.tokenizer.encode(text)]
    assert inputs["mm_token_type_ids"] == [[0] * len(inputs["input_ids"][0])]


def test_batch_of_images_of_different_sizes(processor):
    images = [make_image(0, (32, 32)), make_image(1, (64, 64))]
    inputs = processor(
        images=images, text=["<|image_pad|> one", "<|image_pad|> two"], padding=True, return_tensors="pt"
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 4]]
    assert (inputs["input_ids"] == IMAGE_PAD).sum(dim=1).tolist() == [1, 4]
    assert inputs["pixel_values"].shape[0] == 4 + 16


def test_chat_template_with_image_tokenizes_like_the_rendered_text(processor):
    messages = tiny_chat_messages([make_image(0, (64, 64))], system="Be brief.", turns=(("What is it?", None),))
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * 4)
    assert inputs["input_ids"][0].tolist() == processor.tokenizer.encode(expanded)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "BardVLProcessor"
    assert saved["auto_map"] == {"AutoProcessor": "processing_bard_vl.BardVLProcessor"}
    assert "video_processor" not in saved
    assert (tmp_path / "processing_bard_vl.py").is_file()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"

    reloaded = BardVLProcessor.from_pretrained(tmp_path)
    assert type(reloaded.image_processor) is Qwen2VLImageProcessorPil
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.image_processor.size == processor.image_processor.size
    messages = tiny_chat_messages([make_image(5, (64, 32))], turns=(("Describe.", "Noise."),))
    kwargs = {"tokenize": True, "return_dict": True, "return_tensors": "pt"}
    before = processor.apply_chat_template(messages, **kwargs)
    after = reloaded.apply_chat_template(messages, **kwargs)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(before[key], after[key])


def test_save_keeps_the_video_processor_file_engines_need(processor, tiny_qwen3_vl_dir, tmp_path):
    """transformers >= 5.20 writes only processor_config.json (no video entry: this processor has no video
    processor); the folder's video_preprocessor_config.json is written back, so vLLM, which builds Qwen3-VL's video
    processor, can load a checkpoint the trainers saved. It travels through a second save too."""
    source = json.loads((tiny_qwen3_vl_dir / "video_preprocessor_config.json").read_text())
    processor.save_pretrained(tmp_path / "once")
    assert json.loads((tmp_path / "once" / "video_preprocessor_config.json").read_text()) == source
    BardVLProcessor.from_pretrained(tmp_path / "once").save_pretrained(tmp_path / "twice")
    assert json.loads((tmp_path / "twice" / "video_preprocessor_config.json").read_text()) == source
    built = BardVLProcessor(processor.image_processor, processor.tokenizer)  # built in code: no file to write back
    built.save_pretrained(tmp_path / "built")
    assert not (tmp_path / "built" / "video_preprocessor_config.json").exists()


def test_mark_processor_files_points_a_stock_folder_at_bard(processor, tiny_qwen3_vl_dir, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_qwen3_vl_dir, folder)
    before = json.loads((folder / "preprocessor_config.json").read_text())
    assert mark_processor_files(folder) == ["preprocessor_config.json", "video_preprocessor_config.json"]
    after = json.loads((folder / "preprocessor_config.json").read_text())
    assert after == {
        **before,
        "processor_class": "BardVLProcessor",
        "auto_map": {"AutoProcessor": "processing_bard_vl.BardVLProcessor"},
    }
    video = json.loads((folder / "video_preprocessor_config.json").read_text())
    assert video["processor_class"] == "BardVLProcessor"
    assert (folder / "processing_bard_vl.py").read_bytes() == Path(processing_bard_vl.__file__).read_bytes()
    marked = BardVLProcessor.from_pretrained(folder)
    assert marked.image_processor.size == processor.image_processor.size
    # A folder saved by the processor (processor_config.json, and the video file it was loaded with) is marked too.
    processor.save_pretrained(tmp_path / "saved")
    assert mark_processor_files(tmp_path / "saved") == ["processor_config.json", "video_preprocessor_config.json"]
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        mark_processor_files(tmp_path / "empty")


def test_trust_remote_code_loads_without_the_package(processor, tiny_qwen3_vl_dir, tmp_path):
    saved, marked = tmp_path / "saved", tmp_path / "marked"
    processor.save_pretrained(saved)
    shutil.copytree(tiny_qwen3_vl_dir, marked)
    mark_processor_files(marked)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["transformers_bard"] = None  # the package must not be importable
        import numpy as np
        from PIL import Image
        from transformers import AutoProcessor
        image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
        for folder in ({str(saved)!r}, {str(marked)!r}):
            remote = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            assert type(remote).__name__ == "BardVLProcessor", type(remote)
            assert type(remote.image_processor).__name__ == "Qwen2VLImageProcessorPil"
            assert remote(images=[image], text=["<|image_pad|>"])["input_ids"][0].count({IMAGE_PAD}) == 4
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_video_input_raises_a_clear_error(processor):
    frames = [make_image(0), make_image(1)]
    with pytest.raises(ValueError, match=r"`videos`.*torchvision"):
        processor(text=["<|video_pad|>"], videos=[frames])
    messages = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match="torchvision"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match="torchvision"):
        processor._get_num_multimodal_tokens(video_sizes=[(2, 32, 32)])
    # Rendering text alone needs no video processor.
    assert "<|video_pad|>" in processor.apply_chat_template(messages)


def test_constructor_requires_both_sub_processors(processor):
    with pytest.raises(ValueError, match="tokenizer"):
        BardVLProcessor(image_processor=processor.image_processor)
    with pytest.raises(ValueError, match="image_processor"):
        BardVLProcessor(tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match="video_processor"):
        BardVLProcessor(processor.image_processor, processor.tokenizer, video_processor=processor.image_processor)
    with pytest.raises(TypeError, match="chat_templat"):
        BardVLProcessor(processor.image_processor, processor.tokenizer, chat_templat="x")
    direct = BardVLProcessor(
        processor.image_processor, processor.tokenizer, chat_template="{{ 'x' }}", video_processor=None
    )
    assert direct.chat_template == "{{ 'x' }}"
    assert direct.image_token_id == IMAGE_PAD


def test_assistant_tokens_mask_by_hand():
    header, end = [1, 2], 9
    #        0  1  2  3  4  5  6  7  8  9 10
    ids = [1, 2, 5, 7, 8, 9, 3, 1, 2, 5, 6]
    assert assistant_tokens_mask(ids, header, end) == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1]
    assert assistant_tokens_mask(ids, header, end, [1] * 10 + [0]) == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    # A trailing generation prompt (header + newline) marks nothing.
    assert assistant_tokens_mask([4, 1, 2, 5], header, end) == [0, 0, 0, 0]
    assert assistant_tokens_mask([], header, end) == []


def test_return_assistant_tokens_mask_marks_every_reply(processor):
    messages = tiny_chat_messages(
        [make_image(0, (64, 64))], system="S.", turns=(("What is it?", "A red square."), ("Sure?", "Yes."))
    )
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    mask = inputs["assistant_masks"]
    assert mask.shape == inputs["input_ids"].shape
    marked = inputs["input_ids"][0][mask[0].bool()].tolist()
    assert processor.tokenizer.decode(marked) == "A red square.<|im_end|>Yes.<|im_end|>"

    # Without tensors the mask is a list of rows; the trailing generation prompt marks nothing.
    prompt = processor.apply_chat_template(
        messages[:-1],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    (row,) = prompt["input_ids"]
    (row_mask,) = prompt["assistant_masks"]
    generation_prompt = [IM_START, *processor.tokenizer.encode("assistant\n")]
    assert row[-len(generation_prompt) :] == generation_prompt
    marked = [token for token, flag in zip(row, row_mask) if flag]
    assert processor.tokenizer.decode(marked) == "A red square.<|im_end|>"


def test_assistant_mask_matches_transformers_with_generation_markers(processor):
    conversations = [
        tiny_chat_messages([make_image(0, (64, 64))], turns=(("What is it?", "A red square."), ("Sure?", "Yes."))),
        tiny_chat_messages([make_image(1, (32, 32))], turns=(("Colour?", "Blue 42."),)),
    ]
    kwargs = {
        "tokenize": True,
        "return_dict": True,
        "return_assistant_tokens_mask": True,
        "return_tensors": "pt",
        "processor_kwargs": {"padding": True},
    }
    for conversation in conversations:
        assert processor.apply_chat_template(conversation, chat_template=MARKED_TEMPLATE) == (
            processor.apply_chat_template(conversation)
        )
    by_tokens = processor.apply_chat_template(conversations, **kwargs)
    by_markers = processor.apply_chat_template(conversations, chat_template=MARKED_TEMPLATE, **kwargs)
    torch.testing.assert_close(by_tokens["input_ids"], by_markers["input_ids"])
    assert by_markers["assistant_masks"].sum() > 0
    torch.testing.assert_close(by_tokens["assistant_masks"], by_markers["assistant_masks"])
    as_numpy = processor.apply_chat_template(conversations, **{**kwargs, "return_tensors": "np"})
    assert as_numpy["assistant_masks"].tolist() == by_tokens["assistant_masks"].tolist()
    # Right padding is never marked.
    assert not by_tokens["assistant_masks"][by_tokens["attention_mask"] == 0].any()
    replies = [
        processor.tokenizer.decode(ids[mask.bool()])
        for ids, mask in zip(by_tokens["input_ids"], by_tokens["assistant_masks"])
    ]
    assert replies == ["A red square.<|im_end|>Yes.<|im_end|>", "Blue 42.<|im_end|>"]
