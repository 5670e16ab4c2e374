"""The SWD variants of docs/demo_results/choice_probe/README.md ("What SWD does on this task"): distil a choice demo
run's PBM B = 32 student from its B = 4 anchor with the pipeline's own `run_distill`, one setting changed, and decode
the run's 400 test rows with the library's default decoding.

    python docs/demo_results/choice_probe/swd_variants.py RUN {default,ce_only,wide} [SEED]

`default`: the demo's SWD; `ce_only`: the same with `kd_weight` 0 (the SWD phase with its CE term alone); `wide`: mask
rates [0.001, 1.0] (what the reference code effectively trains with).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from choice_probe import load  # noqa: E402

from transformers_bard import BardVLProcessor  # noqa: E402
from transformers_bard.demo import pipeline  # noqa: E402
from transformers_bard.demo.digits import TASKS, build_digits_dataset, evaluate, load_digits_ar_path  # noqa: E402
from transformers_bard.trainer import diffusion_distill_config  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    run, variant = Path(sys.argv[1]), sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    cfg = pipeline.PipelineConfig(task="choice", seed=seed, threads=1)
    if variant == "wide":
        cfg = replace(cfg, swd_mask_rates=(0.001, 1.0))
    elif variant == "ce_only":
        original = diffusion_distill_config.DiffusionDistillConfig.__init__

        def ce_only(self, *args, **kwargs):
            original(self, *args, **{**kwargs, "kd_weight": 0.0})

        diffusion_distill_config.DiffusionDistillConfig.__init__ = ce_only
    elif variant != "default":
        raise SystemExit(f"variant must be default, ce_only or wide, got {variant!r}")
    train = build_digits_dataset("train", cfg.train_samples, seed=seed, question_weights=cfg.question_weights)
    types = TASKS["choice"]
    test = build_digits_dataset("test", 400, seed=seed, question_weights=types, balanced=True)
    test = test.select(sorted(range(len(test)), key=lambda i: (types.index(test[i]["question_type"]), i)))
    processor = BardVLProcessor.from_pretrained(load_digits_ar_path("choice"))
    out = pipeline.run_distill(cfg, run / "pbm" / "stage-b32", run / "pbm" / "stage-b4",
                               run / f"swd-variant-{variant}", train)
    result = evaluate(load(out), processor, test, max_new_tokens=96, batch_size=50, generate_kwargs={"threshold": 0.9})
    print(json.dumps({"variant": variant, "seed": seed, "accuracy": result["accuracy"], "per_type": result["per_type"],
                      "tokens_per_forward": result["tokens_per_forward"]}))


if __name__ == "__main__":
    main()
