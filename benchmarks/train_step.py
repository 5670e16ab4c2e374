"""One training step at Qwen3-VL-2B/4B width: PBM and SWD against an AR SFT step of the same model and rows (issue 20).

Steps compared, forward + backward of one row with one image (the prompt holds the image's tokens):

- ``AR SFT (TRL)``: ``[prompt ; response]`` causal, loss on the response only, through TRL's fused LM head
  (`trl.trainer.utils.add_fused_lm_head` with the outputs `SFTTrainer.compute_loss` asks for: log-probs, entropy,
  top-1), i.e. what `SFTTrainer` computes. On CPU TRL has no Triton kernel and scores every position of the row in
  vocabulary tiles; on CUDA only the supervised ones;
- ``AR SFT (response head)``: the same with the LM head run only at the response positions (the cheapest AR step);
- ``PBM``: the packed row ``[prompt ; x0 ; xt]`` under the block-diffusion mask (DESIGN 3.1, 3.2), LM head only at the
  corrupted xt positions, the PBM loss (`block_merge_loss`), B = 32 noise (mask prior);
- ``SWD``: the same row for a B = 32 student and a frozen B = 4 teacher in the same process (teacher forward without
  gradients at the masked positions, top-16, then the student step and `swd_loss`).

Depth. Real width, cut depth: the model is built with 2 text layers and 2 vision blocks, and module hooks time the
forward and backward of each (`PartClock`; for SWD the frozen teacher's layers too, forward only); the rest of a step
(embedding, LM head, loss) is its total minus those. The full-depth figures (28 text layers and 24 vision blocks at 2B) are *projections*: rest +
depth x per-layer, labelled as such. The per-part table gives what each costs, plus collation (noise + packing).

Memory: the peak of live allocations during the step (`torch.profiler` memory events, replayed in time order;
weights allocated before the step are not counted, weight gradients are; on CUDA the allocator's peak), measured at
1 and 2 text layers and 1 and 2 vision blocks (memory is deterministic, so a layer costs the difference) and
projected to full depth. Time: medians of `--repeats` runs, the steps interleaved run by run in one process.

Attention backends (second table): a forward of the packed row (no gradients: torch has no FlexAttention backward
on CPU) with ``sdpa`` and the dense boolean mask against ``flex_attention`` and the block-sparse BlockMask, after a
warm-up run that compiles flex (its compile time reported apart).

    python benchmarks/train_step.py --size 2b --lengths 2048:512 4096:1024 --threads 2
    python benchmarks/train_step.py --quick      # toy width, seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from transformers_bard import BardVLConfig, BardVLForConditionalGeneration
from transformers_bard.models.bard_vl.masking_bard_vl import packed_segment_ids
from transformers_bard.noise import MixedNoiseScheduler
from transformers_bard.testing import published_qwen3_vl_config, tiny_qwen3_vl_config
from transformers_bard.trainer.losses import block_merge_loss, swd_loss, teacher_topk

MASK_ID = 151_671
STUDENT_B, TEACHER_B, TOPK = 32, 4, 16
FULL_DEPTH = {"2b": (28, 24), "4b": (36, 24)}


# ---------------------------------------------------------------------- models and the row
def build(size: str, layers: int, vision_depth: int, dtype: torch.dtype, attn: str = "sdpa", seed: int = 0,
          device: str = "cpu"):
    """A random BARD-VL model at `size` width (or the tiny test config for "tiny") with `layers` text layers."""
    if size == "tiny":
        # head dim 16 in both towers: CUDA's flex kernels refuse a head dim under 16 (the tiny test config has 8)
        text = {"num_hidden_layers": layers, "head_dim": 16,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2],
                                    "mrope_interleaved": True}}
        base = tiny_qwen3_vl_config(vocab_size=MASK_ID + 1, text_config=text,
                                    vision_config={"depth": vision_depth, "deepstack_visual_indexes": [0],
                                                   "num_heads": 2})
    else:
        base = published_qwen3_vl_config(size, text_layers=layers, vision_depth=vision_depth)
    fields = base.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    config = BardVLConfig(**fields, block_size=STUDENT_B, mask_token_id=MASK_ID)
    torch.manual_seed(seed)
    with torch.device(device):
        model = BardVLForConditionalGeneration(config).to(dtype)
    model.set_attn_implementation(attn)
    return model.train()


def image_inputs(config, image_side: int, generator):
    """Random pixels of one `image_side` x `image_side` image: ``(pixel_values [patches, C*T*p*p], grid [1, 3],
    merged image tokens)``."""
    vision = config.vision_config
    side = image_side // vision.patch_size
    patches = side * side
    dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(patches, dim, generator=generator)
    return pixels, torch.tensor([[1, side, side]]), patches // vision.spatial_merge_size**2


def make_row(config, P: int, R: int, image_side: int, seed: int = 0, device: str = "cpu"):
    """Prompt ids ``[P]`` (text around one image: vision start, image tokens, vision end), their mm types, the image,
    a response ``[R]`` and its B = 32 noise."""
    gen = torch.Generator().manual_seed(seed)
    pixels, grid, n_image = image_inputs(config, image_side, gen)
    if n_image + 2 >= P:
        raise SystemExit(f"prompt length {P} cannot hold a {image_side}px image ({n_image} tokens)")
    text = torch.randint(0, min(150_000, MASK_ID), (P - n_image - 2,), generator=gen)
    vision = torch.tensor([config.vision_start_token_id] + [config.image_token_id] * n_image
                          + [config.vision_end_token_id])
    prompt = torch.cat([text[:8], vision, text[8:]])
    mm = (prompt == config.image_token_id).int()
    x0 = torch.randint(0, min(150_000, MASK_ID), (1, R), generator=gen)
    noise = MixedNoiseScheduler().add_noise(x0, torch.ones(1, R, dtype=torch.bool), STUDENT_B, MASK_ID,
                                            generator=gen)
    row = dict(prompt=prompt, mm=mm, pixels=pixels, grid=grid, x0=x0[0], noise=noise)
    for name in ("prompt", "mm", "pixels", "grid", "x0"):
        row[name] = row[name].to(device)
    for name in ("noisy_input_ids", "corrupted", "rates"):
        setattr(noise, name, getattr(noise, name).to(device))
    return row


def packed_inputs(row, dtype):
    """The collated PBM row: what `BlockDiffusionCollator` + `block_merge_inputs` hand the model (DESIGN 3.1)."""
    P, R = len(row["prompt"]), len(row["x0"])
    input_ids = torch.cat([row["prompt"], row["x0"], row["noise"].noisy_input_ids[0]])[None]  # [1, P + 2R]
    device = row["prompt"].device
    segment_ids = packed_segment_ids(torch.ones(1, P, device=device), torch.ones(1, R, device=device))
    logits_mask = torch.zeros_like(segment_ids, dtype=torch.bool)
    logits_mask[:, P + R:] = row["noise"].corrupted
    labels = torch.full_like(input_ids, -100)
    labels[logits_mask] = row["x0"][row["noise"].corrupted[0]]
    rates = torch.zeros(1, P + 2 * R, device=device)
    rates[:, P + R:] = row["noise"].rates
    mm = torch.cat([row["mm"], torch.zeros(2 * R, dtype=torch.int, device=device)])[None]
    inputs = dict(input_ids=input_ids, segment_ids=segment_ids, logits_mask=logits_mask, mm_token_type_ids=mm,
                  pixel_values=row["pixels"].to(dtype), image_grid_thw=row["grid"])
    return inputs, labels, rates


# ---------------------------------------------------------------------- the steps
def ar_step(model, row, dtype, trl_head: bool):
    """`trl_head`: `model` carries TRL's fused LM head (`add_fused_lm_head`), as `SFTTrainer` installs it."""
    P, R = len(row["prompt"]), len(row["x0"])
    input_ids = torch.cat([row["prompt"], row["x0"]])[None]  # [1, P + R], causal
    mm = torch.cat([row["mm"], torch.zeros(R, dtype=torch.int, device=input_ids.device)])[None]
    common = dict(input_ids=input_ids, mm_token_type_ids=mm, pixel_values=row["pixels"].to(dtype),
                  image_grid_thw=row["grid"], use_cache=False)
    if trl_head:
        labels = torch.full_like(input_ids, -100)
        labels[0, P:] = row["x0"]  # SFTTrainer's completion-only labels; the fused head shifts them itself
        out = model(**common, labels=labels, fused_lm_head=True)
        loss = -out.log_probs.sum() / R
    else:
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        keep[0, P - 1: P + R - 1] = True  # logit at i predicts token i + 1
        logits = model(**common, logits_mask=keep).logits  # [R, V]
        loss = torch.nn.functional.cross_entropy(logits.float(), row["x0"])
    loss.backward()


def pbm_step(model, row, dtype):
    inputs, labels, rates = packed_inputs(row, dtype)
    R = len(row["x0"])
    logits = model(**inputs, use_cache=False).logits  # [N, V]
    eos = torch.zeros_like(inputs["logits_mask"])
    lengths = torch.tensor([R], device=labels.device)
    loss, _ = block_merge_loss(labels, inputs["logits_mask"], rates, eos, lengths, 1, logits=logits)
    loss.backward()


def swd_step(model, teacher, row, dtype):
    inputs, labels, _ = packed_inputs(row, dtype)
    positions = inputs["logits_mask"] & (inputs["input_ids"] == MASK_ID)  # masked xt tokens (DESIGN 3.6)
    inputs["logits_mask"] = positions
    inputs["position_ids"] = model.get_packed_position_ids(inputs["input_ids"], inputs["segment_ids"],
                                                           inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    with torch.no_grad():
        values, ids = teacher_topk(teacher(**inputs, block_size=TEACHER_B, use_cache=False).logits, TOPK)
    logits = model(**inputs, use_cache=False).logits
    loss, _ = swd_loss(logits, labels[positions], values, ids, int(positions.sum()))
    loss.backward()


def collate(row):
    """The per-row work of the collator that does not depend on the tokenizer: noise and the packed labels."""
    x0 = row["x0"][None]
    gen = torch.Generator(device=x0.device).manual_seed(1)
    MixedNoiseScheduler().add_noise(x0, torch.ones_like(x0, dtype=torch.bool), STUDENT_B, MASK_ID, generator=gen)
    packed_inputs(row, torch.float32)


# ---------------------------------------------------------------------- measurement
def peak_memory(step, device: str = "cpu") -> int:
    """Peak bytes of live allocations during `step()` (allocations made before it, e.g. the weights, excluded)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def timed(step) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def keep_layers(model, layers: int, vision_blocks: int):
    """Run only the first `layers` text layers and `vision_blocks` vision blocks (weights kept, config updated)."""
    text, vision = model.model.language_model, model.model.visual
    if not hasattr(text, "_all_layers"):
        text._all_layers, vision._all_blocks = text.layers, vision.blocks
    text.layers = torch.nn.ModuleList(list(text._all_layers)[:layers])
    text.config.num_hidden_layers = layers
    vision.blocks = torch.nn.ModuleList(list(vision._all_blocks)[:vision_blocks])
    vision.config.depth = vision_blocks
    vision.deepstack_visual_indexes = [vision_blocks - 1]  # one DeepStack tap at any depth
    vision.config.deepstack_visual_indexes = vision.deepstack_visual_indexes


def on_attention(attn: str, models, step):
    """`step` with the block-diffusion models switched to `attn` (and back to sdpa after)."""

    def run():
        for net in models:
            net.set_attn_implementation(attn)
        try:
            step()
        finally:
            for net in models:
                net.set_attn_implementation("sdpa")

    return run


class PartClock:
    """Wall time spent in the forward and backward of each text layer (and, inside it, its attention and its MLP) and
    each vision block, from module hooks (forward pre/post hooks, full-backward pre/post hooks); the rest of a step
    is its total minus the layers and blocks."""

    KINDS = ("text", "vision", "attention", "mlp")

    def __init__(self, model):
        self.text_layers = list(model.model.language_model._all_layers)
        self.vision_blocks = list(model.model.visual._all_blocks)
        self.reset()
        self._start = {}
        self.handles = []
        groups = (("text", self.text_layers), ("vision", self.vision_blocks),
                  ("attention", [layer.self_attn for layer in self.text_layers]),
                  ("mlp", [layer.mlp for layer in self.text_layers]))
        for kind, modules in groups:
            for module in modules:
                self.handles += [
                    module.register_forward_pre_hook(self._begin(module)),
                    module.register_forward_hook(self._end(module, kind)),
                    module.register_full_backward_pre_hook(self._begin(module)),
                    module.register_full_backward_hook(self._end(module, kind)),
                ]

    def _begin(self, module):
        def hook(*_args):
            self._start[id(module)] = time.perf_counter()

        return hook

    def _end(self, module, kind):
        def hook(*_args):
            self.seconds[kind] += time.perf_counter() - self._start.pop(id(module))

        return hook

    def reset(self):
        self.seconds = dict.fromkeys(self.KINDS, 0.0)

    def remove(self):
        for handle in self.handles:
            handle.remove()


STEP_KEYS = {"ar-trl": "AR SFT (TRL)", "ar-head": "AR SFT (response head)", "pbm": "PBM", "swd": "SWD"}


def measure_steps(models, row, dtype, repeats: int, with_memory: bool, attns=("sdpa",), device="cpu",
                  trl_repeats: int | None = None, only=None):
    """Per step: ``{"total", "text_layer", "vision_block", "rest"}`` median seconds (2 text layers and 2 vision blocks
    run, each part timed by `PartClock`) and the peak bytes at the depths (1, 1), (2, 1), (1, 2) (memory is
    deterministic, so a layer's and a block's memory are differences). PBM and SWD run once per attention
    implementation in `attns` (FlexAttention trains on GPUs only)."""
    student, teacher, trl_model = models
    steps = {
        "AR SFT (TRL)": (trl_model, lambda: ar_step(trl_model, row, dtype, True)),
        "AR SFT (response head)": (student, lambda: ar_step(student, row, dtype, False)),
    }
    for attn in attns:
        suffix = "" if attn == "sdpa" else f" [{attn}]"
        steps[f"PBM{suffix}"] = (student, on_attention(attn, [student], lambda: pbm_step(student, row, dtype)))
        steps[f"SWD{suffix}"] = (
            student, on_attention(attn, [student, teacher], lambda: swd_step(student, teacher, row, dtype)))
    if only:
        wanted = [STEP_KEYS[key] for key in only]
        steps = {name: run for name, run in steps.items() if name.split(" [")[0] in wanted}
    peaks = {}
    for depth in ((1, 1), (2, 1), (1, 2)):
        for net in (student, teacher, trl_model):
            keep_layers(net, *depth)
        for name, (net, step) in steps.items():  # also the warm-up of the allocator and the thread pools
            net.zero_grad(set_to_none=True)
            peaks[(name, *depth)] = peak_memory(step, device) if with_memory else 0
    for net in (student, teacher, trl_model):
        keep_layers(net, 2, 2)
        net.zero_grad(set_to_none=True)
    clocks = {id(net): PartClock(net) for net in (student, teacher, trl_model)}
    teacher_clock = clocks[id(teacher)]
    times = {name: [] for name in steps}
    for index in range(max(repeats, trl_repeats or 0)):
        for name, (net, step) in steps.items():
            if name == "AR SFT (TRL)" and trl_repeats is not None and index >= trl_repeats:
                continue
            clock = clocks[id(net)]
            clock.reset()
            teacher_clock.reset()
            net.zero_grad(set_to_none=True)
            total = timed(step)
            # SWD: the frozen teacher's forward through its layers scales with depth too (it is 0 elsewhere)
            both = {kind: clock.seconds[kind] + teacher_clock.seconds[kind] for kind in PartClock.KINDS}
            times[name].append((total, both["text"] / 2, both["vision"] / 2, both["attention"] / 2, both["mlp"] / 2))
    for clock in clocks.values():
        clock.remove()
    results = {}
    for name, runs in times.items():
        total, layer, block, attention, mlp = (statistics.median(run[i] for run in runs) for i in range(5))
        m11, m21, m12 = (peaks[(name, *depth)] for depth in ((1, 1), (2, 1), (1, 2)))
        results[name] = {"total_2_layers_2_blocks": total, "text_layer": layer, "vision_block": block,
                         "attention": attention, "mlp": mlp,
                         "rest": total - 2 * layer - 2 * block, "peak_1_1": m11, "peak_2_1": m21,
                         "layer_bytes": m21 - m11, "block_bytes": m12 - m11, "runs": len(runs)}
    for net in (student, teacher, trl_model):
        net.zero_grad(set_to_none=True)
    return results


def project(part, text_depth, vision_depth):
    """(seconds, bytes) of a step at full depth from its parts (a projection)."""
    seconds = part["rest"] + text_depth * part["text_layer"] + vision_depth * part["vision_block"]
    memory = part["peak_1_1"] + (text_depth - 1) * part["layer_bytes"] + (vision_depth - 1) * part["block_bytes"]
    return seconds, memory


def attention_backends(size, P, R, image_side, dtype, repeats, layers, device="cpu"):
    """Forward of the packed row with sdpa (dense mask) and flex_attention (BlockMask): {backend: (s, bytes)}."""
    out = {}
    for attn in ("sdpa", "flex_attention"):
        model = build(size, layers, 1, dtype, attn, device=device).eval()
        row = make_row(model.config, P, R, image_side, device=device)
        inputs, _, _ = packed_inputs(row, dtype)

        def forward(model=model, inputs=inputs):
            with torch.no_grad():
                model(**inputs, use_cache=False)

        compile_s = timed(forward)  # flex compiles its kernel here
        times = [timed(forward) for _ in range(repeats)]
        out[attn] = (statistics.median(times), peak_memory(forward, device), compile_s)
        del model
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["2b", "4b", "tiny"], default="2b")
    parser.add_argument("--lengths", nargs="+", default=["2048:512", "4096:1024"], help="prompt:response P:R")
    parser.add_argument("--image-side", type=int, default=512, help="pixels per side of the one image (16px patches)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--attn", nargs="+", default=["sdpa"], choices=["sdpa", "flex_attention"],
                        help="attention implementations for the PBM and SWD steps (flex trains on GPUs only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trl-repeats", type=int, default=None,
                        help="timed runs of the AR SFT (TRL) step (default --repeats; on CPU it is the slowest)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-backends", action="store_true", help="only the training-step table")
    parser.add_argument("--only", nargs="+", choices=sorted(STEP_KEYS), default=None,
                        help="measure only these steps (ratios then refer to the first one present)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs (time only)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny width, short rows: checks the script runs")
    cli = parser.parse_args(argv)
    if cli.quick:
        cli.size, cli.lengths, cli.image_side, cli.repeats, cli.dtype = "tiny", ["64:32"], 64, 1, "float32"
        cli.trl_repeats = None
    if cli.threads:
        torch.set_num_threads(cli.threads)
    dtype = getattr(torch, cli.dtype)
    text_depth, vision_depth = FULL_DEPTH.get(cli.size, (2, 2))

    from trl.trainer.utils import add_fused_lm_head

    if "flex_attention" in cli.attn and not cli.device.startswith("cuda"):
        parser.error("--attn flex_attention trains on GPUs only (torch has no FlexAttention backward on CPU)")
    student = build(cli.size, 2, 2, dtype, device=cli.device)
    teacher = build(cli.size, 2, 2, dtype, seed=1, device=cli.device).eval()
    teacher.requires_grad_(False)
    trl_model = build(cli.size, 2, 2, dtype, device=cli.device)
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy", "is_top1"))
    config = student.config.text_config
    where = torch.cuda.get_device_name() if cli.device.startswith("cuda") else "CPU"
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {cli.dtype}, {where}")
    print(f"model: Qwen3-VL-{cli.size.upper()} width (hidden {config.hidden_size}, MLP {config.intermediate_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads of {config.head_dim}, vocab "
          f"{config.vocab_size:,}); measured at 1-2 text layers and 1-2 vision blocks, projected to "
          f"{text_depth} and {vision_depth}; one {cli.image_side}px image; batch 1; student B = {STUDENT_B}, "
          f"teacher B = {TEACHER_B}\n")

    record = {"size": cli.size, "dtype": cli.dtype, "threads": torch.get_num_threads(), "lengths": {}}
    for spec in cli.lengths:
        P, R = (int(x) for x in spec.split(":"))
        row = make_row(student.config, P, R, cli.image_side, device=cli.device)
        collate_s = statistics.median(timed(functools.partial(collate, row)) for _ in range(3))
        results = measure_steps((student, teacher, trl_model), row, dtype, cli.repeats, with_memory=not cli.no_memory,
                                attns=cli.attn, device=cli.device, trl_repeats=cli.trl_repeats, only=cli.only)
        projected = {name: project(part, text_depth, vision_depth) for name, part in results.items()}
        fallback = next(iter(projected.values()))
        ar_trl = projected.get("AR SFT (TRL)", fallback)
        ar_head = projected.get("AR SFT (response head)", fallback)
        print(f"### P:R = {P}:{R} (AR row {P + R} tokens, packed row {P + 2 * R}; "
              f"{int(row['noise'].corrupted.sum())} corrupted; collate {collate_s * 1e3:.1f} ms)\n")
        print("| step | runs | measured s (2 layers, 2 blocks) | measured peak GB (2 layers, 1 block) | full depth s "
              "(projection) | peak GB (projection) | time / AR TRL | time / AR head | memory / AR TRL "
              "| memory / AR head |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, (seconds, memory) in projected.items():
            part = results[name]
            print(f"| {name} | {part['runs']} | {part['total_2_layers_2_blocks']:.1f} | {part['peak_2_1'] / 2**30:.2f} "
                  f"| {seconds:.1f} | {memory / 2**30:.2f} | {seconds / ar_trl[0]:.2f} | {seconds / ar_head[0]:.2f} "
                  f"| {memory / max(ar_trl[1], 1):.2f} | {memory / max(ar_head[1], 1):.2f} |")
        print(f"\n| step | per text layer s (SWD: + teacher's) | of it attention s | of it MLP s | x {text_depth} s "
              f"| per vision block s | x {vision_depth} s | rest (embedding, LM head, loss) s | text layer MB "
              "| vision block MB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, part in results.items():
            print(f"| {name} | {part['text_layer']:.2f} | {part['attention']:.2f} | {part['mlp']:.2f} "
                  f"| {part['text_layer'] * text_depth:.1f} "
                  f"| {part['vision_block']:.3f} | {part['vision_block'] * vision_depth:.1f} | {part['rest']:.2f} "
                  f"| {part['layer_bytes'] / 2**20:.0f} | {part['block_bytes'] / 2**20:.0f} |")
        print()
        record["lengths"][spec] = {
            "collate_s": collate_s,
            "parts": results,
            "projected": {name: {"s": v[0], "peak_bytes": v[1]} for name, v in projected.items()},
        }
    del student, teacher, trl_model

    if not cli.skip_backends:
        print("### Attention backends: forward of the packed row, no gradients, 1 text layer\n")
        print("| P:R | tokens | sdpa ms | flex ms | flex / sdpa | sdpa peak MB | flex peak MB | flex compile s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for spec in cli.lengths:
            P, R = (int(x) for x in spec.split(":"))
            backends = attention_backends(cli.size, P, R, cli.image_side, dtype, max(cli.repeats, 2), 1, cli.device)
            (s_t, s_m, _), (f_t, f_m, f_c) = backends["sdpa"], backends["flex_attention"]
            print(f"| {P}:{R} | {P + 2 * R} | {s_t * 1e3:.0f} | {f_t * 1e3:.0f} | {f_t / s_t:.2f} "
                  f"| {s_m / 2**20:.0f} | {f_m / 2**20:.0f} | {f_c:.1f} |")
            record["lengths"].setdefault(spec, {})["backends"] = {
                k: {"s": v[0], "peak_bytes": v[1], "first_call_s": v[2]} for k, v in backends.items()}
    if cli.json:
        with open(cli.json, "w") as handle:
            json.dump(record, handle, indent=1)
    return record


if __name__ == "__main__":
    main()
