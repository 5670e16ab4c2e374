"""One `generate` at a time behind the same HTTP API: an autoregressive Qwen3-VL for baselines (`transformers-bard
serve --autoregressive`), and verified decoding (`transformers-bard serve --verifier AR`).

It serves the AR source the way `transformers serve` serves a vision-language model: one `model.generate` at a time
on one thread, streaming through a streamer (`transformers serve` only batches continuously for text-only LMs, and
cannot load a stock Qwen3-VL processor without torchvision, so it cannot serve the AR source here at all).
Verified decoding (DESIGN 4.2 a) decodes each row on its own already, so it gains nothing from the continuous batching
scheduler and runs here too: `bard.generate(verifier=ar)`, whose answers are the AR source's greedy answers.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from .scheduler import DONE, ERROR, TOKENS, DecodeRequest, ModelThread


class _Cancelled(Exception):
    pass


class _SinkStreamer(BaseStreamer):
    """Forwards each new token to the request's sink; raises inside `generate` once the request is cancelled."""

    def __init__(self, request: DecodeRequest):
        self.request, self.prompt_seen, self.tokens = request, False, []

    def put(self, value):
        if self.request.cancelled.is_set():
            raise _Cancelled()
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        new = value.reshape(-1).tolist()
        self.tokens.extend(new)
        self.request.sink(TOKENS, new)

    def end(self):
        pass


class SequentialGenerateEngine(ModelThread):
    """Runs `model.generate` for one request at a time in its own thread (greedy when `temperature` is 0)."""

    thread_name = "ar-generate"

    def __init__(self, model):
        super().__init__(model)
        self.peak_batch_size = 1
        self._current: DecodeRequest | None = None  # the request being generated

    @property
    def running(self) -> int:
        return int(self._current is not None)

    def _running_requests(self) -> list[DecodeRequest]:
        current = self._current
        return [] if current is None else [current]

    def prepare(self, request: DecodeRequest) -> DecodeRequest:
        options = dict(request.options)
        temperature = options.pop("temperature", None)
        top_p = options.pop("top_p", None)
        config = GenerationConfig.from_dict(self.model.generation_config.to_dict())
        config.max_new_tokens = options.pop("max_new_tokens")
        if temperature is not None:
            config.do_sample = temperature > 0
            if temperature > 0:
                config.temperature = temperature
        if top_p is not None:
            config.top_p = top_p
        if options:
            raise ValueError(f"Unsupported options {sorted(options)}.")
        request.plan = config
        return request

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closing and not self._pending:
                    self._condition.wait()
                if self._closing:
                    return
                request = self._pending.popleft()
            if not request.cancelled.is_set():
                self._current = request
                try:
                    self._generate(request)
                finally:
                    self._current = None

    def _call_generate(self, inputs: dict, request: DecodeRequest, streamer) -> None:
        self.model.generate(**inputs, generation_config=request.plan, streamer=streamer)

    @torch.no_grad()
    def _generate(self, request: DecodeRequest) -> None:
        streamer = _SinkStreamer(request)
        inputs = {key: value for key, value in request.inputs.items() if value is not None}
        try:
            self._call_generate(inputs, request, streamer)
        except _Cancelled:
            return
        except Exception as error:  # noqa: BLE001 (reported to the request; the server goes on)
            request.sink(ERROR, error)
            return
        eos = self.model.generation_config.eos_token_id if request.plan is None else request.plan.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        stopped = bool(streamer.tokens) and streamer.tokens[-1] in eos
        request.sink(DONE, "stop" if stopped else "length")


class VerifiedGenerateEngine(SequentialGenerateEngine):
    """A BARD-VL model drafting and its AR source verifying (DESIGN 4.2 a), one request at a time: every answer is
    the AR source's greedy answer. Greedy only: a request with `temperature` > 0 is refused."""

    thread_name = "verified-generate"

    def __init__(self, model, verifier):
        super().__init__(model)
        self.verifier = verifier

    def prepare(self, request: DecodeRequest) -> DecodeRequest:
        options = dict(request.options)
        temperature = options.pop("temperature", None)
        options.pop("top_p", None)  # no effect on greedy decoding
        if temperature:
            raise ValueError(f"`temperature`={temperature} asks for sampling, but this server decodes with a verifier, "
                             "which is greedy (the answer is the AR model's greedy answer). Send temperature 0.")
        config = copy.copy(self.model.generation_config)
        config.update(max_new_tokens=options.pop("max_new_tokens"), temperature=0.0)
        if options:
            raise ValueError(f"Unsupported options {sorted(options)}.")
        request.plan = config
        return request

    def _call_generate(self, inputs: dict, request: DecodeRequest, streamer) -> None:
        self.model.generate(**inputs, generation_config=request.plan, streamer=streamer, verifier=self.verifier)
