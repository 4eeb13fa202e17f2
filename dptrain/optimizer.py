"""The DP-SGD step around an ordinary optimizer.

Each ``step()`` releases one noisy gradient (Abadi et al. 2016, Algorithm 1):

    ĝ = (Σ_{i ∈ logical batch} c_i G_i  +  N(0, σ² S² I)) / (q N)

in named stages — clip-and-sum (done by :class:`~dptrain.engine.PerSampleClipper` in every
backward pass) → check the budget → noise → scale → account → the wrapped optimizer's step —
where S is the clipping sensitivity (C, or 1 with automatic clipping) and q N the *expected*
logical batch size of Poisson sampling (dividing by the realized size would leak it). The wrapped
optimizer is kept as it is: ``param_groups``, ``state`` and ``state_dict`` pass through.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .accounting import PrivacyLedger
from .engine import PerSampleClipper
from .errors import ConfigError, ModelError
from .noise import GaussianNoise


class DPOptimizer:
    """Makes ``optimizer.step()`` a DP-SGD step over the clipper's clipped sums.

    Args:
        optimizer: the user's optimizer over (at least) the model's trainable parameters.
        clipper: the :class:`PerSampleClipper` attached to the model.
        noise_multiplier: σ; the noise standard deviation is σ·S.
        expected_batch_size: q·N, the divisor of the noisy sum.
        ledger: if given, every step is checked against and recorded in it with ``sample_rate``.
        noise: the noise source (seeded for reproducible tests; OS entropy by default).
        expected_rows: if given, a callable returning how many samples the current logical batch
            holds; a step whose backpropagated samples differ raises (the accountant assumes the
            sampler's batches, not the caller's).
        distributed: a :class:`~dptrain.distributed.Distributed` when K ranks share the logical
            batch: their clipped sums are all-reduced and the noise is drawn once, on rank 0.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clipper: PerSampleClipper,
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        ledger: PrivacyLedger | None = None,
        sample_rate: float | None = None,
        noise: GaussianNoise | None = None,
        expected_rows: Callable[[], int] | None = None,
        distributed=None,
    ):
        if not noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
        if not expected_batch_size > 0:
            raise ConfigError(f"expected_batch_size must be > 0, got {expected_batch_size}.")
        if ledger is not None and sample_rate is None:
            raise ConfigError("a ledger needs the sample rate it accounts for; pass sample_rate.")
        private = {id(p) for p in clipper.parameters}
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        outside = [
            p for group in optimizer.param_groups for p in group["params"]
            if p.requires_grad and id(p) not in private
        ]
        if outside:
            raise ModelError(
                f"the optimizer updates {len(outside)} trainable parameter(s) that are not part of the "
                "privately trained model; their gradients would not be clipped: add them to the model "
                "before attaching, or freeze them."
            )
        missing = [p for p in clipper.parameters if id(p) not in in_optimizer]
        if missing:
            raise ConfigError(
                f"{len(missing)} trainable parameter(s) of the model are not in the optimizer; "
                "give the optimizer all of them or freeze the rest."
            )
        self.original_optimizer = optimizer
        self.clipper = clipper
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.ledger = ledger
        self.sample_rate = sample_rate
        self.noise = noise if noise is not None else GaussianNoise()
        self.expected_rows = expected_rows
        self.distributed = distributed
        self.canaries = None  # a white-box audit's DiracCanaries, if attached
        self.steps = 0

    # ---- pass-through, so schedulers and checkpoints see the wrapped optimizer
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.clipper.parameters:
            p.grad = None

    # ---- the DP-SGD step
    def step(self, closure: Callable | None = None) -> None:
        """Noise, scale, account and update. The clipped sums are consumed (grads set to None)."""
        if closure is not None:
            raise ConfigError("DPOptimizer.step does not take a closure; run forward/backward before it.")
        self.clipper.flush()  # no-op unless a backward's end-of-pass callback did not run
        self._check_only_private_grads()
        if self.ledger is not None:
            self.ledger.check_step(self.noise_multiplier, self.sample_rate)
        self._check_rows()
        if self.canaries is not None:  # a white-box audit's gradient canaries join the clipped sum
            self.canaries.insert(self.clipper, self.clipper.grads())
        grads = self.noisy_sum()
        self.scale(grads)
        if self.canaries is not None:
            self.canaries.observe(grads)
        if self.ledger is not None:  # account before the release, so a failure cannot under-count
            self.ledger.record_step(self.noise_multiplier, self.sample_rate)
        self.original_optimizer.step()
        self.steps += 1
        self.zero_grad()

    def scale(self, grads: list[torch.Tensor]) -> None:
        """Stage 'scale': divide the noisy sum by the expected batch size q·N (a public constant;
        the realized size would reveal who was sampled)."""
        for g in grads:
            g.div_(self.expected_batch_size)

    def attach_canaries(self, canaries, steps: int) -> None:
        """Insert a white-box audit's gradient canaries (:class:`~dptrain.gradient_canaries.
        DiracCanaries`) into every following step, through this optimizer's clipping and noise."""
        if self.sample_rate is None:
            raise ConfigError("gradient canaries are Poisson-sampled at the run's rate: create the "
                              "DPOptimizer with sample_rate (make_private does).")
        if self.distributed is not None:
            raise ConfigError("gradient canaries (white-box audit) run in one process; audit the "
                              "recipe without --nproc.")
        names = {id(p): n for n, p in self.clipper.model.named_parameters()}
        canaries.bind(self.clipper.parameters, sample_rate=self.sample_rate,
                      steps=steps,
                      noise_multiplier=self.noise_multiplier, sensitivity=self.clipper.sensitivity,
                      divisor=self.expected_batch_size,
                      names=[names.get(id(p), "?") for p in self.clipper.parameters])
        self.canaries = canaries

    def _check_only_private_grads(self) -> None:
        """Fail closed: the wrapped optimizer must see no gradient the clipper did not make.

        A parameter frozen when the clipper was attached and unfrozen later (gradual
        unfreezing), or one added to the optimizer afterwards, gets autograd's raw gradient;
        stepping would release it without clipping or noise.
        """
        private = {id(p) for p in self.clipper.parameters}
        stray = [p for group in self.param_groups for p in group["params"]
                 if p.grad is not None and id(p) not in private]
        if stray:
            names = {id(p): n for n, p in self.clipper.model.named_parameters()}
            which = ", ".join(names.get(id(p), f"a tensor of shape {tuple(p.shape)}") for p in stray[:3])
            raise ModelError(
                f"{len(stray)} parameter(s) in the optimizer ({which}{', ...' if len(stray) > 3 else ''}) "
                "have gradients that per-sample clipping did not produce (unfrozen or added after "
                "make_private); stepping would release them without clipping or noise. Choose what "
                "trains before make_private."
            )

    def noisy_sum(self) -> list[torch.Tensor]:
        """Stage 'noise': ``p.grad += N(0, (σS)²)`` for every private parameter, in place. On K
        ranks: rank 0 adds the noise to its part, then the parts are summed over the ranks, so
        every rank holds Σ_B c_i G_i + one draw of the noise (:mod:`dptrain.distributed`)."""
        grads = self.clipper.grads()  # an empty logical batch still releases (pure) noise
        if self.distributed is None or self.distributed.adds_noise:
            self.noise.add_(grads, self.noise_multiplier * self.clipper.sensitivity)
        if self.distributed is not None:
            self.distributed.sum_(grads)
        return grads

    def _check_rows(self) -> None:
        rows, self.clipper.rows_clipped = self.clipper.rows_clipped, 0
        if self.expected_rows is None:
            return
        expected = self.expected_rows()
        if rows != expected:
            raise ModelError(
                f"{rows} samples were backpropagated since the last step but the Poisson-sampled "
                f"logical batch holds {expected}; feed exactly the batches the sampler gives, "
                "or the accountant's epsilon does not hold."
            )
