"""Per-block, stratified noise for block-diffusion training (DESIGN 3.3).

`MixedNoiseScheduler` is shaped like a diffusers scheduler: a small, JSON-serialisable config object whose
`add_noise` turns a clean response `x0` into its noised copy `xt`. It knows nothing about models or tokenizers; the
caller passes the mask token id and the ordinary vocabulary to draw random substitutes from. Every random draw goes
through the `torch.Generator` passed in, so a seeded generator reproduces the noise exactly.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields

import torch

PRIORS = ("mask", "mix", "uniform")
CONFIG_NAME = "noise_scheduler_config.json"


@dataclass
class NoiseOutput:
    """Result of `MixedNoiseScheduler.add_noise`. All tensors are `[batch, R]`, aligned with `x0`.

    noisy_input_ids: x_t, the noised response (`<|mask|>`, random substitutes or clean tokens).
    corrupted: positions the loss supervises: masked or substituted (DESIGN 3.4). Never True outside the response.
    masked: positions holding the mask token (a subset of `corrupted`).
    rates: t of each token's block; 0 outside the response.
    """

    noisy_input_ids: torch.LongTensor
    corrupted: torch.BoolTensor
    masked: torch.BoolTensor
    rates: torch.FloatTensor


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class MixedNoiseScheduler:
    """Noise scheduler of DESIGN 3.3: per-block stratified rates and a `mask`, `mix` or `uniform` prior.

    Args:
        prior: `"mask"` (each token of block k becomes `<|mask|>` with probability t_k), `"mix"` (mask / random
            token / keep with the cosine probabilities of `mix_probabilities`) or `"uniform"` (random token with
            probability t_k).
        min_rate: lower clamp of the per-block uniform draw u_k (paper default 0.001).
        max_rate: upper clamp of u_k (paper default 1.0).
        switch_prior: optional prior used once training progress reaches `switch_at` (curriculum, e.g. mask then mix).
        switch_at: fraction of training in [0, 1] from which `switch_prior` is active. Set together with
            `switch_prior`.
        mix_min_prob: floor of each `mix` probability before renormalising (paper: 0.001).

    Example:

    ```python
    >>> import torch
    >>> from transformers_bard import MixedNoiseScheduler
    >>> scheduler = MixedNoiseScheduler("mask", switch_prior="mix", switch_at=0.5)  # mask first, mixed noise later
    >>> x0 = torch.randint(10, 100, (2, 8))  # [batch, R] clean responses, R a multiple of B
    >>> noised = scheduler.add_noise(x0, torch.ones_like(x0, dtype=torch.bool), block_size=4, mask_token_id=5,
    ...                              random_token_ids=torch.arange(10, 100), generator=torch.Generator().manual_seed(0))
    >>> noised.noisy_input_ids.shape
    torch.Size([2, 8])
    >>> scheduler.save_pretrained("noise")  # reload with MixedNoiseScheduler.from_pretrained("noise")
    'noise/noise_scheduler_config.json'
    ```
    """

    prior: str = "mask"
    min_rate: float = 0.001
    max_rate: float = 1.0
    switch_prior: str | None = None
    switch_at: float | None = None
    mix_min_prob: float = 0.001

    def __post_init__(self):
        if self.prior not in PRIORS:
            raise ValueError(f"`prior` must be one of {PRIORS}, got {self.prior!r}. Use e.g. prior='mask'.")
        if self.switch_prior is not None and self.switch_prior not in PRIORS:
            raise ValueError(
                f"`switch_prior` must be None or one of {PRIORS}, got {self.switch_prior!r}. Use e.g. "
                "switch_prior='mix'."
            )
        for name in ("min_rate", "max_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}. Paper defaults: 0.001 / 1.0.")
        if self.min_rate > self.max_rate:
            raise ValueError(
                f"`min_rate` ({self.min_rate}) must not exceed `max_rate` ({self.max_rate}). Lower `min_rate` or "
                "raise `max_rate`."
            )
        if (self.switch_prior is None) != (self.switch_at is None):
            raise ValueError(
                f"`switch_prior` and `switch_at` must be set together, got switch_prior={self.switch_prior!r}, "
                f"switch_at={self.switch_at!r}. Give both (e.g. switch_prior='mix', switch_at=0.5) or neither."
            )
        if self.switch_at is not None and (not _is_number(self.switch_at) or not 0.0 <= self.switch_at <= 1.0):
            raise ValueError(
                f"`switch_at` must be a fraction of training in [0, 1], got {self.switch_at!r}. Use e.g. 0.5."
            )
        # At 1/3 all three clamped probabilities are equal; above it the floor would exceed a valid distribution.
        if not _is_number(self.mix_min_prob) or not 0.0 <= self.mix_min_prob <= 1.0 / 3.0:
            raise ValueError(
                f"`mix_min_prob` must be a number in [0, 1/3], got {self.mix_min_prob!r}. Paper default: 0.001."
            )

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        """The constructor fields as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> MixedNoiseScheduler:
        """Build from `to_dict()` output. Keys starting with `_` (file metadata) are ignored; others must be fields."""
        known = {f.name for f in fields(cls)}
        config = {key: value for key, value in config.items() if not key.startswith("_")}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"Unknown {cls.__name__} config keys {unknown}. Expected a subset of {sorted(known)}; remove the others."
            )
        return cls(**config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `noise_scheduler_config.json` into `save_directory` atomically and return its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        payload = {"_class_name": type(self).__name__, **self.to_dict()}
        # Write beside the target, then rename: a crash never leaves a half-written config behind.
        fd, tmp_path = tempfile.mkstemp(dir=save_directory, prefix=f".{CONFIG_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=2, sort_keys=True)
                handle.write("\n")
            os.replace(tmp_path, path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MixedNoiseScheduler:
        """Load from a directory written by `save_pretrained`."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {os.fspath(directory)!r}. Pass a directory written by "
                f"{cls.__name__}.save_pretrained."
            )
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    # ------------------------------------------------------------------ schedule

    def prior_at(self, progress: float) -> str:
        """Prior active at `progress` (fraction of training done, in [0, 1]); the switch happens at `switch_at`."""
        if not _is_number(progress) or not 0.0 <= progress <= 1.0:
            raise ValueError(f"`progress` must be a fraction of training in [0, 1], got {progress!r}.")
        if self.switch_prior is not None and progress >= self.switch_at:
            return self.switch_prior
        return self.prior

    def sample_block_rates(
        self,
        num_blocks: torch.LongTensor,
        max_blocks: int,
        generator: torch.Generator | None = None,
    ) -> torch.FloatTensor:
        """Stratified per-block noise rates (DESIGN 3.3).

        A row with n blocks gets t_k = u_k / n + k / n for k < n, with u_k ~ U(0, 1) clamped to [min_rate, max_rate],
        randomly permuted over its n blocks; entries at k >= n are 0. Sorted, a row's rates fall one per interval
        [k / n, (k + 1) / n], so every sequence covers all noise levels.

        Args:
            num_blocks: `[batch]` number of blocks n of each row (0 allowed: the row gets no rates).
            max_blocks: width of the output (>= every n).
            generator: source of all randomness.

        Returns:
            `[batch, max_blocks]` float32 rates.
        """
        if num_blocks.dim() != 1:
            raise ValueError(f"`num_blocks` must be 1-D [batch], got shape {tuple(num_blocks.shape)}.")
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 0:
            raise ValueError(f"`max_blocks` must be an integer >= 0, got {max_blocks!r}.")
        num_blocks = num_blocks.long()
        if num_blocks.numel() and (int(num_blocks.min()) < 0 or int(num_blocks.max()) > max_blocks):
            raise ValueError(
                f"`num_blocks` must lie in [0, max_blocks={max_blocks}], got {num_blocks.tolist()}. Raise `max_blocks`."
            )
        batch, device = num_blocks.shape[0], num_blocks.device
        block = torch.arange(max_blocks, device=device)  # [max_blocks]
        valid = block[None, :] < num_blocks[:, None]  # [batch, max_blocks]
        n = num_blocks.clamp(min=1)[:, None].float()  # [batch, 1]; clamp only avoids 0/0 on empty rows

        u = torch.rand(batch, max_blocks, generator=generator, device=device)
        u = u.clamp(self.min_rate, self.max_rate)
        stratified = (u + block[None, :].float()) / n  # [batch, max_blocks], t_k in [k/n, (k+1)/n]

        # Random permutation of each row's first n entries: sort random keys, with padding keys pushed to the end
        # (inf), so the first n sorted indices are a uniform permutation of 0..n-1.
        keys = torch.rand(batch, max_blocks, generator=generator, device=device)
        keys = keys.masked_fill(~valid, float("inf"))
        permutation = torch.sort(keys, dim=1, stable=True).indices  # [batch, max_blocks]
        rates = stratified.gather(1, permutation)
        return rates.masked_fill(~valid, 0.0)

    def mix_probabilities(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities (mask, random token, keep) of the `mix` prior at rate `t` (DESIGN 3.3).

        With phi = (pi / 2) t: p_mask = 1 - cos(phi), p_random = sin(phi) + cos(phi) - 1, p_keep = 1 - sin(phi);
        each clamped to at least `mix_min_prob`, then renormalised to sum to 1. Shapes follow `t`.
        """
        t = torch.as_tensor(t, dtype=torch.float32)
        phi = (math.pi / 2) * t.float()
        p_mask = 1 - torch.cos(phi)
        p_random = torch.sin(phi) + torch.cos(phi) - 1
        p_keep = 1 - torch.sin(phi)
        probs = torch.stack([p_mask, p_random, p_keep]).clamp(min=self.mix_min_prob)  # [3, *t.shape]
        probs = probs / probs.sum(dim=0, keepdim=True)
        return probs[0], probs[1], probs[2]

    # ------------------------------------------------------------------ noising

    def add_noise(
        self,
        x0: torch.LongTensor,
        response_mask: torch.BoolTensor,
        block_size: int,
        mask_token_id: int,
        random_token_ids: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
        progress: float = 0.0,
        rates: torch.FloatTensor | None = None,
    ) -> NoiseOutput:
        """Noise the clean responses `x0` block by block (DESIGN 3.3).

        Args:
            x0: `[batch, R]` clean response ids (real response + EOS padding, then anything past the row's end).
            response_mask: `[batch, R]` bool, True on each row's response (real + EOS padding). Each row's response
                starts at column 0, is contiguous, and its length is a multiple of `block_size`.
            block_size: B; blocks are consecutive chunks of B response tokens.
            mask_token_id: id written at masked positions.
            random_token_ids: `[V']` ordinary (non-special) vocabulary ids that random substitutes are drawn
                uniformly from. Required by the `mix` and `uniform` priors; must not contain `mask_token_id`.
            generator: source of all randomness (same seed, same output).
            progress: fraction of training done, selects the prior (`prior_at`).
            rates: optional `[batch, ceil(R / B)]` block rates (e.g. from `sample_block_rates`) to reuse instead of
                drawing new ones.

        Returns:
            `NoiseOutput` with `[batch, R]` tensors.
        """
        if x0.dim() != 2:
            raise ValueError(f"`x0` must be 2-D [batch, R], got shape {tuple(x0.shape)}.")
        if response_mask.shape != x0.shape:
            raise ValueError(
                f"`response_mask` must have the shape of `x0` {tuple(x0.shape)}, got {tuple(response_mask.shape)}."
            )
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"`block_size` must be an integer >= 1, got {block_size!r}.")
        prior = self.prior_at(progress)
        batch, width = x0.shape
        device = x0.device
        response_mask = response_mask.bool()
        max_blocks = -(-width // block_size)

        lengths = response_mask.sum(dim=1)  # [batch]
        column = torch.arange(width, device=device)  # [R]
        if not torch.equal(response_mask, column[None, :] < lengths[:, None]):
            raise ValueError(
                "`response_mask` must mark one contiguous run per row starting at column 0 (right padding)."
            )
        if bool((lengths % block_size != 0).any()):
            raise ValueError(
                f"Every row's response length must be a multiple of block_size={block_size}, got lengths "
                f"{lengths.tolist()}. EOS-pad each response to a multiple of the block size (DESIGN 2)."
            )

        if random_token_ids is not None:
            random_token_ids = random_token_ids.to(device=device, dtype=torch.long).reshape(-1)
        if prior in ("mix", "uniform"):
            if random_token_ids is None or random_token_ids.numel() == 0:
                raise ValueError(
                    f"The {prior!r} prior draws random tokens: pass `random_token_ids`, the ordinary (non-special) "
                    "vocabulary ids."
                )
            if bool((random_token_ids == mask_token_id).any()):
                raise ValueError(
                    f"`random_token_ids` contains the mask token id {mask_token_id}; remove it (and every other "
                    "special token)."
                )

        if rates is None:
            rates = self.sample_block_rates(lengths // block_size, max_blocks, generator=generator)
        elif rates.shape != (batch, max_blocks):
            raise ValueError(
                f"`rates` must be block rates of shape [batch, ceil(R / block_size)] = {(batch, max_blocks)}, got "
                f"{tuple(rates.shape)}."
            )
        block_of_column = (column // block_size).expand(batch, width)  # [batch, R]
        token_rates = rates.to(device=device, dtype=torch.float32).gather(1, block_of_column)
        token_rates = token_rates.masked_fill(~response_mask, 0.0)  # [batch, R]

        # One uniform draw per token decides its fate; comparing it with cumulative probabilities keeps the three
        # outcomes of `mix` mutually exclusive with the exact probabilities of DESIGN 3.3.
        draw = torch.rand(batch, width, generator=generator, device=device)  # [batch, R]
        if prior == "mask":
            masked = draw < token_rates
            substituted = torch.zeros_like(masked)
        elif prior == "uniform":
            masked = torch.zeros_like(response_mask)
            substituted = draw < token_rates
        else:
            p_mask, p_random, _ = self.mix_probabilities(token_rates)
            masked = draw < p_mask
            substituted = ~masked & (draw < p_mask + p_random)
        masked &= response_mask
        substituted &= response_mask

        noisy = x0.masked_fill(masked, mask_token_id)
        if prior != "mask":
            picks = torch.randint(
                random_token_ids.numel(), (batch, width), generator=generator, device=device
            )  # [batch, R]
            # A substitute may equal the clean token (probability 1/V'). It still counts as corrupted and supervised:
            # the model cannot tell such a token from a substituted one, so learning to keep it is exactly the
            # "keep a correct visible token" decision revision needs; redrawing would make the substitute
            # distribution non-uniform and the corruption rate differ from the probabilities of DESIGN 3.3.
            noisy = torch.where(substituted, random_token_ids[picks], noisy)

        return NoiseOutput(
            noisy_input_ids=noisy,
            corrupted=masked | substituted,
            masked=masked,
            rates=token_rates,
        )
