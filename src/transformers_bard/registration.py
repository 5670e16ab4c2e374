"""How `bard_vl` plugs into transformers' Auto classes, with the package installed and without it (DESIGN 5)."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .models.bard_vl import BardVLConfig, BardVLForConditionalGeneration
from .models.bard_vl.processing_bard_vl import BardVLProcessor


def register_auto_classes() -> None:
    """Register `bard_vl` with the Auto classes and for remote-code export. Idempotent; run on `import transformers_bard`.

    - `AutoConfig`/`AutoModel`/`AutoModelForImageTextToText`/`AutoProcessor` resolve `bard_vl` checkpoints to these
      classes while the package is imported. `AutoModel` gives the generation-capable
      `BardVLForConditionalGeneration` (as Dream and LLaDA do): `AutoModel.from_pretrained(...)` is how users load
      diffusion LMs.
    - `register_for_auto_class` makes `save_pretrained` of the config, the model and the processor copy their flat
      files (and the files they import) next to what they save and write the matching `auto_map`, so the folder loads
      with `trust_remote_code=True` where the package is not installed.
    """
    AutoConfig.register("bard_vl", BardVLConfig, exist_ok=True)
    AutoModel.register(BardVLConfig, BardVLForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(BardVLConfig, BardVLForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(BardVLConfig, BardVLProcessor, exist_ok=True)
    BardVLConfig.register_for_auto_class()
    BardVLForConditionalGeneration.register_for_auto_class("AutoModel")
    BardVLProcessor.register_for_auto_class()
