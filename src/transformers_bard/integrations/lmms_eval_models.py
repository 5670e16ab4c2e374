"""lmms-eval model adapters: BARD-VL with block-diffusion `generate`, and its autoregressive source with stock
`generate`, through one prompt-building path (issue 12).

lmms-eval resolves the names `bard_vl` / `transformers_bard` / `bard_vl_ar` through the entry point in
`transformers_bard.integrations.lmms_eval` to the classes here: `BardVLChat` (chat tasks, the default),
`BardVLSimple` (`--force_simple`), and `BardVLARChat` / `BardVLARSimple` (`autoregressive=True` by default).

Per batch of requests (grouped by identical `gen_kwargs`, longest prompt first):
1. build each conversation: the task's messages (chat) or `[images..., context]` (simple), optional system prompt;
2. render it with the checkpoint's chat template and run `BardVLProcessor` on the PIL images (left padding);
3. `generate(**inputs, return_dict_in_generate=True)`: BARD decoding with the checkpoint's mask id and generation
   config, or stock greedy/sampled AR decoding;
4. keep the new tokens up to the first EOS (the checkpoint's `eos_token_id`), decode them, cut at the task's `until`
   strings, and return the text with its `TokenCounts`. Any other answer clean-up is the task's (its filters).

Efficiency (DESIGN 4.5): each answer carries `TokenCounts(input_tokens, output_tokens)` (lmms-eval sums them into the
results' `efficiency` block); each `generate_until` call logs generated tokens, generate seconds, tokens/s,
`tokens_per_forward` and `num_forwards` through `lmms_eval`'s `log_metrics` (the results' `throughput` block, as
`total_gen_tokens`, `total_elapsed_time`, `avg_speed`, `avg_latency`, `avg_tokens_per_forward`, `avg_num_forwards`).
A BARD forward count is `generate`'s `num_forwards` (prefill excluded, commits included); an AR model spends one
forward per generated token (the prefill's forward yields the first), so its tokens per forward is 1 by definition.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["BardVLARChat", "BardVLARSimple", "BardVLChat", "BardVLEvalArgs", "BardVLSimple"]

# Reference-adapter names (github.com/fudan-generative-vision/Bard-VL, eval/lmms-eval) -> ours.
ALIASES = {"confidence_threshold": "threshold", "denoising_steps": "steps_per_block", "remasking_strategy": "unmasking"}
REMASKING_STRATEGIES = {"low_confidence_dynamic": "threshold", "low_confidence_static": "static"}
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Options that steer BARD decoding; accepted in `model_args` and in the task's / CLI's `gen_kwargs`.
BARD_OPTIONS = ("block_size", "threshold", "unmasking", "unmask_order", "steps_per_block", "edit_threshold",
                "draft_threshold")
VIDEO_ERROR = (
    "The transformers-bard lmms-eval adapter evaluates images and text only, but the task sent a {kind}. Video needs "
    "Qwen3-VL's video processor (torchvision); choose an image task."
)


@dataclass
class BardVLEvalArgs:
    """The `model_args` of the adapters (`--model_args key=value,...`), validated once.

    Precedence for decoding settings: the task's `generation_kwargs` (and `--gen_kwargs`) > these `model_args` >
    the checkpoint's `generation_config.json`.
    """

    pretrained: str = ""  # checkpoint folder or Hub id (a BARD-VL checkpoint; with `autoregressive`, either kind)
    device: str | None = None  # default: "cuda" when available, else "cpu"
    dtype: str = "auto"  # "auto" (the checkpoint's), "bfloat16", "float16" or "float32"
    batch_size: int = 1  # requests per generate call (left-padded)
    block_size: int | None = None  # BARD block size B (default: the checkpoint's)
    threshold: float | None = None  # confidence threshold tau in (0, 1] (alias: confidence_threshold)
    unmasking: str | None = None  # "threshold" or "static" (alias: remasking_strategy=low_confidence_dynamic/static)
    unmask_order: str | None = None  # "left_to_right" (default) or "confidence": which positions fill a step's minimum
    steps_per_block: int | None = None  # denoising steps per block (alias: denoising_steps)
    edit_threshold: float | None = None  # revision of decoded tokens (models trained with mixed noise)
    draft_threshold: float | None = None  # with `verifier`: the drafts' threshold (default: the generation config's)
    max_new_tokens: int | None = None  # used when the task does not set it (default: the checkpoint's, else 256)
    temperature: float | None = None  # used when the task does not set it (default 0: argmax)
    autoregressive: bool = False  # evaluate the AR source with stock `generate` (model name `bard_vl_ar`)
    source: str | None = None  # the AR source for `autoregressive` (default: `pretrained` when it is AR, else the
    # BARD checkpoint's `source_model`, recorded by the conversion)
    # verified decoding (DESIGN 4.2 a): the AR checkpoint that checks every drafted block, so every answer is its
    # greedy answer; "source" = the BARD checkpoint's `source_model` (greedy tasks only)
    verifier: str | None = None
    system_prompt: str | None = None  # a system turn added to every prompt (default: none, as the demo prompts)
    attn_implementation: str | None = None  # e.g. "sdpa", "eager"
    trust_remote_code: bool = False  # load through the checkpoint's exported code instead of the installed package

    @classmethod
    def from_model_args(cls, **kwargs) -> BardVLEvalArgs:
        """Map the reference adapter's names to ours, drop lmms-eval's unset extras, reject unknown names."""
        for extra in ("max_batch_size", "max_length"):
            if kwargs.get(extra) is None:
                kwargs.pop(extra, None)
        for alias, name in ALIASES.items():
            if alias not in kwargs:
                continue
            value = kwargs.pop(alias)
            if alias == "remasking_strategy":
                if value not in REMASKING_STRATEGIES:
                    raise ValueError(
                        f"`remasking_strategy`={value!r} is not supported; use one of {sorted(REMASKING_STRATEGIES)} "
                        "(or `unmasking=threshold|static`)."
                    )
                value = REMASKING_STRATEGIES[value]
            if kwargs.get(name) is not None and kwargs[name] != value:
                raise ValueError(f"`{alias}`={value!r} and `{name}`={kwargs[name]!r} conflict; pass only `{name}`.")
            kwargs[name] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"Unknown model_args {unknown} for the transformers-bard adapter. Accepted: {sorted(known)} and the "
                f"aliases {sorted(ALIASES)}."
            )
        return cls(**kwargs)

    def __post_init__(self):
        if not self.pretrained:
            raise ValueError("`pretrained` is required: --model_args pretrained=PATH_OR_HUB_ID.")
        self.pretrained = str(self.pretrained)
        if isinstance(self.batch_size, str) and self.batch_size.isdigit():
            self.batch_size = int(self.batch_size)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {self.batch_size!r} ('auto' is not "
                             "supported).")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        for name in ("autoregressive", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false, got {getattr(self, name)!r}.")
        for name in ("max_new_tokens", "block_size", "steps_per_block"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.source is not None and not self.autoregressive:
            raise ValueError("`source` names the AR model for `autoregressive=true`; set that too, or drop `source`.")
        if self.verifier is not None and self.autoregressive:
            raise ValueError(f"`verifier`={self.verifier!r} checks a BARD model's drafts; with autoregressive=true "
                             "there are none. Drop one of them.")
        # The BARD options themselves (threshold range, unmasking names, ...) are validated by
        # BardVLGenerationConfig when the model loads, with its own messages.


def _to_pil(visual) -> Image.Image:
    if isinstance(visual, Image.Image):
        return visual.convert("RGB")
    if isinstance(visual, (str, Path)) and Path(visual).suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp",
                                                                         ".gif", ".tiff"}:
        return Image.open(visual).convert("RGB")
    if isinstance(visual, (str, Path, dict)):
        raise ValueError(VIDEO_ERROR.format(kind=f"video or other media ({str(visual)[:80]!r})"))
    raise ValueError(f"Unsupported visual of type {type(visual).__name__}; the adapter takes PIL images or image "
                     "file paths.")


class BardVL(lmms):
    """Shared adapter: loading, batching, generation and efficiency logging. Subclasses build the prompts."""

    is_simple = True
    default_autoregressive = False

    def __init__(self, pretrained: str = "", **kwargs) -> None:
        super().__init__()
        kwargs.setdefault("autoregressive", self.default_autoregressive)
        self.args = BardVLEvalArgs.from_model_args(pretrained=pretrained, **kwargs)
        self._device = torch.device(self.args.device)
        self._load()

    # ------------------------------------------------------------------ loading
    def _resolve_checkpoint(self, config) -> str:
        """The folder to load: `pretrained`, or in AR mode the BARD checkpoint's AR source."""
        args = self.args
        is_bard = config.model_type == "bard_vl"
        if not args.autoregressive:
            if not is_bard:
                raise ValueError(
                    f"`pretrained`={args.pretrained!r} is a {config.model_type!r} checkpoint, not a BARD-VL one. "
                    "Convert it (`transformers-bard convert`), or evaluate it autoregressively with --model bard_vl_ar "
                    "(or autoregressive=true)."
                )
            return args.pretrained
        if args.source is not None:
            return args.source
        if not is_bard:
            return args.pretrained
        return self._source_model(config)

    def _source_model(self, config) -> str:
        """The AR source a BARD checkpoint records (`config.source_model`): a local folder or a Hub id."""
        args = self.args
        source = getattr(config, "source_model", None)
        # A local folder, or a Hub id ("org/name"); a recorded local path that no longer exists is an error here.
        hub_id = bool(source) and source.count("/") == 1 and not source.startswith((".", "/", "~"))
        if not source or not (Path(source).expanduser().is_dir() or hub_id):
            raise ValueError(
                f"`pretrained`={args.pretrained!r} is a BARD-VL checkpoint whose AR source is unknown "
                f"(config.source_model={source!r}). Pass {'verifier' if args.verifier else 'source'}=PATH (the "
                "autoregressive checkpoint)."
            )
        return source

    def _load(self) -> None:
        from transformers import AutoConfig, AutoModelForImageTextToText

        import transformers_bard  # noqa: F401  (registers the BARD-VL Auto classes)

        from ..models.bard_vl.processing_bard_vl import BardVLProcessor
        from ..models.bard_vl.verification_bard_vl import load_verifier

        args = self.args
        config = AutoConfig.from_pretrained(args.pretrained, trust_remote_code=args.trust_remote_code)
        checkpoint = self._resolve_checkpoint(config)
        load_kwargs = dict(dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code)
        if args.attn_implementation is not None:
            load_kwargs["attn_implementation"] = args.attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, **load_kwargs)
        is_bard = model.config.model_type == "bard_vl"
        if args.autoregressive and is_bard:
            raise ValueError(
                f"autoregressive=true needs an autoregressive checkpoint, but {checkpoint!r} is BARD-VL. Pass "
                "source=PATH of its AR source."
            )
        self.verifier = None
        if args.verifier is not None:
            path = args.verifier
            if path == "source":
                path = self._source_model(config)
            self.verifier = load_verifier(path, **load_kwargs).to(self._device)
        self._model = model.to(self._device).eval()
        self.checkpoint = checkpoint
        self.processor = BardVLProcessor.from_pretrained(checkpoint)
        self._tokenizer = self.processor.tokenizer
        # Token ids come from the checkpoint: EOS from its generation config, the mask id from its config.
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        if not self.eos_token_ids:
            raise ValueError(f"{checkpoint!r} has no eos_token_id in its generation config; answers could not end.")
        self.mask_token_id = getattr(model.config, "mask_token_id", None) if is_bard else None
        self.pad_token_id = self._tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = min(self.eos_token_ids)
        if not args.autoregressive:
            # Fail now, with BardVLGenerationConfig's message, on bad decoding options rather than mid-evaluation.
            self._bard_options({})
        logger.info("lmms-eval adapter: %s (%s), device %s", checkpoint, "AR" if args.autoregressive else "BARD",
                    self._device)

    # ------------------------------------------------------------------ lmms interface
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "The transformers-bard adapter only generates (output_type generate_until); a block-diffusion model has "
            "no left-to-right likelihood. Choose a generation task."
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("Multi-round generation is not supported by the transformers-bard adapter.")

    # ------------------------------------------------------------------ prompts (per subclass)
    def _conversation(self, args: tuple) -> tuple[list[dict], list[Image.Image], dict]:
        """(conversation with `{"type": "image"}` placeholders, its PIL images in order, gen_kwargs) of a request."""
        raise NotImplementedError

    def _with_system_prompt(self, conversation: list[dict]) -> list[dict]:
        if self.args.system_prompt and not (conversation and conversation[0]["role"] == "system"):
            return [{"role": "system", "content": [{"type": "text", "text": self.args.system_prompt}]}, *conversation]
        return conversation

    # ------------------------------------------------------------------ generation
    def _bard_options(self, gen_kwargs: dict) -> dict:
        """Keyword arguments of BARD `generate` for a request's gen_kwargs (DESIGN 4)."""
        options = {name: getattr(self.args, name) for name in BARD_OPTIONS if getattr(self.args, name) is not None}
        for alias, name in ALIASES.items():
            if alias in gen_kwargs:
                value = gen_kwargs[alias]
                options[name] = REMASKING_STRATEGIES.get(value, value) if alias == "remasking_strategy" else value
        options.update({name: gen_kwargs[name] for name in BARD_OPTIONS if name in gen_kwargs})
        temperature, sampling = self._sampling(gen_kwargs)
        options["temperature"] = temperature
        options.update(sampling)
        max_new_tokens = self._max_new_tokens(gen_kwargs)
        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
        # Validate now (BardVLGenerationConfig names a bad value) instead of inside generate.
        config = copy.deepcopy(self._model.generation_config)
        config.update(**options)
        config.validate()
        return options

    def _ar_options(self, gen_kwargs: dict) -> dict:
        """Keyword arguments of stock `generate` for the AR source: greedy unless the task samples."""
        temperature, sampling = self._sampling(gen_kwargs)
        options = dict(do_sample=temperature > 0, pad_token_id=self.pad_token_id)
        # The AR checkpoint's own sampling defaults (Qwen3-VL: do_sample, temperature 0.7, top-k 20, top-p 0.8) must
        # not leak into a greedy evaluation.
        options.update(temperature=temperature or None, top_p=None, top_k=None)
        options.update(sampling)
        if gen_kwargs.get("num_beams") not in (None, 1):
            options["num_beams"] = gen_kwargs["num_beams"]
        options["max_new_tokens"] = self._max_new_tokens(gen_kwargs) or 256
        return options

    def _sampling(self, gen_kwargs: dict) -> tuple[float, dict]:
        temperature = gen_kwargs.get("temperature", self.args.temperature)
        temperature = float(temperature or 0.0)
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        if gen_kwargs.get("num_beams") not in (None, 1) and not self.args.autoregressive:
            raise ValueError(f"num_beams={gen_kwargs['num_beams']!r}: beam search is not offered by BARD-VL generate; "
                             "remove num_beams from --gen_kwargs.")
        sampling = {}
        if temperature > 0:
            sampling = {key: gen_kwargs[key] for key in ("top_p", "top_k") if gen_kwargs.get(key) is not None}
        return temperature, sampling

    def _max_new_tokens(self, gen_kwargs: dict) -> int | None:
        value = gen_kwargs.get("max_new_tokens", self.args.max_new_tokens)
        return None if value is None else int(value)

    def _until(self, gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(stop, str) for stop in until):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}.")
        return [stop for stop in until if stop]

    def _answer_ids(self, row: list[int]) -> list[int]:
        """New tokens up to and including the first EOS (pads and later tokens dropped)."""
        for index, token in enumerate(row):
            if token in self.eos_token_ids:
                return row[: index + 1]
        return [token for token in row if token != self.pad_token_id]

    def _generate_batch(self, conversations, images, gen_kwargs) -> tuple[list[GenerationResult], dict]:
        texts = [self.processor.apply_chat_template(conv, add_generation_prompt=True) for conv in conversations]
        flat_images = [image for row in images for image in row]
        inputs = self.processor(
            images=flat_images or None, text=texts, padding=True, padding_side="left", return_tensors="pt"
        ).to(self._device)
        autoregressive = self.args.autoregressive
        options = self._ar_options(gen_kwargs) if autoregressive else self._bard_options(gen_kwargs)
        began = time.perf_counter()
        if self.verifier is not None:
            options["verifier"] = self.verifier
        with torch.inference_mode():
            out = self._model.generate(**inputs, return_dict_in_generate=True, **options)
        seconds = time.perf_counter() - began
        prompt_length = inputs["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_length:].tolist()  # [batch, new]
        input_tokens = inputs["attention_mask"].sum(dim=1).tolist()  # [batch]
        until = self._until(gen_kwargs)
        results, generated, forwards = [], 0, 0
        for row, row_tokens in enumerate(new_tokens):
            answer = self._answer_ids(row_tokens)
            text = self._tokenizer.decode(answer, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop, 1)[0]
            if autoregressive:
                count, row_forwards = len(answer), len(answer)
            else:
                count, row_forwards = int(out.num_generated_tokens[row]), int(out.num_forwards[row])
            generated += count
            forwards += row_forwards
            results.append(
                GenerationResult(text=text, token_counts=TokenCounts(input_tokens=int(input_tokens[row]),
                                                                     output_tokens=count))
            )
        return results, dict(seconds=seconds, generated=generated, forwards=forwards)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        gen_kwargs_index = 1 if self.is_simple else 2
        # Longest context first (padding waste and memory peaks show early); one batch = one gen_kwargs setting.
        collator = lmms_utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]),
            group_fn=lambda args: args[gen_kwargs_index], grouping=True,
        )
        results = []
        totals = dict(seconds=0.0, generated=0, forwards=0)
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            built = [self._conversation(args) for args in chunk]
            conversations = [conversation for conversation, _, _ in built]
            images = [row_images for _, row_images, _ in built]
            batch_results, stats = self._generate_batch(conversations, images, dict(built[0][2]))
            results.extend(batch_results)
            for key in totals:
                totals[key] += stats[key]
        results = collator.get_original(results)
        seconds, generated, forwards = totals["seconds"], totals["generated"], totals["forwards"]
        log_metrics(
            total_elapsed_time=seconds,
            total_gen_tokens=generated,
            avg_speed=generated / seconds if seconds > 0 else 0.0,
            additional_metrics=dict(
                tokens_per_forward=generated / forwards if forwards else 0.0,
                num_forwards=forwards,
                total_requests=len(requests),
            ),
        )
        return results


class BardVLSimple(BardVL):
    """`--force_simple`: requests carry `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`; the prompt is
    one user turn with the document's images, then the context text."""

    is_simple = True

    def _conversation(self, args):
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        images = [_to_pil(visual) for visual in (visuals or [])]
        # Some tasks write LLaVA-style `<image>` markers into the context; the images are passed as blocks instead.
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context.replace("<image>", "")}]
        return self._with_system_prompt([{"role": "user", "content": content}]), images, gen_kwargs


class BardVLChat(BardVL):
    """Chat mode (default): requests carry the task's `doc_to_messages`; its image blocks become `{"type": "image"}`
    placeholders and their PIL images go to the processor in order."""

    is_simple = False

    def _conversation(self, args):
        _, doc_to_messages, gen_kwargs, doc_id, task, split = args
        messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        conversation, images = [], []
        for message in messages.messages:
            content = []
            for block in message.content:
                if block.type == "text":
                    content.append({"type": "text", "text": block.text})
                elif block.type == "image":
                    content.append({"type": "image"})
                    images.append(_to_pil(block.url))
                else:
                    raise ValueError(VIDEO_ERROR.format(kind=f"{block.type} block"))
            conversation.append({"role": message.role, "content": content})
        return self._with_system_prompt(conversation), images, gen_kwargs


class BardVLARSimple(BardVLSimple):
    """`bard_vl_ar --force_simple`: the AR source with stock `generate`."""

    default_autoregressive = True


class BardVLARChat(BardVLChat):
    """`bard_vl_ar`: the AR source with stock `generate`, through the chat prompts of `bard_vl`."""

    default_autoregressive = True
