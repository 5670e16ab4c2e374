"""Registration of the BARD-VL classes with transformers' Auto classes (DESIGN 5)."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .models.bard_vl import BardVLConfig, BardVLForConditionalGeneration
from .models.bard_vl.processing_bard_vl import BardVLProcessor


def register_auto_classes() -> None:
    """Register `bard_vl` with the Auto classes. Idempotent; called on `import transformers_bard`.

    `AutoModel` resolves to the generation-capable `BardVLForConditionalGeneration` (as Dream and LLaDA do), because
    `AutoModel.from_pretrained(...)` is how users load diffusion LMs.
    """
    AutoConfig.register("bard_vl", BardVLConfig, exist_ok=True)
    AutoModel.register(BardVLConfig, BardVLForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(BardVLConfig, BardVLForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(BardVLConfig, BardVLProcessor, exist_ok=True)
