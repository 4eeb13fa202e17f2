"""The privacy ledger: ε spent so far, over Opacus' accountants, and σ calibration.

DP-SGD with Poisson sampling rate q and noise multiplier σ is a composition of subsampled
Gaussian mechanisms. Two accountants bound its (ε, δ):

* ``"prv"`` (default): numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz
  2021, "Numerical composition of differential privacy"); tight, reports the upper end of its
  error interval.
* ``"rdp"``: Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019); simpler and
  looser: typically 6–14% larger ε at the same σ, but it can be much larger at small sampling
  rates (q = 0.001, σ = 0.8, 10,000 steps, δ = 1e-5: 1.38 against PRV's 0.79, +75%).

σ is calibrated with the same accountant that later reports ε, so the reported ε never exceeds the
target at the planned number of steps. The ledger refuses a step that would take ε past the
target (:class:`~dptrain.errors.PrivacyBudgetExceeded`) instead of training on.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Sequence

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from .errors import ConfigError, PrivacyBudgetExceeded

ACCOUNTANTS = ("prv", "rdp")
MAX_STEPS = 10_000_000
"""The most noisy steps a plan may have (the sampler and the accountant plan them all up front)."""


MAX_TARGET_EPSILON = 100.0
"""Largest target ε accepted: ε = 200 and 1000 made σ's calibration run for minutes (13 GB at
1000), and e^100 is no guarantee anyway."""


def validate_budget(
    *, epsilon: float | None = None, delta: float | None = None, sample_rate: float | None = None,
    steps: int | None = None, accountant: str | None = None,
) -> None:
    """Raise ConfigError in one voice for any argument out of range."""
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"epsilon must be a finite number > 0, got {epsilon}.")
    if epsilon is not None and epsilon > MAX_TARGET_EPSILON:
        raise ConfigError(
            f"a target epsilon above {MAX_TARGET_EPSILON:g} promises nothing a reader can use, and "
            f"calibrating sigma for it ran for minutes in many GB (PRV at tiny sigma); got "
            f"{epsilon:g}: use epsilon inf for a non-private baseline.")
    if delta is not None and not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta}.")
    if sample_rate is not None and not (0 < sample_rate <= 1):
        raise ConfigError(f"sample rate must be in (0, 1], got {sample_rate}.")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be an integer >= 1, got {steps}.")
    if steps is not None and steps > MAX_STEPS:
        raise ConfigError(f"{steps:,} steps cannot be planned (at most {MAX_STEPS:,}): fewer "
                          "epochs, or a larger batch.")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}.")


def _epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(segment) for segment in history]
    import numpy as np

    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", UserWarning)  # RDP's "optimal order is the largest alpha"
        return float(acc.get_epsilon(delta=delta))  # (and PRV's log(1 − q) at q = 1: exact)


def epsilon_of(segments: Sequence, delta: float, accountant: str = "prv") -> float:
    """ε at δ of the composition of ``segments`` (σ, q, steps), e.g. a ledger's prior + history."""
    validate_budget(delta=delta, accountant=accountant)
    return _epsilon([(float(s), float(q), int(n)) for s, q, n in segments], float(delta), accountant)


def epsilon_after(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv",
    prior: Sequence = (),
) -> float:
    """ε of ``steps`` DP-SGD steps at (σ, q), at δ, after the ``prior`` segments (a run's
    ``privacy.json`` ``prior``: the count of its dataset size)."""
    validate_budget(delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
    segments = [(float(s), float(q), int(n)) for s, q, n in prior]
    return _epsilon([*segments, (noise_multiplier, sample_rate, steps)], delta, accountant)


def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
    accountant: str = "prv", tolerance: float = 0.01, spent: Sequence = (),
) -> float:
    """The smallest σ (to ``tolerance`` in ε) whose ε after ``steps`` steps is ≤ the target.

    Opacus' bisection (``get_noise_multiplier``) with the same accountant that reports ε.
    ``spent``: segments (σ, q, steps) already composed before these steps (the DP count of the
    dataset size, :mod:`dptrain.release`): σ is then bisected on the composition of both.
    """
    validate_budget(epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                    accountant=accountant)
    spent = tuple((float(s), float(q), int(n)) for s, q, n in spent)
    if not spent:
        return _calibrated(float(target_epsilon), float(delta), float(sample_rate), int(steps),
                           accountant, float(tolerance))
    return _calibrated_after(spent, float(target_epsilon), float(delta), float(sample_rate),
                             int(steps), accountant, float(tolerance))


@functools.lru_cache(maxsize=64)
def _calibrated_after(spent: tuple, target_epsilon: float, delta: float, sample_rate: float,
                      steps: int, accountant: str, tolerance: float) -> float:
    """Bisection on σ of ε(spent + (σ, q, steps)), as Opacus bisects without ``spent``: the
    upper end is doubled until it meets the target, then halved until ε is within ``tolerance``
    below it."""
    def eps(sigma: float) -> float:
        return _epsilon([*spent, (sigma, sample_rate, steps)], delta, accountant)

    if _epsilon(list(spent), delta, accountant) >= target_epsilon:
        raise ConfigError(f"the dataset-size count alone spends the target epsilon "
                          f"{target_epsilon} at delta {delta}; raise epsilon or declare the size.")
    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ConfigError(
                f"target epsilon {target_epsilon} cannot be reached at delta {delta} with {steps} "
                f"steps at sample rate {sample_rate:.4g} (noise multiplier would exceed 1e6); raise "
                "epsilon or lower the number of steps.")
    for _ in range(100):  # eps(high) <= target throughout
        middle = (low + high) / 2
        value = eps(middle)
        if value > target_epsilon:
            low = middle
            continue
        high = middle
        if value >= target_epsilon - tolerance:
            break
    return high


@functools.lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                accountant: str, tolerance: float) -> float:
    """The bisection itself, a pure function of its arguments: remembered, because shadow models
    and sweep cells with one recipe ask for the same σ many times (seconds each with PRV)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant, epsilon_tolerance=tolerance,
            )
    except ValueError as exc:
        raise ConfigError(
            f"target epsilon {target_epsilon} cannot be reached at delta {delta} with {steps} steps "
            f"at sample rate {sample_rate:.4g} (noise multiplier would exceed 1e6); raise epsilon or "
            "lower the number of steps."
        ) from exc
    return float(sigma)


class PrivacyLedger:
    """What has been spent: segments (σ, q, steps) composed by one accountant, at one δ.

    ``check_step`` before releasing a noisy gradient, ``record_step`` after; ``epsilon()`` at any
    time. ``prior``: releases made before training (the Gaussian count of the dataset size, as
    a segment (σ, 1, 1)), composed with the steps but not counted among them. The state survives
    restarts through ``state_dict``/``load_state_dict``, so a resumed run keeps the ε it already
    spent.
    """

    def __init__(self, *, delta: float, accountant: str = "prv", target_epsilon: float | None = None):
        validate_budget(delta=delta, accountant=accountant,
                        epsilon=target_epsilon if target_epsilon is not None else None)
        self.delta = float(delta)
        self.accountant = accountant
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.history: list[tuple[float, float, int]] = []
        self.prior: list[tuple[float, float, int]] = []
        self._allowed: tuple[tuple[float, float], int] | None = None  # ((σ, q), steps known in budget)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the ledger's δ)."""
        return _epsilon(self.prior + self.history, self.delta if delta is None else delta,
                        self.accountant)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, more_steps: int) -> float:
        """ε after ``more_steps`` further steps at (σ, q)."""
        return _epsilon(self.prior + _extend(self.history, noise_multiplier, sample_rate, more_steps),
                        self.delta, self.accountant)

    def reserve(self, noise_multiplier: float, sample_rate: float, more_steps: int) -> float:
        """Check a whole plan at once; later ``check_step`` calls within it cost nothing.

        Returns the ε the plan ends at; raises PrivacyBudgetExceeded if it passes the target.
        """
        eps = self.epsilon_if(noise_multiplier, sample_rate, more_steps)
        if self.target_epsilon is not None:
            if eps > self.target_epsilon:
                raise PrivacyBudgetExceeded(
                    f"{more_steps} more steps at noise multiplier {noise_multiplier:.4g} and sample "
                    f"rate {sample_rate:.4g} would spend epsilon {eps:.3f}, past the target "
                    f"{self.target_epsilon:g} (already spent {self.epsilon():.3f} in {self.steps} steps)."
                )
            self._allowed = ((noise_multiplier, sample_rate), self.steps + more_steps)
        return eps

    def check_step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Raise PrivacyBudgetExceeded if one more step at (σ, q) would pass the target."""
        if self.target_epsilon is None:
            return
        if self._allowed is not None:
            key, allowed = self._allowed
            if key == (noise_multiplier, sample_rate) and self.steps + 1 <= allowed:
                return
        self.reserve(noise_multiplier, sample_rate, 1)

    def record_step(self, noise_multiplier: float, sample_rate: float) -> None:
        self.history = _extend(self.history, noise_multiplier, sample_rate, 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "history": [list(segment) for segment in self.history],
            "prior": [list(segment) for segment in self.prior],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved ledger; it must be for the same accountant and δ."""
        if state.get("accountant") != self.accountant or state.get("delta") != self.delta:
            raise ConfigError(
                f"saved privacy ledger is for accountant {state.get('accountant')!r} at delta "
                f"{state.get('delta')}, but this run uses {self.accountant!r} at delta {self.delta}."
            )
        self.history = checked_segments(state.get("history", []))
        self.prior = checked_segments(state.get("prior", []))  # (none in ledgers saved before the count)
        self._allowed = None


def checked_segments(saved, what: str = "saved privacy ledger") -> list[tuple[float, float, int]]:
    """Segments (σ, q, steps) read back from a file (a ledger's state, a ``privacy.json``), each
    checked: σ > 0, 0 < q ≤ 1, a whole number of steps ≥ 1; else ConfigError naming ``what``."""
    segments = []
    for segment in saved:
        try:
            valid = (isinstance(segment, (list, tuple)) and len(segment) == 3
                     and float(segment[0]) > 0 and 0 < float(segment[1]) <= 1
                     and int(segment[2]) == segment[2] and int(segment[2]) >= 1)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(f"{what}: invalid segment {segment!r}.")
        segments.append((float(segment[0]), float(segment[1]), int(segment[2])))
    return segments


def _extend(history, noise_multiplier, sample_rate, steps):
    history = list(history)
    if history and history[-1][:2] == (noise_multiplier, sample_rate):
        sigma, q, n = history.pop()
        history.append((sigma, q, n + steps))
    else:
        history.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return history


PROFILE_EPS_ERROR = 0.01
PROFILE_DELTA_ERROR = 1e-10


def privacy_profile(noise_multiplier: float, sample_rate: float, steps: int,
                    epsilons: "Any" = None) -> tuple["Any", "Any"]:
    """δ(ε) of ``steps`` Poisson-subsampled Gaussian steps, on a grid of ε ≥ 0, from the PRV
    accountant (Gopi et al. 2021): the whole curve of guarantees the accountant makes, which a
    white-box audit tests (an f-DP curve: Dong, Roth, Su 2019, Proposition 2.12).

    Each δ is an upper bound: the discretized estimate at ε − eps_error plus delta_error, the
    error bounds of the PRV composition. Returns (epsilons, deltas) as numpy arrays.
    """
    import numpy as np

    if epsilons is None:
        epsilons = np.concatenate([np.linspace(0.0, 2.0, 81), np.linspace(2.05, 12.0, 200),
                                   np.geomspace(12.5, 60.0, 40)])
    epsilons = np.asarray(epsilons, dtype=np.float64)
    acc = create_accountant(mechanism="prv")
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dprv = acc._get_dprv(eps_error=PROFILE_EPS_ERROR, delta_error=PROFILE_DELTA_ERROR)
    ts, pmf = np.asarray(dprv.domain.ts), np.asarray(dprv.pmf)
    # δ(ε) = Σ_{t ≥ ε} pmf(t)·(1 − e^{ε − t}), with suffix sums: one pass for every ε.
    tail = np.concatenate([np.cumsum(pmf[::-1])[::-1], [0.0]])
    weighted = np.concatenate([np.cumsum((pmf * np.exp(-np.clip(ts, -700, 700)))[::-1])[::-1], [0.0]])
    shifted = epsilons - PROFILE_EPS_ERROR  # at ε = 0 too: the formula holds for ε < 0
    start = np.searchsorted(ts, shifted, side="left")
    deltas = tail[start] - np.exp(shifted) * weighted[start] + PROFILE_DELTA_ERROR
    return epsilons, np.clip(deltas, 0.0, 1.0)
