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

__all__ = [
    "__version__",
    "BardVLConfig",
    "BardVLForConditionalGeneration",
    "BardVLProcessor",
    "convert_from_autoregressive",
    "register_auto_classes",
]
