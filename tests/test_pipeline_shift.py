"""The demo's `shift` ablation (issue 13, DESIGN 4.1) on a tiny random source: both conversions, the B = 4 stage
evaluated along the way, steps to target, the shifted final models in the table and the report."""

import json

from test_pipeline import _tiny_config
from transformers_bard import BardVLConfig
from transformers_bard.demo.pipeline import SHIFT_TARGET, results_markdown, run_pipeline


def test_pipeline_shift_ablation(tiny_qwen3_vl_dir, tmp_path):
    cfg = _tiny_config(tmp_path, tiny_qwen3_vl_dir, ablations=("shift",), pbm_steps=(2, 1), shift_eval_every=1)
    results = run_pipeline(cfg, report=lambda line: None)
    assert BardVLConfig.from_pretrained(tmp_path / "bard-b4-shift").prediction_shift is True
    assert BardVLConfig.from_pretrained(tmp_path / "bard-b4").prediction_shift is False
    for stage in ("pbm-shift/stage-b8", "swd-shift-b8/stage-b8"):
        assert BardVLConfig.from_pretrained(tmp_path / stage).prediction_shift is True, stage
    names = {r["model"] for r in results["rows"]}
    assert {"PBM(shift) B=8", "PBM+SWD(shift) B=8"} <= names
    shift = results["shift"]
    ar = results["rows"][0]["accuracy"]
    assert shift["target"] == SHIFT_TARGET * ar and shift["threshold"] == cfg.claim_threshold
    assert set(shift["settings"]) == {"paper", "shift"}
    for entry in shift["settings"].values():
        steps = [point["step"] for point in entry["b4_curve"]]
        assert steps == [0, 1, 2]  # after conversion, then every `shift_eval_every` steps of the B = 4 stage
        assert entry["converted"] == entry["b4_curve"][0]
        assert set(entry["converted"]["per_type"]) == {"position", "column", "read", "read_twice"}
        reached = [point["step"] for point in entry["b4_curve"] if point["accuracy"] >= shift["target"]]
        assert entry["steps_to_target"] == (reached[0] if reached else None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["shift"] == json.loads(json.dumps(shift))
    assert "steps to target" in results_markdown(results)
