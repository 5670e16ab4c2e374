"""Replay and render the denoising trace of BARD `generate` (issue 14, DESIGN 4).

`generate(..., return_dict_in_generate=True, output_trace=True)` returns per row a list of events, one per forward
(see `BardVLGenerationOutput.trace`): the block and step it worked on, the positions it unmasked (with their tokens
and confidences), the tokens it revised, the positions EOS fill wrote, and the block's tokens afterwards. This module
turns one row's events into `TraceFrame`s (the whole response as it stood after each forward) and renders them:

- `frame_segments` cuts a frame into (text, role) pieces, the one description every view draws from;
- `render_frame_line` writes one terminal line per forward, with rich styles, plain ANSI codes, or plain text;
- `frame_html` writes the same frame as HTML with confidence as colour (the Gradio app);
- `summary_lines` gives the closing numbers (forwards, tokens per forward, wall time, the AR time when known).

Nothing here imports torch, transformers or gradio.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ROLES",
    "TraceFrame",
    "frame_html",
    "frame_segments",
    "render_frame_line",
    "replay_trace",
    "summary_lines",
    "token_texts",
]

EVENT_KINDS = ("prefill", "denoise", "commit", "verifier_prefill", "verify")  # the last two: verified decoding
_REQUIRED_KEYS = ("forward", "kind", "block", "step", "block_start", "unmasked", "block_tokens")

# Roles of a rendered token: still masked, decided in an earlier forward, decided by this forward's confidence
# unmasking, replaced by revision in this forward, or written by EOS fill in this forward.
ROLES = ("mask", "old", "new", "revised", "eos_fill")
MASK_GLYPH = "_"

_RICH_STYLES = {"mask": "dim", "old": "", "new": "bold black on green", "revised": "bold black on yellow",
                "eos_fill": "black on cyan", "label": "dim", "context": "dim"}
_ANSI_CODES = {"mask": "2", "old": "", "new": "1;30;42", "revised": "1;30;43", "eos_fill": "30;46", "label": "2",
               "context": "2"}
# plain text has no colour: new and revised tokens are bracketed so the newly decided ones still stand out
_PLAIN_MARKS = {"new": ("[", "]"), "revised": ("{", "}"), "eos_fill": ("[", "]")}


@dataclass
class TraceFrame:
    """The response after one forward of one row.

    `tokens[i]` is the token at response position i, or None while it is masked; it covers every block seen so far
    (the current block included). `new`, `revised` and `eos_filled` are response positions changed by this forward;
    `confidence` maps every decided position to the confidence it was last decided with (EOS-filled positions have
    none).
    """

    forward: int
    kind: str
    block: int
    step: int
    block_start: int
    block_size: int
    tokens: list[int | None]
    new: dict[int, float] = field(default_factory=dict)
    revised: dict[int, tuple[int, int, float]] = field(default_factory=dict)  # pos -> (old id, new id, confidence)
    eos_filled: list[int] = field(default_factory=list)
    confidence: dict[int, float] = field(default_factory=dict)

    @property
    def num_decided(self) -> int:
        return sum(token is not None for token in self.tokens)

    @property
    def num_changed(self) -> int:
        return len(self.new) + len(self.revised) + len(self.eos_filled)


def _check_event(index: int, event) -> None:
    if not isinstance(event, dict):
        raise ValueError(f"`trace` event {index} must be a dict (see `BardVLGenerationOutput.trace`), got "
                         f"{type(event).__name__}.")
    missing = [key for key in _REQUIRED_KEYS if key not in event]
    if missing:
        raise ValueError(f"`trace` event {index} lacks {missing}; pass one row of `generate(..., output_trace=True)`"
                         f".trace, e.g. `out.trace[0]`.")
    if event["kind"] not in EVENT_KINDS:
        raise ValueError(f"`trace` event {index} has kind {event['kind']!r}; expected one of {EVENT_KINDS}.")


def replay_trace(events: Sequence[dict], mask_token_id: int) -> list[TraceFrame]:
    """Replay one row's trace (`out.trace[row]`) into one `TraceFrame` per event.

    The block's token list of each event is the state after that forward; its `unmasked`, `revised` and `eos_filled`
    lists say which positions this forward changed. An event whose `block_tokens` is empty (a prefill that decided
    nothing) keeps the previous state.
    """
    if isinstance(events, dict) or not isinstance(events, Sequence):
        raise ValueError(f"`events` must be the list of one row's trace events (`out.trace[0]`), got "
                         f"{type(events).__name__}.")
    tokens: list[int | None] = []
    confidence: dict[int, float] = {}
    frames = []
    for index, event in enumerate(events):
        _check_event(index, event)
        start, block_tokens = int(event["block_start"]), [int(t) for t in event["block_tokens"] or []]
        if len(tokens) < start + len(block_tokens):
            tokens.extend([None] * (start + len(block_tokens) - len(tokens)))
        for offset, token in enumerate(block_tokens):
            tokens[start + offset] = None if token == mask_token_id else token
        new = {start + int(pos): float(conf) for pos, _token, conf in event.get("unmasked") or []}
        revised = {
            start + int(pos): (int(old), int(new_id), float(conf)) for pos, old, new_id, conf in event.get("revised") or []
        }
        eos_filled = sorted(start + int(pos) for pos in event.get("eos_filled") or [])
        confidence.update(new)
        confidence.update({pos: conf for pos, (_, _, conf) in revised.items()})
        for pos in eos_filled:
            confidence.pop(pos, None)
        frames.append(
            TraceFrame(
                forward=int(event["forward"]), kind=event["kind"], block=int(event["block"]),
                step=int(event["step"]), block_start=start, block_size=len(block_tokens), tokens=list(tokens),
                new=new, revised=revised, eos_filled=eos_filled, confidence=dict(confidence),
            )
        )
    return frames


def token_texts(tokenizer, eos_token_ids: Sequence[int] = (), visible_spaces: bool = False) -> Callable[[int], str]:
    """A function token id -> display text: the decoded token, `∎` for EOS, other special tokens by name; line
    breaks and tabs as visible glyphs so a frame stays on one line. `visible_spaces` shows a token made only of
    spaces as `·` per space (a terminal has no background to tell it from nothing)."""
    eos = set(int(t) for t in eos_token_ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            if token_id in eos:
                cache[token_id] = "∎"
            elif token_id in special:
                cache[token_id] = tokenizer.convert_ids_to_tokens(token_id)
            else:
                shown = tokenizer.decode([token_id]).replace("\n", "⏎").replace("\t", "⇥")
                if visible_spaces and shown and not shown.strip(" "):
                    shown = "·" * len(shown)
                cache[token_id] = shown
        return cache[token_id]

    return text


def frame_segments(frame: TraceFrame, text: Callable[[int], str], context_chars: int = 24) -> list[tuple[str, str]]:
    """One frame as (text, role) pieces: the tail of the earlier blocks (`context`, at most `context_chars`
    characters), then every token of the current block with its role (`ROLES`)."""
    start, end = frame.block_start, frame.block_start + frame.block_size
    pieces: list[tuple[str, str]] = []
    if start > 0 and context_chars > 0:
        before = "".join(MASK_GLYPH if t is None else text(t) for t in frame.tokens[:start])
        tail = before[-context_chars:]
        pieces.append((("…" if len(before) > len(tail) else "") + tail, "context"))
    for pos in range(start, end):
        token = frame.tokens[pos] if pos < len(frame.tokens) else None
        if token is None:
            pieces.append((MASK_GLYPH, "mask"))
        elif pos in frame.revised:
            pieces.append((text(token), "revised"))
        elif pos in frame.eos_filled:
            pieces.append((text(token), "eos_fill"))
        elif pos in frame.new:
            pieces.append((text(token), "new"))
        else:
            pieces.append((text(token), "old"))
    return pieces


def frame_label(frame: TraceFrame) -> str:
    """`fwd   3  block  1 step  0  commit  +2 ~1`: which forward, what it did, how many positions it changed."""
    changed = " ".join(([f"+{len(frame.new)}"] if frame.new else []) + ([f"~{len(frame.revised)}"] if frame.revised
                                                                       else []))
    step = f"{frame.step:>2}" if frame.step >= 0 else " -"
    return f"fwd {frame.forward:>3}  block {frame.block:>2} step {step}  {frame.kind:<7} {changed:<5}"


def render_frame_line(frame: TraceFrame, text: Callable[[int], str], mode: str = "plain", context_chars: int = 24):
    """One terminal line for a frame. `mode`: "plain" (no escape codes; new tokens in [ ], revised in { }), "ansi"
    (SGR escape codes) or "rich" (returns a `rich.text.Text`)."""
    pieces = [(frame_label(frame) + "| ", "label")] + frame_segments(frame, text, context_chars)
    if mode == "rich":
        from rich.text import Text

        line = Text()
        for piece, role in pieces:
            line.append(piece, style=_RICH_STYLES[role] or None)
        return line
    if mode == "ansi":
        return "".join(f"\x1b[{_ANSI_CODES[role]}m{piece}\x1b[0m" if _ANSI_CODES[role] else piece
                       for piece, role in pieces)
    if mode == "plain":
        out = []
        for piece, role in pieces:
            left, right = _PLAIN_MARKS.get(role, ("", ""))
            out.append(f"{left}{piece}{right}")
        return "".join(out)
    raise ValueError(f"`mode` must be 'plain', 'ansi' or 'rich', got {mode!r}.")


def confidence_colour(confidence: float | None) -> str:
    """Background colour of a decided token: red (low confidence) through amber to green (confident)."""
    if confidence is None:
        return "hsl(190, 60%, 80%)"
    hue = round(120 * min(max(float(confidence), 0.0), 1.0))
    return f"hsl({hue}, 75%, 72%)"


def frame_html(frame: TraceFrame | None, text: Callable[[int], str], num_positions: int | None = None) -> str:
    """The whole response of a frame as HTML: decided tokens coloured by confidence (hover shows it), masks as grey
    boxes, this forward's tokens outlined, the current block framed. `num_positions` pads with masks (for an empty
    first frame)."""
    if frame is None:
        return '<div class="bard-tokens"></div>'
    length = max(len(frame.tokens), num_positions or 0)
    start, end = frame.block_start, frame.block_start + frame.block_size
    spans = []
    for pos in range(length):
        token = frame.tokens[pos] if pos < len(frame.tokens) else None
        classes = ["tok"]
        if start <= pos < end:
            classes.append("cur")
        if token is None:
            classes.append("mask")
            spans.append(f'<span class="{" ".join(classes)}">{MASK_GLYPH}</span>')
            continue
        if pos in frame.new or pos in frame.revised or pos in frame.eos_filled:
            classes.append("fresh")
        if pos in frame.revised:
            classes.append("revised")
        conf = frame.confidence.get(pos)
        title = "EOS fill" if conf is None else f"confidence {conf:.2f}"
        shown = html.escape(text(token)).replace(" ", "&nbsp;") or "&nbsp;"
        spans.append(
            f'<span class="{" ".join(classes)}" style="background:{confidence_colour(conf)}" '
            f'title="{title}">{shown}</span>'
        )
    return '<div class="bard-tokens">' + "".join(spans) + "</div>"


def summary_lines(
    num_tokens: int,
    num_forwards: int,
    seconds: float,
    ar_tokens: int | None = None,
    ar_seconds: float | None = None,
) -> list[str]:
    """Closing numbers of a decode: BARD's tokens, forwards, tokens per forward and wall time; with an AR run of the
    same prompt, its tokens and time (one forward per token after the prefill) and the wall-clock ratio."""
    rate = f"{num_tokens / seconds if seconds > 0 else float('nan'):.0f} tokens/s"
    if num_forwards:
        lines = [f"BARD: {num_tokens} tokens in {num_forwards} forwards = {num_tokens / num_forwards:.2f} "
                 f"tokens/forward, {seconds:.3f} s ({rate})"]
    else:  # the whole answer was decided by the prefill step, inside the prompt's own forward (`prefill_step`)
        lines = [f"BARD: {num_tokens} tokens, all decided in the prompt's forward (no further forward), "
                 f"{seconds:.3f} s ({rate})"]
    if ar_tokens is not None and ar_seconds is not None:
        lines.append(f"AR:   {ar_tokens} tokens, one per forward = 1.00 tokens/forward, {ar_seconds:.3f} s "
                     f"({ar_tokens / ar_seconds if ar_seconds > 0 else float('nan'):.0f} tokens/s)")
        if seconds > 0 and ar_seconds > 0:
            lines.append(f"BARD / AR wall time: {seconds / ar_seconds:.2f} (speedup {ar_seconds / seconds:.2f}x)")
    return lines
