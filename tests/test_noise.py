"""Tests of MixedNoiseScheduler (DESIGN 3.3) against slow loop references and sampling statistics."""

import json
import math
import os

import pytest
import torch

from transformers_bard.noise import CONFIG_NAME, MixedNoiseScheduler, NoiseOutput

MASK_ID = 3
# Ids 0-3 play the special tokens (3 is the mask); substitutes come from the ordinary ids 10..59.
ORDINARY_IDS = torch.arange(10, 60)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ref_mix_probabilities(t, floor=0.001):
    phi = math.pi / 2 * t
    probs = [1 - math.cos(phi), math.sin(phi) + math.cos(phi) - 1, 1 - math.sin(phi)]
    probs = [max(p, floor) for p in probs]
    total = sum(probs)
    return [p / total for p in probs]


def batch_of(lengths, width, token=20):
    """x0 filled with `token` on each row's response (right-padded with 0), and its response mask."""
    x0 = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        x0[row, :length] = token
        mask[row, :length] = True
    return x0, mask


def assert_close_in_sigma(count, trials, p, sigmas=4.0):
    sigma = math.sqrt(trials * p * (1 - p))
    assert abs(count - trials * p) <= sigmas * sigma + 1, (count, trials, p)


# ---------------------------------------------------------------------------- block rates


def test_sample_block_rates_matches_loop_reference():
    scheduler = MixedNoiseScheduler(min_rate=0.2, max_rate=0.7)
    num_blocks = torch.tensor([1, 5, 0, 3, 7, 7])
    rates = scheduler.sample_block_rates(num_blocks, 8, generator=gen(1))

    # The reference replays the same two draws (u, then the permutation keys) and applies DESIGN 3.3 with loops.
    g = gen(1)
    u = torch.rand(6, 8, generator=g)
    keys = torch.rand(6, 8, generator=g)
    expected = torch.zeros(6, 8)
    for row, n in enumerate(num_blocks.tolist()):
        t = [min(max(u[row, k].item(), 0.2), 0.7) / n + k / n for k in range(n)]
        order = sorted(range(n), key=lambda k: keys[row, k].item())
        for slot, block in enumerate(order):
            expected[row, slot] = t[block]
    torch.testing.assert_close(rates, expected)


@pytest.mark.parametrize("min_rate,max_rate", [(0.001, 1.0), (0.1, 0.5)])
def test_block_rates_are_stratified_and_bounded(min_rate, max_rate):
    scheduler = MixedNoiseScheduler(min_rate=min_rate, max_rate=max_rate)
    g = gen(2)
    num_blocks = torch.randint(0, 13, (500,), generator=g)
    rates = scheduler.sample_block_rates(num_blocks, 12, generator=g)
    assert rates.shape == (500, 12) and rates.dtype == torch.float32
    for row, n in enumerate(num_blocks.tolist()):
        assert torch.all(rates[row, n:] == 0)
        ordered = sorted(rates[row, :n].tolist())
        for k, t in enumerate(ordered):
            # One sorted rate per interval [k/n, (k+1)/n], inside the clamp of u.
            assert k / n + min_rate / n - 1e-6 <= t <= k / n + max_rate / n + 1e-6, (row, n, k, t)


def test_block_rate_permutation_is_uniform():
    scheduler = MixedNoiseScheduler()
    rows = 6000
    rates = scheduler.sample_block_rates(torch.full((rows,), 3), 3, generator=gen(3))
    # The ranks of the three blocks form a permutation; each of the 3! orders should appear 1/6 of the time.
    orders = rates.argsort(dim=1)
    counts = {}
    for order in orders.tolist():
        counts[tuple(order)] = counts.get(tuple(order), 0) + 1
    assert len(counts) == 6
    for count in counts.values():
        assert_close_in_sigma(count, rows, 1 / 6)


def test_sample_block_rates_validation():
    scheduler = MixedNoiseScheduler()
    with pytest.raises(ValueError, match="max_blocks"):
        scheduler.sample_block_rates(torch.tensor([4]), 3)
    with pytest.raises(ValueError, match="num_blocks"):
        scheduler.sample_block_rates(torch.tensor([[1]]), 3)


# ---------------------------------------------------------------------------- mix probabilities


@pytest.mark.parametrize("t", [0.0, 0.001, 0.05, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_mix_probabilities_match_formula(t):
    scheduler = MixedNoiseScheduler()
    p_mask, p_random, p_keep = scheduler.mix_probabilities(torch.tensor([t]))
    expected = ref_mix_probabilities(t)
    torch.testing.assert_close(torch.stack([p_mask[0], p_random[0], p_keep[0]]), torch.tensor(expected))
    assert abs(sum(expected) - 1) < 1e-9


def test_mix_probabilities_floor_is_configurable():
    p_mask, p_random, p_keep = MixedNoiseScheduler(mix_min_prob=0.1).mix_probabilities(0.0)
    # At t = 0: (0, 0, 1) -> clamped (0.1, 0.1, 1) -> renormalised by 1.2.
    torch.testing.assert_close(torch.stack([p_mask, p_random, p_keep]), torch.tensor([0.1, 0.1, 1.0]) / 1.2)


# ---------------------------------------------------------------------------- add_noise


def test_add_noise_mix_matches_loop_reference():
    scheduler = MixedNoiseScheduler(prior="mix")
    lengths, block = [8, 4, 0, 12], 4
    g = gen(5)
    x0 = torch.randint(10, 60, (4, 12), generator=g)
    _, response_mask = batch_of(lengths, 12)
    out = scheduler.add_noise(x0, response_mask, block, MASK_ID, ORDINARY_IDS, generator=gen(6))

    # Replay the draws in the documented order: block rates, one uniform per token, one substitute index per token.
    g = gen(6)
    block_rates = scheduler.sample_block_rates(torch.tensor(lengths) // block, 3, generator=g)
    draw = torch.rand(4, 12, generator=g)
    picks = torch.randint(len(ORDINARY_IDS), (4, 12), generator=g)
    for row, length in enumerate(lengths):
        for col in range(12):
            if col >= length:
                assert out.rates[row, col] == 0 and not out.corrupted[row, col] and not out.masked[row, col]
                assert out.noisy_input_ids[row, col] == x0[row, col]
                continue
            t = block_rates[row, col // block].item()
            p_mask, p_random, _ = ref_mix_probabilities(t)
            u = draw[row, col].item()
            assert out.rates[row, col].item() == pytest.approx(t)
            if u < p_mask:
                expected, masked, corrupted = MASK_ID, True, True
            elif u < p_mask + p_random:
                expected, masked, corrupted = ORDINARY_IDS[picks[row, col]].item(), False, True
            else:
                expected, masked, corrupted = x0[row, col].item(), False, False
            assert out.noisy_input_ids[row, col].item() == expected
            assert out.masked[row, col].item() == masked
            assert out.corrupted[row, col].item() == corrupted


def fixed_rate_noise(prior, rates_per_block, block=4000, seed=7, **kwargs):
    """One row with one huge block per rate, so each block gives a frequency estimate at a fixed t."""
    scheduler = MixedNoiseScheduler(prior=prior, **kwargs)
    width = block * len(rates_per_block)
    x0, response_mask = batch_of([width], width)
    out = scheduler.add_noise(
        x0, response_mask, block, MASK_ID, ORDINARY_IDS, generator=gen(seed), rates=torch.tensor([rates_per_block])
    )
    return x0, out


def test_mask_prior_frequency_matches_rate():
    rates = [0.01, 0.25, 0.5, 0.9, 1.0]
    x0, out = fixed_rate_noise("mask", rates)
    for k, t in enumerate(rates):
        chunk = slice(k * 4000, (k + 1) * 4000)
        assert_close_in_sigma(int(out.masked[0, chunk].sum()), 4000, t)
    # Mask prior: corrupted == masked, and every position is either the mask token or the clean token.
    assert torch.equal(out.corrupted, out.masked)
    assert torch.equal(out.noisy_input_ids, torch.where(out.masked, MASK_ID, x0))


def test_uniform_prior_frequency_matches_rate():
    rates = [0.1, 0.6, 1.0]
    x0, out = fixed_rate_noise("uniform", rates)
    assert not out.masked.any()
    for k, t in enumerate(rates):
        chunk = slice(k * 4000, (k + 1) * 4000)
        assert_close_in_sigma(int(out.corrupted[0, chunk].sum()), 4000, t)


@pytest.mark.parametrize("t", [0.02, 0.3, 0.6, 0.95])
def test_mix_prior_frequencies_match_formula(t):
    x0, out = fixed_rate_noise("mix", [t], block=20000, seed=8)
    p_mask, p_random, p_keep = ref_mix_probabilities(t)
    masked = int(out.masked.sum())
    substituted = int((out.corrupted & ~out.masked).sum())
    kept = int((~out.corrupted).sum())
    assert_close_in_sigma(masked, 20000, p_mask)
    assert_close_in_sigma(substituted, 20000, p_random)
    assert_close_in_sigma(kept, 20000, p_keep)
    assert torch.equal(out.noisy_input_ids[~out.corrupted], x0[~out.corrupted])


@pytest.mark.parametrize("prior", ["mix", "uniform"])
def test_substitutes_come_only_from_ordinary_vocabulary(prior):
    # t = 0.5 maximises the mix prior's substitution probability (it is 0 at t = 1).
    x0, out = fixed_rate_noise(prior, [0.5, 0.6], block=5000)
    substituted = out.corrupted & ~out.masked
    drawn = out.noisy_input_ids[substituted]
    assert drawn.numel() > 1000
    assert torch.isin(drawn, ORDINARY_IDS).all()
    # Neither the mask token nor the other special ids (0..9) are ever drawn; the draw covers the vocabulary.
    assert not torch.isin(drawn, torch.arange(10)).any()
    assert set(drawn.tolist()) == set(ORDINARY_IDS.tolist())
    assert torch.equal(out.noisy_input_ids == MASK_ID, out.masked)


def test_substitute_equal_to_clean_token_still_counts_as_corrupted():
    scheduler = MixedNoiseScheduler(prior="uniform", min_rate=1.0)
    x0, response_mask = batch_of([8], 8, token=20)
    # One block of 8 tokens: with min_rate = 1 its rate is exactly 1, so every token is substituted.
    out = scheduler.add_noise(x0, response_mask, 8, MASK_ID, torch.tensor([20]), generator=gen(0))
    assert torch.all(out.rates == 1.0)
    # Every draw coincides with the clean token: the input is unchanged, yet all positions are supervised.
    assert torch.equal(out.noisy_input_ids, x0)
    assert out.corrupted.all()


@pytest.mark.parametrize("prior", ["mask", "mix", "uniform"])
def test_no_corruption_outside_response(prior):
    scheduler = MixedNoiseScheduler(prior=prior, min_rate=1.0)  # t_k as high as stratification allows
    lengths = [16, 4, 8, 0, 12]
    # Wide padding: the mix prior's probability floor must not leak corruption into it either.
    x0, response_mask = batch_of(lengths, 4000)
    x0[~response_mask] = 7
    out = scheduler.add_noise(x0, response_mask, 4, MASK_ID, ORDINARY_IDS, generator=gen(9))
    assert isinstance(out, NoiseOutput)
    assert not (out.corrupted & ~response_mask).any()
    assert not (out.masked & ~response_mask).any()
    assert torch.all(out.noisy_input_ids[~response_mask] == 7)
    assert torch.all(out.rates[~response_mask] == 0)
    assert torch.all(out.rates[response_mask] > 0)
    assert not (out.masked & ~out.corrupted).any()
    # Rates are constant inside each block.
    for row, length in enumerate(lengths):
        for start in range(0, length, 4):
            assert torch.all(out.rates[row, start : start + 4] == out.rates[row, start])


@pytest.mark.parametrize("prior", ["mask", "mix", "uniform"])
def test_seeded_reproducibility(prior):
    scheduler = MixedNoiseScheduler(prior=prior)
    x0, response_mask = batch_of([16, 8, 12], 16)
    first = scheduler.add_noise(x0, response_mask, 4, MASK_ID, ORDINARY_IDS, generator=gen(11))
    second = scheduler.add_noise(x0, response_mask, 4, MASK_ID, ORDINARY_IDS, generator=gen(11))
    other = scheduler.add_noise(x0, response_mask, 4, MASK_ID, ORDINARY_IDS, generator=gen(12))
    for name in ("noisy_input_ids", "corrupted", "masked", "rates"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert not torch.equal(first.rates, other.rates)


def test_precomputed_rates_are_reused():
    scheduler = MixedNoiseScheduler(prior="mix")
    x0, response_mask = batch_of([8, 4], 8)
    fresh = scheduler.add_noise(x0, response_mask, 4, MASK_ID, ORDINARY_IDS, generator=gen(13))
    g = gen(13)
    rates = scheduler.sample_block_rates(torch.tensor([2, 1]), 2, generator=g)
    reused = scheduler.add_noise(x0, response_mask, 4, MASK_ID, ORDINARY_IDS, generator=g, rates=rates)
    for name in ("noisy_input_ids", "corrupted", "masked", "rates"):
        assert torch.equal(getattr(fresh, name), getattr(reused, name))
    with pytest.raises(ValueError, match="rates"):
        scheduler.add_noise(x0, response_mask, 4, MASK_ID, ORDINARY_IDS, rates=torch.ones(2, 3))


def test_prior_switches_at_fraction():
    scheduler = MixedNoiseScheduler(prior="mask", switch_prior="mix", switch_at=0.25)
    assert scheduler.prior_at(0.0) == "mask"
    assert scheduler.prior_at(0.2499) == "mask"
    assert scheduler.prior_at(0.25) == "mix"
    assert scheduler.prior_at(1.0) == "mix"
    assert MixedNoiseScheduler(prior="uniform").prior_at(0.9) == "uniform"
    with pytest.raises(ValueError, match="progress"):
        scheduler.prior_at(1.5)

    x0, response_mask = batch_of([4000], 4000)
    rates = torch.full((1, 1), 0.6)
    before = scheduler.add_noise(x0, response_mask, 4000, MASK_ID, ORDINARY_IDS, gen(0), progress=0.1, rates=rates)
    after = scheduler.add_noise(x0, response_mask, 4000, MASK_ID, ORDINARY_IDS, gen(0), progress=0.5, rates=rates)
    assert torch.equal(before.corrupted, before.masked)  # mask prior: no substitutes
    assert (after.corrupted & ~after.masked).sum() > 100  # mix prior: substitutes appear


def test_save_and_load_round_trip(tmp_path):
    scheduler = MixedNoiseScheduler(
        prior="mask", min_rate=0.1, max_rate=0.5, switch_prior="mix", switch_at=0.3, mix_min_prob=0.01
    )
    path = scheduler.save_pretrained(tmp_path / "sched")
    assert os.path.basename(path) == CONFIG_NAME
    assert os.listdir(tmp_path / "sched") == [CONFIG_NAME]  # the temporary file was renamed away
    with open(path) as handle:
        saved = json.load(handle)
    assert saved["_class_name"] == "MixedNoiseScheduler" and saved["switch_at"] == 0.3
    loaded = MixedNoiseScheduler.from_pretrained(tmp_path / "sched")
    assert loaded == scheduler
    assert MixedNoiseScheduler.from_dict(scheduler.to_dict()) == scheduler
    # Saving again overwrites in place.
    MixedNoiseScheduler().save_pretrained(tmp_path / "sched")
    assert MixedNoiseScheduler.from_pretrained(tmp_path / "sched") == MixedNoiseScheduler()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        MixedNoiseScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="bogus"):
        MixedNoiseScheduler.from_dict({"prior": "mask", "bogus": 1})


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"prior": "gaussian"}, "prior"),
        ({"switch_prior": "gaussian", "switch_at": 0.5}, "switch_prior"),
        ({"min_rate": -0.1}, "min_rate"),
        ({"max_rate": 1.5}, "max_rate"),
        ({"min_rate": 0.6, "max_rate": 0.5}, "min_rate"),
        ({"switch_prior": "mix"}, "switch_at"),
        ({"switch_at": 0.5}, "switch_prior"),
        ({"switch_prior": "mix", "switch_at": 2.0}, "switch_at"),
        ({"mix_min_prob": 0.5}, "mix_min_prob"),
        ({"min_rate": True}, "min_rate"),
    ],
)
def test_constructor_validation(kwargs, field):
    with pytest.raises(ValueError, match=field) as error:
        MixedNoiseScheduler(**kwargs)
    # The message also shows the offending value.
    assert any(repr(value) in str(error.value) or str(value) in str(error.value) for value in kwargs.values())


def test_add_noise_validation():
    mix = MixedNoiseScheduler(prior="mix")
    x0, response_mask = batch_of([8, 6], 8)
    with pytest.raises(ValueError, match="multiple of block_size"):
        mix.add_noise(x0, response_mask, 4, MASK_ID, ORDINARY_IDS)
    x0, response_mask = batch_of([8, 4], 8)
    with pytest.raises(ValueError, match="random_token_ids"):
        mix.add_noise(x0, response_mask, 4, MASK_ID)
    with pytest.raises(ValueError, match="mask token"):
        mix.add_noise(x0, response_mask, 4, MASK_ID, torch.tensor([MASK_ID, 11]))
    holes = response_mask.clone()
    holes[0, 1] = False
    with pytest.raises(ValueError, match="contiguous"):
        mix.add_noise(x0, holes, 4, MASK_ID, ORDINARY_IDS)
    with pytest.raises(ValueError, match="block_size"):
        mix.add_noise(x0, response_mask, 0, MASK_ID, ORDINARY_IDS)
    # The mask prior needs no substitute vocabulary.
    MixedNoiseScheduler().add_noise(x0, response_mask, 4, MASK_ID)
