"""Runs inside the vLLM virtual environment (`make vllm`), started by tests/test_vllm_cpu_kernels.py: the torch
versions of Model Runner V2's input kernels and of Qwen3-VL's vision position-embedding kernel
(vllm-env/vllm_cpu_kernels.py) against the Triton wrappers they replace, run by Triton's interpreter (TRITON_INTERPRET=1).

    .venv-vllm/bin/python tests/vllm_cpu_kernels_run.py compare OUT.json   # replacements active (the CPU default)
    .venv-vllm/bin/python tests/vllm_cpu_kernels_run.py hook OUT.json      # with BARD_VLLM_TRITON_KERNELS=1

`compare`: checks that the import hook replaced every wrapper where vLLM defines it and where model_runner, the
samplers and the speculators imported it by name; then, for each replaced wrapper and several seeds, builds
randomized inputs shaped as the runner passes them (requests in prefill chunks, decodes, BARD canvases and
speculative drafts, padded request rows, -1 dummy rows, empty batches), runs the Triton wrapper and the replacement
on identical copies and requires every returned tensor and every tensor argument (the buffers written in place)
to be equal, dtype and values, and the replacement to have run in torch (not handed the call back to Triton)
where it should. `hook`: the opt-out leaves every wrapper the Triton one. OUT.json: the cases run per
wrapper, or the first mismatch (the script then exits 1).
"""

import json
import sys

import numpy as np
import torch
import vllm_cpu_kernels as kernels

GPU = "vllm.v1.worker.gpu."
QWEN3_VL = "vllm.model_executor.models.qwen3_vl"
CPU = torch.device("cpu")
MAX_REQS, MAX_TOKENS, MAX_MODEL_LEN = 16, 1024, 128
SEEDS = range(6)


class Mismatch(AssertionError):
    pass


def same(a, b, what: str) -> None:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            detail = (f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}" if isinstance(b, torch.Tensor)
                      else f"tensor vs {type(b).__name__}")
            if isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype:
                where = torch.nonzero(a != b)[:5].tolist()
                detail += f"; first differences at {where}"
            raise Mismatch(f"{what}: {detail}")
    elif isinstance(a, (tuple, list)):
        if not isinstance(b, (tuple, list)) or len(a) != len(b):
            raise Mismatch(f"{what}: {a!r} vs {b!r}")
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{what}[{i}]")
    elif a != b:
        raise Mismatch(f"{what}: {a!r} vs {b!r}")


def copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(copy(v) for v in value)
    return value


FALLBACKS = []  # the originals a replacement handed a call to (it could not be exact there)
_lookup = kernels._original


def _counting_original(module_name: str, qualname: str):
    original = _lookup(module_name, qualname)
    if sys._getframe(1).f_globals["__name__"] != kernels.__name__:
        return original  # this script's own look-up of the Triton wrapper

    def fallback(*args, **kwargs):
        FALLBACKS.append(qualname)
        return original(*args, **kwargs)
    return fallback


kernels._original = _counting_original


def native(fn, *args, expect_fallback: bool = False, what: str = ""):
    """The replacement, required to run in torch (not to hand the call back to Triton) unless told otherwise."""
    before = len(FALLBACKS)
    out = fn(*args)
    if (len(FALLBACKS) > before) != expect_fallback:
        raise Mismatch(f"{what}: {'fell back to Triton' if not expect_fallback else 'did not fall back'}")
    return out


def compare_call(name: str, triton_fn, native_fn, args: tuple, case: str, expect_fallback: bool = False) -> None:
    """Both wrappers on copies of the same arguments: equal results and equal arguments afterwards."""
    a, b = copy(args), copy(args)
    out_a, out_b = triton_fn(*a), native(native_fn, *b, expect_fallback=expect_fallback, what=f"{name} {case}")
    same(out_a, out_b, f"{name} {case}: result")
    for i, (x, y) in enumerate(zip(a, b)):
        same(x, y, f"{name} {case}: argument {i} after the call")


# --- batches shaped as the runner's ---------------------------------------------------------------------------


def make_batch(rng, case: int, mode: str) -> dict:
    """One step's requests. mode: "ar" (one token a decode, one logit each), "spec" (drafts: up to 3 extra logits),
    "bard" (no sampled token; a decode runs a canvas of 4 after up to 4 committed tokens, a prefill has no logits).
    case 0 is an empty batch, case 1 one request, then larger ones."""
    num_reqs = [0, 1, 5, MAX_REQS, int(rng.integers(2, MAX_REQS)), int(rng.integers(1, MAX_REQS))][case % 6]
    idx = rng.permutation(MAX_REQS)[:num_reqs].astype(np.int64)
    prefill_len = rng.integers(5, 60, MAX_REQS).astype(np.int32)
    num_computed = np.zeros(MAX_REQS, np.int32)
    query_len, num_logits = np.zeros(num_reqs, np.int64), np.zeros(num_reqs, np.int64)
    for b, r in enumerate(idx):
        kind = rng.choice(["prefill", "prefill_end", "decode"], p=[0.3, 0.2, 0.5])
        if kind == "decode":
            num_computed[r] = prefill_len[r] + rng.integers(0, 40)
            if mode == "ar":
                query_len[b], num_logits[b] = 1, 1
            elif mode == "spec":
                num_logits[b] = 1 + rng.integers(0, 4)
                query_len[b] = num_logits[b]
            else:
                num_logits[b] = 4
                query_len[b] = 4 + rng.integers(0, 5)
        else:
            num_computed[r] = rng.integers(0, prefill_len[r])
            remaining = prefill_len[r] - num_computed[r]
            if kind == "prefill":  # a chunk inside the prompt
                query_len[b] = rng.integers(1, remaining + 1)
            else:  # the prompt's end, sometimes with the first generated positions of the same step
                query_len[b] = remaining + rng.integers(0, 4)
            if mode == "spec" and kind == "prefill_end":  # drafts after the prompt: logits on prompt-tail slots too
                num_logits[b] = rng.integers(1, min(query_len[b], 4) + 1)
            else:
                num_logits[b] = 0 if mode == "bard" else 1
    num_reqs_padded = min(MAX_REQS, num_reqs + int(rng.integers(0, 4)))
    num_tokens = int(query_len.sum())
    qsl = np.full(MAX_REQS + 1, num_tokens, np.int32)
    qsl[0] = 0
    qsl[1:num_reqs + 1] = np.cumsum(query_len)
    cu = np.zeros(num_reqs + 1, np.int32)
    cu[1:] = np.cumsum(num_logits)
    seq_lens = np.zeros(MAX_REQS, np.int32)
    seq_lens[:num_reqs] = num_computed[idx] + query_len
    positions = rng.integers(0, 10_000, MAX_TOKENS).astype(np.int64)  # stale values past the batch
    for b, r in enumerate(idx):
        positions[qsl[b]:qsl[b + 1]] = num_computed[r] + np.arange(query_len[b])
    t = torch.from_numpy
    return dict(num_reqs=num_reqs, num_reqs_padded=num_reqs_padded, num_tokens=num_tokens,
                idx=t(idx), prefill_len=t(prefill_len), num_computed=t(num_computed),
                qsl=t(qsl)[:num_reqs_padded + 1], cu=t(cu), num_logits=t(num_logits), query_len=t(query_len),
                seq_lens=t(seq_lens), positions=t(positions), total_logits=int(cu[-1]))


def rand_int(rng, shape, high=50_000, dtype=torch.int32):
    return torch.from_numpy(rng.integers(0, high, shape)).to(dtype)


# --- one checker per replaced wrapper ---------------------------------------------------------------------------


def check_input_batch(seed: int) -> int:
    from vllm.v1.worker.gpu import input_batch

    orig = lambda name: kernels._original(GPU + "input_batch", name)  # noqa: E731
    cases = 0
    for case in range(6):
        for mode in ("ar", "spec", "bard"):
            rng = np.random.default_rng(1000 * seed + 10 * case + len(mode))
            batch = make_batch(rng, case, mode)
            idx, qsl, num_reqs = batch["idx"], batch["qsl"], batch["num_reqs"]
            all_token_ids = rand_int(rng, (MAX_REQS, MAX_MODEL_LEN))
            tag = f"seed {seed} case {case} {mode} ({num_reqs} requests)"

            lookahead = 1 + case % 2
            compare_call("prepare_prefill_inputs", orig("prepare_prefill_inputs"), input_batch.prepare_prefill_inputs,
                         (rand_int(rng, MAX_TOKENS), rand_int(rng, (lookahead, MAX_REQS)), idx, qsl, all_token_ids,
                          batch["prefill_len"], batch["num_computed"]), tag)
            compare_call("prepare_pos_seq_lens", orig("prepare_pos_seq_lens"), input_batch.prepare_pos_seq_lens,
                         (idx, qsl, batch["num_computed"], rand_int(rng, MAX_TOKENS, dtype=torch.int64),
                          rand_int(rng, MAX_REQS)), tag)

            steps = {"ar": 0, "spec": 3, "bard": 4}[mode]
            new_sampled = 0 if mode == "bard" else 1
            seq_lens = batch["seq_lens"][:batch["num_reqs_padded"]]
            compare_call("combine_sampled_and_draft_tokens", orig("combine_sampled_and_draft_tokens"),
                         input_batch.combine_sampled_and_draft_tokens,
                         (rand_int(rng, MAX_TOKENS), idx, rand_int(rng, (MAX_REQS, 1), dtype=torch.int64), qsl,
                          seq_lens, batch["prefill_len"], rand_int(rng, (MAX_REQS, steps), dtype=torch.int64),
                          batch["cu"], batch["total_logits"], new_sampled), tag)

            compare_call("expand_idx_mapping", orig("expand_idx_mapping"), input_batch.expand_idx_mapping,
                         (idx, batch["total_logits"], batch["cu"], steps + 1), tag)

            sampled = torch.from_numpy(rng.integers(0, 2, num_reqs)).to(torch.int32)  # 0 or 1 per request
            compare_call("get_num_sampled_and_rejected", orig("get_num_sampled_and_rejected"),
                         input_batch.get_num_sampled_and_rejected,
                         (sampled, batch["seq_lens"][:num_reqs], batch["cu"], idx, batch["prefill_len"]), tag)

            # after sampling: -1 rows (requests finished elsewhere, pipeline parallelism), 0..steps+1 tokens each
            post_idx = idx.clone()
            post_idx[torch.from_numpy(rng.random(num_reqs) < 0.2)] = -1
            width = steps + 1
            num_sampled = torch.from_numpy(rng.integers(0, width + 1, num_reqs)).to(torch.int32)
            num_rejected = torch.from_numpy(rng.integers(0, width, num_reqs)).to(torch.int32)
            total_len = torch.from_numpy(rng.integers(0, MAX_MODEL_LEN - width, MAX_REQS)).to(torch.int32)
            vocab = 40
            bins = rand_int(rng, (MAX_REQS, vocab), high=5) if case % 2 else None
            compare_call("post_update", orig("post_update"), input_batch.post_update,
                         (post_idx, rand_int(rng, MAX_REQS, high=100), rand_int(rng, (MAX_REQS, 1), dtype=torch.int64),
                          bins, rand_int(rng, (num_reqs, width), high=vocab, dtype=torch.int64), num_sampled,
                          num_rejected, qsl if case % 3 else None, all_token_ids, total_len), tag)
            cases += 1
    return cases


def check_gumbel(seed: int) -> int:
    from vllm.v1.worker.gpu.sample import gumbel

    triton_fn, cases = kernels._original(GPU + "sample.gumbel", "gumbel_sample"), 0
    for case in range(4):
        rng = np.random.default_rng(7000 + 10 * seed + case)
        num_tokens, vocab = [0, 1, 9, 16][case], 2500  # three blocks of 1024, the last partial
        logits = torch.from_numpy(rng.integers(-3, 3, (num_tokens, vocab)).astype(np.float32))  # many ties
        if num_tokens > 2:
            logits[1] = float("-inf")  # a fully masked row
            logits[2, 1500] = float("inf")
            logits[2, 2400] = float("inf")
            logits[0] = torch.where(logits[0] == 0, -0.0, logits[0])  # -0.0 and 0.0 tie
        expanded = torch.from_numpy(rng.integers(0, MAX_REQS, num_tokens))
        expanded[torch.from_numpy(rng.random(num_tokens) < 0.2)] = -1
        temperature = torch.zeros(MAX_REQS, dtype=torch.float32)
        seeds = torch.from_numpy(rng.integers(0, 2**31, MAX_REQS))
        pos = torch.from_numpy(rng.integers(0, 500, num_tokens))
        for use_fp64 in (False, True):
            args = (logits, expanded, temperature, seeds, pos, False, False, None, None, use_fp64)
            compare_call("gumbel_sample", triton_fn, gumbel.gumbel_sample, args, f"seed {seed} case {case} greedy")
            cases += 1
        if num_tokens:  # one sampling request: its Gumbel noise is left to the kernel
            hot = temperature.clone()
            expanded[0] = abs(int(expanded[0]))  # a real request
            hot[int(expanded[0])] = 0.7
            args = (logits, expanded, hot, seeds, pos, False, False)
            compare_call("gumbel_sample", triton_fn, gumbel.gumbel_sample, args, f"seed {seed} case {case} sampled",
                         expect_fallback=True)
            cases += 1
    return cases


def make_block_tables(seed: int, groups: int):
    from vllm.v1.worker.gpu.block_table import BlockTables

    rng = np.random.default_rng(seed)
    sizes, widths = [16, 32][:groups], [12, 6][:groups]
    tables = BlockTables(sizes, MAX_REQS, MAX_TOKENS, widths, CPU,
                         slot_mapping_enabled=[True, False][:groups] if seed % 2 and groups == 2 else None)
    for g in range(groups):
        tables.block_tables[g].gpu.copy_(rand_int(rng, (MAX_REQS, widths[g]), high=5000))
        tables.input_block_tables[g].copy_(rand_int(rng, (MAX_REQS, widths[g]), high=5000))  # stale rows
        tables.num_blocks.np[g] = rng.integers(0, widths[g] + 1, MAX_REQS)
    tables.num_blocks.copy_to_uva()
    tables.slot_mappings.copy_(rand_int(rng, tables.slot_mappings.shape, high=9999, dtype=torch.int64))
    return tables


def block_table_state(tables) -> list:
    return [*tables.input_block_tables, *(t.gpu for t in tables.block_tables), tables.slot_mappings]


def check_block_tables(seed: int) -> int:
    from vllm.v1.worker.gpu.block_table import BlockTables

    gather = kernels._original(GPU + "block_table", "BlockTables.gather_block_tables")
    slots = kernels._original(GPU + "block_table", "BlockTables.compute_slot_mappings")
    cases = 0
    for case in range(6):
        for groups in (1, 2):
            rng = np.random.default_rng(3000 + 100 * seed + 10 * case + groups)
            batch = make_batch(rng, case, "spec")
            tag = f"seed {seed} case {case}, {groups} KV-cache group(s) ({batch['num_reqs']} requests)"
            built = 50 * seed + 5 * case + groups
            a, b = make_block_tables(built, groups), make_block_tables(built, groups)
            out_a = gather(a, batch["idx"], batch["num_reqs_padded"])
            out_b = native(BlockTables.gather_block_tables, b, batch["idx"], batch["num_reqs_padded"], what=tag)
            same(out_a, out_b, f"gather_block_tables {tag}: result")
            same(block_table_state(a), block_table_state(b), f"gather_block_tables {tag}: buffers")
            if case % 2:  # into caller-given tables (as the speculators do), named by their pointers too
                out_a = tuple(t.clone() for t in a.input_block_tables)
                out_b = tuple(t.clone() for t in out_a)
                gather(a, batch["idx"], batch["num_reqs_padded"], out_a, a._make_ptr_tensor(out_a))
                native(BlockTables.gather_block_tables, b, batch["idx"], batch["num_reqs_padded"], out_b,
                       b._make_ptr_tensor(out_b), what=tag)
                same(out_a, out_b, f"gather_block_tables {tag}, given tables: result")
                cases += 1

            idx = batch["idx"].clone()
            idx[torch.from_numpy(rng.random(batch["num_reqs"]) < 0.2)] = -1  # dummy rows own no blocks
            padded = batch["num_tokens"] + int(rng.integers(0, 8))
            out_a = slots(a, idx, batch["qsl"], batch["positions"], padded)
            out_b = native(BlockTables.compute_slot_mappings, b, idx, batch["qsl"], batch["positions"], padded,
                           what=tag)
            same(out_a, out_b, f"compute_slot_mappings {tag}: result")
            same(block_table_state(a), block_table_state(b), f"compute_slot_mappings {tag}: buffers")
            cases += 2
    return cases


def make_rope(seed: int):
    from vllm.v1.worker.gpu.mm.rope import RopeState

    rng = np.random.default_rng(seed)
    rope = RopeState(3, MAX_REQS, MAX_TOKENS, MAX_MODEL_LEN, CPU)
    rope.prefill_positions.gpu.copy_(rand_int(rng, rope.prefill_positions.gpu.shape, high=4000))
    rope.prefill_delta.np[:] = rng.integers(-50, 50, MAX_REQS)
    rope.prefill_delta.copy_to_uva()
    rope.positions.copy_(rand_int(rng, rope.positions.shape, high=9999, dtype=torch.int64))
    return rope


def check_rope(seed: int) -> int:
    from vllm.v1.worker.gpu.mm.rope import RopeState

    triton_fn = kernels._original(GPU + "mm.rope", "RopeState.prepare_positions")
    cases = 0
    for case in range(6):
        for mode in ("ar", "bard"):
            rng = np.random.default_rng(5000 + 100 * seed + 10 * case + len(mode))
            batch = make_batch(rng, case, mode)
            a, b = make_rope(60 * seed + case), make_rope(60 * seed + case)
            args = (batch["idx"], batch["qsl"], batch["prefill_len"], batch["num_computed"])
            triton_fn(a, *args)
            native(RopeState.prepare_positions, b, *args, what=f"RopeState.prepare_positions seed {seed}")
            same(a.positions, b.positions, f"RopeState.prepare_positions seed {seed} case {case} {mode}")
            cases += 1
    return cases


def check_staged_writes(seed: int) -> int:
    from vllm.v1.worker.gpu.buffer_utils import StagedWriteTensor

    triton_fn = kernels._original(GPU + "buffer_utils", "StagedWriteTensor.apply_write")
    cases = 0
    layouts = [((MAX_REQS, 40), torch.int32, False), ((MAX_REQS, 40), torch.int32, True),  # all_token_ids: UVA
               (MAX_REQS, torch.int32, False), ((MAX_REQS, 24), torch.float32, False)]
    for case, (size, dtype, uva) in enumerate(layouts):
        rng = np.random.default_rng(9000 + 10 * seed + case)
        a, b = (StagedWriteTensor(size, dtype, CPU, uva_instead_of_gpu=uva) for _ in range(2))
        initial = torch.from_numpy(rng.integers(-100, 100, a.gpu.shape)).to(dtype)
        a.gpu.copy_(initial)
        b.gpu.copy_(initial)
        for step in range(3):  # several rounds, each with overlapping writes to some rows
            for _ in range(int(rng.integers(0, 8))):
                row = int(rng.integers(0, MAX_REQS))
                if isinstance(size, int):
                    value = int(rng.integers(-1000, 1000))
                    for t in (a, b):
                        t.stage_write_elem(row, value)
                    continue
                start = int(rng.integers(0, size[1]))
                values = rng.integers(-1000, 1000, int(rng.integers(0, size[1] - start + 1)))
                values = [float(v) / 7 for v in values] if dtype == torch.float32 else [int(v) for v in values]
                for t in (a, b):
                    t.stage_write(row, start, values)
            triton_fn(a)
            native(StagedWriteTensor.apply_write, b, what=f"StagedWriteTensor.apply_write seed {seed}")
            same(a.gpu, b.gpu, f"StagedWriteTensor.apply_write seed {seed} layout {case} round {step}")
            assert not b._staged_write_indices and not b._staged_write_contents, "staged writes left"
            cases += 1
    return cases


def check_pos_embed(seed: int) -> int:
    """Qwen3-VL's vision position embeddings: grids of several sizes (square and not, one patch row or column,
    several frames), merge windows 1 and 2, hidden sizes that are and are not powers of two; bf16 falls back."""
    triton_fn = kernels._original(QWEN3_VL, "triton_pos_embed_interpolate")
    rng = np.random.default_rng(11000 + seed)
    cases = 0
    for case in range(6):
        m_size = 1 if case == 5 else 2
        grid = int(rng.integers(2, 9))
        h, w = (int(rng.integers(1, 9)) * m_size for _ in range(2))
        if case == 4:
            h = m_size  # one merge window tall: h - 1 may be 0 or 1
        t = int(rng.integers(1, 4))
        hidden = int(rng.choice([8, 24, 64, 96]))
        weight = torch.from_numpy(rng.standard_normal((grid * grid, hidden)).astype(np.float32))
        args = (weight, t, h, w, grid, m_size, torch.float32)
        compare_call("triton_pos_embed_interpolate", triton_fn, kernels.pos_embed_interpolate, args,
                     f"seed {seed} case {case} (t, h, w, grid, m) = {(t, h, w, grid, m_size)}")
        cases += 1
    if seed == 0:  # not float32: the original's interpreter run (the replacement cannot promise equality there)
        weight = torch.randn(16, 8).to(torch.bfloat16)
        native(kernels.pos_embed_interpolate, weight, 1, 2, 2, 4, 2, torch.bfloat16, expect_fallback=True,
               what="triton_pos_embed_interpolate bf16")
    return cases


def replaced_everywhere() -> list[str]:
    """The wrappers the hook left unreplaced where vLLM defines them or a module bound them by name."""
    import importlib

    import vllm.model_executor.models.qwen3_vl  # noqa: F401
    import vllm.v1.worker.gpu.model_runner  # noqa: F401  (imports input_batch, block_table, rope, the sampler)
    import vllm.v1.worker.gpu.spec_decode.rejection_sampler  # noqa: F401
    import vllm.v1.worker.gpu.spec_decode.speculator  # noqa: F401

    missing = []
    for module_name, entries in kernels.PATCHES.items():
        for qualname, native in entries:
            obj = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            if obj is not native:
                missing.append(f"{module_name}:{qualname}")
    bound = {"model_runner": ["combine_sampled_and_draft_tokens", "expand_idx_mapping", "post_update",
                              "prepare_pos_seq_lens", "prepare_prefill_inputs"],
             "sample.sampler": ["get_num_sampled_and_rejected", "gumbel_sample"],
             "spec_decode.rejection_sampler": ["get_num_sampled_and_rejected"],
             "spec_decode.speculator": ["gumbel_sample"]}
    for module_name, names in bound.items():
        module = sys.modules[GPU + module_name]
        missing += [f"{module_name}.{name}" for name in names if getattr(module, name) is not getattr(kernels, name)]
    return missing


def main() -> int:
    mode, out_path = sys.argv[1:3]
    record = {}
    try:
        if mode == "hook":  # BARD_VLLM_TRITON_KERNELS=1: nothing replaced
            import os

            import vllm.v1.worker.gpu.model_runner as runner
            import vllm_env_compat

            record["replaced"] = sorted(kernels._ORIGINALS)
            record["runner_post_update_is_triton"] = runner.post_update is not kernels.post_update
            os.environ.pop("BARD_VLLM_TRITON_KERNELS")
            record["wanted_in_cpu_mode"] = vllm_env_compat._cpu_kernels_wanted()
            os.environ["TRITON_INTERPRET"] = "0"
            record["wanted_without_interpreter"] = vllm_env_compat._cpu_kernels_wanted()
        else:
            import vllm.v1.worker.cpu.shm  # noqa: F401  (as vLLM's CPU worker: CPU buffers instead of pinned UVA)

            record["not_replaced"] = replaced_everywhere()
            if record["not_replaced"]:
                raise Mismatch(f"not replaced: {record['not_replaced']}")
            counts = {}
            for check in (check_input_batch, check_gumbel, check_block_tables, check_rope, check_staged_writes,
                          check_pos_embed):
                counts[check.__name__] = sum(check(seed) for seed in SEEDS)
            record["cases"] = counts
        record["ok"] = True
    except Mismatch as error:
        record.update(ok=False, error=str(error))
    open(out_path, "w").write(json.dumps(record))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
