"""The torch versions of Model Runner V2's Triton input kernels (vllm-env/vllm_cpu_kernels.py, active in the vLLM
environment's CPU mode) against the Triton wrappers they replace, run by Triton's interpreter: every result and
every buffer written in place equal, on randomized inputs shaped as the runner's (tests/vllm_cpu_kernels_run.py,
in a subprocess of the vLLM environment; docs/serving/engines.md section 9). The end-to-end check with the
replacements active is tests/test_vllm_engine.py (answers equal `generate` token for token).

The environment is built by `make vllm` from here; where the build fails, the tests skip and name the failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "vllm_cpu_kernels_run.py"
CPU_ENV = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}  # the CPU mode: Triton's interpreter, one thread


def run_in_vllm(vllm_python, mode: str, tmp_path, **env) -> dict:
    out = tmp_path / f"{mode}.json"
    environment = {**os.environ, **CPU_ENV, **env}
    if "BARD_VLLM_TRITON_KERNELS" not in env:
        environment.pop("BARD_VLLM_TRITON_KERNELS", None)
    done = subprocess.run([str(vllm_python), str(RUN), mode, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=environment)
    assert out.exists(), done.stderr[-4000:]
    record = json.loads(out.read_text())
    assert done.returncode == 0 and record["ok"], record.get("error") or done.stderr[-4000:]
    return record


def test_torch_replacements_equal_the_triton_kernels(vllm_python, tmp_path):
    """In the CPU mode the import hook replaced every wrapper (where vLLM defines it and where model_runner, the
    samplers and the speculators imported it by name), and each replacement leaves exactly what the Triton wrapper
    leaves: block tables, slot mappings, M-RoPE positions, staged writes, prefill and decode inputs, the update
    after sampling, greedy sampling, the vision position embeddings; several seeds, empty and padded batches, AR,
    speculative and BARD steps."""
    record = run_in_vllm(vllm_python, "compare", tmp_path)
    assert record["not_replaced"] == []
    assert all(count > 0 for count in record["cases"].values()), record["cases"]
    assert len(record["cases"]) == 6


def test_opt_out_keeps_the_triton_kernels(vllm_python, tmp_path):
    """BARD_VLLM_TRITON_KERNELS=1 leaves every wrapper the Triton one (to compare the two paths); without the
    interpreter (not the CPU mode) the hook does not replace them either."""
    record = run_in_vllm(vllm_python, "hook", tmp_path, BARD_VLLM_TRITON_KERNELS="1")
    assert record["replaced"] == [] and record["runner_post_update_is_triton"]
    assert record["wanted_in_cpu_mode"] and not record["wanted_without_interpreter"]
