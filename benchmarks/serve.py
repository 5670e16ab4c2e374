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
    python benchmarks/serve.py --model demo_output/pbm/stage-b32 --abuse --clients 16

With `--abuse` only the BARD server runs, and each client count runs twice: honest clients alone ("bard"), then the
same honest clients while one bounded abuser sends hostile requests one after another ("bard+abuse"): a 17.5 KB PNG
declaring 12000 x 12000 pixels, a body declared as 64 MiB, a streaming client that hangs up after its first chunk,
9 images in one prompt and a NaN temperature (issue 39). Reported besides the table: what the server answered the
abuser, and the server's peak resident memory (VmHWM) after the honest-only runs and after the abused ones.
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
    parser.add_argument("--abuse", action="store_true",
                        help="BARD server only: each client count without and with a bounded abuser (bombs, huge "
                             "bodies, disconnects); reports honest tokens/s, p95 latency and the server's peak RSS")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                        help="python of the vLLM environment (default: .venv-vllm of `make vllm`)")
    args = parser.parse_args()
    if args.abuse and (args.verify or args.engines != ["transformers-bard"]):
        parser.error("--abuse runs the transformers-bard BARD server alone: drop --verify and --engines.")
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


def png_bomb(width: int = 12000, height: int = 12000) -> bytes:
    """A 1-bit grayscale PNG of zero pixels written by hand: 17.5 KB declaring 144 M pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


class Abuser:
    """One hostile request at a time, in turn, until stopped; counts what the server answered each kind."""

    def __init__(self, server: Server):
        self.server, self.answers = server, {}
        self.bomb = "data:image/png;base64," + base64.b64encode(png_bomb()).decode()

    def _post(self, body: dict) -> str:
        return str(httpx.post(f"{self.server.url}/v1/chat/completions", json=body, timeout=60).status_code)

    def _raw(self, head: bytes, body: bytes, read_until: bytes) -> str:
        """A request on a raw socket; reads until `read_until`, then hangs up. Returns the status line's code."""
        import socket

        with socket.create_connection(("127.0.0.1", self.server.port), timeout=60) as sock:
            try:
                sock.sendall(head + body)
            except OSError:  # the server answered and closed before the body was sent
                pass
            received = b""
            while read_until not in received:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        return received.split(b" ", 2)[1].decode() if received.startswith(b"HTTP/") else "closed"

    def requests(self):
        name, text = self.server.name, "Tell me a long story."
        image = {"type": "image_url", "image_url": {"url": image_url(0)}}
        long_stream = json.dumps({"model": name, "messages": [{"role": "user", "content": text}], "max_tokens": 10_000,
                                  "stream": True}).encode()
        yield "png bomb", lambda: self._post({"model": name, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": self.bomb}}, {"type": "text", "text": text}]}]})
        yield "64 MiB body", lambda: self._raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 67108864\r\n\r\n", b"{" + b" " * 65536, b"\r\n\r\n")
        yield "hang-up mid-stream (status before it)", lambda: self._raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(long_stream)}\r\n\r\n".encode(), long_stream, b"data: ")
        yield "9 images", lambda: self._post({"model": name, "messages": [{"role": "user", "content": [image] * 9}]})
        yield "NaN temperature", lambda: str(httpx.post(
            f"{self.server.url}/v1/chat/completions", headers={"content-type": "application/json"}, timeout=60,
            content=json.dumps({"model": name, "messages": [{"role": "user", "content": text}]})[:-1]
            + ', "temperature": NaN}').status_code)

    def run(self, stop: threading.Event) -> None:
        kinds = list(self.requests())
        index = 0
        while not stop.is_set():
            kind, send = kinds[index % len(kinds)]
            index += 1
            try:
                answer = send()
            except Exception as error:  # noqa: BLE001 (counted: what the abuser saw)
                answer = type(error).__name__
            counts = self.answers.setdefault(kind, {})
            counts[answer] = counts.get(answer, 0) + 1


def peak_rss_mib(server: Server) -> float:
    """The server process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def abuse_runs(server: Server, args) -> tuple[list[dict], dict]:
    """Each client count without, then with, the abuser; returns the rows and the peak RSS after each half."""
    rows, peaks, abuser = [], {}, Abuser(server)
    for clients in args.clients:
        rows.append({"server": "bard", "clients": clients,
                     **run_level(server, clients, args.requests_per_client, args.max_tokens)})
    peaks["honest only"] = peak_rss_mib(server)
    for clients in args.clients:
        stop = threading.Event()
        thread = threading.Thread(target=abuser.run, args=(stop,))
        thread.start()
        try:
            rows.append({"server": "bard+abuse", "clients": clients,
                         **run_level(server, clients, args.requests_per_client, args.max_tokens)})
        finally:
            stop.set()
            thread.join()
    peaks["with the abuser"] = peak_rss_mib(server)
    return rows, {"peaks": peaks, "answers": abuser.answers}


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
        servers, abuse = [], None
        if args.abuse:
            servers.append(Server("bard", str(bard_path), ["--max-batch-size", str(args.max_batch_size)],
                                  args.threads))
        elif "transformers-bard" in args.engines:
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
            if args.abuse:
                rows, abuse = abuse_runs(servers[0], args)
            for level, clients in enumerate([] if args.abuse else args.clients):
                for server in servers if level % 2 == 0 else servers[::-1]:
                    run = run_level(server, clients, args.requests_per_client, args.max_tokens)
                    rows.append({"server": server.name, "clients": clients, **run})
        finally:
            for server in servers:
                server.stop()
    order = ["bard", "bard+abuse", "bard-verified", "ar", "bard-vllm", "ar-vllm"]
    rows.sort(key=lambda row: (row["clients"], order.index(row["server"])))
    print(f"bard: {bard_path}")
    if not args.abuse:
        print(f"ar: {ar_path} (transformers-bard serve: one generate at a time)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"{args.threads} torch thread(s) per server; python {platform.python_version()}")
    print(f"{args.requests_per_client} streaming request(s) per client, max_tokens {args.max_tokens}, greedy; "
          "tokens/s = completion tokens of all clients / wall time")
    print("\n".join(table(rows)))
    answers = {(row["server"], row["clients"], r["index"]): r["text"] for row in rows for r in row["results"]}
    print()
    if abuse is not None:
        peaks = abuse["peaks"].items()
        print("server's peak RSS (VmHWM): " + ", ".join(f"{mib:.0f} MiB {when}" for when, mib in peaks))
        print("the abuser's requests and the server's answers: " + "; ".join(
            f"{kind}: " + ", ".join(f"{count} x {answer}" for answer, count in sorted(counts.items()))
            for kind, counts in abuse["answers"].items()))
        same = [text == answers[("bard", clients, index)] for (server, clients, index), text in answers.items()
                if server == "bard+abuse" and ("bard", clients, index) in answers]
        print(f"honest answers equal with and without the abuser: {sum(same)} of {len(same)}")
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
