"""BARD-VL inside vLLM (>= 0.32, Model Runner V2): the model class vLLM loads, its ModelState and its sampler.

Imports vLLM: loaded by vLLM through `register()`'s lazy "module:Class" registration. The decoding lives in
`canvas.CanvasSlot` (tested on CPU against `generate`); this file only moves data between vLLM's runner and the
slots:

- `BardVLForVLLM` is vLLM's Qwen3-VL (weights under the same names, the same multimodal processor) whose
  `get_model_state_cls` returns `BardVLModelState`.
- `BardVLModelState` is vLLM's default state (M-RoPE positions: a canvas token at position ``P + j`` gets
  ``P + j + rope_delta`` on all three axes, as DESIGN 2 says; image embeddings) plus one `CanvasSlot` per request,
  and a per-request attention flag: causal while the prompt is prefilled, bidirectional for every canvas.
- `BardVLSampler` hands each request's canvas logits to its slot, returns the tokens the slot emits (vLLM keeps
  their KV and drops the rest) and writes the next canvas into the runner's draft-token buffer.

The slots run one request at a time in Python (a few small GPU-to-host copies per request and forward): correct
first; batching the step across requests is the next step once this path has run on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.logger import init_logger
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vllm.v1.worker.gpu.attn_utils import build_attn_metadata
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.sample.output import SamplerOutput

from ...models.bard_vl.generation_bard_vl import BardVLGenerationConfig
from .canvas import CanvasSlot, check_servable
from .request import decoding_plan

logger = init_logger(__name__)

_NO_PENALTIES = SimpleNamespace(output_bin_counts=None)  # the runner reads it; BARD applies no penalties


class BardVLModelState(DefaultModelState):
    num_new_sampled_tokens_per_step = 0  # a forward emits only what the sampler says (a committed block)

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        hf_config = self.model_config.hf_config
        check_servable(hf_config)
        self.block_size = int(hf_config.block_size)
        self.hf_config = hf_config
        self.generation_config = BardVLGenerationConfig.from_dict(self.model_config.try_get_generation_config())
        eos = self.generation_config.eos_token_id
        self.end_token = int(eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
        self.slots: dict[int, CanvasSlot] = {}  # request slot -> its decoding
        self.slot_of: dict[str, int] = {}
        # per-request causal flag, int32 and persistent (the attention metadata of a CUDA graph points at it)
        self.causal = torch.zeros(self.max_num_reqs, dtype=torch.int32, device=device)

    def get_supported_generation_tasks(self):
        return ("generate",)

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        prompt = new_req_data.prefill_token_ids or new_req_data.prompt_token_ids
        if len(prompt) != len(new_req_data.prompt_token_ids):
            logger.warning_once("A BARD-VL request was preempted and resumes with its answer so far re-prefilled "
                                "causally; its committed blocks were bidirectional, so the rest of that answer may "
                                "differ from model.generate. Give vLLM more KV-cache memory to avoid preemption.")
        params = new_req_data.sampling_params
        max_tokens = params.max_tokens if params is not None and params.max_tokens is not None else None
        plan = decoding_plan(self.generation_config, self.hf_config, max_new_tokens=max_tokens, device=self.device)
        self.slots[req_index] = CanvasSlot(len(prompt), plan, self.max_model_len, self.end_token)
        self.slot_of[new_req_data.req_id] = req_index

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        index = self.slot_of.pop(req_id, None)
        if index is not None:
            self.slots.pop(index, None)

    def custom_sampler(self, sampler):
        return BardVLSampler(sampler, self.slots, self.block_size), None

    def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, kv_cache_config,
                     for_capture=False, ubatch_idx: int = 0, model_specific_attn_metadata=None) -> dict[str, Any]:
        if ubatch_idx != 0:
            raise NotImplementedError("BARD-VL does not support dual-batch overlap (ubatch_idx > 0).")
        if cudagraph_mode == CUDAGraphMode.FULL:
            num_reqs, num_tokens = input_batch.num_reqs_after_padding, input_batch.num_tokens_after_padding
        else:
            num_reqs, num_tokens = input_batch.num_reqs, input_batch.num_tokens
        actual = input_batch.num_reqs
        # causal while the prompt is prefilled (checkpoints with prompt_attention="causal"), bidirectional for a
        # canvas: it sees the cache and the whole block, which is DESIGN 3.2's rule for a denoised or committed block
        flags = torch.from_numpy(np.ascontiguousarray(input_batch.is_prefilling_np[:actual], dtype=np.int32))
        self.causal[:actual].copy_(flags, non_blocking=True)
        self.causal[actual:num_reqs] = 0
        return build_attn_metadata(
            attn_groups=attn_groups,
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            query_start_loc_gpu=input_batch.query_start_loc,
            query_start_loc_cpu=torch.from_numpy(input_batch.query_start_loc_np),
            max_query_len=int(input_batch.num_scheduled_tokens.max()),
            seq_lens=input_batch.seq_lens,
            max_seq_len=self.max_model_len,
            block_tables=block_tables,
            slot_mappings=slot_mappings,
            kv_cache_config=kv_cache_config,
            causal=self.causal[:num_reqs],
        )


class BardVLSampler:
    """vLLM's sampler interface for BARD-VL: called after every forward with the logits of the canvas rows."""

    def __init__(self, sampler, slots: dict[int, CanvasSlot], block_size: int):
        self.sampling_states = sampler.sampling_states
        self.req_states = sampler.req_states  # holds draft_tokens [max_num_reqs, canvas], the next canvases
        self.slots = slots
        self.block_size = block_size
        max_num_reqs = self.req_states.draft_tokens.shape[0]
        self.device = self.req_states.draft_tokens.device
        self.sampled = torch.zeros(max_num_reqs, block_size, dtype=torch.int32, device=self.device)

    def add_request(self, req_idx: int, sampling_params) -> None:
        self.sampling_states.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        self.sampling_states.apply_staged_writes()

    @property
    def penalties_state(self):
        return _NO_PENALTIES

    def _write_canvas(self, slot_index: int, canvas: list[int]) -> None:
        self.req_states.draft_tokens[slot_index, : len(canvas)] = torch.tensor(canvas, device=self.device)

    def __call__(self, logits: torch.Tensor, input_batch, draft_logits=None) -> SamplerOutput:
        num_reqs = input_batch.num_reqs
        logits_per_req = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
        first_logit = input_batch.cu_num_logits_np[:num_reqs]
        query_lens = np.diff(input_batch.query_start_loc_np[: num_reqs + 1])
        sampled = self.sampled[:num_reqs]
        sampled.zero_()
        num_sampled = np.zeros(num_reqs, dtype=np.int32)
        num_rejected = np.zeros(num_reqs, dtype=np.int32)
        for i in range(num_reqs):
            slot_index = int(input_batch.idx_mapping_np[i])
            slot = self.slots.get(slot_index)
            if slot is None:  # vLLM's dummy runs (profiling, kernel warm-up) sample rows of no request
                continue
            if logits_per_req[i] == 0:  # a prefill chunk: no logits; after the last one, the first canvas
                prompt_done = (input_batch.num_computed_prefill_tokens_np[i] + input_batch.num_scheduled_tokens[i]
                               >= input_batch.prefill_len_np[i])
                if prompt_done:
                    self._write_canvas(slot_index, slot.finish_prefill())
                continue
            start = int(first_logit[i])
            emit, canvas = slot.step(logits[start: start + int(logits_per_req[i])])
            if emit:
                sampled[i, : len(emit)] = torch.tensor(emit, dtype=torch.int32, device=self.device)
                num_sampled[i] = len(emit)
                num_rejected[i] = logits_per_req[i] - len(emit)  # the emitted tokens' KV stays
            else:
                num_rejected[i] = query_lens[i]  # a denoising step: its KV is dropped
            if canvas is not None:
                self._write_canvas(slot_index, canvas)
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs_tensors=None,
            num_nans=None,
            num_sampled=torch.from_numpy(num_sampled).to(self.device, non_blocking=True),
            num_rejected=torch.from_numpy(num_rejected).to(self.device, non_blocking=True),
        )


class BardVLForVLLM(Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL (weights, vision tower, processor, M-RoPE) decoding by block diffusion."""

    @staticmethod
    def get_model_state_cls():
        return BardVLModelState
