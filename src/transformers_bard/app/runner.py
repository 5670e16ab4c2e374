"""Which models the app and `generate --show-steps` use, and one timed decode of each (BARD with its trace, AR).

Model choice (`resolve_models`): an explicit BARD checkpoint, else the newest thing the digits demo can offer: a
trained stage of `transformers-bard demo` (`demo_output/pbm/stage-b{B}`, the largest B) if one is in the working
directory, else the shipped digits AR source converted on the fly into a cache folder (untrained for block diffusion:
its answers show where conversion starts). The AR side is `--ar-source`, else the BARD config's `source_model` when
that is a local checkpoint.

Timing: both decodes run under `torch.inference_mode` with a streamer that stamps every piece of output with
`time.perf_counter()`, so the app can replay both races at their real pace: AR per token, BARD per finished block (the
forwards inside a block are spread evenly between the block's start and end, the trace carries no clock).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "AppModels",
    "ArRun",
    "BardRun",
    "Decoder",
    "ar_source_of",
    "decode_ar",
    "decode_bard",
    "default_cache_dir",
    "find_demo_model",
    "resolve_models",
]


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/transformers_bard/app` (`~/.cache/...` when unset): where the on-the-fly conversion goes."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "transformers_bard" / "app"


def find_demo_model(output_dir: str | os.PathLike = "demo_output") -> Path | None:
    """The largest-B progressive-block-merging stage `transformers-bard demo` wrote under `output_dir`, if any
    (`{output_dir}/pbm/stage-b{B}`, see `transformers_bard.demo.pipeline.run_block_merge`)."""
    stages = []
    for path in Path(output_dir).glob("pbm/stage-b*"):
        match = re.fullmatch(r"stage-b(\d+)", path.name)
        if match and (path / "config.json").is_file():
            stages.append((int(match.group(1)), path))
    return max(stages)[1] if stages else None


def ar_source_of(bard_path: str | os.PathLike) -> Path | None:
    """The AR checkpoint a BARD checkpoint was converted from (`config.source_model`), when it is a local folder."""
    config_file = Path(bard_path) / "config.json"
    if not config_file.is_file():
        return None
    source = json.loads(config_file.read_text()).get("source_model")
    if source and (Path(source) / "config.json").is_file():
        return Path(source)
    return None


@dataclass
class AppModels:
    """The two checkpoints shown, and a sentence saying what they are (printed on the page)."""

    bard_path: Path
    ar_path: Path | None
    description: str
    digits: bool  # the built-in digits task: an image is required and the examples are digit grids


def resolve_models(
    model: str | os.PathLike | None = None,
    ar_source: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    demo_dir: str | os.PathLike = "demo_output",
) -> AppModels:
    """Choose the BARD and AR checkpoints (see the module docstring); converts the digits source when needed."""
    from ..demo.digits import load_digits_ar_path

    digits_ar = load_digits_ar_path()
    if ar_source is not None and not (Path(ar_source) / "config.json").is_file():
        raise FileNotFoundError(f"`--ar-source`={str(ar_source)!r} is not a checkpoint folder with a config.json; "
                                "pass the autoregressive Qwen3-VL folder the BARD model was converted from.")
    if model is not None:
        bard_path = Path(model)
        if not (bard_path / "config.json").is_file():
            raise FileNotFoundError(f"`model`={str(model)!r} is not a checkpoint folder with a config.json; pass a "
                                    "BARD-VL checkpoint folder (e.g. from `transformers-bard convert` or `demo`).")
        description = f"BARD-VL checkpoint {bard_path}"
    elif (demo := find_demo_model(demo_dir)) is not None:
        bard_path = demo
        description = f"the digits demo's progressive-block-merging stage {bard_path} (trained by `transformers-bard demo`)"
    else:
        from ..conversion import convert_from_autoregressive

        bard_path = Path(cache_dir or default_cache_dir()) / "digits-bard-vl-b4"
        if not (bard_path / "config.json").is_file():
            convert_from_autoregressive(digits_ar, bard_path, block_size=4, overwrite=True)
        description = (
            f"the shipped digits AR source converted to BARD-VL (B = 4) at {bard_path}, not trained for block diffusion"
            " yet: run `transformers-bard demo` for trained models (the app then shows `demo_output/pbm/stage-b*`)"
        )
    ar_path = Path(ar_source) if ar_source is not None else ar_source_of(bard_path)
    if ar_path is None and model is None:
        ar_path = digits_ar
    digits = ar_path is not None and ar_path.resolve() == digits_ar.resolve()
    return AppModels(bard_path=bard_path, ar_path=ar_path, description=description, digits=digits)


class _ClockStreamer:
    """A transformers streamer that records (seconds since `start`, tokens so far) at every `put` after the prompt."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stamps: list[tuple[float, int]] = []
        self._prompt_seen = False
        self._count = 0

    def put(self, value):
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            self.prompt_done = time.perf_counter() - self.start
            return
        self._count += int(value.numel())
        self.stamps.append((time.perf_counter() - self.start, self._count))

    def end(self):
        pass


@dataclass
class BardRun:
    tokens: list[int]  # generated tokens up to and including the first EOS
    text: str
    trace: list[dict]  # the row's events, as `generate(output_trace=True)` returned them
    num_forwards: int
    seconds: float
    frame_times: list[float] = field(default_factory=list)  # seconds since the call began, one per trace event

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / self.num_forwards if self.num_forwards else float("nan")


@dataclass
class ArRun:
    tokens: list[int]
    text: str
    seconds: float
    token_times: list[float] = field(default_factory=list)  # seconds since the call began, one per token


def _frame_times(trace: list[dict], prompt_done: float, block_ends: list[float], seconds: float) -> list[float]:
    """One time per event: the prefill at the end of the prompt forward, the forwards of block k spread evenly
    between the end of block k-1 and the end of block k (the streamer stamps finished blocks)."""
    by_block: dict[int, list[int]] = {}
    times = [0.0] * len(trace)
    for index, event in enumerate(trace):
        if event["kind"] in ("prefill", "verifier_prefill") and not event.get("unmasked"):
            times[index] = prompt_done
        else:
            by_block.setdefault(int(event["block"]), []).append(index)
    previous = prompt_done
    for block in sorted(by_block):
        end = block_ends[block] if block < len(block_ends) else seconds
        indices = by_block[block]
        for rank, index in enumerate(indices, start=1):
            times[index] = previous + (end - previous) * rank / len(indices)
        previous = end
    return times


def _cut(tokens: list[int], eos_token_ids) -> list[int]:
    """Tokens up to and including the first EOS."""
    for index, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: index + 1]
    return tokens


def eos_token_ids_of(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None]


def decode_bard(model, tokenizer, inputs, max_new_tokens: int = 64, **options) -> BardRun:
    """One timed BARD `generate` with `output_trace=True` (batch 1); `options` are generation-config fields."""
    import torch

    streamer = _ClockStreamer()
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_trace=True,
            streamer=streamer, **options,
        )
    seconds = time.perf_counter() - streamer.start
    tokens = _cut(out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), eos_token_ids_of(model))
    trace = out.trace[0]
    block_ends = [stamp for stamp, _ in streamer.stamps]
    return BardRun(
        tokens=tokens, text=tokenizer.decode(tokens, skip_special_tokens=True), trace=trace,
        num_forwards=int(out.num_forwards[0]), seconds=seconds,
        frame_times=_frame_times(trace, getattr(streamer, "prompt_done", 0.0), block_ends, seconds),
    )


def decode_ar(model, tokenizer, inputs, max_new_tokens: int = 64) -> ArRun:
    """One timed greedy autoregressive `generate` of a stock Qwen3-VL (its sampling defaults switched off)."""
    import torch

    streamer = _ClockStreamer()
    with torch.inference_mode():
        sequences = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, temperature=None, top_p=None, top_k=None,
            pad_token_id=tokenizer.pad_token_id, streamer=streamer,
        )
    seconds = time.perf_counter() - streamer.start
    tokens = _cut(sequences[0, inputs["input_ids"].shape[1]:].tolist(), eos_token_ids_of(model))
    times = [stamp for stamp, _ in streamer.stamps][: len(tokens)]
    return ArRun(tokens=tokens, text=tokenizer.decode(tokens, skip_special_tokens=True), seconds=seconds,
                 token_times=times)


class Decoder:
    """Loaded BARD (and optionally AR) models with their processor; `run_bard` / `run_ar` decode one prompt."""

    def __init__(self, bard_path: str | os.PathLike, ar_path: str | os.PathLike | None = None, threads: int | None = 1):
        import torch
        from transformers import AutoModel, Qwen3VLForConditionalGeneration

        from ..models.bard_vl.processing_bard_vl import BardVLProcessor

        if threads:
            # a tiny model decodes fastest on one thread, and AR and BARD then get the same machine
            torch.set_num_threads(threads)
        self.bard = AutoModel.from_pretrained(bard_path).eval()
        self.processor = BardVLProcessor.from_pretrained(bard_path)
        self.ar = Qwen3VLForConditionalGeneration.from_pretrained(ar_path).eval() if ar_path is not None else None
        self.eos_token_ids = eos_token_ids_of(self.bard)
        self.mask_token_id = int(self.bard.config.mask_token_id)
        self.block_size = int(self.bard.config.block_size)

    def inputs(self, image, question: str):
        """Processor inputs of one user turn: the image (or none) and the question, with the generation prompt."""
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return self.processor(images=[image] if image is not None else None, text=[text], return_tensors="pt")

    def run_bard(self, inputs, block_size: int | None = None, threshold: float = 0.9, max_new_tokens: int = 64,
                 verify: bool = False):
        options = {} if block_size is None else {"block_size": block_size}
        if verify:  # verified decoding (DESIGN 4.2 a): the AR model checks every draft
            options["verifier"] = self.ar
        return decode_bard(self.bard, self.processor.tokenizer, inputs, max_new_tokens, threshold=threshold, **options)

    def run_ar(self, inputs, max_new_tokens: int = 64) -> ArRun:
        if self.ar is None:
            raise ValueError("No AR model loaded: pass `ar_path` (the CLI's `--ar-source` / `--compare-ar`).")
        return decode_ar(self.ar, self.processor.tokenizer, inputs, max_new_tokens)
