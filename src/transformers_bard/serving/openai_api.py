"""The OpenAI-compatible HTTP API of `transformers-bard serve`: `/v1/chat/completions` (streaming and not, text and
`image_url` data URLs), `/v1/models` and `/health`.

Requests are checked and turned into model inputs with the checkpoint's processor and chat template (the same
`apply_chat_template` call as the README's `generate` example), then handed to an engine (the continuous-batching
`BlockDiffusionScheduler`, or `SequentialGenerateEngine` for an AR baseline) whose thread sends tokens back. A bad
request gets a 4xx in OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and nothing else is
disturbed; a client that goes away cancels its row.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .scheduler import DONE, TOKENS, DecodeRequest

# Request fields this server reads; anything else is refused by name rather than silently ignored.
SUPPORTED_FIELDS = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "user",
}
ROLES = ("system", "user", "assistant")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def decode_data_url(url: str, param: str):
    """A PIL image from a ``data:image/...;base64,...`` URL (the server fetches nothing from the network)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith("data:"):
        raise _bad("Only `data:` image URLs (base64) are accepted; this server does not fetch remote images.", param)
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
        raise _bad("The image URL must look like `data:image/png;base64,<data>`.", param)
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as error:
        raise _bad(f"The image could not be decoded: {error}.", param, code="invalid_image") from None
    return image.convert("RGB")


def chat_messages(messages) -> list[dict]:
    """OpenAI chat messages -> the processor's message format (images decoded)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("`messages` must be a non-empty list.", "messages")
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _bad(f"messages[{i}] needs a `role` among {list(ROLES)}.", f"messages[{i}].role")
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
                    parts.append({"type": "image", "image": decode_data_url(url, f"{param}.image_url")})
                else:
                    raise _bad(f"Content parts must be `text` or `image_url`, got {kind!r}.", param)
        else:
            raise _bad(f"messages[{i}].content must be a string or a list of parts.", f"messages[{i}].content")
        converted.append({"role": message["role"], "content": parts})
    return converted


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value > high or value < low or (
        low_open and value == low
    ):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise _bad(f"`{name}` must be a number in {interval}, got {value!r}.", name)
    return float(value)


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


class ChatService:
    """Turns a chat-completions body into a `DecodeRequest` for the engine and its answer into OpenAI JSON."""

    def __init__(self, engine, processor, model_name: str, max_model_len: int, default_max_tokens: int):
        self.engine, self.processor, self.model_name = engine, processor, model_name
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_model_len, self.default_max_tokens = max_model_len, default_max_tokens
        self._processor_lock = threading.Lock()  # the processor is not documented as thread-safe

    def check_body(self, body) -> dict:
        """Validate the fields that need no processor; returns the generate options (without the length)."""
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        unknown = sorted(set(body) - SUPPORTED_FIELDS)
        if unknown:
            raise _bad(f"Unsupported request fields {unknown}; this server reads {sorted(SUPPORTED_FIELDS)}.",
                       unknown[0])
        model = body.get("model")
        if model != self.model_name:
            raise OpenAIError(404, f"The model {model!r} does not exist; this server serves {self.model_name!r}.",
                              param="model", code="model_not_found")
        if body.get("n") not in (None, 1):
            raise _bad(f"`n` must be 1, got {body['n']!r}.", "n")
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
                raise _bad(f"`{name}` must be an integer >= 1, got {value!r}.", name)
        return options

    def build_request(self, body: dict, options: dict, sink) -> DecodeRequest:
        """Apply the chat template (images decoded), check the length against the context, prepare the request.
        Runs in a worker thread: image decoding and preprocessing take time."""
        messages = chat_messages(body.get("messages"))
        try:
            with self._processor_lock:
                inputs = self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                )
        except (ValueError, TypeError, KeyError) as error:
            raise _bad(f"The messages could not be turned into a prompt: {error}.", "messages") from None
        prompt_tokens = int(inputs["input_ids"].shape[1])
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

    # ------------------------------------------------------------------ responses
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

    async def stream(self, request: DecodeRequest, events: asyncio.Queue, include_usage: bool):
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        text = _IncrementalText(self.tokenizer)
        try:
            yield self._chunk(request_id, created, {"role": "assistant", "content": ""})
            while True:
                kind, payload = await events.get()
                if kind == TOKENS:
                    piece = text.add(payload)
                    if piece:
                        yield self._chunk(request_id, created, {"content": piece})
                elif kind == DONE:
                    piece = text.add([], final=True)
                    if piece:
                        yield self._chunk(request_id, created, {"content": piece})
                    yield self._chunk(request_id, created, {}, finish_reason=payload)
                    if include_usage:
                        yield self._chunk(request_id, created, None, usage=self._usage(request, len(text.tokens)))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    error = OpenAIError(500, f"Decoding failed: {payload}", kind="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
        finally:
            request.cancelled.set()  # a client that went away frees its row; after DONE this changes nothing

    async def complete(self, request: DecodeRequest, events: asyncio.Queue, http_request: Request) -> JSONResponse:
        tokens = []
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == TOKENS:
                    tokens.extend(payload)
                elif kind == DONE:
                    break
                else:
                    raise OpenAIError(500, f"Decoding failed: {payload}", kind="server_error")
        finally:
            request.cancelled.set()
        content = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": payload}],
            "usage": self._usage(request, len(tokens)),
        })


def create_app(engine, processor, model_name: str, max_model_len: int, default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app serving `engine` (already started) under `model_name`."""
    service = ChatService(engine, processor, model_name, max_model_len, default_max_tokens)
    app = FastAPI(title="transformers-bard serve")

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, error: OpenAIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": getattr(engine, "running", None),
                "peak_batch_size": engine.peak_batch_size}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "transformers-bard"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        try:
            body = await http_request.json()
        except ValueError:
            raise _bad("The request body is not valid JSON.") from None
        options = service.check_body(body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(kind, payload):  # called from the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        request = await asyncio.to_thread(service.build_request, body, options, sink)
        engine.submit(request)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(service.stream(request, events, include_usage), media_type="text/event-stream")
        return await service.complete(request, events, http_request)

    return app
