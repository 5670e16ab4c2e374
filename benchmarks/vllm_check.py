"""The vLLM check of issue 21 (item 3): BARD-VL served by vLLM against `model.generate`, one script, one JSON.

Run it on a GPU machine with vLLM >= 0.32 installed (the project's device tool; carry nothing but this repository;
on CPU, tests/test_vllm_engine.py is the check):

    PYTHONPATH=src python benchmarks/vllm_check.py --out docs/serving/vllm_check.json

It needs no network: the checkpoints are built offline (random weights, the tiny tokenizer), converted with
``prompt_attention="causal"`` (the only prompt mask vLLM can give, `integrations/vllm/canvas.py`). Sections, each
recorded as ``{"ok": ..., "seconds": ..., ...}`` (a failing one is recorded and the rest run):

Prompts: eight text prompts as token ids and one image prompt (a 64 x 64 image through vLLM's own processor and
vision tower), each sent ``--copies`` times.

1. ``probe``: versions of torch, transformers, vllm, triton and flash_attn; the GPU. Without vLLM >= 0.32 the script
   records that and stops (exit 0): the sections below need it.
2. ``reference``: per size, `model.generate(fuse_commit=False, prefill_step=False)` (the forwards vLLM's
   diffusion path runs) and the default fused `generate`, greedy, batch 1, in the size's dtype: the tokens and
   tokens/s.
3. ``vllm``: per size, the same token-id prompts through `vllm.LLM` (`enforce_eager=True`, the plugin registered in
   this process and the engine kept in it, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, since the package is on
   ``PYTHONPATH`` rather than installed): how many answers equal the reference token for token, the first
   difference, tokens/s with all prompts submitted at once.

Sizes: ``tiny`` (the test suite's 1M-parameter model with its LM head scaled x30 so that steps unmask several tokens,
float32: answers must match exactly) and ``2b`` (Qwen3-VL-2B's published width, 28 layers, bfloat16, the tiny
tokenizer: the throughput row; answers of random weights in bf16 are compared but may differ through rounding).

On a CPU machine (the test suite) only ``probe`` and ``reference`` at ``tiny`` run, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

PROMPTS = [
    "What color is the square?",
    "hello there, how are you doing today?",
    "x",
    "Describe a red square in three words, please.",
    "What is two plus two?",
    "Name a fruit.",
    "Count from one to five.",
    "Where is the circle?",
]
IMAGE_PROMPT = "What color is this image?"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="Write the JSON record here (also printed).")
    parser.add_argument("--sizes", nargs="+", choices=["tiny", "2b"], default=["tiny", "2b"])
    parser.add_argument("--block-size", type=int, default=4, help="B of the converted checkpoints.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Answer length limit per prompt.")
    parser.add_argument("--copies", type=int, default=4, help="Each prompt is sent this many times (throughput).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def section(record: dict, name: str, function, *args):
    start = time.perf_counter()
    try:
        record[name] = {"ok": True, **function(*args)}
    except Exception as error:  # recorded; the next sections still run
        record[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc()[-3000:]}
    record[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({name: {k: v for k, v in record[name].items() if k != "traceback"}}, default=str)[:4000],
          flush=True)
    return record[name]


def probe() -> dict:
    versions = {}
    for name in ("torch", "transformers", "vllm", "triton", "flash_attn"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as error:
            versions[name] = f"missing ({type(error).__name__})"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"versions": versions, "gpu": gpu, "python": platform.python_version()}


def vllm_usable(versions: dict) -> bool:
    version = versions.get("vllm", "missing")
    if version.startswith("missing"):
        return False
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (0, 32)


def build_checkpoint(size: str, block_size: int, folder: Path) -> Path:
    """A causal-prompt BARD-VL checkpoint of `size`, written offline."""
    from transformers_bard import BardVLForConditionalGeneration, convert_from_autoregressive
    from transformers_bard.testing import build_tiny_qwen3_vl, published_widths

    overrides = None if size == "tiny" else published_widths("2b")
    source = build_tiny_qwen3_vl(folder / f"{size}-qwen3-vl", num_shards=1, config_overrides=overrides)
    target = convert_from_autoregressive(source, folder / f"{size}-bard", block_size=block_size,
                                         prompt_attention="causal")
    if size == "tiny":  # confident: steps unmask several tokens, blocks end at different steps
        model = BardVLForConditionalGeneration.from_pretrained(target)
        with torch.no_grad():
            model.lm_head.weight.mul_(30.0)
        model.generation_config.threshold = 0.6
        model.save_pretrained(target)
    return target


def requests(folder: Path) -> list[tuple[dict, dict]]:
    """Each prompt as (`generate` inputs, `vllm.LLM.generate` prompt): token ids for the text prompts; the chat text
    and the image for the image prompt (the last), so vLLM runs its own Qwen3-VL processor and vision tower."""
    from transformers import AutoProcessor

    from transformers_bard.testing import make_image

    processor = AutoProcessor.from_pretrained(folder)
    pairs = []
    for text in PROMPTS:
        message = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        inputs = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        pairs.append((dict(inputs), {"prompt_token_ids": inputs["input_ids"][0].tolist()}))
    image = make_image(3, (64, 64))
    message = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": IMAGE_PROMPT}]}]
    inputs = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    chat = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    pairs.append((dict(inputs), {"prompt": chat, "multi_modal_data": {"image": image}}))
    return pairs


def dtype_of(size: str):
    return torch.float32 if size == "tiny" else torch.bfloat16


def reference(size: str, folder: Path, args) -> dict:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=dtype_of(size)).to(args.device).eval()
    pairs = requests(folder)
    rows = {}
    for name, options in (("unfused", {"fuse_commit": False, "prefill_step": False}), ("default", {})):
        answers, tokens, forwards = [], 0, 0
        _sync(args.device)
        start = time.perf_counter()
        for inputs, _ in pairs * args.copies:
            inputs = {key: value.to(args.device) for key, value in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype_of(size))
            out = model.generate(**inputs, max_new_tokens=args.max_tokens, return_dict_in_generate=True, **options)
            n, length = int(out.num_generated_tokens[0]), inputs["input_ids"].shape[1]
            answers.append(out.sequences[0, length: length + n].tolist())
            tokens, forwards = tokens + n, forwards + int(out.num_forwards[0])
        _sync(args.device)
        seconds = time.perf_counter() - start
        rows[name] = {"answers": answers[: len(pairs)], "tokens": tokens, "seconds": round(seconds, 3),
                      "tokens_per_s": round(tokens / seconds, 1), "tokens_per_forward": round(tokens / forwards, 2)}
    return rows


def run_vllm(size: str, folder: Path, args, expected: list[list[int]]) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the plugin is registered in this process
    from vllm import LLM, SamplingParams

    from transformers_bard.integrations.vllm import register

    register()
    llm = LLM(model=str(folder), dtype=dtype_of(size), enforce_eager=True, max_model_len=1024,
              gpu_memory_utilization=0.5, trust_remote_code=True, max_num_seqs=32)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, detokenize=False)
    prompts = [prompt for _, prompt in requests(folder)]
    llm.generate(prompts[:1], params)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts * args.copies, params)
    seconds = time.perf_counter() - start
    answers = [list(out.outputs[0].token_ids) for out in outputs]
    tokens = sum(len(answer) for answer in answers)
    same = [answer == expected[i % len(expected)] for i, answer in enumerate(answers)]
    first_difference = next(({"prompt": i % len(expected), "vllm": answers[i], "generate": expected[i % len(expected)]}
                             for i, ok in enumerate(same) if not ok), None)
    image_rows = [ok for i, ok in enumerate(same) if i % len(expected) == len(expected) - 1]
    return {"equal": sum(same), "answers": len(same), "image_answers_equal": sum(image_rows),
            "first_difference": first_difference, "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main():
    args = parse_args()
    record = {"args": vars(args)}
    found = section(record, "probe", probe)
    usable = found["ok"] and vllm_usable(found["versions"])
    sizes = args.sizes if usable else ["tiny"]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            built = section(record, f"build_{size}", lambda s=size: {"path": str(build_checkpoint(
                s, args.block_size, Path(tmp)))})
            if not built["ok"]:
                continue
            folder = Path(built["path"])
            ref = section(record, f"reference_{size}", reference, size, folder, args)
            if usable and ref["ok"]:
                section(record, f"vllm_{size}", run_vllm, size, folder, args, ref["unfused"]["answers"])
    if not usable:
        record["vllm_skipped"] = (f"vLLM >= 0.32 is not installed here ({found.get('versions', {}).get('vllm')}): "
                                  "only the reference ran.")
        print(record["vllm_skipped"])
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
