"""`transformers-bard generate ... --show-steps`: replay the denoising trace in the terminal (issue 14).

One line per forward: which block and step, what kind of forward, how many positions it decided, then the tail of the
earlier text and the current block with masks as `_` and this forward's tokens highlighted (rich when installed,
plain ANSI otherwise, plain text with [brackets] when the output is not a terminal). Then the answer and a summary:
forwards, tokens per forward, wall time and, when an AR source is given (`--compare-ar`) or recorded in the
checkpoint's `source_model`, the AR time for the same prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .trace_view import render_frame_line, replay_trace, summary_lines, token_texts


def output_mode(stream) -> str:
    """"rich" or "ansi" on a terminal (rich when installed), "plain" otherwise."""
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return "plain"
    try:
        import rich  # noqa: F401
    except ImportError:
        return "ansi"
    return "rich"


def write_frames(frames, text, stream=None, mode: str | None = None) -> None:
    """Write one line per frame to `stream` (stdout by default) in `mode` (default: `output_mode(stream)`)."""
    stream = stream if stream is not None else sys.stdout
    mode = mode or output_mode(stream)
    if mode == "rich":
        from rich.console import Console

        console = Console(file=stream, highlight=False, soft_wrap=True)
        for frame in frames:
            console.print(render_frame_line(frame, text, "rich"))
        return
    for frame in frames:
        print(render_frame_line(frame, text, mode), file=stream)


def run_show_steps(
    model, processor, inputs, options: dict, max_new_tokens: int, compare_ar: str | None = None, stream=None
) -> int:
    """Decode once with the trace, write the replay, the answer and the summary; returns the exit status."""
    from .runner import ar_source_of, decode_ar, decode_bard, eos_token_ids_of

    stream = stream if stream is not None else sys.stdout
    tokenizer = processor.tokenizer
    run = decode_bard(model, tokenizer, inputs, max_new_tokens, **options)
    frames = replay_trace(run.trace, int(model.config.mask_token_id))
    text = token_texts(tokenizer, eos_token_ids_of(model), visible_spaces=True)
    write_frames(frames, text, stream)
    print(f"answer: {run.text}", file=stream)

    ar_path = compare_ar or ar_source_of(getattr(model, "name_or_path", "") or "")
    ar_tokens = ar_seconds = None
    if ar_path is not None:
        if not (Path(ar_path) / "config.json").is_file():
            raise FileNotFoundError(f"`--compare-ar`={str(ar_path)!r} is not a checkpoint folder with a config.json; "
                                    "pass the autoregressive Qwen3-VL source folder.")
        from transformers import Qwen3VLForConditionalGeneration

        ar_model = Qwen3VLForConditionalGeneration.from_pretrained(ar_path).eval()
        ar = decode_ar(ar_model, tokenizer, inputs, max_new_tokens)
        ar_tokens, ar_seconds = len(ar.tokens), ar.seconds
        print(f"AR answer ({ar_path}): {ar.text}", file=stream)
    for line in summary_lines(len(run.tokens), run.num_forwards, run.seconds, ar_tokens, ar_seconds):
        print(line, file=stream)
    return 0
