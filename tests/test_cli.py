"""The `transformers-bard` command line: demo and generate (convert is tested in test_conversion.py)."""

import json

import pytest

from transformers_bard.cli import main
from transformers_bard.conversion import convert_from_autoregressive
from transformers_bard.testing import make_image


def test_walkthrough_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "walkthrough"
    assert main(["walkthrough", "--output-dir", str(out), "--block-size", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["remote_code_logits_identical"] is True
    assert summary["block_size"] == 4
    assert summary["tokens_per_forward"] > 0
    printed = capsys.readouterr().out
    assert "converted it to BARD-VL" in printed and "tokens per forward" in printed


def test_generate_command(tiny_qwen3_vl_dir, tmp_path, capsys):
    bard = convert_from_autoregressive(tiny_qwen3_vl_dir, tmp_path / "bard", block_size=4)
    image = tmp_path / "img.png"
    make_image(1, (64, 64)).save(image)
    code = main(["generate", str(bard), "--prompt", "What is this?", "--image", str(image), "--max-new-tokens", "8",
                 "--threshold", "1.0"])
    assert code == 0
    err = capsys.readouterr().err
    # the same decode through the Python API gives the number the command printed
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(bard).eval(), AutoProcessor.from_pretrained(bard)
    content = [{"type": "image", "image": make_image(1, (64, 64))}, {"type": "text", "text": "What is this?"}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**inputs, max_new_tokens=8, threshold=1.0, return_dict_in_generate=True)
    # threshold 1.0 decides one token per forward; block 0's first token rides in the (uncounted) prefill
    assert int(out.num_forwards[0]) == int(out.num_generated_tokens[0]) - 1
    assert f"tokens per forward: {float(out.tokens_per_forward[0]):.2f}" in err


def test_bad_arguments_exit_with_message(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_demo_arguments_reach_the_pipeline(monkeypatch, capsys):
    from transformers_bard.demo import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", seen.append)
    assert main(["demo", "--task", "choice", "--noise-prior", "mix", "--ablations", "all", "--seed", "3"]) == 0
    cfg = seen[-1]
    assert (cfg.task, cfg.noise_prior, cfg.seed) == ("choice", "mix", 3)
    # under mix every model is mixed already: `all` leaves out the prior comparison, and keeps the rest in order
    assert cfg.ablations == tuple(a for a in pipeline.ABLATIONS if a != "mix")
    assert main(["demo", "--ablations", "all"]) == 0
    assert seen[-1].noise_prior == "mask" and seen[-1].ablations == pipeline.ABLATIONS
    assert seen[-1].source is None  # the task's shipped source
    assert main(["demo", "--task", "choice", "--source", "my_ar"]) == 0
    assert seen[-1].source == "my_ar" and seen[-1].prompt_attention == "block_causal"
    assert main(["demo", "--prompt-attention", "causal"]) == 0  # every model servable by vLLM
    assert seen[-1].prompt_attention == "causal"
    assert main(["demo", "--prompt-attention", "causal", "--ablations", "causal_prompt"]) == 2
    assert "Drop `causal_prompt`" in capsys.readouterr().err
    assert main(["demo", "--ablations", "causal_prompt"]) == 0  # a serving ablation, asked for by name
    assert seen[-1].ablations == ("causal_prompt",)
    assert main(["demo", "--noise-prior", "mix", "--ablations", "direct,mix"]) == 2
    assert "Drop `mix` from `ablations`" in capsys.readouterr().err
