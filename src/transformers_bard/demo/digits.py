"""A built-in visual task on real data: reading grids of handwritten digits.

Each image is a grid of real handwritten digits from the UCI "Optical Recognition of Handwritten Digits" data set
(the 1,797 8 x 8 images that scikit-learn bundles as `load_digits`; E. Alpaydin and C. Kaynak, UCI Machine Learning
Repository, CC BY 4.0, see `UCI_DIGITS_LICENSE.md`). The images ship inside the package as `uci_digits.npz`, so
scikit-learn is not needed at run time; `write_digits_file` regenerates the file from scikit-learn.

Geometry: every digit is upscaled 4x (nearest) to a 32 x 32 cell, which is exactly one merged Qwen3-VL image token
(patch 16, spatial merge 2). So the merger sees the whole digit (its four 16 x 16 patches, each a 4 x 4 block of the
original pixels) and nothing else, and the image token at M-RoPE position (h, w) is the digit at row h, column w. The
default 4 x 4 grid is a 128 x 128 RGB image: 16 image tokens.

Questions (`QUESTION_TYPES`), with answer lengths in tokens of the tiny BPE tokenizer of `transformers_bard.testing`
(one per digit, space, bar and semicolon; `<|im_end|>` not counted) on the default 4 x 4 grid:
- `position`: "What digit is at row 2, column 3?" -> "2" (1 token);
- `column`: "Read column 3." -> "4 2 5 9" (7 tokens: about one row or column);
- `read`: "Read all digits row by row." -> "3 1 4 1 | 5 9 2 6 | 5 3 5 8 | 9 7 9 3" (37 tokens: all digits);
- `read_twice`: "Read all digits row by row, then column by column." -> the `read` answer, " ; ", then the grid read
  column by column in the same format (77 tokens: a B = 32 model decodes it in three blocks or more).
There is no arithmetic: an earlier task asked for counts and row sums, which the 2.5M-parameter AR source did not
learn (33% and 9% exact match), so they carried no signal into the BARD models.

Splits are made by digit image (stratified by label, fixed): a test grid only holds digit images that no training
grid holds. Samples are in TRL's vision format (`messages` + `images`); row i depends only on the split, the seed,
the question weights, `balanced`, the grid shape and i (a longer dataset extends a shorter one).

`load_digits_ar_path()` is a stock Qwen3-VL of 2.5M parameters trained from scratch on this task
(`examples/scripts/train_digits_ar.py`). `evaluate` scores greedy decoding of either kind of model (batched, for
accuracy) and `time_decoding` times several decoders at batch 1, interleaved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "ALL_QUESTION_TYPES",
    "CELL_SIZE",
    "CHOICE_QUESTION_TYPES",
    "DIGITS_FILE",
    "QUESTION_TYPES",
    "TASKS",
    "accepted_answers",
    "SPLITS",
    "build_digits_dataset",
    "digit_indices",
    "evaluate",
    "load_digits_ar_path",
    "load_digits_arrays",
    "make_question",
    "render_grid",
    "score_answer",
    "time_decoding",
    "write_digits_file",
]

_DATA_DIR = Path(__file__).resolve().parent / "data"
DIGITS_FILE = _DATA_DIR / "uci_digits.npz"
_DIGITS_AR_DIR = _DATA_DIR / "digits_ar"
_AR_DIRS = {"digits": _DIGITS_AR_DIR, "choice": _DATA_DIR / "digits_choice_ar"}

SPLITS = ("train", "validation", "test")
# Fractions of every label's images per split (the rest goes to test). Fixed, independent of any dataset seed, so the
# splits never move.
_SPLIT_FRACTIONS = {"train": 0.75, "validation": 0.10}
_SPLIT_SEED = 0

QUESTION_TYPES = ("position", "column", "read", "read_twice")
# The harder task (`--task choice`): the answer names what it chose, so its tokens depend on each other. Reading one
# row is easy; reading *a* row of the model's choice is not for parallel decoding: the row number and the digits
# after it must agree, and each position's marginal mixes the rows.
CHOICE_QUESTION_TYPES = ("any_row", "any_column", "two_rows")
TASKS = {"digits": QUESTION_TYPES, "choice": CHOICE_QUESTION_TYPES}
ALL_QUESTION_TYPES = QUESTION_TYPES + CHOICE_QUESTION_TYPES

# Side of one digit cell in pixels: patch 16 x spatial merge 2, so one digit is one merged image token.
CELL_SIZE = 32
# The UCI pixels count "on" bits in 4 x 4 blocks of a 32 x 32 bitmap: 0..16.
_MAX_INK = 16

# Largest offset (pixels) of a digit inside its cell under `augment=True`: under one original pixel (4).
_MAX_SHIFT = 3

READ_QUESTION = "Read all digits row by row."
READ_TWICE_QUESTION = "Read all digits row by row, then column by column."
ANY_ROW_QUESTION = "Read one row of your choice and say which."
ANY_COLUMN_QUESTION = "Read one column of your choice and say which."
TWO_ROWS_QUESTION = "Read two different rows of your choice and say which."
_ROW_SEPARATOR = " | "
_TWICE_SEPARATOR = " ; "


def write_digits_file(path: str | os.PathLike | None = None) -> Path:
    """Regenerate `uci_digits.npz` from scikit-learn's bundled copy of the UCI digits (needs scikit-learn).

    The file holds `images` (uint8, `[1797, 8, 8]`, values 0..16) and `labels` (uint8, `[1797]`), in scikit-learn's
    order. Defaults to the packaged file.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "`write_digits_file` needs scikit-learn (`pip install scikit-learn`); the packaged `uci_digits.npz` "
            "does not."
        ) from error
    path = Path(path) if path is not None else DIGITS_FILE
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)
    labels = bunch.target.astype(np.uint8)
    if not np.array_equal(images, bunch.images) or images.max() > _MAX_INK:
        raise RuntimeError("scikit-learn's digits are no longer integers in 0..16; the packaged format needs them.")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images, labels=labels)
    return path


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The packaged UCI digits: `images` uint8 `[1797, 8, 8]` (0..16, ink = high) and `labels` uint8 `[1797]`."""
    with np.load(DIGITS_FILE) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")


@lru_cache(maxsize=len(SPLITS))
def _split_indices(split: str) -> tuple[int, ...]:
    _, labels = load_digits_arrays()
    rng = np.random.default_rng(_SPLIT_SEED)
    chosen = []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_train = round(len(members) * _SPLIT_FRACTIONS["train"])
        num_validation = round(len(members) * _SPLIT_FRACTIONS["validation"])
        bounds = {
            "train": (0, num_train),
            "validation": (num_train, num_train + num_validation),
            "test": (num_train + num_validation, len(members)),
        }[split]
        chosen.extend(members[bounds[0] : bounds[1]].tolist())
    return tuple(sorted(chosen))


def digit_indices(split: str) -> np.ndarray:
    """Indices (into `load_digits_arrays()`) of the digit images of a split: 75% / 10% / 15% of every label.

    The three splits are disjoint and cover all 1,797 images; they do not depend on any dataset seed.
    """
    _check_split(split)
    return np.asarray(_split_indices(split), dtype=np.int64)


def render_grid(digit_images: np.ndarray, shifts: np.ndarray | None = None) -> Image.Image:
    """Draw digits `[rows, cols, 8, 8]` (values 0..16) as dark ink on white, one `CELL_SIZE` cell per digit.

    Args:
        digit_images: `[rows, cols, 8, 8]` UCI digit images.
        shifts: optional `[rows, cols, 2]` integer offsets (down, right) in pixels, each in [-8, 8]: every digit is
            moved inside its own cell (ink pushed past the cell's edge is cut, the uncovered strip is white), which is
            the training augmentation of `build_digits_dataset(augment=True)`.

    Returns:
        An RGB `PIL.Image` of `cols * 32` x `rows * 32` pixels.
    """
    digit_images = np.asarray(digit_images)
    if digit_images.ndim != 4 or digit_images.shape[2:] != (8, 8):
        raise ValueError(f"`digit_images` must have shape [rows, cols, 8, 8], got {digit_images.shape}.")
    rows, cols = digit_images.shape[:2]
    scale = CELL_SIZE // 8
    # [rows, cols, 8, 8] -> nearest upscale -> [rows, cols, 32, 32]
    cells = digit_images.astype(np.int64).repeat(scale, axis=2).repeat(scale, axis=3)
    if shifts is not None:
        shifts = np.asarray(shifts)
        if shifts.shape != (rows, cols, 2) or np.abs(shifts).max(initial=0) > CELL_SIZE // 4:
            raise ValueError(f"`shifts` must have shape {(rows, cols, 2)} with values in [-8, 8], got {shifts!r}.")
        padded = np.pad(cells, ((0, 0), (0, 0), (CELL_SIZE, CELL_SIZE), (CELL_SIZE, CELL_SIZE)))
        for row in range(rows):
            for col in range(cols):
                top, left = CELL_SIZE - shifts[row, col, 0], CELL_SIZE - shifts[row, col, 1]
                cells[row, col] = padded[row, col, top : top + CELL_SIZE, left : left + CELL_SIZE]
    # [rows, cols, 32, 32] -> [rows * 32, cols * 32]
    canvas = cells.transpose(0, 2, 1, 3).reshape(rows * CELL_SIZE, cols * CELL_SIZE)
    gray = (255 - (canvas * 255 + _MAX_INK // 2) // _MAX_INK).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")


def _read_rows(digits: np.ndarray) -> str:
    # [rows, cols] -> "3 1 4 1 | 5 9 2 6 | ..."
    return _ROW_SEPARATOR.join(" ".join(str(int(d)) for d in row) for row in digits)


def _named_line(kind: str, index: int, digits) -> str:
    # "row 3 : 5 9 2 6" (index counted from 1)
    return f"{kind} {index} : " + " ".join(str(int(d)) for d in digits)


def accepted_answers(question_type: str, digits: np.ndarray) -> list[str]:
    """Every right answer of a choice question (`CHOICE_QUESTION_TYPES`) about the grid `digits` `[rows, cols]`.

    One per choice: `any_row` accepts "row i : ..." for every row i, `any_column` every column, `two_rows` every
    ordered pair of different rows ("row i : ... | row j : ...").
    """
    digits = np.asarray(digits)
    if question_type == "any_row":
        return [_named_line("row", i + 1, row) for i, row in enumerate(digits)]
    if question_type == "any_column":
        return [_named_line("column", j + 1, col) for j, col in enumerate(digits.T)]
    if question_type == "two_rows":
        return [
            _named_line("row", i + 1, digits[i]) + _ROW_SEPARATOR + _named_line("row", j + 1, digits[j])
            for i in range(len(digits)) for j in range(len(digits)) if i != j
        ]
    raise ValueError(f"`question_type` must be one of {CHOICE_QUESTION_TYPES}, got {question_type!r}.")


def make_question(question_type: str, digits: np.ndarray, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) of `question_type` about a grid of digit labels `[rows, cols]`.

    Rows and columns are counted from 1. The random choice of the cell or column (and, for the choice types, the
    row(s) or column the answer reads, uniformly) comes from `rng`.
    """
    digits = np.asarray(digits)
    rows, cols = digits.shape
    if question_type == "position":
        row, col = int(rng.integers(rows)), int(rng.integers(cols))
        return f"What digit is at row {row + 1}, column {col + 1}?", str(int(digits[row, col]))
    if question_type == "column":
        col = int(rng.integers(cols))
        return f"Read column {col + 1}.", " ".join(str(int(d)) for d in digits[:, col])
    if question_type == "read":
        return READ_QUESTION, _read_rows(digits)
    if question_type == "read_twice":
        # Row-major, then column-major (the transposed grid read row by row).
        return READ_TWICE_QUESTION, _read_rows(digits) + _TWICE_SEPARATOR + _read_rows(digits.T)
    if question_type == "any_row":
        return ANY_ROW_QUESTION, accepted_answers(question_type, digits)[int(rng.integers(rows))]
    if question_type == "any_column":
        return ANY_COLUMN_QUESTION, accepted_answers(question_type, digits)[int(rng.integers(cols))]
    if question_type == "two_rows":
        if rows < 2:
            raise ValueError("`two_rows` needs a grid of at least 2 rows.")
        pairs = accepted_answers(question_type, digits)
        return TWO_ROWS_QUESTION, pairs[int(rng.integers(len(pairs)))]
    raise ValueError(f"`question_type` must be one of {ALL_QUESTION_TYPES}, got {question_type!r}.")


def _question_weights(question_weights) -> tuple[list[str], np.ndarray]:
    """(names, probabilities) from a mapping type -> weight, a sequence of types (uniform), one type, or None (all)."""
    if question_weights is None:
        question_weights = QUESTION_TYPES
    if isinstance(question_weights, str):
        question_weights = (question_weights,)
    if isinstance(question_weights, Mapping):
        names = list(question_weights)
        weights = [question_weights[name] for name in names]
    else:
        names, weights = list(question_weights), [1.0] * len(question_weights)
    unknown = [name for name in names if name not in ALL_QUESTION_TYPES]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"`question_weights` must name distinct types among {ALL_QUESTION_TYPES} (a mapping type -> weight, or a "
            f"sequence of types drawn uniformly), got {question_weights!r}."
        )
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0 for w in weights) or (
        sum(weights) <= 0
    ):
        raise ValueError(
            f"`question_weights` must map to non-negative numbers with a positive sum, got {question_weights!r}; "
            "e.g. {'position': 3, 'column': 2, 'read': 1, 'read_twice': 1}."
        )
    return names, np.asarray(weights, dtype=np.float64) / float(sum(weights))


def build_digits_dataset(
    split: str,
    num_samples: int,
    seed: int = 0,
    question_weights: Mapping[str, float] | Sequence[str] | None = None,
    rows: int = 4,
    cols: int = 4,
    augment: bool = False,
    balanced: bool = False,
):
    """A `datasets.Dataset` of digit-grid questions in TRL's vision format.

    Columns:
    - `messages`: user `[{"type": "image"}, {"type": "text", "text": question}]`, assistant
      `[{"type": "text", "text": answer}]` (the image block's `text` is None, as in Hub vision data sets);
    - `images`: a list with one RGB `PIL.Image` (`cols * 32` x `rows * 32` pixels);
    - `question_type`: one of `QUESTION_TYPES` (the default task) or `CHOICE_QUESTION_TYPES` (`TASKS["choice"]`);
    - `accepted`: every right answer (the reference alone, except for the choice types: one per choice);
    - `digits`: the grid's labels, row by row (`rows * cols` ints);
    - `digit_ids`: the grid's digit images as indices into `load_digits_arrays()`, row by row.

    Args:
        split: "train", "validation" or "test"; a grid only uses that split's digit images (`digit_indices`).
        num_samples: number of rows.
        seed: the same (split, seed) gives the same rows; different splits use independent random streams.
        question_weights: which question types to draw and how often: a mapping type -> weight (e.g.
            `{"position": 3, "column": 2, "read": 1, "read_twice": 1}`: half of the rows ask for one cell), a sequence
            of types drawn uniformly, or None (every type of `QUESTION_TYPES`, uniformly). The choice types
            (`CHOICE_QUESTION_TYPES`) can be named too.
        rows, cols: grid shape, 1..8 each. The default 4 x 4 gives 16 image tokens and 37-token `read` answers.
        augment: move every digit by a random offset of up to 3 pixels each way inside its cell (training
            augmentation; the answers do not change). Off by default: evaluation grids are never shifted.
        balanced: the types take turns instead of being drawn (row i asks type i mod k, in the order given), so every
            type gets the same number of rows (+-1): for test sets. Weights are then ignored; zero weights drop types.
    """
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    _check_split(split)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
            raise ValueError(f"`{name}` must be an integer in [1, 8], got {value!r}.")
    names, weights = _question_weights(question_weights)
    if balanced:
        names = [name for name, weight in zip(names, weights) if weight > 0]

    images, labels = load_digits_arrays()
    pool = digit_indices(split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    # Its own stream, so `augment` changes the pixels only, never which digits and questions are drawn.
    shift_rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    columns = {"messages": [], "images": [], "question_type": [], "accepted": [], "digits": [], "digit_ids": []}
    for index in range(num_samples):
        ids = rng.choice(pool, size=(rows, cols))  # [rows, cols], with replacement
        question_type = names[index % len(names)] if balanced else names[int(rng.choice(len(names), p=weights))]
        question, answer = make_question(question_type, labels[ids], rng)
        columns["messages"].append(
            [
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        )
        shifts = shift_rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, size=(rows, cols, 2)) if augment else None
        columns["images"].append([render_grid(images[ids], shifts)])
        columns["question_type"].append(question_type)
        columns["accepted"].append(
            accepted_answers(question_type, labels[ids]) if question_type in CHOICE_QUESTION_TYPES else [answer]
        )
        columns["digits"].append(labels[ids].reshape(-1).tolist())
        columns["digit_ids"].append(ids.reshape(-1).tolist())
    content = List({"type": Value("string"), "text": Value("string")})
    features = Features(
        {
            "messages": List({"role": Value("string"), "content": content}),
            "images": List(ImageFeature()),
            "question_type": Value("string"),
            "accepted": List(Value("string")),
            "digits": List(Value("int32")),
            "digit_ids": List(Value("int32")),
        }
    )
    return Dataset.from_dict(columns, features=features)


def score_answer(prediction: str, reference: str) -> bool:
    """Exact match after collapsing runs of whitespace and stripping both ends."""
    return " ".join(prediction.split()) == " ".join(reference.split())


def load_digits_ar_path(task: str = "digits") -> Path:
    """Folder of the shipped autoregressive source model of `task` (stock Qwen3-VL, Hub layout).

    "digits": trained from scratch by `examples/scripts/train_digits_ar.py`; "choice": that model taught the choice
    questions by the same script (`--init_from`, see its docstring). Load it with
    `Qwen3VLForConditionalGeneration.from_pretrained` and `BardVLProcessor.from_pretrained`.
    """
    if task not in _AR_DIRS:
        raise ValueError(f"`task` must be one of {tuple(_AR_DIRS)}, got {task!r}.")
    folder = _AR_DIRS[task]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"The {task} AR checkpoint is missing from {str(folder)!r}; reinstall the package or retrain it "
            "with `python examples/scripts/train_digits_ar.py --output_dir <folder>` (its docstring has the command)."
        )
    return folder


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to (without) the last assistant turn, with its image blocks as `{"type": "image"}`."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("Each row's `messages` must end with the assistant turn holding the reference answer.")
    prompt = []
    for message in messages[:-1]:
        content = [
            {"type": "image"} if block["type"] == "image" else {"type": "text", "text": block["text"]}
            for block in message["content"]
        ]
        prompt.append({"role": message["role"], "content": content})
    return prompt


def _generate_kwargs(model, max_new_tokens: int, pad_token_id, extra: Mapping | None) -> dict:
    """Greedy decoding arguments for a stock AR Qwen3-VL or a BARD-VL model (which has `config.block_size`)."""
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, return_dict_in_generate=True)
    if getattr(model.config, "block_size", None) is None:
        # The AR source ships Qwen3-VL-Instruct's sampling settings; unset them so greedy decoding does not warn.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kwargs.update(extra or {})
    return kwargs


def _prepare(processor, rows) -> dict:
    """Left-padded model inputs `[batch, prompt]` for a slice of a digits dataset (a dict of columns)."""
    conversations = [prompt_messages(messages) for messages in rows["messages"]]
    texts = [processor.apply_chat_template(conv, add_generation_prompt=True) for conv in conversations]
    return processor(images=list(rows["images"]), text=texts, padding=True, padding_side="left", return_tensors="pt")


def _answer_tokens(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """The generated tokens up to and including the first EOS (what both decoders are timed and scored on)."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1]
    return tokens


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def evaluate(
    model,
    processor,
    dataset,
    max_new_tokens: int = 96,
    batch_size: int = 16,
    generate_kwargs: Mapping | None = None,
    show_progress: bool = False,
    desc: str = "decode",
) -> dict:
    """Exact match of greedy decoding on a digits dataset: the one evaluation loop for AR and BARD-VL models.

    Calls `model.generate(do_sample=False, return_dict_in_generate=True)` on left-padded batches of prompts
    (everything before the last assistant turn): stock autoregressive decoding for a Qwen3-VL model, block-diffusion
    decoding (DESIGN 4) for a BARD-VL model, whose extra settings (`threshold`, `edit_threshold`, ...) come in
    `generate_kwargs`. Every answer is cut after its first EOS, decoded and compared with the reference
    (`score_answer`), or with each of the row's `accepted` answers where the dataset has that column (a choice
    question is right when it matches any of them). Batched decoding is for accuracy; time with `time_decoding`
    (batch 1).

    Args:
        model: a `Qwen3VLForConditionalGeneration` or `BardVLForConditionalGeneration`, in eval mode.
        processor: its `BardVLProcessor`.
        dataset: rows with `messages`, `images` and `question_type` (as `build_digits_dataset` makes them).
        max_new_tokens: generation budget per row.
        batch_size: rows per `generate` call.
        generate_kwargs: extra `generate` arguments (BARD: `threshold`, `edit_threshold`, ...).
        show_progress: show a tqdm bar titled `desc`.

    Returns:
        `{"accuracy", "per_type": {type: accuracy}, "counts": {type: n}, "num_samples", "correct": [bool per row],
        "predictions": [str per row], "question_types": [str per row], "row_forwards": [int per row],
        "generated_tokens", "num_forwards", "tokens_per_forward", "seconds"}`. Generated tokens count every new token up to and including the first EOS;
        `num_forwards` and `tokens_per_forward` are BARD's (DESIGN 4.5: prefill excluded); an AR model makes one
        forward per token, so both are taken as `generated_tokens` and 1.0.
    """
    import torch
    from tqdm.auto import tqdm

    _check_positive("batch_size", batch_size)
    _check_positive("max_new_tokens", max_new_tokens)
    tokenizer = processor.tokenizer
    eos_ids = _eos_ids(model)
    kwargs = _generate_kwargs(model, max_new_tokens, tokenizer.pad_token_id, generate_kwargs)
    correct, predictions, types, row_forwards = [], [], [], []
    generated, forwards, bard_tokens, seconds = 0, 0, 0, 0.0
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, disable=not show_progress):
        rows = dataset[start : start + batch_size]
        inputs = _prepare(processor, rows)
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, **kwargs)
        seconds += time.perf_counter() - began
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :].tolist()  # [batch, new]
        references = rows.get("accepted") or [[messages[-1]["content"][-1]["text"]] for messages in rows["messages"]]
        counted = getattr(output, "num_forwards", None)
        for row, (tokens, accepted, question_type) in enumerate(zip(new_tokens, references, rows["question_type"])):
            kept = _answer_tokens(tokens, eos_ids)
            row_forwards.append(int(counted[row]) if counted is not None else len(kept))
            generated += len(kept)
            text = tokenizer.decode(kept, skip_special_tokens=True)
            predictions.append(text)
            correct.append(any(score_answer(text, reference) for reference in accepted))
            types.append(question_type)
        if getattr(output, "num_forwards", None) is not None:
            forwards += int(output.num_forwards.sum())
            bard_tokens += int(output.num_generated_tokens.sum())
    per_type, counts = {}, {}
    for question_type in [kind for kind in ALL_QUESTION_TYPES if kind in types]:
        hits = [hit for hit, kind in zip(correct, types) if kind == question_type]
        per_type[question_type], counts[question_type] = sum(hits) / len(hits), len(hits)
    return {
        "accuracy": sum(correct) / max(len(correct), 1),
        "per_type": per_type,
        "counts": counts,
        "num_samples": len(correct),
        "correct": correct,
        "predictions": predictions,
        "question_types": types,
        "row_forwards": row_forwards,
        "generated_tokens": generated,
        "num_forwards": forwards if forwards else generated,
        "tokens_per_forward": bard_tokens / forwards if forwards else 1.0,
        "seconds": seconds,
    }


def time_decoding(decoders: Mapping[str, tuple], processor, dataset, max_new_tokens: int = 96) -> dict[str, dict]:
    """Batch-1 wall-clock throughput of several decoders on the same rows, interleaved.

    For every row in turn, each decoder generates its answer once (batch 1, prefill included), so a change of machine
    load during the measurement hits every decoder alike. Run it with one torch thread for a fair comparison: a tiny
    model decodes fastest on one thread, and AR and BARD get the same.

    Args:
        decoders: name -> `(model, generate_kwargs)`; the kwargs are as in `evaluate` (None for the AR model).
        processor: the shared `BardVLProcessor`.
        dataset: the timing rows (a fixed subset of the test set).

    Returns:
        name -> `{"tokens", "seconds", "tokens_per_second"}`; tokens are counted up to and including the first EOS,
        the same way for every decoder.
    """
    import torch

    _check_positive("max_new_tokens", max_new_tokens)
    if not decoders:
        raise ValueError("`decoders` must name at least one (model, generate_kwargs) pair.")
    pad_id = processor.tokenizer.pad_token_id
    plans = {
        name: (model, _generate_kwargs(model, max_new_tokens, pad_id, extra), _eos_ids(model))
        for name, (model, extra) in decoders.items()
    }
    totals = {name: {"tokens": 0, "seconds": 0.0} for name in decoders}
    for index in range(len(dataset)):
        inputs = _prepare(processor, dataset[index : index + 1])
        for name, (model, kwargs, eos_ids) in plans.items():
            began = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(**inputs, **kwargs)
            totals[name]["seconds"] += time.perf_counter() - began
            totals[name]["tokens"] += len(_answer_tokens(output.sequences[0, inputs["input_ids"].shape[1] :].tolist(), eos_ids))
    for total in totals.values():
        total["tokens_per_second"] = total["tokens"] / total["seconds"] if total["seconds"] > 0 else float("nan")
    return totals
