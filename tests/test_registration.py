"""`import transformers_bard` registers bard_vl with the Auto classes (README, DESIGN 5), in a fresh interpreter."""

import subprocess
import sys


def test_importing_the_package_registers_the_auto_classes():
    code = """
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

assert "bard_vl" not in CONFIG_MAPPING  # nothing registered before the import
import transformers_bard

config = AutoConfig.for_model("bard_vl")
assert type(config) is transformers_bard.BardVLConfig
for auto in (AutoModel, AutoModelForImageTextToText):
    assert auto._model_mapping[type(config)] is transformers_bard.BardVLForConditionalGeneration, auto
assert PROCESSOR_MAPPING[type(config)] is transformers_bard.BardVLProcessor
print("registered")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["registered"]
