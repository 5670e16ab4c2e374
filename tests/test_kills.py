"""Kills, tried on purpose (issue 23): a training run SIGKILLed between checkpoints, inside a checkpoint save or inside
a stage save resumes from its last complete checkpoint to the same weights and losses as a run never interrupted; a
half-written checkpoint folder is never resumed from (killed inside the first save, resuming starts from step 0); a
conversion killed mid-write leaves no target folder; a failed upload leaves the local files intact and says so.

The runs (marked slow) are processes of `tests/killed_run.py` (the example scripts' entry points, with a kill at a chosen
point: see its docstring), on the tiny recipes with a checkpoint every 2 steps; each is forked from one `killed_run.py
serve` process of the module, which imports torch, transformers and TRL once for all of them.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from conftest import EXAMPLES, REPO, accelerate_available, free_port, offline_env, tiny_chat_rows
from transformers_bard import BardVLForConditionalGeneration
from transformers_bard.trainer.stages import STAGE_STATE_NAME, resume_point

KILLED_RUN = REPO / "tests" / "killed_run.py"
SAVES = ["--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(arguments, kill_at=None)``: `tests/killed_run.py ARGUMENTS` killed at `kill_at` (or not), as a
    `subprocess.CompletedProcess` with its output. Each run is a process of its own, forked by one `killed_run.py
    serve` (offline, one thread) that imported the libraries once."""
    logs = tmp_path_factory.mktemp("killed_runs")
    server_log = (logs / "serve.log").open("w")
    env = offline_env()
    env.pop("BARD_KILL_AT", None)
    server = subprocess.Popen([sys.executable, str(KILLED_RUN), "serve"], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=server_log, text=True)
    numbers = itertools.count()

    def run_one(arguments, kill_at=None, timeout=600) -> subprocess.CompletedProcess:
        argv = [*map(str, arguments)]
        number = next(numbers)
        stdout, stderr = logs / f"{number}.out", logs / f"{number}.err"
        request = {"argv": argv, "kill_at": kill_at, "stdout": str(stdout), "stderr": str(stderr), "timeout": timeout}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
        assert reply, "killed_run.py serve exited: " + (logs / "serve.log").read_text()[-3000:]
        reply = json.loads(reply)
        if reply.get("timed_out"):
            raise subprocess.TimeoutExpired(argv, timeout, stdout.read_text(), stderr.read_text())
        return subprocess.CompletedProcess(argv, reply["returncode"], stdout.read_text(), stderr.read_text())

    yield run_one
    server.stdin.close()
    server.wait(timeout=60)
    server_log.close()


def killed(result) -> bool:
    return result.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill_data")
    Dataset.from_list(tiny_chat_rows(8)).to_parquet(str(folder / "train.parquet"))
    return folder


def arguments(kind, dirs, data_dir, output_dir) -> list:
    if kind == "block_merge":
        return ["block_merge", "--config", EXAMPLES / "configs" / "block_merge_tiny.yaml", "--model_name_or_path",
                dirs["merge"], "--dataset_name", data_dir, "--output_dir", output_dir, *SAVES]
    return ["diffusion_distill", "--config", EXAMPLES / "configs" / "distill_tiny.yaml", "--model_name_or_path",
            dirs["student"], "--teacher_model_name_or_path", dirs["teacher"], "--dataset_name", data_dir,
            "--output_dir", output_dir, *SAVES]


BLOCK_SIZES = {"block_merge": [4, 8], "diffusion_distill": [8]}


@pytest.fixture(scope="module")
def dirs(tiny_bard_vl_dir, tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir):
    return {"merge": tiny_bard_vl_dir, "student": tiny_bard_vl_b8_dir, "teacher": tiny_bard_vl_teacher_dir}


@pytest.fixture(scope="module")
def uninterrupted(dirs, data_dir, run, tmp_path_factory):
    """The reference runs, never killed: {kind: output folder}."""
    runs = {}
    for kind in BLOCK_SIZES:
        output = tmp_path_factory.mktemp(f"uninterrupted_{kind}")
        result = run(arguments(kind, dirs, data_dir, output))
        assert result.returncode == 0, result.stderr[-4000:]
        runs[kind] = output
    return runs


def final_stage(folder: Path, kind: str) -> Path:
    return folder / f"stage-b{BLOCK_SIZES[kind][-1]}"


def losses(stage_dir: Path) -> list[float]:
    history = json.loads((stage_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


# Where each run is killed (see tests/killed_run.py): between checkpoints, inside a checkpoint save at each of its
# phases, and inside a stage save, in the first and in a later stage. `half_written` is the checkpoint folder the
# kill leaves incomplete (never to be resumed from); `resumes_from` the folder resuming must pick.
KILLS = [
    ("block_merge", "step:4:3", None, "checkpoints-b4/checkpoint-2"),
    ("block_merge", "save-model:4:4", "checkpoints-b4/checkpoint-4", "checkpoints-b4/checkpoint-2"),
    ("block_merge", "stage:4:0", None, "checkpoints-b4/checkpoint-4"),
    ("block_merge", "step:8:1", None, "stage-b4"),
    ("block_merge", "save-optimizer:8:2", "checkpoints-b8/checkpoint-2", "stage-b4"),
    ("block_merge", "save-marker:8:4", "checkpoints-b8/checkpoint-4", "checkpoints-b8/checkpoint-2"),
    ("diffusion_distill", "step:8:3", None, "checkpoints-b8/checkpoint-2"),
    ("diffusion_distill", "save-optimizer:8:4", "checkpoints-b8/checkpoint-4", "checkpoints-b8/checkpoint-2"),
    ("diffusion_distill", "stage:8:0", None, "checkpoints-b8/checkpoint-4"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "kill_at", "half_written", "resumes_from"), KILLS, ids=[f"{kind}-{at}" for kind, at, *_ in KILLS]
)
def test_killed_run_resumes_to_the_uninterrupted_result(kind, kill_at, half_written, resumes_from, dirs, data_dir,
                                                          uninterrupted, run, tmp_path):
    output = tmp_path / "run"
    result = run(arguments(kind, dirs, data_dir, output), kill_at=kill_at)
    assert killed(result), f"not killed at {kill_at} (rc {result.returncode}): {result.stderr[-3000:]}"
    assert not final_stage(output, kind).exists()

    # 1. what the kill left: the half-written folder is there but never taken for a checkpoint
    if half_written is not None:
        assert (output / half_written).is_dir() and not (output / half_written / STAGE_STATE_NAME).exists()
    start, checkpoint, weights_from = resume_point(str(output), BLOCK_SIZES[kind], True)
    picked = checkpoint or weights_from
    assert picked == str(output / resumes_from)
    assert (Path(picked) / STAGE_STATE_NAME).is_file()
    loaded = BardVLForConditionalGeneration.from_pretrained(picked)  # the last complete checkpoint loads
    assert all(torch.isfinite(param).all() for param in loaded.parameters())

    # 2. resuming ends where the uninterrupted run ended: same final weights, same losses
    resume_to_the_uninterrupted_result(run, kind, dirs, data_dir, output, uninterrupted)


def resume_to_the_uninterrupted_result(run, kind, dirs, data_dir, output, uninterrupted) -> subprocess.CompletedProcess:
    """Run the same command again with `--resume_from_checkpoint true` (a requeued job); it must end with the
    uninterrupted run's final weights and losses, every checkpoint folder left complete."""
    result = run(arguments(kind, dirs, data_dir, output) + ["--resume_from_checkpoint", "true"])
    assert result.returncode == 0, result.stderr[-4000:]
    expected_dir, got_dir = final_stage(uninterrupted[kind], kind), final_stage(output, kind)
    assert losses(got_dir) == pytest.approx(losses(expected_dir), rel=1e-5)
    expected, got = load_file(str(expected_dir / "model.safetensors")), load_file(str(got_dir / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    # every checkpoint folder left is complete (the half-written one was replaced when its step was saved again)
    for folder in output.glob("checkpoints-b*/checkpoint-*"):
        assert (folder / STAGE_STATE_NAME).is_file(), folder
    assert not list(output.glob(".stage-*"))
    return result


@pytest.mark.slow
def test_killed_inside_the_first_save_restarts_from_step_0(dirs, data_dir, uninterrupted, run, tmp_path):
    """Killed inside the very first checkpoint save: nothing complete to resume from. The half-written folder is
    refused by path; the same command with `--resume_from_checkpoint true` (a requeued job) warns, starts from step 0
    and ends with the uninterrupted run's result (issue 39)."""
    output = tmp_path / "run"
    assert killed(run(arguments("block_merge", dirs, data_dir, output), kill_at="save-marker:4:2"))
    assert (output / "checkpoints-b4" / "checkpoint-2" / "model.safetensors").is_file()
    assert resume_point(str(output), [4, 8], True) == (0, None, None)
    with pytest.raises(ValueError, match="its save was interrupted"):
        resume_point(str(output), [4, 8], str(output / "checkpoints-b4" / "checkpoint-2"))
    result = resume_to_the_uninterrupted_result(run, "block_merge", dirs, data_dir, output, uninterrupted)
    assert "holds no complete checkpoint" in result.stderr and "from the beginning (step 0)" in result.stderr


@pytest.mark.slow
def test_conversion_killed_mid_write_leaves_no_target_folder(tiny_qwen3_vl_dir, run, tmp_path):
    target = tmp_path / "converted"
    result = run(["convert", tiny_qwen3_vl_dir, target], kill_at="copy:3")
    assert killed(result), result.stderr[-3000:]
    assert not target.exists()
    leftovers = [path for path in tmp_path.iterdir() if path.name.startswith(".converted.tmp-")]
    assert len(leftovers) == 1  # the temporary folder, under a name no loader takes for the target
    assert run(["convert", tiny_qwen3_vl_dir, target]).returncode == 0  # and a new conversion succeeds
    assert (target / "config.json").is_file()
    BardVLForConditionalGeneration.from_pretrained(target)


def test_failed_upload_leaves_the_local_folder_intact_and_says_so(tiny_bard_vl_dir, tmp_path, monkeypatch):
    from transformers.utils import hub as transformers_hub

    local = Path(shutil.copytree(tiny_bard_vl_dir, tmp_path / "local"))
    before = {path.name: path.read_bytes() for path in local.iterdir() if path.is_file()}

    class FailingApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, **kwargs):
            raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(transformers_hub, "hf_api", lambda: FailingApi())
    model = BardVLForConditionalGeneration.from_pretrained(local)
    with pytest.raises(ConnectionError, match="connection reset by peer") as error:
        model.push_to_hub("someone/bard-tiny")
    note = "\n".join(getattr(error.value, "__notes__", []))
    assert "Uploading to someone/bard-tiny failed; nothing local was changed" in note
    assert str(local) in note and "push_to_hub" in note
    assert {path.name: path.read_bytes() for path in local.iterdir() if path.is_file()} == before
    assert os.listdir(tmp_path) == ["local"]


@pytest.mark.slow
@pytest.mark.skipif(not accelerate_available(), reason="no accelerate")
def test_fsdp2_run_killed_inside_a_save_resumes_to_the_uninterrupted_result(fsdp2_block_merge_run, tmp_path):
    """2 gloo processes under FSDP2 (examples/accelerate_configs/fsdp2_cpu.yaml; the run of conftest's
    `fsdp2_block_merge_run`: AdamW, a checkpoint every step, here at most one kept), both killed inside the save of
    ``checkpoints-b8/checkpoint-2`` after the sharded optimizer state is written: resuming from ``checkpoint-1`` (mid
    stage) ends like the uninterrupted FSDP2 run."""
    script_arguments, full = fsdp2_block_merge_run

    def launch(output, *extra, kill_at=None):
        env = offline_env()
        env.pop("BARD_KILL_AT", None)
        if kill_at is not None:
            env["BARD_KILL_AT"] = kill_at
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(EXAMPLES / "accelerate_configs" / "fsdp2_cpu.yaml"), "--main_process_port", str(free_port()),
            str(KILLED_RUN), "block_merge", *script_arguments, "--output_dir", str(output), "--save_total_limit", "1",
            *extra,
        ]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    output = tmp_path / "run"
    result = launch(output, kill_at="save-optimizer:8:2")
    assert result.returncode != 0 and "SIGKILL" in result.stdout + result.stderr, result.stderr[-6000:]
    half = output / "checkpoints-b8" / "checkpoint-2"
    assert half.is_dir() and not (half / STAGE_STATE_NAME).exists()
    assert resume_point(str(output), [4, 8], True)[1] == str(output / "checkpoints-b8" / "checkpoint-1")
    result = launch(output, "--resume_from_checkpoint", "true")
    assert result.returncode == 0, result.stderr[-6000:]
    assert losses(output / "stage-b8") == pytest.approx(losses(full / "stage-b8"), rel=1e-5)
    expected = load_file(str(full / "stage-b8" / "model.safetensors"))
    got = load_file(str(output / "stage-b8" / "model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
