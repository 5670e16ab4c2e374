"""`transformers-bard walkthrough`: a seconds-long tour of conversion, loading and block-diffusion `generate`.

Converts the shipped digits AR source (a stock Qwen3-VL in the Hub layout) to BARD-VL, loads it back through the Auto
classes (with the package and with `trust_remote_code`), checks that both give the same logits, and decodes one test
grid with block-diffusion `generate`. The converted model has not been trained for block diffusion yet (that is what
`transformers-bard demo` does), so its answer shows where conversion starts from. Every step reports what it did.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def run_walkthrough(output_dir: Path, block_size: int = 4, report=print) -> dict:
    """Run the walkthrough into `output_dir` and return a summary dict (also written as `summary.json`)."""
    from transformers import AutoModel, AutoProcessor

    from ..conversion import convert_from_autoregressive
    from .digits import build_digits_dataset, load_digits_ar_path, prompt_messages

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    source, converted = load_digits_ar_path(), output_dir / f"digits-bard-vl-b{block_size}"

    start = time.perf_counter()
    n_shards = len(list(source.glob("*.safetensors")))
    report(f"1. the shipped autoregressive Qwen3-VL source (Hub layout, {n_shards} shard(s)) is at {source}")

    convert_from_autoregressive(source, converted, block_size=block_size, overwrite=True)  # replaces an earlier run's
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

    row = build_digits_dataset("test", 1, question_weights=("read",))[0]
    text = processor.apply_chat_template(prompt_messages(row["messages"]), add_generation_prompt=True)
    inputs = processor(images=row["images"], text=[text], return_tensors="pt")
    with torch.no_grad():
        a = model(**inputs).logits
        b = remote(**inputs).logits
    same = bool(torch.equal(a, b))
    report(f"4. package and trust_remote_code models give identical logits: {same}")

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4 * block_size, return_dict_in_generate=True)
    prompt_len = inputs["input_ids"].shape[1]
    answer = processor.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)[0]
    reference = row["messages"][-1]["content"][-1]["text"]
    tpf = float(out.tokens_per_forward[0])
    report(
        f"5. block-diffusion generate before any block-diffusion training: {answer!r} (reference {reference!r}); "
        f"tokens per forward {tpf:.2f}. `transformers-bard demo` trains it."
    )
    summary = {
        "source": str(source),
        "converted": str(converted),
        "block_size": block_size,
        "parameters": n_params,
        "remote_code_logits_identical": same,
        "generated_text": answer,
        "reference": reference,
        "tokens_per_forward": tpf,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report(f"done in {summary['seconds']} s; summary written to {output_dir / 'summary.json'}")
    return summary
