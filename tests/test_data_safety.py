"""Data safety of every command that writes (issue 39): an output folder never overlaps what the command reads.

`transformers-bard convert` and the trainers refuse an output folder that is, contains or lies inside one of their
inputs (the conversion source; the model, the teacher and the data of a training run), however the path is spelled
(relative, absolute, trailing slash, `.`/`..`, through a symbolic link), before anything is written. `--overwrite`
replaces only the output of an earlier conversion, and the conversion writes its temporary folder beside the real
output folder. A source the conversion cannot reproduce faithfully (a tokenizer without its vocabulary, a mask id on
a token the model already uses) is refused naming the file. A run killed inside its first checkpoint save restarts
from step 0 when resumed.

Every refusal is checked against a snapshot of the whole test folder (every file's hash, every link): unchanged.
"""

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

from conftest import tiny_chat_rows, tiny_trainer_kwargs
from transformers_bard import convert_from_autoregressive
from transformers_bard.cli import main as cli_main
from transformers_bard.trainer.block_merge_config import BlockMergeConfig
from transformers_bard.trainer.block_merge_trainer import BlockMergeTrainer
from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig
from transformers_bard.trainer.diffusion_distill_trainer import DiffusionDistillTrainer
from transformers_bard.trainer.stages import STAGE_STATE_NAME, resume_point

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones included, links not followed): file hash, link target or `dir`."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@pytest.fixture
def proj(tiny_qwen3_vl_dir, tmp_path):
    """``tmp_path/proj`` holding the source ``qwen``, a user file, a link ``qwen-link -> qwen`` and an empty ``work``."""
    project = tmp_path / "proj"
    shutil.copytree(tiny_qwen3_vl_dir, project / "qwen")
    (project / "notes.txt").write_text("the user's own notes")
    (project / "qwen-link").symlink_to("qwen")
    (project / "work" / "sub").mkdir(parents=True)
    (tmp_path / "proj-link").symlink_to("proj")
    return project


# ---------------------------------------------------------------------- convert: output overlapping the source
# (working folder under tmp_path, SOURCE, OUTPUT, what the error says the output is)
OVERLAPS = [
    ("", "proj/qwen", "proj", "contains"),  # the report: deleted proj/qwen and proj/notes.txt
    ("", "proj/qwen", "proj/", "contains"),
    ("", "proj/qwen/", "proj-link", "contains"),  # a link to the folder that holds the source
    ("proj", "qwen", ".", "contains"),  # the report: emptied the current folder
    ("proj/qwen", ".", "..", "contains"),
    ("proj/work", "../qwen", "..", "contains"),
    ("", "proj/qwen", "proj/qwen", "is"),
    ("", "proj/qwen", "proj/qwen/", "is"),
    ("", "proj/qwen", "proj/./work/../qwen", "is"),
    ("", "proj/qwen", "proj/qwen-link", "is"),  # a link to the source
    ("", "proj/qwen-link", "proj/qwen", "is"),  # the source through a link
    ("", "proj/qwen", "proj/qwen/bard", "lies inside"),  # the report: wrote into the source
    ("proj/qwen", ".", "bard", "lies inside"),
    ("", "proj/qwen", "proj/qwen-link/bard", "lies inside"),
    ("", "proj/qwen-link", "proj/qwen/sub/bard", "lies inside"),
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(("cwd", "source", "output", "relation"), OVERLAPS, ids=[f"{o[1]}->{o[2]}@{o[0] or '.'}"
                                                                                  for o in OVERLAPS])
def test_convert_refuses_an_output_overlapping_the_source(cwd, source, output, relation, overwrite, proj, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path / cwd)
    before = snapshot(tmp_path)
    code = cli_main(["convert", source, output, *(["--overwrite"] if overwrite else [])])
    error = capsys.readouterr().err
    assert code == 2, error
    assert f"`output_dir`={output!r}" in error and f" {relation} `source`={source!r}" in error, error
    assert "Choose a folder outside it" in error and "Nothing was written" in error
    assert snapshot(tmp_path) == before  # the source's files, the user's file, no temporary folder


def test_convert_refuses_an_absolute_output_holding_the_source(proj, tmp_path):
    before = snapshot(tmp_path)
    for output in (proj, str(proj) + "/", proj / "qwen" / "bard"):
        with pytest.raises(ValueError, match=r"`output_dir`=.* (contains|lies inside) `source`="):
            convert_from_autoregressive(proj / "qwen", output, overwrite=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("cwd", "output", "where"), [
    ("proj/work", ".", "the current folder"),
    ("proj/work/sub", "..", "an ancestor of the current folder"),
])
def test_convert_refuses_the_current_folder_or_its_ancestors(cwd, output, where, proj, tmp_path, monkeypatch, capsys):
    """Even when it does not hold the source: the conversion replaces the output folder as a whole."""
    monkeypatch.chdir(tmp_path / cwd)
    source = str(proj / "qwen")
    before = snapshot(tmp_path)
    assert cli_main(["convert", source, output, "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert f"`output_dir`={output!r}" in error and f"is {where}" in error and "Pass a new folder" in error, error
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------- convert: what --overwrite may replace
def test_overwrite_replaces_only_an_earlier_conversion(proj, tmp_path):
    source, out = proj / "qwen", tmp_path / "out"
    convert_from_autoregressive(source, out, block_size=4)
    # a user's file in the converted folder: it is not the conversion's, so the folder is not replaced
    (out / "eval_results.json").write_text("{}")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"`output_dir`=.*'eval_results.json'.*`overwrite` replaces only"):
        convert_from_autoregressive(source, out, block_size=8, overwrite=True)
    assert snapshot(tmp_path) == before
    # a folder that is no conversion at all, even one holding only names a conversion writes (README.md)
    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("my project")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"`output_dir`=.*user.* is not the output of a conversion"):
        convert_from_autoregressive(source, user, overwrite=True)
    assert snapshot(tmp_path) == before
    # without the user's file it is the earlier conversion's output: replaced, nothing left beside it
    (out / "eval_results.json").unlink()
    assert cli_main(["convert", str(source), str(out), "--block-size", "8", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["block_size"] == 8
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "proj", "proj-link", "user"]
    assert (user / "README.md").read_text() == "my project"


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_convert_refuses_a_file_as_output(overwrite, proj, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"not a folder")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"`output_dir`=.*model\.bin.* is a file"):
        convert_from_autoregressive(proj / "qwen", target, overwrite=overwrite)
    assert snapshot(tmp_path) == before


def test_temporary_folder_is_a_sibling_of_the_real_output(proj, tmp_path, monkeypatch):
    """Through a link to an empty folder, and from a relative path: the temporary folder is made beside the folder
    the link names, outside the source and the output, and the link still points at the converted checkpoint."""
    from transformers_bard import conversion

    made = []
    original = conversion.tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(Path(kwargs["dir"]).resolve())
        return original(*args, **kwargs)

    monkeypatch.setattr(conversion.tempfile, "mkdtemp", mkdtemp)
    real = tmp_path / "disk" / "bard"
    real.mkdir(parents=True)
    (tmp_path / "bard-link").symlink_to(real)
    convert_from_autoregressive(proj / "qwen", tmp_path / "bard-link")
    assert (tmp_path / "bard-link").is_symlink() and (real / "config.json").is_file()
    assert made == [real.parent.resolve()]
    monkeypatch.chdir(proj / "work")
    convert_from_autoregressive("../qwen", "../../again/bard/", overwrite=True)
    assert made[-1] == (tmp_path / "again").resolve() and (tmp_path / "again" / "bard" / "config.json").is_file()
    assert not [path for path in (tmp_path / "disk").iterdir() if path.name.startswith(".")]


# ---------------------------------------------------------------------- convert: sources it cannot reproduce
def _without_tokenizer_json(source: Path) -> tuple[dict, str]:
    (source / "tokenizer.json").unlink()  # Qwen2Tokenizer then builds an empty vocabulary: text encodes to []
    return {}, r"tokenizer\.json.* does not load with its vocabulary"


def _damaged_tokenizer_json(source: Path) -> tuple[dict, str]:
    (source / "tokenizer.json").write_text('{"model": ')
    return {}, r"tokenizer\.json.* does not load"


def _image_token_id_elsewhere(source: Path) -> tuple[dict, str]:
    config = json.loads((source / "config.json").read_text())
    config["image_token_id"] = 7
    (source / "config.json").write_text(json.dumps(config))
    return {}, r"config\.json has image_token_id=7, but the tokenizer .*tokenizer\.json.* maps '<\|image_pad\|>' to"


def _mask_token_is_eos(source: Path) -> tuple[dict, str]:
    return {"mask_token": "<|im_end|>"}, r"`mask_token`='<\|im_end\|>' is id 450 .*tokenizer\.json.*: eos_token"


def _bard_mask_id_on_a_real_token(source: Path) -> tuple[dict, str]:
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="bard_vl", mask_token_id=7, block_size=4)
    config["text_config"]["model_type"] = "bard_vl_text"
    (source / "config.json").write_text(json.dumps(config))
    token = AutoTokenizer.from_pretrained(source).convert_ids_to_tokens(7)
    return {}, rf"config\.json has mask_token_id=7, which is the token {re.escape(repr(token))} in .*tokenizer\.json"


UNFAITHFUL = {f.__name__.lstrip("_"): f for f in (_without_tokenizer_json, _damaged_tokenizer_json,
                                                    _image_token_id_elsewhere, _mask_token_is_eos,
                                                    _bard_mask_id_on_a_real_token)}


@pytest.mark.parametrize("case", sorted(UNFAITHFUL))
def test_convert_refuses_a_source_it_cannot_reproduce(case, tiny_qwen3_vl_dir, tmp_path):
    source = Path(shutil.copytree(tiny_qwen3_vl_dir, tmp_path / "src"))
    kwargs, pattern = UNFAITHFUL[case](source)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        convert_from_autoregressive(source, tmp_path / "out", **kwargs)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------- trainers: output_dir against their inputs
@pytest.fixture
def run_dir(tiny_bard_vl_dir, tiny_bard_vl_teacher_dir, tmp_path):
    """``tmp_path/run`` with a model ``run/stage-b4`` (an earlier run's stage) and a teacher ``teacher``."""
    shutil.copytree(tiny_bard_vl_dir, tmp_path / "run" / "stage-b4")
    shutil.copytree(tiny_bard_vl_teacher_dir, tmp_path / "teacher")
    (tmp_path / "model-link").symlink_to("run/stage-b4")
    return tmp_path / "run"


# (output_dir, model, what output_dir is said to be, the input it names)
TRAINER_OVERLAPS = [
    ("run", "run/stage-b4", "contains", "model"),  # stage-b4 would be replaced by the new run's stage-b4
    ("run/", "model-link", "contains", "model"),
    ("run/stage-b4", "run/stage-b4", "is", "model"),
    ("model-link", "run/stage-b4", "is", "model"),
    ("run/stage-b4/pbm", "run/stage-b4/", "lies inside", "model"),
    ("model-link/pbm", "run/stage-b4", "lies inside", "model"),
]


@pytest.mark.parametrize(("output", "model", "relation", "name"), TRAINER_OVERLAPS,
                         ids=[f"{o[1]}->{o[0]}" for o in TRAINER_OVERLAPS])
def test_block_merge_refuses_an_output_dir_overlapping_the_model(output, model, relation, name, run_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    pattern = rf"`output_dir`={re.escape(repr(output))} .* {relation} `{name}`={re.escape(repr(model))}"
    with pytest.raises(ValueError, match=pattern):
        BlockMergeTrainer(model, args=BlockMergeConfig(**tiny_trainer_kwargs(output)),
                          train_dataset=Dataset.from_list(tiny_chat_rows(2)))
    assert snapshot(tmp_path) == before


def test_distill_refuses_an_output_dir_overlapping_the_teacher_or_the_data(run_dir, tmp_path):
    before = snapshot(tmp_path)
    student = str(run_dir / "stage-b4")
    data = Dataset.from_list(tiny_chat_rows(2))
    with pytest.raises(ValueError, match=r"`output_dir`=.* lies inside `teacher_model`="):
        args = DiffusionDistillConfig(**tiny_trainer_kwargs(tmp_path / "teacher" / "swd"))
        DiffusionDistillTrainer(student, str(tmp_path / "teacher"), args=args, train_dataset=data)
    with pytest.raises(ValueError, match=r"`output_dir`=.* is `teacher_model_name_or_path`="):  # named in the config
        args = DiffusionDistillConfig(**tiny_trainer_kwargs(tmp_path / "teacher"),
                                      teacher_model_name_or_path=str(tmp_path / "teacher"))
        DiffusionDistillTrainer(student, args=args, train_dataset=data)
    assert snapshot(tmp_path) == before
    data.save_to_disk(str(tmp_path / "data"))  # a dataset loaded from disk reads its files there
    from datasets import load_from_disk

    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"`output_dir`=.* lies inside `train_dataset`=.*data'"):
        args = DiffusionDistillConfig(**tiny_trainer_kwargs(tmp_path / "data" / "swd"))
        DiffusionDistillTrainer(student, str(tmp_path / "teacher"), args=args,
                                train_dataset=load_from_disk(str(tmp_path / "data")))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["block-merge", "distill"])
def test_training_cli_refuses_an_output_dir_holding_its_data(command, run_dir, tmp_path, monkeypatch, capsys):
    """The command line names its flags, and checks the dataset folder too, before loading anything."""
    Dataset.from_list(tiny_chat_rows(2)).to_parquet(str(tmp_path / "data" / "train.parquet"))
    monkeypatch.chdir(tmp_path)
    teacher = ["--teacher_model_name_or_path", "teacher"] if command == "distill" else []
    before = snapshot(tmp_path)
    code = cli_main([command, "--model_name_or_path", "run/stage-b4", *teacher, "--dataset_name", "data",
                     "--output_dir", "data/run", "--use_cpu", "true", "--report_to", "none", "--max_steps", "1"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "`--output_dir`='data/run'" in error and "lies inside `--dataset_name`='data'" in error, error
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------- a kill inside the first checkpoint save
class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def half_written_first_checkpoint(output: Path) -> None:
    """What a SIGKILL inside the first save leaves (tests/test_kills.py kills a real run there): `checkpoint-2` with
    some files but no `bard_stage.json`, and a stage staging folder; nothing complete."""
    checkpoint = output / "checkpoints-b4" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 100)  # cut short by the kill
    (checkpoint / "config.json").write_text("{}")
    (output / ".stage-b4.tmp").mkdir()


def test_resuming_after_a_kill_in_the_first_save_starts_from_step_0(tiny_bard_vl_dir, tmp_path, caplog):
    """A requeued job runs the same command, `resume_from_checkpoint=True`: with nothing complete to resume from it
    trains from the beginning, saying so, and its own checkpoint-2 replaces the half-written one."""
    output = tmp_path / "run"
    half_written_first_checkpoint(output)
    with caplog.at_level(logging.WARNING, logger="transformers_bard"):
        assert resume_point(str(output), [4, 8], True) == (0, None, None)
    assert "no complete checkpoint" in caplog.text and "from the beginning (step 0)" in caplog.text
    assert "checkpoint-2" in caplog.text  # the half-written folder is named as skipped

    caplog.clear()
    steps = StepRecorder()
    args = BlockMergeConfig(**tiny_trainer_kwargs(output, block_sizes=[4], stage_steps=[2], save_strategy="steps",
                                                  save_steps=2))
    trainer = BlockMergeTrainer(str(tiny_bard_vl_dir), args=args, train_dataset=Dataset.from_list(tiny_chat_rows(4)),
                                callbacks=[steps])
    with caplog.at_level(logging.WARNING, logger="transformers_bard"):
        trainer.train(resume_from_checkpoint=True)
    assert "from the beginning (step 0)" in caplog.text
    assert steps.steps == [1, 2]
    assert (output / "checkpoints-b4" / "checkpoint-2" / STAGE_STATE_NAME).is_file()
    assert (output / "stage-b4" / STAGE_STATE_NAME).is_file() and not (output / ".stage-b4.tmp").exists()
