"""Continuous batching of block-diffusion decoding: requests join a running batch and leave it as soon as they finish.

One thread owns the model. Each iteration it (1) prefills the requests that arrived since the last iteration (one
prompt each, with block 0's first step, exactly as `generate` does) and merges them into the running batch, then
(2) runs one decoding iteration of `generate` on the whole batch: rows whose block is finished keep its tokens and
either leave or move on (`_end_finished_blocks`), then one forward in which every row commits or takes a denoising
step (`_decoding_step`). Rows never wait for each other already inside `generate` (DESIGN 4.4); joining only adds
rows.

Merging caches: the running rows and a new row have caches of different lengths. The shorter side is left-padded
with keys labelled PAD, which the mask of DESIGN 3.2 never lets any query see, so every row computes what it would
alone and each answer equals its batch-1 `generate` (tested). When rows leave, leading key columns that no
remaining row uses are cut off again.

Requests with different sampling settings (temperature, top-p) cannot share a forward's token choice, so the
scheduler keeps one running batch per setting and steps them in turn.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from ..models.bard_vl.masking_bard_vl import PAD

logger = logging.getLogger(__name__)

# What the scheduler sends to a request's sink, from its own thread.
TOKENS = "tokens"  # payload: list[int], the row's newly finished tokens (cut after EOS and at max_new_tokens)
DONE = "done"  # payload: "stop" (EOS) or "length" (max_new_tokens reached)
ERROR = "error"  # payload: the exception; the request is dropped, the others go on

VISION_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


@dataclass
class DecodeRequest:
    """One prompt (a batch-1 processor output) and the generate keywords of its answer.

    `sink(kind, payload)` is called from the scheduler thread with `TOKENS`, then `DONE` or `ERROR`. Set `cancelled`
    to drop the request (a client that went away); its row leaves the batch at the next iteration.
    """

    inputs: dict
    options: dict
    sink: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set by `BlockDiffusionScheduler.prepare`
    plan: object = None
    model_kwargs: dict | None = None
    key: tuple | None = None


def _settings_key(config, plan) -> tuple:
    """What rows must share to run in one batch: every decoding setting except the length (kept per row)."""
    values = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    for name in ("max_new_tokens", "num_blocks", "warpers"):
        values.pop(name, None)
    eos = values.pop("eos_token_ids", None)
    values["eos_token_ids"] = None if eos is None else tuple(eos.tolist())
    values["top_k"], values["top_p"] = config.top_k, config.top_p  # the warpers, as settings
    return tuple(sorted(values.items()))


def _left_pad_keys(rows, cache, extra: int) -> None:
    """Prepend `extra` key columns labelled PAD (zeros in the cache) to every row."""
    if extra == 0:
        return
    rows.key_segments = F.pad(rows.key_segments, (extra, 0), value=PAD)
    rows.key_blocks = F.pad(rows.key_blocks, (extra, 0), value=0)
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, extra, 0))  # [m, heads, K, dim]
        layer.values = F.pad(layer.values, (0, 0, extra, 0))


def merge_rows(rows, cache, new_rows, new_cache) -> None:
    """Append `new_rows` (with their cache) to `rows`/`cache` in place, left-padding the shorter cache with PAD keys."""
    for layer in (*cache.layers, *new_cache.layers):
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"Joining a running batch needs full-attention DynamicCache layers, got "
                                      f"{type(layer).__name__}.")
    length, new_length = rows.key_segments.shape[1], new_rows.key_segments.shape[1]
    _left_pad_keys(rows, cache, max(0, new_length - length))
    _left_pad_keys(new_rows, new_cache, max(0, length - new_length))
    for name in (f.name for f in dataclasses.fields(rows)):
        setattr(rows, name, torch.cat([getattr(rows, name), getattr(new_rows, name)]))
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([layer.keys, new_layer.keys])
        layer.values = torch.cat([layer.values, new_layer.values])


def trim_unused_keys(rows, cache) -> None:
    """Cut the leading key columns that every remaining row labels PAD (left over from rows that left)."""
    used = (rows.key_segments != PAD).any(0)  # [K]
    first = int(used.int().argmax()) if bool(used.any()) else used.shape[0]
    if first == 0:
        return
    rows.key_segments, rows.key_blocks = rows.key_segments[:, first:], rows.key_blocks[:, first:]
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


class _Batch:
    """Rows decoding with the same settings: their cache, `_Rows` state and per-slot outputs.

    Slots index the per-request tensors (`generated`, `lengths`, ...) the way batch rows index them in `generate`
    (`rows.index`); a slot is reused once its request has left.
    """

    def __init__(self, model, plan, capacity: int, totals: collections.Counter | None = None):
        self.model, self.plan = model, plan
        # the scheduler's counts of finished rows: "tokens" kept and decoding "forwards" (for tokens per forward)
        self.totals = totals if totals is not None else collections.Counter()
        self.cache = self.rows = self.step_mask = None
        self.requests: dict[int, DecodeRequest] = {}
        self.free = list(range(capacity - 1, -1, -1))
        fill = plan.pad_token_id if plan.pad_token_id is not None else 0
        self.generated = torch.full((capacity, 0), fill, dtype=torch.long)  # [capacity, width], grows
        self.lengths = torch.zeros(capacity, dtype=torch.long)  # kept tokens per slot
        self.emitted = torch.zeros(capacity, dtype=torch.long)  # tokens already sent to the sink
        self.forwards = torch.zeros(capacity, dtype=torch.long)
        # `generate`'s `input_ids` argument of the step helpers: only logits processors and stopping criteria read
        # it, and the server uses neither (the sampling warpers ignore it)
        self.context = torch.zeros((capacity, 0), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.requests)

    def join(self, request: DecodeRequest) -> None:
        """Prefill the request (with block 0's first step) and merge its row into the batch."""
        model, plan, B = self.model, request.plan, request.plan.block_size
        slot = self.free.pop()
        try:
            width = math.ceil(plan.max_new_tokens / B) * B
            if self.generated.shape[1] < width:
                self.generated = F.pad(self.generated, (0, width - self.generated.shape[1]),
                                       value=plan.pad_token_id if plan.pad_token_id is not None else 0)
            self.lengths[slot] = self.emitted[slot] = self.forwards[slot] = 0
            inputs = request.inputs
            cache, rows, logits = model._prefill_prompt(
                inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                inputs.get("image_grid_thw"), inputs["mm_token_type_ids"], request.model_kwargs, plan,
            )
            rows.index = torch.tensor([slot])
            decide = torch.full((1, B), plan.prefill_step, dtype=torch.bool)
            model._take_step(rows, logits, decide, self.context, self.generated, plan, None, None, None, "prefill")
            if self.rows is None:
                self.cache, self.rows = cache, rows
            else:
                merge_rows(self.rows, self.cache, rows, cache)
        except Exception:
            self.free.append(slot)
            raise
        self.step_mask = None
        self.requests[slot] = request

    def advance(self) -> None:
        """One decoding iteration of `generate` for every row: finished blocks are kept and sent, finished or
        cancelled rows leave, then one forward."""
        model, plan, rows = self.model, self.plan, self.rows
        stop = model._end_finished_blocks(rows, self.context, self.generated, self.lengths, plan, None, None)
        slots = rows.index.tolist()
        for slot in (rows.index[self.lengths[rows.index] > self.emitted[rows.index]]).tolist():
            new = self.generated[slot, int(self.emitted[slot]) : int(self.lengths[slot])].tolist()
            self.emitted[slot] = self.lengths[slot]
            self.requests[slot].sink(TOKENS, new)
        leave = stop.clone()
        for r, slot in enumerate(slots):
            request = self.requests[slot]
            if bool(stop[r]):
                self.totals["tokens"] += int(self.lengths[slot])
                self.totals["forwards"] += int(self.forwards[slot])
                request.sink(DONE, self._finish_reason(slot))
            elif request.cancelled.is_set():
                leave[r] = True
        if bool(leave.any()):
            for r in leave.nonzero().squeeze(-1).tolist():
                del self.requests[slots[r]]
                self.free.append(slots[r])
            keep = (~leave).nonzero().squeeze(-1)
            if keep.numel() == 0:
                self.cache = self.rows = self.step_mask = None
                return
            self.cache.batch_select_indices(keep)
            rows.select(keep)
            trim_unused_keys(rows, self.cache)
            self.step_mask = None
        self.step_mask = model._decoding_step(rows, self.cache, self.step_mask, self.forwards, self.context,
                                              self.generated, plan, None, None, None)

    def _finish_reason(self, slot: int) -> str:
        length = int(self.lengths[slot])
        eos = self.plan.eos_token_ids
        if length > 0 and eos is not None and bool(torch.isin(self.generated[slot, length - 1], eos)):
            return "stop"
        return "length"

    def fail(self, error: Exception) -> None:
        for request in self.requests.values():
            request.sink(ERROR, error)
        self.requests.clear()
        self.cache = self.rows = self.step_mask = None


class EngineStopped(RuntimeError):
    """What a request's sink gets when the engine stops before its answer ends (server shutdown, or the engine's
    thread died)."""


class ModelThread:
    """A model owned by one worker thread, fed through a queue of `DecodeRequest`s: `submit` from any thread,
    `start`, `close`. Subclasses define `prepare` (checks a request, no forward), `_run` (the worker's loop, which
    waits on `_condition` for `_pending` requests until `_closing`) and `_running_requests` (those taken from the
    queue and not finished).

    If `_run` raises, the thread ends: `failure` holds the error, every request it held gets `ERROR`, and `submit`
    refuses new ones (the server's `/health` answers 503)."""

    thread_name = "model"

    def __init__(self, model):
        self.model = model
        self._pending: collections.deque[DecodeRequest] = collections.deque()
        self._condition = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def prepare(self, request: DecodeRequest) -> DecodeRequest:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    def _running_requests(self) -> list[DecodeRequest]:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        """Requests queued and not yet taken by the worker."""
        return len(self._pending)

    def submit(self, request: DecodeRequest) -> None:
        """Queue a request (prepared here if it was not); the worker takes it at its next iteration."""
        if request.plan is None:
            self.prepare(request)
        with self._condition:
            if self.failure is not None:
                raise EngineStopped(f"The {type(self).__name__} stopped: {self.failure!r}.")
            if self._closing:
                raise EngineStopped(f"The {type(self).__name__} is closed.")
            self._pending.append(request)
            self._condition.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as error:  # noqa: BLE001 (recorded and reported; nothing can decode any more)
            logger.exception("The %s thread died; the server answers 503 from now on.", self.thread_name)
            with self._condition:
                self.failure = error
            self.cancel_all(EngineStopped(f"The {type(self).__name__} stopped: {error!r}."))

    def cancel_all(self, error: Exception) -> int:
        """Cancel every queued and running request and send each `ERROR` (`error`); returns how many. Called when
        the server shuts down (after its grace period) and when the worker dies."""
        with self._condition:
            requests = list(self._pending)
            self._pending.clear()
        queued = {id(request) for request in requests}  # by identity: a dataclass's == compares tensors
        requests += [request for request in self._running_requests() if id(request) not in queued]
        for request in requests:  # a request whose answer ended meanwhile gets an ERROR nobody reads
            request.cancelled.set()
            request.sink(ERROR, error)
        return len(requests)

    def close(self) -> None:
        """Stop the worker after its current iteration; requests still queued or running get `EngineStopped`."""
        with self._condition:
            self._closing = True
            self._condition.notify()
            held = list(self._pending)
        for request in held + self._running_requests():
            request.cancelled.set()  # a running `generate` stops at its next token
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.cancel_all(EngineStopped(f"The {type(self).__name__} is closed."))


class BlockDiffusionScheduler(ModelThread):
    """Owns a BARD-VL model in one thread and decodes every submitted request in continuously batched forwards.

    Args:
        model: a `BardVLForConditionalGeneration` (eval mode; the scheduler never changes it).
        max_batch_size: rows decoded together at most (over all settings); later requests wait for a free row.
    """

    thread_name = "bard-scheduler"

    def __init__(self, model, max_batch_size: int = 32):
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, got {max_batch_size}.")
        super().__init__(model)
        self.max_batch_size = max_batch_size
        self._batches: dict[tuple, _Batch] = {}
        self.peak_batch_size = 0  # most rows decoded in one iteration so far (a measure that joining happened)
        # over the rows that finished: tokens kept and decoding forwards (after the prefill, as `generate` counts)
        self.totals: collections.Counter = collections.Counter()

    # ------------------------------------------------------------------ called from any thread
    def prepare(self, request: DecodeRequest) -> DecodeRequest:
        """Check the request's inputs and options the way `generate` does (ValueError naming the problem) and
        resolve its decoding plan. No forward runs."""
        model, inputs = self.model, request.inputs
        options = dict(request.options)
        for key in ("pixel_values_videos", "video_grid_thw"):
            if inputs.get(key) is not None:
                options[key] = inputs[key]
        config, model_kwargs = model._resolve_generation_config(None, options)
        if config.output_trace:
            raise ValueError("`output_trace` is not available when serving.")
        attention_mask, mm_token_type_ids = model._check_generate_inputs(
            inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("pixel_values"),
            inputs.get("image_grid_thw"), inputs.get("mm_token_type_ids"), model_kwargs, None,
        )
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError(f"A request holds one prompt, got a batch of {inputs['input_ids'].shape[0]}.")
        request.inputs = {**inputs, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}
        request.plan = model._decoding_plan(config, inputs["input_ids"], attention_mask, None)
        request.model_kwargs = model_kwargs
        request.key = _settings_key(config, request.plan)
        return request

    @property
    def running(self) -> int:
        return sum(len(batch) for batch in list(self._batches.values()))

    def _running_requests(self) -> list[DecodeRequest]:
        return [request for batch in list(self._batches.values()) for request in list(batch.requests.values())]

    # ------------------------------------------------------------------ the scheduler thread
    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closing and not self._pending and not self._batches:
                    self._condition.wait()
                if self._closing:
                    return
            self.step()

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: admit waiting requests (prefill + merge), then one decoding iteration of every batch.
        Runs in the scheduler thread (tests call it directly instead of `start`)."""
        with self._condition:
            arrivals = []
            while self._pending and self.running + len(arrivals) < self.max_batch_size:
                arrivals.append(self._pending.popleft())
        for request in arrivals:
            if request.cancelled.is_set():
                continue
            batch = self._batches.get(request.key)
            if batch is None:
                batch = self._batches[request.key] = _Batch(self.model, request.plan, self.max_batch_size,
                                                            self.totals)
            try:
                batch.join(request)
            except Exception as error:  # noqa: BLE001 (reported to the request; the others go on)
                request.sink(ERROR, error)
        self.peak_batch_size = max(self.peak_batch_size, self.running)
        for key, batch in list(self._batches.items()):
            if len(batch):
                try:
                    batch.advance()
                except Exception as error:  # noqa: BLE001 (reported to the batch's requests; other batches go on)
                    batch.fail(error)
            if not len(batch):
                del self._batches[key]
