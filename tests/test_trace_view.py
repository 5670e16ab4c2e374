"""The trace replay and its terminal / HTML rendering (issue 14), on hand-made traces and on real `generate` traces."""

import io
import re

import pytest

from transformers_bard.app.terminal import output_mode, write_frames
from transformers_bard.app.trace_view import (
    confidence_colour,
    frame_html,
    frame_segments,
    render_frame_line,
    replay_trace,
    summary_lines,
    token_texts,
)

MASK = 99
EOS = 98


class CharTokenizer:
    """ids 0..25 -> 'a'..'z', 26 -> ' ', 98 EOS (special), 99 mask (special)."""

    all_special_ids = [EOS, MASK]

    def decode(self, ids):
        return "".join(" " if i == 26 else chr(ord("a") + i) for i in ids)

    def convert_ids_to_tokens(self, token_id):
        return {EOS: "<|im_end|>", MASK: "<|mask|>"}[token_id]


def event(forward, kind, block, step, unmasked=(), revised=(), eos_filled=(), tokens=None, B=4):
    return {"forward": forward, "kind": kind, "block": block, "step": step, "block_start": block * B,
            "unmasked": [list(u) for u in unmasked], "revised": [list(r) for r in revised],
            "eos_filled": list(eos_filled), "block_tokens": tokens if tokens is not None else [MASK] * B}


# B = 4: block 0 decodes "b_a_" then "bcad" (with a revision c -> e in the next step), block 1 "z" + EOS fill.
HAND_TRACE = [
    event(0, "prefill", 0, 0, unmasked=[(0, 1, 0.97), (2, 0, 0.91)], tokens=[1, MASK, 0, MASK]),
    event(1, "denoise", 0, 1, unmasked=[(1, 2, 0.55), (3, 3, 0.62)], tokens=[1, 2, 0, 3]),
    event(2, "denoise", 0, 2, revised=[(1, 2, 4, 0.93)], tokens=[1, 4, 0, 3]),
    event(3, "commit", 1, 0, unmasked=[(0, 25, 0.8), (1, EOS, 0.95)], eos_filled=[2, 3], tokens=[25, EOS, EOS, EOS]),
]


def test_replay_rebuilds_each_state_and_marks_what_changed():
    frames = replay_trace(HAND_TRACE, MASK)
    assert [f.tokens for f in frames] == [
        [1, None, 0, None],
        [1, 2, 0, 3],
        [1, 4, 0, 3],
        [1, 4, 0, 3, 25, EOS, EOS, EOS],
    ]
    assert frames[0].new == {0: 0.97, 2: 0.91}
    assert frames[2].new == {} and frames[2].revised == {1: (2, 4, 0.93)}
    assert frames[3].new == {4: 0.8, 5: 0.95} and frames[3].eos_filled == [6, 7]
    # the confidence of a revised position is the revision's; EOS-filled positions have none
    assert frames[3].confidence == {0: 0.97, 1: 0.93, 2: 0.91, 3: 0.62, 4: 0.8, 5: 0.95}
    assert [f.num_decided for f in frames] == [2, 4, 4, 8]


def test_replay_prefill_without_tokens_keeps_the_state():
    trace = [{**event(0, "prefill", 0, -1), "block_tokens": []}, *HAND_TRACE[1:]]
    frames = replay_trace(trace, MASK)
    assert frames[0].tokens == [] and frames[0].num_changed == 0
    assert frames[1].tokens == [1, 2, 0, 3]


@pytest.mark.parametrize(
    "bad, match",
    [
        ([{"forward": 0}], r"lacks \['kind', 'block'"),
        ([{**HAND_TRACE[0], "kind": "decode"}], "kind 'decode'"),
        ([3], "must be a dict"),
        (HAND_TRACE[0], "list of one row"),
    ],
)
def test_replay_rejects_what_is_not_a_trace(bad, match):
    with pytest.raises(ValueError, match=match):
        replay_trace(bad, MASK)


def test_plain_line_brackets_new_and_revised_tokens():
    text = token_texts(CharTokenizer(), [EOS], visible_spaces=True)
    frames = replay_trace(HAND_TRACE, MASK)
    lines = [render_frame_line(f, text, "plain") for f in frames]
    assert lines[0] == "fwd   0  block  0 step  0  prefill +2   | [b]_[a]_"
    assert lines[1] == "fwd   1  block  0 step  1  denoise +2   | b[c]a[d]"
    assert lines[2] == "fwd   2  block  0 step  2  denoise ~1   | b{e}ad"
    # the earlier block as dim context, then the new block; EOS shows as ∎, EOS fill bracketed too
    assert lines[3] == "fwd   3  block  1 step  0  commit  +2   | bead[z][∎][∎][∎]"
    assert "\x1b" not in "".join(lines)


def test_ansi_and_rich_lines_style_exactly_the_changed_tokens():
    text = token_texts(CharTokenizer(), [EOS])
    frame = replay_trace(HAND_TRACE, MASK)[1]
    ansi = render_frame_line(frame, text, "ansi")
    assert re.sub(r"\x1b\[[0-9;]*m", "", ansi) == "fwd   1  block  0 step  1  denoise +2   | bcad"
    assert ansi.count("\x1b[1;30;42m") == 2  # c and d, the two new tokens
    rich_line = render_frame_line(frame, text, "rich")
    styled = {rich_line.plain[s.start:s.end]: str(s.style) for s in rich_line.spans}
    assert styled["c"] == styled["d"] == "bold black on green"
    assert "b" not in styled and "a" not in styled
    with pytest.raises(ValueError, match="`mode`"):
        render_frame_line(frame, text, "html")


def test_segments_cut_long_context():
    text = token_texts(CharTokenizer(), [EOS])
    frame = replay_trace(HAND_TRACE, MASK)[3]
    assert frame_segments(frame, text, context_chars=2)[0] == ("…ad", "context")
    assert frame_segments(frame, text, context_chars=0)[0] == ("z", "new")


def test_html_colours_by_confidence_and_pads_masks():
    text = token_texts(CharTokenizer(), [EOS])
    frames = replay_trace(HAND_TRACE, MASK)
    page = frame_html(frames[0], text, num_positions=8)
    assert page.count('class="tok cur mask"') == 2 and page.count('class="tok mask"') == 4
    assert f'style="background:{confidence_colour(0.97)}" title="confidence 0.97"' in page
    assert confidence_colour(1.0) == "hsl(120, 75%, 72%)" and confidence_colour(0.0) == "hsl(0, 75%, 72%)"
    revised = frame_html(frames[2], text)
    assert 'class="tok cur fresh revised"' in revised
    assert frame_html(None, text) == '<div class="bard-tokens"></div>'


def test_summary_numbers():
    lines = summary_lines(12, 4, 0.5, ar_tokens=12, ar_seconds=1.0)
    assert lines[0] == "BARD: 12 tokens in 4 forwards = 3.00 tokens/forward, 0.500 s (24 tokens/s)"
    assert lines[1] == "AR:   12 tokens, one per forward = 1.00 tokens/forward, 1.000 s (12 tokens/s)"
    assert lines[2] == "BARD / AR wall time: 0.50 (speedup 2.00x)"
    assert len(summary_lines(12, 4, 0.5)) == 1
    # an answer decided entirely by the prefill step has no further forward: no "nan tokens/forward"
    assert summary_lines(3, 0, 0.25) == ["BARD: 3 tokens, all decided in the prompt's forward (no further forward), "
                                         "0.250 s (12 tokens/s)"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_output_mode_is_plain_off_a_terminal():
    assert output_mode(io.StringIO()) == "plain"
    assert output_mode(_Terminal()) == "rich"  # rich is installed in the test environment
    stream = _Terminal()
    write_frames(replay_trace(HAND_TRACE, MASK), token_texts(CharTokenizer(), [EOS]), stream)
    assert "\x1b[" in stream.getvalue() and len(stream.getvalue().splitlines()) == 4


# ---------------------------------------------------------------------- real traces
def _tiny_inputs(path):
    from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
    from transformers_bard.testing import make_image

    processor = BardVLProcessor.from_pretrained(path)
    content = [{"type": "image"}, {"type": "text", "text": "What color is the star?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor, processor(images=[make_image(0, (32, 32))], text=[text], return_tensors="pt")


@pytest.mark.parametrize("options", [dict(threshold=0.9), dict(threshold=1.0, fuse_commit=False)])
def test_replay_of_a_real_trace_ends_at_the_generated_tokens(tiny_bard_vl_dir, options):
    from transformers_bard import BardVLForConditionalGeneration
    from transformers_bard.app.runner import decode_bard

    model = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir).eval()
    processor, inputs = _tiny_inputs(tiny_bard_vl_dir)
    run = decode_bard(model, processor.tokenizer, inputs, max_new_tokens=12, **options)
    frames = replay_trace(run.trace, model.config.mask_token_id)
    assert len(frames) == run.num_forwards + 1
    final = frames[-1].tokens
    assert None not in final and final[: len(run.tokens)] == run.tokens
    # every decided position was decided by exactly one event (unmasked or EOS fill), revisions aside
    decided = [pos for f in frames for pos in list(f.new) + f.eos_filled]
    assert sorted(decided) == sorted(set(decided))
    assert len(run.frame_times) == len(frames) and run.frame_times == sorted(run.frame_times)
    assert run.frame_times[-1] <= run.seconds


def test_cli_show_steps_prints_one_line_per_forward_and_the_ar_comparison(tiny_bard_vl_dir, tiny_qwen3_vl_dir, capsys):
    from transformers_bard.cli import main

    code = main(["generate", str(tiny_bard_vl_dir), "--prompt", "What color is the star?", "--max-new-tokens", "8",
                 "--show-steps", "--compare-ar", str(tiny_qwen3_vl_dir)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    steps = [line for line in lines if line.startswith("fwd ")]
    summary = next(line for line in lines if line.startswith("BARD: "))
    forwards = int(re.search(r"in (\d+) forwards", summary).group(1))
    assert len(steps) == forwards + 1 and steps[0].startswith("fwd   0")
    assert "\x1b" not in out  # captured output is not a terminal
    assert any(line.startswith("AR:   ") for line in lines) and any("speedup" in line for line in lines)


def test_cli_compare_ar_names_a_missing_folder(tiny_bard_vl_dir, tmp_path, capsys):
    from transformers_bard.cli import main

    code = main(["generate", str(tiny_bard_vl_dir), "--prompt", "hi", "--max-new-tokens", "4", "--show-steps",
                 "--compare-ar", str(tmp_path / "nowhere")])
    assert code == 2
    assert "--compare-ar" in capsys.readouterr().err


def test_cli_verifier_gives_the_ar_answer_and_shows_rejected_drafts(tiny_bard_vl_dir, tiny_qwen3_vl_dir, capsys):
    """`generate --verifier AR`: the printed answer is the AR model's greedy answer (`--compare-ar` prints it); with
    `--show-steps` the verifier's checks are frames of their own (kind `verify`), one line per forward of both
    models after the two prefills. The untrained tiny drafter is rejected often, so some check revises a draft."""
    from transformers_bard.cli import main

    code = main(["generate", str(tiny_bard_vl_dir), "--prompt", "What color is the star?", "--max-new-tokens", "8",
                 "--verifier", str(tiny_qwen3_vl_dir), "--show-steps", "--compare-ar", str(tiny_qwen3_vl_dir)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    answer = next(line for line in lines if line.startswith("answer: "))[len("answer: "):]
    ar_answer = next(line for line in lines if line.startswith("AR answer"))
    assert ar_answer.endswith(": " + answer)
    steps = [line for line in lines if line.startswith("fwd ")]
    forwards = int(re.search(r"in (\d+) forwards", next(line for line in lines if line.startswith("BARD: "))).group(1))
    assert len(steps) == forwards + 2
    assert any("verify" in line for line in steps) and any("verifier_prefill" in line for line in steps)
    assert main(["generate", str(tiny_bard_vl_dir), "--prompt", "hi", "--verifier", str(tiny_bard_vl_dir)]) == 2
    assert "--verifier" in capsys.readouterr().err
