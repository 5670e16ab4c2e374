"""Train the autoregressive source model of the digits demo from scratch with TRL's SFTTrainer (CPU).

The model is a stock `Qwen3VLForConditionalGeneration` of a few million parameters (the tiny Qwen3-VL architecture of
`transformers_bard.testing`, widened), trained on the digit-grid task of `transformers_bard.demo.digits`. The
conversations are split into prompt (user turn with the image) and completion (assistant answer), so SFTTrainer's
completion-only loss supervises the answer and its `<|im_end|>` only: Qwen3-VL's chat template has no
`{% generation %}` markers, which `assistant_only_loss` would need.

Learning to read a 4 x 4 grid from scratch stalls for hundreds of steps (the model first has to find which image
token holds the next digit), so training follows a curriculum of growing grids: 1 x 1 (learn the digits), 1 x 2,
2 x 2, 2 x 3, 3 x 3, 3 x 4, 4 x 4, one stage every `--curriculum_steps` steps, half of each batch at the current
size and half drawn from the sizes before it. The batches are fed in this order (sequential sampling). Every digit is
shifted by up to 3 pixels inside its cell (augmentation); evaluation grids are unshifted 4 x 4.

The output folder has the Hub layout of `Qwen/Qwen3-VL-*-Instruct` (config, safetensors, tokenizer,
`chat_template.json`, image/video processor configs, generation config) plus `training_info.json` (arguments, wall
time, test-split accuracies with greedy AR decoding).

    python examples/scripts/train_digits_ar.py --output_dir src/transformers_bard/demo/data/digits_ar --overwrite

`--init_from DIR` continues from a trained source instead (no curriculum: every grid is 4 x 4; its tokenizer and
processor files are reused). The choice task's source is the shipped digits model taught the choice questions
(`transformers_bard.demo.digits.CHOICE_QUESTION_TYPES`) with `read` kept in the mix (the command that made it; its
`training_info.json` records it too):

    python examples/scripts/train_digits_ar.py --output_dir src/transformers_bard/demo/data/digits_choice_ar \
        --overwrite --init_from src/transformers_bard/demo/data/digits_ar --max_steps 400 --batch_size 16 \
        --learning_rate 3e-4 --question_weights any_row:2,any_column:2,two_rows:2,read:1 --eval_samples 200
"""

import os

# Sleep instead of spinning at OpenMP barriers: on a shared CPU, spinning threads of a 2-thread torch stall each other
# when another process takes a core (measured: 2x slower steps with one busy neighbour, far worse with more).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import concatenate_datasets
from transformers import GenerationConfig, Qwen3VLForConditionalGeneration
from trl import SFTConfig, SFTTrainer

from transformers_bard.demo.digits import build_digits_dataset, evaluate
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.testing import (
    QWEN3_VL_CHAT_TEMPLATE,
    _image_processor_files,
    build_tiny_tokenizer,
    tiny_qwen3_vl_config,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Checkpoint folder to write (Hub layout).")
    parser.add_argument("--overwrite", action="store_true", help="Replace `output_dir` if it exists.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights, the data and the trainer.")
    parser.add_argument("--max_steps", type=int, default=2000, help="Optimizer steps (one pass over fresh grids).")
    parser.add_argument("--curriculum_steps", type=int, default=50, help="Steps per grid-size stage.")
    parser.add_argument("--init_from", default=None,
                        help="Continue from this trained Qwen3-VL folder (4 x 4 grids only, no curriculum).")
    parser.add_argument("--no_augment", action="store_true", help="Train on unshifted digits.")
    parser.add_argument(
        "--question_weights",
        default="position:1,column:1,read:1,read_twice:2",
        help="Sampling weights of the question types, as `type:weight` pairs separated by commas.",
    )
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--warmup_ratio", type=float, default=0.05)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--text_hidden", type=int, default=192, help="Text hidden size (heads of dim 32).")
    parser.add_argument("--text_layers", type=int, default=4)
    parser.add_argument("--vision_hidden", type=int, default=96, help="Vision hidden size (heads of dim 24).")
    parser.add_argument("--vision_depth", type=int, default=3)
    parser.add_argument("--num_threads", type=int, default=2, help="torch.set_num_threads.")
    parser.add_argument("--eval_samples", type=int, default=200, help="Test grids per question type after training.")
    parser.add_argument("--eval_batch_size", type=int, default=20, help="Rows per left-padded `generate` call.")
    parser.add_argument("--logging_steps", type=int, default=25)
    return parser.parse_args(argv)


def model_config(args, tokenizer):
    """The tiny Qwen3-VL config, widened: GQA text model with heads of dim 32, vision heads of dim 24."""
    text_heads = args.text_hidden // 32
    return tiny_qwen3_vl_config(
        tokenizer=tokenizer,
        text_config={
            "hidden_size": args.text_hidden,
            "intermediate_size": 2 * args.text_hidden,
            "num_hidden_layers": args.text_layers,
            "num_attention_heads": text_heads,
            "num_key_value_heads": max(1, text_heads // 3),
            "head_dim": 32,
            # Interleaved M-RoPE over head_dim / 2 = 16 frequencies, in Qwen3-VL's (t, h, w) proportions.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": args.vision_depth,
            "hidden_size": args.vision_hidden,
            "intermediate_size": 2 * args.vision_hidden,
            "num_heads": args.vision_hidden // 24,
            "out_hidden_size": args.text_hidden,
            # An 8 x 8 learned position grid: exactly the patch grid of a 128 x 128 image.
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": list(range(args.vision_depth - 1)),
        },
    )


# Grid sizes of the curriculum, smallest first; the last one is the task's.
CURRICULUM = ((1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (4, 4))


def curriculum_plan(num_steps, batch_size, steps_per_stage, seed):
    """Index into `CURRICULUM` of every training sample, in feeding order.

    At step s the current stage is min(s // steps_per_stage, last); each sample takes the current size with
    probability 1/2 and otherwise a uniformly drawn size up to the current one (so earlier sizes stay in the mix).
    """
    rng = np.random.default_rng(seed)
    plan = []
    for step in range(num_steps):
        stage = min(step // steps_per_stage, len(CURRICULUM) - 1)
        current = rng.random(batch_size) < 0.5
        plan.extend(np.where(current, stage, rng.integers(stage + 1, size=batch_size)).tolist())
    return plan


def build_train_dataset(args, weights):
    """The training grids in curriculum order: one dataset per grid size, interleaved by `curriculum_plan`."""
    if args.init_from:  # a trained source reads 4 x 4 grids already: no curriculum
        plan = [len(CURRICULUM) - 1] * (args.max_steps * args.batch_size)
    else:
        plan = curriculum_plan(args.max_steps, args.batch_size, args.curriculum_steps, args.seed)
    parts, offsets, offset = [], [], 0
    for stage, (rows, cols) in enumerate(CURRICULUM):
        count = plan.count(stage)
        offsets.append(offset)
        offset += count
        if count:
            part = build_digits_dataset(
                "train",
                count,
                seed=10 * args.seed + stage,
                question_weights=weights,
                rows=rows,
                cols=cols,
                augment=not args.no_augment,
            )
            parts.append(to_prompt_completion(part))
    # Sample i of stage k is row offsets[k] + (number of earlier samples of stage k) of the concatenation.
    seen = [0] * len(CURRICULUM)
    order = []
    for stage in plan:
        order.append(offsets[stage] + seen[stage])
        seen[stage] += 1
    return concatenate_datasets(parts).select(order)


def to_prompt_completion(dataset):
    """`messages` -> `prompt` (all but the last turn) + `completion` (the assistant answer), for completion-only loss."""
    return dataset.map(
        lambda messages: {"prompt": messages[:-1], "completion": messages[-1:]},
        input_columns=["messages"],
        remove_columns=["messages", "question_type", "accepted", "digits", "digit_ids"],
    )


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        sys.exit(f"--output_dir {str(output_dir)!r} exists and is not empty; pass --overwrite to replace it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    work = Path(tempfile.mkdtemp(prefix="train_digits_ar."))
    try:
        # 1. Tokenizer and processor files, as build_tiny_qwen3_vl writes them, for 128 x 128 images (16 tokens).
        if args.init_from:  # the source's tokenizer, chat template and processor files, as they are
            weights_and_run = {"config.json", "generation_config.json", "training_info.json"}
            for path in Path(args.init_from).iterdir():
                if path.suffix in (".json", ".jinja", ".txt") and path.name not in weights_and_run and (
                    not path.name.startswith("model.safetensors")
                ):
                    shutil.copyfile(path, staging / path.name)
            processor = BardVLProcessor.from_pretrained(staging)
            tokenizer = processor.tokenizer
        else:
            tokenizer = build_tiny_tokenizer()
            tokenizer.save_pretrained(staging)
            image_json, video_json = _image_processor_files(image_size=128)
            for name, payload in (
                ("chat_template.json", {"chat_template": QWEN3_VL_CHAT_TEMPLATE}),
                ("preprocessor_config.json", image_json),
                ("video_preprocessor_config.json", video_json),
            ):
                (staging / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            processor = BardVLProcessor.from_pretrained(staging)

        # 2. A randomly initialised stock Qwen3-VL, or the source to continue from.
        torch.manual_seed(args.seed)
        if args.init_from:
            model = Qwen3VLForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32)
        else:
            model = Qwen3VLForConditionalGeneration(model_config(args, tokenizer))
        num_params = sum(parameter.numel() for parameter in model.parameters())
        print(f"parameters: {num_params / 1e6:.2f}M")

        # 3. Data: grids of growing size in curriculum order.
        weights = {
            name: float(weight) for name, weight in (pair.split(":") for pair in args.question_weights.split(","))
        }
        began = time.time()
        train = build_train_dataset(args, weights)
        print(f"built {len(train)} training grids in {time.time() - began:.0f}s")

        # 4. SFT with completion-only loss.
        config = SFTConfig(
            output_dir=str(work),
            per_device_train_batch_size=args.batch_size,
            max_steps=args.max_steps,
            # The curriculum order of `build_train_dataset`.
            train_sampling_strategy="sequential",
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=args.warmup_ratio,
            weight_decay=args.weight_decay,
            adam_beta2=0.98,
            max_grad_norm=1.0,
            completion_only_loss=True,
            max_length=None,
            logging_steps=args.logging_steps,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=True,
            dataloader_num_workers=0,
            # TRL's default (on), under transformers' current name: the deprecated one warns
            activation_checkpointing=True,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=processor)
        began = time.time()
        result = trainer.train()
        train_seconds = time.time() - began
        print(
            f"trained {result.global_step} steps in {train_seconds / 60:.1f} min, mean loss {result.training_loss:.4f}"
        )

        # 5. Save in the Hub layout, with Qwen3-VL-Instruct's shipped sampling defaults (conversion replaces them).
        model = trainer.model.eval()
        # The trainer set a top-level `use_cache = False` for training; Qwen3-VL keeps the flag in `text_config` only.
        if "use_cache" in model.config.to_dict():
            del model.config.use_cache
        eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
        model.generation_config = GenerationConfig(
            bos_token_id=pad,
            pad_token_id=pad,
            eos_token_id=[eos, pad],
            do_sample=True,
            temperature=0.7,
            top_k=20,
            top_p=0.8,
            repetition_penalty=1.0,
        )
        model.save_pretrained(staging, max_shard_size="1GB")

        # 6. Greedy AR accuracy on the test split (digit images never seen in training).
        info = {
            "command": "python examples/scripts/train_digits_ar.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "arguments": vars(args),
            "parameters": num_params,
            "train_steps": result.global_step,
            "train_minutes": round(train_seconds / 60, 2),
            "mean_train_loss": result.training_loss,
            "torch_threads": torch.get_num_threads(),
        }
        if args.eval_samples > 0:
            for question_type in weights:
                test = build_digits_dataset("test", args.eval_samples, seed=1, question_weights=[question_type])
                began = time.time()
                scores = evaluate(model, processor, test, max_new_tokens=96, batch_size=args.eval_batch_size)
                scores["tokens_per_second"] = scores["generated_tokens"] / (time.time() - began)
                info[f"test_{question_type}"] = {
                    "accuracy": scores["accuracy"],
                    "num_samples": scores["num_samples"],
                    "tokens_per_second": round(scores["tokens_per_second"], 1),
                    "batch_size": args.eval_batch_size,
                }
                print(
                    f"test {question_type:>10}: accuracy {scores['accuracy']:.3f} on {scores['num_samples']} grids, "
                    f"{scores['tokens_per_second']:.0f} tokens/s (batch {args.eval_batch_size})", flush=True
                )
        (staging / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private
        for path in staging.iterdir():
            path.chmod(0o644)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
        print(f"wrote {output_dir}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
