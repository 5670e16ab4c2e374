"""Decoding speed of BARD-VL `generate` against the autoregressive `generate` of its source (DESIGN 4).

Three kinds of model:
- `--model PATH [PATH ...]`: trained BARD checkpoints (e.g. the demo's `pbm/stage-b32`) against their AR source
  (`--ar-source`, default: the `source_model` recorded in the first checkpoint's config). Both stop at EOS, so the
  answer lengths are the real ones; `--prompts digits:TYPE` takes the test split of the digits task, one question type
  (a name from `transformers_bard.demo.digits.QUESTION_TYPES`, read at run time) or `digits:mix` (all types, as drawn).
- `--size 0.35b`: a random-weight Qwen3-VL of about 0.35B parameters with Qwen's real 151,936-row vocabulary, built
  offline (no tokenizer: prompts are random token ids around a 128 x 128 image). Untrained, so BARD decodes about one
  token per forward and both decoders run a fixed `--new-tokens`; what it measures is the cost of the forwards (the
  LM head is a large share of them at this vocabulary).
- `--size 2b` / `--size 4b`: Qwen3-VL-2B/4B-Instruct's published width (`published_qwen3_vl_config`), random
  weights, full depth unless `--layers` cuts it. Times one decoding forward instead of whole calls
  (prefill apart): an AR step (1 query) against a BARD denoising forward (B queries) and a fused commit + step
  (2B queries), each against the same `--context`-token KV cache, batch 1 and 8, and projects tokens/s at the
  tokens per forward the demo's final models reach (a projection, labelled so).
- neither: the tiny test checkpoint (random weights, ~1M parameters), fixed `--new-tokens`.

Everything runs in one process on `--threads` (default 1) threads. AR and every BARD variant are interleaved: each
repeat runs every decoder on one prompt batch after the other (in an order rotated per batch) before moving to the
next batch, and each cell is the median over `--repeats` repeats (after one warm-up pass). Times cover the whole `generate` call, prefill and vision included.
The breakdown splits the median repeat's time per prompt into prefill (the first forward of a call), denoising
forwards, commit forwards (the fused commit + step of 2B tokens; AR: its decode steps go to "denoise"), and the
decoder's own overhead (the call's time outside the model's forward).

`--verify` adds "BARD verified" decoders (DESIGN 4.2 a): each BARD model and threshold also decodes with the AR
source as `verifier` (`--model` and the tiny/random models; the answers are then the AR's), its forwards of both models
counted, its time split into draft forwards (prefill, denoise, commit) and the verifier's checks ("verify ms"). At
`--size 2b/4b` the one-forward table gains the verifier's check: a causal forward of B tokens against the same cache.

`--baseline FILE` adds the decoder of an older `generation_bard_vl.py` (e.g. a copy of the committed file taken before
a change) as "BARD (before)", on the very same weights: before/after columns from one run.

    python benchmarks/decode.py --quick
    python benchmarks/decode.py --model demo_output/pbm/stage-b4 demo_output/pbm/stage-b32 \\
        --prompts digits:mix digits:position digits:read --thresholds 0.9 1.0 --batch-sizes 1 8
    python benchmarks/decode.py --size 0.35b --block-sizes 4 32 --thresholds 0.9 --batch-sizes 1 --new-tokens 32
    python benchmarks/decode.py --size 2b --threads 2 --context 2048
    python benchmarks/decode.py --model demo_output/swd-b32 --prompts digits:read digits:read_twice --verify \
        --thresholds 0.9 --batch-sizes 1 8
"""

import argparse
import functools
import importlib.util
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from transformers_bard import BardVLConfig, BardVLForConditionalGeneration
from transformers_bard.demo.digits import _answer_tokens
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.testing import build_tiny_qwen3_vl, make_image, published_qwen3_vl_config, tiny_chat_messages

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
# Qwen3-VL's special token ids and mask id (DESIGN 2), for the random 0.35B model with the real vocabulary.
QWEN_VOCAB, QWEN_MASK, QWEN_EOS = 151936, 151671, 151645
QWEN_IMAGE, QWEN_VISION_START, QWEN_VISION_END = 151655, 151652, 151653
# published Qwen3-VL widths: one-forward costs (`forward_costs`); the demo's final models' tokens per forward at tau
# 0.9 (docs/demo_results/results.json, PBM+SWD; B = 4 from PBM) feed the projection
PUBLISHED = ("2b", "4b")
DEMO_TOKENS_PER_FORWARD = {4: 4.32, 8: 9.55, 16: 20.16, 32: 41.72}
SIZES = {
    # hidden, layers, intermediate, heads, kv heads: ~0.35B with tied embeddings (0.16B of them the embedding)
    "0.35b": dict(hidden_size=1024, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=64),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=None, help="Trained BARD checkpoint folder(s).")
    parser.add_argument("--ar-source", default=None,
                        help="AR source of --model (default: `source_model` of the first checkpoint's config).")
    parser.add_argument("--prompts", nargs="+", default=["digits:mix"],
                        help="With --model: prompt sets `digits:TYPE` (TYPE from QUESTION_TYPES), `digits:mix`, or "
                             "`digits:all` (the mix and every type).")
    parser.add_argument("--size", choices=sorted(SIZES) + sorted(PUBLISHED), default=None,
                        help="A random-weight Qwen3-VL of this size with the real 151,936-row vocabulary; 2b/4b: "
                             "one-forward costs at the published width (see above).")
    parser.add_argument("--layers", type=int, default=None,
                        help="--size 2b/4b: text layers built (default: the full depth, 28 / 36).")
    parser.add_argument("--context", type=int, default=2048, help="--size 2b/4b: cached tokens before the step.")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="--size 2b/4b: weights and activations.")
    parser.add_argument("--device", default="cpu", help="--size 2b/4b: cpu or cuda.")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16, 32],
                        help="BARD block sizes B (random-weight models; a checkpoint decodes at its own B).")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 1.0], help="Thresholds tau.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="Prompts per generate call.")
    parser.add_argument("--num-prompts", type=int, default=8, help="Prompts per set (at least the largest batch).")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="Random-weight models: new tokens per prompt (a multiple of every B). --model: the "
                             "max_new_tokens budget.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats (median reported).")
    parser.add_argument("--verify", action="store_true",
                        help="Also time verified decoding (the AR source as `verifier`) of every BARD decoder.")
    parser.add_argument("--draft", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="With --verify: a draft rule (generate options, e.g. unmasking=static,steps_per_block=1) "
                             "timed as its own verified decoder; repeatable.")
    parser.add_argument("--baseline", default=None,
                        help="An older generation_bard_vl.py to time as 'BARD (before)' next to the current one.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: small models are latency-bound; 0 keeps torch's).")
    parser.add_argument("--quick", action="store_true", help="3 repeats, as many prompts as the largest batch.")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.num_prompts = 3, max(args.batch_sizes)
    if args.size in PUBLISHED and args.context < max(args.block_sizes):
        parser.error(f"--context {args.context} is below the largest block size {max(args.block_sizes)}: the verifier's "
                     "check re-reads the last B cached tokens.")
    if args.model and args.size:
        parser.error("--model and --size exclude each other: a checkpoint has its own size.")
    if args.num_prompts < max(args.batch_sizes):
        parser.error(f"--num-prompts {args.num_prompts} is below the largest batch size {max(args.batch_sizes)}.")
    if not args.model and any(args.new_tokens % b for b in args.block_sizes):
        parser.error(f"--new-tokens {args.new_tokens} must be a multiple of every block size {args.block_sizes}.")
    if any(not 0 < t <= 1 for t in args.thresholds):
        parser.error(f"--thresholds must lie in (0, 1], got {args.thresholds}.")
    for spec in args.prompts:
        if not spec.startswith("digits:"):
            parser.error(f"--prompts takes digits:TYPE or digits:mix, got {spec!r}.")
    return args


# ---------------------------------------------------------------------------------------------- models
def tiny_models():
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_qwen3_vl(Path(tmp) / "tiny", image_size=96)
        processor = BardVLProcessor.from_pretrained(folder)
        ar = Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()
        # `<|mask|>` is a spare embedding row of the tiny checkpoint
        bard = BardVLForConditionalGeneration.from_pretrained(
            folder, mask_token_id=ar.config.text_config.vocab_size - 1
        ).eval()
    return ar, bard, processor


def sized_models(size: str):
    """A random Qwen3-VL of `size` with Qwen's vocabulary, as AR and as BARD model sharing the same tensors."""
    torch.manual_seed(0)
    text = dict(SIZES[size], vocab_size=QWEN_VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                 "mrope_section": [12, 10, 10], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=text["hidden_size"],
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                  deepstack_visual_indexes=[1])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                           vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END,
                           tie_word_embeddings=True)
    ar = Qwen3VLForConditionalGeneration(config).eval()
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    bard = BardVLForConditionalGeneration(BardVLConfig(**fields, mask_token_id=QWEN_MASK)).eval()
    bard.load_state_dict(ar.state_dict(), assign=True)
    return ar, bard


def load_baseline(path: str):
    """The BARD model class with the `generate` of an older generation file in front (same weights, same forward)."""
    name = "transformers_bard.models.bard_vl._generation_baseline"  # inside the package: its relative imports resolve
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return type("BaselineBardVL", (module.BardVLGenerationMixin, BardVLForConditionalGeneration), {})


# ---------------------------------------------------------------------------------------------- prompts
def digits_prompts(spec: str, processor, num_prompts: int):
    """(rows of processor inputs, one per prompt): the test split, one question type or the mix."""
    from transformers_bard.demo.digits import ALL_QUESTION_TYPES, TASKS, build_digits_dataset, prompt_messages

    kind = spec.split(":", 1)[1]
    if kind != "mix" and kind not in ALL_QUESTION_TYPES:
        raise SystemExit(f"--prompts {spec}: the question types are {ALL_QUESTION_TYPES} (or mix: the digits task's).")
    rows, size = [], num_prompts
    while len(rows) < num_prompts:  # the dataset draws types at random: draw more until the set is full
        # the mix draws the digits task's types; a choice-task type (`--task choice` of the demo) is asked for alone
        weights = [kind] if kind in ALL_QUESTION_TYPES and kind not in TASKS["digits"] else None
        data = build_digits_dataset("test", size, seed=1, question_weights=weights)
        rows = [row for row in data if kind == "mix" or row["question_type"] == kind][:num_prompts]
        size *= 4
    texts = [processor.apply_chat_template(prompt_messages(row["messages"]), add_generation_prompt=True)
             for row in rows]
    return [dict(text=t, images=row["images"]) for t, row in zip(texts, rows)]


def digits_batches(prompts, processor, batch_size: int):
    processor.tokenizer.padding_side = "left"
    return [
        dict(processor(text=[p["text"] for p in chunk], images=[p["images"] for p in chunk], padding=True,
                       return_tensors="pt"))
        for chunk in (prompts[i: i + batch_size] for i in range(0, len(prompts), batch_size))
    ]


def tiny_batches(processor, num_prompts: int, batch_size: int):
    processor.tokenizer.padding_side = "left"
    conversations = [
        tiny_chat_messages([make_image(i, (32 * (1 + i % 3), 32 * (1 + (i + 1) % 2)))],
                           turns=((QUESTIONS[i % len(QUESTIONS)], None),))
        for i in range(num_prompts)
    ]
    return [
        dict(processor.apply_chat_template(conversations[start:start + batch_size], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt", padding=True))
        for start in range(0, num_prompts, batch_size)
    ]


def random_batches(num_prompts: int, batch_size: int, text_tokens: int = 24):
    """Prompts of random ordinary ids around one 128 x 128 image (16 merged image tokens), unpadded."""
    generator = torch.Generator().manual_seed(0)
    image = [QWEN_VISION_START] + [QWEN_IMAGE] * 16 + [QWEN_VISION_END]
    batches = []
    for start in range(0, num_prompts, batch_size):
        n = min(batch_size, num_prompts - start)
        text = torch.randint(0, 151000, (n, text_tokens), generator=generator)
        ids = torch.cat([text[:, :4], torch.tensor(image).expand(n, -1), text[:, 4:]], dim=1)
        batches.append(dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == QWEN_IMAGE).int(),
            pixel_values=torch.randn(n * 64, 3 * 2 * 16 * 16, generator=generator),
            image_grid_thw=torch.tensor([[1, 8, 8]] * n),
        ))
    return batches


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds of one pass over the prompt set, split by forward kind."""

    total: float = 0.0
    parts: dict = field(default_factory=lambda: {"prefill": 0.0, "denoise": 0.0, "commit": 0.0, "verify": 0.0})
    calls: int = 0  # model forwards (batched: one per forward of the whole batch)


class ForwardClock:
    """Wraps `model.forward` to time each call: the first call of a `generate` is the prefill, a call with 2B input
    tokens a fused commit, any other a denoising step (or an AR decode step)."""

    def __init__(self, model):
        self.model, self.inner = model, model.forward
        self.timing, self.first, self.block_size = None, True, None
        self.rest = "denoise"  # the kind of an AR model's later calls: decode steps, or a verifier's checks
        functools.update_wrapper(self, self.inner)  # AR `generate` reads the forward's signature
        model.forward = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        seconds = time.perf_counter() - start
        ids = kwargs.get("input_ids")
        if self.first:
            kind = "prefill"
        elif self.block_size and ids is not None and ids.shape[1] == 2 * self.block_size:
            kind = "commit"
        else:
            kind = self.rest
        self.first = False
        if self.timing is not None:
            self.timing.parts[kind] += seconds
            self.timing.calls += 1
        return out

    def run(self, call, batches, block_size=None, timing=None):
        """Run `call` on every batch, timed (added to `timing` when given); returns (Timing, outputs)."""
        self.timing, self.block_size = timing or Timing(), block_size
        outputs = []
        for batch in batches:
            self.first = True
            start = time.perf_counter()
            outputs.append(call(batch))
            self.timing.total += time.perf_counter() - start
        timing, self.timing = self.timing, None
        return timing, outputs


def tokens_until_eos(new_tokens: torch.Tensor, eos_ids) -> torch.Tensor:
    """Tokens per row up to and including the first EOS (all of them without one) ``[rows]``."""
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids))
    first = is_eos.int().argmax(-1)
    return torch.where(is_eos.any(-1), first + 1, torch.full_like(first, new_tokens.shape[1]))


def _option(pair: str):
    """`--draft` KEY=VALUE -> (key, int | float | str value)."""
    key, _, value = pair.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


# ---------------------------------------------------------------------------------------------- main
def machine_lines():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [
        f"machine: {cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch thread(s); "
        f"{platform.platform()}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, transformers-bard at git {commit or 'unknown'}",
    ]


def _one_forward_times(args, layers: int, batch: int) -> dict:
    """Median seconds of an AR step and of BARD's denoising and fused forwards for each B, at `layers` text layers."""
    from transformers import DynamicCache

    from transformers_bard.models.bard_vl.masking_bard_vl import CLEAN, NOISY, PREFIX

    base = published_qwen3_vl_config(args.size, text_layers=layers, vision_depth=1)
    fields = base.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    torch.manual_seed(0)
    model = BardVLForConditionalGeneration(BardVLConfig(**fields, mask_token_id=QWEN_MASK))
    device = torch.device(args.device)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    K = args.context
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, 150_000, (batch, K), generator=gen).to(device)
    arange = functools.partial(torch.arange, device=device)
    full = functools.partial(torch.full, device=device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():  # the prefill, apart
        model(input_ids=prompt, position_ids=arange(K)[None, None].expand(3, batch, K), cache=cache,
              use_cache=True, logits_to_keep=1)

    def forward(ids, segments, blocks, key_segments, key_blocks, wanted):
        q = ids.shape[1]
        mask = model.attention_mask_from_labels(segments, blocks, torch.cat([key_segments, segments], 1),
                                                torch.cat([key_blocks, blocks], 1))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=(K + arange(q))[None, None].expand(3, batch, q),
                  cache=cache, use_cache=True, logits_mask=wanted)
        cache.crop(-q)

    def ar_step():
        with torch.no_grad():
            model(input_ids=prompt[:, -1:], position_ids=full((3, batch, 1), K), cache=cache, use_cache=True)
        cache.crop(-1)

    def verify_step(B):  # the verifier's check: a causal forward of B tokens appended to the cache
        with torch.no_grad():
            model(input_ids=prompt[:, -B:], position_ids=(K + arange(B))[None, None].expand(3, batch, B),
                  cache=cache, use_cache=True)
        cache.crop(-B)

    calls = {"AR": ar_step}
    for B in args.block_sizes:
        calls[("verify", B)] = functools.partial(verify_step, B)
        key_seg, key_blk = full((batch, K), PREFIX), (arange(K) // B).expand(batch, K)
        first = -(-K // B)
        noisy = full((batch, B), QWEN_MASK)
        seg_n, blk_n = full((batch, B), NOISY), full((batch, B), first + 1)
        seg_c, blk_c = full((batch, B), CLEAN), full((batch, B), first)
        all_masked = torch.ones(batch, B, dtype=torch.bool, device=device)
        calls[("denoise", B)] = functools.partial(forward, noisy, seg_n, blk_n, key_seg, key_blk, all_masked)
        calls[("fused", B)] = functools.partial(
            forward, torch.cat([prompt[:, -1:].expand(batch, B), noisy], 1), torch.cat([seg_c, seg_n], 1),
            torch.cat([blk_c, blk_n], 1),
            key_seg, key_blk, torch.cat([torch.zeros_like(all_masked), all_masked], 1))
    times = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.repeats):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def forward_costs(args):
    """One decoding forward at published width: AR step vs BARD denoising and fused commit forwards (issue 20),
    measured at `args.layers` text layers (default: the full depth; decoding needs no gradients, so it fits)."""
    depth = args.layers or dict(zip(PUBLISHED, (28, 36)))[args.size]
    text = published_qwen3_vl_config(args.size, text_layers=1, vision_depth=1).text_config.to_dict()
    print("\n".join(machine_lines()))
    print(f"Qwen3-VL-{args.size.upper()} width (hidden {text['hidden_size']}, MLP {text['intermediate_size']}, "
          f"{text['num_attention_heads']}/{text['num_key_value_heads']} heads, vocab {QWEN_VOCAB:,}), {depth} text "
          f"layers, random weights, {args.dtype}, {torch.get_num_threads()} threads; {args.context} cached tokens "
          f"(prefill apart); medians of {args.repeats} interleaved repeats\n")
    print("| batch | B | AR step ms | BARD denoise fwd ms | / AR | fused commit fwd ms | / AR | verify fwd ms | / AR | "
          "tokens/forward (demo) | AR tok/s | BARD tok/s (projection) | speed-up (projection) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch in args.batch_sizes:
        times = _one_forward_times(args, depth, batch)
        ar = times["AR"]
        for B in args.block_sizes:
            denoise, fused, verify = times[("denoise", B)], times[("fused", B)], times[("verify", B)]
            tpf = DEMO_TOKENS_PER_FORWARD.get(B)
            cells = "- | - | - | -"
            if tpf:
                # per block of B tokens: one fused commit + step, then B / tpf - 1 more denoising forwards
                bard_tps = batch * B / (fused + max(B / tpf - 1, 0) * denoise)
                cells = f"{tpf:.1f} | {batch / ar:,.1f} | {bard_tps:,.1f} | {bard_tps * ar / batch:.2f}x"
            print(f"| {batch} | {B} | {ar * 1e3:.1f} | {denoise * 1e3:.1f} | {denoise / ar:.2f} | {fused * 1e3:.1f} "
                  f"| {fused / ar:.2f} | {verify * 1e3:.1f} | {verify / ar:.2f} | {cells} |")
            rows.append(dict(batch=batch, block_size=B, layers=depth, ar_s=ar, denoise_s=denoise, fused_s=fused,
                             verify_s=verify))
    return rows


def main():
    args = parse_args()
    if args.size in PUBLISHED:
        if args.threads:
            torch.set_num_threads(args.threads)
        return forward_costs(args)
    # the expected notices (a checkpoint's AR generation config ignored, ...) are not results
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers_bard").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline_class = load_baseline(args.baseline) if args.baseline else None

    # (name, bard model, block sizes) and the prompt sets {name: {batch size: batches}}
    if args.model:
        processor = BardVLProcessor.from_pretrained(args.model[0])
        bards = []
        for path in args.model:
            model = BardVLForConditionalGeneration.from_pretrained(path).eval()
            bards.append(("/".join(Path(path).parts[-2:]), model, model.config.block_size))
        source = args.ar_source or bards[0][1].config.source_model
        if not source or not Path(source).is_dir():
            raise SystemExit(f"No AR source folder ({source!r}): pass --ar-source PATH.")
        ar = Qwen3VLForConditionalGeneration.from_pretrained(source).eval()
        eos = bards[0][1].generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad = processor.tokenizer.pad_token_id
        from transformers_bard.demo.digits import QUESTION_TYPES  # read at run time: the task's types may change

        specs = [s for spec in args.prompts
                 for s in (["digits:mix"] + [f"digits:{t}" for t in QUESTION_TYPES] if spec == "digits:all" else [spec])]
        sets = {spec: digits_prompts(spec, processor, args.num_prompts) for spec in specs}
        batches = {(spec, b): digits_batches(sets[spec], processor, b) for spec in sets for b in args.batch_sizes}
        description = (f"trained checkpoints {', '.join(args.model)} against AR source {source}; digits test prompts, "
                       f"max_new_tokens {args.new_tokens}, both decoders stop at EOS")
        fixed = False
    else:
        if args.size:
            ar, bard = sized_models(args.size)
            batches = {("random", b): random_batches(args.num_prompts, b) for b in args.batch_sizes}
            pad, eos = 0, [QWEN_EOS]
        else:
            ar, bard, processor = tiny_models()
            batches = {("tiny", b): tiny_batches(processor, args.num_prompts, b) for b in args.batch_sizes}
            pad, eos = processor.tokenizer.pad_token_id, ar.generation_config.eos_token_id
        bards = [(f"random B={b}", bard, b) for b in args.block_sizes]
        description = (f"random weights ({args.size or 'tiny'}), {args.new_tokens} new tokens per prompt for both "
                       "decoders (no EOS stop)")
        fixed = True
    params = sum(p.numel() for p in ar.parameters())
    n = args.new_tokens

    ar_config = GenerationConfig(do_sample=False, max_new_tokens=n, pad_token_id=pad, eos_token_id=eos,
                                 min_new_tokens=n if fixed else None)

    def ar_call(batch):
        out = ar.generate(**batch, generation_config=ar_config)
        new = out[:, batch["input_ids"].shape[1]:]
        count = torch.full((new.shape[0],), new.shape[1]) if fixed else tokens_until_eos(new, eos)
        return count, count, out  # AR: one forward per token (the prefill yields the first)

    # decoders per (set, batch): AR first, then every BARD model x threshold, before and after
    decoders = []
    for name, model, block_size in bards:
        for threshold in args.thresholds:
            options = dict(block_size=block_size, threshold=threshold, max_new_tokens=n, pad_token_id=pad,
                           return_dict_in_generate=True)
            options.update(eos_token_id=None) if fixed else options.update(eos_token_id=eos)
            variants = [("BARD", None)] + ([("BARD (before)", baseline_class)] if baseline_class else [])
            for label, cls in variants:
                decoders.append((label, name, block_size, threshold, model, cls, options))
            if args.verify:
                drafts = [("", {})] + [(spec, dict(_option(kv) for kv in spec.split(","))) for spec in args.draft]
                for spec, rule in drafts:
                    label = "BARD verified" + (f" ({spec})" if spec else "")
                    verified = {**options, **rule, "verifier": ar}
                    decoders.append((label, name, block_size, threshold, model, None, verified))

    ar_clock = ForwardClock(ar)
    clocks = {id(model): ForwardClock(model) for _, model, _ in bards}
    results = []
    with torch.inference_mode():
        for (spec, batch_size), prompt_batches in batches.items():
            runs = [("AR", None, "-", "-", None, None, None)] + decoders
            timings = {i: [] for i in range(len(runs))}
            counts, calls, same, answers = {}, {}, {}, {}

            def run_one(i, batches=prompt_batches, timing=None, runs=runs):
                label, name, block_size, threshold, model, cls, options = runs[i]
                if label == "AR":
                    return ar_clock.run(ar_call, batches, timing=timing)
                if cls is not None:
                    model.__class__ = cls
                clock = clocks[id(model)]

                def call(inputs):
                    if "verifier" not in options:
                        return model.generate(**inputs, **options)
                    # the verifier's forwards go to the same timing: its prefill to "prefill", checks to "verify"
                    ar_clock.timing, ar_clock.first, ar_clock.rest = clock.timing, True, "verify"
                    try:
                        return model.generate(**inputs, **options)
                    finally:
                        ar_clock.timing, ar_clock.rest = None, "denoise"

                try:
                    return clock.run(call, batches, block_size, timing=timing)
                finally:
                    model.__class__ = BardVLForConditionalGeneration

            for i in range(len(runs)):  # warm-up, and the token/forward counts (deterministic)
                warm, outputs = run_one(i)
                calls[i] = warm.calls / len(prompt_batches)
                answers[i] = [  # each row's new tokens up to its first EOS
                    _answer_tokens(row[b["input_ids"].shape[1]:], eos)
                    for b, o in zip(prompt_batches, outputs)
                    for row in (o[2] if runs[i][0] == "AR" else o.sequences).tolist()
                ]
                same[i] = "-"
                if runs[i][0] == "AR":
                    tokens = torch.cat([o[0] for o in outputs]).float()
                    forwards = tokens
                else:
                    tokens = torch.cat([o.num_generated_tokens for o in outputs]).float()
                    forwards = torch.cat([o.num_forwards for o in outputs]).float()
                counts[i] = (tokens, forwards)
                if "verified" in runs[i][0]:  # the sequences (prompt, answer, padding) of the AR call, row for row
                    hits = sum(a == b for a, b in zip(answers[i], answers[0]))
                    same[i] = f"{hits}/{len(answers[0])}"
            for repeat in range(args.repeats):
                # interleaved per prompt batch, in an order rotated per batch: a shared machine's load swings then hit
                # every decoder alike
                repeat_timings = [Timing() for _ in runs]
                for index, batch in enumerate(prompt_batches):
                    order = list(range(len(runs)))
                    shift = (repeat * len(prompt_batches) + index) % len(order)
                    for i in order[shift:] + order[:shift]:
                        run_one(i, [batch], repeat_timings[i])
                for i, timing in enumerate(repeat_timings):
                    timings[i].append(timing)
            ar_rate = None
            for i, (label, name, block_size, threshold, *_rest) in enumerate(runs):
                ordered = sorted(timings[i], key=lambda t: t.total)
                median = ordered[len(ordered) // 2]
                tokens, forwards = counts[i]
                rate = float(tokens.sum()) / statistics.median(t.total for t in timings[i])
                ar_rate = rate if label == "AR" else ar_rate
                per_prompt = {k: 1000 * v / args.num_prompts for k, v in median.parts.items()}
                overhead = 1000 * median.total / args.num_prompts - sum(per_prompt.values())
                results.append(dict(
                    prompts=spec, batch=batch_size, decoder=label, model=name or "AR source", block=block_size,
                    tau=threshold, tokens=float(tokens.mean()), forwards=float(forwards.mean()),
                    tpf=float(tokens.sum() / forwards.sum()), ms=1000 * median.total / args.num_prompts,
                    rate=rate, ratio=rate / ar_rate, **per_prompt, overhead=overhead, calls=calls[i],
                    same=same[i],
                ))

    for line in machine_lines():
        print(line)
    print(f"{description}; AR model {params / 1e6:.1f}M parameters; {args.num_prompts} prompts per set; median of "
          f"{args.repeats} interleaved repeats.\n")
    print("| prompts | batch | decoder | model | B | tau | tokens / row | forwards / row | batched forwards / call | "
          "tokens / forward | ms / prompt | tokens / s | vs AR | prefill ms | denoise ms | commit ms | verify ms | "
          "overhead ms | same as AR |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['prompts']} | {r['batch']} | {r['decoder']} | {r['model']} | {r['block']} | {r['tau']} | "
              f"{r['tokens']:.1f} | {r['forwards']:.1f} | {r['calls']:.1f} | {r['tpf']:.2f} | {r['ms']:.1f} | {r['rate']:.0f} | "
              f"{r['ratio']:.2f}x | {r['prefill']:.1f} | {r['denoise']:.1f} | {r['commit']:.1f} | {r['verify']:.1f} | "
              f"{r['overhead']:.1f} | {r['same']} |")
    print("\nforwards / row: BARD counts the forwards after the prompt's forward (denoising steps + commits, a fused "
          "commit counting once; the prefill also takes block 0's first step in the current decoder); AR counts one "
          "forward per token, the prefill yielding the first. 'batched forwards / call': model forwards per generate call, the prompt's included (at batch 8 they serve all 8 rows). ms columns are per prompt, from the median repeat; "
          "'commit' is the fused commit + first step of the next block (2B tokens).")


if __name__ == "__main__":
    main()
