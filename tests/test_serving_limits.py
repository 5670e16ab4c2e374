"""`transformers-bard serve` against hostile and careless clients (issue 39 parts 2-4): bombs, floods, ghosts and
strangers.

Each case is sent to the app in process (FastAPI's test client, or the ASGI app driven by hand where a client must
leave mid-answer), around the tiny BARD-VL checkpoint; one subprocess server checks SIGTERM. What must hold: the
answer is an OpenAI-shaped JSON error naming the limit, nothing reaches the engine when a request is refused, the
costly step (decoding pixels, tokenizing) is never reached when the cheap check already refuses, and a client that
leaves frees its row at the engine's next iteration.
"""

import asyncio
import base64
import contextlib
import io
import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest

from conftest import REPO, free_port, offline_env, stop_process
from transformers_bard.testing import make_image

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from transformers_bard.serving import BlockDiffusionScheduler, ServeLimits  # noqa: E402
from transformers_bard.serving.openai_api import create_app  # noqa: E402
from transformers_bard.serving.scheduler import DONE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_MODEL_LEN = 160
MODEL = "bard-tiny"


# ---------------------------------------------------------------------------------------------- fixtures, helpers
@pytest.fixture(scope="module")
def bard(tiny_bard_vl_dir):
    from transformers import AutoModel

    from transformers_bard import BardVLProcessor

    return AutoModel.from_pretrained(tiny_bard_vl_dir).eval(), BardVLProcessor.from_pretrained(tiny_bard_vl_dir)


@contextlib.contextmanager
def serving(bard, *, start=True, engine=None, **app_options):
    """(test client, engine): the app around a `BlockDiffusionScheduler` of the tiny model, started unless
    `start=False` (then nothing decodes: queued requests stay in `engine._pending`)."""
    model, processor = bard
    engine = engine or BlockDiffusionScheduler(model, max_batch_size=4)
    if start:
        engine.start()
    try:
        app = create_app(engine, processor, MODEL, MAX_MODEL_LEN, **app_options)
        with TestClient(app, raise_server_exceptions=False) as http:
            yield http, engine
    finally:
        engine.close()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_bytes(image_format: str, size=(32, 32), seed=0) -> bytes:
    buffer = io.BytesIO()
    make_image(seed, size).save(buffer, format=image_format)
    return buffer.getvalue()


def chat(*urls, text="What is in the picture?", **fields) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": text}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def assert_error(response, status: int, code=None, *, param=None, mentions=()):
    """An OpenAI-shaped JSON error with this status (and code, param, words in its message)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    for word in mentions:
        assert word in error["message"], error["message"]
    return error


def png_bomb(width=12000, height=12000) -> bytes:
    """A 1-bit grayscale PNG of `width` x `height` zero pixels, written by hand: 17.5 KB at 12000 x 12000, 144 M
    pixels (Pillow: 144 MB as mode "1", 432 MB as RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * height, 9)  # filter byte + packed bits per row
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.fixture
def pixel_loads(monkeypatch):
    """Every `ImageFile.load()` (where Pillow decodes pixels) as (format, size); a 12000 x 12000 load fails the
    test at once instead of allocating."""
    from PIL import ImageFile

    loads, original = [], ImageFile.ImageFile.load

    def load(image):
        loads.append((image.format, image.size))
        assert image.size[0] * image.size[1] < 10**8, f"decoding a {image.size} image"
        return original(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return loads


# ---------------------------------------------------------------------------------------------- bombs
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, on opening the header
def test_png_bomb_is_refused_from_its_header_before_any_pixel_is_decoded(bard, pixel_loads):
    bomb = png_bomb()
    assert len(bomb) < 20_000
    with serving(bard, start=False) as (http, engine):
        response = http.post("/v1/chat/completions", json=chat(data_url(bomb)))
        assert_error(response, 400, "image_too_large", param="messages[0].content[0].image_url",
                     mentions=("12000 x 12000", "--max-image-pixels"))
        assert pixel_loads == [] and engine.pending == 0
        # a WebP declaring a 16383 x 16383 canvas: Pillow's WebP open would set up libwebp's decoder, so the size
        # is read from the RIFF header first
        webp = b"RIFF" + (22).to_bytes(4, "little") + b"WEBPVP8X" + (10).to_bytes(4, "little") + bytes(4) + (
            16382).to_bytes(3, "little") * 2
        assert_error(http.post("/v1/chat/completions", json=chat(data_url(webp, "image/webp"))), 400,
                     "image_too_large", mentions=("16383 x 16383",))
        # just over a lowered cap: refused from the header too
        small = image_bytes("PNG", (64, 32))
        limited = create_app(engine, bard[1], MODEL, MAX_MODEL_LEN, limits=ServeLimits(max_image_pixels=64 * 32 - 1))
        with TestClient(limited) as other:
            assert_error(other.post("/v1/chat/completions", json=chat(data_url(small))), 400, "image_too_large")
        assert pixel_loads == []


def test_images_decode_one_at_a_time_over_concurrent_requests(bard, monkeypatch):
    """With --max-concurrent-image-decodes 1, four requests with two images each never decode two at once (each
    decode is slowed to 50 ms so that they would overlap)."""
    from PIL import ImageFile

    active, peak, lock, original = [0], [0], threading.Lock(), ImageFile.ImageFile.load

    def slow_load(image):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return original(image)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", slow_load)
    urls = [data_url(image_bytes("PNG", seed=i)) for i in range(2)]
    with serving(bard, limits=ServeLimits(max_concurrent_image_decodes=1)) as (http, _):
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(
            http.post("/v1/chat/completions", json=chat(*urls)).status_code)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert codes == [200] * 4 and peak[0] == 1


def test_too_many_images_are_refused_before_any_is_decoded(bard, pixel_loads):
    url = data_url(image_bytes("PNG"))
    with serving(bard, start=False) as (http, engine):
        assert_error(http.post("/v1/chat/completions", json=chat(*[url] * 9)), 400, "too_many_images",
                     param="messages[0].content[8]", mentions=("--max-images-per-prompt", "8"))
    with serving(bard, start=False, limits=ServeLimits(max_images_per_prompt=2)) as (http, engine):
        two_messages = {"model": MODEL, "messages": [chat(url, url)["messages"][0], chat(url)["messages"][0]]}
        assert_error(http.post("/v1/chat/completions", json=two_messages), 400, "too_many_images",
                     param="messages[1].content[0]")
        assert pixel_loads == [] and engine.pending == 0


def test_only_the_declared_accepted_format_is_ever_opened(bard, monkeypatch):
    """EPS (Pillow would run Ghostscript on it) is never opened, whatever it is declared as; a PNG declared as JPEG is
    refused naming what it is; each accepted format decodes when declared as itself; --image-formats narrows."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda image: opened.append(image) or 1 / 0)
    eps = image_bytes("EPS")
    assert eps.startswith(b"%!PS") or eps[:4] == b"\xc5\xd0\xd3\xc6"
    with serving(bard) as (http, engine):
        param = "messages[0].content[0].image_url"
        assert_error(http.post("/v1/chat/completions", json=chat(data_url(eps, "application/postscript"))), 400,
                     "unsupported_image_format", param=param, mentions=("application/postscript",))
        assert_error(http.post("/v1/chat/completions", json=chat(data_url(eps, "image/png"))), 400, "invalid_image",
                     param=param)
        assert_error(http.post("/v1/chat/completions", json=chat(data_url(image_bytes("PNG"), "image/jpeg"))), 400,
                     "image_type_mismatch", param=param, mentions=("image/jpeg", "PNG"))
        assert opened == []
        for image_format, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                   ("GIF", "image/gif"), ("BMP", "image/bmp")):
            response = http.post("/v1/chat/completions", json=chat(data_url(image_bytes(image_format), mime)))
            assert response.status_code == 200, (image_format, response.text)
    with serving(bard, start=False, limits=ServeLimits(image_formats=("png",))) as (http, _):
        assert_error(http.post("/v1/chat/completions", json=chat(data_url(image_bytes("JPEG"), "image/jpeg"))), 400,
                     "unsupported_image_format", mentions=("image/png",))


def test_a_huge_body_is_refused_before_it_is_read(bard):
    """413 from the Content-Length alone, and from the bytes read when the body comes chunked without one."""
    body = json.dumps(chat(text="word " * 5000)).encode()
    with serving(bard, start=False, limits=ServeLimits(max_body_bytes=10_000)) as (http, engine):
        headers = {"content-type": "application/json"}
        assert_error(http.post("/v1/chat/completions", content=body, headers=headers), 413, "request_too_large",
                     mentions=(str(len(body)), "--max-body-bytes"))
        chunked = http.post("/v1/chat/completions", headers=headers,
                            content=(body[i:i + 4096] for i in range(0, len(body), 4096)))
        assert "content-length" not in chunked.request.headers
        assert_error(chunked, 413, "request_too_large")
        assert engine.pending == 0


def test_a_huge_prompt_is_refused_before_it_is_tokenized(bard, monkeypatch):
    """Text longer than the prompt limit times the tokenizer's longest token (in bytes) is refused without calling
    the processor; a prompt under that bound is counted exactly (--max-prompt-tokens, images included)."""
    processor = bard[1]
    calls = []
    original = type(processor).apply_chat_template
    monkeypatch.setattr(type(processor), "apply_chat_template",
                        lambda self, *args, **kwargs: calls.append(1) or original(self, *args, **kwargs))
    with serving(bard, start=False) as (http, engine):
        longest = http.app.state.service.max_token_bytes
        huge = "x" * (MAX_MODEL_LEN * longest + 1)
        assert_error(http.post("/v1/chat/completions", json=chat(text=huge)), 400, "context_length_exceeded",
                     param="messages", mentions=(str(len(huge)), "at least"))
        assert calls == [] and engine.pending == 0
    with serving(bard, start=False, limits=ServeLimits(max_prompt_tokens=40)) as (http, engine):
        assert_error(http.post("/v1/chat/completions", json=chat(text="red green blue " * 10)), 400,
                     "prompt_too_long", mentions=("--max-prompt-tokens 40",))
        assert calls == [1] and engine.pending == 0


# ---------------------------------------------------------------------------------------------- floods
def test_past_the_waiting_requests_a_request_gets_429(bard):
    with serving(bard, start=False, limits=ServeLimits(max_waiting_requests=1)) as (http, engine):
        first = {}
        thread = threading.Thread(target=lambda: first.setdefault(
            "response", http.post("/v1/chat/completions", json=chat())))
        thread.start()
        deadline = time.monotonic() + 60
        while engine.pending == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert_error(http.post("/v1/chat/completions", json=chat()), 429, "queue_full",
                     mentions=("--max-waiting-requests 1",))
        assert engine.pending == 1
        engine._pending[0].sink(DONE, "stop")  # the queued request ends (nothing decodes here)
        thread.join(timeout=60)
        assert first["response"].status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_time_limit_is_cancelled(bard, stream):
    with serving(bard, start=False, limits=ServeLimits(request_timeout=0.3)) as (http, engine):
        began = time.monotonic()
        response = http.post("/v1/chat/completions", json=chat(stream=stream))
        assert time.monotonic() - began < 10
        if stream:
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1]["error"]["code"] == "request_timeout"
        else:
            assert_error(response, 408, "request_timeout", mentions=("--request-timeout 0.3",))
        assert engine._pending[0].cancelled.is_set()  # its row is never decoded


# ---------------------------------------------------------------------------------------------- fields
BAD_FIELDS = {  # body -> (param, words in the message)
    "stream_options not an object": (dict(stream=True, stream_options="yes"), "stream_options", ("'yes'",)),
    "stream_options a list": (dict(stream=True, stream_options=[]), "stream_options", ("[]",)),
    "include_usage not a boolean": (dict(stream=True, stream_options={"include_usage": "yes"}),
                                    "stream_options.include_usage", ("'yes'",)),
    "unknown stream option": (dict(stream=True, stream_options={"continuous": True}), "stream_options", ()),
    "stream_options without stream": (dict(stream_options={"include_usage": True}), "stream_options", ("stream",)),
    "stream not a boolean": (dict(stream="true"), "stream", ("'true'",)),
    "user not a string": (dict(user=5), "user", ("5",)),
    "n a boolean": (dict(n=True), "n", ("True",)),
    "temperature a string": (dict(temperature="hot"), "temperature", ("'hot'",)),
    "content part without text": (dict(messages=[{"role": "user", "content": [{"type": "text"}]}]),
                                  "messages[0].content[0]", ()),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_malformed_fields_are_refused_before_anything_is_queued(bard, case):
    fields, param, words = BAD_FIELDS[case]
    with serving(bard, start=False) as (http, engine):
        assert_error(http.post("/v1/chat/completions", json=chat(**fields)), 400, param=param, mentions=words)
        assert engine.pending == 0


@pytest.mark.parametrize("field, literal", [("temperature", "NaN"), ("top_p", "Infinity"), ("temperature", "1e999"),
                                           ("max_tokens", "-Infinity")])
def test_non_finite_numbers_are_refused(bard, field, literal):
    without = json.dumps({name: value for name, value in chat().items() if name != field})
    body = without[:-1] + f', "{field}": {literal}}}'
    with serving(bard) as (http, engine):
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert_error(response, 400, param=field, mentions=("finite", f"`{field}`"))
        assert engine.peak_batch_size == 0


def test_deeply_nested_json_is_a_400(bard):
    with serving(bard, start=False) as (http, _):
        response = http.post("/v1/chat/completions", content="[" * 100_000 + "]" * 100_000,
                             headers={"content-type": "application/json"})
        assert_error(response, 400, mentions=("nested",))


def test_unexpected_exceptions_and_unknown_routes_are_json(bard, monkeypatch):
    from transformers_bard.serving.openai_api import ChatService

    with serving(bard) as (http, _):
        assert_error(http.get("/v2/nothing"), 404)
        assert_error(http.get("/v1/chat/completions"), 405)
        good = http.post("/v1/chat/completions", json=chat())
        with monkeypatch.context() as patch:
            patch.setattr(ChatService, "check_body", lambda self, body: 1 / 0)
            error = assert_error(http.post("/v1/chat/completions", json=chat()), 500, mentions=("ZeroDivisionError",))
            assert error["type"] == "server_error"
        assert http.post("/v1/chat/completions", json=chat()).json() | {"id": 0, "created": 0} == (
            good.json() | {"id": 0, "created": 0})


# ---------------------------------------------------------------------------------------------- strangers
def test_api_key_is_required_on_every_v1_route(bard):
    with serving(bard, api_key="s3cret") as (http, _):
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat())):
            assert_error(http.request(method, path, json=body), 401, "invalid_api_key", mentions=("Bearer",))
            for header in ("Bearer wrong", "s3cret", "Basic s3cret", "Bearer s3cret2"):
                assert_error(http.request(method, path, json=body, headers={"Authorization": header}), 401,
                             "invalid_api_key")
            response = http.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"})
            assert response.status_code == 200, response.text
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_json_only_with_its_content_type(bard, content_type):
    """A browser's cross-site "simple" POST (text/plain, form encodings) is refused before the body is read."""
    headers = {} if content_type is None else {"content-type": content_type}
    with serving(bard, start=False) as (http, engine):
        response = http.post("/v1/chat/completions", content=json.dumps(chat()), headers=headers)
        assert_error(response, 415, "unsupported_media_type", mentions=("application/json",))
        assert engine.pending == 0


def test_binding_beyond_loopback_without_a_key_warns(caplog):
    from transformers_bard.serving import uvicorn_config, warn_if_exposed

    with caplog.at_level(logging.WARNING, logger="transformers_bard.serving"):
        assert [warn_if_exposed(host, key) for host, key in (
            ("127.0.0.1", None), ("localhost", None), ("::1", None), ("0.0.0.0", "key"), ("0.0.0.0", None),
            ("::", None), ("my-host.example", None))] == [False, False, False, False, True, True, True]
    assert [r.getMessage().split(" without")[0] for r in caplog.records] == [
        "Serving on 0.0.0.0", "Serving on ::", "Serving on my-host.example"]
    assert "--api-key" in caplog.records[0].getMessage()
    config = uvicorn_config(fastapi.FastAPI(), "127.0.0.1", 0, "warning", access_log=True, shutdown_grace=7.0)
    assert config.timeout_graceful_shutdown == 7.0 and config.access_log
    assert logging.getLogger("uvicorn.access").level == logging.INFO


def parse_metrics(text: str) -> dict:
    """Prometheus text format -> {name{labels}: value}, checking every sample has a HELP and TYPE line before it."""
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("# HELP "):
            name, value = line.rsplit(" ", 1)
            base = name.split("{")[0]
            assert any(base == t or base.startswith(t + "_") for t in typed), line
            samples[name] = float(value)
    return samples


def test_metrics_in_prometheus_text_format(bard):
    with serving(bard) as (http, engine):
        answers = [http.post("/v1/chat/completions", json=chat(max_tokens=n)).json() for n in (5, 9)]
        http.post("/v1/chat/completions", json=chat(temperature=7))
        deadline = time.monotonic() + 30
        while engine.running:  # a row leaves in the iteration that sent its last tokens, just after them
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    metrics = parse_metrics(response.text)
    prefix = "transformers_bard_"
    assert metrics[prefix + 'requests_total{status="200"}'] == 2
    assert metrics[prefix + 'requests_total{status="400"}'] == 1
    assert metrics[prefix + "generated_tokens_total"] == sum(a["usage"]["completion_tokens"] for a in answers) > 0
    assert metrics[prefix + "queue_length"] == 0 and metrics[prefix + "running_rows"] == 0
    assert metrics[prefix + "engine_up"] == 1
    assert metrics[prefix + "tokens_per_forward"] == engine.totals["tokens"] / engine.totals["forwards"] > 0
    assert metrics[prefix + 'request_duration_seconds_bucket{le="+Inf"}'] == 3
    assert metrics[prefix + "request_duration_seconds_count"] == 3
    assert metrics[prefix + "request_duration_seconds_sum"] > 0
    buckets = [value for name, value in metrics.items() if "_bucket" in name]
    assert buckets == sorted(buckets)  # cumulative


def test_health_is_503_once_the_engine_thread_died(bard):
    """The scheduler's thread raising outside a batch: the request it held gets a 503 (not a hang), /health and
    every later request a 503, /metrics says so."""
    model, _ = bard

    class Dying(BlockDiffusionScheduler):
        def step(self):
            if self._pending:
                raise RuntimeError("boom")

    with serving(bard, engine=Dying(model)) as (http, engine):
        assert http.get("/health").status_code == 200
        assert_error(http.post("/v1/chat/completions", json=chat()), 503, "engine_stopped", mentions=("boom",))
        assert_error(http.get("/health"), 503, "engine_stopped", mentions=("boom",))
        assert_error(http.post("/v1/chat/completions", json=chat()), 503, "engine_stopped")
        assert parse_metrics(http.get("/metrics").text)["transformers_bard_engine_up"] == 0


# ---------------------------------------------------------------------------------------------- ghosts
class CountingScheduler(BlockDiffusionScheduler):
    """Steps every 50 ms at most (the tiny model takes a few ms), counting them: tokens still arrive far more
    often than every 0.5 s."""

    steps = 0

    def step(self):
        time.sleep(0.05)
        super().step()
        self.steps += 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_its_row_within_one_step(bard, stream):
    """The ASGI app driven by hand as uvicorn drives it: the client leaves while its row decodes (tokens arriving),
    and the row leaves the batch at the engine's next iteration."""
    model, processor = bard
    engine = CountingScheduler(model, max_batch_size=4)
    engine.start()
    app = create_app(engine, processor, MODEL, MAX_MODEL_LEN)
    body = json.dumps(chat(text="tell me a long story", max_tokens=120, stream=stream)).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def scenario():
        left, messages, sent = asyncio.Event(), [{"type": "http.request", "body": body, "more_body": False}], []

        async def receive():
            if messages:
                return messages.pop(0)
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message):  # uvicorn drops what is sent after the client left
            if not left.is_set():
                sent.append(message)

        task = asyncio.ensure_future(app(scope, receive, send))
        deadline = time.monotonic() + 60
        while engine.running == 0 or engine.steps < 6:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        left.set()
        at = engine.steps
        while engine.running:
            assert engine.steps - at <= 2, f"the row decoded {engine.steps - at} more steps after its client left"
            await asyncio.sleep(0.005)
        assert engine.steps - at <= 2
        await asyncio.wait_for(task, 30)

    try:
        asyncio.run(scenario())
    finally:
        engine.close()


def _post_raw(port: int, body: dict, key: str) -> socket.socket:
    """A POST sent on a raw socket, nothing read back."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_sigterm_exits_within_the_grace_period_despite_ghosts(tiny_bard_vl_dir):
    """A server (key from TRANSFORMERS_BARD_API_KEY) holds a client that stops reading a long stream and a client
    that hung up on a long non-streaming answer (whose row is freed at once), and answers an honest client. After
    SIGTERM the honest answer completes, and the process exits within --shutdown-grace plus a few seconds although
    the stalled answer would decode for minutes."""
    grace, key, port = 3, "k3y", free_port()
    command = [sys.executable, "-m", "transformers_bard.cli", "serve", str(tiny_bard_vl_dir), "--port", str(port),
               "--served-model-name", MODEL, "--max-model-len", "16384", "--threads", "1",
               "--shutdown-grace", str(grace)]
    process = subprocess.Popen(command, cwd=REPO, env={**offline_env(), "TRANSFORMERS_BARD_API_KEY": key},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    sockets = []

    def wait_for(condition, seconds, what):
        deadline = time.monotonic() + seconds
        while not condition():
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stdout.read()[-3000:]}")
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    def health():
        try:
            return httpx.get(f"{base}/health", timeout=2).json()
        except httpx.TransportError:
            return {}

    try:
        wait_for(lambda: "running" in health(), 120, "the server did not start within 120 s")
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401
        long = chat(text="a very long answer", max_tokens=16000)
        sockets.append(_post_raw(port, {**long, "stream": True}, key))  # never read
        wait_for(lambda: health()["running"] == 1, 30, "the stalled stream did not start")
        abandoned = _post_raw(port, long, key)
        wait_for(lambda: health()["running"] == 2, 30, "the abandoned request did not start")
        abandoned.close()
        wait_for(lambda: health()["running"] == 1, 5, "the abandoned request still decodes")

        honest = {}

        def ask():
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat(max_tokens=60, stream=True),
                              headers=headers, timeout=60) as response:
                honest["text"] = "".join(response.iter_text())

        thread = threading.Thread(target=ask)
        thread.start()
        wait_for(lambda: health().get("running", 0) >= 2 or "text" in honest, 30, "the honest request did not start")
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still runs {grace + 10} s after SIGTERM (--shutdown-grace {grace})")
        assert time.monotonic() - began < grace + 10
        thread.join(timeout=30)
        assert honest.get("text", "").rstrip().endswith("data: [DONE]")
    finally:
        for sock in sockets:
            sock.close()
        if process.poll() is None:
            stop_process(process, timeout=5)


def test_limits_are_serve_flags_with_their_defaults():
    from transformers_bard.cli import build_parser

    args = build_parser().parse_args(["serve", "ckpt"])
    assert ServeLimits(**{name: getattr(args, name) for name in vars(ServeLimits())}) == ServeLimits()
    assert args.shutdown_grace == 20.0 and args.api_key is None and not args.access_log
    args = build_parser().parse_args(["serve", "ckpt", "--image-formats", "png", "jpeg", "--max-body-bytes", "5"])
    assert args.image_formats == ["PNG", "JPEG"] and args.max_body_bytes == 5
    with pytest.raises(ValueError, match=r"`image_formats` must be a non-empty subset .* got \['EPS'\]"):
        ServeLimits(image_formats=("EPS",))
    with pytest.raises(ValueError, match="`max_waiting_requests` must be an integer >= 1, got 0"):
        ServeLimits(max_waiting_requests=0)
    with pytest.raises(ValueError, match="`request_timeout` must be a positive number of seconds, got nan"):
        ServeLimits(request_timeout=float("nan"))
