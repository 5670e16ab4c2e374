"""More than one process: `accelerate launch` with 2 CPU processes (gloo), DDP or FSDP2, trains exactly like 1 process.

2 processes x per-device batch 2 must give the same logged losses and the same updated weights as 1 process x batch 4:
the losses are normalised by the items of the whole optimizer step across ranks (samples for PBM, DESIGN 3.4; masked
tokens for SWD, DESIGN 3.6) and each sample's noise is seeded by its dataset index, not by the batch it lands in.
Every run uses SGD without clipping: the update is proportional to the gradient, so a normalisation error shows.
"""

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from trl import ModelConfig, ScriptArguments, TrlParser

from conftest import (
    EXAMPLES,
    accelerate_available,
    accelerate_launch,
    fsdp2_resume_arguments,
    interrupted_copies,
    load_example_script,
    tiny_chat_rows,
)
from transformers_bard.trainer.block_merge_config import BlockMergeConfig
from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not accelerate_available(), reason="no accelerate"),
]

LM_PARAM = "model.language_model.layers.0.self_attn.q_proj.weight"
SGD = [
    "--optim",
    "sgd",
    "--learning_rate",
    "0.5",
    "--vision_learning_rate",
    "0.5",
    "--lr_scheduler_type",
    "constant",
    "--max_grad_norm",
    "0",
    "--max_warmup_steps",
    "0",
    "--disable_tqdm",
    "true",
]


def write_dataset(tmp_path, num_rows: int = 8):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    Dataset.from_list(tiny_chat_rows(num_rows)).to_parquet(str(data_dir / "train.parquet"))
    return data_dir


def block_merge_arguments(model_dir, tmp_path, *extra, num_rows: int = 8) -> list[str]:
    """Command-line arguments of examples/scripts/block_merge.py on the tiny recipe, a fresh dataset and `extra`."""
    return [
        "--config",
        str(EXAMPLES / "configs" / "block_merge_tiny.yaml"),
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(write_dataset(tmp_path, num_rows)),
        *extra,
    ]


def distill_arguments(student_dir, teacher_dir, tmp_path, *extra, num_rows: int = 8) -> list[str]:
    """Command-line arguments of examples/scripts/diffusion_distill.py on the tiny recipe, a fresh dataset and `extra`."""
    return [
        "--config",
        str(EXAMPLES / "configs" / "distill_tiny.yaml"),
        "--model_name_or_path",
        str(student_dir),
        "--teacher_model_name_or_path",
        str(teacher_dir),
        *extra,
        "--dataset_name",
        str(write_dataset(tmp_path, num_rows)),
    ]


def one_process(script: str, arguments: list[str], one) -> None:
    """Run example `script` in this process with batch 4, into `one`."""
    config_class = {"block_merge": BlockMergeConfig, "diffusion_distill": DiffusionDistillConfig}[script]
    parser = TrlParser((ScriptArguments, config_class, ModelConfig))
    load_example_script(script).main(
        *parser.parse_args_and_config(arguments + ["--output_dir", str(one), "--per_device_train_batch_size", "4"])
    )


def two_processes(script: str, accelerate_config: str, arguments: list[str], two):
    """Run example `script` under `accelerate launch` with `accelerate_config` as 2 processes x batch 2, into `two`;
    returns the launch result."""
    result = accelerate_launch(
        accelerate_config, script, arguments + ["--output_dir", str(two), "--per_device_train_batch_size", "2"]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def one_and_two_processes(script: str, accelerate_config: str, arguments: list[str], tmp_path):
    """Run example `script` in this process with batch 4 (into ``one``), then under `accelerate launch` with
    `accelerate_config` as 2 processes x batch 2 (into ``two``); returns ``(one, two, launch result)``."""
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(script, arguments, one)
    return one, two, two_processes(script, accelerate_config, arguments, two)


@pytest.fixture(scope="module")
def distill_one_process(tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, tmp_path_factory):
    """The 1-process reference of both distillation tests (DDP and FSDP2 run the same arguments): 2 SGD steps in
    this process, batch 4, once. Returns ``(arguments, output folder)``."""
    folder = tmp_path_factory.mktemp("distill")
    arguments = distill_arguments(tiny_bard_vl_b8_dir, tiny_bard_vl_teacher_dir, folder, "--max_steps", "2", *SGD)
    one_process("diffusion_distill", arguments, folder / "one")
    return arguments, folder / "one"


def logged(stage_dir, keys=("loss",)) -> list[float]:
    """The logged values of `keys` at every logging step, flattened in step order."""
    history = json.loads((stage_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if "loss" in entry for key in keys]


def assert_same_weights(expected_dir, got_dir, initial_dir):
    expected = load_file(str(expected_dir / "model.safetensors"))
    got = load_file(str(got_dir / "model.safetensors"))
    initial = load_file(str(initial_dir / "model.safetensors"))
    assert not torch.allclose(expected[LM_PARAM], initial[LM_PARAM])  # the runs did update the weights
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6, msg=key)


def test_block_merge_two_processes_equal_one_process(tiny_bard_vl_dir, tmp_path):
    """DDP, the fused LM head (TRL's, computed inside the forward as DDP needs)."""
    arguments = block_merge_arguments(
        tiny_bard_vl_dir, tmp_path, "--block_sizes", "4", "--stage_steps", "2", "--use_fused_lm_head", "true", *SGD
    )
    one, two, _ = one_and_two_processes("block_merge", "multi_cpu", arguments, tmp_path)

    assert len(logged(one / "stage-b4")) == 2
    assert logged(two / "stage-b4") == pytest.approx(logged(one / "stage-b4"), rel=1e-5)
    assert_same_weights(one / "stage-b4", two / "stage-b4", tiny_bard_vl_dir)


def test_diffusion_distill_two_processes_equal_one_process(distill_one_process, tiny_bard_vl_b8_dir, tmp_path):
    """DDP, the teacher placed by accelerate on each rank; the masked tokens of the step are counted over both."""
    arguments, one = distill_one_process
    two = tmp_path / "two"
    two_processes("diffusion_distill", "multi_cpu", arguments, two)

    keys = ("loss", "ce", "kd")
    assert len(logged(one / "stage-b8", keys)) == 2 * len(keys)
    assert logged(two / "stage-b8", keys) == pytest.approx(logged(one / "stage-b8", keys), rel=1e-5)
    assert_same_weights(one / "stage-b8", two / "stage-b8", tiny_bard_vl_b8_dir)


def test_fsdp2_sharded_step_equals_one_process(tiny_bard_vl_dir, tiny_bard_vl_teacher_dir, tmp_path):
    """FSDP2 (`fully_shard`, accelerate's TRANSFORMER_BASED_WRAP units) on 2 gloo processes vs 1 unsharded process,
    the same 4 samples (see tests/fsdp2_step.py): equal losses for the selective head and TRL's fused head (which
    gathers the sharded LM-head weight), equal gradient norms, equal weights after one SGD step, equal top-k targets
    of the sharded teacher, and a complete unsharded checkpoint that loads with the Auto classes."""
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText

    from conftest import REPO, free_port, offline_env

    worker = str(REPO / "tests" / "fsdp2_step.py")
    folders = {"one": tmp_path / "one", "two": tmp_path / "two"}
    for folder in folders.values():
        folder.mkdir()
    paths = [str(tiny_bard_vl_dir), str(tiny_bard_vl_teacher_dir)]
    commands = {
        "one": [sys.executable, worker, *paths, str(folders["one"])],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            worker,
            *paths,
            str(folders["two"]),
        ],
    }
    runs = {}  # the reference and the sharded run at once: 3 one-thread processes, independent of each other
    for name, command in commands.items():
        log = tmp_path / f"{name}.log"
        with log.open("w") as output:
            runs[name] = (subprocess.Popen(command, cwd=REPO, env=offline_env(), stdout=output,
                                           stderr=subprocess.STDOUT), log)
    try:
        for name, (process, log) in runs.items():
            assert process.wait(timeout=300) == 0, name + log.read_text()[-6000:]
    finally:
        for process, _ in runs.values():
            if process.poll() is None:
                process.kill()

    one = json.loads((folders["one"] / "rank0.json").read_text())
    ranks = [json.loads((folders["two"] / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for key in ("loss_selective", "loss_fused"):  # each rank's loss is its share of sum_s L_s / 4
        assert sum(rank[key] for rank in ranks) == pytest.approx(one[key], rel=1e-5), key
    assert one["loss_fused"] == pytest.approx(one["loss_selective"], rel=1e-5)
    for key in ("grad_norm", "grad_norm_fused"):
        assert ranks[0][key] == ranks[1][key] == pytest.approx(one[key], rel=1e-5), key
    sharded_topk = torch.tensor(ranks[0]["teacher_topk"] + ranks[1]["teacher_topk"])
    torch.testing.assert_close(sharded_topk, torch.tensor(one["teacher_topk"]), rtol=1e-5, atol=1e-5)
    assert_same_weights(folders["one"], folders["two"], tiny_bard_vl_dir)
    config = json.loads((folders["two"] / "config.json").read_text())
    assert config["architectures"] == ["BardVLForConditionalGeneration"]
    loaded = AutoModelForImageTextToText.from_pretrained(folders["two"])
    assert type(loaded).__name__ == "BardVLForConditionalGeneration"


FSDP2_WARNING = "FSDP2 on 2 CPU processes (gloo)"


def assert_loads_with_remote_code_only(folder, tmp_path):
    """The stage folder names BARD-VL's own files in its auto_map (not torch's FSDP wrapper class) and loads with
    `trust_remote_code=True` in a process where transformers_bard cannot be imported."""
    import subprocess
    import sys

    from conftest import REPO, offline_env

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BardVLForConditionalGeneration"]
    assert set(config["auto_map"].values()) <= {
        "configuration_bard_vl.BardVLConfig",
        "modeling_bard_vl.BardVLForConditionalGeneration",
    }, config["auto_map"]
    assert not list(folder.glob("_fsdp*.py")) and (folder / "modeling_bard_vl.py").is_file()
    script = (
        "import sys; sys.modules['transformers_bard'] = None\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "assert type(model).__name__ == 'BardVLForConditionalGeneration', type(model)\n"
    )
    env = dict(offline_env(), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_block_merge_fsdp2_two_stages_equal_one_process(tiny_bard_vl_dir, tmp_path):
    """`accelerate launch --config_file fsdp2_cpu.yaml`: BlockMergeTrainer through two stages on 2 gloo processes,
    sharded by accelerate's FSDP2 path, equals 1 process with the same global batch: logged losses and gradient norms
    of both stages, and the weights of both stage folders; each stage folder is a complete, unsharded checkpoint."""
    arguments = block_merge_arguments(
        tiny_bard_vl_dir, tmp_path, "--block_sizes", "4", "8", "--stage_steps", "2", *SGD
    )
    one, two, result = one_and_two_processes("block_merge", "fsdp2_cpu", arguments, tmp_path)
    assert FSDP2_WARNING in result.stderr  # sharded, not replicated

    for stage in ("stage-b4", "stage-b8"):
        assert len(logged(one / stage)) == 2
        keys = ("loss", "grad_norm")
        assert logged(two / stage, keys) == pytest.approx(logged(one / stage, keys), rel=1e-4), stage
    assert_same_weights(one / "stage-b4", two / "stage-b4", tiny_bard_vl_dir)
    assert_same_weights(one / "stage-b8", two / "stage-b8", tiny_bard_vl_dir)
    assert json.loads((two / "stage-b8" / "config.json").read_text())["block_size"] == 8
    assert_loads_with_remote_code_only(two / "stage-b8", tmp_path)


def test_diffusion_distill_fsdp2_equals_one_process(distill_one_process, tiny_bard_vl_b8_dir, tmp_path):
    """FSDP2 on 2 gloo processes with the teacher sharded too (TRL's `prepare_fsdp`: the teacher's weights are split
    like the student's instead of held whole on every rank): equal losses, CE, KD and weights to 1 process."""
    arguments, one = distill_one_process
    two = tmp_path / "two"
    result = two_processes("diffusion_distill", "fsdp2_cpu", arguments, two)
    assert FSDP2_WARNING in result.stderr

    keys = ("loss", "ce", "kd", "grad_norm")
    assert len(logged(one / "stage-b8", keys)) == 2 * len(keys)
    assert logged(two / "stage-b8", keys) == pytest.approx(logged(one / "stage-b8", keys), rel=1e-4)
    assert_same_weights(one / "stage-b8", two / "stage-b8", tiny_bard_vl_b8_dir)
    assert_loads_with_remote_code_only(two / "stage-b8", tmp_path)


def test_fsdp2_resume_mid_stage_and_at_a_stage_boundary(fsdp2_block_merge_run, tiny_bard_vl_dir, tmp_path):
    """Under FSDP2 (2 gloo processes, TRL's fused LM head gathering the sharded head weight), an interrupted run
    resumed with `--resume_from_checkpoint true` ends with the uninterrupted run's losses and weights: with AdamW (a
    state per parameter) interrupted right after stage b4, with plain SGD, whose optimizer state is empty, interrupted
    mid-stage (from `checkpoints-b8/checkpoint-1`). (A boundary resume loads the stage's weights only, whatever the
    optimizer; the AdamW run resumed mid-stage, from a kill inside a save, is tests/test_kills.py's FSDP2 test.) A
    mid-stage checkpoint holds the weights once, as safetensors."""
    adamw_arguments, adamw_full = fsdp2_block_merge_run
    sgd_arguments = fsdp2_resume_arguments(tiny_bard_vl_dir, tmp_path / "data", "sgd")
    sgd_full = tmp_path / "sgd_full"
    result = accelerate_launch("fsdp2_cpu", "block_merge", sgd_arguments + ["--output_dir", str(sgd_full)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for full in (adamw_full, sgd_full):
        checkpoint = full / "checkpoints-b8" / "checkpoint-1"
        assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.bin").is_file()
        assert not list(checkpoint.glob("pytorch_model*")), sorted(path.name for path in checkpoint.iterdir())
    _, boundary = interrupted_copies(adamw_full, tmp_path / "adamw")
    mid, _ = interrupted_copies(sgd_full, tmp_path / "sgd")
    for name, arguments, full, folder in (("adamw_torch", adamw_arguments, adamw_full, boundary),
                                          ("sgd", sgd_arguments, sgd_full, mid)):
        result = accelerate_launch(
            "fsdp2_cpu", "block_merge", arguments + ["--output_dir", str(folder), "--resume_from_checkpoint", "true"]
        )
        what = f"{name}, {folder.name}"
        assert result.returncode == 0, what + result.stdout[-3000:] + result.stderr[-6000:]
        assert logged(folder / "stage-b8") == pytest.approx(logged(full / "stage-b8"), rel=1e-5), what
        expected = load_file(str(full / "stage-b8" / "model.safetensors"))
        got = load_file(str(folder / "stage-b8" / "model.safetensors"))
        for key, tensor in expected.items():
            torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-7, msg=f"{what}: {key}")


def test_unsupported_sharding_on_cpu_is_refused(tiny_bard_vl_dir, tmp_path):
    """What cannot run sharded is refused before training, naming the alternative: FSDP version 1 on CPU processes
    (only FSDP2 runs there) and LoRA under FSDP (stage checkpoints merge the adapter into full weights)."""
    arguments = block_merge_arguments(tiny_bard_vl_dir, tmp_path, num_rows=4)
    for name, launch, extra, message in (
        ("v1", ["--fsdp_version", "1"], [], "Only FSDP2 runs on CPU: set `fsdp_version: 2`"),
        ("lora", [], ["--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj"], "LoRA with FSDP or DeepSpeed ZeRO-3 is not supported"),
    ):
        out = tmp_path / name
        result = accelerate_launch(
            "fsdp2_cpu", "block_merge", arguments + ["--output_dir", str(out)] + extra, launch_arguments=launch
        )
        assert result.returncode != 0, name
        assert message in result.stderr, name + result.stderr[-3000:]
        assert not (out / "stage-b4").exists()


def test_stock_qwen3_vl_teacher_is_refused_under_fsdp2(tiny_bard_vl_b8_dir, tiny_qwen3_vl_dir, tmp_path):
    """A sharded stock Qwen3-VL teacher would skip its vision tower on text-only batches and stall the other ranks:
    refused, naming the fix (a converted BARD-VL model works as the autoregressive teacher)."""
    arguments = distill_arguments(
        tiny_bard_vl_b8_dir,
        tiny_qwen3_vl_dir,
        tmp_path,
        *("--teacher_type", "autoregressive", "--output_dir", str(tmp_path / "out")),
        num_rows=4,
    )
    result = accelerate_launch("fsdp2_cpu", "diffusion_distill", arguments)
    assert result.returncode != 0
    assert "would be sharded, which needs a BARD-VL model" in result.stderr, result.stderr[-3000:]
    assert "transformers-bard convert" in result.stderr
