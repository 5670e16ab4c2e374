"""The OpenAI-compatible HTTP API of `transformers-bard serve`: `/v1/chat/completions` (streaming and not, text and
`image_url` data URLs), `/v1/models`, `/health` and `/metrics`.

Requests are checked and turned into model inputs with the checkpoint's processor and chat template (the same
`apply_chat_template` call as the README's `generate` example), then handed to an engine (the continuous-batching
`BlockDiffusionScheduler`, or `SequentialGenerateEngine` for an AR baseline) whose thread sends tokens back.

What a hostile or careless client cannot do (issue 39; the table in docs/reliability.md): every field is checked
before anything reaches the engine, in the order of what the checks cost: the API key, the content type, the queue
(429), the body's size (its Content-Length, then the bytes read), strict JSON (no NaN or Infinity), the fields, the
number of images, a lower bound of the prompt's tokens from its text's length, each image's declared type, detected
format and pixel count (from the header), then the decoding (under a semaphore) and the exact token count. Every
error, unexpected ones included, is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``. A client
that goes away is seen at once (a task waits on the connection while the request decodes) and its row is freed at
the engine's next iteration; a request past the time limit is cancelled the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .images import ImageReader, ImageRefused
from .limits import ServeLimits
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServerMetrics
from .scheduler import DONE, TOKENS, DecodeRequest, EngineStopped

logger = logging.getLogger(__name__)

# Request fields this server reads; anything else is refused by name rather than silently ignored.
SUPPORTED_FIELDS = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "user",
}
ROLES = ("system", "user", "assistant")
API_KEY_ENV = "TRANSFORMERS_BARD_API_KEY"
# events of a call besides the engine's TOKENS / DONE / ERROR
DISCONNECTED, TIMED_OUT = "disconnected", "timed_out"


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------- the body
async def read_body(http_request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes: from its Content-Length
    before reading anything, else while reading it (chunked uploads)."""

    def too_large(size: str) -> OpenAIError:
        return OpenAIError(413, f"The request body is {size} bytes, over the server's --max-body-bytes {limit}; "
                           "send smaller or fewer images.", code="request_too_large",
                           headers={"Connection": "close"})

    declared = http_request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _bad(f"The Content-Length header must be a number of bytes, got {declared[:40]!r}.")
        if int(declared) > limit:
            raise too_large(declared.strip())
    chunks, size = [], 0
    async for chunk in http_request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes):
    """Strict JSON: Python's parser also accepts NaN and Infinity (and reads 1e999 as infinity); those are refused
    naming where they are, as is nesting too deep to parse."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _bad("The request body is nested too deeply to parse; send a chat-completions JSON object.") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise _bad(f"The request body is not valid JSON: {error}.") from None
    path = _non_finite(body)
    if path is not None:
        where, value = path
        raise _bad(f"`{where}` is {value!r}: JSON numbers must be finite (NaN and Infinity are not JSON). Send a "
                   "finite number.", where)
    return body


def _non_finite(body):
    """(path, value) of the first NaN or infinite number in a parsed body, or None (iterative: any depth)."""
    stack = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path or "body", value
        if isinstance(value, dict):
            stack.extend((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return None


# ---------------------------------------------------------------------------------------------- the fields
def check_messages(messages, max_images: int, images: ImageReader) -> list[dict]:
    """OpenAI chat messages -> the processor's message format with image parts still as URLs (checked: structure,
    the number of images, each URL's declared type). Nothing is decoded."""
    if not isinstance(messages, list) or not messages:
        raise _bad(f"`messages` must be a non-empty list, got {_shown(messages)}.", "messages")
    converted, image_params = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise _bad(f"messages[{i}] needs a `role` among {list(ROLES)}, got {_shown(role)}.", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                param = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    image_params.append(f"{param}.image_url")
                    if len(image_params) > max_images:
                        raise _bad(f"The request holds more than {max_images} images (the server's "
                                   f"--max-images-per-prompt); the one at {param} is one too many. Send at most "
                                   f"{max_images}.", param, code="too_many_images")
                    try:
                        images.declared_format(url)
                    except ImageRefused as error:
                        raise _bad(str(error), f"{param}.image_url", code=error.code) from None
                    parts.append({"type": "image", "image": url})
                else:
                    raise _bad(f"Content parts must be `text` (with a string `text`) or `image_url`, got "
                               f"{_shown(kind)}.", param)
        else:
            raise _bad(f"messages[{i}].content must be a string or a list of parts, got {_shown(content)}.",
                       f"messages[{i}].content")
        converted.append({"role": message["role"], "content": parts})
    return converted


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return None
    # a chained comparison: False for NaN, and no float conversion of a 4000-digit integer
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        low < value <= high if low_open else low <= value <= high
    ):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise _bad(f"`{name}` must be a finite number in {interval}, got {_shown(value)}.", name)
    return float(value)


def _longest_token_bytes(tokenizer) -> int:
    """UTF-8 bytes of the longest text one token can stand for (an undecodable byte counts 3, as U+FFFD): a prompt
    of `n` text bytes is at least `n / this` tokens."""
    ids = [[index] for index in range(len(tokenizer))]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return max(1, max(len(text.encode("utf-8")) for text in texts))


class _IncrementalText:
    """Detokenizes a growing answer: each piece is the new suffix of the full decode, so the pieces join to exactly
    `tokenizer.decode(all_tokens, skip_special_tokens=True)`; an incomplete UTF-8 character waits for its bytes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

    def add(self, tokens: list[int], final: bool = False) -> str:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.sent):  # cannot happen with byte-level BPE; never resend what was sent
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


# ---------------------------------------------------------------------------------------------- one call
class _Call:
    """One chat completion between the HTTP layer and the engine: the events the engine sends (through `sink`,
    from its thread), the deadline, and a task that waits on the connection and cancels the request the moment the
    client goes away."""

    def __init__(self, timeout: float):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.request: DecodeRequest | None = None
        self.disconnected = False
        self._watcher: asyncio.Task | None = None

    def sink(self, kind, payload) -> None:  # called from the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def watch(self, http_request: Request) -> None:
        """Start waiting for the client's disconnect (the body has been read: the next ASGI message is
        `http.disconnect`, when the client leaves or the response is complete)."""
        self._watcher = asyncio.ensure_future(self._watch(http_request.receive))

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        if self.request is not None:
            self.request.cancelled.set()  # the row leaves at the engine's next iteration
        self.events.put_nowait((DISCONNECTED, None))

    async def next_event(self) -> tuple:
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self.events.get(), remaining)
        except asyncio.TimeoutError:
            return TIMED_OUT, None

    def end(self) -> None:
        """The answer ended (or was abandoned): stop watching, free the row if it still decodes."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self.request is not None:
            self.request.cancelled.set()  # after DONE this changes nothing


def _timeout_error(timeout: float) -> OpenAIError:
    return OpenAIError(408, f"The request ran for longer than the server's --request-timeout {timeout:g} s and was "
                       "cancelled; ask for fewer `max_tokens`, or retry when the server is less busy.",
                       kind="timeout_error", code="request_timeout")


def _engine_error(payload) -> OpenAIError:
    if isinstance(payload, EngineStopped):
        return OpenAIError(503, f"The request was stopped: {payload}", kind="server_error", code="engine_stopped")
    return OpenAIError(500, f"Decoding failed: {payload!r}", kind="server_error")


# ---------------------------------------------------------------------------------------------- the service
class ChatService:
    """Turns a chat-completions body into a `DecodeRequest` for the engine and its answer into OpenAI JSON."""

    def __init__(self, engine, processor, model_name: str, max_model_len: int, default_max_tokens: int,
                 limits: ServeLimits | None = None):
        self.engine, self.processor, self.model_name = engine, processor, model_name
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_model_len, self.default_max_tokens = max_model_len, default_max_tokens
        self.limits = limits or ServeLimits()
        self.images = ImageReader(self.limits)
        self.max_token_bytes = _longest_token_bytes(self.tokenizer)
        self.metrics = ServerMetrics()
        self.preparing = 0  # requests past admission whose body is read or prepared (not yet queued)
        self._processor_lock = threading.Lock()  # the processor is not documented as thread-safe

    @property
    def waiting(self) -> int:
        """Requests accepted and not decoding yet: being prepared here, or queued in the engine."""
        return self.preparing + getattr(self.engine, "pending", 0)

    def check_body(self, body) -> tuple[dict, list[dict], bool, bool]:
        """Validate every field without the processor: returns (generate options without the length, messages
        with image URLs, stream, include_usage)."""
        if not isinstance(body, dict):
            raise _bad(f"The request body must be a JSON object, got {type(body).__name__}.")
        unknown = sorted(set(body) - SUPPORTED_FIELDS)
        if unknown:
            raise _bad(f"Unsupported request fields {unknown}; this server reads {sorted(SUPPORTED_FIELDS)}.",
                       unknown[0])
        model = body.get("model")
        if model != self.model_name:
            raise OpenAIError(404, f"The model {_shown(model)} does not exist; this server serves "
                              f"{self.model_name!r}.", param="model", code="model_not_found")
        if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
            raise _bad(f"`n` must be 1, got {_shown(body['n'])}.", "n")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _bad(f"`stream` must be true or false, got {_shown(stream)}.", "stream")
        stream_options, include_usage = body.get("stream_options"), False
        if stream_options is not None:
            if not stream:
                raise _bad("`stream_options` is only allowed when `stream` is true; drop it or stream.",
                           "stream_options")
            if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
                raise _bad(f"`stream_options` must be an object with at most `include_usage` (true or false), got "
                           f"{_shown(stream_options)}.", "stream_options")
            include_usage = stream_options.get("include_usage")
            if include_usage is not None and not isinstance(include_usage, bool):
                raise _bad(f"`stream_options.include_usage` must be true or false, got {_shown(include_usage)}.",
                           "stream_options.include_usage")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise _bad(f"`user` must be a string, got {_shown(body['user'])}.", "user")
        options = {}
        temperature = _number(body, "temperature", 0.0, 2.0)
        if temperature is not None:
            options["temperature"] = temperature
        top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
        if top_p is not None:
            options["top_p"] = top_p
        for name in ("max_completion_tokens", "max_tokens"):
            value = body.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise _bad(f"`{name}` must be an integer >= 1, got {_shown(value)}.", name)
        messages = check_messages(body.get("messages"), self.limits.max_images_per_prompt, self.images)
        return options, messages, bool(stream), bool(include_usage)

    def _prompt_limit(self) -> tuple[int, str, str]:
        """The most prompt tokens accepted, which limit it is, and the error code past it."""
        context_room = self.max_model_len - 1
        if self.limits.max_prompt_tokens < context_room:
            return (self.limits.max_prompt_tokens, f"the server's --max-prompt-tokens {self.limits.max_prompt_tokens}",
                    "prompt_too_long")
        return (context_room, f"this model's maximum context length {self.max_model_len} less one completion token",
                "context_length_exceeded")

    def check_text_length(self, messages: list[dict]) -> None:
        """Refuse, before tokenizing, text that cannot fit: each token stands for at most `max_token_bytes` bytes
        of (normalized) text, so the prompt has at least bytes / `max_token_bytes` tokens."""
        limit, which, code = self._prompt_limit()
        texts = [part["text"] for message in messages for part in message["content"] if part["type"] == "text"]
        size = sum(len(text) for text in texts)  # characters <= bytes: cheap, and decides for most prompts
        if size <= limit:
            return
        normalizer = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "normalizer", None)
        if normalizer is not None:  # e.g. NFC composes 3 Hangul jamo into 1 syllable: count what is tokenized
            texts = [normalizer.normalize_str(text) for text in texts]
        size = sum(len(text.encode("utf-8")) for text in texts)
        at_least = -(-size // self.max_token_bytes)
        if at_least > limit:
            raise _bad(f"The messages hold {size} bytes of text, at least {at_least} tokens (no token of this "
                       f"tokenizer stands for more than {self.max_token_bytes} bytes), over {which}. Send a shorter "
                       "prompt.", "messages", code=code)

    def build_request(self, body: dict, options: dict, messages: list[dict], sink) -> DecodeRequest:
        """Check the prompt's length (a bound first, then the exact count), decode the images, apply the chat
        template, prepare the request. Runs in a worker thread: decoding and preprocessing take time."""
        self.check_text_length(messages)
        for i, message in enumerate(messages):
            for j, part in enumerate(message["content"]):
                if part["type"] == "image":
                    try:
                        part["image"] = self.images.read(part["image"])
                    except ImageRefused as error:
                        raise _bad(str(error), f"messages[{i}].content[{j}].image_url", code=error.code) from None
        try:
            with self._processor_lock:
                inputs = self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                )
        except (ValueError, TypeError, KeyError) as error:
            raise _bad(f"The messages could not be turned into a prompt: {error}.", "messages") from None
        prompt_tokens = int(inputs["input_ids"].shape[1])
        limit, which, code = self._prompt_limit()
        # past --max-prompt-tokens here; past the context, OpenAI's own message below
        if prompt_tokens > limit and code == "prompt_too_long":
            raise _bad(f"The prompt is {prompt_tokens} tokens (images included), over {which}. Send a shorter "
                       "prompt or fewer or smaller images.", "messages", code=code)
        room = self.max_model_len - prompt_tokens
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        param = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        if room < 1 or (requested is not None and requested > room):
            raise _bad(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + (requested or 1)} tokens ({prompt_tokens} in the messages, {requested or 1} in the "
                "completion). Please reduce the length of the messages or completion.",
                "messages" if room < 1 else param, code="context_length_exceeded",
            )
        options = {**options, "max_new_tokens": requested if requested is not None else min(self.default_max_tokens,
                                                                                             room)}
        request = DecodeRequest(inputs=dict(inputs), options=options, sink=sink)
        try:
            self.engine.prepare(request)
        except ValueError as error:
            raise _bad(str(error)) from None
        return request

    # ------------------------------------------------------------------ one request, from arrival to its answer
    async def handle(self, http_request: Request):
        """Admit, read, check and queue one chat completion; returns its response (streaming or not)."""
        content_type = http_request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise OpenAIError(415, f"The body must be JSON sent with `Content-Type: application/json`, got "
                              f"{content_type[:60]!r}.", code="unsupported_media_type")
        failure = getattr(self.engine, "failure", None)
        if failure is not None:
            raise OpenAIError(503, f"The engine stopped ({failure!r}); the server must be restarted.",
                              kind="server_error", code="engine_stopped")
        if self.waiting >= self.limits.max_waiting_requests:
            raise OpenAIError(429, f"The server has {self.waiting} requests waiting, its --max-waiting-requests "
                              f"{self.limits.max_waiting_requests}; retry later.", kind="rate_limit_error",
                              code="queue_full")
        call = _Call(self.limits.request_timeout)
        self.preparing += 1
        try:
            try:
                raw = await read_body(http_request, self.limits.max_body_bytes)
            except ClientDisconnect:
                call.disconnected = True
            else:
                body = parse_json(raw)
                del raw
                options, messages, stream, include_usage = self.check_body(body)
                call.watch(http_request)
                try:  # the thread cannot be stopped: past the deadline its request is dropped, never queued
                    request = await asyncio.wait_for(
                        asyncio.to_thread(self.build_request, body, options, messages, call.sink),
                        call.deadline - time.monotonic())
                except asyncio.TimeoutError:
                    raise _timeout_error(self.limits.request_timeout) from None
            if call.disconnected:  # while its body was read or its prompt prepared: nothing reaches the engine
                call.end()
                return None, call
            try:
                self.engine.submit(request)
            except EngineStopped as error:
                raise _engine_error(error) from None
            call.request = request
        except BaseException:
            call.end()
            raise
        finally:
            self.preparing -= 1
        if stream:
            return StreamingResponse(self.stream(call, include_usage), media_type="text/event-stream"), call
        return await self.complete(call), call

    def _chunk(self, request_id: str, created: int, delta: dict, finish_reason=None, usage=None) -> str:
        chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if delta is not None
                 else []}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    @staticmethod
    def _usage(request: DecodeRequest, completion_tokens: int) -> dict:
        prompt = int(request.inputs["input_ids"].shape[1])
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    async def stream(self, call: _Call, include_usage: bool):
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        text = _IncrementalText(self.tokenizer)
        status = 499  # unless the answer ends
        try:
            yield self._chunk(request_id, created, {"role": "assistant", "content": ""})
            while True:
                kind, payload = await call.next_event()
                if kind == TOKENS:
                    self.metrics.generated_tokens += len(payload)
                    piece = text.add(payload)
                    if piece:
                        yield self._chunk(request_id, created, {"content": piece})
                elif kind == DONE:
                    piece = text.add([], final=True)
                    if piece:
                        yield self._chunk(request_id, created, {"content": piece})
                    yield self._chunk(request_id, created, {}, finish_reason=payload)
                    if include_usage:
                        yield self._chunk(request_id, created, None, usage=self._usage(call.request,
                                                                                       len(text.tokens)))
                    status = 200
                    yield "data: [DONE]\n\n"
                    return
                elif kind == DISCONNECTED:
                    return
                else:
                    error = (_timeout_error(self.limits.request_timeout) if kind == TIMED_OUT
                             else _engine_error(payload))
                    status = error.status
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
        except Exception as error:  # noqa: BLE001 (the stream has started: the error is its last event)
            logger.exception("A chat-completion stream failed.")
            status = 500
            yield f"data: {json.dumps(_engine_error(error).body())}\n\n"
        finally:
            call.end()  # a client that went away frees its row
            self.metrics.finish(status, time.monotonic() - call.started)

    async def complete(self, call: _Call):
        tokens = []
        try:
            while True:
                kind, payload = await call.next_event()
                if kind == TOKENS:
                    tokens.extend(payload)
                elif kind == DONE:
                    break
                elif kind == DISCONNECTED:
                    return None
                elif kind == TIMED_OUT:
                    raise _timeout_error(self.limits.request_timeout)
                else:
                    raise _engine_error(payload)
        finally:
            call.end()
            self.metrics.generated_tokens += len(tokens)
        content = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": payload}],
            "usage": self._usage(call.request, len(tokens)),
        })

    def tokens_per_forward(self) -> float | None:
        totals = getattr(self.engine, "totals", None)
        if not totals or not totals.get("forwards"):
            return None
        return totals["tokens"] / totals["forwards"]


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine, processor, model_name: str, max_model_len: int, default_max_tokens: int = 256,
               limits: ServeLimits | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (already started) under `model_name`, within `limits` (the defaults of
    `ServeLimits` when None). With `api_key`, every `/v1` route needs the header `Authorization: Bearer <api_key>`.
    On shutdown (after uvicorn's grace period) every request still in the engine is cancelled."""
    service = ChatService(engine, processor, model_name, max_model_len, default_max_tokens, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        cancelled = engine.cancel_all(EngineStopped("The server is shutting down."))
        if cancelled:
            logger.warning("Shutting down: cancelled %d request(s) still decoding.", cancelled)

    app = FastAPI(title="transformers-bard serve", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, error: OpenAIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException):  # unknown route, wrong method
        return OpenAIError(error.status_code, f"{error.detail}: {_request.method} {_request.url.path}.",
                           headers=error.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception):  # logged by the server (Starlette re-raises it)
        return OpenAIError(500, f"The server failed on this request ({type(error).__name__}); the failure is in its "
                           "log and other requests are not affected.", kind="server_error").response()

    async def authorize(http_request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = http_request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "You didn't provide an API key. Send it as the header `Authorization: Bearer "
                              "<key>` (the server's --api-key or TRANSFORMERS_BARD_API_KEY).", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise OpenAIError(401, "Incorrect API key provided in `Authorization: Bearer`; send the server's "
                              "--api-key (or TRANSFORMERS_BARD_API_KEY).", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        failure = getattr(engine, "failure", None)
        if failure is not None:
            return OpenAIError(503, f"The engine's thread died ({failure!r}); restart the server.",
                               kind="server_error", code="engine_stopped").response()
        return {"status": "ok", "running": getattr(engine, "running", None), "waiting": service.waiting,
                "peak_batch_size": engine.peak_batch_size}

    @app.get("/metrics")
    async def metrics():
        text = service.metrics.render(waiting=service.waiting, running=getattr(engine, "running", 0) or 0,
                                      engine_up=getattr(engine, "failure", None) is None,
                                      tokens_per_forward=service.tokens_per_forward())
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "transformers-bard"}]}

    @v1.post("/chat/completions")
    async def chat_completions(http_request: Request):
        started = time.monotonic()
        try:
            response, call = await service.handle(http_request)
        except OpenAIError as error:
            service.metrics.finish(error.status, time.monotonic() - started)
            raise
        except Exception:
            service.metrics.finish(500, time.monotonic() - started)
            raise
        if response is None:  # the client went away: nobody reads an answer
            service.metrics.finish(499, time.monotonic() - started)
            return Response(status_code=499)
        if not isinstance(response, StreamingResponse):  # a stream records itself when it ends
            service.metrics.finish(response.status_code, time.monotonic() - call.started)
        return response

    app.include_router(v1)
    return app
