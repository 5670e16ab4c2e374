"""Packed block-diffusion batches from chat datasets (DESIGN 3.1, 3.3).

`BlockDiffusionCollator` turns rows of a chat dataset in TRL's vision format (a `messages` column and an optional
`images` column) into the packed training layout ``[prefix ; x0 ; xt]`` that
`BardVLForConditionalGeneration.forward(segment_ids=...)` consumes:

- prefix (left-padded to the batch's longest, length P): everything the chat template renders before the response,
  images included (their ``<|image_pad|>`` tokens appear once per sample);
- x0 (right-padded, length R): the response, i.e. the content of the **last** assistant turn plus its ``<|im_end|>``,
  EOS(``<|im_end|>``)-padded to a multiple of the block size B (DESIGN 2);
- xt (right-padded, length R): x0 noised per block by a `MixedNoiseScheduler` (DESIGN 3.3).

The response is found by its tokens (the last ``<|im_start|>assistant\\n`` up to and including the next
``<|im_end|>``), because real Qwen3-VL templates have no ``{% generation %}`` markers (DESIGN 3.1).

Bad rows raise: a row without an assistant turn, with ``P + R_s > max_length`` (prompt plus EOS-padded response; the
packed row is ``P + 2 R_s``), with image placeholders and images that do not match in number, or with a video raises
a `ValueError` naming the row (its dataset index) and the reason. Rows are never skipped or truncated silently:
truncating the prompt would cut image tokens and truncating the response would teach a wrong end. Filter a dataset
beforehand with `example_problem`, using the largest block size of the schedule::

    dataset = dataset.filter(lambda row: collator.example_problem(row, block_size=32) is None)

Noise is drawn per sample from a generator seeded by (seed, block size, epoch, dataset index of the row)
(`sample_noise_seed`): a sample's noise does not depend on which batch, gradient-accumulation micro-batch or rank it
lands in, so 2 processes x batch 2 see exactly the noise of 1 process x batch 4.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl.data_utils import prepare_multimodal_messages

from ..models.bard_vl.configuration_bard_vl import MASK_TOKEN
from ..models.bard_vl.masking_bard_vl import packed_segment_ids
from ..models.bard_vl.processing_bard_vl import assistant_tokens_mask
from ..noise import MixedNoiseScheduler

# Column the trainer adds to the training dataset: the row's index, which seeds its noise and names it in errors.
SAMPLE_INDEX_COLUMN = "bard_sample_index"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# keys of a collated batch that feed the loss, not the model
LOSS_KEYS = ("labels", "rates", "is_eos_padding", "response_lengths", "sample_ids")


def _readable_image(image, position: int):
    """`image` as the processor takes it, or a `BadExampleError` naming it: a PIL image or an array passes, a path,
    URL or base64 string is opened (and decoded, so a damaged file fails here), anything else is refused."""
    import numpy as np
    import PIL.Image
    from transformers.image_utils import load_image

    if isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(str(image))
        except Exception as error:  # missing file, not an image, damaged image: all "cannot be read"
            raise BadExampleError(
                f"its image {position} ({str(image)[:200]!r}) cannot be read as an image ({type(error).__name__}: "
                f"{str(error)[:200]}); give an image file path, URL or PIL image"
            ) from error
    raise BadExampleError(
        f"its image {position} is a {type(image).__name__}, not an image; give PIL images, image file paths or URLs "
        "(a `datasets` column: cast it with `dataset.cast_column('images', Sequence(Image()))`)"
    )


def sample_noise_seed(seed: int, sample_index: int, epoch: int, block_size: int) -> int:
    """Seed of one sample's noise generator: a hash of (seed, block size, epoch, dataset index), below 2**63.

    Hashing (rather than e.g. ``seed + index``) keeps the streams of neighbouring samples, epochs and stages unrelated.
    """
    key = f"bard-noise/{int(seed)}/{int(block_size)}/{int(epoch)}/{int(sample_index)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def ordinary_token_ids(tokenizer, exclude: tuple[int, ...] = ()) -> torch.LongTensor:
    """Ids random substitutes are drawn from (DESIGN 3.3): the tokenizer's ids minus every added/special token.

    Qwen's added tokens (``<|im_end|>``, ``<|image_pad|>``, ``<think>``, ``<|mask|>``, ...) are all in
    `added_tokens_decoder`; what remains is the ordinary byte-level BPE vocabulary. `exclude` removes further ids.
    """
    excluded = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids) | set(exclude)
    ids = [index for index in range(len(tokenizer)) if index not in excluded]
    if not ids:
        raise ValueError("The tokenizer has no ordinary (non-special) token to draw random substitutes from.")
    return torch.tensor(ids, dtype=torch.long)


def add_sample_index(dataset):
    """Add the `bard_sample_index` column (row index) that seeds each sample's noise and names it in errors.

    `Dataset.add_column` adds an in-memory column next to the (memory-mapped) data; an `IterableDataset` gets it
    lazily. Datasets that already have the column keep theirs; a dict of splits gets it per split.
    """
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return type(dataset)({name: add_sample_index(split) for name, split in dataset.items()})
    if SAMPLE_INDEX_COLUMN in (dataset.column_names or []):
        return dataset
    if isinstance(dataset, Dataset):
        return dataset.add_column(SAMPLE_INDEX_COLUMN, list(range(len(dataset))))
    if isinstance(dataset, IterableDataset):
        return dataset.map(lambda _, index: {SAMPLE_INDEX_COLUMN: index}, with_indices=True)
    raise TypeError(f"`train_dataset` must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")


class BadExampleError(ValueError):
    """A dataset row that cannot be trained on; the message names the row and the reason."""


@dataclass
class TokenizedExample:
    """One row split into prefix and response (token lists), with its pixels.

    prefix_ids / prefix_mm_token_type_ids: ``[P_s]`` tokens before the response and their modality (0 text, 1 image).
    response_ids: ``[n_s]`` the last assistant turn's content plus ``<|im_end|>``, not yet EOS-padded.
    pixel_values: ``[patches, C * T * p * p]`` or None; image_grid_thw: ``[images, 3]`` or None.
    """

    prefix_ids: list[int]
    prefix_mm_token_type_ids: list[int]
    response_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


class BlockDiffusionCollator:
    """Collate chat rows into packed, noised block-diffusion batches (DESIGN 3.1, 3.3).

    Args:
        processor: a Qwen3-VL-style processor (e.g. `BardVLProcessor`) with a chat template and a `tokenizer`.
        mask_token_id: id of ``<|mask|>`` (the model's `config.mask_token_id`).
        block_size: B of the current stage; the trainer changes it between stages (`collator.block_size = 8`).
        noise_scheduler: a `MixedNoiseScheduler`; defaults to the paper's (``mask`` prior, rates in [0.001, 1]).
        max_length: bound on ``P + R_s`` (prompt plus EOS-padded response) per row; None for no bound.
        seed: base seed of the per-sample noise generators (`sample_noise_seed`).
        random_token_ids: ``[V']`` ids for random substitutes (``mix``/``uniform`` priors); defaults to
            `ordinary_token_ids(tokenizer)` without the mask token.
        messages_key / images_key: dataset columns. A single image may also come in an ``image`` column.

    Attributes set by the trainer while training: `block_size` (a new data loader per stage), `epoch` (seeds the
    noise) and `progress` (fraction of the stage done, selects the noise prior of a curriculum). `epoch` and
    `progress` live in shared memory, so data-loader worker processes see the updates.

    Returns (from `__call__` on a list of rows with a `bard_sample_index` entry each), for a batch of b rows and
    ``L = P + 2R``:
        input_ids ``[b, L]``, segment_ids ``[b, L]`` (PAD/PREFIX/CLEAN/NOISY), mm_token_type_ids ``[b, L]``,
        pixel_values / image_grid_thw (only when the batch has images), logits_mask ``[b, L]`` (True at corrupted xt
        positions: the loss targets; under `prediction_shift` the model scores each from the hidden state that
        predicts it, DESIGN 4.1, so the batch is the same for both settings), labels ``[b, L]`` (the clean token there, -100 elsewhere), rates ``[b, L]``
        (t of the position's block, 0 outside xt), is_eos_padding ``[b, L]`` (xt positions past the real end),
        response_lengths ``[b]`` (padded R_s) and sample_ids ``[b]`` (dataset indices).

    Example:

    ```python
    >>> from transformers import AutoConfig
    >>> from transformers_bard import BardVLProcessor, BlockDiffusionCollator, MixedNoiseScheduler
    >>> processor = BardVLProcessor.from_pretrained("bard-vl-4b-b4")  # a converted checkpoint
    >>> collator = BlockDiffusionCollator(processor, AutoConfig.from_pretrained("bard-vl-4b-b4").mask_token_id,
    ...                                   block_size=4, noise_scheduler=MixedNoiseScheduler("mix"), max_length=8192)
    >>> row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say the word red."}]},
    ...                     {"role": "assistant", "content": [{"type": "text", "text": "red."}]}],
    ...        "bard_sample_index": 0}  # the trainers add this column; it seeds the row's noise
    >>> batch = collator([row])
    >>> batch["input_ids"].shape == batch["segment_ids"].shape  # [1, P + 2R]: the packed row [prefix ; x0 ; xt]
    True
    ```
    """

    def __init__(
        self,
        processor,
        mask_token_id: int,
        block_size: int = 4,
        noise_scheduler: MixedNoiseScheduler | None = None,
        max_length: int | None = None,
        seed: int = 0,
        random_token_ids: torch.LongTensor | None = None,
        messages_key: str = "messages",
        images_key: str = "images",
    ):
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"`processor` must be a vision-language processor with a `tokenizer` (e.g. BardVLProcessor), got "
                f"{type(processor).__name__}."
            )
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
            raise ValueError(
                f"`mask_token_id` must be a non-negative integer, got {mask_token_id!r}. Use the model's "
                "`config.mask_token_id` (a BARD checkpoint made by `convert_from_autoregressive` has one)."
            )
        # an id with a string in the tokenizer must be the mask token: any other token also occurs in real text, so
        # noised positions and that token would look the same. (An upstream checkpoint's 151671 has no string.)
        mask_string = tokenizer.convert_ids_to_tokens(mask_token_id) if mask_token_id < len(tokenizer) else None
        if mask_string is not None and mask_string not in (MASK_TOKEN, getattr(tokenizer, "mask_token", None)):
            raise ValueError(
                f"`mask_token_id`={mask_token_id} is the token {mask_string!r} in this tokenizer, not the mask token "
                f"{MASK_TOKEN!r}: masked positions would read as {mask_string!r}. The checkpoint's config.json and "
                f"tokenizer disagree: set `mask_token_id` to the id of {MASK_TOKEN!r} in the tokenizer, or convert the "
                "autoregressive checkpoint again (`transformers-bard convert`), which adds the token and the id."
            )
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(f"`max_length` must be None or an integer >= 1, got {max_length!r}.")
        self.processor = processor
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.noise_scheduler = noise_scheduler if noise_scheduler is not None else MixedNoiseScheduler()
        self.max_length = max_length
        self.seed = int(seed)
        self.messages_key = messages_key
        self.images_key = images_key
        # Shared with DataLoader worker processes (inherited at their start): the trainer updates them in the main
        # process while workers, persistent ones included, collate ahead.
        self._epoch = multiprocessing.RawValue("q", 0)
        self._progress = multiprocessing.RawValue("d", 0.0)

        self.end_id = self._token_id(IM_END)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        # `<|im_start|>` + the tokens of `assistant`; the newline after them is skipped by `assistant_tokens_mask`
        self.header_ids = [self._token_id(IM_START)] + tokenizer.encode("assistant", add_special_tokens=False)
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.video_token = getattr(processor, "video_token", "<|video_pad|>")
        if random_token_ids is None:
            random_token_ids = ordinary_token_ids(tokenizer, exclude=(mask_token_id,))
        self.random_token_ids = random_token_ids.long()

    # ------------------------------------------------------------------ settings
    @property
    def block_size(self) -> int:
        return self._block_size

    @block_size.setter
    def block_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`block_size` must be an integer >= 1, got {value!r}.")
        self._block_size = value

    @property
    def epoch(self) -> int:
        """Epoch of the batches being collated; part of every sample's noise seed."""
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = int(value)

    @property
    def progress(self) -> float:
        """Fraction of the stage done, in [0, 1]; selects the noise prior of a curriculum (`switch_at`)."""
        return self._progress.value

    @progress.setter
    def progress(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`progress` must be a fraction of training in [0, 1], got {value!r}.")
        self._progress.value = float(value)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {token} token; the collator needs a Qwen (ChatML) tokenizer.")
        return token_id

    # ------------------------------------------------------------------ one row
    def _images_of(self, example: dict) -> list:
        images = example.get(self.images_key)
        if images is None and "image" in example:
            images = example["image"]
        if images is None:
            return []
        return list(images) if isinstance(images, (list, tuple)) else [images]

    def _messages_of(self, example: dict, images: list) -> list[dict]:
        if self.messages_key not in example:
            raise BadExampleError(
                f"it has no `{self.messages_key}` column (columns: {sorted(example)}); the collator needs chat rows"
            )
        if not isinstance(example[self.messages_key], (list, tuple)) or not example[self.messages_key]:
            raise BadExampleError(
                f"its `{self.messages_key}` is empty or not a list of messages (got {example[self.messages_key]!r})"
            )
        messages = []
        for message in example[self.messages_key]:
            content = message.get("content")
            if isinstance(content, list):
                # Arrow stores content blocks with the union of their keys; a text block with `image: None` would
                # render as an image placeholder, so drop the None-valued keys.
                content = [{key: value for key, value in part.items() if value is not None} for part in content]
            messages.append({**message, "content": content})
        try:
            # TRL's vision format: string contents get one image placeholder per image before the first user text,
            # and every `{"type": "image"}` placeholder gets the next image of the row; blocks that already hold
            # their image keep it.
            return prepare_multimodal_messages(messages, images)
        except ValueError as error:
            raise BadExampleError(str(error).rstrip(".")) from error

    def tokenize(self, example: dict, block_size: int | None = None) -> TokenizedExample:
        """Split one row into prefix and response tokens; raises `BadExampleError` (a ValueError) for a bad row."""
        block_size = self.block_size if block_size is None else block_size
        messages = self._messages_of(example, self._images_of(example))
        # every image of the conversation, in order of appearance (= order of its placeholders in the text)
        images = [
            part["image"]
            for message in messages
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part.get("type") == "image" and part.get("image") is not None
        ]
        images = [_readable_image(image, position) for position, image in enumerate(images)]
        text = self.processor.apply_chat_template(messages, tokenize=False)
        if self.video_token in text:
            raise BadExampleError("it holds a video; BARD training here supports text and images only")
        num_placeholders = text.count(self.image_token)
        if num_placeholders != len(images):
            raise BadExampleError(
                f"its chat renders {num_placeholders} image placeholder(s) but it has {len(images)} image(s); give "
                "one `{'type': 'image'}` block per image"
            )
        processed = self.processor(text=[text], images=images or None, return_tensors="pt")
        input_ids = processed["input_ids"][0].tolist()
        mm_types = processed.get("mm_token_type_ids")
        mm_types = mm_types[0].tolist() if mm_types is not None else [0] * len(input_ids)

        # the last assistant turn = the last run of the assistant mask (DESIGN 3.1)
        mask = assistant_tokens_mask(input_ids, self.header_ids, self.end_id)
        if not any(mask):
            raise BadExampleError("it has no assistant turn to learn from")
        stop = len(mask) - mask[::-1].index(1)  # one past the response's last token
        start = stop
        while start > 0 and mask[start - 1]:
            start -= 1
        response = input_ids[start:stop]
        if response[-1] != self.end_id:
            raise BadExampleError(f"its last assistant turn does not end with {IM_END}")
        padded = math.ceil(len(response) / block_size) * block_size
        if self.max_length is not None and start + padded > self.max_length:
            raise BadExampleError(
                f"prompt ({start} tokens) plus EOS-padded response ({padded} tokens at block size {block_size}) "
                f"exceeds max_length={self.max_length}; raise `max_length` or filter the row"
            )
        return TokenizedExample(
            prefix_ids=input_ids[:start],
            prefix_mm_token_type_ids=mm_types[:start],
            response_ids=response,
            pixel_values=processed.get("pixel_values"),
            image_grid_thw=processed.get("image_grid_thw"),
        )

    def example_problem(self, example: dict, block_size: int | None = None) -> str | None:
        """Why `example` cannot be trained on at `block_size` (default: the current one), or None when it can."""
        try:
            self.tokenize(example, block_size)
        except BadExampleError as error:
            return str(error)
        return None

    def _row_index(self, example: dict, position: int) -> int:
        if SAMPLE_INDEX_COLUMN not in example:
            raise ValueError(
                f"Batch row {position} has no `{SAMPLE_INDEX_COLUMN}` entry: the per-sample noise seed needs each "
                f"row's dataset index. Add it with `dataset.add_column('{SAMPLE_INDEX_COLUMN}', range(len(dataset)))` "
                "(BlockMergeTrainer does this itself)."
            )
        return int(example[SAMPLE_INDEX_COLUMN])

    # ------------------------------------------------------------------ batch
    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Cannot collate an empty list of rows.")
        block_size = self.block_size
        indices = [self._row_index(example, position) for position, example in enumerate(examples)]
        rows = []
        for index, example in zip(indices, examples):
            try:
                rows.append(self.tokenize(example, block_size))
            except BadExampleError as error:
                raise ValueError(
                    f"Row {index} of the training data cannot be trained on: {error}. Fix the row, or drop bad rows "
                    "first: `dataset.filter(lambda row: collator.example_problem(row, block_size=max(block_sizes)) "
                    "is None)`."
                ) from error

        batch = len(rows)
        P = max(len(row.prefix_ids) for row in rows)
        lengths = [math.ceil(len(row.response_ids) / block_size) * block_size for row in rows]  # R_s
        R = max(lengths)

        prefix_ids = torch.full((batch, P), self.pad_id, dtype=torch.long)
        prefix_mm = torch.zeros(batch, P, dtype=torch.long)
        prefix_attention = torch.zeros(batch, P, dtype=torch.long)
        x0 = torch.full((batch, R), self.pad_id, dtype=torch.long)
        xt = torch.full((batch, R), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros(batch, R, dtype=torch.bool)
        corrupted = torch.zeros(batch, R, dtype=torch.bool)
        rates = torch.zeros(batch, R, dtype=torch.float32)
        eos_padding = torch.zeros(batch, R, dtype=torch.bool)
        for i, (row, index, length) in enumerate(zip(rows, indices, lengths)):
            n = len(row.prefix_ids)
            prefix_ids[i, P - n :] = torch.tensor(row.prefix_ids, dtype=torch.long)  # left padding
            prefix_mm[i, P - n :] = torch.tensor(row.prefix_mm_token_type_ids, dtype=torch.long)
            prefix_attention[i, P - n :] = 1
            real = len(row.response_ids)
            clean = torch.tensor(row.response_ids + [self.end_id] * (length - real), dtype=torch.long)  # [R_s]
            # one generator per sample: its noise is independent of the batch it is in (module docstring)
            generator = torch.Generator().manual_seed(sample_noise_seed(self.seed, index, self.epoch, block_size))
            noise = self.noise_scheduler.add_noise(
                clean[None],
                torch.ones(1, length, dtype=torch.bool),
                block_size,
                self.mask_token_id,
                random_token_ids=self.random_token_ids,
                generator=generator,
                progress=self.progress,
            )
            x0[i, :length] = clean
            xt[i, :length] = noise.noisy_input_ids[0]
            response_mask[i, :length] = True
            corrupted[i, :length] = noise.corrupted[0]
            rates[i, :length] = noise.rates[0]
            eos_padding[i, real:length] = True

        segment_ids = packed_segment_ids(prefix_attention, response_mask)  # [b, P + 2R]
        zeros_prefix = torch.zeros(batch, P + R, dtype=torch.bool)
        logits_mask = torch.cat([zeros_prefix, corrupted], dim=1)  # loss only at corrupted xt positions
        labels = torch.full((batch, P + 2 * R), -100, dtype=torch.long)
        labels[:, P + R :] = torch.where(corrupted, x0, torch.full_like(x0, -100))
        output = {
            "input_ids": torch.cat([prefix_ids, x0, xt], dim=1),
            "segment_ids": segment_ids,
            "mm_token_type_ids": torch.cat([prefix_mm, torch.zeros(batch, 2 * R, dtype=torch.long)], dim=1),
            "logits_mask": logits_mask,
            "labels": labels,
            "rates": torch.cat([torch.zeros(batch, P + R), rates], dim=1),
            "is_eos_padding": torch.cat([zeros_prefix, eos_padding], dim=1),
            "response_lengths": torch.tensor(lengths, dtype=torch.long),
            "sample_ids": torch.tensor(indices, dtype=torch.long),
        }
        pixels = [row.pixel_values for row in rows if row.pixel_values is not None]
        if pixels:
            # rows keep their order, and so do their images: get_rope_index walks them in the same order
            output["pixel_values"] = torch.cat(pixels, dim=0)
            output["image_grid_thw"] = torch.cat(
                [row.image_grid_thw for row in rows if row.image_grid_thw is not None]
            )
        return output


__all__ = [
    "BadExampleError",
    "BlockDiffusionCollator",
    "LOSS_KEYS",
    "SAMPLE_INDEX_COLUMN",
    "TokenizedExample",
    "add_sample_index",
    "ordinary_token_ids",
    "sample_noise_seed",
]
