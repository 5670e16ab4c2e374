"""Short answers at tau 1.0 (issue 20, item 6): `eos_tail_fill` against plain EOS fill on the demo's final models,
on either demo task (`--task digits|choice`, the task the run was trained on).

For each model (default: the final PBM+SWD B = 32 checkpoint of a demo run and its PBM B = 32 stage), decode the
demo's 400 balanced test rows at tau 1.0 (one token per step, the paper's accuracy setting) with and without
`eos_tail_fill`, on the very same rows, and report per question type the forwards per answer after the prompt's
forward and the exact match, with the paired difference of exact match and its 95% interval (the demo's
`paired_difference_interval`).

    transformers-bard demo --output-dir /tmp/demo          # the default run (12 min on 2 idle cores)
    python docs/scale/eos_tail.py /tmp/demo --json docs/scale/eos_tail.json
    transformers-bard demo --task choice --output-dir /tmp/choice
    python docs/scale/eos_tail.py /tmp/choice --task choice --json docs/scale/eos_tail_choice.json
"""

import argparse
import json
from pathlib import Path

import torch

import transformers_bard  # noqa: F401  (registers the BARD-VL Auto classes)
from transformers_bard import BardVLForConditionalGeneration
from transformers_bard.demo.claims import paired_difference_interval, verdict
from transformers_bard.demo.digits import TASKS, build_digits_dataset, evaluate
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_dir", help="output folder of a `transformers-bard demo` run")
    parser.add_argument("--models", nargs="+", default=["swd-b32/stage-b32", "pbm/stage-b32"])
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (its test rows)")
    parser.add_argument("--task", choices=sorted(TASKS), default="digits", help="the demo run's task (its test rows)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    types = TASKS[args.task]
    # the demo's test rows: balanced over the task's question types, as the pipeline draws them
    test = build_digits_dataset("test", args.eval_samples, seed=args.seed, balanced=True, question_weights=types)
    record = {}
    for name in args.models:
        folder = Path(args.demo_dir) / name
        model = BardVLForConditionalGeneration.from_pretrained(folder).eval()
        processor = BardVLProcessor.from_pretrained(folder)
        print(f"\n### {name} (B = {model.config.block_size}), tau 1.0, {len(test)} test rows\n")
        print("| question type | rows | forwards / answer, EOS fill | with eos_tail_fill | exact match, EOS fill "
              "| with eos_tail_fill | difference [95% interval] | within 2 points |")
        print("|---|---:|---:|---:|---:|---:|---|---|")
        record[name] = {}
        totals = {False: {"correct": [], "forwards": 0}, True: {"correct": [], "forwards": 0}}
        for question_type in [*types, "all"]:
            if question_type == "all":  # every row, from the per-type runs
                runs = {tail: {"correct": t["correct"], "num_forwards": t["forwards"],
                               "accuracy": sum(t["correct"]) / len(t["correct"])} for tail, t in totals.items()}
                rows = test
            else:
                rows = test.filter(lambda r, t=question_type: r["question_type"] == t)
                runs = {tail: evaluate(model, processor, rows, batch_size=16,
                                       generate_kwargs={"threshold": 1.0, "eos_tail_fill": tail})
                        for tail in (False, True)}
                for tail in runs:
                    totals[tail]["correct"] += runs[tail]["correct"]
                    totals[tail]["forwards"] += runs[tail]["num_forwards"]
            diff = paired_difference_interval(runs[True]["correct"], runs[False]["correct"])
            judged = verdict(diff["ci95"], margin=0.02)
            forwards = {tail: runs[tail]["num_forwards"] / len(rows) for tail in runs}
            print(f"| {question_type} | {len(rows)} | {forwards[False]:.2f} | {forwards[True]:.2f} "
                  f"| {runs[False]['accuracy']:.3f} | {runs[True]['accuracy']:.3f} "
                  f"| {diff['difference']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}] | {judged} |")
            record[name][question_type] = {
                "rows": len(rows), "forwards_per_answer": {str(k): v for k, v in forwards.items()},
                "accuracy": {str(k): runs[k]["accuracy"] for k in runs}, "difference": diff, "verdict": judged}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
