"""The `transformers-bard` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="Convert an autoregressive Qwen3-VL checkpoint into a BARD-VL checkpoint.")
    p.add_argument("source", help="Qwen3-VL checkpoint directory (Hub layout) or Hub id.")
    p.add_argument("output", help="Output directory for the BARD-VL checkpoint.")
    p.add_argument("--block-size", type=int, default=4, help="Block size B written to the config (default 4).")
    p.add_argument(
        "--prompt-attention", choices=["block_causal", "causal"], default="block_causal",
        help="How prompt tokens attend to each other (DESIGN 3.2). 'causal' is the one vLLM can serve (it prefills "
        "causally; docs/serving/engines.md): convert, then train, with it to serve through vLLM. Measured cost on the "
        "demo tasks (--ablations causal_prompt): no consistent difference (-2.5 and +0.2 points on digits over two "
        "seeds, +2.0 on the choice task). Default block_causal, the paper's mask; `transformers-bard serve` serves "
        "both.",
    )
    p.add_argument(
        "--prediction-shift", action=argparse.BooleanOptionalAction, default=None,
        help="Shifted prediction (DESIGN 4.1): the hidden state at i predicts token i + 1, as in the AR source. "
        "Default: off (the paper), or a BARD-VL source's own setting.",
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="Replace an earlier conversion's output in OUTPUT (a folder holding any other file is refused; the "
        "source, a folder holding it and the current folder never are).",
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from .conversion import convert_from_autoregressive

    out = convert_from_autoregressive(
        args.source, args.output, block_size=args.block_size, prompt_attention=args.prompt_attention,
        prediction_shift=args.prediction_shift, overwrite=args.overwrite,
    )
    print(f"BARD-VL checkpoint written to {out}")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="Generate with a BARD-VL checkpoint (block-diffusion decoding).")
    p.add_argument("model", help="BARD-VL checkpoint directory or Hub id.")
    p.add_argument("--prompt", required=True, help="User text.")
    p.add_argument("--image", action="append", default=[], help="Image file (repeatable).")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=None, help="Default: the model's.")
    p.add_argument("--threshold", type=float, default=None, help="Confidence threshold tau (default 0.9).")
    p.add_argument("--unmasking", choices=["threshold", "static"], default=None)
    p.add_argument(
        "--unmask-order", choices=["left_to_right", "confidence"], default=None,
        help="Which masked positions fill a step's minimum: the leftmost (default) or the most confident.",
    )
    p.add_argument("--steps-per-block", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--stream", action="store_true", help="Print finished blocks as they are decoded.")
    p.add_argument(
        "--verifier", default=None, metavar="PATH",
        help="Verified decoding (DESIGN 4.2 a): the AR Qwen3-VL checkpoint at PATH (the source this model was "
        "converted from) checks every drafted block, so the answer is exactly its greedy answer. Greedy only; both "
        "models are loaded.",
    )
    p.add_argument("--draft-threshold", type=float, default=None,
                   help="With --verifier: the drafts' confidence threshold (default: the generation config's).")
    p.add_argument(
        "--show-steps", action="store_true",
        help="Replay the denoising trace: one line per forward, masks as _, new tokens highlighted, then a summary.",
    )
    p.add_argument(
        "--compare-ar", default=None, metavar="PATH",
        help="With --show-steps: also time the AR source at PATH on the same prompt (default: the checkpoint's "
        "source_model when it is a local folder).",
    )
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, TextStreamer

    import transformers_bard  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    images = [Image.open(path).convert("RGB") for path in args.image]
    # the images travel inside the message (the chat template's own way), not as a processor keyword
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": args.prompt}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    options = {
        key: value
        for key, value in dict(
            block_size=args.block_size, threshold=args.threshold, unmasking=args.unmasking,
            unmask_order=args.unmask_order, steps_per_block=args.steps_per_block, temperature=args.temperature,
            draft_threshold=args.draft_threshold,
        ).items()
        if value is not None
    }
    if args.verifier:
        from .models.bard_vl.verification_bard_vl import load_verifier

        options["verifier"] = load_verifier(args.verifier)
    if args.show_steps or args.compare_ar:
        from .app.terminal import run_show_steps

        return run_show_steps(model, processor, inputs, options, args.max_new_tokens, compare_ar=args.compare_ar)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    out = model.generate(
        **inputs, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True, streamer=streamer, **options
    )
    if not args.stream:
        text = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        print(text)
    print(f"[tokens per forward: {float(out.tokens_per_forward[0]):.2f}]", file=sys.stderr)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="The whole BARD pipeline on the built-in digits task: convert, PBM, SWD, evaluate, judge the paper's "
        "claims (offline, CPU).",
    )
    p.add_argument("--output-dir", default="demo_output", help="Where checkpoints and results are written.")
    p.add_argument(
        "--task", choices=("digits", "choice"), default="digits",
        help="digits (default): read digits off a grid; choice: the harder task, read a row/column of the model's "
        "choice and name it (the answer's tokens depend on each other).",
    )
    p.add_argument("--quick", action="store_true", help="A few-minute run with fewer steps and test samples.")
    p.add_argument(
        "--ablations", default="",
        help="Comma-separated ablations to add (direct, ar_teacher, mix, shift, sample_norm, wide_mask_rates, "
        "kd_eos_padding), or 'all' (those seven); also causal_prompt (PBM + SWD with a causal prompt, the mask vLLM "
        "can serve; not in 'all').",
    )
    p.add_argument(
        "--shift-eval-every", type=int, default=None,
        help="Ablation shift: evaluate the B = 4 stage of both settings every this many steps (default 100).",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the data sampling, the noise and the trainers.")
    p.add_argument(
        "--source", default=None,
        help="AR source checkpoint to convert (a stock Qwen3-VL folder; default: the task's shipped model).",
    )
    p.add_argument(
        "--noise-prior", choices=("mask", "mix"), default="mask",
        help="Noise prior of every trained model: mask (default, the paper's main runs) or mix (mixed noise; decoded "
        "with revision). The mix ablation needs mask.",
    )
    p.add_argument(
        "--prompt-attention", choices=("block_causal", "causal"), default=None,
        help="Prompt mask of the conversion: block_causal (default, the paper's) or causal (every model of the run "
        "can then be served by vLLM).",
    )
    p.add_argument("--train-samples", type=int, default=None, help="Training rows of the digits task.")
    p.add_argument("--eval-samples", type=int, default=None, help="Test rows (equal per question type).")
    p.add_argument(
        "--pbm-steps", default=None,
        help="Optimizer steps per PBM stage: one value, or one per block size (default 500,100,450,450 on digits, "
        "500,200,900,900 on choice).",
    )
    p.add_argument("--swd-steps", type=int, default=None, help="Optimizer steps per distilled student.")
    p.add_argument("--swd-mask-rates", default=None, help="SWD mask-rate clamp as low,high (default 0.1,0.5).")
    p.add_argument(
        "--pbm-mask-rates", default=None,
        help="PBM mask-rate clamp as low,high (default 0.001,1.0 on digits, 0.1,1.0 on choice).",
    )
    p.add_argument(
        "--swd-kd-eos-padding", choices=("on", "off"), default=None,
        help="SWD's KD term at the EOS padding past the real end: on (DESIGN 3.6) or off (CE only there).",
    )
    p.add_argument(
        "--swd-loss-normalization", choices=("token", "sample"), default=None,
        help="SWD loss averaged over the step's masked tokens (default) or per sample, then over its samples.",
    )
    p.add_argument(
        "--question-weights", default=None, help="Training mix, e.g. position:3,column:2,read:1,read_twice:1."
    )
    p.add_argument("--thresholds", default=None, help="Comma-separated confidence thresholds, e.g. 0.9,0.7,0.5.")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for training (decoding uses 1).")
    p.add_argument(
        "--training-processes", type=int, default=None,
        help="Run independent trainings in this many processes side by side, each with threads / N torch threads "
        "(default: --threads processes when --ablations are asked for, else 1).",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo.pipeline import ABLATIONS, PipelineConfig, run_pipeline

    if args.ablations == "all":  # under --noise-prior mix every model is mixed: the prior comparison `mix` drops out
        ablations = tuple(a for a in ABLATIONS if a != "mix" or args.noise_prior == "mask")
    else:
        ablations = tuple(a for a in args.ablations.split(",") if a)
    overrides = dict(output_dir=args.output_dir, task=args.task, ablations=ablations, threads=args.threads,
                     seed=args.seed, noise_prior=args.noise_prior)
    for name in ("train_samples", "eval_samples", "swd_steps", "shift_eval_every", "swd_loss_normalization",
                 "source", "prompt_attention", "training_processes"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.pbm_steps:
        steps = tuple(int(s) for s in args.pbm_steps.split(","))
        overrides["pbm_steps"] = steps[0] if len(steps) == 1 else steps
    if args.swd_kd_eos_padding:
        overrides["swd_kd_on_eos_padding"] = args.swd_kd_eos_padding == "on"
    for name in ("swd_mask_rates", "pbm_mask_rates"):
        if getattr(args, name):
            overrides[name] = tuple(float(r) for r in getattr(args, name).split(","))
    if args.question_weights:
        pairs = (pair.split(":") for pair in args.question_weights.split(","))
        overrides["question_weights"] = {name: float(weight) for name, weight in pairs}
    if args.thresholds:
        overrides["thresholds"] = tuple(float(t) for t in args.thresholds.split(","))
        if PipelineConfig.claim_threshold not in overrides["thresholds"]:
            overrides["claim_threshold"] = overrides["thresholds"][0]
    config = PipelineConfig.quick(**overrides) if args.quick else PipelineConfig(**overrides)
    run_pipeline(config)
    return 0


def _add_walkthrough(sub) -> None:
    p = sub.add_parser(
        "walkthrough", help="Seconds-long tour: convert the shipped digits AR model, reload (also remote code), generate."
    )
    p.add_argument("--output-dir", default="walkthrough_output")
    p.add_argument("--block-size", type=int, default=4)
    p.set_defaults(func=_run_walkthrough)


def _run_walkthrough(args) -> int:
    from .demo.walkthrough import run_walkthrough

    run_walkthrough(Path(args.output_dir), block_size=args.block_size)
    return 0


def _add_training(sub) -> None:
    for name, help_text in [
        ("block-merge", "Progressive block merging (BlockMergeTrainer); flags as examples/scripts/block_merge.py."),
        ("distill", "Stage-wise distillation (DiffusionDistillTrainer); flags as examples/scripts/diffusion_distill.py."),
    ]:
        # every other argument (--config recipe.yaml, config fields) goes to TRL's parser
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(func=_run_training, passes_through=True)


def _run_training(args) -> int:
    from .trainer import scripts

    run = scripts.run_block_merge if args.command == "block-merge" else scripts.run_diffusion_distill
    run(args.trainer_args or ["--help"])
    return 0


def _add_app(sub) -> None:
    p = sub.add_parser(
        "app", help="Gradio app: BARD decoding block by block, animated from its trace, raced against AR (extra `app`)."
    )
    p.add_argument("model", nargs="?", default=None,
                   help="BARD-VL checkpoint folder. Default: demo_output/pbm/stage-b* if present, else the shipped "
                   "digits AR source converted on the fly (cached).")
    p.add_argument("--ar-source", default=None, help="AR Qwen3-VL folder to race (default: the model's source_model).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--cache-dir", default=None, help="Where the on-the-fly conversion is cached.")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both decoders (default 1).")
    p.add_argument("--replay-seconds", type=float, default=3.0,
                   help="How long the page's replay of the race lasts (the slower decoder's time, scaled).")
    p.set_defaults(func=_run_app)


def _run_app(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        print("transformers-bard app: error: the app needs gradio: pip install 'transformers-bard[app]'", file=sys.stderr)
        return 2
    from .app.gradio_app import launch

    launch(args.model, ar_source=args.ar_source, host=args.host, port=args.port, cache_dir=args.cache_dir,
           threads=args.threads, replay_seconds=args.replay_seconds)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="Evaluate with lmms-eval (extra `lmms`): bard_vl or its AR source; the digits task works offline. Other "
        "arguments go to lmms-eval (--batch_size, --output_path, --log_samples, --limit, ...).",
    )
    p.add_argument("model", help="BARD-VL checkpoint folder or Hub id.")
    p.add_argument("--tasks", default="bard_digits", help="lmms-eval tasks (default: the digits group bard_digits).")
    p.add_argument("--ar", action="store_true", help="Evaluate the checkpoint's AR source (model bard_vl_ar).")
    p.add_argument("--model-args", default="", help="More lmms-eval model_args, e.g. threshold=0.7,device=cpu.")
    p.set_defaults(func=_run_eval, passes_through=True)


def _run_eval(args) -> int:
    import importlib.util
    import shlex
    import subprocess

    if importlib.util.find_spec("lmms_eval") is None:
        print("transformers-bard eval: error: needs lmms-eval: pip install 'transformers-bard[lmms]'", file=sys.stderr)
        return 2
    from .integrations.lmms_eval import lmms_eval_command

    command = lmms_eval_command(args.model, args.tasks, args.ar, args.model_args, args.trainer_args, sys.executable)
    print("$ " + shlex.join(command), file=sys.stderr)
    return subprocess.call(command)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server (/v1/chat/completions, /v1/models) with continuous batching of block-diffusion "
        "decoding (extra `serve`).",
    )
    p.add_argument("model", help="BARD-VL checkpoint folder or Hub id.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="The `model` name clients must send (default: the checkpoint argument as given).")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="Rows decoded together at most; later requests wait for a free row (default 32).")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="Longest prompt + completion accepted (default: the model's max_position_embeddings).")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--autoregressive", action="store_true",
                   help="Serve a stock (AR) Qwen3-VL checkpoint with one `generate` at a time, as a baseline.")
    p.add_argument("--verifier", default=None, metavar="PATH",
                   help="Verified decoding (DESIGN 4.2 a): the AR Qwen3-VL checkpoint at PATH checks every drafted "
                   "block, so every answer is its greedy answer; one request at a time, greedy only.")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning).")
    p.add_argument("--access-log", action="store_true", help="Log one line per request (off by default).")
    p.add_argument("--api-key", default=None,
                   help="Require `Authorization: Bearer KEY` on every /v1 route (default: the environment variable "
                   "TRANSFORMERS_BARD_API_KEY, else none; serving beyond 127.0.0.1 without a key logs a warning).")
    p.add_argument("--shutdown-grace", type=float, default=20.0,
                   help="Seconds requests in flight may take to finish after SIGTERM before they are cancelled and "
                   "the server exits (default 20).")
    # the limits of what a request may cost (issue 39): flags, defaults and help from ServeLimits
    from .serving.limits import ServeLimits

    for f in dataclasses.fields(ServeLimits):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "image_formats":
            p.add_argument(flag, nargs="+", type=str.upper, default=list(f.default), help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        print("transformers-bard serve: error: needs fastapi and uvicorn: pip install 'transformers-bard[serve]'",
              file=sys.stderr)
        return 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from .serving import ServeLimits, run_server

    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeLimits)})
    run_server(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
               max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
               autoregressive=args.autoregressive, log_level=args.log_level, verifier=args.verifier, limits=limits,
               api_key=args.api_key, shutdown_grace=args.shutdown_grace, access_log=args.access_log)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformers-bard",
        description="BARD: block-diffusion vision-language models from autoregressive Qwen3-VL checkpoints.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"transformers-bard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_generate(sub)
    _add_training(sub)
    _add_demo(sub)
    _add_walkthrough(sub)
    _add_app(sub)
    _add_eval(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passes_through", False):
        args.trainer_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"transformers-bard {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
