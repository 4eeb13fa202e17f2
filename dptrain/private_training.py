"""``make_private``: one call that turns a model and optimizer into a DP-SGD setup.

It calibrates σ for the target ε with the accountant that will report ε, attaches per-sample
clipping to the model, wraps the optimizer, and owns the Poisson sampler whose batches the
accountant assumes::

    dp = make_private(model, optimizer, num_examples=len(train), batch_size=256, epochs=3,
                      target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
    for logical_batch in dp.batches(physical_batch_size=32):
        for idx in logical_batch:
            model(**collate(train, idx)).loss.backward()
        dp.optimizer.step()
        dp.optimizer.zero_grad()
    print(dp.epsilon())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .accounting import PrivacyLedger, calibrate_noise_multiplier, validate_budget
from .engine import PerSampleClipper
from .errors import ConfigError, ModelError
from .noise import GaussianNoise
from .optimizer import DPOptimizer
from .sampling import PoissonSampler, physical_batches


def default_delta(num_examples: int) -> float:
    """δ = min(1e-5, 1/(10 N)): well below 1/N, the level at which releasing a record is allowed."""
    return min(1e-5, 1.0 / (10 * num_examples))


@dataclass
class PrivateTraining:
    """Everything one private training run needs, returned by :func:`make_private`."""

    model: nn.Module
    optimizer: DPOptimizer
    clipper: PerSampleClipper
    ledger: PrivacyLedger
    sampler: PoissonSampler
    noise_multiplier: float
    sample_rate: float
    delta: float
    steps: int

    def batches(self, physical_batch_size: int, lengths: np.ndarray | None = None
                ) -> Iterator[list[np.ndarray]]:
        """Poisson-sampled logical batches, each as physical index chunks of ≤ the given size.

        A logical batch may be empty (no chunks): still call ``optimizer.step()``, which then
        releases pure noise, as the accountant assumes. ``lengths`` (per example) groups similar
        lengths into the same physical batch.
        """
        for indices in self.sampler:
            yield physical_batches(indices, physical_batch_size, lengths)

    def epsilon(self) -> float:
        """ε spent so far at ``delta``."""
        return self.ledger.epsilon()

    def attach_canaries(self, canaries) -> None:
        """White-box audit: insert gradient canaries into every step of this run (see
        :mod:`dptrain.gradient_canaries`)."""
        self.optimizer.attach_canaries(canaries, self.steps)

    def detach(self) -> None:
        """Remove the hooks from the model."""
        self.clipper.detach()


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    num_examples: int,
    batch_size: float,
    epochs: float | None = None,
    steps: int | None = None,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float | None = None,
    max_grad_norm: float | str = 1.0,
    accountant: str = "prv",
    loss_reduction: str = "mean",
    norm_method: str = "auto",
    seed: int | None = None,
    distributed=None,
    public_size: int | None = None,
    spent: Sequence = (),
) -> PrivateTraining:
    """Attach DP-SGD to ``model`` and ``optimizer``.

    Every number this setup releases (q, steps, σ, δ, the divisor) is a function of
    ``public_size`` and the arguments, never of the private N, so that the add/remove guarantee
    holds for what is shipped (README, "What a run releases").

    Args:
        num_examples: N, the size of the private training set: the sampler draws from these
            rows; nothing released depends on it.
        public_size: the dataset size treated as public (declared by the user, or a DP count
            whose cost is in ``spent``); default ``num_examples``, which then must be public.
        batch_size: the *expected* logical batch size; the sampling rate is q = batch_size /
            public_size, and the noisy sum is divided by batch_size.
        spent: ledger segments (σ, q, steps) spent before training (the DP count of N): the
            ledger starts with them and σ is calibrated for the composition.
        epochs / steps: the length of training (exactly one); steps = round(epochs / q).
        target_epsilon / noise_multiplier: exactly one. With a target, σ is calibrated so that ε
            after ``steps`` steps is at most the target, and no step past it is allowed.
        delta: δ of the guarantee; default min(1e-5, 1/(10 N)); must be < 1/N.
        max_grad_norm: clipping bound C, or ``"auto"`` (automatic clipping, see PerSampleClipper).
        accountant: ``"prv"`` (tight, default) or ``"rdp"``.
        seed: fixes sampling and noise for reproducible experiments; by default both are seeded
            from the operating system.
        distributed: a :class:`~dptrain.distributed.Distributed` (``distributed.current()``)
            when K processes train together: each gets its part of every Poisson batch, and the
            noise is drawn once per step (see :mod:`dptrain.distributed`).
    """
    if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ConfigError(f"num_examples must be an integer >= 1, got {num_examples!r}.")
    size = num_examples if public_size is None else public_size
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"public_size must be an integer >= 1, got {public_size!r}.")
    if not 0 < batch_size <= size:
        raise ConfigError(f"batch_size must be in (0, {size}] (the dataset size), got {batch_size}.")
    if (epochs is None) == (steps is None):
        raise ConfigError("give exactly one of epochs and steps.")
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ConfigError("give exactly one of target_epsilon and noise_multiplier.")
    sample_rate = float(batch_size) / size
    if steps is None:
        if not epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {epochs}.")
        steps = max(1, round(epochs / sample_rate))
    delta = default_delta(size) if delta is None else float(delta)
    validate_budget(epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                    accountant=accountant)
    if delta >= 1.0 / num_examples:
        raise ConfigError(
            f"delta must be < 1/N = {1.0 / num_examples:.3g} for a meaningful guarantee, got {delta}."
        )
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
            accountant=accountant, spent=spent,
        )
    elif not noise_multiplier > 0:
        raise ConfigError(f"noise_multiplier must be > 0, got {noise_multiplier}.")
    ledger = PrivacyLedger(delta=delta, accountant=accountant, target_epsilon=target_epsilon)
    ledger.prior = [(float(s), float(q), int(n)) for s, q, n in spent]
    ledger.reserve(noise_multiplier, sample_rate, steps)

    clipper = PerSampleClipper(
        model, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction, norm_method=norm_method
    )
    seeds = [None, None] if seed is None else [int(s) for s in np.random.SeedSequence(seed).generate_state(2)]
    if distributed is not None:  # one global Poisson mask on every rank, each keeps its part
        seeds[0] = distributed.shared_seed(seeds[0])
    sampler = PoissonSampler(num_examples, sample_rate, steps, seed=seeds[0], shard=distributed)

    def sampled_rows() -> int:
        if sampler.last_batch_size is None:
            raise ModelError(
                "optimizer.step() was called before any batch from dp.batches(); the accountant "
                "assumes the Poisson sampler's batches, so train on those."
            )
        return sampler.last_batch_size

    try:
        dp_optimizer = DPOptimizer(
            optimizer, clipper, noise_multiplier=noise_multiplier,
            expected_batch_size=float(batch_size), ledger=ledger, sample_rate=sample_rate,
            noise=GaussianNoise(seed=seeds[1]), expected_rows=sampled_rows, distributed=distributed,
        )
    except Exception:
        clipper.detach()
        raise
    return PrivateTraining(
        model=model, optimizer=dp_optimizer, clipper=clipper, ledger=ledger, sampler=sampler,
        noise_multiplier=float(noise_multiplier), sample_rate=sample_rate, delta=delta, steps=steps,
    )
