"""transformers-bard: turn autoregressive Qwen3-VL models into block-diffusion VLMs with BARD.

Importing the package registers the BARD-VL classes with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoProcessor`). Trainers are imported lazily: `import trl` is slow.
"""

__version__ = "0.1.0"

from .conversion import convert_from_autoregressive  # noqa: E402
from .models.bard_vl import (  # noqa: E402
    BardVLConfig,
    BardVLForConditionalGeneration,
)
from .models.bard_vl.processing_bard_vl import BardVLProcessor  # noqa: E402
from .registration import register_auto_classes  # noqa: E402

register_auto_classes()

# Trainers are imported on first use: `import trl` is slow.
_LAZY = {
    "MixedNoiseScheduler": "transformers_bard.noise",
    "BlockDiffusionCollator": "transformers_bard.trainer.collator",
    "BlockMergeConfig": "transformers_bard.trainer.block_merge_config",
    "BlockMergeTrainer": "transformers_bard.trainer.block_merge_trainer",
    "DiffusionDistillConfig": "transformers_bard.trainer.diffusion_distill_config",
    "DiffusionDistillTrainer": "transformers_bard.trainer.diffusion_distill_trainer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'transformers_bard' has no attribute {name!r}")


__all__ = [
    "__version__",
    "BardVLConfig",
    "BardVLForConditionalGeneration",
    "BardVLProcessor",
    "BlockDiffusionCollator",
    "BlockMergeConfig",
    "BlockMergeTrainer",
    "DiffusionDistillConfig",
    "DiffusionDistillTrainer",
    "MixedNoiseScheduler",
    "convert_from_autoregressive",
    "register_auto_classes",
]
