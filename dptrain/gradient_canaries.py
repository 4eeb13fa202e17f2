"""Gradient ("Dirac") canaries for white-box audits of a real training run.

Steinke, Nasr, Jagielski 2023 (§white-box) and Nasr et al. 2023: canary j is an example whose
gradient is a spike ``sign_j · spike · S`` on one coordinate c_j of the trained parameters and zero
elsewhere (S: the clipping sensitivity). Each canary is included by a secret fair coin b_j; an
included canary is then Poisson-sampled at every step like any example (its own
:class:`~dptrain.sampling.PoissonSampler` over the m canaries, with the run's q), and enters the
step through :meth:`PerSampleClipper.clip_and_add_dirac` — the per-layer norm combination, the clip
factors and the ``p.grad`` that the noise is added to are the data rows' own. Since the spike is
larger than S, correct clipping must cut it to S; a clipping bug shows up as a huge bound.

Which coordinates: at the first step, before any canary is added, the m coordinates whose
clipped real-data sum has the smallest magnitude (ties at random): rows of word embeddings of
tokens the data never uses have exactly zero real gradient, so a full fine-tuning run puts its
canaries there and they never disturb the model; a head-only run has no silent coordinate and
takes the quietest. Canaries cost no forward or backward pass: m can be 10⁴–10⁶.

What the auditor sees (it knows every other example, as DP's adversary may):

* **all iterates**: every released update ĝ_t. With the public divisor D = q·N and the real
  examples' clipped sum R_t known, y_{jt} = sign_j · (D·ĝ_t[c_j] − R_t[c_j]) / S is
  b_j·[j sampled at t] + N(0, σ²) for a correct engine, and the optimal score is the log
  likelihood ratio of the Poisson-subsampled Gaussian, Σ_t log(1 − q + q·exp((y_{jt} − ½)/σ²))
  (Σ_t y_{jt} when σ = 0);
* **last iterate**: only the final weights: −sign_j · (θ_T[c_j] − θ_0[c_j]).

Scores and coins are audit secrets: they are returned to the auditor, never written beside the
model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .engine import add_at_coordinates
from .errors import ConfigError
from .sampling import PoissonSampler

SPIKE = 10.0  # canary gradient norm in units of the sensitivity: clipping must cut it by 10x
MAX_CANARIES = 10**8  # ~3 GB of audit state; beyond that the bound gains nothing measurable


class DiracCanaries:
    """m gradient canaries, their secret coins and the auditor's running scores.

    Args:
        m: number of canaries (each needs its own coordinate: m ≤ trainable parameters).
        seed: fixes coins, signs, sampling and tie-breaks (tests, repeated audits); from the OS
            by default.
        spike: the canary gradient's norm in units of the sensitivity S.
        at_most_parameters: use min(m, trainable parameters) canaries instead of refusing a
            model with fewer parameters than m.
    """

    def __init__(self, m: int, *, seed: int | None = None, spike: float = SPIKE,
                 at_most_parameters: bool = False):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= MAX_CANARIES:
            raise ConfigError(f"the number of gradient canaries must be an integer in [1, "
                              f"{MAX_CANARIES}], got {m!r}.")
        if not (math.isfinite(spike) and spike > 1.0):
            raise ConfigError(f"the canary spike must be > 1 (in units of the clipping bound), got {spike}.")
        self.m = int(m)
        self.at_most_parameters = at_most_parameters
        self.spike = float(spike)
        ss = np.random.SeedSequence(seed)
        coin_seq, sign_seq, sample_seq, tie_seq = ss.spawn(4)
        self.included = np.random.default_rng(coin_seq).random(self.m) < 0.5
        self.signs = np.where(np.random.default_rng(sign_seq).random(self.m) < 0.5, -1.0, 1.0)
        self._sample_seed = int(np.random.default_rng(sample_seq).integers(2**62))
        self._tie_seed = int(np.random.default_rng(tie_seq).integers(2**62))
        self.sampler: PoissonSampler | None = None
        self.param_index: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None
        self.names: list[str] = []
        self.all_iterates = np.zeros(self.m)  # running log-likelihood-ratio scores
        self.initial: np.ndarray | None = None  # θ_0 at the canary coordinates
        self.steps = 0
        self.times_sampled = np.zeros(self.m, dtype=np.int64)  # for the report only
        self.last_added = 0  # canaries added in the last step
        self._before: torch.Tensor | None = None

    # ---------------------------------------------------------------- set-up
    def bind(self, params: list[torch.nn.Parameter], *, sample_rate: float, steps: int,
             noise_multiplier: float, sensitivity: float, divisor: float,
             names: list[str] | None = None) -> None:
        """Attach to the trained parameters and the run's sampling, noise and divisor."""
        total = sum(p.numel() for p in params)
        if self.m > total and self.at_most_parameters:
            self.m = total
            self.included, self.signs = self.included[:total], self.signs[:total]
            self.all_iterates, self.times_sampled = self.all_iterates[:total], self.times_sampled[:total]
        if self.m > total:
            raise ConfigError(
                f"{self.m} gradient canaries need {self.m} distinct coordinates but the model trains "
                f"{total} parameters; use at most {total} canaries."
            )
        self.params = params
        self.names = names or [f"param{i}" for i in range(len(params))]
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)
        self.sensitivity = float(sensitivity)
        self.divisor = float(divisor)
        self.sampler = PoissonSampler(self.m, sample_rate, steps, seed=self._sample_seed)
        self._batches = iter(self.sampler)

    def _choose(self, grads: list[torch.Tensor]) -> None:
        """The m coordinates with the smallest |real clipped sum| at the first step."""
        flat = torch.cat([g.detach().reshape(-1).abs().to(torch.float64).cpu() for g in grads]).numpy()
        kth = np.partition(flat, self.m - 1)[self.m - 1]
        below = np.flatnonzero(flat < kth)
        equal = np.flatnonzero(flat == kth)  # random among the coordinates tied at the threshold
        rng = np.random.default_rng(self._tie_seed)
        pick = np.concatenate([below, rng.choice(equal, self.m - below.size, replace=False)])
        order = torch.from_numpy(np.sort(pick))
        starts = torch.tensor([0] + [p.numel() for p in self.params]).cumsum(0)
        self.param_index = torch.searchsorted(starts, order, right=True) - 1
        self.offset = order - starts[self.param_index]
        cuts = np.searchsorted(self.param_index.numpy(), np.arange(len(self.params) + 1))
        self._slices = [(i, int(cuts[i]), int(cuts[i + 1])) for i in range(len(self.params))
                        if cuts[i + 1] > cuts[i]]
        self.initial = self._gather([p.detach() for p in self.params]).numpy()

    def _gather(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The values of ``tensors`` (one per parameter) at the canaries' coordinates, in canary
        order (coordinates are sorted, so each parameter's canaries are one slice)."""
        parts = [tensors[i].detach().reshape(-1)[self.offset[a:b]].to(torch.float64).cpu()
                 for i, a, b in self._slices]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    # ---------------------------------------------------------------- one step
    def insert(self, clipper, grads: list[torch.Tensor]) -> int:
        """Before the noise: add this step's sampled, included canaries through the clipper.

        Returns how many canaries were added (the step's extra rows)."""
        rows = self._next_rows(grads)
        self._before = self._gather(grads)
        if rows.size:
            idx = torch.from_numpy(rows)
            value = torch.from_numpy(self.signs[rows] * self.spike * self.sensitivity)
            clipper.clip_and_add_dirac(self.param_index[idx], self.offset[idx], value)
        return int(rows.size)

    def insert_unclipped(self, grads: list[torch.Tensor]) -> int:
        """A non-private run's canaries: the raw spike, divided like the loss (by q·N)."""
        rows = self._next_rows(grads)
        self._before = self._gather(grads) * self.divisor
        idx = torch.from_numpy(rows)
        value = torch.from_numpy(self.signs[rows] * self.spike * self.sensitivity / self.divisor)
        add_at_coordinates(grads, self.param_index[idx], self.offset[idx], value)
        return int(rows.size)

    def _next_rows(self, grads: list[torch.Tensor]) -> np.ndarray:
        """This step's included canaries that Poisson sampling took (coordinates chosen first)."""
        if self.sampler is None:
            raise ConfigError("bind() the canaries to a run before training.")
        if self.param_index is None:
            self._choose(grads)
        sampled = np.zeros(self.m, dtype=bool)
        sampled[next(self._batches)] = True
        rows = np.flatnonzero(sampled & self.included)
        self.times_sampled[rows] += 1
        self.last_added = int(rows.size)
        return rows

    def observe(self, released: list[torch.Tensor]) -> None:
        """After the release (noise added, divided): update the all-iterates scores."""
        y = (self._gather(released) * self.divisor - self._before) / self.sensitivity
        y = y.numpy() * self.signs
        sigma, q = self.noise_multiplier, self.sample_rate
        if sigma == 0.0:
            self.all_iterates += y
        elif q >= 1.0:
            self.all_iterates += (y - 0.5) / sigma**2
        else:
            self.all_iterates += np.logaddexp(math.log1p(-q), math.log(q) + (y - 0.5) / sigma**2)
        self._before = None
        self.steps += 1

    # ---------------------------------------------------------------- what the auditor reads
    def last_iterate(self) -> np.ndarray:
        """−sign_j·(θ_T[c_j] − θ_0[c_j]): how far each canary's coordinate moved its way."""
        if self.initial is None:
            raise ConfigError("no step was taken with the canaries.")
        return -self.signs * (self._gather([p.detach() for p in self.params]).numpy() - self.initial)

    def coordinates(self) -> list[dict]:
        """Where the canaries sit, per parameter tensor (counts only)."""
        if self.param_index is None:
            return []
        counts = torch.bincount(self.param_index, minlength=len(self.params)).tolist()
        return [{"parameter": n, "canaries": c} for n, c in zip(self.names, counts) if c]
