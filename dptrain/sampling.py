"""Poisson sampling of logical batches, and their split into physical batches.

The accountants bound the privacy of the *Poisson-subsampled* Gaussian mechanism (Abadi et al.
2016; Mironov, Talwar, Zhang 2019): at every step each of the N examples joins the batch
independently with probability q, so batch sizes vary as Binomial(N, q) and may be 0. Shuffling and
fixed-size batches are a different mechanism and are not what the accountant assumes.

A logical batch (what one noisy step sums over) is then cut into physical batches that fit in
memory; sorting by length first groups similar lengths so dynamic padding wastes little. Neither
choice affects privacy: the noisy step still sums the same clipped per-sample gradients.
"""

from __future__ import annotations

import secrets
from typing import Iterator

import numpy as np

from .errors import ConfigError


class PoissonSampler:
    """``steps`` logical batches of indices in [0, N), each index included with probability q."""

    def __init__(self, num_examples: int, sample_rate: float, steps: int, seed: int | None = None,
                 shard=None):
        if num_examples < 1:
            raise ConfigError(f"the dataset must have at least 1 example, got {num_examples}.")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"sample rate must be in (0, 1], got {sample_rate}.")
        if steps < 0:
            raise ConfigError(f"steps must be >= 0, got {steps}.")
        self.num_examples = int(num_examples)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.step = 0  # logical batches drawn so far
        self.last_batch_size: int | None = None  # size of the logical batch drawn last (this rank's part)
        self.last_global_batch_size: int | None = None  # ... of the whole logical batch
        # with a :class:`~dptrain.distributed.Distributed`, every rank draws the same global mask
        # (same seed) and yields its part: the union over ranks is the Poisson batch
        self.shard = shard
        self._rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def __len__(self) -> int:
        return self.steps - self.step

    def __iter__(self) -> Iterator[np.ndarray]:
        while self.step < self.steps:
            mask = self._rng.random(self.num_examples) < self.sample_rate
            self.step += 1
            indices = np.flatnonzero(mask)
            self.last_global_batch_size = int(indices.size)
            if self.shard is not None:
                indices = self.shard.shard(indices)
            self.last_batch_size = int(indices.size)
            yield indices

    def state_dict(self) -> dict:
        return {"step": self.step, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        step = state.get("step")
        if not isinstance(step, int) or not 0 <= step <= self.steps:
            raise ConfigError(f"saved sampler step must be in [0, {self.steps}], got {step!r}.")
        self._rng.bit_generator.state = state["rng"]
        self.step = step


def physical_batches(
    indices: np.ndarray, max_size: int, lengths: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split a logical batch into ⌈n / max_size⌉ near-equal chunks, shortest examples first.

    >>> [c.tolist() for c in physical_batches(np.array([5, 1, 3, 2]), 2, np.array([0, 9, 7, 1, 0, 3]))]
    [[3, 5], [2, 1]]
    """
    if max_size < 1:
        raise ConfigError(f"physical batch size must be >= 1, got {max_size}.")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return []
    if lengths is not None:
        indices = indices[np.argsort(np.asarray(lengths)[indices], kind="stable")]
    n_chunks = -(-indices.size // max_size)
    return [chunk for chunk in np.array_split(indices, n_chunks)]
