"""Verified decoding (DESIGN 4.2 a) of a demo run's final models on its test rows, at several draft thresholds.

For each `--draft-thresholds` value and each largest-B model of a `transformers-bard demo` output folder (PBM and
PBM+SWD), `generate(verifier=AR source)` decodes the run's test rows (the same rows as the demo: `--task`, `--seed`,
`--eval-samples`) and the table reports exact match, the share of answers equal to the AR source's (1.000 by
construction), tokens per forward (both models' forwards after their prefills) and forwards per answer. Tokens per
forward is what the draft rule changes; the answers never change. Time it with `benchmarks/decode.py --verify
--draft draft_threshold=...` (batch 1, interleaved with AR).

    python benchmarks/verified_rows.py demo_output --task digits --draft-thresholds 0.9 0.5 0.1
"""

import argparse
from pathlib import Path

import torch
import transformers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="A `transformers-bard demo` output folder (pbm/, swd-b*/).")
    parser.add_argument("--task", choices=("digits", "choice"), default="digits")
    parser.add_argument("--seed", type=int, default=0, help="The run's --seed (its test rows).")
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--draft-thresholds", type=float, nargs="+", default=[0.9, 0.5, 0.1])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    from transformers import Qwen3VLForConditionalGeneration

    from transformers_bard import BardVLForConditionalGeneration, BardVLProcessor
    from transformers_bard.demo.digits import TASKS, build_digits_dataset, evaluate

    out = Path(args.output_dir)
    largest = max(int(p.name.split("-b")[1]) for p in (out / "pbm").glob("stage-b*"))
    models = {f"PBM B={largest}": out / "pbm" / f"stage-b{largest}",
              f"PBM+SWD B={largest}": out / f"swd-b{largest}" / f"stage-b{largest}"}
    models = {name: path for name, path in models.items() if (path / "config.json").is_file()}
    if not models:
        raise SystemExit(f"No final models under {out}: expected pbm/stage-b{largest} and "
                         f"swd-b{largest}/stage-b{largest}.")
    processor = BardVLProcessor.from_pretrained(next(iter(models.values())))
    source = BardVLForConditionalGeneration.from_pretrained(next(iter(models.values()))).config.source_model
    ar = Qwen3VLForConditionalGeneration.from_pretrained(source).eval()
    types = TASKS[args.task]
    test = build_digits_dataset("test", args.eval_samples, seed=args.seed, question_weights=types, balanced=True)
    decode = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    reference = evaluate(ar, processor, test, **decode)
    print(f"{args.task} test rows: {len(test)} (seed {args.seed}); AR source {source}: exact match "
          f"{reference['accuracy']:.3f}\n")
    print("| model | draft_threshold | exact match | same answers as AR | tokens/forward | forwards per answer |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, path in models.items():
        model = BardVLForConditionalGeneration.from_pretrained(path).eval()
        for tau in args.draft_thresholds:
            result = evaluate(model, processor, test, generate_kwargs={"verifier": ar, "draft_threshold": tau},
                              **decode)
            same = sum(a == b for a, b in zip(result["predictions"], reference["predictions"])) / len(test)
            print(f"| {name} | {tau} | {result['accuracy']:.3f} | {same:.3f} | {result['tokens_per_forward']:.2f} | "
                  f"{sum(result['row_forwards']) / len(test):.2f} |")


if __name__ == "__main__":
    main()
