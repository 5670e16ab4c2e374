"""BARD decoding under vLLM's diffusion contract (Model Runner V2), with no vLLM import: what the plugin's sampler
does for one request slot.

vLLM 0.33 runs a diffusion model as follows (read from its source, `docs/serving/engines.md`): after the prompt's
prefill, each forward of a request runs a *canvas* of W draft tokens after its cached tokens, and the runner returns
the logits of all W canvas rows to the model's own sampler. The sampler answers with the tokens it *emits* (k of
them, the request's output) and the next canvas. The KV of the first k canvas tokens stays in the cache and the rest
is dropped (`num_rejected = W - k`; a forward that emits nothing drops all W). Attention is per request either causal
or bidirectional over everything in the cache plus the canvas.

BARD maps onto it with W = B (`BardRequest` with `fuse_commit=False`, `prefill_step=False`):

- a denoising step is a canvas holding the block (mask tokens where undecided), bidirectional; it emits nothing, so
  its KV is dropped;
- a commit is a canvas holding the finished block, bidirectional (it sees the cache and the whole block, as DESIGN
  3.2 lets a clean block do); it emits the block's B tokens, so their KV stays;
- the last block is emitted by the step that finishes it (cut after its first EOS and at `max_tokens`), with no
  commit, as `generate` does;
- the prompt's prefill is causal. That is the prompt mask of DESIGN 3.2 only for checkpoints with
  ``prompt_attention="causal"``: vLLM cannot give a prefill the block-causal mask (its per-request flag is causal or
  bidirectional, its FlexAttention mask_mod does not see the request), so `check_servable` refuses the others.
  Prediction shift (DESIGN 4.1) needs the logits of the last prompt token, which vLLM's prefill does not return, so
  it is refused too.

Every answer then equals `model.generate(..., fuse_commit=False, prefill_step=False)` token for token (tested by
`tests/test_engine_request.py` with the transformers model following this contract).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .request import BardRequest


def check_servable(model_config) -> None:
    """Raise a ValueError naming the field, its value and the fix when vLLM's diffusion path cannot decode the
    checkpoint exactly (see the module docstring)."""
    prompt_attention = getattr(model_config, "prompt_attention", "block_causal")
    if prompt_attention != "causal":
        raise ValueError(
            f"vLLM cannot serve this BARD-VL checkpoint exactly: its `prompt_attention` is {prompt_attention!r}, and "
            "vLLM prefills a prompt with causal attention only (its per-request flag is causal or bidirectional; no "
            "block-causal prompt mask). Convert and train with `prompt_attention='causal'` "
            "(`convert_from_autoregressive(..., prompt_attention='causal')`) to serve with vLLM, or serve this "
            "checkpoint with `transformers-bard serve`."
        )
    if getattr(model_config, "prediction_shift", False):
        raise ValueError(
            "vLLM cannot serve this BARD-VL checkpoint: `prediction_shift` is True, which scores a block's first "
            "token with the logits of the last prompt token, and vLLM's prefill returns no logits. Serve it with "
            "`transformers-bard serve`, or use a checkpoint trained with `prediction_shift=False` (the default)."
        )


class CanvasSlot:
    """One request under vLLM's diffusion contract: the state the plugin's sampler keeps per request slot.

    `plan` holds the checkpoint's decoding settings with the request's `max_tokens` as `max_new_tokens`. vLLM runs a
    canvas only while it fits in `max_model_len` and cuts the last one short, and a short canvas is not a BARD block,
    so the answer is limited to the whole blocks that fit (`cut_by_context`). vLLM ends a request on an EOS, at
    `max_tokens` or at `max_model_len`; when the answer ends otherwise (at that limit, or on an EOS id vLLM does not
    know), vLLM runs one more canvas, and the slot then emits `end_token` (an EOS id vLLM stops on), the only way
    to end a vLLM request early.
    """

    def __init__(self, prompt_length: int, plan, max_model_len: int, end_token: int,
                 generator: torch.Generator | None = None):
        B = plan.block_size
        room = (max_model_len - prompt_length) // B * B
        # no whole block fits: the answer is empty, and the first canvas step ends the request
        self.no_room = room < 1
        self.cut_by_context = plan.max_new_tokens > room
        limit = max(min(plan.max_new_tokens, room), 1)
        plan = replace(plan, fuse_commit=False, prefill_step=False, max_new_tokens=limit,
                       num_blocks=math.ceil(limit / B))
        self.request = BardRequest(prompt_length, plan, "causal", generator=generator)
        self.block_size = B
        self.end_token = end_token
        self.emitted = 0
        self.sent_end_token = False

    @property
    def finished(self) -> bool:
        return self.no_room or self.request.finished

    def finish_prefill(self) -> list[int]:
        """The prompt is in the cache: returns the first canvas (B mask tokens)."""
        forward = self.request.next_forward()
        if forward.kind != "prefill":
            raise RuntimeError("finish_prefill() was already called for this request.")
        self.request.take_logits(torch.empty(0, 1))
        return self.request.next_forward().new_tokens

    def step(self, logits: torch.Tensor) -> tuple[list[int], list[int] | None]:
        """The canvas forward ran; `logits` ``[B, vocab]`` are its rows. Returns the tokens to emit (their KV is kept)
        and the next canvas, None when the answer is complete."""
        if self.finished:  # vLLM did not stop on the answer's end: end the request (class docstring)
            if self.sent_end_token:
                raise RuntimeError("vLLM ran a canvas for a finished request after its end token.")
            self.sent_end_token = True
            return [self.end_token], None
        forward = self.request.next_forward()
        if forward.kind == "prefill":
            raise RuntimeError("A canvas step before the prefill finished: call finish_prefill() first.")
        if logits.shape[0] != self.block_size:
            raise RuntimeError(f"A canvas of {logits.shape[0]} rows, expected {self.block_size}: the answer was limited "
                               "to whole blocks that fit in max_model_len, so vLLM should never cut one short.")
        rows = [position - forward.cached for position in forward.logit_positions]
        self.request.take_logits(logits[rows])
        emit: list[int] = []
        if forward.kind == "commit" or self.request.finished:
            emit = self.request.output_ids[self.emitted:]
            self.emitted += len(emit)
        if self.request.finished:
            return emit, None
        return emit, self.request.next_forward().new_tokens
