"""The GPU check of issue 20: one script, one JSON, under 8 minutes on one GPU.

Run it when a GPU is available (the project's device tool lends an H200 to some sessions):

    python benchmarks/gpu_check.py --out docs/scale/gpu_check.json

Sections (each recorded as ``{"ok": ..., "seconds": ..., ...}``; a failing section is recorded and the rest run):

1. ``flex_equals_sdpa``: a tiny BARD-VL model's packed-batch loss and every parameter gradient with
   ``attn_implementation="flex_attention"`` against sdpa, fp32 (on CPU: the loss only, torch has no CPU flex backward);
2. ``train_step``: `benchmarks/train_step.py` at Qwen3-VL-2B width in bf16, PBM and SWD with sdpa and flex against
   the AR SFT step, 2048:512 and 4096:1024, time and peak memory (depth cut and projected, as that script says);
3. ``decode_forward``: `benchmarks/decode.py --size 2b` one-forward costs, batch 1 and 8, B = 4 ... 32;
4. ``generate``: whole `generate` calls at 2B width (random weights, 28 layers), BARD at the demo models' tokens per
   forward (static unmasking, B / steps tokens per step, forced: the tokens are meaningless) against AR greedy
   `generate` of the same weights, tokens/s;
5. ``fsdp2``: `accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml` through both trainers
   (`examples/scripts/block_merge.py`, then `diffusion_distill.py` with the first run's stage as teacher) for a few
   steps on a 2B-width checkpoint (tiny tokenizer), step time and peak memory from the Trainer's metrics.

`--quick` runs every section at toy size on whatever device there is (the CPU here; FSDP2 through
`fsdp2_cpu.yaml` on 2 processes): the test suite runs it so the script cannot rot.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import decode  # noqa: E402  (the sibling benchmark)
import train_step  # noqa: E402

from transformers_bard import BardVLConfig, BardVLForConditionalGeneration  # noqa: E402


def section(results: dict, name: str, deadline: float):
    """Decorator-like runner: records `fn()`'s dict under `name`, or the error, and the time it took."""

    def run(fn):
        start = time.perf_counter()
        if time.perf_counter() > deadline:
            results[name] = {"ok": False, "error": "skipped: the time budget was spent"}
            return
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as error:  # a failed section is a result too; the others still run
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc()[-4000:]}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else results[name]['error']} "
              f"({results[name]['seconds']} s)", flush=True)

    return run


# ---------------------------------------------------------------------- 1. flex == sdpa
def flex_equals_sdpa(device: str) -> dict:
    model = train_step.build("tiny", 2, 1, torch.float32, device=device)
    row = train_step.make_row(model.config, 96, 64, 64, device=device)
    inputs, labels, rates = train_step.packed_inputs(row, torch.float32)
    backward = device.startswith("cuda")

    def loss_and_grads(attn):
        model.set_attn_implementation(attn)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            logits = model(**inputs, use_cache=False).logits
            loss, _ = train_step.block_merge_loss(labels, inputs["logits_mask"], rates,
                                                  torch.zeros_like(inputs["logits_mask"]),
                                                  torch.tensor([64], device=device), 1, logits=logits)
        if backward:
            loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want_grads = loss_and_grads("sdpa")
    got_loss, got_grads = loss_and_grads("flex_attention")
    worst = max(((got_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
                for n, g in want_grads.items()) if want_grads else None
    return {"loss_sdpa": want_loss.item(), "loss_flex": got_loss.item(),
            "loss_abs_diff": (got_loss - want_loss).abs().item(), "gradients_compared": len(want_grads),
            "max_relative_gradient_diff": worst,
            "equal": bool(torch.allclose(got_loss, want_loss, rtol=1e-4, atol=1e-5)
                          and (worst is None or worst < 1e-3))}


# ---------------------------------------------------------------------- 4. whole generate calls
def generate_throughput(device: str, quick: bool) -> dict:
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    from transformers_bard.testing import published_qwen3_vl_config

    layers = 1 if quick else None
    config = published_qwen3_vl_config("2b", text_layers=layers, vision_depth=1)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    # random weights, initialised once (the plain constructor fills each twice: torch's default, then transformers')
    with no_init_weights():
        ar = Qwen3VLForConditionalGeneration(config)
    ar.init_weights()
    ar = ar.to(device=device, dtype=dtype).eval()
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    with no_init_weights():  # every weight is the AR model's (loaded next): random ones would be thrown away
        bard = BardVLForConditionalGeneration(BardVLConfig(**fields, mask_token_id=decode.QWEN_MASK))
    bard = bard.to(device=device, dtype=dtype).eval()
    bard.load_state_dict(ar.state_dict())
    bard.tie_weights()
    new_tokens, prompt_len = (32, 16) if quick else (256, 512)
    batches = (1,) if quick else (1, 8)
    block_sizes = (4, 32) if quick else tuple(decode.DEMO_TOKENS_PER_FORWARD)
    out = {"new_tokens": new_tokens, "prompt_tokens": prompt_len, "layers": config.text_config.num_hidden_layers,
           "rows": []}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for batch in batches:
        ids = torch.randint(0, 150_000, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(device)
        attention = torch.ones_like(ids)

        def timed(call):
            if not quick:  # toy sizes time nothing worth a warm-up
                call()
            sync()
            start = time.perf_counter()
            result = call()
            sync()
            return time.perf_counter() - start, result

        inputs = {"input_ids": ids, "attention_mask": attention, "max_new_tokens": new_tokens, "pad_token_id": 0}
        ar_s, _ = timed(functools.partial(ar.generate, **inputs, min_new_tokens=new_tokens, do_sample=False))
        row = {"batch": batch, "ar_tokens_per_s": batch * new_tokens / ar_s}
        for B in block_sizes:
            steps = max(1, round(B / decode.DEMO_TOKENS_PER_FORWARD[B]))
            bard_s, result = timed(functools.partial(
                bard.generate, **inputs, block_size=B, steps_per_block=steps, unmasking="static", eos_token_id=None,
                return_dict_in_generate=True))
            row[f"bard_b{B}_tokens_per_s"] = batch * new_tokens / bard_s
            row[f"bard_b{B}_tokens_per_forward"] = float(result.tokens_per_forward.mean())
            row[f"bard_b{B}_speedup"] = ar_s / bard_s
        out["rows"].append(row)
    return out


# ---------------------------------------------------------------------- 5. FSDP2 through the trainers
def fsdp2_trainers(device: str, quick: bool, workdir: Path) -> dict:
    from transformers_bard.conversion import convert_from_autoregressive
    from transformers_bard.testing import build_tiny_qwen3_vl, published_widths

    sys.path.insert(0, str(REPO / "examples" / "scripts"))
    from make_tiny_assets import tiny_chat_dataset

    overrides = None if quick else published_widths("2b")
    source = build_tiny_qwen3_vl(workdir / "source", num_shards=1 if quick else 4, image_size=64,
                                 config_overrides=overrides)
    model = workdir / "bard-b4"
    convert_from_autoregressive(source, model, block_size=4, overwrite=True)
    data = workdir / "data"
    data.mkdir()
    tiny_chat_dataset(64).to_parquet(str(data / "train.parquet"))
    gpu = not quick and device.startswith("cuda")
    accelerate_config = REPO / "examples" / "accelerate_configs" / ("fsdp2.yaml" if gpu else "fsdp2_cpu.yaml")
    processes = str(torch.cuda.device_count() if gpu else 2)
    common = ["--dataset_name", str(data), "--per_device_train_batch_size", "4", "--logging_steps", "1",
              "--skip_memory_metrics", "false", "--report_to", "none", "--save_strategy", "no",
              "--max_warmup_steps", "1", "--max_length", "512"]
    if gpu:
        common += ["--bf16", "true", "--use_cpu", "false", "--dtype", "bfloat16", "--activation_checkpointing", "true"]
    else:
        common += ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32"]
    # the tiny recipes' schedules: PBM at B = 4 then 8 (4 steps each), SWD of the B = 8 stage from the B = 4 anchor
    runs = {
        "block_merge": ["--config", str(REPO / "examples" / "configs" / "block_merge_tiny.yaml"),
                        "--model_name_or_path", str(model), "--output_dir", str(workdir / "pbm"), *common],
        "diffusion_distill": ["--config", str(REPO / "examples" / "configs" / "distill_tiny.yaml"),
                              "--model_name_or_path", str(workdir / "pbm" / "stage-b8"),
                              "--teacher_model_name_or_path", str(workdir / "pbm" / "stage-b4"),
                              "--output_dir", str(workdir / "swd"), *common],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = {"accelerate_config": accelerate_config.name, "processes": int(processes)}
    for script, arguments in runs.items():
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                   "--num_processes", processes, str(REPO / "examples" / "scripts" / f"{script}.py"), *arguments]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
        text = result.stdout + result.stderr
        if result.returncode:
            raise RuntimeError(f"{script} exited {result.returncode}: {text[-3000:]}")
        metrics = {}
        for key in ("train_runtime", "train_steps_per_second", "train_mem_gpu_peaked_delta", "train_mem_gpu_alloc_delta",
                    "train_mem_cpu_peaked_delta", "train_loss"):
            found = re.findall(rf"'{key}': '?([0-9.e+-]+)", text)
            if found:
                metrics[key] = float(found[-1])
        if "train_runtime" in metrics:  # 4 optimizer steps per stage; PBM runs two stages
            metrics["seconds_per_step"] = metrics["train_runtime"] / 4
        out[script] = {"wall_s": round(time.perf_counter() - start, 1), **metrics}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="toy sizes on any device (what the tests run)")
    parser.add_argument("--budget-s", type=float, default=450, help="sections not started by then are skipped")
    parser.add_argument("--skip", nargs="*", default=[], help="section names to skip")
    cli = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    deadline = time.perf_counter() + cli.budget_s
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "quick": cli.quick}
    print(f"[gpu_check] device {results['device']}, torch {torch.__version__}", flush=True)

    def wanted(name):
        if name in cli.skip:
            return False
        save()  # the sections done so far are on disk before the next starts: a run cut short keeps them
        return True

    def save():
        Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cli.out).write_text(json.dumps(results, indent=1, default=str))

    if wanted("flex_equals_sdpa"):
        section(results, "flex_equals_sdpa", deadline)(lambda: flex_equals_sdpa(device))
    if wanted("train_step"):
        def train():
            with tempfile.TemporaryDirectory() as tmp:
                args = ["--device", device, "--json", f"{tmp}/t.json", "--skip-backends"]
                if cli.quick:
                    args.append("--quick")
                else:
                    args += ["--size", "2b", "--lengths", "2048:512", "4096:1024", "--repeats", "3"]
                if device == "cuda":
                    args += ["--attn", "sdpa", "flex_attention"]
                train_step.main(args)
                return json.loads(Path(f"{tmp}/t.json").read_text())
        section(results, "train_step", deadline)(train)
    if wanted("decode_forward"):
        def forward():
            # a context of at least the largest B: the verify forward re-reads the last B cached tokens
            args = argparse.Namespace(size="2b", layers=1 if cli.quick else None, context=32 if cli.quick else 2048,
                                      dtype="bfloat16",
                                      device=device, repeats=1 if cli.quick else 5,
                                      batch_sizes=[1] if cli.quick else [1, 8],
                                      block_sizes=[4, 32] if cli.quick else [4, 8, 16, 32])
            return {"rows": decode.forward_costs(args)}
        section(results, "decode_forward", deadline)(forward)
    if wanted("generate"):
        section(results, "generate", deadline)(lambda: generate_throughput(device, cli.quick))
    if wanted("fsdp2"):
        def sharded():
            with tempfile.TemporaryDirectory() as tmp:
                return fsdp2_trainers(device, cli.quick, Path(tmp))
        section(results, "fsdp2", deadline)(sharded)

    save()
    print(f"[gpu_check] wrote {cli.out}")
    return results


if __name__ == "__main__":
    main()
