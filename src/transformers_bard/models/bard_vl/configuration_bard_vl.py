"""BardVLConfig: Qwen3-VL's config plus the fields block diffusion needs (DESIGN 2, 3.2, 4.1).

This file is exported next to the weights for ``trust_remote_code``: it imports only torch/transformers and
its siblings.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen3_vl.configuration_qwen3_vl import (
    Qwen3VLConfig,
    Qwen3VLTextConfig,
    Qwen3VLVisionConfig,
)

# Upstream BARD-VL checkpoints use this id for `<|mask|>` and ship no string for it (DESIGN 2).
UPSTREAM_MASK_TOKEN_ID = 151671
# The mask token string that conversion adds to the tokenizer (DESIGN 2).
MASK_TOKEN = "<|mask|>"
# Qwen3-VL's embedding has this many rows; a config with a vocabulary at least this large is "Qwen-sized".
QWEN_VOCAB_SIZE = 151936
PROMPT_ATTENTION_CHOICES = ("block_causal", "causal")


@strict
class BardVLConfig(Qwen3VLConfig):
    r"""
    Configuration of a block-diffusion Qwen3-VL (BARD-VL). Every Qwen3-VL field keeps its meaning; new fields:

    block_size (`int`, defaults to 4):
        Number of tokens decoded in parallel per block (B). Training masks and `generate` both use it.
    mask_token_id (`int`, *optional*):
        Id of `<|mask|>`. When absent and the vocabulary is Qwen-sized, the upstream BARD-VL id 151671 is used.
    prompt_attention (`str`, defaults to `"block_causal"`):
        How prompt (prefix) tokens attend to each other: `"block_causal"` (chunks of `block_size`, bidirectional inside
        a chunk, the reference behaviour) or `"causal"` (token-causal). Training and generation must agree.
    prediction_shift (`bool`, defaults to `False`):
        Which token a hidden state predicts (DESIGN 4.1). `False` (the paper, every upstream checkpoint): the hidden
        state at position i predicts the token at i. `True` (as the AR source, Dream, Fast-dLLM v2): it predicts the
        token at i + 1, so the first token of a response block comes from the last prompt token or the last token of
        the committed block before it, and token j >= 1 from the noisy position j - 1. Training and `generate` follow
        it; a checkpoint is trained for one value.
    source_model (`str`, *optional*):
        The autoregressive checkpoint this model was converted from (the model card's `base_model`).

    Example:

    ```python
    >>> from transformers_bard import BardVLConfig
    >>> config = BardVLConfig(block_size=8, prompt_attention="causal")  # every other field: Qwen3-VL's defaults
    >>> config.model_type, config.block_size, config.prediction_shift
    ('bard_vl', 8, False)
    ```
    """

    model_type = "bard_vl"
    sub_configs_defaults = {
        "vision_config": Qwen3VLVisionConfig,
        "text_config": Qwen3VLTextConfig,
    }

    block_size: int = 4
    mask_token_id: int | None = None
    prompt_attention: str = "block_causal"
    prediction_shift: bool = False
    source_model: str | None = None

    def __post_init__(self, **kwargs):
        # Upstream BARD-VL configs label their text sub-config `bard_vl_text`; its fields are Qwen3-VL's, so it is read
        # as a Qwen3-VL text config (which also lets `AutoModel.from_config` build the unchanged text model).
        if isinstance(self.text_config, dict) and self.text_config.get("model_type") == "bard_vl_text":
            self.text_config = {**self.text_config, "model_type": "qwen3_vl_text"}
        super().__post_init__(**kwargs)
        if self.mask_token_id is None and self.text_config.vocab_size >= QWEN_VOCAB_SIZE:
            self.mask_token_id = UPSTREAM_MASK_TOKEN_ID
        self.validate_bard_fields()

    def validate_bard_fields(self):
        """Raise a ValueError naming the field, the value and the fix for any invalid BARD field."""
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"`block_size` must be an integer >= 1, got {self.block_size!r}. Use e.g. block_size=4.")
        if self.prompt_attention not in PROMPT_ATTENTION_CHOICES:
            raise ValueError(
                f"`prompt_attention` must be one of {PROMPT_ATTENTION_CHOICES}, got {self.prompt_attention!r}."
            )
        if not isinstance(self.prediction_shift, bool):
            raise ValueError(
                f"`prediction_shift` must be True or False, got {self.prediction_shift!r}. False (the paper) predicts "
                "the token at the hidden state's own position, True the next one (DESIGN 4.1)."
            )
        if self.mask_token_id is not None:
            vocab = self.text_config.vocab_size
            if isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, int):
                raise ValueError(f"`mask_token_id` must be an integer, got {self.mask_token_id!r}.")
            if not 0 <= self.mask_token_id < vocab:
                raise ValueError(
                    f"`mask_token_id`={self.mask_token_id} is outside the embedding (vocab_size={vocab}). Add the "
                    "`<|mask|>` token with `transformers_bard.convert_from_autoregressive`, which resizes if needed."
                )


__all__ = ["BardVLConfig"]
