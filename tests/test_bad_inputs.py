"""Bad files and bad input, tried on purpose (issue 23): each is refused before any work starts, with an error that
names the file or field and the fix, and nothing is written (the output folder stays absent, every input folder
unchanged).

One table: each case builds its bad input under `tmp_path` and returns the call that must refuse it."""

import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoTokenizer

from conftest import tiny_chat_rows, tiny_trainer_kwargs
from transformers_bard import BardVLForConditionalGeneration, convert_from_autoregressive
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.trainer.block_merge_config import BlockMergeConfig
from transformers_bard.trainer.block_merge_trainer import BlockMergeTrainer
from transformers_bard.trainer.collator import SAMPLE_INDEX_COLUMN, BlockDiffusionCollator
from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig
from transformers_bard.trainer.diffusion_distill_trainer import DiffusionDistillTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- building bad inputs
def copy(folder, tmp_path, name) -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def truncate_first_shard(folder: Path) -> Path:
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard


def corrupt_first_header(folder: Path) -> Path:
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * 8 + data[8:])  # the header length: now far beyond the file
    return shard


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def other_architecture(tmp_path, model_type: str) -> Path:
    """A plain text-only checkpoint folder (config only): Qwen2 or LLaMA."""
    folder = tmp_path / model_type
    folder.mkdir()
    architecture = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [architecture]}))
    return folder


def rows(num_rows=4, **first_row_changes):
    data = tiny_chat_rows(num_rows)
    data[0].update(first_row_changes)
    return data


def merge(model, tmp_path, dataset=None, **overrides):
    args = BlockMergeConfig(**tiny_trainer_kwargs(tmp_path / "out", block_sizes=[4], stage_steps=[1], **overrides))
    dataset = Dataset.from_list(rows()) if dataset is None else dataset
    return lambda: BlockMergeTrainer(str(model), args=args, train_dataset=dataset)


def distill(student, teacher, tmp_path, **overrides):
    args = DiffusionDistillConfig(**tiny_trainer_kwargs(tmp_path / "out", max_steps=1, **overrides))
    dataset = Dataset.from_list(rows())
    return lambda: DiffusionDistillTrainer(str(student), str(teacher), args=args, train_dataset=dataset)


def collate(checkpoint, examples):
    processor = BardVLProcessor.from_pretrained(checkpoint)
    collator = BlockDiffusionCollator(processor, processor.tokenizer.convert_tokens_to_ids("<|mask|>"))
    return lambda: collator([{**row, SAMPLE_INDEX_COLUMN: index} for index, row in enumerate(examples)])


# ---------------------------------------------------------------------- the table
def case_convert_truncated_shard(d, tmp_path):
    shard = truncate_first_shard(copy(d["qwen3_vl"], tmp_path, "src"))
    return lambda: convert_from_autoregressive(tmp_path / "src", tmp_path / "out"), (
        ValueError, rf"`source`: '{shard}' is truncated or corrupted .*Download or copy the checkpoint again"
    )


def case_convert_corrupted_header(d, tmp_path):
    shard = corrupt_first_header(copy(d["qwen3_vl"], tmp_path, "src"))
    return lambda: convert_from_autoregressive(tmp_path / "src", tmp_path / "out"), (
        ValueError, rf"`source`: '{shard}' is truncated or corrupted"
    )


def case_convert_missing_shard(d, tmp_path):
    source = copy(d["qwen3_vl"], tmp_path, "src")
    sorted(source.glob("*.safetensors"))[-1].unlink()
    return lambda: convert_from_autoregressive(source, tmp_path / "out"), (
        ValueError, r"model.safetensors.index.json' lists shard\(s\) \['model-00002-of-00002.safetensors'\] that are "
        r"not in the folder"
    )


def case_convert_qwen2_folder(d, tmp_path):
    folder = other_architecture(tmp_path, "qwen2")
    return lambda: convert_from_autoregressive(folder, tmp_path / "out"), (
        ValueError, r"`source` has model_type 'qwen2'; expected one of \('qwen3_vl', 'bard_vl'\).*Only Qwen3-VL"
    )


def case_convert_bard_source_mask_outside_vocab(d, tmp_path):
    source = edit_config(copy(d["bard"], tmp_path, "src"), mask_token_id=10**6)
    return lambda: convert_from_autoregressive(source, tmp_path / "out"), (
        ValueError, r"`source` config.json has mask_token_id=1000000, which is not a row of its embedding "
        r"\(vocab_size=512\)\. Fix `mask_token_id`"
    )


def case_trainer_truncated_shard(d, tmp_path):
    model = copy(d["bard"], tmp_path, "model")
    shard = truncate_first_shard(model)
    return merge(model, tmp_path), (ValueError, rf"`model`: '{shard}' is truncated or corrupted")


def case_teacher_corrupted_shard(d, tmp_path):
    teacher = copy(d["teacher"], tmp_path, "teacher")
    shard = corrupt_first_header(teacher)
    return distill(d["student"], teacher, tmp_path), (ValueError, rf"`teacher_model`: '{shard}' is truncated")


def case_trainer_llama_folder(d, tmp_path):
    folder = other_architecture(tmp_path, "llama")
    return merge(folder, tmp_path), (
        ValueError, r"`model`='.*llama' is a 'llama' checkpoint \(LlamaForCausalLM\), not one of \('bard_vl', "
        r"'qwen3_vl'\)\. .*transformers-bard convert"
    )


def case_teacher_qwen2_folder(d, tmp_path):
    folder = other_architecture(tmp_path, "qwen2")
    return distill(d["student"], folder, tmp_path), (
        ValueError, r"`teacher_model`='.*qwen2' is a 'qwen2' checkpoint \(Qwen2ForCausalLM\)"
    )


def case_trainer_autoregressive_model(d, tmp_path):
    return merge(d["qwen3_vl"], tmp_path), (
        ValueError, r"has no `config.mask_token_id`.*convert_from_autoregressive"
    )


def case_config_mask_id_missing(d, tmp_path):
    model = edit_config(copy(d["bard"], tmp_path, "model"), mask_token_id=...)
    return merge(model, tmp_path), (ValueError, r"has no `config.mask_token_id`")


def case_config_mask_id_not_an_integer(d, tmp_path):
    model = edit_config(copy(d["bard"], tmp_path, "model"), mask_token_id="<|mask|>")
    return merge(model, tmp_path), (
        StrictDataclassFieldValidationError, r"Field 'mask_token_id' with value '<\|mask\|>' doesn't match"
    )


def case_config_mask_id_outside_vocab(d, tmp_path):
    model = edit_config(copy(d["bard"], tmp_path, "model"), mask_token_id=512)
    return lambda: BardVLForConditionalGeneration.from_pretrained(model), (
        ValueError, r"`mask_token_id`=512 is outside the embedding \(vocab_size=512\)"
    )


def case_tokenizer_lacks_mask_token(d, tmp_path):
    """config.json says a mask id that the tokenizer maps to another token (here `<|im_end|>`)."""
    model = copy(d["bard"], tmp_path, "model")
    im_end = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids("<|im_end|>")
    edit_config(model, mask_token_id=im_end)
    return merge(model, tmp_path), (
        ValueError, rf"`mask_token_id`={im_end} is the token '<\|im_end\|>' in this tokenizer, not the mask token "
        r"'<\|mask\|>'.*set `mask_token_id` to the id of '<\|mask\|>'"
    )


def case_block_size_does_not_divide_schedule(d, tmp_path):
    return lambda: BlockMergeConfig(**tiny_trainer_kwargs(tmp_path / "out", block_sizes=[4, 6])), (
        ValueError, r"`block_sizes` must be strictly increasing with each a multiple of the previous one, got \[4, 6\]"
    )


def case_teacher_block_size_does_not_divide(d, tmp_path):
    return distill(d["student"], d["teacher"], tmp_path, teacher_block_size=3), (
        ValueError, r"`teacher_block_size`=3 does not divide the student's block size 8"
    )


def case_teacher_other_vocabulary(d, tmp_path):
    teacher = BardVLForConditionalGeneration.from_pretrained(d["teacher"])
    teacher.resize_token_embeddings(576)
    teacher.save_pretrained(tmp_path / "teacher")
    return distill(d["student"], tmp_path / "teacher", tmp_path), (
        ValueError, r"The teacher \(.*teacher\) has vocab_size 576 but the student has 512"
    )


def case_image_is_a_text_file(d, tmp_path):
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_text("this is not an image")
    data = Dataset.from_list([{**row, "images": [str(not_an_image)]} for row in rows(2)])
    return merge(d["bard"], tmp_path, data), (
        ValueError, rf"its first row its image 0 \('{not_an_image}'\) cannot be read as an image "
        r"\(UnidentifiedImageError"
    )


def case_image_is_garbage_text(d, tmp_path):
    data = [{**row, "images": ["not an image"]} for row in rows(2)]
    return collate(d["bard"], data), (
        ValueError, r"Row 0 of the training data cannot be trained on: its image 0 \('not an image'\) cannot be read"
    )


def case_image_is_raw_bytes(d, tmp_path):
    data = rows(3)
    data[1]["images"] = [b"\x89PNG garbage"]
    return collate(d["bard"], data), (
        ValueError, r"Row 1 of the training data cannot be trained on: its image 0 is a bytes, not an image.*"
        r"cast_column"
    )


def case_empty_dataset(d, tmp_path):
    return merge(d["bard"], tmp_path, Dataset.from_list(rows()).select([])), (
        ValueError, r"`train_dataset` is empty: there is nothing to train on"
    )


def case_empty_row(d, tmp_path):
    return merge(d["bard"], tmp_path, Dataset.from_list(rows(messages=[], images=[]))), (
        ValueError, r"its first row its `messages` is empty or not a list of messages \(got \[\]\)"
    )


def case_all_prompt_row(d, tmp_path):
    data = rows()
    data[0]["messages"] = data[0]["messages"][:1]  # the user turn only
    return merge(d["bard"], tmp_path, Dataset.from_list(data)), (
        ValueError, r"its first row it has no assistant turn to learn from"
    )


CASES = {name[len("case_"):]: case for name, case in globals().items() if name.startswith("case_")}


def snapshot(*folders):
    """Every file under `folders`, with its size and content hash."""
    import hashlib

    return {
        str(path): (path.stat().st_size, hashlib.sha1(path.read_bytes()).hexdigest())
        for folder in folders
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def checkpoints(tiny_qwen3_vl_dir, tiny_bard_vl_dir, tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir):
    return {
        "qwen3_vl": tiny_qwen3_vl_dir,
        "bard": tiny_bard_vl_dir,
        "student": tiny_bard_vl_b8_dir,
        "teacher": tiny_bard_vl_teacher_dir,
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_and_nothing_is_written(name, checkpoints, tmp_path):
    call, (error_type, pattern) = CASES[name](checkpoints, tmp_path)
    before = snapshot(tmp_path, *checkpoints.values())
    with pytest.raises(error_type, match=pattern):
        call()
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path, *checkpoints.values()) == before
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no temporary folders

