"""Conversion from Qwen3-VL, Auto registration, remote-code export and push_to_hub (issue: foundation, DESIGN 2, 5, 6)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import transformers_bard
from transformers_bard import BardVLConfig, BardVLForConditionalGeneration, convert_from_autoregressive
from transformers_bard.cli import main as cli_main
from transformers_bard.models.bard_vl import NOISY, PREFIX

REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE_FILES = ("configuration_bard_vl.py", "modeling_bard_vl.py", "masking_bard_vl.py", "generation_bard_vl.py",
                     "processing_bard_vl.py")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def converted(tiny_qwen3_vl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "bard-b4"
    convert_from_autoregressive(tiny_qwen3_vl_dir, out, block_size=4)
    return out


def sample_inputs(processor):
    from transformers_bard.testing import make_image, tiny_chat_messages

    messages = tiny_chat_messages([make_image(0, (64, 64))], turns=(("What is this?", None),))
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def test_conversion_writes_a_complete_bard_checkpoint(tiny_qwen3_vl_dir, converted):
    files = {p.name for p in converted.iterdir()}
    for name in [
        "config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "chat_template.json", "preprocessor_config.json", "README.md", *REMOTE_CODE_FILES,
    ]:
        assert name in files, name
    # weights unchanged: the shards are byte-identical
    shards = sorted(p.name for p in tiny_qwen3_vl_dir.glob("*.safetensors"))
    assert len(shards) >= 2
    for name in shards:
        assert sha(converted / name) == sha(tiny_qwen3_vl_dir / name)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "bard_vl"
    assert config["architectures"] == ["BardVLForConditionalGeneration"]
    assert config["block_size"] == 4 and config["prompt_attention"] == "block_causal"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_bard_vl.BardVLConfig",
        "AutoModel": "modeling_bard_vl.BardVLForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_bard_vl.BardVLForConditionalGeneration",
    }
    processor_config = json.loads((converted / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_bard_vl.BardVLProcessor"}
    # the exported files are the package's own
    package_dir = Path(transformers_bard.__file__).parent / "models" / "bard_vl"
    for name in REMOTE_CODE_FILES:
        assert (converted / name).read_bytes() == (package_dir / name).read_bytes(), name
    # <|mask|> added to the tokenizer, inside the existing embedding rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    mask_id = tok.convert_tokens_to_ids("<|mask|>")
    assert config["mask_token_id"] == mask_id
    assert mask_id < config["text_config"]["vocab_size"]
    assert AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir).convert_tokens_to_ids("<|mask|>") in (None, tok.unk_token_id)
    # BARD decoding defaults, not the AR source's sampling settings (DESIGN 4.6)
    gen = json.loads((converted / "generation_config.json").read_text())
    assert not gen.get("do_sample", False)
    assert gen.get("temperature", 0) == 0
    assert gen.get("block_size") in (None, 4)
    card = (converted / "README.md").read_text()
    assert "library_name: transformers" in card and "block-diffusion" in card


def test_auto_classes_load_the_converted_checkpoint(tiny_qwen3_vl_dir, converted):
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, Qwen3VLForConditionalGeneration

    model = AutoModel.from_pretrained(converted)
    assert type(model) is BardVLForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(converted)) is BardVLForConditionalGeneration
    processor = AutoProcessor.from_pretrained(converted)
    assert type(processor).__name__ == "BardVLProcessor"
    # every weight identical to the stock Qwen3-VL model's
    stock = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3_vl_dir)
    stock_state = stock.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, stock_state[name], rtol=0, atol=0, msg=name)
    assert set(stock_state) == set(model.state_dict())


def _logits_script(checkpoint: Path, out_file: Path, remote: bool) -> str:
    """A fresh-process script: load, run a block-diffusion forward on an image prompt, save logits."""
    block = "import sys; sys.modules['transformers_bard'] = None  # the package must not be importable\n" if remote else "import transformers_bard\n"
    return block + textwrap.dedent(
        f"""
        import torch
        from PIL import Image
        import numpy as np
        from transformers import AutoModel, AutoProcessor
        kw = dict(trust_remote_code=True) if {remote!r} else dict()
        model = AutoModel.from_pretrained({str(checkpoint)!r}, **kw).eval()
        processor = AutoProcessor.from_pretrained({str(checkpoint)!r}, **kw)
        assert type(model).__name__ == "BardVLForConditionalGeneration", type(model)
        if {remote!r}:  # the image-text-to-text Auto class (pipelines) resolves through the auto_map as well
            from transformers import AutoModelForImageTextToText
            other = AutoModelForImageTextToText.from_pretrained({str(checkpoint)!r}, **kw)
            assert type(other).__name__ == "BardVLForConditionalGeneration", type(other)
        assert type(processor).__name__ == "BardVLProcessor", type(processor)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is this?"}}]}}]
        inputs = processor.apply_chat_template(messages, images=[image], add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        ids = inputs["input_ids"]
        mask_id = model.config.mask_token_id
        block = torch.full((1, model.config.block_size), mask_id)
        seg = torch.cat([torch.full_like(ids, {PREFIX}), torch.full_like(block, {NOISY})], 1)
        with torch.no_grad():
            out = model(input_ids=torch.cat([ids, block], 1), segment_ids=seg,
                        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(block)], 1),
                        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                        logits_mask=seg == {NOISY})
        torch.save(out.logits, {str(out_file)!r})
        """
    )


def _run(script: str, tmp_path: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_trust_remote_code_without_the_package_gives_identical_logits(converted, tmp_path):
    remote_file, local_file = tmp_path / "remote.pt", tmp_path / "local.pt"
    _run(_logits_script(converted, remote_file, remote=True), tmp_path)
    _run(_logits_script(converted, local_file, remote=False), tmp_path)
    remote, local = torch.load(remote_file), torch.load(local_file)
    assert remote.shape[0] == 4
    torch.testing.assert_close(remote, local, rtol=0, atol=0)


def test_resize_when_mask_token_does_not_fit(tiny_qwen3_vl_dir, tmp_path):
    """A source whose embedding has exactly as many rows as the tokenizer has ids gets resized."""
    import shutil

    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    src = tmp_path / "full"
    shutil.copytree(tiny_qwen3_vl_dir, src)
    n_ids = len(AutoTokenizer.from_pretrained(src))
    stock = Qwen3VLForConditionalGeneration.from_pretrained(src)
    stock.resize_token_embeddings(n_ids)
    for p in src.glob("model*.safetensors*"):
        p.unlink()
    stock.save_pretrained(src)
    out = convert_from_autoregressive(src, tmp_path / "out", block_size=8)
    model = BardVLForConditionalGeneration.from_pretrained(out)
    assert model.config.mask_token_id == n_ids
    assert model.config.text_config.vocab_size >= n_ids + 1
    assert model.config.block_size == 8
    assert {name for name in REMOTE_CODE_FILES} <= {p.name for p in out.iterdir()}
    old = stock.get_input_embeddings().weight
    torch.testing.assert_close(model.get_input_embeddings().weight[:n_ids], old, rtol=0, atol=0)


def test_upstream_bard_vl_config_defaults_mask_id():
    config = BardVLConfig.from_dict(
        {"model_type": "bard_vl", "text_config": {"model_type": "bard_vl_text", "vocab_size": 151936,
                                                  "hidden_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                                                  "intermediate_size": 64}}
    )
    assert config.mask_token_id == 151671
    assert config.block_size == 4 and config.prompt_attention == "block_causal"
    explicit = BardVLConfig.from_dict({"model_type": "bard_vl", "mask_token_id": 7, "text_config": {"vocab_size": 64}})
    assert explicit.mask_token_id == 7


@pytest.mark.parametrize(
    "field, value, message",
    [("block_size", 0, "block_size"), ("prompt_attention", "full", "prompt_attention"), ("mask_token_id", 10**9, "mask_token_id")],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        BardVLConfig(**{field: value})


def _no_leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_conversion_errors_leave_nothing_behind(tiny_qwen3_vl_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="block_size"):
        convert_from_autoregressive(tiny_qwen3_vl_dir, out, block_size=0)
    with pytest.raises(FileNotFoundError, match="source"):
        convert_from_autoregressive(tmp_path / "missing", out)
    not_vl = tmp_path / "bert"
    not_vl.mkdir()
    (not_vl / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        convert_from_autoregressive(not_vl, out)
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))
    with pytest.raises(ValueError, match="MoE"):
        convert_from_autoregressive(moe, out)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for overwrite in (False, True):  # `overwrite` replaces an earlier conversion only (tests/test_data_safety.py)
        with pytest.raises(FileExistsError, match="keep.txt.*`overwrite` replaces only"):
            convert_from_autoregressive(tiny_qwen3_vl_dir, out, overwrite=overwrite)
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
        assert _no_leftovers(tmp_path) == []
    (out / "keep.txt").unlink()  # an empty folder takes a conversion without `overwrite`; an earlier one needs it
    convert_from_autoregressive(tiny_qwen3_vl_dir, out)
    with pytest.raises(FileExistsError, match="holds an earlier conversion.*overwrite=True"):
        convert_from_autoregressive(tiny_qwen3_vl_dir, out, block_size=8)
    convert_from_autoregressive(tiny_qwen3_vl_dir, out, block_size=8, overwrite=True)
    assert json.loads((out / "config.json").read_text())["block_size"] == 8
    assert _no_leftovers(tmp_path) == []


def test_cli_convert(tiny_qwen3_vl_dir, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert cli_main(["convert", str(tiny_qwen3_vl_dir), str(out), "--block-size", "8", "--prompt-attention", "causal"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["block_size"] == 8 and config["prompt_attention"] == "causal"
    assert cli_main(["convert", str(tiny_qwen3_vl_dir), str(out)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert cli_main(["convert", str(tiny_qwen3_vl_dir), str(tmp_path / "x"), "--block-size", "0"]) == 2


def test_conversion_sets_and_keeps_prediction_shift(tiny_qwen3_vl_dir, converted, tmp_path):
    """`prediction_shift` (DESIGN 4.1): off by default (the paper), on with the argument or `--prediction-shift`;
    re-converting a BARD-VL checkpoint keeps its setting unless told otherwise."""
    assert json.loads((converted / "config.json").read_text())["prediction_shift"] is False
    shifted = convert_from_autoregressive(tiny_qwen3_vl_dir, tmp_path / "shifted", prediction_shift=True)
    assert BardVLConfig.from_pretrained(shifted).prediction_shift is True
    assert "Shifted prediction" in (shifted / "README.md").read_text()
    again = convert_from_autoregressive(shifted, tmp_path / "again", block_size=8)
    assert BardVLConfig.from_pretrained(again).prediction_shift is True
    assert BardVLConfig.from_pretrained(again).mask_token_id == BardVLConfig.from_pretrained(shifted).mask_token_id
    off = convert_from_autoregressive(shifted, tmp_path / "off", prediction_shift=False)
    assert BardVLConfig.from_pretrained(off).prediction_shift is False
    with pytest.raises(ValueError, match="prediction_shift"):
        convert_from_autoregressive(tiny_qwen3_vl_dir, tmp_path / "bad", prediction_shift="yes")
    assert cli_main(["convert", str(tiny_qwen3_vl_dir), str(tmp_path / "cli"), "--prediction-shift"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["prediction_shift"] is True
    assert cli_main(["convert", str(tmp_path / "cli"), str(tmp_path / "cli-off"), "--no-prediction-shift"]) == 0
    assert json.loads((tmp_path / "cli-off" / "config.json").read_text())["prediction_shift"] is False


def _as_upstream_bard_vl(source: Path, target: Path, **config_changes) -> Path:
    """A copy of `source` relabelled the way upstream BARD-VL checkpoints are: model_type `bard_vl`, text sub-config
    `bard_vl_text`, no `mask_token_id` and a tokenizer without a `<|mask|>` string."""
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="bard_vl", architectures=["BardVLForConditionalGeneration"], block_size=4)
    config["text_config"]["model_type"] = "bard_vl_text"
    for key, value in config_changes.items():
        if key == "vocab_size":
            config["text_config"]["vocab_size"] = value
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_converting_an_upstream_bard_vl_checkpoint_keeps_mask_id_151671(tiny_qwen3_vl_dir, tmp_path):
    """Item 6 of issue 13: upstream BARD-VL trained `<|mask|>` as id 151671 with no string (DESIGN 2). Converting
    such a checkpoint must keep 151671, not add a new `<|mask|>` (the next free id, an untrained row) and point the
    config at it. Only the config and the tokenizer are read: the Qwen-sized vocabulary is written into the config
    of the tiny checkpoint (its shards are copied byte for byte, not loaded)."""
    from transformers import AutoTokenizer

    upstream = _as_upstream_bard_vl(tiny_qwen3_vl_dir, tmp_path / "upstream", vocab_size=151936)
    out = convert_from_autoregressive(upstream, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["mask_token_id"] == 151671
    source_tokenizer, tokenizer = AutoTokenizer.from_pretrained(upstream), AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(source_tokenizer)  # nothing added
    assert tokenizer.convert_tokens_to_ids("<|mask|>") in (None, tokenizer.unk_token_id)
    for name in (p.name for p in upstream.glob("*.safetensors")):
        assert sha(out / name) == sha(upstream / name)
    # an explicit id with no string is kept too (one on a real token is refused: tests/test_data_safety.py); a
    # BARD-VL config of a small vocabulary without one gets `<|mask|>` added as usual
    explicit = convert_from_autoregressive(
        _as_upstream_bard_vl(tiny_qwen3_vl_dir, tmp_path / "explicit", mask_token_id=500), tmp_path / "explicit-out"
    )
    assert json.loads((explicit / "config.json").read_text())["mask_token_id"] == 500
    small = convert_from_autoregressive(_as_upstream_bard_vl(tiny_qwen3_vl_dir, tmp_path / "small"), tmp_path / "s")
    small_tokenizer = AutoTokenizer.from_pretrained(small)
    assert json.loads((small / "config.json").read_text())["mask_token_id"] == small_tokenizer.convert_tokens_to_ids(
        "<|mask|>"
    ) == len(source_tokenizer)


def test_push_to_hub_uploads_code_card_and_loads_remotely(converted, tmp_path, monkeypatch):
    """No network: intercept huggingface_hub's calls and keep what would be uploaded."""
    import shutil

    from transformers.utils import hub as transformers_hub

    uploaded = tmp_path / "uploaded"
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = repo_id

            class Url:
                pass

            url = Url()
            url.repo_id = repo_id
            return url

        def create_commit(self, repo_id, operations, **kwargs):  # the processor's (stock) push
            calls["create_commit"] = repo_id
            for op in operations:
                dest = uploaded / op.path_in_repo
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(op.path_or_fileobj, dest)
            return "commit"

        def upload_folder(self, *, repo_id, folder_path, **kwargs):  # the model's push
            calls["upload_folder"] = repo_id
            shutil.copytree(folder_path, uploaded, dirs_exist_ok=True)
            return "commit"

    monkeypatch.setattr(transformers_hub, "hf_api", lambda: FakeApi())
    from huggingface_hub import ModelCard

    monkeypatch.setattr(transformers_hub, "create_and_tag_model_card", lambda *a, **k: ModelCard("generic card"))
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(converted).push_to_hub("someone/bard-tiny")
    model = BardVLForConditionalGeneration.from_pretrained(converted)
    model.push_to_hub("someone/bard-tiny", tags=["tiny"])
    assert calls == {"create_repo": "someone/bard-tiny", "create_commit": "someone/bard-tiny",
                     "upload_folder": "someone/bard-tiny"}
    files = {p.name for p in uploaded.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "modeling_bard_vl.py", "configuration_bard_vl.py",
            "masking_bard_vl.py", "generation_bard_vl.py", "processing_bard_vl.py"} <= files
    assert any(name.endswith(".safetensors") for name in files)
    card = (uploaded / "README.md").read_text()
    header = card.split("---")[1]
    for line in ["library_name: transformers", "pipeline_tag: image-text-to-text", "- block-diffusion", "- bard",
                 "- tiny", "base_model:"]:
        assert line in header, line
    assert "someone/bard-tiny" in card and "trust_remote_code=True" in card
    data = ModelCard.load(uploaded / "README.md").data
    assert data.base_model == model.config.source_model and data.license == "apache-2.0"
    assert data.tags == ["block-diffusion", "bard", "bard-vl", "qwen3-vl", "diffusion-language-model", "tiny"]
    logits_file = tmp_path / "uploaded.pt"
    _run(_logits_script(uploaded, logits_file, remote=True), tmp_path)
    assert torch.isfinite(torch.load(logits_file)).all()


def test_package_exports():
    assert transformers_bard.__version__
    for name in ["BardVLConfig", "BardVLForConditionalGeneration", "convert_from_autoregressive"]:
        assert hasattr(transformers_bard, name)
