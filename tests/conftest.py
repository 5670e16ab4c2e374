"""Shared, session-scoped fixtures. Built checkpoints are read-only: copy one before changing it."""

import pytest

from transformers_bard.testing import build_tiny_qwen3_vl


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and two threads on two shared cores slow them down a lot. A
    module uses it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_compile():
    """Reset torch.compile's caches around a FlexAttention test. After earlier compilations at other shapes dynamo
    recompiles with dynamic shapes, and torch 2.13's CPU flex-attention template then fails to build (an inductor
    C++ codegen error, `cur_kvSplitSize0` undeclared); each test compiles static shapes only."""
    import torch

    torch._dynamo.reset()
    # and never switch to dynamic shapes: a decode's forwards have many lengths (prefill, steps, commits), and
    # after a few of them dynamo would recompile dynamically, into the template that fails to build; past dynamo's
    # recompile limit the rest run uncompiled (flex's eager path, with the same BlockMask)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory):
    """A stock tiny Qwen3-VL checkpoint in the Hub layout (seed 0, 2 safetensors shards, images up to 64 x 64)."""
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"))


# ---------------------------------------------------------------------- block-diffusion training (issue 4)
def _add_mask_token(tokenizer) -> int:
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken("<|mask|>", special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids("<|mask|>")


@pytest.fixture(scope="session")
def tiny_bard_vl_dir(tiny_qwen3_vl_dir, tmp_path_factory):
    """The tiny checkpoint as a BARD-VL model (block size 4, `<|mask|>` added to the tokenizer), built directly with
    `BardVLForConditionalGeneration.from_pretrained(..., mask_token_id=...)` rather than through the conversion."""
    from transformers_bard import BardVLForConditionalGeneration
    from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor

    output = tmp_path_factory.mktemp("tiny_bard_vl")
    processor = BardVLProcessor.from_pretrained(tiny_qwen3_vl_dir)
    mask_token_id = _add_mask_token(processor.tokenizer)
    model = BardVLForConditionalGeneration.from_pretrained(
        tiny_qwen3_vl_dir, mask_token_id=mask_token_id, block_size=4
    )
    assert mask_token_id < model.config.text_config.vocab_size  # fits without resizing (DESIGN 2)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output


def tiny_chat_rows(num_rows: int, seed: int = 0) -> list[dict]:
    """Rows in TRL's vision format (`messages` with `{"type": "image"}` placeholders + `images`), of varied lengths;
    every third row is text-only."""
    import random

    from transformers_bard.testing import make_image

    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow"]
    shapes = ["square", "circle", "star", "box"]
    rows = []
    for index in range(num_rows):
        color, shape = rng.choice(colors), rng.choice(shapes)
        answer = " ".join([f"The {color} {shape} is at the left."] * (1 + index % 3))
        with_image = index % 3 != 2
        user = [{"type": "image"}] if with_image else []
        user.append({"type": "text", "text": f"What color is the {shape}?"})
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": [make_image(index, (32 * (1 + index % 2), 32))] if with_image else [],
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_chat_dataset():
    """A 6-row chat dataset (`datasets.Dataset`, images stored as an Image feature)."""
    from datasets import Dataset

    return Dataset.from_list(tiny_chat_rows(6))


# ---------------------------------------------------------------------- stage-wise distillation (issue 5)
@pytest.fixture(scope="session")
def tiny_bard_vl_b8_dir(tiny_bard_vl_dir, tmp_path_factory):
    """A distillation student: the tiny BARD-VL checkpoint saved at block size 8 (same weights and tokenizer)."""
    from transformers_bard import BardVLForConditionalGeneration
    from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor

    output = tmp_path_factory.mktemp("tiny_bard_vl_b8")
    BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir, block_size=8).save_pretrained(output)
    BardVLProcessor.from_pretrained(tiny_bard_vl_dir).save_pretrained(output)
    return output


@pytest.fixture(scope="session")
def tiny_bard_vl_teacher_dir(tiny_bard_vl_dir, tmp_path_factory):
    """A distillation teacher at block size 4: the tiny BARD-VL weights plus seeded noise (std 0.05), so that teacher
    and student predict differently."""
    import torch

    from transformers_bard import BardVLForConditionalGeneration
    from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor

    output = tmp_path_factory.mktemp("tiny_bard_vl_teacher")
    model = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(output)
    BardVLProcessor.from_pretrained(tiny_bard_vl_dir).save_pretrained(output)
    return output


# ---------------------------------------------------------------------- a trained model (slow tests)
@pytest.fixture(scope="session")
def trained_digits_b8(tmp_path_factory):
    """(model, processor): the shipped digits AR model converted to B = 8 and trained with block merging for 30 steps
    (about a minute on one thread), once per session: a model that learned EOS padding and drafts the AR model's
    answers often (used by the EOS-fill and verified-decoding tests)."""
    import torch

    from transformers_bard import BardVLForConditionalGeneration, convert_from_autoregressive
    from transformers_bard.demo.digits import build_digits_dataset, load_digits_ar_path
    from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
    from transformers_bard.trainer.block_merge_config import BlockMergeConfig
    from transformers_bard.trainer.block_merge_trainer import BlockMergeTrainer

    tmp_path = tmp_path_factory.mktemp("trained_digits_b8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        converted = convert_from_autoregressive(load_digits_ar_path(), tmp_path / "b8", block_size=8)
        args = BlockMergeConfig(
            block_sizes=[8], stage_steps=[30], learning_rate=5e-4, max_warmup_steps=1,
            output_dir=str(tmp_path / "pbm"), per_device_train_batch_size=8, max_length=512, use_cpu=True,
            bf16=False, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
            activation_checkpointing=False, disable_tqdm=True,
        )
        BlockMergeTrainer(str(converted), args=args, train_dataset=build_digits_dataset("train", 240, seed=0)).train()
    finally:
        torch.set_num_threads(threads)
    model = BardVLForConditionalGeneration.from_pretrained(tmp_path / "pbm" / "stage-b8").eval()
    return model, BardVLProcessor.from_pretrained(tmp_path / "pbm" / "stage-b8")


# ---------------------------------------------------------------------- example scripts and `accelerate launch`
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def load_example_script(name: str):
    """`examples/scripts/{name}.py` as a module (its `main` is the training entry point)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accelerate_available() -> bool:
    """Whether `accelerate launch` can run (multi-process tests skip otherwise)."""
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process, timeout: float) -> None:
    """Terminate a server started by a test; kill it when it has not exited after `timeout` seconds."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def offline_env() -> dict:
    """The environment of a launched process: offline, one thread per process."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def accelerate_launch(config: str, script: str, arguments: list[str], launch_arguments=(), timeout: int = 600):
    """Run `accelerate launch --config_file examples/accelerate_configs/{config}.yaml [launch_arguments]
    examples/scripts/{script}.py [arguments]` offline on a free port; returns the `subprocess.CompletedProcess`
    (output captured)."""
    import subprocess
    import sys

    # `python -m accelerate.commands.launch` is `accelerate launch` without the CLI's other subcommands, whose imports
    # (e.g. timm for `accelerate estimate-memory`) must not decide whether training can be launched
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(EXAMPLES / "accelerate_configs" / f"{config}.yaml"),
        "--main_process_port",
        str(free_port()),
        *launch_arguments,
        str(EXAMPLES / "scripts" / f"{script}.py"),
        *arguments,
    ]
    return subprocess.run(command, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=timeout)


def interrupted_copies(full, tmp_path):
    """Two copies of a finished 2-stage run (block sizes 4, 8; 2 steps per stage; a checkpoint every step), as if
    interrupted: ``mid`` after step 1 of stage b8, ``boundary`` right after stage b4. Returns ``(mid, boundary)``."""
    import shutil

    mid = tmp_path / "mid"
    shutil.copytree(full, mid)
    shutil.rmtree(mid / "stage-b8")
    shutil.rmtree(mid / "checkpoints-b8" / "checkpoint-2")
    boundary = tmp_path / "boundary"
    shutil.copytree(mid, boundary)
    shutil.rmtree(boundary / "checkpoints-b8")
    return mid, boundary


def fsdp2_resume_arguments(model_dir, data_dir, optim: str) -> list[str]:
    """Arguments of examples/scripts/block_merge.py for the FSDP2 resume runs: the tiny recipe on `model_dir` and the
    8-row tiny chat dataset (written to `data_dir`), B = 4 then 8 with 2 steps each, batch 2 per process, TRL's fused
    LM head, a checkpoint every step, no warm-up, optimizer `optim`; no ``--output_dir``."""
    from datasets import Dataset

    data_dir.mkdir(parents=True)
    Dataset.from_list(tiny_chat_rows(8)).to_parquet(str(data_dir / "train.parquet"))
    return [
        *("--config", str(EXAMPLES / "configs" / "block_merge_tiny.yaml"), "--model_name_or_path", str(model_dir)),
        *("--dataset_name", str(data_dir)),
        *("--block_sizes", "4", "8", "--stage_steps", "2", "--per_device_train_batch_size", "2"),
        *("--use_fused_lm_head", "true", "--save_strategy", "steps", "--save_steps", "1"),
        *("--max_warmup_steps", "0", "--disable_tqdm", "true", "--optim", optim),
    ]


@pytest.fixture(scope="session")
def fsdp2_block_merge_run(tiny_bard_vl_dir, tmp_path_factory):
    """An uninterrupted run under FSDP2 (`accelerate launch --config_file fsdp2_cpu.yaml`, 2 gloo processes) with
    `fsdp2_resume_arguments(..., "adamw_torch")`, once per session: the reference of the FSDP2 resume tests
    (tests/test_multiprocess.py: interrupted at a stage boundary; tests/test_kills.py: killed inside a save).
    Returns ``(arguments, output folder)``."""
    folder = tmp_path_factory.mktemp("fsdp2_block_merge")
    arguments = fsdp2_resume_arguments(tiny_bard_vl_dir, folder / "data", "adamw_torch")
    full = folder / "full"
    result = accelerate_launch("fsdp2_cpu", "block_merge", arguments + ["--output_dir", str(full)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return arguments, full


def tiny_trainer_kwargs(output_dir, **overrides) -> dict:
    """Keyword arguments shared by the trainer tests' configs: CPU, fp32, quiet, tiny batches, no checkpointing."""
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="no",
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        vision_learning_rate=1e-4,
        max_length=512,
        activation_checkpointing=False,
        seed=0,
    )
    return {**defaults, **overrides}


@pytest.fixture(scope="session")
def vllm_python():
    """The vLLM environment's python (`make vllm`, .venv-vllm/, built here if missing: about 2 minutes on a clean
    machine); the tests that need it skip, naming the build's failure, where it cannot be built."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    python = root / ".venv-vllm" / "bin" / "python"
    build = subprocess.run(["make", "-s", "vllm"], cwd=root, capture_output=True, text=True, timeout=1200)
    if build.returncode != 0 or not python.exists():
        lines = [line for line in (build.stdout + build.stderr).splitlines() if "Location" not in line]
        pytest.skip("the vLLM environment could not be built (`make vllm`): " + " | ".join(lines[-6:]))
    return python
