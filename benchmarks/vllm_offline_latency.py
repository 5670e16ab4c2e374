"""Latency of one chat request through `vllm.LLM` in-process (no OpenAI server), to split the load table's vLLM time
between the engine and the server path (docs/serving/README.md, "Under load"). Run in the vLLM environment:

    TRITON_INTERPRET=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=1 \
        taskset -c 1 .venv-vllm/bin/python benchmarks/vllm_offline_latency.py CHECKPOINT bard|ar IMAGE.png

An image request and a text request ("Read the grid."): median of 5 at batch 1, then 16 at once.
"""
import base64, sys, time
def main():
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=2048, max_num_seqs=16, enforce_eager=True)
    url = "data:image/png;base64," + base64.b64encode(open(sys.argv[3], "rb").read()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Read the grid."}]}]
    text = [{"role": "user", "content": "Read the grid."}]
    p = SamplingParams(max_tokens=96) if sys.argv[2] == "bard" else SamplingParams(max_tokens=96, temperature=0)
    for name, m in (("image", msgs), ("text", text)):
        llm.chat(m, p, use_tqdm=False)
        times = []
        for _ in range(5):
            t = time.perf_counter(); out = llm.chat(m, p, use_tqdm=False); times.append(time.perf_counter() - t)
        print(sys.argv[2], name, "tokens", len(out[0].outputs[0].token_ids), "median s", sorted(times)[2], flush=True)
        # 16 at once
        t = time.perf_counter(); outs = llm.chat([m] * 16, p, use_tqdm=False); s = time.perf_counter() - t
        print(sys.argv[2], name, "16 at once: s", round(s, 3), "tokens/s", round(sum(len(o.outputs[0].token_ids) for o in outs) / s, 1), flush=True)
if __name__ == "__main__":
    main()
