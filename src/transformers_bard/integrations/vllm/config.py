"""vLLM's per-architecture config hook for BARD-VL (`MODELS_CONFIG_MAP[ARCHITECTURE]`, set by `register()`).

Imports vLLM: loaded only by `register()`.
"""

from vllm.config.diffusion import DiffusionConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
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
        """A DiffusionConfig with canvas_length = B, and an attention backend that takes a per-request causal flag
        (TRITON_ATTN unless the user chose FLASH_ATTN, which needs FlashAttention 4 for it)."""
        block_size = int(vllm_config.model_config.hf_config.block_size)
        if vllm_config.diffusion_config is None:
            vllm_config.diffusion_config = DiffusionConfig(canvas_length=block_size)
        elif vllm_config.diffusion_config.canvas_length != block_size:
            raise ValueError(
                f"--diffusion-config canvas_length={vllm_config.diffusion_config.canvas_length} does not match the "
                f"checkpoint's block_size={block_size}; leave --diffusion-config out (the plugin sets it)."
            )
        attention = vllm_config.attention_config
        if attention.backend is None:
            attention.backend = AttentionBackendEnum.TRITON_ATTN
            logger.info("BARD-VL mixes causal prefills and bidirectional canvases in one batch: using TRITON_ATTN "
                        "(pass --attention-backend FLASH_ATTN where FlashAttention 4 is installed).")
        elif attention.backend not in (AttentionBackendEnum.TRITON_ATTN, AttentionBackendEnum.FLASH_ATTN):
            raise ValueError(
                f"--attention-backend {attention.backend.name} cannot mix causal and bidirectional attention per "
                "request, which BARD-VL needs; use TRITON_ATTN (the default here) or FLASH_ATTN with FlashAttention 4."
            )
