"""Untrusted code paths (issue 23): a checkpoint loaded with `trust_remote_code` runs only its own flat files, torch
and transformers (with what installing transformers installs: huggingface_hub, numpy, ...); and the package never
unpickles a file it did not write (every `torch.load` is `weights_only`)."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def torch_and_transformers_modules() -> set[str]:
    """Top-level module names of torch, transformers and transformers' required (not extra) dependencies, plus the
    standard library: what any environment that runs transformers with torch has."""
    from importlib.metadata import packages_distributions, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    required = [Requirement(line) for line in requires("transformers")]
    names = {"torch", "transformers"} | {
        req.name for req in required if req.marker is None or not req.marker.evaluate({"extra": ""})
    } - {None}
    names = {canonicalize_name(name) for name in names}
    modules = {
        module for module, dists in packages_distributions().items()
        if any(canonicalize_name(dist) in names for dist in dists)
    }
    assert {"torch", "transformers", "huggingface_hub", "numpy"} <= modules, modules
    return modules | set(sys.stdlib_module_names) | {"__future__"}

# Run in a fresh interpreter. `transformers_bard` cannot be imported (a finder refuses it), and every import that
# the checkpoint's own code (`transformers_modules.*`, where transformers puts remote code) asks for is recorded,
# including those run lazily inside functions during `generate`.
REMOTE_SCRIPT = """
import importlib.abc, json, sys

class Guard(importlib.abc.MetaPathFinder):
    requested = set()

    def find_spec(self, name, path=None, target=None):
        if name == "transformers_bard" or name.startswith("transformers_bard."):
            raise ImportError(f"{name} is blocked: remote code must not need the package")
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
            frame = frame.f_back
        if frame is not None and frame.f_globals.get("__name__", "").startswith("transformers_modules"):
            self.requested.add(name)
        return None

sys.meta_path.insert(0, Guard())
import torch
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=8, return_dict_in_generate=True)
new_tokens = output.sequences[0, inputs["input_ids"].shape[1]:]
print(json.dumps({
    "model": type(model).__module__ + "." + type(model).__name__,
    "processor": type(processor).__module__ + "." + type(processor).__name__,
    "new_tokens": new_tokens.tolist(),
    "package_modules": sorted(m for m in sys.modules if m.split(".")[0] == "transformers_bard"),
    "requested": sorted(Guard.requested),
}))
"""


def test_remote_code_loads_and_generates_with_torch_and_transformers_only(tiny_bard_vl_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    script = f"CHECKPOINT = {str(tiny_bard_vl_dir)!r}\n" + REMOTE_SCRIPT
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"].startswith("transformers_modules.") and report["model"].endswith(
        ".modeling_bard_vl.BardVLForConditionalGeneration"
    ), report["model"]
    assert report["processor"].endswith(".processing_bard_vl.BardVLProcessor"), report["processor"]
    assert len(report["new_tokens"]) > 0
    assert report["package_modules"] == []
    # what the checkpoint's files import: each other (relative, resolved inside transformers_modules), the standard
    # library, torch and transformers with their dependencies; nothing else
    assert report["requested"], "no import of the remote code was seen: the recording is broken"
    allowed = torch_and_transformers_modules() | {"transformers_modules"}
    outside = [name for name in report["requested"] if name.split(".")[0] not in allowed]
    assert outside == [], outside


def test_exported_files_import_only_torch_transformers_and_each_other():
    """The static side of the test above, over every import statement of the exported flat files."""
    folder = SRC / "transformers_bard" / "models" / "bard_vl"
    files = sorted(folder.glob("*.py"))
    assert files
    allowed = torch_and_transformers_modules()
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path.name, alias.name) for alias in node.names if alias.name.split(".")[0] not in allowed]
            elif isinstance(node, ast.ImportFrom):
                # single-dot relative imports only (the remote-code loader copies one flat folder)
                if node.level > 1 or (node.level == 0 and node.module.split(".")[0] not in allowed):
                    found.append((path.name, "." * node.level + (node.module or "")))
    assert found == []


# ---------------------------------------------------------------------------------------------- no foreign pickles
def unsafe_loads(source: str) -> list[int]:
    """Lines of `source` that could unpickle a file: `torch.load` without `weights_only=True`, `pickle.load(s)`, and
    `numpy.load(..., allow_pickle=True)`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        true = {k.arg for k in node.keywords if isinstance(k.value, ast.Constant) and k.value.value is True}
        if owner == "torch" and node.func.attr == "load" and "weights_only" not in true:
            lines.append(node.lineno)
        elif owner in ("pickle", "cPickle", "dill", "joblib") and node.func.attr in ("load", "loads"):
            lines.append(node.lineno)
        elif owner in ("np", "numpy") and node.func.attr == "load" and "allow_pickle" in true:
            lines.append(node.lineno)
    return lines


def test_the_scanner_finds_unsafe_loads():
    source = textwrap.dedent(
        """
        import pickle, torch, numpy as np
        torch.load(path, weights_only=True, mmap=True)
        torch.load(path)
        torch.load(path, weights_only=False)
        torch.load(path, weights_only=flag)
        pickle.loads(data)
        np.load(path)
        np.load(path, allow_pickle=True)
        """
    )
    assert unsafe_loads(source) == [4, 5, 6, 7, 9]


def test_no_source_file_unpickles_what_it_did_not_write():
    roots = [SRC, SRC.parent / "examples", SRC.parent / "benchmarks"]
    found = {
        str(path.relative_to(SRC.parent)): lines
        for root in roots
        for path in sorted(root.rglob("*.py"))
        if (lines := unsafe_loads(path.read_text()))
    }
    assert found == {}, f"pass weights_only=True (or use safetensors): {found}"
    # not vacuous: the package does call torch.load (the trainers' FSDP2 resume)
    assert any("torch.load(" in path.read_text() for path in SRC.rglob("*.py"))
