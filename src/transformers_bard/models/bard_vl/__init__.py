"""BARD-VL: Qwen3-VL as a block-diffusion VLM. Flat files, exported next to the weights for `trust_remote_code`."""

from .configuration_bard_vl import BardVLConfig
from .generation_bard_vl import BardVLGenerationConfig, BardVLGenerationOutput, bard_generation_config
from .masking_bard_vl import (
    CLEAN,
    NOISY,
    PAD,
    PREFIX,
    attention_mask_from_labels,
    block_diffusion_block_mask,
    block_diffusion_mask,
    block_ids_from_segments,
    packed_position_ids,
    packed_segment_ids,
    response_position_ids,
)
from .modeling_bard_vl import BardVLForConditionalGeneration, BardVLModel, BardVLOutput

__all__ = [
    "BardVLConfig",
    "BardVLForConditionalGeneration",
    "BardVLGenerationConfig",
    "BardVLGenerationOutput",
    "BardVLModel",
    "BardVLOutput",
    "PAD",
    "PREFIX",
    "CLEAN",
    "NOISY",
    "attention_mask_from_labels",
    "bard_generation_config",
    "block_diffusion_block_mask",
    "block_diffusion_mask",
    "block_ids_from_segments",
    "packed_position_ids",
    "packed_segment_ids",
    "response_position_ids",
]
