"""The end-to-end pipeline (transformers-bard demo) on a tiny random source, its claims logic and its report."""

import json

import pytest
import torch

from transformers_bard.demo.pipeline import PipelineConfig, judge_claims, results_markdown, run_pipeline


def _tiny_config(out, source, **overrides):
    # The quick run's shape on a ~1M-parameter random source: one or two optimizer steps per stage, one test row per
    # question type, answers cut at 8 tokens.
    values = dict(
        output_dir=str(out), source=str(source), train_samples=8, eval_samples=4, timing_samples=2,
        block_sizes=(4, 8), pbm_steps=(2, 1), swd_steps=1, batch_size=4, thresholds=(1.0, 0.5),
        stage_thresholds=(1.0,), claim_threshold=1.0, max_new_tokens=8, eval_batch_size=4, threads=1,
    )
    values.update(overrides)
    return PipelineConfig.quick(**values)


def test_quick_pipeline_end_to_end(tiny_qwen3_vl_dir, tmp_path):
    lines = []
    results = run_pipeline(_tiny_config(tmp_path, tiny_qwen3_vl_dir), report=lines.append)
    rows = results["rows"]
    assert [(r["model"], r["threshold"]) for r in rows] == [
        ("AR (source, greedy)", None), ("PBM B=4", 1.0), ("PBM B=8", 1.0), ("PBM B=8", 0.5), ("PBM+SWD B=8", 1.0),
        ("PBM+SWD B=8", 0.5), ("PBM B=8, verified", 1.0), ("PBM+SWD B=8, verified", 1.0),
    ]
    # verified decoding (DESIGN 4.2 a): the final models' verified answers are the AR source's, row for row
    assert [r["same_as_ar"] for r in rows if "same_as_ar" in r] == [1.0, 1.0]
    assert [r["accuracy"] for r in rows[-2:]] == [rows[0]["accuracy"]] * 2
    for stage in ("pbm/stage-b4", "pbm/stage-b8", "swd-b8/stage-b8"):
        assert (tmp_path / stage / "config.json").is_file(), stage
    assert results["eval_samples"] == 4 and results["eval_samples_per_type"] == {
        "position": 1, "column": 1, "read": 1, "read_twice": 1,
    }
    for row in rows:
        lo, hi = row["ci95"]
        assert 0.0 <= lo <= row["accuracy"] <= hi <= 1.0 and hi - lo > 0.3  # 4 rows: a wide interval
        assert set(row["per_type_ci95"]) == set(row["per_type"])
        assert row["tokens_per_second"] > 0 and row["speedup"] > 0
    assert rows[0]["speedup"] == 1.0 and rows[0]["tokens_per_forward"] == 1.0
    claims = {c["claim"]: c for c in results["claims"]}
    assert sorted(claims) == ["a", "b", "c", "d", "e"]
    assert claims["c"]["verdict"] in ("holds", "does not hold", "cannot tell")
    assert claims["c"]["num_samples"] == 4
    assert [claims[k]["verdict"] for k in "bde"] == ["not run"] * 3
    # claim (c) again by verified forwards per answer, paired per row (DESIGN 4.2 a)
    verified = {c["claim"]: c for c in results["verified_claims"]}
    assert sorted(verified) == ["c"] and verified["c"]["num_samples"] == 4
    assert verified["c"]["verdict"] in ("holds", "does not hold", "cannot tell")
    assert "| claim (verified) |" in results_markdown(results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["claims"] == json.loads(json.dumps(results["claims"]))
    assert (tmp_path / "results.md").read_text() == results_markdown(results)
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert list(results["timings_s"]) == [
        "conversion", "progressive block merging", "stage-wise distillation B=8", "evaluation", "timing",
    ]
    progress = [line for line in lines if "elapsed]" in line]
    assert any("progressive block merging" in line for line in progress)
    assert not [line for line in progress[1:] if not any(s in line for s in (" left", "estimated after", " done"))]
    assert progress[-1].endswith("training and evaluation done")
    assert any(str(tmp_path / "results.json") in line for line in lines)


def test_verified_rows_benchmark_on_a_pipeline_output(tiny_qwen3_vl_dir, tmp_path, monkeypatch, capsys):
    """`benchmarks/verified_rows.py` on the quick run's folder: both final models verified by the recorded AR
    source at two draft thresholds, every answer the AR source's."""
    import importlib.util
    import sys

    from conftest import REPO

    run_pipeline(_tiny_config(tmp_path, tiny_qwen3_vl_dir, verify=False), report=lambda line: None)
    spec = importlib.util.spec_from_file_location("verified_rows", REPO / "benchmarks" / "verified_rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["verified_rows.py", str(tmp_path), "--eval-samples", "4", "--max-new-tokens",
                                      "8", "--batch-size", "4", "--draft-thresholds", "0.9", "0.1"])
    module.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| PBM")]
    assert [(r[0].strip(), float(r[1])) for r in rows] == [
        ("PBM B=8", 0.9), ("PBM B=8", 0.1), ("PBM+SWD B=8", 0.9), ("PBM+SWD B=8", 0.1)]
    assert all(float(r[3]) == 1.0 for r in rows)  # same answers as AR


@pytest.mark.slow
def test_pipeline_with_all_ablations(tiny_qwen3_vl_dir, tmp_path):
    ablations = ("direct", "ar_teacher", "mix", "sample_norm", "wide_mask_rates")
    # two training processes (the default for ablations on 2 threads): every job's arguments cross to a worker
    results = run_pipeline(_tiny_config(tmp_path, tiny_qwen3_vl_dir, ablations=ablations, threads=2),
                           report=lambda line: None)
    assert "2 training process(es)" in results["machine"]
    names = {r["model"] for r in results["rows"]}
    assert {
        "direct B=8", "PBM+SWD(AR teacher) B=8", "PBM(mix)+revision B=8", "PBM+SWD(sample norm) B=8",
        "PBM+SWD(rates 0.001-1.0) B=8",
    } <= names
    for stage in ("direct/stage-b8", "swd-ar-b8/stage-b8", "pbm-mix/stage-b8", "swd-sample-norm-b8/stage-b8",
                  "swd-wide-rates-b8/stage-b8"):
        assert (tmp_path / stage / "config.json").is_file(), stage
    assert all(c["verdict"] in ("holds", "does not hold", "cannot tell") for c in results["claims"])
    assert [c["claim"] for c in results["verified_claims"]] == ["b", "c", "d", "e"]
    # the settings ablations: each against the default SWD model, same rows, same threshold
    settings = {s["claim"]: s for s in results["settings"]}
    assert sorted(settings) == ["sample_norm", "wide_mask_rates"]
    for entry in settings.values():
        assert entry["compared"][1]["model"] == "PBM+SWD B=8" and entry["num_samples"] == 4
        assert entry["verdict"] in ("holds", "does not hold", "cannot tell")
    table = (tmp_path / "results.md").read_text()
    assert "| setting | compared (exact match) |" in table
    assert "| SWD loss normalised per sample beats per token (B=8, tau=1.0) | PBM+SWD(sample norm) B=8 tau=1.0:" in table
    noise = json.loads((tmp_path / "swd-wide-rates-b8" / "stage-b8" / "noise_scheduler_config.json").read_text())
    assert (noise["min_rate"], noise["max_rate"]) == (0.001, 1.0)  # the setting asked for was trained


@pytest.mark.slow
def test_trainings_side_by_side_give_the_same_models(tiny_qwen3_vl_dir, tmp_path):
    # Two spawned training processes of one thread each against one process on one thread: every trained model
    # (PBM, the SWD student after it, the direct conversion, the AR-teacher SWD) is bitwise the same, and so is the
    # table; only where and when the trainings ran differs.
    ablations = ("direct", "ar_teacher")
    side = run_pipeline(_tiny_config(tmp_path / "side", tiny_qwen3_vl_dir, ablations=ablations, threads=2,
                                     training_processes=2, pbm_mask_rates=(0.1, 1.0)), report=lambda line: None)
    alone = run_pipeline(_tiny_config(tmp_path / "alone", tiny_qwen3_vl_dir, ablations=ablations, threads=1,
                                      training_processes=1, pbm_mask_rates=(0.1, 1.0)), report=lambda line: None)
    for stage in ("pbm/stage-b8", "direct/stage-b8"):  # the PBM-sized runs trained with the asked-for clamp
        noise = json.loads((tmp_path / "side" / stage / "noise_scheduler_config.json").read_text())
        assert (noise["min_rate"], noise["max_rate"]) == (0.1, 1.0), stage
    from transformers_bard.trainer.block_diffusion_trainer import load_safetensors_weights

    for stage in ("pbm/stage-b4", "pbm/stage-b8", "swd-b8/stage-b8", "direct/stage-b8", "swd-ar-b8/stage-b8"):
        a, b = (load_safetensors_weights(str(tmp_path / run / stage)) for run in ("side", "alone"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    drop = ("tokens_per_second", "speedup")
    assert [{k: v for k, v in r.items() if k not in drop} for r in side["rows"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in alone["rows"]]
    assert "2 training process(es) of 1 thread(s)" in side["machine"]
    assert set(side["timings_s"]) == set(alone["timings_s"]) >= {"ablation: direct conversion", "ablation: AR teacher"}
    assert PipelineConfig(ablations=("direct",)).training_processes == 2  # default: `threads` processes
    assert PipelineConfig().training_processes == 1 and PipelineConfig(threads=3, ablations=("mix",)).training_threads == 1
    with pytest.raises(ValueError, match="training_processes"):
        PipelineConfig(training_processes=0)


@pytest.mark.slow
def test_pipeline_causal_prompt_ablation(tiny_qwen3_vl_dir, tmp_path):
    # PBM + SWD again from a conversion with a causal prompt (the mask vLLM serves), judged against the default SWD
    results = run_pipeline(_tiny_config(tmp_path, tiny_qwen3_vl_dir, ablations=("causal_prompt",)),
                           report=lambda line: None)
    names = [r["model"] for r in results["rows"]]
    assert {"PBM(causal prompt) B=8", "PBM+SWD(causal prompt) B=8"} <= set(names)
    for stage in ("pbm-causal/stage-b4", "pbm-causal/stage-b8", "swd-causal-b8/stage-b8"):
        assert json.loads((tmp_path / stage / "config.json").read_text())["prompt_attention"] == "causal", stage
    assert json.loads((tmp_path / "swd-b8" / "stage-b8" / "config.json").read_text())["prompt_attention"] == (
        "block_causal")
    entry, pbm_entry = results["settings"]
    assert entry["claim"] == "causal_prompt" and entry["compared"][0]["model"] == "PBM+SWD(causal prompt) B=8"
    assert entry["compared"][1]["model"] == "PBM+SWD B=8" and entry["num_samples"] == 4
    assert pbm_entry["claim"] == "causal_prompt_pbm" and pbm_entry["compared"][0]["model"] == "PBM(causal prompt) B=8"
    assert pbm_entry["compared"][1]["model"] == "PBM B=8"
    assert "vLLM" in entry["statement"] and "vLLM" in pbm_entry["statement"]
    assert "ablation: causal prompt" in results["timings_s"]


def test_causal_prompt_ablation_is_asked_for_by_name():
    from transformers_bard.demo.pipeline import ABLATIONS, SERVING_ABLATIONS

    assert "causal_prompt" in SERVING_ABLATIONS and "causal_prompt" not in ABLATIONS  # not part of `all`
    assert PipelineConfig(ablations=("causal_prompt", "direct")).ablations == ("causal_prompt", "direct")
    with pytest.raises(ValueError, match="causal_prompt"):  # the message lists it among the choices
        PipelineConfig(ablations=("causal",))


@pytest.mark.slow
def test_pipeline_under_the_mix_prior(tiny_qwen3_vl_dir, tmp_path, monkeypatch):
    # --noise-prior mix: every trained model (PBM, SWD, direct) under mixed noise, every BARD decode with revision.
    from transformers_bard.demo import digits

    seen = []
    real = digits.evaluate

    def recording(model, processor, test, generate_kwargs=None, **kwargs):
        seen.append((type(model).__name__, dict(generate_kwargs or {})))
        return real(model, processor, test, generate_kwargs=generate_kwargs, **kwargs)

    monkeypatch.setattr(digits, "evaluate", recording)
    # verify=False: the verified rows are the quick run's test; this one is about the prior and revision
    cfg = _tiny_config(tmp_path, tiny_qwen3_vl_dir, noise_prior="mix", ablations=("direct",), edit_threshold=0.8,
                       verify=False)
    results = run_pipeline(cfg, report=lambda line: None)
    assert [(r["model"], r["threshold"]) for r in results["rows"]] == [
        ("AR (source, greedy)", None), ("PBM(mix) B=4", 1.0), ("PBM(mix) B=8", 1.0), ("PBM(mix) B=8", 0.5),
        ("PBM(mix)+SWD B=8", 1.0), ("PBM(mix)+SWD B=8", 0.5), ("direct(mix) B=8", 1.0), ("direct(mix) B=8", 0.5),
    ]
    for stage in ("pbm/stage-b4", "pbm/stage-b8", "swd-b8/stage-b8", "direct/stage-b8"):
        noise = json.loads((tmp_path / stage / "noise_scheduler_config.json").read_text())
        assert noise["prior"] == "mix", stage
    bard = [kwargs for name, kwargs in seen if name.startswith("Bard")]
    assert len(bard) == 7 and all(kwargs["edit_threshold"] == 0.8 for kwargs in bard)
    assert [kwargs for name, kwargs in seen if not name.startswith("Bard")] == [{}]  # the AR source: plain greedy
    claims = {c["claim"]: c for c in results["claims"]}
    assert claims["b"]["compared"][1]["model"] == "direct(mix) B=8" and claims["e"]["verdict"] == "not run"
    assert (tmp_path / "results.md").read_text().startswith(
        "Every BARD model trained with the mix noise prior and decoded with revision (edit threshold 0.8)."
    )


def _eval(correct, tokens_per_forward):
    return {"correct": correct, "accuracy": sum(correct) / len(correct), "tokens_per_forward": tokens_per_forward}


NAMES = {"ar": "AR", "pbm": "PBM B=32", "swd": "PBM+SWD B=32", "direct": "direct B=32", "mix": "mix B=32"}


def test_claims_on_constructed_results():
    cfg = PipelineConfig(thresholds=(0.9, 0.7, 0.5), claim_threshold=0.9)
    right, n = [True] * 400, 400
    evals = {
        ("AR", None): _eval(right, 1.0),
        # 0.9 is the most accurate but too slow; 0.7 is the highest threshold with >= 3 tokens per forward.
        ("PBM+SWD B=32", 0.9): _eval(right, 2.5),
        ("PBM+SWD B=32", 0.7): _eval([True] * 398 + [False] * 2, 3.2),
        ("PBM+SWD B=32", 0.5): _eval([True] * 300 + [False] * 100, 5.0),
        ("PBM B=32", 0.9): _eval([True] * 300 + [False] * 100, 4.0),
        ("PBM B=32", 0.7): _eval([True] * 250 + [False] * 150, 4.4),
        ("PBM B=32", 0.5): _eval([True] * 200 + [False] * 200, 6.0),
        ("direct B=32", 0.9): _eval([True] * 302 + [False] * 98, 4.1),
        # 240 right: 230 shared with PBM at 0.7, 10 only mix, 20 only PBM.
        ("mix B=32", 0.9): _eval([True] * 230 + [False] * 20 + [True] * 10 + [False] * 140, 4.5),
    }
    claims = {c["claim"]: c for c in judge_claims(cfg, evals, NAMES)}
    a = claims["a"]
    assert a["compared"][0]["threshold"] == 0.7 and a["verdict"] == "holds"  # 2 misses of 400: within 2%
    assert a["margin"] == pytest.approx(0.02) and a["difference"] == pytest.approx(-2 / n)
    assert claims["b"]["verdict"] == "cannot tell"  # 300 vs 302 of 400
    assert claims["c"]["verdict"] == "holds"  # 400 vs 300 of 400
    assert claims["d"]["verdict"] == "not run"
    # (e): mix at tau=0.9 has 4.5 tokens/forward; mask-only is taken at 0.7 (4.4, the closest), 240 vs 250.
    assert claims["e"]["compared"][1]["threshold"] == 0.7 and claims["e"]["verdict"] == "cannot tell"

    # The same 240 right answers, all shared with PBM's 250: a consistent deficit, which the pairing resolves.
    evals[("mix B=32", 0.9)] = _eval([True] * 240 + [False] * 160, 4.5)
    assert {c["claim"]: c for c in judge_claims(cfg, evals, NAMES)}["e"]["verdict"] == "does not hold"
    # The mix model much worse at equal speed: does not hold.
    evals[("mix B=32", 0.9)] = _eval([True] * 150 + [False] * 250, 4.5)
    assert {c["claim"]: c for c in judge_claims(cfg, evals, NAMES)}["e"]["verdict"] == "does not hold"


def test_claim_a_without_a_fast_threshold():
    cfg = PipelineConfig(thresholds=(0.9, 0.5), claim_threshold=0.9)
    evals = {("AR", None): _eval([True] * 10, 1.0)}
    for name in ("PBM+SWD B=32", "PBM B=32"):
        evals[(name, 0.9)] = _eval([True] * 10, 1.5)
        evals[(name, 0.5)] = _eval([True] * 10, 2.5)
    a = judge_claims(cfg, evals, {k: NAMES[k] for k in ("ar", "pbm", "swd")})[0]
    assert a["verdict"] == "does not hold" and "3 tokens per forward" in a["note"]
    assert a["compared"][0]["threshold"] == 0.5  # the fastest, reported with its numbers


def test_markdown_tables_from_hand_written_results():
    results = {
        "rows": [
            dict(model="AR", block_size=1, threshold=None, accuracy=0.5, ci95=[0.25, 0.75],
                 per_type={"read": 0.25}, tokens_per_forward=1.0, tokens_per_second=100.0, speedup=1.0),
            dict(model="PBM B=4", block_size=4, threshold=0.9, accuracy=0.75, ci95=[0.5, 0.9],
                 per_type={"position": 1.0}, tokens_per_forward=2.5, tokens_per_second=250.0, speedup=2.5),
        ],
        "claims": [
            {"claim": "b", "statement": "PBM beats direct", "verdict": "not run", "note": "needs --ablations direct"},
            {"claim": "c", "statement": "SWD helps", "compared": [
                {"model": "S", "threshold": 0.9, "accuracy": 0.8}, {"model": "P", "threshold": 0.9, "accuracy": 0.7}],
             "difference": 0.1, "ci95": [0.02, 0.18], "margin": 0.0, "verdict": "holds"},
        ],
    }
    table = results_markdown(results).splitlines()
    assert table[0] == (
        "| model | B | tau | exact match [95% CI] | position | read | tokens/forward | tokens/s | vs AR |"
    )
    assert table[2] == "| AR | 1 | - | 0.500 [0.250, 0.750] | - | 0.25 | 1.00 | 100 | 1.00x |"
    assert table[3] == "| PBM B=4 | 4 | 0.9 | 0.750 [0.500, 0.900] | 1.00 | - | 2.50 | 250 | 2.50x |"
    assert table[7] == "| (b) PBM beats direct | - | - | not run (needs --ablations direct) |"
    assert table[8] == "| (c) SWD helps | S tau=0.9: 0.800 vs P tau=0.9: 0.700 | 0.100 [0.020, 0.180] | holds |"


def test_bad_pipeline_settings():
    with pytest.raises(ValueError, match="block_sizes"):
        PipelineConfig(block_sizes=(4, 6))
    with pytest.raises(ValueError, match="pbm_steps"):
        PipelineConfig(pbm_steps=(800, 200))
    with pytest.raises(ValueError, match="thresholds"):
        PipelineConfig(thresholds=(0.0,))
    with pytest.raises(ValueError, match="claim_threshold"):
        PipelineConfig(claim_threshold=0.8)
    with pytest.raises(ValueError, match="swd_mask_rates"):
        PipelineConfig(swd_mask_rates=(0.5, 0.1))
    with pytest.raises(ValueError, match="pbm_mask_rates"):
        PipelineConfig(pbm_mask_rates=(0.0, 1.0))
    with pytest.raises(ValueError, match="question_weights"):
        PipelineConfig(question_weights={"count": 1.0})
    with pytest.raises(ValueError, match="ablations"):
        PipelineConfig(ablations=("nope",))
    with pytest.raises(ValueError, match="noise_prior"):
        PipelineConfig(noise_prior="uniform")
    with pytest.raises(ValueError, match="Drop `mix` from `ablations`"):
        PipelineConfig(noise_prior="mix", ablations=("direct", "mix"))
    assert PipelineConfig(pbm_steps=300).stage_steps() == [300, 300, 300, 300]
    assert PipelineConfig().stage_steps() == [500, 100, 450, 450]


def test_pbm_budget_defaults_per_task():
    """The choice task trains four times the digits budget at B >= 8 (docs/demo_results/choice_probe, section 7)."""
    from transformers_bard.demo.pipeline import DEFAULT_PBM_STEPS

    assert PipelineConfig().stage_steps() == list(DEFAULT_PBM_STEPS["digits"]) == [500, 100, 450, 450]
    assert PipelineConfig(task="choice").stage_steps() == [500, 200, 900, 900]
    assert PipelineConfig(task="choice").question_weights == {"any_row": 1.0, "any_column": 1.0, "two_rows": 2.0}
    assert PipelineConfig().pbm_mask_rates == (0.001, 1.0) and PipelineConfig(task="choice").pbm_mask_rates == (0.1, 1.0)
    assert PipelineConfig(task="choice", pbm_steps=300).stage_steps() == [300] * 4
