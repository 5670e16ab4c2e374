"""BardVLProcessor: Qwen3-VL's processor for images, on the PIL image processor, so torchvision is never needed
(DESIGN 5, 6).

`AutoProcessor.from_pretrained` on a stock Qwen3-VL folder fails without torchvision, because the folder declares a
torchvision video processor (and the torchvision "Fast" image processor). This processor loads the same folder with
the PIL image processor and the tokenizer only, and takes the chat template from `chat_template.json` (or
`chat_template.jinja`), which `AutoTokenizer` alone does not read.

This file is exported next to the weights for `trust_remote_code`: it imports only the standard library, numpy,
torch and transformers.
"""

import json
import os
import re
import shutil

import numpy as np
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = ["BardVLProcessor", "assistant_tokens_mask", "mark_processor_files"]

# `auto_map` entry `mark_processor_files` writes into a stock folder's processor files, next to a copy of this file
# (`save_pretrained` writes the same entry through `register_for_auto_class`).
AUTO_MAP = {"AutoProcessor": "processing_bard_vl.BardVLProcessor"}
# Files in which `AutoProcessor` looks for `processor_class` / `auto_map`, in its order of precedence.
_VIDEO_CONFIG = "video_preprocessor_config.json"
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", _VIDEO_CONFIG)

VIDEO_ERROR = (
    "BardVLProcessor handles text and images only: got `videos` (or a video block in the conversation). Video input "
    "needs Qwen3-VL's video processor, which requires torchvision: install torchvision and use "
    "`transformers.Qwen3VLProcessor.from_pretrained(...)` (or `AutoProcessor`) for video."
)

# Matches `{% generation %}` / `{%- generation -%}` in a chat template.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Qwen's vision placeholder tokens, used when the tokenizer does not name them itself.
VISION_TOKEN_DEFAULTS = {
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}


def assistant_tokens_mask(
    input_ids: list[int], header_ids: list[int], end_id: int, attention_mask: list[int] | None = None
) -> list[int]:
    """1 for the tokens of every assistant reply, 0 elsewhere, found by tokens (DESIGN 3.1).

    A reply starts after `header_ids` (`<|im_start|>` + the tokens of `assistant`) and the one token that follows them
    (the newline of `<|im_start|>assistant\\n`), and ends with the next `end_id` (`<|im_end|>`), inclusive; a reply cut
    off by truncation runs to the end of the row. Padding (attention 0) is never marked. A trailing generation
    prompt `<|im_start|>assistant\\n` marks nothing.

    Args:
        input_ids: one row of token ids, `[length]`.
        header_ids: ids of `<|im_start|>assistant` without the newline.
        end_id: id of `<|im_end|>`.
        attention_mask: optional `[length]` row; positions with 0 stay 0.
    """
    mask = [0] * len(input_ids)
    width = len(header_ids)
    position = 0
    while position + width <= len(input_ids):
        if input_ids[position : position + width] != header_ids:
            position += 1
            continue
        # Skip the header and its newline token.
        position += width + 1
        while position < len(input_ids):
            mask[position] = 1
            position += 1
            if input_ids[position - 1] == end_id:
                break
    if attention_mask is not None:
        mask = [flag if keep else 0 for flag, keep in zip(mask, attention_mask)]
    return mask


def _has_video_block(conversation) -> bool:
    """Whether a conversation (a list of message dicts) or a batch of them holds a video content block."""
    batch = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
    for messages in batch:
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, (list, tuple)):
                continue
            for block in content:
                if isinstance(block, dict) and (block.get("type") == "video" or "video" in block):
                    return True
    return False


class BardVLProcessor(Qwen3VLProcessor):
    r"""
    Qwen3-VL's processor restricted to text and images, with the PIL backend of Qwen2-VL's image processor.

    Loads from a stock Qwen3-VL folder (which declares `Qwen3VLProcessor`, the torchvision image processor and a video
    processor) as well as from folders it saved itself. Outputs are those of `Qwen3VLProcessor` for the same inputs:
    `input_ids`, `attention_mask`, `mm_token_type_ids`, `pixel_values` `[num_patches, 3 * 2 * 16 * 16]` and
    `image_grid_thw` `[num_images, 3]`; an image becomes `prod(grid_thw) / merge_size ** 2` `<|image_pad|>` tokens.

    Differences from `Qwen3VLProcessor`:
    - no video processor: `videos=` and video blocks in `apply_chat_template(tokenize=True)` raise a `ValueError`;
    - the image processor is always the PIL one, whatever the folder declares, so pixels do not depend on whether
      torchvision is installed;
    - `apply_chat_template(..., return_assistant_tokens_mask=True)` with a template that has no `{% generation %}`
      markers (Qwen3-VL's has none, so transformers would return all zeros) finds the assistant replies by their
      tokens instead: `<|im_start|>assistant\n` (excluded) up to the next `<|im_end|>` (included), for every
      assistant turn (see `assistant_tokens_mask`);
    - when the tokenizer has no chat template, it gets the processor's, so `processor.tokenizer.apply_chat_template`
      renders the same text;
    - `save_pretrained` writes `processor_class` `BardVLProcessor` and, as the class is registered with
      `register_for_auto_class` (`transformers_bard.register_auto_classes`), an `auto_map` for `AutoProcessor` and a
      copy of this file, so `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` works without the package.

    Args:
        image_processor (`Qwen2VLImageProcessorPil`): the PIL image processor.
        tokenizer (`PreTrainedTokenizerBase`): the Qwen tokenizer.
        chat_template (`str`, *optional*): Jinja chat template; defaults to the tokenizer's.

    Example:

    ```python
    >>> from transformers_bard import BardVLProcessor
    >>> from transformers_bard.testing import make_image
    >>> processor = BardVLProcessor.from_pretrained("Qwen/Qwen3-VL-4B-Instruct")  # a stock folder: no torchvision needed
    >>> processor.tokenizer.padding_side = "left"  # what `generate` expects of a batch
    >>> messages = [{"role": "user", "content": [{"type": "image", "image": make_image(0, (64, 64))},
    ...                                          {"type": "text", "text": "What is in the image?"}]}]
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
    ...                                        return_dict=True, return_tensors="pt")
    >>> sorted(inputs)
    ['attention_mask', 'image_grid_thw', 'input_ids', 'mm_token_type_ids', 'pixel_values']
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if image_processor is None or tokenizer is None:
            missing = "image_processor" if image_processor is None else "tokenizer"
            raise ValueError(
                f"BardVLProcessor needs `{missing}`, got None. Load both with "
                "`BardVLProcessor.from_pretrained(checkpoint_folder)`."
            )
        # `video_processor=None` is accepted so code written for Qwen3VLProcessor's signature keeps working.
        if kwargs.pop("video_processor", None) is not None:
            raise ValueError(
                "BardVLProcessor has no video processor, got `video_processor`. Video input requires torchvision: use "
                "`transformers.Qwen3VLProcessor` for video."
            )
        if kwargs:
            raise TypeError(f"BardVLProcessor got unexpected keyword arguments {sorted(kwargs)}.")
        # Qwen3VLProcessor resolves these names and ids before handing three sub-processors to ProcessorMixin; this
        # processor has two (no video processor), so it resolves them itself and calls ProcessorMixin directly.
        for name, default in VISION_TOKEN_DEFAULTS.items():
            token = getattr(tokenizer, f"{name}_token", None) or default
            token_id = getattr(tokenizer, f"{name}_token_id", None)
            setattr(self, f"{name}_token", token)
            setattr(
                self, f"{name}_token_id", token_id if token_id is not None else tokenizer.convert_tokens_to_ids(token)
            )
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        elif getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = chat_template
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # Keep the folder's video processor config (a stock Qwen3-VL has one; this processor has no video processor)
        # so `save_pretrained` writes it back: engines that build Qwen3-VL's own processor (vLLM) need the file.
        path = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder", ""), _VIDEO_CONFIG)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                processor._video_processor_config = json.load(handle)
        return processor

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`, plus the `video_preprocessor_config.json` the processor was loaded with
        (when the folder has none): transformers >= 5.20 writes only `processor_config.json`, whose video entry this
        processor lacks, and vLLM builds Qwen3-VL's video processor from that file (docs/serving/engines.md 9)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        config = getattr(self, "_video_processor_config", None)
        target = os.path.join(save_directory, _VIDEO_CONFIG)
        if config is not None and not os.path.exists(target):
            tmp = f"{target}.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, target)
        return result

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The folder may name the torchvision image processor and a video processor (stock Qwen3-VL): ignore both and
        # read the same image settings into the PIL backend. `preprocessor_config.json` (Hub) and the
        # `image_processor` entry of `processor_config.json` (our `save_pretrained`) are both understood.
        subfolder = kwargs.pop("subfolder", "")
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        return [image_processor, tokenizer]

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if videos is not None:
            raise ValueError(VIDEO_ERROR)
        return super().__call__(images=images, text=text, audio=audio, **kwargs)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        if video_sizes is not None:
            raise ValueError(VIDEO_ERROR)
        return super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        if kwargs.get("tokenize") and _has_video_block(conversation):
            raise ValueError(VIDEO_ERROR)
        template = self._resolve_chat_template(chat_template)
        if not kwargs.get("return_assistant_tokens_mask") or _GENERATION_TAG.search(template or ""):
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

        # No {% generation %} markers: render without the transformers mask (it would be all zeros) and find the
        # replies by their tokens.
        kwargs["return_assistant_tokens_mask"] = False
        if kwargs.get("continue_final_message"):
            raise ValueError("`continue_final_message` is not compatible with `return_assistant_tokens_mask=True`.")
        output = super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        if not (kwargs.get("tokenize") and kwargs.get("return_dict")):
            return output
        header_ids = [self.tokenizer.convert_tokens_to_ids("<|im_start|>")]
        header_ids += self.tokenizer.encode("assistant", add_special_tokens=False)
        end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = output["input_ids"]
        # [batch, length] tensor (return_tensors="pt"/"np") or a list of rows (the processor always batches).
        tensor_type = "pt" if isinstance(ids, torch.Tensor) else "np" if isinstance(ids, np.ndarray) else None
        rows = ids.tolist() if tensor_type else ids
        attention = output.get("attention_mask")
        attention = attention.tolist() if tensor_type and attention is not None else attention
        attention = attention if attention is not None else [None] * len(rows)
        output["assistant_masks"] = [
            assistant_tokens_mask(row, header_ids, end_id, keep) for row, keep in zip(rows, attention)
        ]
        if tensor_type:
            output.convert_to_tensors(tensor_type=tensor_type)
        return output


def _copy_this_file(folder: str | os.PathLike) -> None:
    """Copy this module next to processor files whose `auto_map` names it (trust_remote_code imports it)."""
    target = os.path.join(folder, "processing_bard_vl.py")
    if os.path.abspath(__file__) != os.path.abspath(target):
        shutil.copyfile(__file__, target)


def mark_processor_files(folder: str | os.PathLike) -> list[str]:
    """Point a checkpoint folder's processor files at `BardVLProcessor`, in place.

    A stock Qwen3-VL folder names `Qwen3VLProcessor` in `preprocessor_config.json` and
    `video_preprocessor_config.json` (and in `processor_config.json` when there is one), which `AutoProcessor` cannot
    build without torchvision. This sets `processor_class` to `BardVLProcessor` in each of these files that exists,
    adds `auto_map` {"AutoProcessor": "processing_bard_vl.BardVLProcessor"} to them and copies this module into the
    folder, so `AutoProcessor.from_pretrained(folder)` gives a `BardVLProcessor` with the package imported (once it is
    registered) and with `trust_remote_code=True` without it. All other keys are kept; the Hub layout stays.

    Returns:
        The names of the files rewritten.

    Raises:
        FileNotFoundError: the folder has neither `processor_config.json` nor `preprocessor_config.json`.
    """
    present = [name for name in _PROCESSOR_FILES if os.path.isfile(os.path.join(folder, name))]
    if not {"processor_config.json", "preprocessor_config.json"} & set(present):
        raise FileNotFoundError(
            f"`folder`={str(folder)!r} has no processor_config.json or preprocessor_config.json to mark; pass a "
            "Qwen3-VL checkpoint folder (Hub layout)."
        )
    # Read everything before writing anything, so a malformed file leaves the folder unchanged.
    contents = {}
    for name in present:
        with open(os.path.join(folder, name), encoding="utf-8") as handle:
            contents[name] = json.load(handle)
    for name, content in contents.items():
        content["processor_class"] = BardVLProcessor.__name__
        content["auto_map"] = {**(content.get("auto_map") or {}), **AUTO_MAP}
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(json.dumps(content, indent=2, sort_keys=True) + "\n")
    _copy_this_file(folder)
    return present
