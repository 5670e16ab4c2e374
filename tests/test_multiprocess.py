"""More than one process: `accelerate launch` with 2 CPU processes (gloo) trains exactly like 1 process.

2 processes x per-device batch 2 must give the same logged loss and the same updated weights as 1 process x batch 4:
the loss is normalised by the samples of the whole optimizer step across ranks (DESIGN 3.4) and each sample's noise
is seeded by its dataset index, not by the batch it lands in.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from trl import ModelConfig, ScriptArguments, TrlParser

from conftest import tiny_chat_rows
from transformers_bard.trainer.block_merge_config import BlockMergeConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "scripts" / "block_merge.py"
ACCELERATE_CONFIG = REPO / "examples" / "accelerate_configs" / "multi_cpu.yaml"
RECIPE = REPO / "examples" / "configs" / "block_merge_tiny.yaml"


def load_example_script():
    spec = importlib.util.spec_from_file_location("block_merge_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "stage-b4" / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None, reason="no accelerate")
def test_two_processes_equal_one_process(tiny_bard_vl_dir, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    Dataset.from_list(tiny_chat_rows(8)).to_parquet(str(data_dir / "train.parquet"))
    # SGD without clipping: the update is proportional to the gradient, so any normalisation error shows
    common = [
        "--config",
        str(RECIPE),
        "--model_name_or_path",
        str(tiny_bard_vl_dir),
        "--dataset_name",
        str(data_dir),
        "--block_sizes",
        "4",
        "--stage_steps",
        "2",
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
        "--ce_chunk_size",
        "16",
    ]

    one = tmp_path / "one"
    parser = TrlParser((ScriptArguments, BlockMergeConfig, ModelConfig))
    load_example_script().main(
        *parser.parse_args_and_config(common + ["--output_dir", str(one), "--per_device_train_batch_size", "4"])
    )

    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        shutil.which("accelerate", path=os.path.dirname(sys.executable)),
        "launch",
        "--config_file",
        str(ACCELERATE_CONFIG),
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        *common,
        "--output_dir",
        str(two),
        "--per_device_train_batch_size",
        "2",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    assert len(losses(one)) == 2
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    expected, got = (
        load_file(str(one / "stage-b4" / "model.safetensors")),
        load_file(str(two / "stage-b4" / "model.safetensors")),
    )
    initial = load_file(str(tiny_bard_vl_dir / "model.safetensors"))
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(expected[name], initial[name])  # the runs did update the weights
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
