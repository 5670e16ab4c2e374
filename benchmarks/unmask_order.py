"""Which positions fill a denoising step's minimum: `unmask_order="left_to_right"` against `"confidence"`, on the
models of a demo run, decoded on the run's own test rows (the same rows for both orders).

    python benchmarks/unmask_order.py --run demo_output --task choice --out docs/demo_results/choice_probe

For every model of the run (PBM at each B, PBM + SWD at each B > 4, and whatever else `choice_probe.find_models`
finds) and every threshold, exact match with its Wilson 95% interval under both orders, the paired difference
(left_to_right - confidence) with Newcombe's 95% interval over the same rows, and tokens per forward. The test rows
are rebuilt exactly as the pipeline builds them (`build_digits_dataset("test", ..., balanced=True)` sorted by type),
so the `confidence` column repeats the run's own results.md. Writes `unmask_order.json` and `unmask_order.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from choice_probe import find_models, load  # noqa: E402

ORDERS = ("confidence", "left_to_right")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="output folder of `transformers-bard demo`")
    parser.add_argument("--task", default=None, help="digits or choice (default: the run's)")
    parser.add_argument("--samples", type=int, default=None, help="test rows (default: the run's eval_samples)")
    parser.add_argument("--thresholds", default="0.9,0.7,0.5")
    parser.add_argument("--models", default=None, help="comma-separated model names (default all)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers_bard import BardVLProcessor
    from transformers_bard.demo.claims import paired_difference_interval, wilson_interval
    from transformers_bard.demo.digits import TASKS, build_digits_dataset, evaluate, load_digits_ar_path

    run = Path(args.run)
    config = json.loads((run / "results.json").read_text())["config"]
    task = args.task or config["task"]
    samples = args.samples or config["eval_samples"]
    edit = {"edit_threshold": config["edit_threshold"]} if config.get("noise_prior") == "mix" else {}
    types = TASKS[task]
    test = build_digits_dataset("test", samples, seed=config["seed"], question_weights=types, balanced=True)
    test = test.select(sorted(range(len(test)), key=lambda i: (types.index(test[i]["question_type"]), i)))
    processor = BardVLProcessor.from_pretrained(config.get("source") or load_digits_ar_path(task))
    models = find_models(run)
    if args.models:
        models = {k: v for k, v in models.items() if k in args.models.split(",")}
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = []
    for name, path in models.items():
        model = load(path)
        for tau in thresholds:
            results = {}
            for order in ORDERS:
                began = time.perf_counter()
                results[order] = evaluate(model, processor, test, max_new_tokens=config["max_new_tokens"],
                                          batch_size=50, generate_kwargs={"threshold": tau, "unmask_order": order,
                                                                          **edit})
                print(f"{name} tau={tau} {order}: {results[order]['accuracy']:.3f}, "
                      f"{results[order]['tokens_per_forward']:.2f} tokens/forward "
                      f"({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
            paired = paired_difference_interval(results["left_to_right"]["correct"], results["confidence"]["correct"])
            rows.append({
                "model": name, "threshold": tau, "num_samples": len(test),
                **{order: {"accuracy": r["accuracy"], "ci95": list(wilson_interval(sum(r["correct"]), len(r["correct"]))),
                           "per_type": r["per_type"], "tokens_per_forward": r["tokens_per_forward"]}
                   for order, r in results.items()},
                "difference": paired["difference"], "difference_ci95": paired["ci95"],
            })
    text = render(task, rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "unmask_order.json").write_text(json.dumps({"run": str(run), "task": task, "rows": rows}, indent=1))
        (out / "unmask_order.md").write_text(text)
    return 0


def render(task: str, rows: list[dict]) -> str:
    def cell(entry):
        low, high = entry["ci95"]
        return f"{entry['accuracy']:.3f} [{low:.3f}, {high:.3f}]"

    lines = [f"{task} task, {rows[0]['num_samples'] if rows else 0} test rows: exact match [95% CI] and tokens per "
             "forward under both orders; the difference is paired over the same rows (Newcombe 95% CI).", "",
             "| model | tau | confidence | tok/fwd | left_to_right | tok/fwd | difference [95% CI] | per type (left_to_right) |",
             "|---|---:|---|---:|---|---:|---|---|"]
    for row in rows:
        c, left = row["confidence"], row["left_to_right"]
        low, high = row["difference_ci95"]
        per_type = ", ".join(f"{k} {v:.2f}" for k, v in left["per_type"].items())
        lines.append(f"| {row['model']} | {row['threshold']} | {cell(c)} | {c['tokens_per_forward']:.2f} | "
                     f"{cell(left)} | {left['tokens_per_forward']:.2f} | {row['difference']:+.3f} "
                     f"[{low:+.3f}, {high:+.3f}] | {per_type} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
