"""vLLM's per-architecture config hook for BARD-VL (`MODELS_CONFIG_MAP[ARCHITECTURE]`, set by `register()`).

Imports vLLM: loaded only by `register()`.
"""

from vllm.config.diffusion import DiffusionConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.platforms import current_platform
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from .canvas import check_servable

logger = init_logger(__name__)

# vLLM validates a diffusion request's sampling parameters against these (temperature must be 1.0); BARD's own
# sampling settings come from the checkpoint's generation_config.json and are applied by the plugin's sampler.
NEUTRAL_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


class BardVLVerifyConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        """Refuse what vLLM cannot decode exactly (`check_servable`), then turn the diffusion path on: vLLM treats
        a model with a top-level `canvas_length` as a diffusion model; the canvas is one block."""
        hf_config = model_config.hf_config
        check_servable(hf_config)
        hf_config.canvas_length = int(hf_config.block_size)
        model_config.override_generation_config = {**NEUTRAL_SAMPLING, **model_config.override_generation_config}

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        """A DiffusionConfig with canvas_length = B, and an attention backend that takes a per-request causal flag,
        chosen by platform: CPU_ATTN on CPU (its `dynamic_causal`, vLLM 0.32), else TRITON_ATTN unless the user chose
        FLASH_ATTN (which needs FlashAttention 4 for it). vLLM's diffusion path is Model Runner V2 only, which needs
        Triton (on CPU the triton-cpu build): without it, refuse here with the reason rather than vLLM's
        "Model Runner V1 does not support: diffusion models"."""
        block_size = int(vllm_config.model_config.hf_config.block_size)
        if not vllm_config.use_v2_model_runner:
            raise ValueError(_NO_MODEL_RUNNER_V2)
        if vllm_config.diffusion_config is None:
            vllm_config.diffusion_config = DiffusionConfig(canvas_length=block_size)
        elif vllm_config.diffusion_config.canvas_length != block_size:
            raise ValueError(
                f"--diffusion-config canvas_length={vllm_config.diffusion_config.canvas_length} does not match the "
                f"checkpoint's block_size={block_size}; leave --diffusion-config out (the plugin sets it)."
            )
        attention = vllm_config.attention_config
        allowed, default = _attention_backends()
        if attention.backend is None:
            attention.backend = default
            logger.info("BARD-VL mixes causal prefills and bidirectional canvases in one batch: using %s.",
                        default.name)
        elif attention.backend not in allowed:
            raise ValueError(
                f"--attention-backend {attention.backend.name} cannot mix causal and bidirectional attention per "
                f"request, which BARD-VL needs; use {' or '.join(b.name for b in allowed)} (leave it out for "
                f"{default.name})."
            )


_NO_MODEL_RUNNER_V2 = (
    "BARD-VL decodes through vLLM's diffusion path, which only Model Runner V2 runs, and vLLM chose Model Runner V1 "
    "here: V2 needs Triton with a backend for this device (on CPU, the triton-cpu build; the PyPI `triton` wheel "
    "has no CPU backend, and no package registry serves triton-cpu), or VLLM_USE_V2_MODEL_RUNNER=0 was set. Install "
    "a Triton that vLLM accepts for this device, or serve the checkpoint with `transformers-bard serve`."
)


def _attention_backends():
    """(backends that take a per-request causal tensor on this platform, the default)."""
    if current_platform.is_cpu():
        return (AttentionBackendEnum.CPU_ATTN,), AttentionBackendEnum.CPU_ATTN
    return (AttentionBackendEnum.TRITON_ATTN, AttentionBackendEnum.FLASH_ATTN), AttentionBackendEnum.TRITON_ATTN
