"""BARD decoding of one request, for an engine that keeps one sequence per request (vLLM; no engine import here).

An engine such as vLLM holds, per request, a KV cache over *logical positions* 0, 1, 2, ...: the prompt, then the
response. Each forward appends some tokens after the cached ones and may drop the KV of a trailing part again (vLLM's
rejected draft tokens). BARD's decoding (DESIGN 4) maps onto that directly:

- prefill: the prompt, kept; with `prefill_step` block 0's B mask tokens ride along and are dropped;
- denoising step of block b: its B tokens at positions ``P + bB ...``, dropped;
- commit of block b: its B tokens, kept; with `fuse_commit` followed by block b + 1's B tokens, dropped.

Who attends to whom is `visible` (DESIGN 3.2) on labels that follow from the logical position alone: positions below
the prompt length P are PREFIX with block id ``i // B``, the others CLEAN with block id ``ceil(P / B) + (i - P) // B``.
The tokens being denoised sit at their own positions, and the cache never holds a noisy block, so labelling them
CLEAN gives exactly the noisy rule (`logical_visible`). With ``prompt_attention="causal"`` the prompt is
token-causal. An engine attention backend that takes a ``mask_mod`` over logical positions and knows each request's
prompt length can call `logical_visible` as it is.

`BardRequest` is the state machine: `next_forward()` says what to run, `take_logits()` consumes the logits of the
positions it asked for and applies `generate`'s own step rule (`propose_tokens`, `apply_block_step`), so an engine
that follows it answers what `model.generate(..., prefill_step=..., fuse_commit=...)` answers for the same request
(tested by driving it with the transformers model as the engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.bard_vl.generation_bard_vl import (
    BardVLGenerationConfig,
    _DecodingPlan,
    apply_block_step,
    propose_tokens,
    resolve_decoding_plan,
)
from ...models.bard_vl.masking_bard_vl import CLEAN, PREFIX, visible


def logical_block_ids(positions: torch.Tensor, prompt_length, block_size: int) -> torch.Tensor:
    """Block id of each logical position (DESIGN 3.2): ``i // B`` in the prompt, ``ceil(P / B) + (i - P) // B`` after
    it. `prompt_length` is an int or a tensor broadcastable to `positions`."""
    prompt_length = torch.as_tensor(prompt_length, device=positions.device)
    first_response_block = torch.div(prompt_length + block_size - 1, block_size, rounding_mode="floor")
    in_prompt = positions < prompt_length
    return torch.where(
        in_prompt,
        torch.div(positions, block_size, rounding_mode="floor"),
        first_response_block + torch.div(positions - prompt_length, block_size, rounding_mode="floor"),
    )


def logical_visible(q_pos, kv_pos, prompt_length, block_size: int, prompt_attention: str = "block_causal"):
    """True where the query at logical position `q_pos` may attend to the key at `kv_pos` (broadcastable tensors) of a
    request with prompt length `prompt_length`: the rule of DESIGN 3.2 (`visible`) on labels derived from positions."""
    prompt_length = torch.as_tensor(prompt_length, device=q_pos.device)
    q_segment = torch.where(q_pos < prompt_length, PREFIX, CLEAN)
    kv_segment = torch.where(kv_pos < prompt_length, PREFIX, CLEAN)
    return visible(
        q_segment, logical_block_ids(q_pos, prompt_length, block_size), q_pos,
        kv_segment, logical_block_ids(kv_pos, prompt_length, block_size), kv_pos,
        prompt_attention,
    )


def decoding_plan(generation_config, model_config, max_new_tokens: int | None = None,
                  device: torch.device | str = "cpu") -> _DecodingPlan:
    """The scalars `generate` resolves for one call (`resolve_decoding_plan`), for one request of an engine: the
    checkpoint's generation config (a `BardVLGenerationConfig`, or an AR one read as DESIGN 4.6 says) and model
    config (`BardVLConfig`: block size, mask token, prediction shift). `max_new_tokens` (the request's `max_tokens`)
    overrides the config's."""
    config = BardVLGenerationConfig.from_generation_config(generation_config)
    if max_new_tokens is not None:
        config.update(max_new_tokens=max_new_tokens)
    return resolve_decoding_plan(config, model_config, torch.zeros(1, 1, dtype=torch.long, device=device), None)


@dataclass
class EngineForward:
    """What a request needs from the engine's next forward.

    The forward appends `new_tokens` after the `cached` tokens the engine holds for the request (at the prefill the
    prompt comes first: the engine has it), keeps the KV of the first `num_kept` of all the tokens it ran and drops
    the rest, and returns the logits at the logical positions `logit_positions` (ascending), in that order.
    """

    kind: str  # "prefill", "denoise" or "commit"
    cached: int  # tokens in the request's cache before the forward (the logical position of the first new token)
    new_tokens: list[int]  # after the prompt at the prefill
    num_kept: int  # of the tokens run (prompt included at the prefill)
    logit_positions: list[int]


class BardRequest:
    """Block-diffusion decoding of one request (DESIGN 4), driven by an engine.

    Loop: ``forward = request.next_forward()``; run it; ``request.take_logits(logits)``; until `finished`. The
    request then holds `output_ids` (cut after the first EOS and at `max_new_tokens`), `finish_reason` ("stop" or
    "length") and `num_forwards` (decoding forwards, the prefill not counted, as `generate` counts them).
    """

    def __init__(self, prompt_length: int, plan: _DecodingPlan, prompt_attention: str = "block_causal",
                 generator: torch.Generator | None = None):
        if prompt_length < 1:
            raise ValueError(f"`prompt_length` must be >= 1, got {prompt_length}.")
        if prompt_attention not in ("block_causal", "causal"):
            raise ValueError(f"`prompt_attention` must be 'block_causal' or 'causal', got {prompt_attention!r}.")
        self.prompt_length = prompt_length
        self.plan = plan
        self.prompt_attention = prompt_attention
        self.generator = generator
        B = plan.block_size
        device = plan.eos_token_ids.device if plan.eos_token_ids is not None else "cpu"
        self.block = torch.full((1, B), plan.mask_token_id, dtype=torch.long, device=device)
        self.block_index = 0
        self.steps = 0
        self.committing = False
        self.finished_block: torch.Tensor | None = None
        self.first_logits: torch.Tensor | None = None  # [1, vocab] under prediction_shift
        self.cached = 0
        self.prefilled = False
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.num_forwards = 0
        self._pending: EngineForward | None = None
        self._decide: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _block_start(self, block_index: int) -> int:
        return self.prompt_length + block_index * self.plan.block_size

    def _decide_now(self) -> torch.Tensor:
        """The block positions this step decides ``[1, B]``: the masked ones, every one with revision."""
        if self.plan.edit_threshold is not None:
            return torch.ones_like(self.block, dtype=torch.bool)
        return self.block == self.plan.mask_token_id

    def _step_logit_positions(self, decide: torch.Tensor, block_start: int) -> list[int]:
        """Logical positions whose logits score the `decide` positions: position j itself, or under
        `prediction_shift` position j - 1 (j = 0's logits are `first_logits`, none needed)."""
        columns = decide[0].nonzero().squeeze(-1).tolist()
        if self.plan.prediction_shift:
            return [block_start + j - 1 for j in columns if j > 0]
        return [block_start + j for j in columns]

    def next_forward(self) -> EngineForward:
        """The forward to run next (the same one again until `take_logits` is called)."""
        if self.finished:
            raise RuntimeError("The request is finished; it needs no more forwards.")
        if self._pending is not None:
            return self._pending
        plan, B = self.plan, self.plan.block_size
        positions, new_tokens = [], []
        if not self.prefilled:
            kind, kept = "prefill", self.prompt_length
            if plan.prediction_shift:
                positions.append(self.prompt_length - 1)
            step = plan.prefill_step
        elif self.committing:
            kind, kept = "commit", B
            new_tokens += self.finished_block[0].tolist()
            if plan.prediction_shift:
                positions.append(self.cached + B - 1)
            step = plan.fuse_commit
        else:
            kind, kept, step = "denoise", 0, True
        self._decide = self._decide_now() if step else torch.zeros_like(self.block, dtype=torch.bool)
        if step:
            new_tokens += self.block[0].tolist()
            positions += self._step_logit_positions(self._decide, self._block_start(self.block_index))
        self._pending = EngineForward(kind=kind, cached=self.cached, new_tokens=new_tokens, num_kept=kept,
                                      logit_positions=sorted(positions))
        return self._pending

    def take_logits(self, logits: torch.Tensor) -> None:
        """Consume the logits ``[len(logit_positions), vocab]`` of the pending forward, in its position order."""
        forward = self._pending
        if forward is None:
            raise RuntimeError("No forward is pending: call next_forward() first.")
        if logits.shape[0] != len(forward.logit_positions):
            raise ValueError(f"Expected logits for {len(forward.logit_positions)} positions "
                             f"{forward.logit_positions}, got {logits.shape[0]} rows.")
        plan = self.plan
        by_position = dict(zip(forward.logit_positions, logits))
        if forward.kind == "prefill":
            self.prefilled = True
        else:
            self.num_forwards += 1
        self.cached += forward.num_kept
        if forward.kind == "commit":
            self.committing = False
        if plan.prediction_shift:  # the last token before the current block scores its position 0
            before_block = self._block_start(self.block_index) - 1
            if before_block in by_position:
                self.first_logits = by_position[before_block][None].clone()
        decide = self._decide
        self._pending = self._decide = None
        if decide.any():
            block_start = self._block_start(self.block_index)
            rows = []
            for j in decide[0].nonzero().squeeze(-1).tolist():
                if plan.prediction_shift:
                    rows.append(self.first_logits[0] if j == 0 else by_position[block_start + j - 1])
                else:
                    rows.append(by_position[block_start + j])
            process = (lambda scores: plan.warpers(None, scores)) if plan.temperature > 0 else None
            tokens, confidence = propose_tokens(torch.stack(rows), plan, self.generator, process)
            steps = torch.tensor([self.steps], device=self.block.device)
            self.block = apply_block_step(self.block, decide, tokens, confidence, steps, plan)[0]
            self.steps += 1
        if bool((self.block != plan.mask_token_id).all()):
            self._end_block()

    def _end_block(self) -> None:
        """The block has no mask left: keep its tokens (cut after EOS and at `max_new_tokens`), then stop or move on
        to the next block, committed by the next forward (DESIGN 4.4)."""
        plan, B = self.plan, self.plan.block_size
        tokens = self.block[0].tolist()
        eos = set(plan.eos_token_ids.tolist()) if plan.eos_token_ids is not None else set()
        first_eos = next((j for j, token in enumerate(tokens) if token in eos), None)
        offset = self.block_index * B
        keep = B if first_eos is None else first_eos + 1
        keep = min(keep, plan.max_new_tokens - offset)
        self.output_ids += tokens[:keep]
        if first_eos is not None or offset + B >= plan.max_new_tokens:
            self.finish_reason = "stop" if first_eos is not None and first_eos < keep else "length"
        if self.finished:
            return
        self.committing = True
        self.finished_block = self.block
        self.block = torch.full_like(self.block, plan.mask_token_id)
        self.block_index += 1
        self.steps = 0

