"""Paired comparison of the two PBM B = 32 models of a `--ablations causal_prompt` run that predates the pipeline's own
`causal_prompt_pbm` entry: both decoded on the run's test rows at the claim threshold (with the run's decode settings),
then the same `_compare` the pipeline uses. Usage: python pbm_pair.py RUN_DIR"""

import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from transformers_bard import BardVLForConditionalGeneration, BardVLProcessor
from transformers_bard.demo.digits import build_digits_dataset, evaluate, load_digits_ar_path
from transformers_bard.demo.pipeline import PipelineConfig, _compare

run = Path(sys.argv[1])
saved = json.loads((run / "results.json").read_text())["config"]
cfg = PipelineConfig(**{f.name: saved[f.name] for f in fields(PipelineConfig) if f.name in saved})
torch.set_num_threads(cfg.eval_threads)
types = cfg.question_types
test = build_digits_dataset("test", cfg.eval_samples, seed=cfg.seed, question_weights=types, balanced=True)
test = test.select(sorted(range(len(test)), key=lambda i: (types.index(test[i]["question_type"]), i)))
processor = BardVLProcessor.from_pretrained(Path(cfg.source) if cfg.source else load_digits_ar_path(cfg.task))
largest, tau, tag = cfg.block_sizes[-1], cfg.claim_threshold, cfg.prior_tag
models = {f"PBM{tag}(causal prompt) B={largest}": run / "pbm-causal" / f"stage-b{largest}",
          f"PBM{tag} B={largest}": run / "pbm" / f"stage-b{largest}"}
evals = {}
for name, path in models.items():
    model = BardVLForConditionalGeneration.from_pretrained(path).eval()
    evals[(name, tau)] = evaluate(model, processor, test, max_new_tokens=cfg.max_new_tokens,
                                  batch_size=cfg.eval_batch_size, generate_kwargs={"threshold": tau, **cfg.decode_kwargs})
first, second = list(models)
entry = _compare("causal_prompt_pbm", f"PBM with a causal prompt (servable by vLLM) beats the block-causal prompt "
                 f"(B={largest}, tau={tau})", (first, tau), (second, tau), evals)
print(json.dumps(entry, indent=1))
(run / "pbm_pair.json").write_text(json.dumps(entry, indent=1) + "\n")
