"""Latency of chat requests through `vllm.LLM` in-process (no OpenAI server), with a new image per request and with
one image repeated, to split the load table's vLLM time between the engine, its caches and the server path
(docs/serving/README.md, "Under load"). Run in the vLLM environment, on one core:

    TRITON_INTERPRET=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=1 \
        OMP_NUM_THREADS=1 taskset -c 1 .venv-vllm/bin/python benchmarks/vllm_offline_latency.py CHECKPOINT bard|ar IMAGE.png [QUESTION]

vLLM keys its multimodal processor cache and its prefix cache by the image's content, so a repeated image skips the
processor and the vision tower (and the prompt's prefill): "new image" requests each change one pixel of IMAGE.png
(its size and content otherwise the same), "same image" requests send it unchanged. QUESTION: the text after the
image, by default the digits task's `read` question (a 37-token answer on a 4 x 4 grid). Each: the median of 9 at batch 1,
then 16 at once (16 new images, or one image 16 times). BARD decodes with the checkpoint's greedy settings, the AR
source with temperature 0.
"""

from __future__ import annotations

import base64
import io
import statistics
import sys
import time


def image_url(image, variant: int | None) -> str:
    """`image` as a PNG data URL; with `variant`, pixel (variant mod width, variant // width) inverted first."""
    if variant is not None:
        image = image.copy()
        x, y = variant % image.width, (variant // image.width) % image.height
        pixel = image.getpixel((x, y))
        image.putpixel((x, y), tuple(255 - c for c in pixel) if isinstance(pixel, tuple) else 255 - pixel)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


QUESTION = "Read all digits row by row."


def messages(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def main() -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    checkpoint, kind, image_path = sys.argv[1:4]
    question = sys.argv[4] if len(sys.argv) > 4 else QUESTION
    if kind not in ("bard", "ar"):
        raise SystemExit(f"the second argument must be 'bard' or 'ar', got {kind!r}")
    image = Image.open(image_path).convert("RGB")
    llm = LLM(model=checkpoint, dtype="float32", max_model_len=2048, max_num_seqs=16, enforce_eager=True)
    params = SamplingParams(max_tokens=96) if kind == "bard" else SamplingParams(max_tokens=96, temperature=0)
    llm.chat(messages(image_url(image, None), question), params, use_tqdm=False)  # warm-up (and the "same image" cache entry)
    variants = iter(range(1, 10_000))
    for name, make in (("new image", lambda: image_url(image, next(variants))),
                       ("same image", lambda: image_url(image, None))):
        times, tokens = [], []
        for _ in range(9):
            request = messages(make(), question)
            start = time.perf_counter()
            output = llm.chat(request, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
            tokens.append(len(output[0].outputs[0].token_ids))
        batch = [messages(make(), question) for _ in range(16)]
        start = time.perf_counter()
        outputs = llm.chat(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        batch_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"{kind} {name}: batch 1 median {statistics.median(times):.3f} s ({statistics.median(tokens):.0f} "
              f"tokens); 16 at once {seconds:.3f} s, {batch_tokens / seconds:.1f} tokens/s", flush=True)


if __name__ == "__main__":  # vLLM starts worker processes: the guard keeps them from rerunning this
    main()
