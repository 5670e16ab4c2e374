"""An autoregressive Qwen3-VL behind the same HTTP API, for baselines (`transformers-bard serve --autoregressive`).

It serves the AR source the way `transformers serve` serves a vision-language model: one `model.generate` at a time
on one thread, streaming through a streamer (`transformers serve` only batches continuously for text-only LMs, and
cannot load a stock Qwen3-VL processor without torchvision, so it cannot serve the AR source here at all).
"""

from __future__ import annotations

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
                self._generate(request)

    @torch.no_grad()
    def _generate(self, request: DecodeRequest) -> None:
        streamer = _SinkStreamer(request)
        inputs = {key: value for key, value in request.inputs.items() if value is not None}
        try:
            self.model.generate(**inputs, generation_config=request.plan, streamer=streamer)
        except _Cancelled:
            return
        except Exception as error:  # noqa: BLE001 (reported to the request; the server goes on)
            request.sink(ERROR, error)
            return
        eos = request.plan.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        stopped = bool(streamer.tokens) and streamer.tokens[-1] in eos
        request.sink(DONE, "stop" if stopped else "length")
