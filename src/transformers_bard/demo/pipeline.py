"""The end-to-end BARD pipeline on the built-in digits task, with its evaluation and ablations.

AR source (shipped) -> conversion (B = 4) -> progressive block merging (B = 4, 8, 16, 32) -> stage-wise distillation
from the B = 4 anchor (B = 8, 16, 32) -> evaluation of every model on the test split: exact-match accuracy, tokens per
forward, wall-clock tokens/s and the speedup against autoregressive `generate` of the source (batch 1, prefill
included), at several confidence thresholds. Ablations (DESIGN 1, paper section 4): direct conversion to B = 32,
SWD with the AR model as teacher, mixed noise instead of mask-only noise. PBM without SWD is in the main table.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ABLATIONS = ("direct", "ar_teacher", "mix")


@dataclass
class PipelineConfig:
    """Every knob of the demo pipeline, with the defaults of the full run (`quick()` gives the short one)."""

    output_dir: str = "demo_output"
    source: str | None = None  # the AR source checkpoint; None = the shipped digits model
    seed: int = 0
    train_samples: int = 4000
    eval_samples: int = 48
    block_sizes: tuple[int, ...] = (4, 8, 16, 32)
    pbm_steps: int = 200  # optimizer steps per PBM stage
    swd_steps: int = 120  # optimizer steps per SWD student
    batch_size: int = 16
    learning_rate: float = 5e-4  # a few-million-parameter model adapts with larger steps than the paper's 2e-5
    swd_learning_rate: float = 1e-4
    vision_learning_rate: float = 5e-5
    thresholds: tuple[float, ...] = (1.0, 0.9, 0.7, 0.5)
    max_new_tokens: int = 64
    ablations: tuple[str, ...] = ()
    threads: int = 2  # torch threads for training
    eval_threads: int = 1  # for decoding: a tiny model decodes fastest on one thread (same for AR and BARD)

    @classmethod
    def quick(cls, **overrides) -> PipelineConfig:
        values = dict(train_samples=600, eval_samples=12, pbm_steps=20, swd_steps=15, thresholds=(1.0, 0.7))
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        for name in ("train_samples", "eval_samples", "pbm_steps", "swd_steps", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        sizes = list(self.block_sizes)
        if not sizes or sizes[0] < 1 or any(b % a or b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"`block_sizes` must increase, each a multiple of the previous, got {sizes!r}.")
        for t in self.thresholds:
            if not 0 < t <= 1:
                raise ValueError(f"`thresholds` must lie in (0, 1], got {t!r}.")
        unknown = set(self.ablations) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"Unknown `ablations` {sorted(unknown)}; choose from {ABLATIONS}.")


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_bard(model, processor, dataset, threshold: float, max_new_tokens: int = 64) -> dict:
    """Exact match, tokens per forward and tokens/s of BARD `generate` (batch 1, prefill included) on `dataset`."""
    from .digits import prompt_messages, score_answer

    tokenizer = processor.tokenizer
    correct, types, tpf, predictions = [], [], [], []
    generated, forwards, seconds = 0, 0, 0.0
    for row in dataset:
        conversation = prompt_messages(row["messages"])
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = processor(images=row["images"], text=[text], return_tensors="pt")
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, threshold=threshold, return_dict_in_generate=True
            )
        seconds += time.perf_counter() - began
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        prediction = tokenizer.decode(new, skip_special_tokens=True)
        reference = row["messages"][-1]["content"][-1]["text"]
        predictions.append(prediction)
        correct.append(score_answer(prediction, reference))
        types.append(row["question_type"])
        generated += int(out.num_generated_tokens[0])
        forwards += int(out.num_forwards[0])
        tpf.append(float(out.tokens_per_forward[0]))
    per_type = {
        kind: sum(c for c, k in zip(correct, types) if k == kind) / types.count(kind) for kind in sorted(set(types))
    }
    return {
        "accuracy": sum(correct) / len(correct),
        "per_type": per_type,
        "tokens_per_forward": generated / max(forwards, 1),
        "mean_row_tokens_per_forward": statistics.fmean(tpf),
        "tokens_per_second": generated / seconds,
        "generated_tokens": generated,
        "seconds": seconds,
        "predictions": predictions,
    }


# ---------------------------------------------------------------------------------------------- training steps
def _common_args(cfg: PipelineConfig, output_dir: Path) -> dict:
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        vision_learning_rate=cfg.vision_learning_rate,
        max_length=512,
        use_cpu=True,
        bf16=False,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # a few-million-parameter model has no activation memory to save
        disable_tqdm=False,
    )


def run_block_merge(cfg: PipelineConfig, model_dir: Path, output_dir: Path, train, block_sizes, steps, prior="mask"):
    """PBM (DESIGN 3.5): one BlockMergeTrainer run over `block_sizes`; returns {B: stage folder}."""
    from ..trainer.block_merge_config import BlockMergeConfig
    from ..trainer.block_merge_trainer import BlockMergeTrainer

    args = BlockMergeConfig(
        block_sizes=list(block_sizes), stage_steps=[steps], learning_rate=cfg.learning_rate,
        max_warmup_steps=max(1, steps // 10), noise_prior=prior, **_common_args(cfg, output_dir),
    )
    trainer = BlockMergeTrainer(str(model_dir), args=args, train_dataset=train)
    trainer.train()
    return {b: output_dir / f"stage-b{b}" for b in block_sizes}


def run_distill(cfg: PipelineConfig, student: Path, teacher: Path, output_dir: Path, train, teacher_type="diffusion"):
    """SWD (DESIGN 3.6): the student at its own B learns from the frozen teacher; returns the final folder."""
    from transformers import AutoConfig

    from ..trainer.diffusion_distill_config import DiffusionDistillConfig
    from ..trainer.diffusion_distill_trainer import DiffusionDistillTrainer

    block_size = AutoConfig.from_pretrained(student).block_size
    args = DiffusionDistillConfig(
        max_steps=cfg.swd_steps, learning_rate=cfg.swd_learning_rate, max_warmup_steps=max(1, cfg.swd_steps // 10),
        teacher_type=teacher_type, **_common_args(cfg, output_dir),
    )
    trainer = DiffusionDistillTrainer(str(student), teacher_model=str(teacher), args=args, train_dataset=train)
    trainer.train()
    return output_dir / f"stage-b{block_size}"


# ---------------------------------------------------------------------------------------------- the pipeline
def run_pipeline(cfg: PipelineConfig, report=print) -> dict:
    """Run conversion, PBM, SWD, ablations and the evaluation; write results.json, results.md and results.png."""
    from transformers import Qwen3VLForConditionalGeneration

    from ..conversion import convert_from_autoregressive
    from .digits import build_digits_dataset, evaluate_ar, load_digits_ar_path
    from ..models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration
    from ..models.bard_vl.processing_bard_vl import BardVLProcessor

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    def step(name):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        report(f"[{time.perf_counter() - started:7.1f}s] {name} done")

    train = build_digits_dataset("train", cfg.train_samples, seed=cfg.seed)
    test = build_digits_dataset("test", cfg.eval_samples, seed=cfg.seed)
    ar_dir = Path(cfg.source) if cfg.source else load_digits_ar_path()
    processor = BardVLProcessor.from_pretrained(ar_dir)

    converted = out / "bard-b4"
    if converted.exists():
        shutil.rmtree(converted)
    convert_from_autoregressive(ar_dir, converted, block_size=cfg.block_sizes[0])
    step("conversion")

    models: dict[str, Path] = {}
    pbm = run_block_merge(cfg, converted, out / "pbm", train, cfg.block_sizes, cfg.pbm_steps)
    models.update({f"PBM B={b}": path for b, path in pbm.items()})
    step("progressive block merging")

    anchor = pbm[cfg.block_sizes[0]]
    for b in cfg.block_sizes[1:]:
        models[f"PBM+SWD B={b}"] = run_distill(cfg, pbm[b], anchor, out / f"swd-b{b}", train)
    step("stage-wise distillation")

    largest = cfg.block_sizes[-1]
    if "direct" in cfg.ablations:
        total = cfg.pbm_steps * len(cfg.block_sizes)  # the same number of optimizer steps as the whole PBM schedule
        direct = run_block_merge(cfg, converted, out / "direct", train, [largest], total)
        models[f"direct B={largest}"] = direct[largest]
        step("ablation: direct conversion")
    if "ar_teacher" in cfg.ablations:
        models[f"PBM+SWD(AR teacher) B={largest}"] = run_distill(
            cfg, pbm[largest], ar_dir, out / f"swd-ar-b{largest}", train, teacher_type="autoregressive"
        )
        step("ablation: AR teacher")
    if "mix" in cfg.ablations:
        mixed = run_block_merge(cfg, converted, out / "pbm-mix", train, cfg.block_sizes, cfg.pbm_steps, prior="mix")
        models[f"PBM(mix) B={largest}"] = mixed[largest]
        step("ablation: mixed noise")

    # evaluation: AR baseline, then every model at every threshold
    torch.set_num_threads(cfg.eval_threads)
    ar_model = Qwen3VLForConditionalGeneration.from_pretrained(ar_dir).eval()
    ar = evaluate_ar(ar_dir, test, max_new_tokens=cfg.max_new_tokens, model=ar_model, processor=processor)
    rows = [
        dict(model="AR (source, greedy)", block_size=1, threshold=None, accuracy=ar["accuracy"],
             per_type=ar["per_type"], tokens_per_forward=1.0, tokens_per_second=ar["tokens_per_second"], speedup=1.0)
    ]
    for name, path in models.items():
        model = BardVLForConditionalGeneration.from_pretrained(path).eval()
        for threshold in cfg.thresholds:
            result = evaluate_bard(model, processor, test, threshold, cfg.max_new_tokens)
            rows.append(
                dict(model=name, block_size=model.config.block_size, threshold=threshold,
                     accuracy=result["accuracy"], per_type=result["per_type"],
                     tokens_per_forward=result["tokens_per_forward"], tokens_per_second=result["tokens_per_second"],
                     speedup=result["tokens_per_second"] / ar["tokens_per_second"])
            )
            report(
                f"  {name:<28} tau={threshold:<4} acc={result['accuracy']:.3f} "
                f"tok/fwd={result['tokens_per_forward']:.2f} tok/s={result['tokens_per_second']:.0f}"
            )
    step("evaluation")

    results = {
        "config": asdict(cfg),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {cfg.threads} threads",
        "timings_s": timings,
        "total_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results))
    plot_results(results, out / "results.png")
    report(results_markdown(results))
    report(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'results.png'}")
    return results


def results_markdown(results: dict) -> str:
    lines = [
        "| model | B | tau | exact match | read | count | row_sum | position | tokens/forward | tokens/s | vs AR |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        per = r["per_type"]
        cells = [per.get(k) for k in ("read", "count", "row_sum", "position")]
        lines.append(
            f"| {r['model']} | {r['block_size']} | {'-' if r['threshold'] is None else r['threshold']} | "
            f"{r['accuracy']:.3f} | "
            + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
            + f" | {r['tokens_per_forward']:.2f} | {r['tokens_per_second']:.0f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Accuracy against throughput, one curve per model over the thresholds (like the paper's OCRBench figure)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is in the `demo` extra
        logger.warning("matplotlib is not installed; skipping %s (pip install 'transformers-bard[demo]')", path)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["model"] for r in results["rows"]))
    for name in names:
        pts = [r for r in results["rows"] if r["model"] == name]
        xs = [r["tokens_per_second"] for r in pts]
        ys = [100 * r["accuracy"] for r in pts]
        marker = "*" if name.startswith("AR") else "o"
        ax.plot(xs, ys, marker=marker, markersize=12 if marker == "*" else 5, label=name)
    ax.set_xlabel("tokens / s (batch 1, prefill included)")
    ax.set_ylabel("exact match on the test split (%)")
    ax.set_title("Digits task: accuracy against decoding throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["ABLATIONS", "PipelineConfig", "evaluate_bard", "run_pipeline", "results_markdown", "plot_results"]
