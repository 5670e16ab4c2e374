"""The end-to-end BARD pipeline on the built-in digits task, with its evaluation, ablations and the paper's claims.

AR source (shipped) -> conversion (B = 4) -> progressive block merging (B = 4, 8, 16, 32) -> stage-wise distillation
from the B = 4 anchor (B = 8, 16, 32) -> evaluation on the test split -> the paper's claims judged with intervals.

Evaluation (`digits.evaluate`, one loop for AR and BARD): every model decodes the same test rows (an equal number per
question type), batched and greedy, for exact match; every accuracy gets a Wilson 95% interval, per question type too.
Throughput is measured apart (`digits.time_decoding`): batch 1, prefill included, one thread, on a fixed subset of the
test rows, with AR and every BARD decoder interleaved row by row so machine load hits all alike.

Claims (paper section 4; `claims` in results.json), each as a paired difference over the same rows with Newcombe's
95% interval (`demo.claims`) and a verdict `holds` / `does not hold` / `cannot tell`:
(a) the final B = 32 model (PBM + SWD) keeps >= 98% of the AR source's exact match at a threshold where tokens per
    forward >= 3 (the highest such threshold; judged as non-inferiority with margin 2% of the AR accuracy);
(b) progressive merging beats direct conversion to B = 32 at equal total steps (ablation `direct`);
(c) SWD improves on PBM alone;
(d) the B = 4 anchor is a better teacher than the AR source (ablation `ar_teacher`);
(e) mixed noise with revision at decoding beats mask-only noise at equal tokens per forward (ablation `mix`: the
    mask-only model is taken at the threshold whose tokens per forward is closest).
(b)-(d) compare at `claim_threshold`.

Beyond the paper, ablation `shift` (issue 13, DESIGN 4.1) converts the AR source a second time with
`prediction_shift=True` and runs the same PBM schedule and the B = largest SWD student on it. `results["shift"]`
holds, for both settings, the exact match per question type right after conversion (no training), the B = 4
stage's exact match every `shift_eval_every` steps and the first step at >= 98% of the AR source's exact match;
the final B = largest models join the main table.

`noise_prior="mix"` (CLI `--noise-prior mix`) trains every model of the run with the mixed-noise prior (DESIGN 3.3)
and decodes every BARD model with revision at `edit_threshold`; the model names carry "(mix)". On the choice task,
where mask-only B = 32 models stay at the floor, this is how (b)-(d) are judged; (e), the prior comparison itself,
needs a mask-only run.

Three more ablations decide SWD's settings (issue 9, item 5), each distilling the same B = largest PBM student from the
same anchor with one setting changed: `sample_norm` (the loss averaged per sample, then over the step's samples,
instead of over the step's masked tokens) and `wide_mask_rates` (mask rates [0.001, 1.0], what the reference code
effectively trained with, instead of the configured [0.1, 0.5]) and `kd_eos_padding` (the other value of
`swd_kd_on_eos_padding`). `results["settings"]` compares each with the default SWD model over the same rows at
`claim_threshold`, with the same paired interval and verdict as the claims.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .claims import paired_difference_interval, paired_mean_difference_interval, verdict, wilson_interval
from .digits import ALL_QUESTION_TYPES, TASKS

logger = logging.getLogger(__name__)

ABLATIONS = ("direct", "ar_teacher", "mix", "shift", "sample_norm", "wide_mask_rates", "kd_eos_padding")
# Not in `--ablations all` (the paper's claims and the settings of the defaults), asked for by name: `causal_prompt`
# trains PBM + SWD again from a conversion with `prompt_attention="causal"`, the only prompt mask vLLM can serve
# (transformers_bard.integrations.vllm), to measure what serving through vLLM costs.
SERVING_ABLATIONS = ("causal_prompt",)
WIDE_MASK_RATES = (0.001, 1.0)  # ablation `wide_mask_rates`: the SWD mask rates the reference code trained with
SHIFT_TARGET = 0.98  # ablation `shift`: steps until the B = 4 stage reaches this fraction of the AR exact match
AR_NAME = "AR (source, greedy)"


# Training mix of question types per task. digits, measured (docs/demo_results/README.md): one-token answers get
# ~1/37 of the supervised tokens of a `read` row, and the converted model must re-learn them (its head predicts the
# token at its own position, DESIGN 2), so `position` is drawn 3x and `column` 2x as often as the long reads. choice:
# `two_rows` twice as often as the others: its second choice must differ from the first, the one conditional the
# large stages learn slowly (see DEFAULT_PBM_STEPS); `any_row` and `any_column` are exact at every budget measured.
DEFAULT_QUESTION_WEIGHTS = {
    "digits": {"position": 3.0, "column": 2.0, "read": 1.0, "read_twice": 1.0},
    "choice": {"any_row": 1.0, "any_column": 1.0, "two_rows": 2.0},
}


# Optimizer steps per PBM stage (B = 4, 8, 16, 32) per task. digits: 500, 100, 450, 450 fit the 15-minute target on 2
# idle cores (13.1 min measured) at PBM B = 32 = 1.000. choice: twice the digits budget at B >= 8, with `two_rows`
# drawn twice as often (DEFAULT_QUESTION_WEIGHTS; docs/demo_results/choice_probe, sections 5-9): the second choice of
# `two_rows` must avoid the first, a conditional the large stages learn only with many steps. PBM+SWD B = 32 exact
# match vs the AR source, uniform mix: 1x 0.825 / 0.740 (seeds 0 / 1), 2x 1.000 / 0.877, 4x 1.000 / 1.000; this
# default (with DEFAULT_PBM_MASK_RATES): 0.998 / 1.000 (without the raised floor 1.000 / 1.000, but seed 1's PBM
# B = 32 before SWD at 0.730: the exclusion still fragile). Cost on 2 idle cores:
# the default run 17.4 min (4x: 27.8), `--ablations all` 48.9 min with two training processes (4x: about 110 in one).
DEFAULT_PBM_STEPS = {"digits": (500, 100, 450, 450), "choice": (500, 200, 900, 900)}

# PBM mask-rate clamp [min, max] of the per-block rate draw per task. digits: the paper's [0.001, 1.0]. choice: the
# floor raised to 0.1. A row whose answer fits one block (every choice answer at B = 32, most at B = 16) gets one
# rate t for all its answer tokens and the loss weight 1/t, so at the paper's floor a few rows with t near 0.001
# carry weights up to 1000 and the large stages' gradient is dominated by them; at 0.1 the weight is at most 10.
# Measured at this budget (docs/demo_results/choice_probe, section 9), seed 1: PBM B = 32 exact match 0.730 -> 0.998
# (`two_rows` 0.19 -> 0.99), the probability of repeating the first row 0.192 -> 0.078 (AR source 0.18; 0.25 = no
# exclusion); seed 0: PBM B = 32 1.000 both ways, p(repeat) 0.123 -> 0.059 (the 0.123 from a one-thread training).
# PBM+SWD B = 32 with it: 1.000 (seed 1) and 0.998 (seed 0) vs the AR source's 0.998 and 1.000. Not measured on the
# digits task, which keeps the paper's floor.
DEFAULT_PBM_MASK_RATES = {"digits": (0.001, 1.0), "choice": (0.1, 1.0)}


@dataclass
class PipelineConfig:
    """Every knob of the demo pipeline, with the defaults of the full run (`quick()` gives the short one)."""

    output_dir: str = "demo_output"
    task: str = "digits"  # "digits" (the shipped default) or "choice" (the harder task: the answer names its choice)
    source: str | None = None  # the AR source checkpoint; None = the task's shipped model
    seed: int = 0  # data sampling (train and test rows), noise, trainer seed
    train_samples: int = 8000
    # training mix of question types (types of `task`); None = DEFAULT_QUESTION_WEIGHTS[task]
    question_weights: dict[str, float] | None = None
    eval_samples: int = 400  # test rows, the same number per question type
    timing_samples: int = 20  # the first test rows of every type in turn, decoded at batch 1 for tokens/s
    block_sizes: tuple[int, ...] = (4, 8, 16, 32)
    # Optimizer steps per PBM stage: one value for all, or one per block size. Measured (docs/demo_results/README.md):
    # B = 4 re-learns the AR skill under the diffusion objective (about 550 steps to exact training tokens); with 200
    # steps at B = 16 and 32 the one-token `position` answers fall to 0.79 and 0.41, with 600 they stay at 0.99 and
    # 1.00.
    # None = DEFAULT_PBM_STEPS[task] (the measurements behind each are there).
    pbm_steps: int | tuple[int, ...] | None = None
    swd_steps: int = 120  # optimizer steps per SWD student
    # PBM mask-rate clamp (BlockDiffusionConfig.noise_min_rate / noise_max_rate, DESIGN 3.3); None =
    # DEFAULT_PBM_MASK_RATES[task] (the measurements behind each are there).
    pbm_mask_rates: tuple[float, float] | None = None
    # SWD mask rates (DESIGN 3.6): [0.1, 0.5] as configured upstream; [0.001, 1.0] is what the reference code trained.
    # The ablation `wide_mask_rates` (same B = 32 student and anchor; docs/demo_results/README.md): no difference on
    # the digits task (0.0 points [-1.0, +1.0] at today's defaults, -0.2 and +0.3 before) or the choice task under
    # mask-only noise (-0.3); under mixed noise -9.0 points [-13.4, -4.6] for the wide rates at seed 0, 0.0 at seed 1:
    # [0.1, 0.5] stays.
    swd_mask_rates: tuple[float, float] = (0.1, 0.5)
    # SWD loss normalisation (DiffusionDistillConfig.loss_normalization): "token" (DESIGN 3.6) or "sample"; the
    # ablation `sample_norm` found no difference in four runs (digits 0.0 and -0.5 points, choice +0.5 and -1.5), so
    # "token" stays.
    swd_loss_normalization: str = "token"
    # KD at the EOS padding past the real end (DiffusionDistillConfig.kd_on_eos_padding, whose default this is too;
    # DESIGN 3.6 includes it). A B = 32 row holds up to 31 EOS paddings, the B = 4 anchor was trained with at most 3,
    # and its top-1 there is right at 13% of them (100% elsewhere). The ablation `kd_eos_padding` measures the other
    # setting: -3.0 points [-5.2, -1.4] on the digits task at today's defaults (13 points in the earlier SWD study),
    # no difference on the choice task under mixed noise.
    swd_kd_on_eos_padding: bool = False
    batch_size: int = 16
    learning_rate: float = 5e-4  # a few-million-parameter model adapts with larger steps than the paper's 2e-5
    # Measured (docs/demo_results/README.md, "Settings decided by measurement"): from an AR-level PBM B = 32 model,
    # 1e-4 costs 3 points of exact match even with a near-zero loss (AdamW moves every weight by about the learning
    # rate per step); 3e-5 keeps it at 1.000. The library's default (6e-6) is the reference's for 2B-8B students.
    swd_learning_rate: float = 3e-5
    vision_learning_rate: float = 5e-5
    thresholds: tuple[float, ...] = (0.9, 0.7, 0.5)  # the largest-B models and the ablations
    stage_thresholds: tuple[float, ...] = (0.9,)  # the intermediate stages
    claim_threshold: float = 0.9  # where claims (b)-(e) compare; must be in `thresholds`
    edit_threshold: float = 0.9  # revision when decoding mixed-noise models (DESIGN 4.2)
    # The noise prior of every trained model (PBM, SWD, direct, AR teacher, shift): "mask" (the paper's main runs) or
    # "mix" (DESIGN 3.3; its models then decode with revision at `edit_threshold`). On the choice task mask-only PBM
    # stays at the floor at B >= 16 while mixed noise reaches 0.40 at B = 32, so (b)-(d) can only be judged under
    # "mix" there (docs/demo_results/choice_mix). The `mix` ablation compares the priors and needs "mask".
    noise_prior: str = "mask"
    # The prompt mask of the conversion (DESIGN 3.2): "block_causal" (the paper's) or "causal", the only one vLLM can
    # serve (transformers_bard.integrations.vllm); `--prompt-attention causal` makes every model of the run servable
    # there. The `causal_prompt` ablation compares the two in one run (no consistent difference on either task).
    prompt_attention: str = "block_causal"
    max_new_tokens: int = 96  # the longest answer (77 tokens + EOS) in blocks of 32
    eval_batch_size: int = 50
    ablations: tuple[str, ...] = ()
    shift_eval_every: int = 100  # ablation `shift`: B = 4 checkpoints evaluated every this many steps
    threads: int = 2  # torch threads for training
    # Trainings that do not depend on each other (PBM, the ablations' own PBM-sized runs, the SWD students once PBM is
    # done) run in this many processes side by side, each with `threads // training_processes` torch threads (at
    # least 1). None: `threads` processes when the run has ablations, else 1. Measured on 2 cores: one training on 2
    # threads runs only 1.4x faster than on 1 (PBM 24.0 vs 33.5 min), so two 1-thread trainings side by side do more
    # work per minute; a run with one process trains exactly as before (same models).
    training_processes: int | None = None
    eval_threads: int = 1  # decoding: a tiny model decodes fastest on one thread (same for AR and BARD)
    # Verified decoding (DESIGN 4.2 a): every largest-B model also decodes with the AR source as `verifier`, a row of
    # its own whose answers must equal the AR source's on every test row; False leaves those rows out.
    verify: bool = True

    @classmethod
    def quick(cls, **overrides) -> PipelineConfig:
        """A few-minute run: fewer steps and rows. Its numbers show the pipeline works, not what the method does."""
        values = dict(
            train_samples=600, eval_samples=40, timing_samples=4, pbm_steps=(40, 10, 10, 10), swd_steps=10,
            thresholds=(0.9, 0.5),
        )
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        if self.training_processes is None:
            self.training_processes = self.threads if self.ablations else 1
        for name in ("train_samples", "eval_samples", "timing_samples", "swd_steps", "batch_size", "max_new_tokens",
                     "eval_batch_size", "threads", "eval_threads", "shift_eval_every", "training_processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if self.seed is None or isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {self.seed!r}.")
        self.block_sizes = tuple(self.block_sizes)
        sizes = list(self.block_sizes)
        if not sizes or sizes[0] < 1 or any(b % a or b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"`block_sizes` must increase, each a multiple of the previous, got {sizes!r}.")
        if self.pbm_steps is None:
            self.pbm_steps = DEFAULT_PBM_STEPS.get(self.task, DEFAULT_PBM_STEPS["digits"])
        steps = [self.pbm_steps] if isinstance(self.pbm_steps, int) else list(self.pbm_steps)
        if len(steps) not in (1, len(sizes)) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(
                f"`pbm_steps` must be one positive integer or one per block size {sizes}, got {self.pbm_steps!r}."
            )
        self.pbm_steps = steps[0] if len(steps) == 1 else tuple(steps)
        for name in ("thresholds", "stage_thresholds"):
            values = tuple(getattr(self, name))
            setattr(self, name, values)
            if not values or any(not 0 < t <= 1 for t in values):
                raise ValueError(f"`{name}` must be a non-empty list of values in (0, 1], got {values!r}.")
        if self.claim_threshold not in self.thresholds:
            raise ValueError(
                f"`claim_threshold` {self.claim_threshold!r} must be one of `thresholds` {self.thresholds!r}."
            )
        if not 0 < self.edit_threshold <= 1:
            raise ValueError(f"`edit_threshold` must lie in (0, 1], got {self.edit_threshold!r}.")
        if self.pbm_mask_rates is None:
            self.pbm_mask_rates = DEFAULT_PBM_MASK_RATES.get(self.task, DEFAULT_PBM_MASK_RATES["digits"])
        for name in ("swd_mask_rates", "pbm_mask_rates"):
            low, high = getattr(self, name)
            if not 0 < low < high <= 1:
                raise ValueError(f"`{name}` must be (low, high) with 0 < low < high <= 1, got {getattr(self, name)!r}.")
            setattr(self, name, (float(low), float(high)))
        if self.swd_loss_normalization not in ("token", "sample"):
            raise ValueError(
                f"`swd_loss_normalization` must be 'token' or 'sample', got {self.swd_loss_normalization!r}."
            )
        if self.noise_prior not in ("mask", "mix"):
            raise ValueError(f"`noise_prior` must be 'mask' or 'mix', got {self.noise_prior!r}.")
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {tuple(TASKS)}, got {self.task!r}.")
        if self.question_weights is None:
            self.question_weights = dict(DEFAULT_QUESTION_WEIGHTS[self.task])
        types = self.question_types
        unknown = [name for name in self.question_weights if name not in types]
        if unknown or not self.question_weights:
            raise ValueError(
                f"`question_weights` must map question types of the {self.task} task {types} to weights, got "
                f"{self.question_weights!r}."
            )
        if self.eval_samples < len(types):
            raise ValueError(f"`eval_samples` must be at least {len(types)} (one row per question type).")
        self.ablations = tuple(self.ablations)
        unknown = set(self.ablations) - set(ABLATIONS) - set(SERVING_ABLATIONS)
        if unknown:
            raise ValueError(f"Unknown `ablations` {sorted(unknown)}; choose from {ABLATIONS + SERVING_ABLATIONS}.")
        if self.prompt_attention not in ("block_causal", "causal"):
            raise ValueError(
                f"`prompt_attention` must be 'block_causal' or 'causal', got {self.prompt_attention!r}."
            )
        if self.prompt_attention == "causal" and "causal_prompt" in self.ablations:
            raise ValueError(
                "The `causal_prompt` ablation trains a causal-prompt PBM + SWD beside the block-causal one; with "
                "`prompt_attention='causal'` every model is causal already. Drop `causal_prompt` from `ablations`."
            )
        if self.noise_prior == "mix" and "mix" in self.ablations:
            raise ValueError(
                "The `mix` ablation trains a mixed-noise PBM beside the mask-only one; with `noise_prior='mix'` every "
                "model is already mixed. Drop `mix` from `ablations` or use `noise_prior='mask'`."
            )

    @property
    def decode_kwargs(self) -> dict:
        """`generate` settings every BARD model of the run decodes with besides the threshold: revision under mix."""
        return {"edit_threshold": self.edit_threshold} if self.noise_prior == "mix" else {}

    @property
    def prior_tag(self) -> str:
        """Model-name tag of the noise prior: "" for mask-only, "(mix)" for mixed noise."""
        return "" if self.noise_prior == "mask" else f"({self.noise_prior})"

    @property
    def question_types(self) -> tuple[str, ...]:
        """The task's question types (the test rows hold each equally often)."""
        return TASKS[self.task]

    @property
    def training_threads(self) -> int:
        """torch threads of each training: all of `threads` in one process, else an equal share of them."""
        return max(1, self.threads // self.training_processes)

    def stage_steps(self) -> list[int]:
        """Optimizer steps of each PBM stage, one per block size."""
        if isinstance(self.pbm_steps, int):
            return [self.pbm_steps] * len(self.block_sizes)
        return list(self.pbm_steps)


# ---------------------------------------------------------------------------------------------- progress
class _Progress:
    """Prints each stage's wall time, the total elapsed time and an estimate of what is left.

    The estimate extrapolates the seconds per optimizer step measured so far over the training steps still to run
    (divided by the `processes` training side by side), and the seconds per evaluated (model, threshold) over those
    still to decode.
    """

    def __init__(self, report, train_steps: int, eval_runs: int, processes: int = 1):
        self.report, self.started, self.last = report, time.perf_counter(), time.perf_counter()
        self.processes = processes
        self.train_left, self.train_done, self.train_seconds = train_steps, 0, 0.0
        self.eval_left, self.eval_done, self.eval_seconds = eval_runs, 0, 0.0
        self.timings: dict[str, float] = {}

    def _left(self) -> str:
        parts = []
        if self.train_left and self.train_done:
            parts.append(self.train_left * self.train_seconds / self.train_done / self.processes)
        if self.eval_left and self.eval_done:
            parts.append(self.eval_left * self.eval_seconds / self.eval_done)
        if not self.train_left and not self.eval_left:
            return "training and evaluation done"
        if not parts and not self.train_left:
            return "training done; evaluation time estimated after the first model"
        if not parts:
            return "remaining: estimated after the first stage"
        unknown = " + evaluation" if self.eval_left and not self.eval_done else ""
        return f"about {_minutes(sum(parts))} left{unknown}"

    def stage(self, name: str, train_steps: int = 0, eval_runs: int = 0, detail: str = "",
              seconds: float | None = None) -> None:
        """Close stage `name` (its wall time is summed under that key in `timings`); `detail` is only printed.
        `seconds`: the stage's own time, for a training that ran in a process of its own (default: since the last
        stage closed)."""
        now = time.perf_counter()
        seconds = now - self.last if seconds is None else seconds
        self.last = now
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 1)
        if train_steps:
            self.train_done += train_steps
            self.train_left -= train_steps
            self.train_seconds += seconds
        if eval_runs:
            self.eval_done += eval_runs
            self.eval_left -= eval_runs
            self.eval_seconds += seconds
        self.report(
            f"[{_minutes(now - self.started)} elapsed] {name}{detail}: {_minutes(seconds)}; {self._left()}"
        )


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ---------------------------------------------------------------------------------------------- training steps
def _common_args(cfg: PipelineConfig, output_dir: Path) -> dict:
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        vision_learning_rate=cfg.vision_learning_rate,
        max_length=512,
        use_cpu=True,
        bf16=False,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,  # the trainer's seed, and the base seed of the noise (BlockDiffusionConfig.noise_seed)
        dataloader_num_workers=0,
        activation_checkpointing=False,  # a few-million-parameter model has no activation memory to save
        # per-stage progress bar with elapsed and remaining time; trainings side by side print their logs instead
        disable_tqdm=cfg.training_processes > 1,
    )


def _timed(threads: int, fn, args: tuple, kwargs: dict):
    """Run `fn(*args, **kwargs)` on `threads` torch threads; returns (its result, its wall seconds)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


class _Trainings:
    """Runs the pipeline's training jobs: in this process one after another (`processes` 1, the order they are
    submitted in), or in `processes` spawned worker processes side by side, first submitted first started.

    `submit(stage, steps, fn, *args)` returns a future of `fn`'s result; `result(future)` waits for it and closes
    its progress stage with the job's own time. `collect()` waits for every job still running, closing each stage
    as it ends. A job that fails cancels the ones not started and raises here.
    """

    def __init__(self, cfg: PipelineConfig, progress: _Progress):
        self.threads, self.progress, self.pending = cfg.training_threads, progress, {}
        self.pool = None
        if cfg.training_processes > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a forked copy of a process that has run torch's thread pool can hang in it
            self.pool = ProcessPoolExecutor(cfg.training_processes, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, stage: str, steps: int, fn, *args, **kwargs):
        from concurrent.futures import Future

        if self.pool is None:
            future = Future()
            future.set_result(_timed(self.threads, fn, args, kwargs))
        else:
            future = self.pool.submit(_timed, self.threads, fn, args, kwargs)
        self.pending[future] = (stage, steps)
        return future

    def _close(self, future) -> None:
        stage, steps = self.pending.pop(future)
        self.progress.stage(stage, train_steps=steps, seconds=future.result()[1])

    def result(self, future):
        from concurrent.futures import FIRST_COMPLETED, wait

        while future in self.pending:  # close the stages of the jobs that end first
            done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            for finished in done:
                self._close(finished)
        return future.result()[0]

    def collect(self) -> None:
        while self.pending:
            self.result(next(iter(self.pending)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        return False


def run_block_merge(cfg: PipelineConfig, model_dir: Path, output_dir: Path, train, block_sizes, steps,
                    save_every: int | None = None):
    """PBM (DESIGN 3.5): one BlockMergeTrainer run over `block_sizes`, `steps[i]` optimizer steps at `block_sizes[i]`,
    under `cfg.noise_prior`; returns {B: stage folder}. `save_every`: also keep the model every that many steps
    (``checkpoints-b{B}``)."""
    from ..trainer.block_merge_config import BlockMergeConfig
    from ..trainer.block_merge_trainer import BlockMergeTrainer

    common = _common_args(cfg, output_dir)
    if save_every is not None:
        common.update(save_strategy="steps", save_steps=save_every, save_only_model=True)
    args = BlockMergeConfig(
        block_sizes=list(block_sizes), stage_steps=list(steps), learning_rate=cfg.learning_rate,
        max_warmup_steps=max(1, min(steps) // 10), noise_prior=cfg.noise_prior, noise_min_rate=cfg.pbm_mask_rates[0],
        noise_max_rate=cfg.pbm_mask_rates[1], **common,
    )
    trainer = BlockMergeTrainer(str(model_dir), args=args, train_dataset=train)
    trainer.train()
    return {b: output_dir / f"stage-b{b}" for b in block_sizes}


def run_distill(cfg: PipelineConfig, student: Path, teacher: Path, output_dir: Path, train, teacher_type="diffusion"):
    """SWD (DESIGN 3.6): the student at its own B learns from the frozen teacher; returns the final folder."""
    from transformers import AutoConfig

    from ..trainer.diffusion_distill_config import DiffusionDistillConfig
    from ..trainer.diffusion_distill_trainer import DiffusionDistillTrainer

    block_size = AutoConfig.from_pretrained(student).block_size
    args = DiffusionDistillConfig(
        max_steps=cfg.swd_steps, learning_rate=cfg.swd_learning_rate, max_warmup_steps=max(1, cfg.swd_steps // 10),
        teacher_type=teacher_type, noise_min_rate=cfg.swd_mask_rates[0], noise_max_rate=cfg.swd_mask_rates[1],
        loss_normalization=cfg.swd_loss_normalization, kd_on_eos_padding=cfg.swd_kd_on_eos_padding,
        noise_prior=cfg.noise_prior, **_common_args(cfg, output_dir),
    )
    trainer = DiffusionDistillTrainer(str(student), teacher_model=str(teacher), args=args, train_dataset=train)
    trainer.train()
    return output_dir / f"stage-b{block_size}"


# ---------------------------------------------------------------------------------------------- rows and claims
def _row(name: str, block_size: int, threshold, result: dict) -> dict:
    """One table row: accuracy with its Wilson interval, per type too (tokens/s and speedup come from timing)."""
    correct, types = result["correct"], result["question_types"]
    per_type_ci = {}
    for kind, count in result["counts"].items():
        hits = sum(1 for hit, k in zip(correct, types) if k == kind)
        per_type_ci[kind] = list(wilson_interval(hits, count))
    return dict(
        model=name, block_size=block_size, threshold=threshold, accuracy=result["accuracy"],
        ci95=list(wilson_interval(sum(correct), len(correct))), per_type=result["per_type"],
        per_type_ci95=per_type_ci, num_samples=len(correct), tokens_per_forward=result["tokens_per_forward"],
        tokens_per_second=None, speedup=None,
    )


def _compare(claim: str, statement: str, first: tuple, second: tuple, evals: dict, margin_of_second: float = 0.0):
    """A claim entry: `first` vs `second` ((name, threshold) keys of `evals`), paired over the same rows."""
    a, b = evals[first], evals[second]
    paired = paired_difference_interval(a["correct"], b["correct"])
    margin = margin_of_second * b["accuracy"]
    return {
        "claim": claim,
        "statement": statement,
        "compared": [
            {"model": first[0], "threshold": first[1], "accuracy": a["accuracy"],
             "tokens_per_forward": a["tokens_per_forward"]},
            {"model": second[0], "threshold": second[1], "accuracy": b["accuracy"],
             "tokens_per_forward": b["tokens_per_forward"]},
        ],
        "difference": paired["difference"],
        "ci95": paired["ci95"],
        "margin": margin,
        "first_only": paired["first_only"],
        "second_only": paired["second_only"],
        "num_samples": paired["num_samples"],
        "verdict": verdict(paired["ci95"], margin),
    }


def _compare_verified(claim: str, statement: str, first: str, second: str, evals: dict, tau: float) -> dict:
    """A claim judged by verified decoding (DESIGN 4.2 a): both models give the AR source's answers, so they differ
    only in how far their drafts are accepted. Measure: forwards per answer (both models' forwards), paired per row;
    the difference is `second - first` (forwards the first model saves), so "holds" means the first drafts better."""
    a, b = evals[(f"{first}, verified", tau)], evals[(f"{second}, verified", tau)]
    paired = paired_mean_difference_interval(b["row_forwards"], a["row_forwards"])
    return {
        "claim": claim,
        "statement": statement,
        "compared": [
            {"model": first, "threshold": tau, "forwards_per_answer": sum(a["row_forwards"]) / a["num_samples"],
             "tokens_per_forward": a["tokens_per_forward"]},
            {"model": second, "threshold": tau, "forwards_per_answer": sum(b["row_forwards"]) / b["num_samples"],
             "tokens_per_forward": b["tokens_per_forward"]},
        ],
        "difference": paired["difference"],
        "ci95": paired["ci95"],
        "num_samples": paired["num_samples"],
        "verdict": verdict(paired["ci95"]),
    }


def judge_verified_claims(cfg: PipelineConfig, evals: dict, names: dict) -> list[dict]:
    """Claims (b)-(e) again, by a measure that does not saturate once every model is exact: verified forwards per
    answer (`_compare_verified`), at `claim_threshold`, for the models whose verified rows ran."""
    tau, largest = cfg.claim_threshold, cfg.block_sizes[-1]
    pairs = {
        "b": (f"progressive merging drafts better than direct conversion to B={largest}", "pbm", "direct"),
        "c": (f"SWD drafts better than PBM alone at B={largest}", "swd", "pbm"),
        "d": (f"the B={cfg.block_sizes[0]} anchor is a better SWD teacher than the AR source (B={largest})", "swd",
              "ar_teacher"),
        "e": (f"mixed noise with revision drafts better than mask-only noise (B={largest})", "mix", "pbm"),
    }
    claims = []
    for claim, (statement, first, second) in pairs.items():
        keys = [(f"{names.get(role)}, verified", tau) for role in (first, second)]
        if all(role in names for role in (first, second)) and all(key in evals for key in keys):
            claims.append(_compare_verified(claim, statement + " (verified forwards per answer)", names[first],
                                            names[second], evals, tau))
    return claims


def _not_run(claim: str, statement: str, why: str) -> dict:
    return {"claim": claim, "statement": statement, "verdict": "not run", "note": why}


def swd_setting_ablations(cfg: PipelineConfig) -> dict[str, tuple[str, str, str, dict]]:
    """The SWD settings ablations, each the other value of one setting: key -> (output folder stem, model label,
    stage label, `PipelineConfig` overrides)."""
    norm = "sample" if cfg.swd_loss_normalization == "token" else "token"
    kd = not cfg.swd_kd_on_eos_padding
    return {
        "sample_norm": (f"swd-{norm}-norm", f"SWD({norm} norm)", f"SWD loss per {norm}",
                        {"swd_loss_normalization": norm}),
        "wide_mask_rates": ("swd-wide-rates", f"SWD(rates {WIDE_MASK_RATES[0]}-{WIDE_MASK_RATES[1]})",
                            "SWD mask rates", {"swd_mask_rates": WIDE_MASK_RATES}),
        "kd_eos_padding": (f"swd-kd-eos-{'on' if kd else 'off'}", f"SWD(KD {'with' if kd else 'without'} EOS padding)",
                           "SWD KD at EOS padding", {"swd_kd_on_eos_padding": kd}),
    }


def judge_settings(cfg: PipelineConfig, evals: dict, names: dict) -> list[dict]:
    """The settings ablations that ran (`names["sample_norm"]`, `names["wide_mask_rates"]`, `names["kd_eos_padding"]`,
    `names["causal_prompt"]`), each against the default SWD model at `claim_threshold`; "holds" means the other
    setting beats the default."""
    tau, largest = cfg.claim_threshold, cfg.block_sizes[-1]
    other_norm = "sample" if cfg.swd_loss_normalization == "token" else "token"
    low, high = cfg.swd_mask_rates
    statements = {
        "sample_norm": f"SWD loss normalised per {other_norm} beats per {cfg.swd_loss_normalization} (B={largest}, "
        f"tau={tau})",
        "wide_mask_rates": f"SWD mask rates [{WIDE_MASK_RATES[0]}, {WIDE_MASK_RATES[1]}] beat [{low}, {high}] "
        f"(B={largest}, tau={tau})",
        "kd_eos_padding": f"SWD {'without' if cfg.swd_kd_on_eos_padding else 'with'} KD at the EOS padding beats "
        f"{'with' if cfg.swd_kd_on_eos_padding else 'without'} (B={largest}, tau={tau})",
        "causal_prompt": f"PBM+SWD with a causal prompt (servable by vLLM) beats the block-causal prompt "
        f"(B={largest}, tau={tau})",
    }
    settings = [
        _compare(key, statement, (names[key], tau), (names["swd"], tau), evals)
        for key, statement in statements.items()
        if key in names
    ]
    if "causal_prompt_pbm" in names:  # PBM alone too: on the choice task SWD moves the final model by many points
        statement = f"PBM with a causal prompt (servable by vLLM) beats the block-causal prompt (B={largest}, tau={tau})"
        settings.append(_compare("causal_prompt_pbm", statement, (names["causal_prompt_pbm"], tau),
                                 (names["pbm"], tau), evals))
    return settings


def judge_claims(cfg: PipelineConfig, evals: dict, names: dict) -> list[dict]:
    """The five claims of the module docstring from `evals[(model name, threshold)]` (results of `digits.evaluate`).

    `names` maps roles to model names: `ar`, `pbm`, `swd` (the largest B) and, when run, `direct`, `ar_teacher`,
    `mix`.
    """
    tau, largest = cfg.claim_threshold, cfg.block_sizes[-1]
    claims = []
    statement = (
        f"PBM+SWD at B={largest} keeps >= 98% of the AR source's exact match at a threshold with >= 3 tokens/forward"
    )
    fast = [t for t in cfg.thresholds if evals[(names["swd"], t)]["tokens_per_forward"] >= 3.0]
    if fast:
        entry = _compare("a", statement, (names["swd"], max(fast)), (names["ar"], None), evals, margin_of_second=0.02)
    else:
        best = max(cfg.thresholds, key=lambda t: evals[(names["swd"], t)]["tokens_per_forward"])
        entry = _compare("a", statement, (names["swd"], best), (names["ar"], None), evals, margin_of_second=0.02)
        entry["verdict"] = "does not hold"
        entry["note"] = f"no threshold in {list(cfg.thresholds)} reaches 3 tokens per forward"
    claims.append(entry)

    statement = f"progressive merging beats direct conversion to B={largest} at equal total steps (tau={tau})"
    if "direct" in names:
        claims.append(_compare("b", statement, (names["pbm"], tau), (names["direct"], tau), evals))
    else:
        claims.append(_not_run("b", statement, "needs --ablations direct"))
    claims.append(
        _compare("c", f"SWD improves on PBM alone at B={largest} (tau={tau})", (names["swd"], tau),
                 (names["pbm"], tau), evals)
    )
    statement = f"the B={cfg.block_sizes[0]} anchor is a better SWD teacher than the AR source (B={largest}, tau={tau})"
    if "ar_teacher" in names:
        claims.append(_compare("d", statement, (names["swd"], tau), (names["ar_teacher"], tau), evals))
    else:
        claims.append(_not_run("d", statement, "needs --ablations ar_teacher"))
    statement = f"mixed noise with revision beats mask-only noise at equal tokens/forward (B={largest})"
    if cfg.noise_prior == "mix":
        claims.append(_not_run("e", statement, "every model here is mixed; needs noise prior mask and --ablations mix"))
    elif "mix" in names:
        target = evals[(names["mix"], tau)]["tokens_per_forward"]
        matched = min(cfg.thresholds, key=lambda t: abs(evals[(names["pbm"], t)]["tokens_per_forward"] - target))
        claims.append(_compare("e", statement, (names["mix"], tau), (names["pbm"], matched), evals))
    else:
        claims.append(_not_run("e", statement, "needs --ablations mix"))
    return claims


def _reconverted_run(cfg: PipelineConfig, ar_dir: Path, out: Path, train, name: str, save_every: int | None = None,
                     **conversion):
    """Ablations `shift` and `causal_prompt`: the same AR source, schedule, data and seeds, converted again with one
    `convert_from_autoregressive` setting changed (`conversion`: the head's meaning, DESIGN 4.1, or the prompt's
    mask, DESIGN 3.2), then PBM and the B = largest SWD student into the `-{name}` folders. Returns ({B: PBM stage
    folder}, the SWD folder)."""
    from ..conversion import convert_from_autoregressive

    converted = out / f"bard-b4-{name}"
    convert_from_autoregressive(ar_dir, converted, block_size=cfg.block_sizes[0], overwrite=True, **conversion)
    pbm = run_block_merge(cfg, converted, out / f"pbm-{name}", train, cfg.block_sizes, cfg.stage_steps(),
                          save_every=save_every)
    largest = cfg.block_sizes[-1]
    return pbm, run_distill(cfg, pbm[largest], pbm[cfg.block_sizes[0]], out / f"swd-{name}-b{largest}", train)


# ---------------------------------------------------------------------------------------------- the pipeline
def run_pipeline(cfg: PipelineConfig, report=print) -> dict:
    """Run conversion, PBM, SWD, ablations, evaluation and claims; write results.json, results.md and results.png."""
    from transformers import Qwen3VLForConditionalGeneration

    from ..conversion import convert_from_autoregressive
    from ..models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration
    from ..models.bard_vl.processing_bard_vl import BardVLProcessor
    from .digits import build_digits_dataset, evaluate, load_digits_ar_path, time_decoding

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    largest, stage_steps = cfg.block_sizes[-1], cfg.stage_steps()

    # Planned work, for the remaining-time estimate.
    train_steps = sum(stage_steps) + cfg.swd_steps * (len(cfg.block_sizes) - 1)
    ablation_steps = {"direct": sum(stage_steps), "ar_teacher": cfg.swd_steps, "mix": sum(stage_steps),
                      "shift": sum(stage_steps) + cfg.swd_steps, "causal_prompt": sum(stage_steps) + cfg.swd_steps}
    ablation_steps.update(dict.fromkeys(swd_setting_ablations(cfg), cfg.swd_steps))
    train_steps += sum(ablation_steps[a] for a in cfg.ablations)
    intermediate = 2 * (len(cfg.block_sizes) - 1) - 1  # PBM B < largest, SWD B < largest
    eval_runs = 1 + intermediate * len(cfg.stage_thresholds) + (2 + len(cfg.ablations)) * len(cfg.thresholds)
    if "shift" in cfg.ablations:  # one more final model, and both settings' B = 4 checkpoints from step 0
        eval_runs += len(cfg.thresholds) + 2 * (2 + stage_steps[0] // cfg.shift_eval_every)
    if "causal_prompt" in cfg.ablations:  # its PBM model too
        eval_runs += len(cfg.thresholds)
    if cfg.verify:  # one verified evaluation per largest-B model
        # PBM and SWD, one model per ablation, two for `shift` and `causal_prompt` (their PBM and SWD)
        eval_runs += 2 + len(cfg.ablations) + ("shift" in cfg.ablations) + ("causal_prompt" in cfg.ablations)
    progress = _Progress(report, train_steps, eval_runs, processes=cfg.training_processes)
    report(
        f"{cfg.task} demo: {train_steps} optimizer steps, {eval_runs} evaluations of {cfg.eval_samples} test rows; "
        f"writing to {out.resolve()}"
    )

    train = build_digits_dataset("train", cfg.train_samples, seed=cfg.seed, question_weights=cfg.question_weights)
    # Balanced (every type equally often), then grouped by type so a batch holds answers of similar length.
    types = cfg.question_types
    test = build_digits_dataset("test", cfg.eval_samples, seed=cfg.seed, question_weights=types, balanced=True)
    test = test.select(sorted(range(len(test)), key=lambda i: (types.index(test[i]["question_type"]), i)))
    # Timing rows: the first rows of every type in turn (position, column, read, read_twice, position, ...).
    groups = [[i for i, kind in enumerate(test["question_type"]) if kind == name] for name in types]
    interleaved = [group[j] for j in range(max(map(len, groups))) for group in groups if j < len(group)]
    timing = test.select(interleaved[: cfg.timing_samples])
    ar_dir = Path(cfg.source) if cfg.source else load_digits_ar_path(cfg.task)
    processor = BardVLProcessor.from_pretrained(ar_dir)

    converted = out / "bard-b4"  # an earlier run's conversion is replaced; a source there, or other files, refused
    convert_from_autoregressive(ar_dir, converted, block_size=cfg.block_sizes[0], prompt_attention=cfg.prompt_attention,
                                overwrite=True)
    progress.stage("conversion")

    models: dict[str, tuple[Path, tuple[float, ...], dict]] = {}  # name -> (folder, thresholds, generate kwargs)
    names = {"ar": AR_NAME}
    tag, extra = cfg.prior_tag, cfg.decode_kwargs  # under mix: "(mix)" in every name, revision in every decode
    save_every = cfg.shift_eval_every if "shift" in cfg.ablations else None  # B = 4 checkpoints for the study
    total, first = sum(stage_steps), cfg.block_sizes[0]
    mix_cfg = replace(cfg, noise_prior="mix", ablations=())  # ablation `mix`: the same run with the other prior
    with _Trainings(cfg, progress) as jobs:
        # The PBM-sized runs first (longest first: with several processes they set the run's length), then the SWD
        # students once PBM is done.
        pbm_job = jobs.submit("progressive block merging", total, run_block_merge, cfg, converted, out / "pbm", train,
                              cfg.block_sizes, stage_steps, save_every=save_every)
        job = {}
        if "shift" in cfg.ablations:
            job["shift"] = jobs.submit("ablation: shifted prediction", total + cfg.swd_steps, _reconverted_run, cfg,
                                       ar_dir, out, train, "shift", save_every, prediction_shift=True)
        if "causal_prompt" in cfg.ablations:
            job["causal_prompt"] = jobs.submit("ablation: causal prompt", total + cfg.swd_steps, _reconverted_run,
                                               cfg, ar_dir, out, train, "causal", prompt_attention="causal")
        if "direct" in cfg.ablations:
            # The same number of optimizer steps as the whole PBM schedule, all at the largest block size.
            job["direct"] = jobs.submit("ablation: direct conversion", total, run_block_merge, cfg, converted,
                                        out / "direct", train, [largest], [total])
        if "mix" in cfg.ablations:
            job["mix"] = jobs.submit("ablation: mixed noise", total, run_block_merge, mix_cfg, converted,
                                     out / "pbm-mix", train, cfg.block_sizes, stage_steps)
        pbm = jobs.result(pbm_job)
        anchor = pbm[first]
        swd_jobs = {b: jobs.submit(f"stage-wise distillation B={b}", cfg.swd_steps, run_distill, cfg, pbm[b], anchor,
                                   out / f"swd-b{b}", train) for b in cfg.block_sizes[1:]}
        if "ar_teacher" in cfg.ablations:
            job["ar_teacher"] = jobs.submit("ablation: AR teacher", cfg.swd_steps, run_distill, cfg, pbm[largest],
                                            ar_dir, out / f"swd-ar-b{largest}", train, teacher_type="autoregressive")
        for key, (folder, _, stage, overrides) in swd_setting_ablations(cfg).items():
            if key in cfg.ablations:  # the same student and teacher, one SWD setting changed
                job[key] = jobs.submit(f"ablation: {stage}", cfg.swd_steps, run_distill, replace(cfg, **overrides),
                                       pbm[largest], anchor, out / f"{folder}-b{largest}", train)
        jobs.collect()
        swd = {b: jobs.result(future) for b, future in swd_jobs.items()}
        done = {key: jobs.result(future) for key, future in job.items()}

    # The models in the table's order: PBM stages, SWD students, then the ablations.
    for b, path in pbm.items():
        models[f"PBM{tag} B={b}"] = (path, cfg.thresholds if b == largest else cfg.stage_thresholds, extra)
    names["pbm"] = f"PBM{tag} B={largest}"
    for b, path in swd.items():
        models[f"PBM{tag}+SWD B={b}"] = (path, cfg.thresholds if b == largest else cfg.stage_thresholds, extra)
    names["swd"] = f"PBM{tag}+SWD B={largest}"
    if "direct" in done:
        names["direct"] = f"direct{tag} B={largest}"
        models[names["direct"]] = (done["direct"][largest], cfg.thresholds, extra)
    if "ar_teacher" in done:
        names["ar_teacher"] = f"PBM{tag}+SWD(AR teacher) B={largest}"
        models[names["ar_teacher"]] = (done["ar_teacher"], cfg.thresholds, extra)
    for key, (_, label, _, _) in swd_setting_ablations(cfg).items():
        if key in done:
            names[key] = f"PBM{tag}+{label} B={largest}"
            models[names[key]] = (done[key], cfg.thresholds, extra)
    if "mix" in done:
        names["mix"] = f"PBM(mix)+revision B={largest}"
        models[names["mix"]] = (done["mix"][largest], cfg.thresholds, mix_cfg.decode_kwargs)
    if "shift" in done:
        pbm_shift, swd_shift = done["shift"]
        names["shift_pbm"], names["shift"] = f"PBM{tag}(shift) B={largest}", f"PBM{tag}+SWD(shift) B={largest}"
        models[names["shift_pbm"]] = (pbm_shift[largest], cfg.thresholds, extra)
        models[names["shift"]] = (swd_shift, cfg.thresholds, extra)
    if "causal_prompt" in done:
        pbm_causal, swd_causal = done["causal_prompt"]
        names["causal_prompt_pbm"] = f"PBM{tag}(causal prompt) B={largest}"
        names["causal_prompt"] = f"PBM{tag}+SWD(causal prompt) B={largest}"
        models[names["causal_prompt_pbm"]] = (pbm_causal[largest], cfg.thresholds, extra)
        models[names["causal_prompt"]] = (swd_causal, cfg.thresholds, extra)

    # Accuracy: batched greedy decoding of the same test rows by every model and threshold, one thread.
    torch.set_num_threads(cfg.eval_threads)
    ar_model = Qwen3VLForConditionalGeneration.from_pretrained(ar_dir).eval()
    decode = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
    evals = {(AR_NAME, None): evaluate(ar_model, processor, test, **decode)}
    rows = [_row(AR_NAME, 1, None, evals[(AR_NAME, None)])]
    decoders = {(AR_NAME, None): (ar_model, None)}
    progress.stage("evaluation", eval_runs=1, detail=f" {AR_NAME}")
    for name, (path, thresholds, extra) in models.items():
        model = BardVLForConditionalGeneration.from_pretrained(path).eval()
        for threshold in thresholds:
            kwargs = {"threshold": threshold, **extra}
            result = evaluate(model, processor, test, generate_kwargs=kwargs, **decode)
            evals[(name, threshold)] = result
            rows.append(_row(name, model.config.block_size, threshold, result))
            decoders[(name, threshold)] = (model, kwargs)
            progress.stage(
                "evaluation", eval_runs=1, detail=f" {name} tau={threshold}: exact match {result['accuracy']:.3f}, "
                f"{result['tokens_per_forward']:.2f} tokens/forward",
            )

    if cfg.verify:
        verified_rows(cfg, models, evals, rows, decoders, ar_model, processor, test, decode, progress)

    shift = None
    if "shift" in cfg.ablations:
        runs = {"paper": (converted, out / "pbm"), "shift": (out / "bard-b4-shift", out / "pbm-shift")}
        shift = shift_study(cfg, evals[(AR_NAME, None)]["accuracy"], runs, processor, test, decode)
        progress.stage("ablation: shifted prediction, exact match after conversion and along the B = 4 stage",
                       eval_runs=sum(len(setting["b4_curve"]) for setting in shift["settings"].values()))

    # Throughput: batch 1, every decoder on the same rows, interleaved row by row.
    timed = time_decoding(
        {f"{name}@{tau}": decoder for (name, tau), decoder in decoders.items()}, processor, timing,
        max_new_tokens=cfg.max_new_tokens,
    )
    ar_tps = timed[f"{AR_NAME}@None"]["tokens_per_second"]
    for row in rows:
        row["tokens_per_second"] = timed[f"{row['model']}@{row['threshold']}"]["tokens_per_second"]
        row["speedup"] = row["tokens_per_second"] / ar_tps
    progress.stage("timing", detail=f" (batch 1 on {len(timing)} rows, {len(decoders)} decoders interleaved)")

    claims = judge_claims(cfg, evals, names)
    settings = judge_settings(cfg, evals, names)
    verified_claims = judge_verified_claims(cfg, evals, names) if cfg.verify else []
    results = {
        "config": asdict(cfg),
        # the CPU kernels torch dispatches to (AVX2, AVX512, ...) may round differently: training is bitwise
        # repeatable on one machine, but the same seed and code have given different models in other sessions
        # (docs/demo_results/README.md, "Training variance")
        "machine": f"{os.cpu_count()} CPU cores ({torch.backends.cpu.get_cpu_capability()} kernels), torch "
        f"{torch.__version__}, {cfg.threads} training threads ({cfg.training_processes} training process(es) of "
        f"{cfg.training_threads} thread(s)), {cfg.eval_threads} decoding thread(s)",
        "eval_samples": len(test),
        "eval_samples_per_type": evals[(AR_NAME, None)]["counts"],
        "timing_samples": len(timing),
        "timings_s": progress.timings,
        "total_s": round(time.perf_counter() - progress.started, 1),
        "rows": rows,
        "claims": claims,
    }
    if settings:
        results["settings"] = settings
    if verified_claims:
        results["verified_claims"] = verified_claims
    if shift is not None:
        results["shift"] = shift
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    plot_results(results, out / "results.png")
    report(results_markdown(results))
    report(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'results.png'}")
    return results


def verified_rows(cfg: PipelineConfig, models: dict, evals: dict, rows: list, decoders: dict, ar_model, processor, test,
                  decode: dict, progress) -> None:
    """Verified decoding (DESIGN 4.2 a) of every largest-B model with the AR source as `verifier`: a row "<model>,
    verified" each (tau = `claim_threshold` for the drafts), with `same_as_ar`, the share of test rows whose answer is
    the AR source's (1.0 by construction; anything else is a bug), and its decoder for the timing table."""
    from .digits import evaluate

    largest = cfg.block_sizes[-1]
    ar_answers = evals[(AR_NAME, None)]["predictions"]
    for name, (_, thresholds, extra) in list(models.items()):
        if thresholds != cfg.thresholds or (name, cfg.claim_threshold) not in decoders:
            continue  # an intermediate stage
        model = decoders[(name, cfg.claim_threshold)][0]
        kwargs = {**extra, "threshold": cfg.claim_threshold, "verifier": ar_model}
        result = evaluate(model, processor, test, generate_kwargs=kwargs, **decode)
        verified = f"{name}, verified"
        evals[(verified, cfg.claim_threshold)] = result
        row = _row(verified, largest, cfg.claim_threshold, result)
        row["same_as_ar"] = sum(a == b for a, b in zip(result["predictions"], ar_answers)) / len(ar_answers)
        rows.append(row)
        decoders[(verified, cfg.claim_threshold)] = (model, kwargs)
        progress.stage("evaluation", eval_runs=1, detail=f" {verified}: exact match {result['accuracy']:.3f}, same "
                       f"answers as AR on {row['same_as_ar']:.3f} of the rows, {result['tokens_per_forward']:.2f} "
                       "tokens/forward")


def shift_study(cfg: PipelineConfig, ar_accuracy: float, runs: dict, processor, test, decode: dict) -> dict:
    """Ablation `shift` (issue 13): per setting (`runs[name] = (converted folder, PBM output folder)`), the exact
    match right after conversion and at every saved step of the B = 4 stage (threshold `claim_threshold`), and the
    first step at >= `SHIFT_TARGET` x the AR exact match (None when the stage never gets there)."""
    from ..models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration
    from .digits import evaluate

    first, tau, target = cfg.block_sizes[0], cfg.claim_threshold, SHIFT_TARGET * ar_accuracy
    study = {"threshold": tau, "block_size": first, "ar_accuracy": ar_accuracy, "target": target, "settings": {}}
    for setting, (converted, pbm_dir) in runs.items():
        saved = {int(path.name.rsplit("-", 1)[1]): path for path in (pbm_dir / f"checkpoints-b{first}").glob(
            "checkpoint-*")}
        saved[0] = converted
        saved.setdefault(cfg.stage_steps()[0], pbm_dir / f"stage-b{first}")
        curve = []
        for step in sorted(saved):
            model = BardVLForConditionalGeneration.from_pretrained(saved[step]).eval()
            result = evaluate(model, processor, test, generate_kwargs={"threshold": tau, **cfg.decode_kwargs},
                              **decode)
            curve.append({"step": step, "accuracy": result["accuracy"], "per_type": result["per_type"],
                          "tokens_per_forward": result["tokens_per_forward"]})
        study["settings"][setting] = {
            "converted": curve[0],
            "b4_curve": curve,
            "steps_to_target": next((point["step"] for point in curve if point["accuracy"] >= target), None),
        }
    return study


def shift_markdown(shift: dict) -> str:
    """The `shift` ablation as Markdown: after conversion per question type, and the B = 4 stage's steps to target."""
    first = next(iter(shift["settings"].values()))["converted"]["per_type"]
    types = [kind for kind in ALL_QUESTION_TYPES if kind in first]
    lines = [
        f"Shifted prediction (B = {shift['block_size']}, tau = {shift['threshold']}; target = "
        f"{SHIFT_TARGET:.0%} of AR = {shift['target']:.3f}):",
        "",
        "| setting | after conversion | " + " | ".join(types) + " | B=4 exact match by step | steps to target |",
        "|---|---:|" + "---:|" * len(types) + "---|---:|",
    ]
    for setting, entry in shift["settings"].items():
        start = entry["converted"]
        curve = ", ".join(f"{point['step']}: {point['accuracy']:.2f}" for point in entry["b4_curve"])
        reached = "not reached" if entry["steps_to_target"] is None else str(entry["steps_to_target"])
        lines.append(
            f"| {setting} | {start['accuracy']:.3f} | " + " | ".join(f"{start['per_type'][k]:.2f}" for k in types)
            + f" | {curve} | {reached} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- reports
def _interval(value: float, ci95) -> str:
    return f"{value:.3f} [{ci95[0]:.3f}, {ci95[1]:.3f}]"


def _comparison_line(c: dict) -> str:
    """One row of the claims (or settings) table."""
    label = f"({c['claim']}) " if len(c["claim"]) == 1 else ""
    if "compared" not in c:
        return f"| {label}{c['statement']} | - | - | {c['verdict']} ({c['note']}) |"
    compared = " vs ".join(
        f"{m['model']}{'' if m['threshold'] is None else ' tau=' + str(m['threshold'])}: {m['accuracy']:.3f}"
        for m in c["compared"]
    )
    margin = f", margin -{c['margin']:.3f}" if c["margin"] else ""
    note = f" ({c['note']})" if c.get("note") else ""
    return (
        f"| {label}{c['statement']} | {compared} | {_interval(c['difference'], c['ci95'])}{margin} | "
        f"{c['verdict']}{note} |"
    )


def results_markdown(results: dict) -> str:
    """The accuracy table (with Wilson 95% intervals) and the claims table, as Markdown."""
    types = [kind for kind in ALL_QUESTION_TYPES if any(kind in r["per_type"] for r in results["rows"])]
    config = results.get("config", {})
    lines = [] if config.get("noise_prior", "mask") == "mask" else [
        f"Every BARD model trained with the {config['noise_prior']} noise prior and decoded with revision (edit "
        f"threshold {config['edit_threshold']}).", "",
    ]
    lines += [
        "| model | B | tau | exact match [95% CI] | " + " | ".join(types) + " | tokens/forward | tokens/s | vs AR |",
        "|---|---:|---:|---|" + "---:|" * len(types) + "---:|---:|---:|",
    ]
    for r in results["rows"]:
        cells = [r["per_type"].get(kind) for kind in types]
        tps = "-" if r["tokens_per_second"] is None else f"{r['tokens_per_second']:.0f}"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['block_size']} | {'-' if r['threshold'] is None else r['threshold']} | "
            f"{_interval(r['accuracy'], r['ci95'])} | "
            + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
            + f" | {r['tokens_per_forward']:.2f} | {tps} | {speedup} |"
        )
    verified = [r for r in results["rows"] if "same_as_ar" in r]
    if verified:
        lines += ["", "Verified rows (DESIGN 4.2 a: the model drafts, the AR source checks; tokens/forward counts the "
                  "forwards of both): answers identical to the AR source's on "
                  + ", ".join(f"{r['same_as_ar']:.1%} ({r['model']})" for r in verified) + " of the test rows."]
    for key, title in (("claims", "claim"), ("settings", "setting")):
        if not results.get(key):
            continue
        lines += ["", f"| {title} | compared (exact match) | paired difference [95% CI] | verdict |",
                  "|---|---|---|---|"]
        lines += [_comparison_line(c) for c in results[key]]
    if results.get("verified_claims"):
        lines += ["", "| claim (verified) | compared (forwards per answer, tokens/forward) | forwards saved per answer "
                  "[95% CI] | verdict |", "|---|---|---|---|"]
        for c in results["verified_claims"]:
            compared = " vs ".join(f"{m['model']}: {m['forwards_per_answer']:.2f}, {m['tokens_per_forward']:.2f}"
                                   for m in c["compared"])
            lines.append(f"| ({c['claim']}) {c['statement']} | {compared} | {_interval(c['difference'], c['ci95'])} "
                         f"| {c['verdict']} |")
    if results.get("shift"):
        lines += ["", shift_markdown(results["shift"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Accuracy (with its 95% interval) against throughput, one curve per model over the thresholds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is in the `demo` extra
        logger.warning("matplotlib is not installed; skipping %s (pip install 'transformers-bard[demo]')", path)
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = list(dict.fromkeys(r["model"] for r in results["rows"]))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: a full --ablations all run has 15 models
    for index, name in enumerate(names):
        pts = [r for r in results["rows"] if r["model"] == name and r["tokens_per_second"] is not None]
        if not pts:
            continue
        xs = [r["tokens_per_second"] for r in pts]
        ys = [100 * r["accuracy"] for r in pts]
        errors = [[100 * (r["accuracy"] - r["ci95"][0]) for r in pts], [100 * (r["ci95"][1] - r["accuracy"]) for r in pts]]
        marker = "*" if name.startswith("AR") else "o"
        ax.errorbar(xs, ys, yerr=errors, marker=marker, markersize=12 if marker == "*" else 5, capsize=3, label=name,
                    color=colors[index % len(colors)])
    ax.set_xlabel("tokens / s (batch 1, prefill included, one thread)")
    ax.set_ylabel("exact match on the test split (%, 95% CI)")
    config = results.get("config", {})
    prior = "" if config.get("noise_prior", "mask") == "mask" else f", {config['noise_prior']} noise"
    ax.set_title(f"{config.get('task', 'digits').capitalize()} task{prior} ({results.get('eval_samples', '?')} test "
                 "rows): accuracy against throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "ABLATIONS", "DEFAULT_PBM_STEPS", "PipelineConfig", "judge_claims", "judge_settings", "plot_results", "results_markdown", "run_pipeline", "shift_study",
]
