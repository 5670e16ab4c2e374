"""The end-to-end pipeline (transformers-bard demo) on a tiny random source: every step runs and reports honestly."""

import json

import pytest

from transformers_bard.demo.digits import score_answer
from transformers_bard.demo.pipeline import PipelineConfig, results_markdown, run_pipeline


@pytest.fixture(scope="module")
def pipeline_results(tiny_qwen3_vl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    cfg = PipelineConfig(
        output_dir=str(out), source=str(tiny_qwen3_vl_dir), train_samples=8, eval_samples=2, block_sizes=(4, 8),
        pbm_steps=1, swd_steps=1, batch_size=4, thresholds=(1.0, 0.5), max_new_tokens=8,
        ablations=("direct", "ar_teacher", "mix"), threads=1,
    )
    lines = []
    results = run_pipeline(cfg, report=lines.append)
    return out, results, lines


def test_pipeline_trains_evaluates_and_writes_reports(pipeline_results):
    out, results, lines = pipeline_results
    names = [r["model"] for r in results["rows"]]
    expected_models = ["PBM B=4", "PBM B=8", "PBM+SWD B=8", "direct B=8", "PBM+SWD(AR teacher) B=8", "PBM(mix) B=8"]
    assert names[0].startswith("AR")
    assert names[1:] == [m for m in expected_models for _ in (1.0, 0.5)]
    for stage in ("pbm/stage-b4", "pbm/stage-b8", "swd-b8/stage-b8", "direct/stage-b8", "swd-ar-b8/stage-b8",
                  "pbm-mix/stage-b8"):
        assert (out / stage / "config.json").is_file(), stage
    ar_tps = results["rows"][0]["tokens_per_second"]
    for row in results["rows"][1:]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["speedup"] == pytest.approx(row["tokens_per_second"] / ar_tps)
        if row["threshold"] == 1.0:
            # one token per step, B steps per block: exactly one token per forward (DESIGN 4.5)
            assert row["tokens_per_forward"] == pytest.approx(1.0)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert (out / "results.md").read_text() == results_markdown(results)
    assert (out / "results.png").stat().st_size > 1000
    assert any("progressive block merging done" in line for line in lines)


def test_markdown_table_from_hand_written_results():
    results = {"rows": [
        dict(model="AR", block_size=1, threshold=None, accuracy=0.5, per_type={"read": 0.25}, tokens_per_forward=1.0,
             tokens_per_second=100.0, speedup=1.0),
        dict(model="PBM B=4", block_size=4, threshold=0.9, accuracy=0.75, per_type={"count": 1.0},
             tokens_per_forward=2.5, tokens_per_second=250.0, speedup=2.5),
    ]}
    table = results_markdown(results).splitlines()
    assert table[2] == "| AR | 1 | - | 0.500 | 0.25 | - | - | - | 1.00 | 100 | 1.00x |"
    assert table[3] == "| PBM B=4 | 4 | 0.9 | 0.750 | - | 1.00 | - | - | 2.50 | 250 | 2.50x |"


def test_bad_pipeline_settings():
    with pytest.raises(ValueError, match="block_sizes"):
        PipelineConfig(block_sizes=(4, 6))
    with pytest.raises(ValueError, match="thresholds"):
        PipelineConfig(thresholds=(0.0,))
    with pytest.raises(ValueError, match="ablations"):
        PipelineConfig(ablations=("nope",))
    assert score_answer(" 1  2 ", "1 2")
