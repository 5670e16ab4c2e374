"""SWD settings at B = 32, measured on the checkpoints of a default demo run (`transformers-bard demo`).

    python docs/demo_results/swd_settings/swd_settings.py demo_output swd_learning_rate=3e-5 swd_kd_on_eos_padding=0

Each argument after the run folder is one variant: `PipelineConfig` fields (comma-separated `name=value` pairs) that
differ from the demo's defaults. Every variant distils the run's PBM B = 32 model from its B = 4 anchor (120 steps),
is scored on the run's 400 test rows at tau 0.9 and compared with the PBM B = 32 model it starts from, paired over
the same rows (Newcombe 95% interval). Writes `results.json` next to this script.
"""

import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch

from transformers_bard.demo.claims import paired_difference_interval, wilson_interval
from transformers_bard.demo.digits import QUESTION_TYPES, build_digits_dataset, evaluate
from transformers_bard.demo.pipeline import PipelineConfig, run_distill
from transformers_bard.models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor

run = Path(sys.argv[1])
cfg = PipelineConfig(output_dir=str(run))
types = {f.name: f.type for f in fields(PipelineConfig)}


def variant(spec: str) -> dict:
    values = {}
    for pair in filter(None, spec.split(",")):
        name, value = pair.split("=")
        if name not in types:
            raise SystemExit(f"unknown PipelineConfig field {name!r}")
        values[name] = bool(int(value)) if "bool" in str(types[name]) else float(value)
    return values


torch.set_num_threads(cfg.threads)
train = build_digits_dataset("train", cfg.train_samples, seed=cfg.seed, question_weights=cfg.question_weights)
test = build_digits_dataset("test", cfg.eval_samples, seed=cfg.seed, balanced=True)
test = test.select(sorted(range(len(test)), key=lambda i: (QUESTION_TYPES.index(test[i]["question_type"]), i)))
processor = BardVLProcessor.from_pretrained(run / "pbm" / "stage-b32")
decode = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, generate_kwargs={"threshold": 0.9})


def score(name, path, base=None):
    torch.set_num_threads(cfg.eval_threads)
    result = evaluate(BardVLForConditionalGeneration.from_pretrained(path).eval(), processor, test, **decode)
    torch.set_num_threads(cfg.threads)
    row = {"model": name, "accuracy": result["accuracy"], "ci95": wilson_interval(sum(result["correct"]), len(test)),
           "per_type": result["per_type"], "tokens_per_forward": result["tokens_per_forward"]}
    if base is not None:
        paired = paired_difference_interval(result["correct"], base["correct"])
        row.update(vs_pbm=paired["difference"], vs_pbm_ci95=paired["ci95"])
    print(json.dumps(row), flush=True)
    return row, result


rows, (_, base) = [], score("PBM B=32", run / "pbm" / "stage-b32")
rows.append(_)
for spec in sys.argv[2:] or [""]:
    values = variant(spec)
    folder = run / ("swd-" + ("-".join(f"{k}{v}" for k, v in values.items()) or "default") + "-b32")
    path = run_distill(replace(cfg, **values), run / "pbm" / "stage-b32", run / "pbm" / "stage-b4", folder, train)
    rows.append(score(f"PBM+SWD {spec or 'defaults'}", path, base)[0])
(Path(__file__).parent / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
