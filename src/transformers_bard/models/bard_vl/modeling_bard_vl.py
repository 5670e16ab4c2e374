"""BardVLForConditionalGeneration: Qwen3-VL with block-diffusion attention, positions and a selective LM head.

What changes relative to `Qwen3VLForConditionalGeneration` (DESIGN 1, 2, 3):
- `forward` accepts `segment_ids` (``[batch, L]``, labels from `masking_bard_vl`): the 4-D block-diffusion mask and the
  M-RoPE positions of the packed row ``[prefix ; x0 ; xt]`` are then built here, with the config's (or a given)
  block size;
- `forward` accepts `logits_mask` (``[batch, L]`` bool): the LM head runs only at those positions and `logits` is
  ``[N, vocab]`` (N = number of True entries, row-major);
- `labels` give a plain, *unshifted* cross-entropy: the logit at position i predicts the clean token at i (DESIGN 2);
- with `config.prediction_shift` (DESIGN 4.1) the logit of a supervised noisy position comes from the hidden state
  that predicts it (the previous noisy position, or the last prefix/clean token before its block): `logits` keeps the
  row-major order of the `logits_mask` targets, so labels, 1/t weights and teacher targets line up unchanged.
Same parameters and weight names as Qwen3-VL: stock and upstream BARD-VL checkpoints load unchanged.

This file is exported next to the weights for ``trust_remote_code``: torch, transformers and siblings only.
"""

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelCardData
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLPreTrainedModel,
    Qwen3VLTextModel,
    Qwen3VLVisionModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils import hub as transformers_hub
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_bard_vl import BardVLConfig
from .generation_bard_vl import BardVLGenerationConfig, BardVLGenerationMixin
from .masking_bard_vl import (
    CLEAN,
    NOISY,
    PREFIX,
    attention_mask_from_labels,
    block_diffusion_block_mask,
    block_ids_from_segments,
    shifted_source_columns,
)

MODEL_CARD_TAGS = ["block-diffusion", "bard", "bard-vl", "qwen3-vl", "diffusion-language-model"]


def model_card(config: BardVLConfig, repo_id: str | None = None, tags: list[str] | None = None) -> ModelCard:
    """The Hub model card (README.md) of a BARD-VL checkpoint: metadata from `config`, usage with `repo_id`."""
    base = getattr(config, "source_model", None)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        base_model=base,
        tags=MODEL_CARD_TAGS + [tag for tag in tags or [] if tag not in MODEL_CARD_TAGS],
    )
    name = repo_id or "path/to/checkpoint"
    source = f" converted from [`{base}`](https://huggingface.co/{base})" if base else ""
    shift = (
        " Shifted prediction (`prediction_shift=True`): the hidden state at position i predicts token i + 1, as in "
        "the autoregressive source."
        if getattr(config, "prediction_shift", False)
        else ""
    )
    body = f"""
# {repo_id or "BARD-VL checkpoint"}

A block-diffusion vision-language model{source} with BARD (progressive block merging and stage-wise
intra-dVLM distillation, arXiv 2604.16514). Same parameters as Qwen3-VL; it decodes a block of
**{config.block_size} tokens** per step group, unmasking confident tokens in parallel and caching finished
blocks. Prompt attention: `{config.prompt_attention}`. Mask token id: `{config.mask_token_id}`.{shift}

## Load and generate

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{name}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe it."}}]}}]
inputs = processor.apply_chat_template(
    messages, images=[image], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors='pt'
)
out = model.generate(**inputs, max_new_tokens=128, threshold=0.9, return_dict_in_generate=True)
print(processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(out.tokens_per_forward)
```

With the `transformers-bard` package installed, `import transformers_bard` registers the classes and
`trust_remote_code` is not needed.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


@dataclass
class BardVLOutput(MultimodalCausalLMOutputWithPast):
    """`MultimodalCausalLMOutputWithPast` plus `selected_hidden_states` (``[N, hidden]``) when `logits_mask` is given."""

    selected_hidden_states: torch.FloatTensor | None = None


def additive_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # eager attention adds the mask to the scores: a boolean mask would be silently wrong (DESIGN 3.2)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class BardVLTextModel(Qwen3VLTextModel):
    """Qwen3-VL's text model, unchanged but for FlexAttention support: its attention layers go through transformers'
    attention interface, which passes a `BlockMask` from `BardVLForConditionalGeneration.attention_mask_from_labels`
    to `flex_attention` as it is. Qwen3-VL does not declare it only because its own masks were never tried there."""

    _supports_flex_attn = True


class BardVLVisionModel(Qwen3VLVisionModel):
    """Qwen3-VL's vision tower, unchanged but for FlexAttention support: without flash attention it attends within
    each image separately with no mask, which `flex_attention` computes as it does any unmasked attention."""

    _supports_flex_attn = True


class BardVLModel(Qwen3VLModel):
    """Qwen3-VL backbone under the BARD config. Two additions: the towers accept ``attn_implementation=
    "flex_attention"`` (`BardVLTextModel`, `BardVLVisionModel`: same modules and weight names); with a sharded vision
    tower (FSDP2, ZeRO-3), a batch without images still runs the tower on a dummy image (`dummy_vision_output`), so
    every rank joins the same collectives; values and gradients are unchanged."""

    config_class = BardVLConfig
    _supports_flex_attn = True

    def __init__(self, config: BardVLConfig):
        # Qwen3VLModel.__init__ with the two towers above in place of the Auto classes' Qwen3-VL towers
        Qwen3VLPreTrainedModel.__init__(self, config)
        self.visual = BardVLVisionModel._from_config(config.vision_config)
        self.language_model = BardVLTextModel._from_config(config.text_config)
        self.rope_deltas = None  # cached by Qwen3-VL's forward, as in Qwen3VLModel
        self.post_init()

    def vision_tower_is_sharded(self) -> bool:
        """True when the vision tower's weights are split over ranks and gathered collectively in its forward: FSDP2
        (`fully_shard` turns parameters into DTensors) or DeepSpeed ZeRO-3 (partitioned parameters carry `ds_id`).

        Called at every forward, decoding steps included, so it probes two parameters instead of walking the tower:
        the patch embedding's (the root's unit) and the first block's (each block is a unit of its own).
        """
        visual = self.visual
        probes = (visual.patch_embed.proj.weight, next(visual.blocks[0].parameters()))
        return any(isinstance(param, DTensor) or hasattr(param, "ds_id") for param in probes)

    def dummy_vision_output(self) -> torch.Tensor:
        """0 x the vision tower's outputs on a one-tile blank image: a scalar zero that depends on every vision weight.

        A sharded vision tower gathers its weights with collectives that every rank must join in the same order. A
        rank whose batch has no image would skip the tower and fall out of step with the others (a hang or a size
        mismatch); it runs the tower on this dummy instead, before the language model as a real image would be, and
        adds the zero to its output, so neither values nor gradients change.
        """
        visual = self.visual
        proj = visual.patch_embed.proj
        merge = visual.spatial_merge_size
        weight = next(visual.parameters())
        features = proj.in_channels * math.prod(proj.kernel_size)
        pixels = torch.zeros(merge * merge, features, dtype=weight.dtype, device=weight.device)
        grid = torch.tensor([[1, merge, merge]], device=weight.device)
        output = visual(pixels, grid_thw=grid, return_dict=True)
        total = output.pooler_output.float().sum()
        for feature in output.deepstack_features or ():
            total = total + feature.float().sum()
        return 0.0 * total

    # the stock forward's renaming shim, repeated: without it `past_key_values` rides in **kwargs next to `cache=None`
    # and the stock forward keeps `cache=None`, dropping the caller's cache
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        mm_encoder_outputs=None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        vision_anchor = None
        if (
            pixel_values is None
            and pixel_values_videos is None
            and mm_encoder_outputs is None
            and self.vision_tower_is_sharded()
        ):
            # run the tower where a real image runs it: after the token embeddings (a sharded unit too), before the
            # language model; the ids are consumed here, so the positions the backbone would compute from them too
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
                if position_ids is None:
                    position_ids = self.compute_3d_position_ids(
                        input_ids=input_ids,
                        image_grid_thw=image_grid_thw,
                        video_grid_thw=video_grid_thw,
                        inputs_embeds=inputs_embeds,
                        attention_mask=attention_mask,
                        cache=cache,
                        mm_token_type_ids=mm_token_type_ids,
                    )
                input_ids = None
            vision_anchor = self.dummy_vision_output()
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        if vision_anchor is not None:
            if isinstance(outputs, tuple):
                outputs = (outputs[0] + vision_anchor.to(outputs[0].dtype),) + outputs[1:]
            else:
                outputs.last_hidden_state = outputs.last_hidden_state + vision_anchor.to(
                    outputs.last_hidden_state.dtype
                )
        return outputs


class BardVLForConditionalGeneration(BardVLGenerationMixin, Qwen3VLForConditionalGeneration):
    r"""
    Qwen3-VL as a block-diffusion VLM (BARD-VL): exactly `Qwen3VLForConditionalGeneration`'s weights, with
    - `forward` taking the packed training row's `segment_ids` (the block-diffusion mask and positions are built from
      them, DESIGN 3.1-3.2), `block_size`, `logits_mask` (the LM head only there) and `skip_logits`;
    - `generate` decoding block by block (DESIGN 4) with a `BardVLGenerationConfig` (`threshold`, `block_size`,
      `unmask_order`, `edit_threshold`, ...), returning `tokens_per_forward` with `return_dict_in_generate=True`;
    - `push_to_hub` writing the BARD-VL model card next to the weights and the code files for `trust_remote_code`.

    Example:

    ```python
    >>> import transformers_bard  # registers bard_vl with the Auto classes
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("bard-vl-4b-b4")  # a converted checkpoint: BardVLForConditionalGeneration
    >>> processor = AutoProcessor.from_pretrained("bard-vl-4b-b4")
    >>> messages = [{"role": "user", "content": [{"type": "text", "text": "Say the word red."}]}]
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
    ...                                        return_dict=True, return_tensors="pt")
    >>> out = model.generate(**inputs, max_new_tokens=64, threshold=0.9, return_dict_in_generate=True)
    >>> answer = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    >>> out.tokens_per_forward.shape  # one value per row
    torch.Size([1])
    ```
    """

    config_class = BardVLConfig
    _supports_flex_attn = True  # the block-diffusion mask as a block-sparse `BlockMask` (`attention_mask_from_labels`)
    # the trainer computes the block-diffusion loss itself and normalises by samples (DESIGN 3.4)
    accepts_loss_kwargs = False
    # block-diffusion decoding settings (DESIGN 4); loaded by the mixin's `adjust_generation_fn` (DESIGN 6)
    generation_config_class = BardVLGenerationConfig

    def __init__(self, config: BardVLConfig):
        # Qwen3VLForConditionalGeneration.__init__ would build a Qwen3VLModel that is then replaced: build the backbone
        # once, so what its `post_init` sets up (e.g. `gradient_checkpointing` from the config) is kept.
        Qwen3VLPreTrainedModel.__init__(self, config)
        self.model = BardVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """`PushToHubMixin.push_to_hub` with the BARD-VL model card (`model_card`) instead of transformers' generic one.

        `save_pretrained` writes the weights, the config and, through `register_for_auto_class`, the code files and
        their `auto_map` (DESIGN 5).
        """
        api = transformers_hub.hf_api()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            model_card(self.config, repo_id, tags).save(Path(tmp_dir) / "README.md")
            try:
                return api.upload_folder(
                    repo_id=repo_id,
                    folder_path=tmp_dir,
                    commit_message=commit_message or "Upload BARD-VL model",
                    commit_description=commit_description,
                    token=token,
                    revision=revision,
                    create_pr=create_pr,
                )
            except Exception as error:  # the upload's own error type is kept; the note says what was left where
                error.add_note(
                    f"Uploading to {repo_id} failed; nothing local was changed: the upload was written to a "
                    f"temporary folder (removed), and the model's own files ({self.name_or_path or 'in memory'}) are "
                    "intact. Call push_to_hub again once the Hub is reachable."
                )
                raise

    # ------------------------------------------------------------------ masks and positions
    def block_diffusion_attention_mask(self, segment_ids: torch.Tensor, block_size: int | None = None):
        """The mask of a labelled row (DESIGN 3.2) in the form the configured attention implementation expects."""
        block_size = self.config.block_size if block_size is None else block_size
        block_ids = block_ids_from_segments(segment_ids, block_size)
        return self.attention_mask_from_labels(segment_ids, block_ids, segment_ids, block_ids)

    def attention_mask_from_labels(self, q_segments, q_blocks, k_segments, k_blocks):
        """The mask of queries labelled ``[batch, q]`` against keys labelled ``[batch, k]`` (DESIGN 3.2; queries are
        the last q keys) for the configured attention implementation: a FlexAttention ``BlockMask`` built from
        the same rule (block-sparse: empty tiles are skipped) for ``flex_attention``, the boolean ``[batch, 1, q, k]``
        mask for ``sdpa`` and its additive form for ``eager``."""
        if self.config.get_text_config()._attn_implementation == "flex_attention":  # the text model reads the mask
            return block_diffusion_block_mask(q_segments, q_blocks, k_segments, k_blocks, self.config.prompt_attention)
        mask = attention_mask_from_labels(q_segments, q_blocks, k_segments, k_blocks, self.config.prompt_attention)
        return self._format_attention_mask(mask)

    def _format_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A dense boolean 4-D mask in the form the text model's attention implementation expects."""
        impl = self.config.get_text_config()._attn_implementation or "sdpa"
        if impl in ("eager", "flex_attention"):
            # eager adds the mask to the scores, and so does flex attention given a tensor: a boolean mask would be
            # silently wrong (DESIGN 3.2). Masks built from labels take the block-sparse `BlockMask` path instead.
            return additive_attention_mask(mask, self.dtype)
        if impl != "sdpa":
            raise ValueError(
                f"attn_implementation={impl!r} cannot take the 4-D block-diffusion mask; load the model with "
                "attn_implementation='sdpa' (default), 'flex_attention' or 'eager'."
            )
        return mask

    def get_packed_position_ids(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M-RoPE positions ``[3, batch, L]`` of a labelled row (DESIGN 2, 3.1).

        Prefix tokens get Qwen3-VL's `get_rope_index` positions (computed over the prefix only); the j-th clean and
        the j-th noisy token both get ``max(prefix positions) + 1 + j``. Padding gets 0.
        """
        is_prefix = segment_ids == PREFIX
        if mm_token_type_ids is None:
            mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
        prefix_pos, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=is_prefix.long(),
        )  # [3, batch, L], zeros outside the prefix
        prefix_pos = prefix_pos.masked_fill(~is_prefix[None], 0)
        has_prefix = is_prefix.any(-1)
        start = torch.where(
            has_prefix, prefix_pos.amax(dim=(0, 2)) + 1, torch.zeros_like(has_prefix, dtype=torch.long)
        )
        pos = prefix_pos.clone()
        for segment in (CLEAN, NOISY):
            in_segment = segment_ids == segment
            rank = in_segment.long().cumsum(-1) - 1  # [batch, L]
            seg_pos = (start[:, None] + rank).to(pos.dtype)
            pos = torch.where(in_segment[None], seg_pos[None].expand_as(pos), pos)
        return pos

    def logit_positions(
        self, segment_ids: torch.Tensor, logits_mask: torch.Tensor, block_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, columns)``, each ``[N]``: the hidden state that scores each of the N targets of `logits_mask`
        (row-major) in a packed row. The target itself without shift; its source under `config.prediction_shift`
        (DESIGN 4.1, `shifted_source_columns` at `block_size`, default `config.block_size`)."""
        rows, columns = logits_mask.bool().nonzero(as_tuple=True)  # [N], [N]
        if not self.config.prediction_shift:
            return rows, columns
        block_size = self.config.block_size if block_size is None else block_size
        sources = shifted_source_columns(segment_ids, block_size)[rows, columns]  # [N]
        if bool((sources < 0).any()):
            raise ValueError(
                "`logits_mask` selects positions that no hidden state predicts under `prediction_shift=True`: only "
                "noisy (xt) positions of rows with a prompt can be supervised (DESIGN 4.1). Mark only xt positions."
            )
        return rows, sources

    # ------------------------------------------------------------------ forward
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs=None,
        segment_ids: torch.LongTensor | None = None,
        block_size: int | None = None,
        logits_mask: torch.BoolTensor | None = None,
        skip_logits: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BardVLOutput:
        r"""
        segment_ids (`torch.LongTensor` of shape `(batch, L)`, *optional*):
            `PAD`/`PREFIX`/`CLEAN`/`NOISY` labels (see `masking_bard_vl`). When given, `attention_mask` must be None:
            the block-diffusion mask is built here with `block_size` (default `config.block_size`), and missing
            `position_ids` are computed with `get_packed_position_ids`.
        block_size (`int`, *optional*):
            Block size of the mask built from `segment_ids` (a distillation teacher rebuilds the mask with its own).
        logits_mask (`torch.BoolTensor` of shape `(batch, L)`, *optional*):
            Run the LM head only where True; `logits` is then `(N, vocab)` and `selected_hidden_states` `(N, hidden)`.
            With `segment_ids` and `config.prediction_shift`, True marks the *targets* (noisy positions) and each
            one's logit comes from the hidden state that predicts it (`logit_positions`, DESIGN 4.1).
        skip_logits (`bool`):
            With `logits_mask`: return only `selected_hidden_states` (for a chunked LM-head + loss).
        labels (`torch.LongTensor`, *optional*):
            Clean tokens at the same positions as the logits (no shift; -100 ignored). With `logits_mask` they may
            be `(batch, L)` (gathered here) or `(N,)`.
        """
        if segment_ids is not None:
            if attention_mask is not None:
                raise ValueError(
                    "Pass either `segment_ids` (block-diffusion mask built here) or `attention_mask`, not both."
                )
            attention_mask = self.block_diffusion_attention_mask(segment_ids, block_size)
            if position_ids is None:
                if input_ids is None:
                    raise ValueError(
                        "`segment_ids` without `position_ids` needs `input_ids` to compute M-RoPE positions."
                    )
                position_ids = self.get_packed_position_ids(
                    input_ids, segment_ids, mm_token_type_ids, image_grid_thw, video_grid_thw
                )
        elif (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool
        ):
            attention_mask = self._format_attention_mask(attention_mask)

        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,  # read by name below; `can_return_tuple` makes the tuple when the caller asks for one
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # [batch, L, hidden]

        selected = None
        shifted = self.config.prediction_shift and segment_ids is not None
        if shifted and logits_mask is None and labels is not None:
            raise ValueError(
                "With `prediction_shift=True`, `labels` on a packed row need `logits_mask` (the supervised xt "
                "positions): each target's logit is taken from the hidden state that predicts it (DESIGN 4.1)."
            )
        if logits_mask is not None and shifted:
            selected = hidden_states[self.logit_positions(segment_ids, logits_mask, block_size)]  # [N, hidden]
            logits = None if skip_logits else self.lm_head(selected)  # [N, vocab], in target order
            if labels is not None and labels.dim() == 2:
                labels = labels[logits_mask.bool()]
        elif logits_mask is not None:
            selected = hidden_states[logits_mask.bool()]  # [N, hidden]
            logits = None if skip_logits else self.lm_head(selected)  # [N, vocab]
            if labels is not None and labels.dim() == 2:
                labels = labels[logits_mask.bool()]
        else:
            if isinstance(logits_to_keep, int):
                hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
            else:
                hidden_states = hidden_states[:, logits_to_keep]
            logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None and logits is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

        return BardVLOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
            selected_hidden_states=selected,
        )


__all__ = [
    "BardVLForConditionalGeneration",
    "BardVLModel",
    "BardVLOutput",
    "additive_attention_mask",
    "model_card",
]
