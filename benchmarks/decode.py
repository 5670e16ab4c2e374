"""Decoding speed of BARD-VL `generate` against the autoregressive `generate` of the same weights (DESIGN 4).

One tiny Qwen3-VL checkpoint (random weights, built offline) is loaded twice: as the stock
`transformers.Qwen3VLForConditionalGeneration` (greedy AR decoding) and as `BardVLForConditionalGeneration` (block
diffusion). Both decode the same number of new tokens for every prompt: BARD runs with no EOS, AR with
`min_new_tokens = max_new_tokens`, so neither stops early. Times cover the whole `generate` call, prefill included;
each cell is the median of `--repeats` timed runs after one warm-up run.

What to read from it: the model is untrained, so it is rarely confident and BARD decodes about one token per forward
at any threshold. The accounting must still be exact (at threshold 1.0 with steps_per_block = B, a block costs B
forwards with fused commits: the script checks it) and the cost of one block forward should stay close to the cost
of one AR step, so tokens/s of BARD at ~1 token per forward should be close to AR's. Speed-ups over AR need a trained
model that is confident (tokens per forward > 1).

    python benchmarks/decode.py --quick
    python benchmarks/decode.py --block-sizes 4 8 --thresholds 0.9 1.0 --batch-sizes 1 --repeats 7
"""

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

from transformers_bard import BardVLForConditionalGeneration
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.testing import build_tiny_qwen3_vl, make_image, tiny_chat_messages

QUESTIONS = (
    "What is in the image?",
    "Describe the picture in one sentence.",
    "Which colour dominates here?",
    "Is there any text in this image? Answer briefly.",
    "How many objects can you count?",
    "Write a short caption.",
    "What would you name this picture?",
    "Tell me what stands out.",
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16, 32], help="BARD block sizes B.")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9, 1.0], help="Thresholds tau.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="Prompts per generate call.")
    parser.add_argument("--num-prompts", type=int, default=8, help="Prompts in the set (images of varied sizes).")
    parser.add_argument("--new-tokens", type=int, default=64, help="New tokens per prompt (a multiple of every B).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per cell (median reported).")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads. Default 1: the tiny model's ops are latency-bound, and several OpenMP threads on "
             "a shared machine mostly wait for each other (0 keeps torch's default).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="3 repeats, as many prompts as the largest batch: the whole grid in about a minute.")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.num_prompts = 3, max(args.batch_sizes)
    if args.num_prompts < max(args.batch_sizes):
        parser.error(f"--num-prompts {args.num_prompts} is below the largest batch size {max(args.batch_sizes)}.")
    if any(args.new_tokens % b for b in args.block_sizes):
        parser.error(f"--new-tokens {args.new_tokens} must be a multiple of every block size {args.block_sizes}.")
    if any(not 0 < t <= 1 for t in args.thresholds):
        parser.error(f"--thresholds must lie in (0, 1], got {args.thresholds}.")
    return args


def load_models(folder: Path):
    """The stock AR model and the BARD model with the very same weights; `<|mask|>` is a spare embedding row."""
    ar = Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()
    mask_token_id = ar.config.text_config.vocab_size - 1
    bard = BardVLForConditionalGeneration.from_pretrained(folder, mask_token_id=mask_token_id).eval()
    for (name, a), (_, b) in zip(ar.state_dict().items(), bard.state_dict().items()):
        if not torch.equal(a, b):
            raise RuntimeError(f"weights differ at {name}")
    return ar, bard


def prompt_batches(processor, num_prompts: int, batch_size: int):
    """Processor outputs for the prompt set, `batch_size` prompts per (left-padded) batch."""
    processor.tokenizer.padding_side = "left"
    conversations = [
        tiny_chat_messages([make_image(i, (32 * (1 + i % 3), 32 * (1 + (i + 1) % 2)))],
                           turns=((QUESTIONS[i % len(QUESTIONS)], None),))
        for i in range(num_prompts)
    ]
    return [
        processor.apply_chat_template(conversations[start:start + batch_size], add_generation_prompt=True,
                                      tokenize=True, return_dict=True, return_tensors="pt", padding=True)
        for start in range(0, num_prompts, batch_size)
    ]


def timed(run, batches, repeats: int):
    """Median seconds of running `run` over all batches, and the outputs of the last run."""
    outputs = [run(batch) for batch in batches]  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [run(batch) for batch in batches]
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), outputs


def main():
    args = parse_args()
    # the expected notices (a qwen3_vl checkpoint loaded as bard_vl, its AR generation config ignored) are not results
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers_bard").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_qwen3_vl(Path(tmp) / "tiny", image_size=96)
        processor = BardVLProcessor.from_pretrained(folder)
        ar, bard = load_models(folder)
    params = sum(p.numel() for p in ar.parameters())
    pad = processor.tokenizer.pad_token_id
    ar_config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad,
                                 eos_token_id=ar.generation_config.eos_token_id)

    rows = []
    with torch.no_grad():
        for batch_size in args.batch_sizes:
            batches = prompt_batches(processor, args.num_prompts, batch_size)
            total_tokens = args.num_prompts * n
            ar_seconds, ar_out = timed(lambda b: ar.generate(**b, generation_config=ar_config), batches, args.repeats)
            if any(out.shape[1] - b["input_ids"].shape[1] != n for out, b in zip(ar_out, batches)):
                raise RuntimeError("AR generate did not decode exactly --new-tokens tokens")
            ar_rate = total_tokens / ar_seconds
            # AR: one forward per token, the first of them being the prefill
            rows.append((batch_size, "AR (greedy)", "-", "-", n, 1.0, ar_seconds, ar_rate, 1.0))
            for block_size in args.block_sizes:
                for threshold in args.thresholds:
                    options = dict(block_size=block_size, steps_per_block=block_size, threshold=threshold,
                                   max_new_tokens=n, eos_token_id=None, pad_token_id=pad,
                                   return_dict_in_generate=True)
                    seconds, outs = timed(lambda b, o=options: bard.generate(**b, **o), batches, args.repeats)
                    forwards = torch.cat([o.num_forwards for o in outs]).float()
                    generated = torch.cat([o.num_generated_tokens for o in outs])
                    if not (generated == n).all():
                        raise RuntimeError("BARD generate did not decode exactly --new-tokens tokens")
                    if threshold == 1.0 and not (forwards == n).all():
                        raise RuntimeError(f"accounting: tau=1, S=B={block_size} must cost {n} forwards per row "
                                           f"({n // block_size} blocks x B), got {forwards.tolist()}")
                    rate = total_tokens / seconds
                    rows.append((batch_size, "BARD", block_size, threshold, forwards.mean().item(),
                                 n / forwards.mean().item(), seconds, rate, rate / ar_rate))

    print(f"Tiny Qwen3-VL, {params / 1e6:.2f}M parameters, {args.num_prompts} image prompts, {n} new tokens each, "
          f"median of {args.repeats} runs, prefill included, {torch.get_num_threads()} CPU threads.\n")
    print("| batch | decoder | B | tau | forwards / row | tokens / forward | seconds | tokens / s | vs AR |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch_size, name, block_size, threshold, forwards, tpf, seconds, rate, ratio in rows:
        print(f"| {batch_size} | {name} | {block_size} | {threshold} | {forwards:.1f} | {tpf:.2f} | {seconds:.3f} | "
              f"{rate:.0f} | {ratio:.2f}x |")
    print("\nForwards exclude the prefill for BARD (denoising steps + commits, fused commits count once); AR counts "
          "one forward per token, the prefill producing the first. At tau = 1.0 every row used exactly "
          f"{n} forwards ({n} // B blocks x B): checked.")


if __name__ == "__main__":
    main()
