"""Masks and block ids (DESIGN 3.2) against slow references that decide every query/key pair with explicit loops."""

import math

import pytest
import torch

from transformers_bard.models.bard_vl import (
    CLEAN,
    NOISY,
    PAD,
    PREFIX,
    attention_mask_from_labels,
    block_diffusion_block_mask,
    block_diffusion_mask,
    block_ids_from_segments,
    packed_position_ids,
    packed_segment_ids,
)


def describe_packed(col, P, R, P_max, R_max, B):
    """(role, block, rank) of column `col` of a packed row, straight from DESIGN 3.1/3.2."""
    if col < P_max:
        i = col - (P_max - P)
        return ("pad", None, None) if i < 0 else ("prefix", i // B, i)
    j = col - P_max
    role = "clean"
    if j >= R_max:
        j -= R_max
        role = "noisy"
    if j >= R:
        return ("pad", None, None)
    return (role, math.ceil(P / B) + j // B, j)


def allowed(q, k, qcol, kcol, prompt_attention):
    q_role, q_block, q_rank = q
    k_role, k_block, k_rank = k
    if q_role == "pad":
        return qcol == kcol
    if k_role == "pad":
        return False
    if q_role == "prefix" and prompt_attention == "causal":
        return k_role == "prefix" and k_rank <= q_rank
    if q_role in ("prefix", "clean"):
        return k_role in ("prefix", "clean") and k_block <= q_block
    # noisy query
    if k_role == "prefix":
        return True
    if k_role == "clean":
        return k_block < q_block
    return k_block == q_block


def slow_packed_mask(prefix_lens, response_lens, B, prompt_attention):
    P_max, R_max = max(prefix_lens), max(response_lens)
    L = P_max + 2 * R_max
    out = torch.zeros(len(prefix_lens), 1, L, L, dtype=torch.bool)
    for row, (P, R) in enumerate(zip(prefix_lens, response_lens)):
        labels = [describe_packed(c, P, R, P_max, R_max, B) for c in range(L)]
        for qc in range(L):
            for kc in range(L):
                out[row, 0, qc, kc] = allowed(labels[qc], labels[kc], qc, kc, prompt_attention)
    return out


def packed_inputs(prefix_lens, response_lens):
    P_max, R_max = max(prefix_lens), max(response_lens)
    prefix_att = torch.zeros(len(prefix_lens), P_max, dtype=torch.long)
    resp = torch.zeros(len(prefix_lens), R_max, dtype=torch.long)
    for row, (P, R) in enumerate(zip(prefix_lens, response_lens)):
        prefix_att[row, P_max - P:] = 1
        resp[row, :R] = 1
    return prefix_att, resp


@pytest.mark.parametrize("prompt_attention", ["block_causal", "causal"])
@pytest.mark.parametrize("B", [1, 3, 4, 8])
def test_packed_mask_matches_loops(B, prompt_attention):
    prefix_lens = [7, 2, 9]
    response_lens = [2 * B, B, 3 * B]
    prefix_att, resp = packed_inputs(prefix_lens, response_lens)
    seg = packed_segment_ids(prefix_att, resp)
    fast = block_diffusion_mask(seg, B, prompt_attention)
    slow = slow_packed_mask(prefix_lens, response_lens, B, prompt_attention)
    assert fast.shape == slow.shape
    assert torch.equal(fast, slow)
    assert fast.any(-1).all(), "no all-False rows (SDPA would give NaN)"


def test_block_ids_match_loops():
    B = 4
    prefix_lens, response_lens = [6, 3], [8, 4]
    prefix_att, resp = packed_inputs(prefix_lens, response_lens)
    seg = packed_segment_ids(prefix_att, resp)
    ids = block_ids_from_segments(seg, B)
    P_max, R_max = max(prefix_lens), max(response_lens)
    for row, (P, R) in enumerate(zip(prefix_lens, response_lens)):
        for c in range(seg.shape[1]):
            role, block, _ = describe_packed(c, P, R, P_max, R_max, B)
            assert ids[row, c].item() == (-1 if role == "pad" else block)


def test_hand_written_small_mask():
    """P = 3, R = 2, B = 2: prefix blocks {0,0},{1}; clean block 2; noisy block 2."""
    seg = torch.tensor([[PREFIX, PREFIX, PREFIX, CLEAN, CLEAN, NOISY, NOISY]])
    expected = torch.tensor(
        [
            # p0 p1 p2 c0 c1 n0 n1
            [1, 1, 0, 0, 0, 0, 0],  # p0 block 0
            [1, 1, 0, 0, 0, 0, 0],  # p1 block 0
            [1, 1, 1, 0, 0, 0, 0],  # p2 block 1
            [1, 1, 1, 1, 1, 0, 0],  # c0 block 2
            [1, 1, 1, 1, 1, 0, 0],  # c1
            [1, 1, 1, 0, 0, 1, 1],  # n0 block 2: prefix + own noisy block
            [1, 1, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(block_diffusion_mask(seg, 2)[0, 0], expected)
    causal = expected.clone()
    causal[0, 1] = False  # p0 cannot see p1 with causal prompts
    assert torch.equal(block_diffusion_mask(seg, 2, "causal")[0, 0], causal)


@pytest.mark.parametrize("prompt_attention", ["block_causal", "causal"])
def test_fused_commit_and_next_block_mask(prompt_attention):
    """Decoding: cache = left-padded prompt + committed blocks; new = clean block b then noisy block b+1."""
    B, P_max = 4, 6
    prefix_lens = [6, 3]
    committed = 1  # blocks already in the cache
    rows_q_seg, rows_q_blk, rows_k_seg, rows_k_blk = [], [], [], []
    for P in prefix_lens:
        first = math.ceil(P / B)
        k_seg = [PAD] * (P_max - P) + [PREFIX] * P + [CLEAN] * (committed * B)
        k_blk = [-1] * (P_max - P) + [i // B for i in range(P)] + [first] * B
        q_seg = [CLEAN] * B + [NOISY] * B
        q_blk = [first + 1] * B + [first + 2] * B
        rows_q_seg.append(q_seg)
        rows_q_blk.append(q_blk)
        rows_k_seg.append(k_seg + q_seg)
        rows_k_blk.append(k_blk + q_blk)
    t = torch.tensor
    mask = attention_mask_from_labels(
        t(rows_q_seg), t(rows_q_blk), t(rows_k_seg), t(rows_k_blk), prompt_attention
    )
    K = P_max + committed * B + 2 * B
    for row, P in enumerate(prefix_lens):
        for q in range(2 * B):
            for k in range(K):
                if k < P_max - P:
                    want = False  # left padding
                elif k < P_max + committed * B:
                    want = True  # the whole cache
                elif k < P_max + committed * B + B:
                    want = True  # clean block b: visible to its own rows and to noisy b+1
                else:
                    want = q >= B  # noisy b+1 only to itself
                assert mask[row, 0, q, k].item() == want, (row, q, k)


def test_packed_position_ids_continue_prompt_and_copy_x0():
    prefix_pos = torch.tensor([[[0, 0, 1, 2], [0, 0, 1, 1]]]).expand(3, -1, -1).clone()
    prefix_pos[1, 0, 2:] = torch.tensor([5, 3])  # an image may push h/w positions past t
    prefix_att = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    pos = packed_position_ids(prefix_pos, prefix_att, 3)
    # row 0 real prefix positions max 5 -> response starts at 6; row 1 max 1 -> 2
    assert pos[:, 0, 4:7].tolist() == [[6, 7, 8]] * 3
    assert torch.equal(pos[:, :, 4:7], pos[:, :, 7:10])
    assert pos[:, 1, 4:7].tolist() == [[2, 3, 4]] * 3


def test_bad_arguments():
    seg = torch.tensor([[PREFIX, CLEAN]])
    with pytest.raises(ValueError, match="block_size"):
        block_ids_from_segments(seg, 0)
    with pytest.raises(ValueError, match="prompt_attention"):
        block_diffusion_mask(seg, 2, "full")


# ---------------------------------------------------------------------- shifted prediction (DESIGN 4.1, issue 13)
@pytest.mark.parametrize("B", [1, 2, 4])
def test_shifted_source_columns_match_the_rule(B):
    """Every noisy token's source column, from DESIGN 4.1 by hand: offset j takes noisy j - 1 inside a block, the
    clean j - 1 at a block start, the last prompt column at j = 0; nothing else has a source."""
    from transformers_bard.models.bard_vl.masking_bard_vl import shifted_source_columns

    prefix_lens, response_lens = [7, 2, 5], [2 * B, B, 3 * B]
    prefix_att, resp = packed_inputs(prefix_lens, response_lens)
    seg = packed_segment_ids(prefix_att, resp)
    sources = shifted_source_columns(seg, B)
    P_max, R_max = max(prefix_lens), max(response_lens)
    for row, (P, R) in enumerate(zip(prefix_lens, response_lens)):
        for c in range(seg.shape[1]):
            role, _, j = describe_packed(c, P, R, P_max, R_max, B)
            if role != "noisy":
                want = -1
            elif j % B:
                want = P_max + R_max + j - 1  # the noisy token before it, in its own block
            elif j == 0:
                want = P_max - 1  # the last prompt token (prompts are left-padded)
            else:
                want = P_max + j - 1  # the last clean token of the previous block
            assert sources[row, c].item() == want, (row, c)
    # one target per source: the hidden states are distinct, so the gathered logits are too
    for row in range(len(prefix_lens)):
        used = sources[row][sources[row] >= 0]
        assert used.unique().numel() == used.numel()


def test_shifted_source_columns_without_prompt_or_clean_tokens():
    from transformers_bard.models.bard_vl.masking_bard_vl import shifted_source_columns

    seg = torch.tensor([[NOISY, NOISY, NOISY], [PREFIX, NOISY, NOISY]])
    # row 0: no prompt, so offset 0 has no source, and offset 2 starts block 1 without a clean block 0 before it
    assert shifted_source_columns(seg, 2).tolist() == [[-1, 0, -1], [-1, 0, 1]]
    with pytest.raises(ValueError, match="block_size"):
        shifted_source_columns(seg, 0)


# ---------------------------------------------------------------------- FlexAttention BlockMask (issue 20)
def dense_from_block_mask(block_mask, q_len, k_len):
    """What flex attention computes from a BlockMask: ``mask_mod`` inside the tiles the BlockMask lists (partial or
    full), False in every tile it skips. ``[batch, 1, q, k]``."""
    from torch.nn.attention.flex_attention import create_mask

    tile_q, tile_k = block_mask.BLOCK_SIZE
    inside = create_mask(block_mask.mask_mod, block_mask.shape[0], 1, q_len, k_len)  # [batch, 1, q, k]
    tiles = block_mask.to_dense().bool()  # [batch, 1, q tiles, k tiles]: listed tiles
    listed = tiles.repeat_interleave(tile_q, 2).repeat_interleave(tile_k, 3)[:, :, :q_len, :k_len]
    return inside & listed


@pytest.mark.parametrize("prompt_attention", ["block_causal", "causal"])
@pytest.mark.parametrize("B", [1, 4, 8])
def test_flex_block_mask_equals_the_loop_mask_and_skips_empty_tiles(B, prompt_attention):
    """The BlockMask of a packed batch gives exactly the loop reference's mask, and lists only tiles that hold a
    visible pair: with 8 x 8 tiles the prompt's queries never list the noisy half, so tiles are skipped."""
    prefix_lens = [37, 5, 20]
    response_lens = [2 * B + 8, B, 3 * B]
    prefix_att, resp = packed_inputs(prefix_lens, response_lens)
    seg = packed_segment_ids(prefix_att, resp)
    blocks = block_ids_from_segments(seg, B)
    block_mask = block_diffusion_block_mask(seg, blocks, seg, blocks, prompt_attention, tile_size=8)
    L = seg.shape[1]
    slow = slow_packed_mask(prefix_lens, response_lens, B, prompt_attention)
    assert torch.equal(dense_from_block_mask(block_mask, L, L), slow)
    tiles = block_mask.to_dense().bool()
    padded = torch.nn.functional.pad(slow, (0, -L % 8, 0, -L % 8))
    any_visible = padded.unflatten(2, (-1, 8)).unflatten(4, (-1, 8)).any(dim=(3, 5))  # [batch, 1, q tiles, k tiles]
    assert torch.equal(tiles, any_visible), "a tile is listed iff some query in it sees some key in it"
    assert not tiles.all(), "nothing skipped: the BlockMask is not sparse"


@pytest.mark.parametrize("prompt_attention", ["block_causal", "causal"])
def test_flex_block_mask_after_a_cache_equals_the_dense_mask(prompt_attention):
    """Decoding layout: queries (a clean block then a noisy block) after cached keys, lengths not multiples of the
    tile (the labels are padded with PAD tokens, so mask_mod never reads past them)."""
    B = 4
    t = torch.tensor
    k_seg = t([[PAD, PAD, PREFIX, PREFIX, PREFIX, PREFIX, CLEAN, CLEAN, CLEAN, CLEAN],
               [PREFIX, PREFIX, PREFIX, PREFIX, PREFIX, PREFIX, PAD, PAD, PAD, PAD]])
    k_blk = t([[-1, -1, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, -1, -1, -1, -1]])
    q_seg = t([[CLEAN] * B + [NOISY] * B, [PAD] * B + [NOISY] * B])
    q_blk = t([[2] * B + [3] * B, [-1] * B + [2] * B])
    keys_seg, keys_blk = torch.cat([k_seg, q_seg], 1), torch.cat([k_blk, q_blk], 1)
    dense = attention_mask_from_labels(q_seg, q_blk, keys_seg, keys_blk, prompt_attention)
    for tile in (4, 8, 128):
        block_mask = block_diffusion_block_mask(q_seg, q_blk, keys_seg, keys_blk, prompt_attention, tile_size=tile)
        assert block_mask.shape == (2, 1, 2 * B, keys_seg.shape[1])
        assert torch.equal(dense_from_block_mask(block_mask, 2 * B, keys_seg.shape[1]), dense)
