"""Tests of the tiny offline Qwen3-VL checkpoints (transformers_bard.testing, DESIGN 6)."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig, Qwen3VLForConditionalGeneration

from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.testing import (
    QWEN3_VL_CHAT_TEMPLATE,
    build_tiny_qwen3_vl,
    build_tiny_tokenizer,
    make_image,
    tiny_chat_messages,
    tiny_qwen3_vl_config,
)

# Ids of the added tokens: the 448 BPE tokens come first, then Qwen's added tokens in Qwen's order.
EXPECTED_IDS = {
    "<|endoftext|>": 448,
    "<|im_start|>": 449,
    "<|im_end|>": 450,
    "<|vision_start|>": 457,
    "<|vision_end|>": 458,
    "<|vision_pad|>": 459,
    "<|image_pad|>": 460,
    "<|video_pad|>": 461,
    "<tool_call>": 462,
    "</think>": 473,
}
EXPECTED_FILES = {
    "chat_template.json",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "video_preprocessor_config.json",
}


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _digests(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def test_hub_layout_files(tiny_qwen3_vl_dir):
    assert {path.name for path in tiny_qwen3_vl_dir.iterdir()} == EXPECTED_FILES
    config = _read_json(tiny_qwen3_vl_dir / "config.json")
    assert config["model_type"] == "qwen3_vl"
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert _read_json(tiny_qwen3_vl_dir / "tokenizer_config.json")["tokenizer_class"] == "Qwen2Tokenizer"
    assert _read_json(tiny_qwen3_vl_dir / "chat_template.json") == {"chat_template": QWEN3_VL_CHAT_TEMPLATE}


def test_index_covers_every_weight_exactly_once(tiny_qwen3_vl_dir):
    index = _read_json(tiny_qwen3_vl_dir / "model.safetensors.index.json")
    shards = sorted(path.name for path in tiny_qwen3_vl_dir.glob("*.safetensors"))
    assert len(shards) >= 2
    assert set(index["weight_map"].values()) == set(shards)
    stored, total_bytes = {}, 0
    for shard in shards:
        with safe_open(tiny_qwen3_vl_dir / shard, framework="pt") as handle:
            for key in handle.keys():
                assert key not in stored, f"{key} is stored twice"
                stored[key] = shard
                tensor = handle.get_tensor(key)
                total_bytes += tensor.numel() * tensor.element_size()
    assert stored == index["weight_map"]
    assert index["metadata"]["total_size"] == total_bytes
    model = Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config())
    assert set(stored) == set(model.state_dict())


def test_config_numbers(tiny_qwen3_vl_dir):
    config = _read_json(tiny_qwen3_vl_dir / "config.json")
    text, vision = config["text_config"], config["vision_config"]
    assert text["vocab_size"] == 512  # 474 ids + 16 spare rows, rounded up to a multiple of 64
    assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]) == (32, 2, 64)
    assert (text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == (4, 2, 8)
    assert text["rope_parameters"]["mrope_section"] == [2, 1, 1]
    assert sum(text["rope_parameters"]["mrope_section"]) == text["head_dim"] // 2
    assert (vision["depth"], vision["hidden_size"], vision["patch_size"]) == (2, 32, 16)
    assert (vision["spatial_merge_size"], vision["temporal_patch_size"], vision["out_hidden_size"]) == (2, 2, 32)
    assert vision["num_position_embeddings"] == 64
    assert vision["deepstack_visual_indexes"] == [0, 1]
    assert config["image_token_id"] == EXPECTED_IDS["<|image_pad|>"]
    assert config["video_token_id"] == EXPECTED_IDS["<|video_pad|>"]
    assert config["vision_start_token_id"] == EXPECTED_IDS["<|vision_start|>"]
    assert config["vision_end_token_id"] == EXPECTED_IDS["<|vision_end|>"]


def test_generation_and_preprocessor_files(tiny_qwen3_vl_dir):
    generation = GenerationConfig.from_pretrained(tiny_qwen3_vl_dir)
    assert generation.do_sample is True
    assert (generation.temperature, generation.top_k, generation.top_p) == (0.7, 20, 0.8)
    assert generation.eos_token_id == [450, 448]
    assert generation.pad_token_id == 448
    image = _read_json(tiny_qwen3_vl_dir / "preprocessor_config.json")
    assert image == {
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": 2,
        "patch_size": 16,
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": 64 * 64, "shortest_edge": 32 * 32},
        "temporal_patch_size": 2,
    }
    video = _read_json(tiny_qwen3_vl_dir / "video_preprocessor_config.json")
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert video["processor_class"] == "Qwen3VLProcessor"


def test_loads_without_missing_keys_and_runs_with_an_image(tiny_qwen3_vl_dir):
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3_vl_dir, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert sum(parameter.numel() for parameter in model.parameters()) == 182_208
    assert model.config._attn_implementation == "sdpa"

    processor = BardVLProcessor.from_pretrained(tiny_qwen3_vl_dir)
    messages = tiny_chat_messages([make_image(0, (64, 64))], turns=(("What is in the image?", None),))
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert int((inputs["input_ids"] == EXPECTED_IDS["<|image_pad|>"]).sum()) == 4
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 512)
    assert torch.isfinite(logits).all()


def test_same_seed_gives_identical_files_and_other_seed_other_weights(tiny_qwen3_vl_dir, tmp_path):
    same = _digests(build_tiny_qwen3_vl(tmp_path / "same", seed=0))
    assert same == _digests(tiny_qwen3_vl_dir)
    other = _digests(build_tiny_qwen3_vl(tmp_path / "other", seed=1))
    assert other["tokenizer.json"] == same["tokenizer.json"]
    assert other["model-00001-of-00002.safetensors"] != same["model-00001-of-00002.safetensors"]


@pytest.mark.parametrize(("num_shards", "expected"), [(1, ["model.safetensors"]), (3, None)])
def test_num_shards(tmp_path, num_shards, expected):
    folder = build_tiny_qwen3_vl(tmp_path / "checkpoint", num_shards=num_shards)
    names = sorted(path.name for path in folder.glob("*.safetensors"))
    if expected is None:
        expected = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert names == expected
    assert (folder / "model.safetensors.index.json").exists() == (num_shards > 1)


def test_build_rejects_bad_arguments_and_leaves_nothing(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="output_dir"):
        build_tiny_qwen3_vl(tmp_path / "full")
    with pytest.raises(ValueError, match="image_size"):
        build_tiny_qwen3_vl(tmp_path / "a", image_size=48)
    with pytest.raises(ValueError, match="num_shards"):
        build_tiny_qwen3_vl(tmp_path / "b", num_shards=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["full"]
    assert [path.name for path in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_tokenizer_special_tokens_and_round_trip(tiny_qwen3_vl_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert len(tokenizer) == 474
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in EXPECTED_IDS} == EXPECTED_IDS
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert "<|mask|>" not in tokenizer.get_vocab()
    # Like Qwen's, AutoTokenizer has no chat template here: it lives in chat_template.json (DESIGN 6).
    assert tokenizer.chat_template is None

    text = "The red square is at the top, 12 + 30 = 42.\nHéllo wörld! ñ 漢字"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # Qwen's pre-tokenizer splits numbers into single digits.
    assert tokenizer.encode("2024") == [tokenizer.convert_tokens_to_ids(d) for d in "2024"]
    # Trained merges: frequent corpus words are a single token.
    assert len(tokenizer.encode(" square")) == 1
    chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    ids = tokenizer.encode(chat)
    assert ids[0] == 449 and ids[-1] == 450
    start = ids.index(457)
    assert ids[start : start + 3] == [457, 460, 458]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_tokenizer_is_deterministic_and_validates():
    assert build_tiny_tokenizer().get_vocab() == build_tiny_tokenizer().get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(vocab_size=100)


def test_chat_template_renders_like_qwen3_vl(tiny_qwen3_vl_dir):
    template = _read_json(tiny_qwen3_vl_dir / "chat_template.json")["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir)
    messages = tiny_chat_messages(
        [make_image(0)],
        system="You are a helpful assistant.",
        turns=(("What is in the image?", "A red square."), ("And the colour?", "Red.")),
    )
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
        "<|im_start|>assistant\nA red square.<|im_end|>\n"
        "<|im_start|>user\nAnd the colour?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(
        messages[:-1], chat_template=template, add_generation_prompt=True, tokenize=False
    )
    assert prompt == rendered[: -len("Red.<|im_end|>\n")]

    # String contents, a video, vision ids, a system message that is not first (Qwen drops it).
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "video"}, {"type": "image"}, {"type": "text", "text": "x"}],
        },
        {"role": "system", "content": "ignored"},
        {"role": "assistant", "content": "y"},
    ]
    assert tokenizer.apply_chat_template(messages, chat_template=template, add_vision_id=True, tokenize=False) == (
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>x<|im_end|>\n"
        "<|im_start|>assistant\ny<|im_end|>\n"
    )


def test_chat_template_tool_calls(tiny_qwen3_vl_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "warm"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=QWEN3_VL_CHAT_TEMPLATE, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert rendered == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather"}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call>"
        ' XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_make_image_is_deterministic():
    image = make_image(3, size=(48, 16))
    assert image.size == (48, 16) and image.mode == "RGB"
    assert image.tobytes() == make_image(3, size=(48, 16)).tobytes()
    assert image.tobytes() != make_image(4, size=(48, 16)).tobytes()
    red = make_image(0, color=(200, 10, 10))
    low, high = red.getextrema()[0]
    assert 192 <= low <= high <= 208


def test_tiny_chat_messages_shape():
    image = make_image(0)
    messages = tiny_chat_messages([image], system="S", turns=(("q1", "a1"), ("q2", None)))
    assert [message["role"] for message in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == [{"type": "image", "image": image}, {"type": "text", "text": "q1"}]
    assert messages[3]["content"] == [{"type": "text", "text": "q2"}]
    with pytest.raises(ValueError, match="turn 0"):
        tiny_chat_messages(turns=(("q1", None), ("q2", "a2")))


def test_config_overrides_and_validation():
    config = tiny_qwen3_vl_config(text_config={"num_hidden_layers": 3}, tie_word_embeddings=True)
    assert config.text_config.num_hidden_layers == 3
    assert config.text_config.hidden_size == 32
    assert config.tie_word_embeddings is True
    assert tiny_qwen3_vl_config(vocab_size=640).text_config.vocab_size == 640
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_qwen3_vl_config(vocab_size=474 - 1)


@pytest.mark.parametrize(("size", "parameters"), [("2b", 2_127_532_032), ("4b", 4_437_815_808)])
def test_published_configs_have_the_published_parameter_counts(size, parameters):
    """Qwen3-VL-2B/4B-Instruct's configs rebuilt offline (issue 20) give the Hub checkpoints' parameter counts
    (2.13B and 4.44B, tied embeddings), counted on the meta device; a depth cut keeps every width."""
    from transformers import Qwen3VLForConditionalGeneration

    from transformers_bard.testing import published_qwen3_vl_config

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(published_qwen3_vl_config(size))
        cut = Qwen3VLForConditionalGeneration(published_qwen3_vl_config(size, text_layers=1, vision_depth=2))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert len(cut.model.language_model.layers) == 1 and len(cut.model.visual.blocks) == 2
    assert cut.model.visual.config.deepstack_visual_indexes == [0, 1]
    for name, module in cut.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.weight.shape == model.get_submodule(name).weight.shape, name
    with pytest.raises(ValueError, match="`size` must be one of"):
        published_qwen3_vl_config("8b")
