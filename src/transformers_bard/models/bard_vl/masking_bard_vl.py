"""Block ids, 4-D attention masks and positions for block diffusion (DESIGN 2, 3.1, 3.2, 4).

Every token of a row carries two labels:

- a *segment*: ``PAD``, ``PREFIX`` (prompt, images, earlier turns), ``CLEAN`` (x0, or a committed block at decode
  time) or ``NOISY`` (xt, or the block being denoised);
- a *block id*: prefix token i (counted from the row's first real token) gets ``i // B``; the j-th clean token gets
  ``ceil(P / B) + j // B`` where P is the row's real prefix length; the j-th noisy token gets the id of the j-th clean
  token.

Who may attend to whom is decided from those labels alone (``attention_mask_from_labels``), so the same rule serves
the packed training row ``[prefix ; x0 ; xt]``, the prefill of a prompt, a denoising step against a KV cache and the
fused commit + next-block step. Masks are boolean, ``True`` = may attend, shaped ``[batch, 1, q, k]`` for SDPA.

This file is exported next to the weights for ``trust_remote_code``: torch only.
"""

import torch

PAD = 0
PREFIX = 1
CLEAN = 2
NOISY = 3


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def block_ids_from_segments(segment_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block id of every token (DESIGN 3.2) from its segment labels.

    Args:
        segment_ids: ``[batch, L]`` with values ``PAD``/``PREFIX``/``CLEAN``/``NOISY``. Within a row the prefix tokens,
            the clean tokens and the noisy tokens are each counted in column order, wherever they sit.
        block_size: B.

    Returns:
        ``[batch, L]`` long tensor; padding tokens get -1.
    """
    if block_size < 1:
        raise ValueError(f"`block_size` must be >= 1, got {block_size}.")
    is_prefix = segment_ids == PREFIX
    is_clean = segment_ids == CLEAN
    is_noisy = segment_ids == NOISY
    # rank of each token inside its own segment, 0-based: [batch, L]
    prefix_rank = is_prefix.long().cumsum(-1) - 1
    clean_rank = is_clean.long().cumsum(-1) - 1
    noisy_rank = is_noisy.long().cumsum(-1) - 1
    prefix_len = is_prefix.long().sum(-1, keepdim=True)  # [batch, 1]
    first_response_block = _ceil_div(prefix_len, block_size)  # [batch, 1]
    block_ids = torch.full_like(segment_ids, -1, dtype=torch.long)
    block_ids = torch.where(is_prefix, torch.div(prefix_rank, block_size, rounding_mode="floor"), block_ids)
    block_ids = torch.where(
        is_clean, first_response_block + torch.div(clean_rank, block_size, rounding_mode="floor"), block_ids
    )
    block_ids = torch.where(
        is_noisy, first_response_block + torch.div(noisy_rank, block_size, rounding_mode="floor"), block_ids
    )
    return block_ids


def _columns(q_segment, k_segment, q_index, k_index, prompt_attention: str):
    """Validated `prompt_attention` and the query/key columns ``[batch, q]``/``[batch, k]``; by default the queries
    are the last q of the k keys."""
    if prompt_attention not in ("block_causal", "causal"):
        raise ValueError(f"`prompt_attention` must be 'block_causal' or 'causal', got {prompt_attention!r}.")
    batch, q_len = q_segment.shape
    k_len = k_segment.shape[1]
    device = q_segment.device
    if k_index is None:
        k_index = torch.arange(k_len, device=device).expand(batch, k_len)
    if q_index is None:
        q_index = torch.arange(k_len - q_len, k_len, device=device).expand(batch, q_len)
    return q_index, k_index


def attention_mask_from_labels(
    q_segment: torch.Tensor,
    q_block: torch.Tensor,
    k_segment: torch.Tensor,
    k_block: torch.Tensor,
    prompt_attention: str = "block_causal",
    q_index: torch.Tensor | None = None,
    k_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``[batch, 1, q, k]`` mask from per-token labels (DESIGN 3.2).

    - prefix/clean query of block b: prefix/clean keys of block <= b (bidirectional inside a block), never noisy keys;
      with ``prompt_attention="causal"`` a prefix query sees only prefix keys at or before its own index;
    - noisy query of block b: every prefix key, clean keys of blocks < b, noisy keys of block b;
    - padding keys are never visible; a padding query sees the key with its own index only (no all-False rows,
      which would make SDPA return NaN).

    ``q_index``/``k_index`` (``[batch, q]``/``[batch, k]``) are the token's column in the full row, used for causal
    prompts and for the padding diagonal. By default queries are the *last* q columns of the k keys (the usual
    "new tokens after the cache" arrangement, and q == k for a full sequence).
    """
    q_index, k_index = _columns(q_segment, k_segment, q_index, k_index, prompt_attention)

    qs, qb, qi = q_segment[:, :, None], q_block[:, :, None], q_index[:, :, None]  # [batch, q, 1]
    ks, kb, ki = k_segment[:, None, :], k_block[:, None, :], k_index[:, None, :]  # [batch, 1, k]
    return visible(qs, qb, qi, ks, kb, ki, prompt_attention)[:, None]  # [batch, 1, q, k]


def visible(qs, qb, qi, ks, kb, ki, prompt_attention: str = "block_causal") -> torch.Tensor:
    """The rule of DESIGN 3.2 on broadcastable label tensors (query segment, block, column; key segment, block,
    column): True where the query may attend to the key. Shared by the dense SDPA/eager mask
    (`attention_mask_from_labels`) and FlexAttention's ``mask_mod`` (`block_diffusion_block_mask`), so both
    backends see one definition."""
    q_is_context = (qs == PREFIX) | (qs == CLEAN)
    k_is_context = (ks == PREFIX) | (ks == CLEAN)
    # prefix/clean queries: block-causal over prefix and clean keys
    context_rule = q_is_context & k_is_context & (kb <= qb)
    if prompt_attention == "causal":
        # prefix rows token-causal; clean rows keep the block rule (every prefix key has a smaller block id)
        both_prefix = (qs == PREFIX) & (ks == PREFIX)
        context_rule = torch.where(both_prefix, ki <= qi, context_rule)
    # noisy queries: whole prefix, earlier clean blocks, own noisy block
    noisy_rule = (qs == NOISY) & ((ks == PREFIX) | ((ks == CLEAN) & (kb < qb)) | ((ks == NOISY) & (kb == qb)))
    mask = (context_rule | noisy_rule) & (ks != PAD)
    # padding queries attend to themselves only
    return mask | ((qs == PAD) & (ki == qi))


def _pad_labels(segment, block, index, length: int):
    """Labels ``[batch, n]`` padded to ``length`` columns with PAD tokens (block -1, columns continuing)."""
    extra = length - segment.shape[1]
    if extra == 0:
        return segment, block, index
    batch = segment.shape[0]
    tail = torch.arange(extra, device=index.device) + index.amax(-1, keepdim=True) + 1  # [batch, extra]
    return (
        torch.cat([segment, segment.new_full((batch, extra), PAD)], dim=1),
        torch.cat([block, block.new_full((batch, extra), -1)], dim=1),
        torch.cat([index, tail.to(index.dtype)], dim=1),
    )


def block_diffusion_block_mask(
    q_segment: torch.Tensor,
    q_block: torch.Tensor,
    k_segment: torch.Tensor,
    k_block: torch.Tensor,
    prompt_attention: str = "block_causal",
    q_index: torch.Tensor | None = None,
    k_index: torch.Tensor | None = None,
    tile_size: int = 128,
):
    """FlexAttention ``BlockMask`` of the same rule as `attention_mask_from_labels` (arguments as there).

    ``mask_mod`` looks the labels up per (row, query, key) and applies `visible`; `create_block_mask` turns it into
    per-tile lists, so tiles in which no query sees any key (e.g. the prompt's queries against the noisy half of a
    packed row, or whole rows of padding) are skipped by the kernel, and only partial tiles evaluate ``mask_mod``.
    The labels are padded to a multiple of `tile_size` with PAD tokens so ``mask_mod`` never indexes out of range in
    a partial last tile. Nothing of size ``q x k`` is kept: the BlockMask holds ``[batch, 1, q/tile, k/tile]`` tile
    indices and the label tensors.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    batch, q_len = q_segment.shape
    k_len = k_segment.shape[1]
    q_index, k_index = _columns(q_segment, k_segment, q_index, k_index, prompt_attention)
    padded_q = -(-q_len // tile_size) * tile_size
    padded_k = -(-k_len // tile_size) * tile_size
    qs, qb, qi = _pad_labels(q_segment.long(), q_block.long(), q_index.long(), padded_q)
    ks, kb, ki = _pad_labels(k_segment.long(), k_block.long(), k_index.long(), padded_k)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(qs[b, q_idx], qb[b, q_idx], qi[b, q_idx], ks[b, kv_idx], kb[b, kv_idx], ki[b, kv_idx],
                       prompt_attention)

    return create_block_mask(
        mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=k_len, device=q_segment.device, BLOCK_SIZE=tile_size
    )


def block_diffusion_mask(
    segment_ids: torch.Tensor, block_size: int, prompt_attention: str = "block_causal"
) -> torch.Tensor:
    """Full ``[batch, 1, L, L]`` mask of a sequence labelled by ``segment_ids`` (training layout or a prefill)."""
    block_ids = block_ids_from_segments(segment_ids, block_size)
    return attention_mask_from_labels(segment_ids, block_ids, segment_ids, block_ids, prompt_attention)


def shifted_source_columns(segment_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Under shifted prediction (DESIGN 4.1), the column whose hidden state predicts each noisy token.

    For the noisy token at response offset j (block b = j // B): offset j - 1's noisy column when j % B != 0; for the
    first token of a block, the last prefix column (j = 0) or the clean column of offset j - 1 (the last token of
    clean block b - 1, which sees only clean context: exactly the AR prediction). The last noisy token of a block
    predicts nothing. Sources are unique, but not in the column order of their targets.

    Args:
        segment_ids: ``[batch, L]`` labels of a packed row ``[prefix ; x0 ; xt]`` (segments in any column order; each
            is counted in column order).
        block_size: B.

    Returns:
        ``[batch, L]`` long: the source column at every noisy position, -1 elsewhere and where the source is missing
        (a row without prefix, or fewer clean than noisy tokens).
    """
    if block_size < 1:
        raise ValueError(f"`block_size` must be >= 1, got {block_size}.")
    batch, length = segment_ids.shape
    columns = torch.arange(length, device=segment_ids.device).expand(batch, length)  # [batch, L]

    def column_of_rank(label: int) -> torch.Tensor:
        # [batch, L + 1]: entry r is the column of the segment's r-th token (-1 if none); slot L collects the rest
        inside = segment_ids == label
        rank = torch.where(inside, inside.long().cumsum(-1) - 1, length)
        table = torch.full((batch, length + 1), -1, dtype=torch.long, device=segment_ids.device)
        return table.scatter(1, rank, torch.where(inside, columns, -1))

    is_noisy = segment_ids == NOISY
    offset = is_noisy.long().cumsum(-1) - 1  # [batch, L], response offset j of each noisy token
    previous = (offset - 1).clamp(min=0)
    from_noisy = column_of_rank(NOISY).gather(1, previous)  # noisy column of offset j - 1
    from_clean = column_of_rank(CLEAN).gather(1, previous)  # clean column of offset j - 1
    last_prefix = torch.where(segment_ids == PREFIX, columns, -1).amax(-1, keepdim=True).expand(batch, length)
    source = torch.where(offset % block_size != 0, from_noisy, torch.where(offset == 0, last_prefix, from_clean))
    return torch.where(is_noisy, source, -1)


def packed_segment_ids(prefix_attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Segments of the packed training row ``[prefix ; x0 ; xt]`` (DESIGN 3.1).

    Args:
        prefix_attention_mask: ``[batch, P]``, 1 on real prefix tokens (left padding: zeros first).
        response_mask: ``[batch, R]``, 1 on the (EOS-padded) response tokens (right padding: zeros last).

    Returns:
        ``[batch, P + 2R]`` segments: prefix, then x0 (``CLEAN``), then xt (``NOISY``); padding is ``PAD``.
    """
    prefix = torch.where(prefix_attention_mask.bool(), PREFIX, PAD)
    clean = torch.where(response_mask.bool(), CLEAN, PAD)
    noisy = torch.where(response_mask.bool(), NOISY, PAD)
    return torch.cat([prefix, clean, noisy], dim=1).long()


def response_position_ids(prefix_position_ids: torch.Tensor, prefix_attention_mask: torch.Tensor, length: int):
    """M-RoPE positions ``[3, batch, length]`` of the response tokens that follow a prompt (DESIGN 2).

    A response token at offset j gets ``prompt_len + j + rope_delta`` on all three axes, which equals
    ``max(prompt positions) + 1 + j``.
    """
    real = prefix_attention_mask.bool()[None]  # [1, batch, P]
    masked = prefix_position_ids.masked_fill(~real, torch.iinfo(prefix_position_ids.dtype).min)
    start = masked.amax(dim=(0, 2)) + 1  # [batch]
    start = torch.where(real[0].any(-1), start, torch.zeros_like(start))
    offsets = torch.arange(length, device=prefix_position_ids.device)
    pos = start[:, None] + offsets[None, :]  # [batch, length]
    return pos[None].expand(3, -1, -1).to(prefix_position_ids.dtype)


def packed_position_ids(prefix_position_ids: torch.Tensor, prefix_attention_mask: torch.Tensor, response_length: int):
    """Positions ``[3, batch, P + 2R]`` of the packed row: prefix as given, x0 after it, xt a copy of x0 (DESIGN 3.1)."""
    response = response_position_ids(prefix_position_ids, prefix_attention_mask, response_length)
    return torch.cat([prefix_position_ids, response, response], dim=-1)


__all__ = [
    "PAD",
    "PREFIX",
    "CLEAN",
    "NOISY",
    "block_ids_from_segments",
    "attention_mask_from_labels",
    "visible",
    "block_diffusion_block_mask",
    "block_diffusion_mask",
    "packed_segment_ids",
    "shifted_source_columns",
    "response_position_ids",
    "packed_position_ids",
]
