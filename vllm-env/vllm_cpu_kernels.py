"""Torch versions of Model Runner V2's Triton input-preparation kernels, for vLLM on CPU only (the vLLM virtual
environment of `make vllm`; the main environment never imports this file).

What: vLLM's Model Runner V2 (`vllm/v1/worker/gpu/`, the only runner with vLLM's diffusion path) prepares every
engine step's inputs with small Triton kernels (block tables, slot mappings, positions, M-RoPE positions, token ids
of sampled and draft tokens, the bookkeeping after sampling, staged buffer writes, greedy sampling). On this CPU they
run through Triton's interpreter (TRITON_INTERPRET=1, see vllm_env_compat.py 3), which executes each kernel program
by program in numpy: tens of milliseconds per launch whatever the size. A census of 16 requests on the tiny BARD
checkpoint (38 engine steps) found those launches to be about 92 % of the engine's time (docs/serving/engines.md 9).
Once those were gone, one kernel outside the runner took 72 % of the engine's time on requests with a new image:
Qwen3-VL's vision position embeddings (`triton_pos_embed_interpolate`, about 0.2 s per image in the interpreter).
This module gives each Python wrapper that launches one of them a torch implementation written from the kernel's
semantics (what each program reads and writes, its masks, its padding, its dtypes, the buffers it writes in place).

Results are identical: every output and every buffer written in place holds the same values, dtype for dtype, as
the Triton wrapper leaves (tests/test_vllm_cpu_kernels.py runs both on randomized runner-shaped inputs and compares
them exactly). Integer arithmetic keeps the kernels' int32/int64 widths; greedy sampling takes the first maximum, as
the interpreter's argmax does. Each replacement runs only where it can be exact: non-CPU tensors, context
parallelism, pointer tables that do not match the tensors, NaN logits, non-greedy rows and other cases the kernels
treat specially go to the original wrapper (and so to Triton's interpreter, the fallback for every kernel not
replaced here).

How it is activated: vllm_env_compat.py's import hook calls `patch(module)` after each `vllm.v1.worker.gpu.*`
module is executed, only when TRITON_INTERPRET=1 (the CPU mode) and BARD_VLLM_TRITON_KERNELS is not "1" (the
opt-out, to compare both paths). `patch` replaces the wrappers where they are defined (module functions, or methods
of BlockTables, RopeState and StagedWriteTensor) and rebinds any name a module bound with `from ... import name`
(model_runner.py: five input_batch functions; sample/sampler.py and spec_decode/rejection_sampler.py:
get_num_sampled_and_rejected; sample/sampler.py and the speculators: gumbel_sample).

Assumption shared with the kernels (whose programs run in parallel on a GPU): within one call each non-negative
request-state index appears at most once in idx_mapping, and query ranges do not overlap. The wrappers that write
per-request state check the first and fall back to the original where it fails.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

PAD_SLOT_ID = -1  # vllm.v1.attention.backends.utils.PAD_SLOT_ID, the slot id of a token with no KV slot
GPU = "vllm.v1.worker.gpu."
_ORIGINALS: dict[str, object] = {}  # "module:qualname" -> the Triton wrapper it replaced


def _original(module_name: str, qualname: str):
    """The Triton wrapper: the one `patch` replaced, or (not patched, as in the test) the module's own."""
    key = f"{module_name}:{qualname}"
    if key in _ORIGINALS:
        return _ORIGINALS[key]
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _next_power_of_2(n: int) -> int:
    """Triton's block-size rule (smallest power of two >= n, 0 for n = 0), computed the same way."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def _cpu(*tensors) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and t.device.type == "cpu") for t in tensors)


def _flat_ok(*tensors) -> bool:
    """The kernels address these by flat element offsets from the data pointer: a contiguous view is the same."""
    return all(t is None or t.is_contiguous() for t in tensors)


def _rows_ok(*tensors) -> bool:
    """The kernels address these as base + row * stride(0) + column: needs unit stride along the last dim."""
    return all(t is None or t.dim() < 2 or t.numel() == 0 or t.stride(-1) == 1 for t in tensors)


def _distinct(rows: torch.Tensor) -> bool:
    return rows.numel() == torch.unique(rows).numel()


def _segments(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments of these lengths (negative = empty, as a `range(0, n)` loop in a kernel): each element's segment
    index and its offset within the segment (both int64), in order."""
    lengths = lengths.to(torch.int64).clamp(min=0)
    total = int(lengths.sum())
    segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=total)
    starts = torch.cumsum(lengths, 0) - lengths
    return segment, torch.arange(total) - starts[segment]


# --- vllm/v1/worker/gpu/block_table.py -------------------------------------------------------------------------


def gather_block_tables(self, idx_mapping, num_reqs_padded, out=None, out_ptrs=None):
    """BlockTables.gather_block_tables without `_gather_block_tables_kernel`: row b of each group's input block
    table gets the first num_blocks[group, idx_mapping[b]] entries of the request's row (the rest of the row keeps
    what it held); rows num_reqs..num_reqs_padded-1 are zeroed over the full row width."""
    module, name = GPU + "block_table", "BlockTables.gather_block_tables"
    if self.num_kv_cache_groups == 0:
        return _original(module, name)(self, idx_mapping, num_reqs_padded, out, out_ptrs)
    dst_tables = tuple(self.input_block_tables) if out is None else tuple(out)
    src_tables = [table.gpu for table in self.block_tables]
    strides = self.block_table_strides.tolist()
    ok = (_cpu(idx_mapping, self.num_blocks.gpu, *src_tables, *dst_tables) and _flat_ok(*src_tables, *dst_tables)
          and len(dst_tables) == self.num_kv_cache_groups
          and all(src.stride(0) == dst.stride(0) == stride and src.shape[1] == dst.shape[1] == stride
                  for src, dst, stride in zip(src_tables, dst_tables, strides)))
    if ok and out is not None:  # the kernel writes through out_ptrs: they must be these tensors
        ok = out_ptrs is not None and out_ptrs.view(torch.int64).tolist() == [t.data_ptr() for t in dst_tables]
    idx = idx_mapping.to(torch.int64)
    num_reqs = idx.numel()
    num_real = min(num_reqs, num_reqs_padded)  # the grid has num_reqs_padded programs
    if ok and num_real and int(idx[:num_real].min()) < 0:
        ok = False  # a -1 entry makes the kernel read outside the tables: left to it
    if not ok:
        return _original(module, name)(self, idx_mapping, num_reqs_padded, out, out_ptrs)
    num_blocks = self.num_blocks.gpu
    for group, (src, dst, stride) in enumerate(zip(src_tables, dst_tables, strides)):
        if num_real:
            rows = idx[:num_real]
            keep = torch.arange(stride) < num_blocks[group].index_select(0, rows).to(torch.int64)[:, None]
            dst[:num_real] = torch.where(keep, src.index_select(0, rows), dst[:num_real])
        if num_reqs_padded > num_reqs:
            dst[num_reqs:num_reqs_padded] = 0
    return tuple(table[:num_reqs_padded] for table in dst_tables)


def compute_slot_mappings(self, idx_mapping, query_start_loc, positions, num_tokens_padded, out=None):
    """BlockTables.compute_slot_mappings without `_compute_slot_mappings_kernel` (no context parallelism): token t
    of request b (query range query_start_loc[b]..[b+1]) at position p gets slot
    block_table[idx_mapping[b], p // block_size] * block_size + p % block_size per KV-cache group, PAD_SLOT_ID where
    the group has slot mapping disabled or idx_mapping[b] < 0 (a dummy request); every entry from
    query_start_loc[num_reqs] to the buffer's end is PAD_SLOT_ID."""
    module, name = GPU + "block_table", "BlockTables.compute_slot_mappings"
    slot_mappings = self.slot_mappings if out is None else out
    tables = [table.gpu for table in self.block_tables]
    if (self.num_kv_cache_groups == 0 or self.cp_size != 1
            or not _cpu(idx_mapping, query_start_loc, positions, slot_mappings, *tables)
            or not _flat_ok(positions, *tables) or not _rows_ok(slot_mappings)):
        return _original(module, name)(self, idx_mapping, query_start_loc, positions, num_tokens_padded, out)
    num_reqs = idx_mapping.shape[0]
    max_num_tokens = slot_mappings.shape[1]
    starts = query_start_loc[:num_reqs].to(torch.int64)
    segment, offset = _segments(query_start_loc[1:num_reqs + 1].to(torch.int64) - starts)
    tokens = starts[segment] + offset
    pos = positions.view(-1)[tokens]
    req = idx_mapping.to(torch.int64)[segment]
    real = req >= 0
    block_sizes = self.block_sizes_tensor.tolist()
    enabled = self.slot_mapping_enabled.tolist()
    strides = self.block_table_strides.tolist()
    actual_num_tokens = int(query_start_loc[num_reqs])
    for group in range(self.num_kv_cache_groups):
        block_size = block_sizes[group]
        if enabled[group]:
            block_index = torch.div(pos, block_size, rounding_mode="trunc")  # C division, as the kernel's
            block_offset = torch.fmod(pos, block_size)
            flat_index = torch.where(real, req * strides[group] + block_index, 0)
            block_number = torch.where(real, tables[group].view(-1)[flat_index], 0)  # int32, like the load
            slots = (block_number * block_size).to(torch.int64) + block_offset  # int32 product, int64 sum
            slots = torch.where(real, slots, PAD_SLOT_ID)
        else:
            slots = torch.full_like(pos, PAD_SLOT_ID)
        row = slot_mappings[group]
        row[tokens] = slots.to(row.dtype)
        if actual_num_tokens < max_num_tokens:
            row[max(actual_num_tokens, 0):] = PAD_SLOT_ID
    return slot_mappings[:, :num_tokens_padded]


# --- vllm/v1/worker/gpu/mm/rope.py ------------------------------------------------------------------------------


def rope_prepare_positions(self, idx_mapping, query_start_loc, prefill_lens, num_computed_tokens):
    """RopeState.prepare_positions without `_prepare_rope_positions_kernel`: the query tokens of request b (state
    r = idx_mapping[b], c = num_computed_tokens[r] tokens done) get, in each M-RoPE dimension j, the precomputed
    prefill position prefill_positions[r, j, c + k] while c < prefill_lens[r], else c + k + prefill_delta[r]."""
    module, name = GPU + "mm.rope", "RopeState.prepare_positions"
    table, delta = self.prefill_positions.gpu, self.prefill_delta.gpu
    if not (_cpu(idx_mapping, query_start_loc, prefill_lens, num_computed_tokens, self.positions, table, delta)
            and _flat_ok(table) and _rows_ok(self.positions)):
        return _original(module, name)(self, idx_mapping, query_start_loc, prefill_lens, num_computed_tokens)
    num_reqs = idx_mapping.shape[0]
    idx = idx_mapping.to(torch.int64)
    computed = num_computed_tokens[idx]
    is_prefill = computed < prefill_lens[idx]
    starts = query_start_loc[:num_reqs]
    segment, offset = _segments(query_start_loc[1:num_reqs + 1] - starts)
    columns = starts[segment].to(torch.int64) + offset
    original = computed[segment] + offset.to(computed.dtype)  # num_computed + k, in the kernel's int32
    prefill = is_prefill[segment]
    decode = original + delta[idx][segment]
    rows = idx[segment] * (self.num_dims * self.max_model_len)
    flat = table.view(-1)
    for dim in range(self.num_dims):
        lookup = torch.where(prefill, rows + dim * self.max_model_len + original.to(torch.int64), 0)
        value = torch.where(prefill, flat[lookup].to(decode.dtype), decode)
        self.positions[dim, columns] = value.to(self.positions.dtype)


# --- vllm/v1/worker/gpu/buffer_utils.py -------------------------------------------------------------------------


def apply_write(self):
    """StagedWriteTensor.apply_write without `_apply_write_kernel`: each staged write (row, start, values) copies
    its values into the tensor at row * stride(0) + start, in the order staged (a later write to the same elements
    wins, as the interpreter's sequential programs leave it), then the staged writes are cleared."""
    count = len(self._staged_write_indices)
    if count == 0:
        return
    if not (_cpu(self.gpu) and _flat_ok(self.gpu)):
        return _original(GPU + "buffer_utils", "StagedWriteTensor.apply_write")(self)
    if self.write_contents is None:  # the original converts the values with torch.tensor (async_tensor_h2d) ...
        contents = torch.tensor(self._staged_write_contents, dtype=self.dtype)
    else:  # ... or with numpy into its staging buffer (the UVA path, which vllm-cpu takes for the large tensors)
        numpy_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        contents = torch.from_numpy(np.asarray(self._staged_write_contents, dtype=numpy_dtype))
    flat = self.gpu.view(-1)
    row_stride = self.gpu.stride(0)
    begin = 0
    for row, start, end in zip(self._staged_write_indices, self._staged_write_starts, self._staged_write_cu_lens):
        at = row * row_stride + start
        flat[at: at + end - begin] = contents[begin:end]
        begin = end
    self.clear_staged_writes()


# --- vllm/v1/worker/gpu/input_batch.py --------------------------------------------------------------------------


def prepare_prefill_inputs(input_ids, next_prefill_tokens, idx_mapping, query_start_loc, all_token_ids, prefill_len,
                           num_computed_tokens):
    """`prepare_prefill_inputs` without `_prepare_prefill_inputs_kernel`: for each request still in its prefill
    (state r, c = num_computed_tokens[r] < prefill_len[r]), its query slots of input_ids get all_token_ids[r, c:c+n]
    (n = its query length) and next_prefill_tokens[k, r] the prompt token at c + n + k (0 past the prefill), for
    every lookahead row k."""
    args = (input_ids, next_prefill_tokens, idx_mapping, query_start_loc, all_token_ids, prefill_len,
            num_computed_tokens)
    original = _original(GPU + "input_batch", "prepare_prefill_inputs")
    if not (_cpu(*args) and _flat_ok(input_ids, all_token_ids) and _rows_ok(next_prefill_tokens)):
        return original(*args)
    idx = idx_mapping.to(torch.int64)
    computed = num_computed_tokens[idx]
    batch = torch.nonzero(computed < prefill_len[idx]).view(-1)
    rows = idx[batch]
    if not _distinct(rows):
        return original(*args)
    computed = computed[batch]
    starts = query_start_loc[batch]
    lengths = query_start_loc[batch + 1] - starts
    row_base = rows * all_token_ids.stride(0)
    tokens = all_token_ids.view(-1)
    segment, offset = _segments(lengths)
    input_ids.view(-1)[starts[segment].to(torch.int64) + offset] = (
        tokens[row_base[segment] + computed[segment].to(torch.int64) + offset].to(input_ids.dtype))
    num_lookahead = next_prefill_tokens.shape[0]
    if num_lookahead and rows.numel():
        ahead = computed[:, None] + lengths[:, None] + torch.arange(num_lookahead, dtype=computed.dtype)
        inside = ahead < prefill_len[rows][:, None]
        lookup = torch.where(inside, row_base[:, None] + ahead.to(torch.int64), 0)
        value = torch.where(inside, tokens[lookup], 0)
        next_prefill_tokens[:, rows] = value.t().to(next_prefill_tokens.dtype)


def prepare_pos_seq_lens(idx_mapping, query_start_loc, num_computed_tokens, pos, seq_lens):
    """`prepare_pos_seq_lens` without `_prepare_pos_seq_lens_kernel`: request b (state r, c = num_computed_tokens[r])
    gets seq_lens[b] = c + its query length and positions c, c+1, ... in its query slots of pos; seq_lens from
    num_reqs to the buffer's end are zeroed."""
    args = (idx_mapping, query_start_loc, num_computed_tokens, pos, seq_lens)
    if not (_cpu(*args) and _flat_ok(pos, seq_lens)):
        return _original(GPU + "input_batch", "prepare_pos_seq_lens")(*args)
    num_reqs = idx_mapping.shape[0]
    computed = num_computed_tokens[idx_mapping.to(torch.int64)]
    starts = query_start_loc[:num_reqs]
    lengths = query_start_loc[1:num_reqs + 1] - starts
    seq_lens[:num_reqs] = (computed + lengths).to(seq_lens.dtype)
    seq_lens[num_reqs:] = 0
    segment, offset = _segments(lengths)
    pos.view(-1)[starts[segment].to(torch.int64) + offset] = (
        computed[segment] + offset.to(computed.dtype)).to(pos.dtype)


def combine_sampled_and_draft_tokens(input_ids, idx_mapping, last_sampled_tokens, query_start_loc, seq_lens,
                                     prefill_len, draft_tokens, cu_num_logits, num_logits,
                                     num_new_sampled_tokens=1):
    """`combine_sampled_and_draft_tokens` without `_combine_sampled_and_draft_tokens_kernel`: the logits indices of
    request b are the last n_b query slots (n_b = its number of logits); for a request past its prefill
    (seq_lens[b] > prefill_len[r]) the first of them gets the last sampled token (when the step samples one and that
    slot is past the prompt) and the last n_b - num_new_sampled_tokens slots its draft tokens."""
    assert num_new_sampled_tokens in (0, 1), (
        f"num_new_sampled_tokens must be 0 or 1, got {num_new_sampled_tokens}")
    args = (input_ids, idx_mapping, last_sampled_tokens, query_start_loc, seq_lens, prefill_len, draft_tokens,
            cu_num_logits)
    if not (_cpu(*args) and _flat_ok(input_ids, last_sampled_tokens) and _rows_ok(draft_tokens)):
        return _original(GPU + "input_batch", "combine_sampled_and_draft_tokens")(*args, num_logits,
                                                                                  num_new_sampled_tokens)
    num_reqs = idx_mapping.shape[0]
    block = _next_power_of_2(draft_tokens.shape[-1] + num_new_sampled_tokens)
    idx = idx_mapping.to(torch.int64)
    logits_indices = torch.empty(num_logits, dtype=torch.int64, device=input_ids.device)
    logits_start = cu_num_logits[:num_reqs]
    logits_per_req = cu_num_logits[1:num_reqs + 1] - logits_start
    query_end = query_start_loc[1:num_reqs + 1]
    first_logit_slot = query_end - logits_per_req  # int32, as in the kernel
    segment, offset = _segments(logits_per_req.clamp(max=block))
    logits_indices[logits_start[segment].to(torch.int64) + offset] = (
        first_logit_slot[segment].to(torch.int64) + offset)
    seq_len = seq_lens[:num_reqs]
    prompt = prefill_len[idx]
    generating = seq_len > prompt
    ids = input_ids.view(-1)
    if num_new_sampled_tokens > 0:
        write = generating & (seq_len - logits_per_req >= prompt)
        ids[first_logit_slot[write].to(torch.int64)] = last_sampled_tokens.view(-1)[idx[write]].to(ids.dtype)
    num_draft = logits_per_req - num_new_sampled_tokens
    segment, offset = _segments(torch.where(generating, num_draft.clamp(max=block), 0))
    if segment.numel():
        ids[(query_end - num_draft)[segment].to(torch.int64) + offset] = (
            draft_tokens[idx[segment], offset].to(ids.dtype))
    return logits_indices


def get_num_sampled_and_rejected(num_sampled, seq_lens, cu_num_logits, idx_mapping, prefill_len):
    """`get_num_sampled_and_rejected` without `_get_num_sampled_and_rejected_kernel`: a request still in a chunked
    prefill (seq_lens[b] < prefill_len[r]) samples and rejects nothing; otherwise num_sampled stays and
    num_rejected = its number of logits - num_sampled. num_sampled is written in place, num_rejected is new."""
    args = (num_sampled, seq_lens, cu_num_logits, idx_mapping, prefill_len)
    if not _cpu(*args):
        return _original(GPU + "input_batch", "get_num_sampled_and_rejected")(*args)
    num_reqs = idx_mapping.shape[0]
    num_rejected = torch.empty_like(num_sampled)
    chunked = seq_lens[:num_reqs] < prefill_len[idx_mapping.to(torch.int64)]
    sampled = torch.where(chunked, 0, num_sampled[:num_reqs])
    num_sampled[:num_reqs] = sampled
    logits = cu_num_logits[1:num_reqs + 1] - cu_num_logits[:num_reqs]
    num_rejected[:num_reqs] = torch.where(chunked, 0, logits - sampled).to(num_rejected.dtype)
    return num_sampled, num_rejected


def post_update(idx_mapping, num_computed_tokens, last_sampled_tokens, output_bin_counts, sampled_tokens,
                num_sampled, num_rejected, query_start_loc, all_token_ids, total_len):
    """`post_update` without `_post_update_kernel`: for each request (state r = idx_mapping[b] >= 0; -1 rows are
    skipped) that sampled n > 0 tokens, they are appended to all_token_ids[r] at total_len[r], the last one becomes
    last_sampled_tokens[r], total_len[r] grows by n and output_bin_counts[r] (if given) counts them; then
    num_computed_tokens[r] grows by its query length (0 without query_start_loc) minus num_rejected[b]."""
    args = (idx_mapping, num_computed_tokens, last_sampled_tokens, output_bin_counts, sampled_tokens, num_sampled,
            num_rejected, query_start_loc, all_token_ids, total_len)
    original = _original(GPU + "input_batch", "post_update")
    if not (_cpu(*args) and _flat_ok(num_computed_tokens, last_sampled_tokens, all_token_ids, total_len)
            and _rows_ok(sampled_tokens, output_bin_counts)):
        return original(*args)
    idx = idx_mapping.to(torch.int64)
    batch = torch.nonzero(idx >= 0).view(-1)
    rows = idx[batch]
    if not _distinct(rows):
        return original(*args)
    count = num_sampled[batch].to(torch.int64)
    length = total_len[rows]  # read before it grows
    some = count > 0
    last = sampled_tokens[batch[some], count[some] - 1]
    last_sampled_tokens.view(-1)[rows[some]] = last.to(last_sampled_tokens.dtype)
    total_len[rows[some]] = (length[some] + count[some].to(length.dtype)).to(total_len.dtype)
    segment, offset = _segments(count)
    tokens = sampled_tokens[batch[segment], offset]
    all_token_ids.view(-1)[rows[segment] * all_token_ids.stride(0) + length[segment].to(torch.int64) + offset] = (
        tokens.to(all_token_ids.dtype))
    if output_bin_counts is not None:
        output_bin_counts.index_put_((rows[segment], tokens.to(torch.int64)),
                                     torch.ones_like(tokens, dtype=output_bin_counts.dtype), accumulate=True)
    if query_start_loc is None:
        query_len = torch.zeros_like(num_rejected[batch])
    else:
        query_len = query_start_loc[batch + 1] - query_start_loc[batch]
    delta = query_len - num_rejected[batch]
    moved = delta != 0
    num_computed_tokens[rows[moved]] = (num_computed_tokens[rows[moved]] + delta[moved]).to(num_computed_tokens.dtype)


def expand_idx_mapping(idx_mapping, total_num_logits, cu_num_logits, max_expand_len):
    """`expand_idx_mapping` without `_expand_idx_mapping_kernel`: one entry per logit, its request's state index
    and its position 0, 1, ... within the request (new tensors, idx_mapping's dtype and int32)."""
    if not _cpu(idx_mapping, cu_num_logits):
        return _original(GPU + "input_batch", "expand_idx_mapping")(idx_mapping, total_num_logits, cu_num_logits,
                                                                    max_expand_len)
    num_reqs = idx_mapping.shape[0]
    expanded_idx_mapping = idx_mapping.new_empty(total_num_logits)
    expanded_local_pos = torch.empty(total_num_logits, dtype=torch.int32, device=idx_mapping.device)
    starts = cu_num_logits[:num_reqs]
    counts = (cu_num_logits[1:num_reqs + 1] - starts).clamp(max=_next_power_of_2(max_expand_len))
    segment, offset = _segments(counts)
    at = starts[segment].to(torch.int64) + offset
    expanded_idx_mapping[at] = idx_mapping[segment]
    expanded_local_pos[at] = offset.to(torch.int32)
    return expanded_idx_mapping, expanded_local_pos


# --- vllm/v1/worker/gpu/sample/gumbel.py ------------------------------------------------------------------------


def gumbel_sample(logits, expanded_idx_mapping, temperature, seed, pos, apply_temperature, is_drafting,
                  logits_cache=None, logits_cache_col=None, use_fp64=False, logits_cache_source=None):
    """`gumbel_sample` for greedy batches without `_gumbel_sample_kernel`: where every row's temperature is 0 (rows
    with a negative state index count as 0, as in the kernel) the kernel adds no noise and returns each row's
    first maximal logit, which is torch's argmax. Any row with a temperature (its Gumbel noise), a logits cache to
    fill, NaN logits (the interpreter's argmax skips NaN) or an empty vocabulary goes to the original."""
    original = _original(GPU + "sample.gumbel", "gumbel_sample")
    args = (logits, expanded_idx_mapping, temperature, seed, pos, apply_temperature, is_drafting, logits_cache,
            logits_cache_col, use_fp64, logits_cache_source)
    if (logits_cache is not None or logits_cache_source is not None or logits.dim() != 2 or logits.shape[1] == 0
            or not _cpu(logits, expanded_idx_mapping, temperature)):
        return original(*args)
    idx = expanded_idx_mapping.to(torch.int64)
    valid = idx >= 0
    temp = torch.where(valid, temperature[idx.clamp(min=0)].to(torch.float32), 0.0)
    values = logits.to(torch.float32)
    if bool((temp != 0.0).any()) or bool(torch.isnan(values).any()):
        return original(*args)
    return values.argmax(dim=-1)


# --- vllm/model_executor/models/qwen3_vl.py (the vision tower) -------------------------------------------------

QWEN3_VL = "vllm.model_executor.models.qwen3_vl"


def pos_embed_interpolate(embed_weight, t, h, w, num_grid_per_side, m_size, dtype):
    """`triton_pos_embed_interpolate` without `_bilinear_pos_embed_kernel`: Qwen3-VL's vision position embeddings,
    the learned `num_grid_per_side`^2 grid bilinearly interpolated to the image's h x w patches, in spatial-merge
    order (m_size x m_size windows row by row), repeated for each of the t frames. One program per output patch in
    the kernel; here all patches at once, with the kernel's float32 arithmetic in its order (fractional grid
    position row * scale, floor, the four weights as w11 = dh dw, w10 = dh - w11, w01 = dw - w11,
    w00 = 1 - dh - w01, then ((w00 e00 + w01 e01) + w10 e10) + w11 e11). Measured: this kernel in the interpreter
    was 72 % of the engine's time on the digits prompts (about 0.2 s per new image; docs/serving/engines.md 9).
    Only float32 weights and output are replaced (the CPU runs here); anything else goes to the original."""
    original = _original(QWEN3_VL, "triton_pos_embed_interpolate")
    if (not _cpu(embed_weight) or embed_weight.dim() != 2 or embed_weight.dtype != torch.float32
            or dtype != torch.float32 or h % m_size or w % m_size or h < 1 or w < 1 or t < 1):
        return original(embed_weight, t, h, w, num_grid_per_side, m_size, dtype)
    h_scale = float(num_grid_per_side - 1) / float(h - 1) if h > 1 else 0.0
    w_scale = float(num_grid_per_side - 1) / float(w - 1) if w > 1 else 0.0
    spatial = torch.arange(h * w, dtype=torch.int32)
    block, local = spatial // (m_size * m_size), spatial % (m_size * m_size)
    blocks_w = w // m_size
    row = (block // blocks_w) * m_size + local // m_size
    col = (block % blocks_w) * m_size + local % m_size
    h_frac = row.to(torch.float32) * torch.tensor(h_scale, dtype=torch.float32)
    w_frac = col.to(torch.float32) * torch.tensor(w_scale, dtype=torch.float32)
    hf, wf = torch.floor(h_frac).to(torch.int32), torch.floor(w_frac).to(torch.int32)
    hc = torch.clamp(hf + 1, max=num_grid_per_side - 1)
    wc = torch.clamp(wf + 1, max=num_grid_per_side - 1)
    dh, dw = h_frac - hf.to(torch.float32), w_frac - wf.to(torch.float32)
    w11 = dh * dw
    w10 = dh - w11
    w01 = dw - w11
    w00 = 1.0 - dh - w01

    def corner(rows, cols):
        return embed_weight[(rows * num_grid_per_side + cols).to(torch.int64)]

    value = (w00[:, None] * corner(hf, wf) + w01[:, None] * corner(hf, wc) + w10[:, None] * corner(hc, wf)
             + w11[:, None] * corner(hc, wc))
    return value.repeat(t, 1)


# --- installation -----------------------------------------------------------------------------------------------

# defining module -> (qualified name, replacement)
PATCHES = {
    GPU + "block_table": [("BlockTables.gather_block_tables", gather_block_tables),
                          ("BlockTables.compute_slot_mappings", compute_slot_mappings)],
    GPU + "mm.rope": [("RopeState.prepare_positions", rope_prepare_positions)],
    GPU + "buffer_utils": [("StagedWriteTensor.apply_write", apply_write)],
    GPU + "input_batch": [("prepare_prefill_inputs", prepare_prefill_inputs),
                          ("prepare_pos_seq_lens", prepare_pos_seq_lens),
                          ("combine_sampled_and_draft_tokens", combine_sampled_and_draft_tokens),
                          ("get_num_sampled_and_rejected", get_num_sampled_and_rejected),
                          ("post_update", post_update),
                          ("expand_idx_mapping", expand_idx_mapping)],
    GPU + "sample.gumbel": [("gumbel_sample", gumbel_sample)],
    QWEN3_VL: [("triton_pos_embed_interpolate", pos_embed_interpolate)],
}


def patches_module(name: str) -> bool:
    """Whether vllm_env_compat's hook must call `patch` after module `name` runs: every Model Runner V2 module (they
    import replaced wrappers by name) and every module that defines one."""
    return name.startswith(GPU) or name in PATCHES


_REPLACED: dict[int, tuple[object, object]] = {}  # id(original wrapper) -> (original, replacement)


def patch(module) -> None:
    """Called (by vllm_env_compat's hook) right after each module `patches_module` names has run: replaces the
    wrappers it defines and rebinds every module-level name bound to one of the replaced originals (`from
    vllm.v1.worker.gpu.input_batch import post_update` and the like)."""
    name = module.__name__
    for qualname, native in PATCHES.get(name, ()):
        *owner_path, attr = qualname.split(".")
        owner = module
        for part in owner_path:
            owner = getattr(owner, part)
        original = getattr(owner, attr)
        if original is native:
            continue
        _ORIGINALS[f"{name}:{qualname}"] = original
        _REPLACED[id(original)] = (original, native)
        setattr(owner, attr, native)
    for attr, value in list(vars(module).items()):
        original, native = _REPLACED.get(id(value), (None, None))
        if original is not None and value is original:
            setattr(module, attr, native)
