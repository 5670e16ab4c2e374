"""`transformers-bard demo`: the offline walk-through on the built-in tiny model.

Builds a tiny Qwen3-VL checkpoint in the Hub layout, converts it to BARD-VL, loads it back through the Auto classes
(with the package and with `trust_remote_code`), checks that both give the same logits, and decodes an image prompt
with block-diffusion `generate`. Every step reports what it did.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def run_demo(output_dir: Path, block_size: int = 4, report=print) -> dict:
    """Run the demo into `output_dir` and return a summary dict (also written as `summary.json`)."""
    from transformers import AutoModel, AutoProcessor

    from .conversion import convert_from_autoregressive
    from .testing import build_tiny_qwen3_vl, make_image, tiny_chat_messages

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    source, converted = output_dir / "tiny-qwen3-vl", output_dir / f"tiny-bard-vl-b{block_size}"
    for path in (source, converted):
        if path.exists():
            shutil.rmtree(path)

    start = time.perf_counter()
    build_tiny_qwen3_vl(source)
    n_shards = len(list(source.glob("*.safetensors")))
    report(f"1. built a tiny autoregressive Qwen3-VL checkpoint (Hub layout, {n_shards} shards) at {source}")

    convert_from_autoregressive(source, converted, block_size=block_size)
    config = json.loads((converted / "config.json").read_text())
    report(
        f"2. converted it to BARD-VL at {converted}: model_type={config['model_type']}, "
        f"block_size={config['block_size']}, mask_token_id={config['mask_token_id']}"
    )

    model = AutoModel.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    remote = AutoModel.from_pretrained(converted, trust_remote_code=True).eval()
    n_params = sum(p.numel() for p in model.parameters())
    report(
        f"3. loaded it back: AutoModel -> {type(model).__name__} ({n_params:,} parameters), "
        f"AutoProcessor -> {type(processor).__name__}, trust_remote_code -> {type(remote).__name__}"
    )

    messages = tiny_chat_messages([make_image(0, (64, 64))], turns=(("Describe the image.", None),))
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        a = model(**inputs).logits
        b = remote(**inputs).logits
    same = bool(torch.equal(a, b))
    report(f"4. package and trust_remote_code models give identical logits: {same}")

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4 * block_size, return_dict_in_generate=True)
    prompt_len = inputs["input_ids"].shape[1]
    text = processor.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=False)[0]
    tpf = float(out.tokens_per_forward[0])
    report(
        f"5. block-diffusion generate (untrained random weights, so the text is noise): {text!r}; "
        f"tokens per forward {tpf:.2f}"
    )
    summary = {
        "source": str(source),
        "converted": str(converted),
        "block_size": block_size,
        "parameters": n_params,
        "remote_code_logits_identical": same,
        "generated_text": text,
        "tokens_per_forward": tpf,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report(f"done in {summary['seconds']} s; summary written to {output_dir / 'summary.json'}")
    return summary
