"""`transformers-bard app`: watch BARD decode block by block, raced against the AR model it came from (issue 14).

Pick a digits grid (or upload any image) and a question, choose the block size and the confidence threshold, press
run. Both models decode the prompt once, for real, with a clock on every output (`runner`); the page then replays
both at their measured pace, scaled so the slower one takes `replay_seconds`: BARD's response fills in block by block
from its trace, each token coloured by the confidence it was decided with, while the AR answer appears token by
token. The final numbers (wall times, forwards, tokens per forward) follow, and a slider steps through the trace.

Needs the optional extra `app` (gradio). The CLI imports this module only for `transformers-bard app`; the library
never imports it.
"""

from __future__ import annotations

import bisect
import html
import math
import os
import time
from pathlib import Path

from ..demo.digits import READ_QUESTION as DEFAULT_QUESTION
from .runner import AppModels, Decoder, default_cache_dir, resolve_models
from .trace_view import frame_html, frame_label, replay_trace, token_texts

__all__ = ["CSS", "build_app", "decode_run", "launch", "write_examples"]

BLOCK_SIZES = (1, 2, 4, 8, 16, 32)
FPS = 15

CSS = """
.bard-tokens { font-family: ui-monospace, monospace; font-size: 20px; line-height: 2.1; min-height: 2.4em; }
.bard-tokens .tok { display: inline-block; min-width: 0.75em; padding: 0 3px; margin: 1px; border-radius: 4px;
  text-align: center; white-space: pre; color: #111; border-bottom: 3px solid transparent; }
.bard-tokens .tok.mask { background: #e5e7eb; color: #9ca3af; }
.bard-tokens .tok.cur { border-bottom-color: #2563eb; }
.bard-tokens .tok.fresh { outline: 2px solid #111; }
.bard-tokens .tok.revised { outline: 2px dashed #b45309; }
.bard-tokens .tok.ar { background: #dbeafe; }
.bard-message { padding: 8px 12px; border-radius: 6px; background: #fef2f2; color: #991b1b; font-weight: 600; }
.bard-note { padding: 8px 12px; border-radius: 6px; background: #f0fdf4; color: #166534; }
.bard-stats table { border-collapse: collapse; font-size: 15px; }
.bard-stats td, .bard-stats th { padding: 4px 12px; border-bottom: 1px solid #e5e7eb; text-align: right; }
.bard-stats td:first-child, .bard-stats th:first-child { text-align: left; }
"""


def write_examples(folder: str | Path, num: int = 4) -> list[list[str]]:
    """Render `num` test-split digit grids into `folder` as PNGs; returns Gradio example rows [path, question]."""
    from ..demo.digits import build_digits_dataset

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = build_digits_dataset("test", num, seed=0)
    examples = []
    for index, row in enumerate(rows):
        path = folder / f"digits-test-{index}.png"
        if not path.is_file():
            row["images"][0].save(path)
        # the `read` question makes the longest answers, the ones where blocks show
        question = DEFAULT_QUESTION if index < 2 else row["messages"][0]["content"][-1]["text"]
        examples.append([str(path), question])
    return examples


def _message(text: str, kind: str = "message") -> str:
    return f'<div class="bard-{kind}" id="bard-{kind}">{html.escape(text)}</div>'


def _ar_html(texts: list[str]) -> str:
    spans = "".join(f'<span class="tok ar">{html.escape(t).replace(" ", "&nbsp;") or "&nbsp;"}</span>' for t in texts)
    return f'<div class="bard-tokens">{spans}</div>'


def _stats_html(bard, ar, clock: float | None = None) -> str:
    """The numbers table; `clock` (seconds of the replayed race) is shown while animating, None when final."""
    def row(name, tokens, forwards, seconds, answer_id):
        tpf = tokens / forwards if forwards else math.nan
        return (f'<tr id="{answer_id}"><td>{name}</td><td class="tokens">{tokens}</td><td class="forwards">{forwards}'
                f'</td><td class="tpf">{tpf:.2f}</td><td class="ms">{1000 * seconds:.1f}</td>'
                f'<td class="tps">{tokens / seconds if seconds > 0 else math.nan:.0f}</td></tr>')

    head = ("<tr><th>decoder</th><th>tokens</th><th>forwards</th><th>tokens / forward</th><th>wall time (ms)</th>"
            "<th>tokens / s</th></tr>")
    body = row("BARD", len(bard.tokens), bard.num_forwards, bard.seconds, "stats-bard")
    if ar is not None:
        # AR decodes one token per forward after the prompt
        body += row("AR", len(ar.tokens), len(ar.tokens), ar.seconds, "stats-ar")
    footer = ""
    if clock is not None:
        footer = f"<p>replaying: t = {1000 * clock:.1f} ms of real decoding time</p>"
    elif ar is not None and bard.seconds > 0:
        footer = (f'<p id="speedup">BARD wall time / AR wall time = {bard.seconds / ar.seconds:.2f} '
                  f'(speedup {ar.seconds / bard.seconds:.2f}x); tokens per forward {bard.tokens_per_forward:.2f} vs 1.00'
                  "</p>")
    return f'<div class="bard-stats"><table>{head}{body}</table>{footer}</div>'


def _parse_threshold(value) -> float:
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"The threshold must be a number in (0, 1], got {value!r}.") from None
    if not 0.0 < threshold <= 1.0 or math.isnan(threshold):
        raise ValueError(f"The threshold must be in (0, 1] (e.g. 0.9; 1.0 = one token per step), got {threshold}.")
    return threshold


def _open_image(path):
    from PIL import Image, UnidentifiedImageError

    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        path = path.name  # a tempfile wrapper (older gradio File values)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"Could not read {Path(path).name!r} as an image ({type(error).__name__}); upload a PNG "
                         "or JPEG file.") from None


def decode_run(decoder: Decoder, models: AppModels, image_file, question, block_size, threshold, max_new_tokens,
               replay_seconds: float = 3.0, verify: bool = False):
    """The page's run handler: yields (status, bard html, ar html, stats html, frames state) tuples; a final one with
    the whole result. Bad input yields one message and stops (never raises). `verify`: BARD decodes with the AR
    model as `verifier` (DESIGN 4.2 a), whose checks appear as frames of their own (rejected drafts as revisions)."""
    empty = ('<div class="bard-tokens"></div>',) * 2 + ("", None)
    try:
        threshold = _parse_threshold(threshold)
        image = _open_image(image_file)
        if image is None and models.digits:
            raise ValueError("This model reads digit grids: pick an example grid or upload an image first.")
        question = (question or "").strip()
        if not question:
            raise ValueError("Type a question (e.g. 'Read all digits row by row.').")
        block_size = int(block_size) if block_size not in (None, "") else decoder.block_size
        max_new_tokens = int(max_new_tokens)
        if verify and decoder.ar is None:
            raise ValueError("Verifying needs the AR model: start the app with --ar-source.")
    except (TypeError, ValueError) as error:
        yield (_message(str(error)),) + empty
        return

    inputs = decoder.inputs(image, question)
    bard = decoder.run_bard(inputs, block_size=block_size, threshold=threshold, max_new_tokens=max_new_tokens,
                            verify=verify)
    ar = decoder.run_ar(inputs, max_new_tokens=max_new_tokens) if decoder.ar is not None else None
    text = token_texts(decoder.processor.tokenizer, decoder.eos_token_ids)
    frames = replay_trace(bard.trace, decoder.mask_token_id)
    ar_texts = [text(t) for t in ar.tokens] if ar is not None else []
    width = max((len(f.tokens) for f in frames), default=0)

    total = max(bard.seconds, ar.seconds if ar is not None else 0.0)
    ticks = max(1, round(replay_seconds * FPS)) if replay_seconds > 0 and total > 0 else 0
    running = _message("decoding replayed at its measured pace ...", "note")
    for tick in range(1, ticks + 1):
        clock = total * tick / ticks
        shown = bisect.bisect_right(bard.frame_times, clock) - 1
        bard_view = frame_html(frames[shown] if shown >= 0 else None, text, width)
        ar_view = _ar_html(ar_texts[: bisect.bisect_right(ar.token_times, clock)] if ar is not None else [])
        yield running, bard_view, ar_view, _stats_html(bard, ar, clock), None
        time.sleep(replay_seconds / ticks)

    done = _message(f"BARD answer: {bard.text}" + (f"  |  AR answer: {ar.text}" if ar is not None else ""), "note")
    state = {"frames": frames, "width": width}
    yield done, frame_html(frames[-1] if frames else None, text, width), _ar_html(ar_texts), _stats_html(bard, ar), state


def build_app(decoder: Decoder, models: AppModels, examples: list[list[str]] | None = None,
              replay_seconds: float = 3.0):
    """The Gradio page (a `gr.Blocks`); launch it with `css=CSS`."""
    import gradio as gr

    text = token_texts(decoder.processor.tokenizer, decoder.eos_token_ids)
    ar_line = f"AR model: `{models.ar_path}`" if models.ar_path else "AR model: none (pass `--ar-source`)"
    with gr.Blocks(title="BARD: block diffusion vs autoregressive decoding", analytics_enabled=False) as page:
        gr.Markdown(
            "## BARD: block-diffusion decoding, block by block, against autoregressive decoding\n"
            f"BARD model: {models.description}.  \n{ar_line}.  \n"
            "Tokens are coloured by the confidence they were decided with (red low, green high); grey `_` are still "
            "masked; outlined tokens were decided by the forward shown; the blue underline is the block being denoised."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(label="Image (pick an example below or upload one)", file_types=["image"],
                                     elem_id="image-file")
                preview = gr.Image(label="the image", interactive=False, height=160, elem_id="preview")
                question = gr.Textbox(label="Question", value=DEFAULT_QUESTION, elem_id="question")
                with gr.Row():
                    block_size = gr.Dropdown([str(b) for b in BLOCK_SIZES], value=str(decoder.block_size),
                                             label=f"block size B (trained at {decoder.block_size})",
                                             elem_id="block-size")
                    threshold = gr.Number(value=0.9, label="confidence threshold τ in (0, 1]", elem_id="threshold")
                max_new_tokens = gr.Slider(4, 256, value=64, step=1, label="max new tokens", elem_id="max-new")
                verify = gr.Checkbox(value=False, label="verify with the AR model (its exact answer; rejected drafts "
                                     "shown)", interactive=decoder.ar is not None, elem_id="verify")
                run = gr.Button("Run", variant="primary", elem_id="run")
                if examples:
                    gr.Examples(examples, inputs=[image_file, question], label="digit grids from the test split")
            with gr.Column(scale=2):
                status = gr.HTML(elem_id="status")
                gr.Markdown("**BARD** (block diffusion)")
                bard_view = gr.HTML('<div class="bard-tokens"></div>', elem_id="bard-output")
                gr.Markdown("**AR** (the source model, greedy)")
                ar_view = gr.HTML('<div class="bard-tokens"></div>', elem_id="ar-output")
                stats = gr.HTML(elem_id="stats")
                step = gr.Slider(0, 1, value=0, step=1, label="step through the trace (forward)", visible=False,
                                 elem_id="trace-slider")
                step_label = gr.Markdown(elem_id="step-label")
        frames_state = gr.State(None)

        def show_preview(file):
            try:
                return _open_image(file), ""
            except ValueError as error:
                return None, _message(str(error))

        image_file.change(show_preview, inputs=image_file, outputs=[preview, status])

        def on_run(file, question_text, block, tau, max_new, verified):
            result = None
            for result in decode_run(decoder, models, file, question_text, block, tau, max_new, replay_seconds,
                                     verify=bool(verified)):
                *views, state = result
                yield *views, state, gr.update(visible=False), ""
            *views, state = result
            if state is not None and state["frames"]:
                last = len(state["frames"]) - 1
                label = frame_label(state["frames"][last])
                yield *views, state, gr.update(visible=True, maximum=last, value=last), f"`{label}`"

        run.click(on_run, inputs=[image_file, question, block_size, threshold, max_new_tokens, verify],
                  outputs=[status, bard_view, ar_view, stats, frames_state, step, step_label])

        def on_step(index, state):
            if not state or not state["frames"]:
                return gr.update(), ""
            frame = state["frames"][min(int(index), len(state["frames"]) - 1)]
            return frame_html(frame, text, state["width"]), f"`{frame_label(frame)}`"

        step.change(on_step, inputs=[step, frames_state], outputs=[bard_view, step_label])
    return page


def launch(model=None, ar_source=None, host: str = "127.0.0.1", port: int = 7860, cache_dir=None, threads: int = 1,
           replay_seconds: float = 3.0, block: bool = True):
    """Resolve the models, load them, warm them up, and serve the page (blocking unless `block=False`)."""
    models = resolve_models(model, ar_source, cache_dir)
    decoder = Decoder(models.bard_path, models.ar_path, threads=threads)
    examples_dir = Path(cache_dir or default_cache_dir()) / "examples"
    examples = write_examples(examples_dir) if models.digits else None
    if examples:
        # the first call of each model pays one-time costs; keep them out of the first timed race
        warm = decoder.inputs(_open_image(examples[0][0]), DEFAULT_QUESTION)
        decoder.run_bard(warm, max_new_tokens=decoder.block_size)
        if decoder.ar is not None:
            decoder.run_ar(warm, max_new_tokens=4)
    page = build_app(decoder, models, examples, replay_seconds)
    page.queue()
    return page.launch(server_name=host, server_port=port, css=CSS, prevent_thread_lock=not block,
                       allowed_paths=[str(examples_dir)], ssr_mode=False, quiet=False, show_error=False)
