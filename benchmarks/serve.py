"""Load test of `transformers-bard serve` (continuous batching of block-diffusion decoding) against the AR source.

Both models are served over the same OpenAI-compatible HTTP API on local ports, each in its own process:
- "bard": `transformers-bard serve CHECKPOINT`, requests join the running batch and leave it when done;
- "ar": `transformers-bard serve AR_SOURCE --autoregressive`, one `model.generate` at a time with a streamer. That is
  how `transformers serve` itself serves a vision-language model (its continuous batching takes text-only LMs), and
  `transformers serve` cannot load a stock Qwen3-VL here at all: its processor needs torchvision
  (docs/serving/README.md, "Why not transformers serve").

With `--verify` a third transformers-bard server joins: "bard-verified", `transformers-bard serve CHECKPOINT --verifier
AR_SOURCE` (verified decoding, DESIGN 4.2 a: one `generate(verifier=...)` at a time, every answer the AR source's).

With `--engines transformers-bard vllm` the same two checkpoints are also served by vLLM (`python -m
vllm.entrypoints.openai.api_server` from the vLLM environment of `make vllm`, one engine core; on this CPU through
Model Runner V2, docs/serving/engines.md section 9): "bard-vllm" through this package's vLLM plugin, which needs a
checkpoint converted with the causal prompt (`transformers-bard demo --prompt-attention causal`), and "ar-vllm", the
AR source on the same runner. BARD's requests to vLLM carry no temperature (the plugin decodes with the checkpoint's
own greedy settings); every other request asks for temperature 0.

For each number of concurrent clients (`--clients`, default 1 4 16) each client sends `--requests-per-client`
streaming chat completions one after the other (greedy, `--max-tokens`), cycling through text and image prompts.
The two servers are interleaved: every client count runs against both before the next, in an order that alternates.
Reported per server and client count: completion tokens per second over the run's wall time, time to first token
(first content chunk) and request latency (p50, p95).

    python benchmarks/serve.py --quick
    python benchmarks/serve.py --model demo_output/pbm/stage-b32 --clients 1 4 16 --requests-per-client 4
    python benchmarks/serve.py --model causal_run/swd-b32/stage-b32 --prompts digits --engines transformers-bard vllm
"""

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is shown in the picture?", "Describe the image in one sentence.", "What color dominates?",
             "Write a short sentence about the weather.", "Count from one to five."]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="BARD-VL checkpoint (default with --quick: a toy one).")
    parser.add_argument("--ar-source", default=None,
                        help="AR Qwen3-VL checkpoint (default: the checkpoint's `source_model`).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="Per request (default 64; 96 with --prompts digits: the longest answer is 77 tokens).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process (default 1).")
    parser.add_argument("--max-batch-size", type=int, default=16, help="of the BARD server (default 16).")
    parser.add_argument("--quick", action="store_true",
                        help="Toy checkpoints built offline, 1 request per client, 16 tokens: checks that it runs.")
    parser.add_argument("--workdir", default=None, help="Where --quick builds its checkpoints (default: a temp dir).")
    parser.add_argument("--prompts", choices=["generic", "digits"], default="generic",
                        help="generic: short questions, every other with a random image; digits: the digits task's "
                             "test questions with their grids (for the demo's models), and exact match reported")
    parser.add_argument("--verify", action="store_true",
                        help="Also serve the checkpoint with `--verifier AR_SOURCE` (the 'bard-verified' rows).")
    parser.add_argument("--engines", nargs="+", choices=["transformers-bard", "vllm"], default=["transformers-bard"],
                        help="which servers to load: transformers-bard serve (default) and/or vLLM's OpenAI server")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                        help="python of the vLLM environment (default: .venv-vllm of `make vllm`)")
    args = parser.parse_args()
    if "vllm" in args.engines and not Path(args.vllm_python).exists():
        parser.error(f"--engines vllm needs the vLLM environment: {args.vllm_python} does not exist; run `make vllm`.")
    if args.max_tokens is None:
        args.max_tokens = 96 if args.prompts == "digits" else 64
    if args.quick:
        args.requests_per_client, args.max_tokens = 1, 16
    elif args.model is None:
        parser.error("--model is required without --quick.")
    if min(args.clients) < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        parser.error("--clients, --requests-per-client and --max-tokens must be >= 1.")
    return args


def toy_checkpoints(workdir: Path, for_vllm: bool = False) -> tuple[Path, Path]:
    """A tiny random Qwen3-VL and its BARD-VL conversion (B = 4); servable by vLLM too with `for_vllm` (heads of 64,
    causal prompt)."""
    from transformers_bard import convert_from_autoregressive
    from transformers_bard.testing import VLLM_CPU_CONFIG_OVERRIDES, build_tiny_qwen3_vl

    source = build_tiny_qwen3_vl(workdir / "ar", config_overrides=VLLM_CPU_CONFIG_OVERRIDES if for_vllm else None)
    bard = convert_from_autoregressive(source, workdir / "bard", block_size=4, overwrite=True,
                                       prompt_attention="causal" if for_vllm else "block_causal")
    return bard, source


def ar_source_of(checkpoint: str) -> str:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    if not config.get("source_model"):
        sys.exit(f"{checkpoint} records no `source_model`: pass --ar-source.")
    return config["source_model"]


def image_url(seed: int) -> str:
    from transformers_bard.testing import make_image

    buffer = io.BytesIO()
    make_image(seed, (64, 64)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


DIGITS_ROWS = []  # (messages, reference) of the digits test split, filled by `main` for --prompts digits


def digits_rows(count: int) -> list[tuple[list[dict], str]]:
    """The digits task's test questions (balanced over question types) in OpenAI's message format."""
    from transformers_bard.demo.digits import build_digits_dataset

    rows = []
    for row in build_digits_dataset("test", count, seed=0, balanced=True):
        user = row["messages"][0]
        content = []
        images = iter(row["images"])
        for part in user["content"]:
            if part["type"] == "image":
                buffer = io.BytesIO()
                next(images).save(buffer, format="PNG")
                url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
                content.append({"type": "image_url", "image_url": {"url": url}})
            else:
                content.append({"type": "text", "text": part["text"]})
        rows.append(([{"role": "user", "content": content}], row["messages"][-1]["content"][-1]["text"]))
    return rows


def messages_for(index: int) -> list[dict]:
    """Every other request carries an image; with --prompts digits, the digits test questions in turn."""
    if DIGITS_ROWS:
        return DIGITS_ROWS[index % len(DIGITS_ROWS)][0]
    question = QUESTIONS[index % len(QUESTIONS)]
    if index % 2:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(index)}},
                                         {"type": "text", "text": question}]}]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`transformers-bard serve` in a subprocess on a free port."""

    request_extra = {"temperature": 0}  # merged into every chat request's body

    def __init__(self, name: str, checkpoint: str, extra: list[str], threads: int):
        self.listen(name)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "transformers_bard.cli", "serve", checkpoint, "--port", str(self.port),
                   "--served-model-name", name, "--threads", str(threads), *extra]
        self.start(command, env)

    def listen(self, name: str) -> None:
        """Name the server and give it a free local port."""
        self.port = free_port()
        self.name, self.url = name, f"http://127.0.0.1:{self.port}"

    def start(self, command: list[str], env: dict) -> None:
        # the server's log goes to a file: a pipe nobody reads would block a chatty server (vLLM logs every step)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log,
                                        text=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                sys.exit(f"the {self.name} server exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        sys.exit(f"the {self.name} server did not start within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class VllmServer(Server):
    """vLLM's OpenAI server (vllm-cpu 0.32: `python -m vllm.entrypoints.openai.api_server`; its `vllm` console script
    does not start, docs/serving/engines.md section 9) in the vLLM environment, its engine on one core."""

    def __init__(self, name: str, checkpoint: str, vllm_python: str, threads: int, bard: bool):
        self.listen(name)
        # BARD: the plugin decodes with the checkpoint's own (greedy) settings; vLLM asks diffusion requests for its
        # neutral sampling values, so the request sets none. AR: greedy like every other server here.
        self.request_extra = {} if bard else {"temperature": 0}
        core = sorted(os.sched_getaffinity(0))[-1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": str(core) if threads == 1 else f"{core - threads + 1}-{core}",
               "OMP_NUM_THREADS": str(threads)}
        command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--port",
                   str(self.port), "--host", "127.0.0.1", "--served-model-name", name, "--dtype", "float32",
                   "--max-model-len", "2048", "--max-num-seqs", "16", "--enforce-eager"]
        self.start(command, env)


def one_request(server: Server, index: int, max_tokens: int) -> dict:
    """Stream one chat completion; returns its time to first token, latency and completion tokens."""
    body = {"model": server.name, "messages": messages_for(index), "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, **server.request_extra}
    start = time.perf_counter()
    first = None
    tokens = 0
    text = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{server.name}: {chunk['error']}")
            if first is None and any(choice["delta"].get("content") for choice in chunk["choices"]):
                first = time.perf_counter() - start
            text += [choice["delta"].get("content") or "" for choice in chunk["choices"]]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return {"ttft": latency if first is None else first, "latency": latency, "tokens": tokens, "index": index,
            "text": "".join(text)}


def run_level(server: Server, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    results, errors = [], []

    def client(c):
        for r in range(requests_per_client):
            try:
                results.append(one_request(server, c * requests_per_client + r, max_tokens))
            except Exception as error:  # noqa: BLE001 (reported after the run)
                errors.append(error)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return {"wall": wall, "results": results}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def exact_match(results: list[dict]) -> str:
    from transformers_bard.demo.digits import score_answer

    if not DIGITS_ROWS:
        return "-"
    hits = [score_answer(r["text"], DIGITS_ROWS[r["index"] % len(DIGITS_ROWS)][1]) for r in results]
    return f"{sum(hits) / len(hits):.3f}"


def table(rows: list[dict]) -> list[str]:
    header = ["server", "clients", "requests", "tokens/s", "TTFT p50 (s)", "latency p50 (s)", "latency p95 (s)",
              "exact match"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        results = row["results"]
        tokens = sum(r["tokens"] for r in results)
        cells = [row["server"], str(row["clients"]), str(len(results)), f"{tokens / row['wall']:.1f}",
                 f"{statistics.median(r['ttft'] for r in results):.3f}",
                 f"{statistics.median(r['latency'] for r in results):.3f}",
                 f"{percentile([r['latency'] for r in results], 0.95):.3f}", exact_match(results)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main():
    args = parse_args()
    if args.prompts == "digits":
        DIGITS_ROWS.extend(digits_rows(max(args.clients) * args.requests_per_client))
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick and args.model is None:
            bard_path, ar_path = toy_checkpoints(Path(args.workdir or tmp), for_vllm="vllm" in args.engines)
        else:
            bard_path, ar_path = Path(args.model), Path(args.ar_source or ar_source_of(args.model))
        servers = []
        if "transformers-bard" in args.engines:
            servers += [Server("bard", str(bard_path), ["--max-batch-size", str(args.max_batch_size)], args.threads),
                        Server("ar", str(ar_path), ["--autoregressive"], args.threads)]
            if args.verify:
                servers.append(Server("bard-verified", str(bard_path), ["--verifier", str(ar_path)], args.threads))
        if "vllm" in args.engines:
            servers += [VllmServer("bard-vllm", str(bard_path), args.vllm_python, args.threads, bard=True),
                        VllmServer("ar-vllm", str(ar_path), args.vllm_python, args.threads, bard=False)]
        try:
            for server in servers:
                server.wait_ready()
            for server in servers:  # warm-up: the first request pays for lazy initialisation
                run_level(server, 1, 1, min(args.max_tokens, 8))
            rows = []
            for level, clients in enumerate(args.clients):
                for server in servers if level % 2 == 0 else servers[::-1]:
                    run = run_level(server, clients, args.requests_per_client, args.max_tokens)
                    rows.append({"server": server.name, "clients": clients, **run})
        finally:
            for server in servers:
                server.stop()
    order = ["bard", "bard-verified", "ar", "bard-vllm", "ar-vllm"]
    rows.sort(key=lambda row: (row["clients"], order.index(row["server"])))
    print(f"bard: {bard_path}\nar: {ar_path} (transformers-bard serve: one generate at a time)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"{args.threads} torch thread(s) per server; python {platform.python_version()}")
    print(f"{args.requests_per_client} streaming request(s) per client, max_tokens {args.max_tokens}, greedy; "
          "tokens/s = completion tokens of all clients / wall time")
    print("\n".join(table(rows)))
    answers = {(row["server"], row["clients"], r["index"]): r["text"] for row in rows for r in row["results"]}
    print()
    for left, right, what in (("bard", "ar", "BARD's answers equal to AR's"),
                              ("bard-verified", "ar", "verified BARD's answers equal to AR's"),
                              ("bard-vllm", "ar-vllm", "BARD's answers equal to AR's under vLLM"),
                              ("bard-vllm", "bard", "BARD's answers under vLLM equal to transformers-bard serve's")):
        same = [text == answers[(right, clients, index)] for (server, clients, index), text in answers.items()
                if server == left and (right, clients, index) in answers]
        if same:
            print(f"{what} on the same requests: {sum(same)} of {len(same)}")


if __name__ == "__main__":
    main()
