"""The scale benchmarks of issue 20 run end to end at toy size, so the scripts a GPU session relies on cannot rot.

`benchmarks/gpu_check.py --quick` runs every section (flex vs sdpa, the training steps, one-forward decode costs,
whole generate calls at 2B width cut to one layer, FSDP2 through both trainers on 2 CPU processes) and writes its
JSON; each section must succeed and report what the GPU run will report.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import offline_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_section_at_toy_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(out)],
                            cwd=REPO, env={**offline_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = {name: value.get("error") for name, value in report.items() if isinstance(value, dict) and not value["ok"]}
    assert not failed, failed
    assert report["flex_equals_sdpa"]["equal"] is True
    steps = report["train_step"]["lengths"]["64:32"]["projected"]
    assert {"AR SFT (TRL)", "AR SFT (response head)", "PBM", "SWD"} <= set(steps)
    assert all(step["s"] > 0 and step["peak_bytes"] > 0 for step in steps.values())
    rows = report["decode_forward"]["rows"]
    assert {(row["batch"], row["block_size"]) for row in rows} == {(1, 4), (1, 32)}
    generate = report["generate"]["rows"][0]
    assert generate["bard_b32_tokens_per_forward"] == pytest.approx(32.0, rel=0.05)  # one step per block of 32
    for script in ("block_merge", "diffusion_distill"):
        assert report["fsdp2"][script]["train_runtime"] > 0, report["fsdp2"]


def test_vllm_check_runs_its_reference_without_vllm(tmp_path):
    """`benchmarks/vllm_check.py` on a machine without vLLM: the probe says so, the reference still runs (the
    tiny checkpoint built offline, unfused and default `generate`), so the script a GPU session runs cannot rot."""
    out = tmp_path / "vllm_check.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vllm_check.py"), "--copies", "1",
                             "--max-tokens", "8", "--out", str(out)],
                            cwd=REPO, env={**offline_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["probe"]["ok"] and report["probe"]["versions"]["vllm"].startswith("missing")
    assert "not installed" in report["vllm_skipped"] and "vllm_tiny" not in report
    reference = report["reference_tiny"]
    assert reference["ok"], reference.get("error")
    for name in ("unfused", "default"):
        assert len(reference[name]["answers"]) == 9 and reference[name]["tokens_per_s"] > 0
    # the unfused forwards decode the same answers with more forwards: a commit forward per finished block
    assert reference["unfused"]["answers"] == reference["default"]["answers"]
    assert reference["unfused"]["tokens_per_forward"] < reference["default"]["tokens_per_forward"]
