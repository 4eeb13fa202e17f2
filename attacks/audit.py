"""Empirical lower bounds on ε from what an attacker got right.

A privacy audit turns the success of a membership test into a statement "with probability at least
``confidence`` over the audit's randomness, the mechanism is *not* (ε, δ)-DP for any ε below
``epsilon_lb``". Three constructions are provided:

* **Clopper-Pearson** (Jagielski, Ullman, Oprea 2020): exact binomial bounds on the test's TPR and
  FPR, then the (ε, δ)-DP inequality TPR ≤ e^ε·FPR + δ solved for ε.
* **Gaussian DP** (Nasr et al. 2023): the same bounds turned into a lower bound on μ of μ-GDP, then
  into the ε of μ-GDP at δ (Dong, Roth, Su 2019). Much tighter than Clopper-Pearson, and a bound
  only under the assumption that the mechanism is μ-GDP for some μ (DP-SGD's final model nearly is).
* **One run** (Steinke, Nasr, Jagielski 2023): m canaries, each included independently with
  probability ½, all in a single training run; the auditor guesses on r of them and gets v right.

Conventions used throughout:

* Higher score = more likely a member ("in"). Negate losses before passing them.
* ``confidence`` is the probability that the *reported* bound is valid. When a bound needs two
  binomial confidence bounds (TPR and FPR), each is one-sided at level ``(1 - confidence) / 2`` —
  the ends of the central two-sided Clopper-Pearson interval — so both hold together with
  probability ≥ ``confidence`` (union bound). This is the convention that reproduces the published
  check value 500/1000 true positives, 10/1000 false positives → ε_lb ≈ 3.242 at 95%.
* Searching over thresholds (or over the one-run guess counts k₊, k₋) on the same scores and
  reporting the best bound is a multiple comparison: it is corrected either by Bonferroni (divide the
  significance by the number of choices) or by a split (choose on a random part, bound on the rest).
  Every result says which correction was applied.

This module needs numpy and scipy only; importing it must not pull in torch, scikit-learn or the
training stack.

>>> round(epsilon_clopper_pearson(500, 1000, 10, 1000, confidence=0.95), 3)
3.242
>>> round(gdp_epsilon(1.0, 1e-5), 3)
4.377
>>> round(epsilon_one_run(1000, 100, 100, confidence=0.95), 3)
3.493
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from scipy import special, stats

Correction = Literal["bonferroni", "split"]
_CORRECTIONS = ("bonferroni", "split")


# --------------------------------------------------------------------------------------------
# Validation (written once, used by every entry point)
# --------------------------------------------------------------------------------------------


def as_scores(values: Any, name: str) -> np.ndarray:
    """Return ``values`` as a non-empty 1-D float64 array of finite numbers, or raise ValueError.

    >>> as_scores([1, 2.5], "member_scores")
    array([1. , 2.5])
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        kind = type(values).__name__
        raise ValueError(
            f"{name} must be a non-empty 1-D array of finite numbers, got a {kind} that is not "
            "numeric."
        ) from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D array of finite numbers, got shape {array.shape}."
        )
    n_bad = int(np.count_nonzero(~np.isfinite(array)))
    if n_bad:
        raise ValueError(
            f"{name} must be a non-empty 1-D array of finite numbers, got shape {array.shape} "
            f"with {n_bad} non-finite value(s)."
        )
    return array


def _check_confidence(confidence: float) -> float:
    if not _is_real(confidence) or not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {_show(confidence)}.")
    return float(confidence)


def _check_delta(delta: float, *, allow_zero: bool = True) -> float:
    low = "[0" if allow_zero else "(0"
    ok = _is_real(delta) and (0 <= delta < 1 if allow_zero else 0 < delta < 1)
    if not ok:
        raise ValueError(f"delta must be in {low}, 1), got {_show(delta)}.")
    return float(delta)


def _check_count(name: str, k: Any, n_name: str, n: Any) -> tuple[int, int]:
    if not _is_int(n) or n < 1:
        raise ValueError(f"{n_name} must be an integer >= 1, got {_show(n)}.")
    if not _is_int(k) or not 0 <= k <= n:
        raise ValueError(f"{name} must be an integer in [0, {n_name}={n}], got {_show(k)}.")
    return int(k), int(n)


def _show(x: Any) -> str:
    """How a value appears in an error message: numbers plainly (1.3, not np.float64(1.3))."""
    return str(x) if isinstance(x, numbers.Number) else repr(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class AuditOptions:
    """How an audit turns counts into a bound; checked once here.

    Attributes:
      confidence: probability that the reported bound holds, in (0.5, 1).
      delta: the δ of the (ε, δ)-DP claim under test, in [0, 1).
      correction: how a search over thresholds / guess counts is paid for: ``"bonferroni"``
        (significance divided by the number of choices searched) or ``"split"`` (choose on a
        random ``split_fraction`` of the data, bound on the rest).
      split_fraction: fraction of the data used to choose, for ``correction="split"``, in (0, 1).
      seed: seed of the split and of random tie-breaking; fixed by default so that a report can be
        reproduced. The audit draws from its own child streams of this seed (see :func:`_rng`), so
        they cannot replay the draws of ``np.random.default_rng(seed)`` that may have decided which
        canaries were included. Trying several seeds and keeping the best bound is itself a search.
    """

    confidence: float = 0.95
    delta: float = 0.0
    correction: Correction = "bonferroni"
    split_fraction: float = 0.5
    seed: int | None = 0

    def __post_init__(self) -> None:
        _check_confidence(self.confidence)
        _check_delta(self.delta)
        if self.correction not in _CORRECTIONS:
            allowed = ", ".join(repr(c) for c in _CORRECTIONS)
            raise ValueError(f"correction must be one of {allowed}, got {_show(self.correction)}.")
        if not _is_real(self.split_fraction) or not 0 < self.split_fraction < 1:
            raise ValueError(
                f"split_fraction must be in (0, 1), got {_show(self.split_fraction)}."
            )
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {_show(self.seed)}.")

    @property
    def significance(self) -> float:
        """1 − confidence: the probability that the reported bound is wrong."""
        return 1.0 - self.confidence


_TIE_BREAK, _SPLIT = 1, 2  # purposes of the audit's random streams
_AUDIT_TAG = 0x61756469  # "audi": keeps the spawn keys clear of SeedSequence(seed).spawn(n)


def _rng(seed: int | None, purpose: int) -> np.random.Generator:
    """A generator for one purpose of the audit, independent of ``default_rng(seed)``.

    A caller who drew the canaries' inclusion with ``np.random.default_rng(0)`` and audits with
    seed 0 must not get the same numbers back: if tie-breaks replayed the inclusion draws, tied
    scores would be ordered by membership and the bound would be meaningless. A spawn key that
    ``SeedSequence.spawn`` would not produce gives a separate stream of the same seed.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_AUDIT_TAG, purpose)))


# --------------------------------------------------------------------------------------------
# Clopper-Pearson
# --------------------------------------------------------------------------------------------


def _cp_lower(k: Any, n: Any, significance: float) -> np.ndarray:
    """One-sided exact lower bound p with P[Bin(n, p) ≥ k] = significance (0 when k = 0)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = stats.beta.ppf(significance, k, n - k + 1)
    return np.where(k > 0, bound, 0.0)


def _cp_upper(k: Any, n: Any, significance: float) -> np.ndarray:
    """One-sided exact upper bound p with P[Bin(n, p) ≤ k] = significance (1 when k = n)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = stats.beta.isf(significance, k + 1, n - k)
    return np.where(k < n, bound, 1.0)


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Central two-sided Clopper-Pearson interval for a binomial proportion (Clopper, Pearson 1934).

    With s = 1 − confidence, the lower end p_lo solves P[Bin(n, p_lo) ≥ k] = s/2, i.e. it is the
    s/2 quantile of Beta(k, n − k + 1); the upper end is the 1 − s/2 quantile of Beta(k + 1, n − k).
    Each end is a one-sided bound at level s/2.

    >>> lo, hi = clopper_pearson_interval(500, 1000)
    >>> round(lo, 4), round(hi, 4)
    (0.4685, 0.5315)
    """
    k, n = _check_count("k", k, "n", n)
    s = 1.0 - _check_confidence(confidence)
    return float(_cp_lower(k, n, s / 2)), float(_cp_upper(k, n, s / 2))


def _cp_epsilons(tp, n_pos, fp, n_neg, significance_each: float, delta: float) -> np.ndarray:
    """ε lower bounds of the two directions, maximized, for arrays of counts (see below)."""
    tpr_lb = _cp_lower(tp, n_pos, significance_each)
    fpr_ub = _cp_upper(fp, n_neg, significance_each)
    fnr_ub = 1.0 - tpr_lb
    tnr_lb = 1.0 - fpr_ub
    with np.errstate(invalid="ignore", divide="ignore"):
        forward = np.where(tpr_lb > delta, np.log(tpr_lb - delta) - np.log(fpr_ub), 0.0)
        backward = np.where(tnr_lb > delta, np.log(tnr_lb - delta) - np.log(fnr_ub), 0.0)
    return np.maximum(np.maximum(forward, backward), 0.0)


def epsilon_clopper_pearson(
    true_positives: int,
    n_positives: int,
    false_positives: int,
    n_negatives: int,
    *,
    confidence: float = 0.95,
    delta: float = 0.0,
) -> float:
    """ε lower bound from one membership test's counts (Jagielski, Ullman, Oprea 2020).

    Jagielski, Ullman, Oprea, "Auditing differentially private machine learning: how private is
    private SGD?" (NeurIPS 2020).

    An (ε, δ)-DP mechanism makes every test of "in" against "out" obey (Kairouz et al. 2015)

        TPR ≤ e^ε · FPR + δ     and     TNR ≤ e^ε · FNR + δ,

    so ε ≥ ln((TPR − δ) / FPR) and ε ≥ ln((TNR − δ) / FNR). Replacing the rates by exact
    Clopper-Pearson bounds, TPR_lb and FPR_ub, each one-sided at level (1 − confidence)/2,

        ε_lb = max(ln((TPR_lb − δ) / FPR_ub), ln((1 − FPR_ub − δ) / (1 − TPR_lb)), 0)

    holds with probability ≥ confidence: both directions use the same two bounds (TNR_lb = 1 − FPR_ub,
    FNR_ub = 1 − TPR_lb), so taking the better one costs nothing (Nasr et al. 2021, "Adversary
    instantiation", use both directions likewise). A term whose numerator is ≤ 0 contributes 0.

    "Positives" are members: ``true_positives`` members were called "in" out of ``n_positives``;
    ``false_positives`` non-members were called "in" out of ``n_negatives``. The counts must come from
    a test fixed before looking at them; see :class:`CanaryScoreAuditor` for a corrected search.

    >>> round(epsilon_clopper_pearson(500, 1000, 10, 1000), 3)
    3.242
    """
    tp, n_pos = _check_count("true_positives", true_positives, "n_positives", n_positives)
    fp, n_neg = _check_count("false_positives", false_positives, "n_negatives", n_negatives)
    s = 1.0 - _check_confidence(confidence)
    delta = _check_delta(delta)
    return float(_cp_epsilons(tp, n_pos, fp, n_neg, s / 2, delta))


# --------------------------------------------------------------------------------------------
# Gaussian differential privacy
# --------------------------------------------------------------------------------------------


def gdp_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of a μ-GDP mechanism (Dong, Roth, Su 2019, Corollary 2.13).

        δ(ε) = Φ(−ε/μ + μ/2) − e^ε · Φ(−ε/μ − μ/2)

    evaluated in log space so that it stays accurate when δ is tiny.

    >>> round(gdp_delta(1.0, 0.0), 4)  # 2Φ(μ/2) − 1
    0.3829
    """
    if not _is_real(mu) or not 0 <= mu < math.inf:
        raise ValueError(f"mu must be a finite number >= 0, got {_show(mu)}.")
    if not _is_real(epsilon) or not 0 <= epsilon < math.inf:
        raise ValueError(f"epsilon must be a finite number >= 0, got {_show(epsilon)}.")
    if mu == 0:
        return 0.0
    log_a = special.log_ndtr(-epsilon / mu + mu / 2)
    log_b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    gap = min(log_b - log_a, 0.0)  # ≤ 0 in exact arithmetic
    return float(math.exp(log_a) * -math.expm1(gap))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which a μ-GDP mechanism is (ε, δ)-DP: the root of gdp_delta(μ, ε) = δ.

    δ(ε) decreases in ε, so the root is found by bisection; the lower end of the final bracket is
    returned, so the result never exceeds the exact root (the safe side for a lower bound).
    Returns 0 when δ(0) = 2Φ(μ/2) − 1 ≤ δ already.

    >>> round(gdp_epsilon(1.0, 1e-5), 3)
    4.377
    """
    if not _is_real(mu) or not 0 <= mu < math.inf:
        raise ValueError(f"mu must be a finite number >= 0, got {_show(mu)}.")
    delta = _check_delta(delta, allow_zero=False)
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, 2.0 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return lo


def _gdp_mus(tp, n_pos, fp, n_neg, significance_each: float) -> np.ndarray:
    fpr_ub = _cp_upper(fp, n_neg, significance_each)
    fnr_ub = _cp_upper(np.asarray(n_pos) - np.asarray(tp), n_pos, significance_each)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = stats.norm.isf(fpr_ub) - stats.norm.ppf(fnr_ub)
    return np.maximum(np.nan_to_num(mu, nan=0.0, neginf=0.0), 0.0)


def mu_gdp_lower_bound(
    true_positives: int,
    n_positives: int,
    false_positives: int,
    n_negatives: int,
    *,
    confidence: float = 0.95,
) -> float:
    """Lower bound on μ of μ-GDP from one test's counts (Nasr et al. 2023).

    Nasr, Hayes, Steinke, Balle, Tramèr, Jagielski, Carlini, Terzis, "Tight auditing of
    differentially private machine learning" (USENIX Security 2023). A μ-GDP mechanism has the
    trade-off function G_μ(α) = Φ(Φ⁻¹(1 − α) − μ) (Dong, Roth, Su 2019, "Gaussian differential
    privacy", §2): every test has FNR ≥ Φ(Φ⁻¹(1 − FPR) − μ), so μ ≥ Φ⁻¹(1 − FPR) − Φ⁻¹(FNR). The right
    side decreases in FPR and in FNR, so upper Clopper-Pearson bounds on both, each one-sided at
    (1 − confidence)/2, give

        μ_lb = max(Φ⁻¹(1 − FPR_ub) − Φ⁻¹(FNR_ub), 0)

    with probability ≥ confidence. G_μ is symmetric, so the reversed test gives the same formula.
    """
    tp, n_pos = _check_count("true_positives", true_positives, "n_positives", n_positives)
    fp, n_neg = _check_count("false_positives", false_positives, "n_negatives", n_negatives)
    s = 1.0 - _check_confidence(confidence)
    return float(_gdp_mus(tp, n_pos, fp, n_neg, s / 2))


def epsilon_gdp(
    true_positives: int,
    n_positives: int,
    false_positives: int,
    n_negatives: int,
    *,
    confidence: float = 0.95,
    delta: float = 1e-5,
) -> float:
    """ε lower bound through Gaussian DP: ``gdp_epsilon(mu_gdp_lower_bound(...), delta)``.

    This is a lower bound on ε *if* the mechanism's privacy is exactly some μ-GDP (Nasr et al. 2023
    find DP-SGD's final model close to it); for other mechanisms it is an estimate, not a bound, and
    :func:`epsilon_clopper_pearson` is the assumption-free one. δ must be > 0: μ-GDP with μ > 0 is
    never (ε, 0)-DP.
    """
    delta = _check_delta(delta, allow_zero=False)
    mu = mu_gdp_lower_bound(
        true_positives, n_positives, false_positives, n_negatives, confidence=confidence
    )
    return gdp_epsilon(mu, delta)


# --------------------------------------------------------------------------------------------
# One training run
# --------------------------------------------------------------------------------------------


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[≥ v correct guesses] if the mechanism were (ε, δ)-DP.

    Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run" (NeurIPS 2023,
    arXiv:2305.08846): their main theorem (Theorem 3.1) and its (ε, δ) form (Corollary 5.4), computed
    as in their Appendix D. m canaries are each included independently with probability ½; the
    auditor guesses on r of them and W of the guesses are right. With q = e^ε / (1 + e^ε) (the
    accuracy of ε-randomized response) and B ~ Binomial(r, q),

        P[W ≥ v] ≤ β + 2·m·δ·α,   β = P[B ≥ v],   α = max_{1 ≤ i ≤ v} P[v − i ≤ B < v] / i.

    For δ = 0 this is the binomial tail alone. The result is capped at 1.
    """
    _check_one_run_counts(m, r, v)
    if not _is_real(epsilon) or not 0 <= epsilon < math.inf:
        raise ValueError(f"epsilon must be a finite number >= 0, got {_show(epsilon)}.")
    delta = _check_delta(delta)
    return _one_run_p_value(int(m), int(r), int(v), float(epsilon), delta)


def _one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    # scipy.special directly: the stats.binom front end costs ~100x more per call, and the search
    # for ε evaluates this some 50 times per (r, v).
    q = float(special.expit(epsilon))
    beta = float(special.bdtrc(v - 1, r, q))  # P[B ≥ v] = P[B > v − 1]
    if delta == 0.0 or v == 0:
        return min(beta, 1.0)
    # P[v − i ≤ B ≤ v − 1] for i = 1..v, as a running sum of point masses (no cancellation).
    masses = np.cumsum(_binom_pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(masses / np.arange(1, v + 1)))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def _binom_pmf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    log_choose = special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
    return np.exp(log_choose + special.xlogy(k, p) + special.xlog1py(n - k, -p))


def _check_one_run_counts(m: Any, r: Any, v: Any) -> None:
    if not _is_int(m) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {_show(m)}.")
    if not _is_int(r) or not 0 <= r <= m:
        raise ValueError(f"r must be an integer in [0, m={m}], got {_show(r)}.")
    if not _is_int(v) or not 0 <= v <= r:
        raise ValueError(f"v must be an integer in [0, r={r}], got {_show(v)}.")


def epsilon_one_run(
    m: int, r: int, v: int, *, confidence: float = 0.95, delta: float = 0.0
) -> float:
    """ε lower bound of the one-run audit (Steinke, Nasr, Jagielski 2023, Appendix D).

        ε_lb = sup {ε ≥ 0 : one_run_p_value(m, r, v, ε, δ) ≤ 1 − confidence}

    i.e. every (ε, δ) claim with ε < ε_lb is rejected at significance 1 − confidence. Found by
    bisection that keeps p(lo) ≤ significance < p(hi) and returns lo, so the reported value is itself
    rejected. Returns 0 when even ε = 0 cannot be rejected.

    >>> round(epsilon_one_run(1000, 100, 100), 3)
    3.493
    """
    _check_one_run_counts(m, r, v)
    s = 1.0 - _check_confidence(confidence)
    delta = _check_delta(delta)
    return _epsilon_one_run(int(m), int(r), int(v), s, delta)


def _epsilon_one_run(
    m: int, r: int, v: int, significance: float, delta: float, p_at_zero: float | None = None
) -> float:
    def rejected(eps: float) -> bool:
        return _one_run_p_value(m, r, v, eps, delta) <= significance

    if r == 0:
        return 0.0
    if p_at_zero is None:
        p_at_zero = _one_run_p_value(m, r, v, 0.0, delta)
    if p_at_zero > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:  # p ≤ significance for all ε: cannot happen for 0 < significance < 1
            return lo
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-10:
            break
    return lo


# --------------------------------------------------------------------------------------------
# One training run, f-DP form (Mahloujifar, Melis, Chaudhuri 2024)
# --------------------------------------------------------------------------------------------


def _one_run_required_mass(m: int, r: np.ndarray, v: np.ndarray, shape: tuple[int, int],
                           inverse_power: Callable[[np.ndarray, np.ndarray], np.ndarray],
                           significance: float) -> np.ndarray:
    """Probability mass a mechanism needs for P[≥ v of r guesses right] ≥ significance.

    Mahloujifar, Melis, Chaudhuri 2024, "Auditing f-differential privacy in one run" (ICML 2025,
    arXiv:2410.22235), numerical bound for membership guessing with abstentions (k = 2 choices per
    canary). Write τ = significance. Starting from the mass τ·v/m on right guesses and τ·(r − v)/m
    on wrong ones, the recursion for i = v − 1, …, 0

        h_i = max(h_{i+1}, f̄⁻¹(r_{i+1})),   r_i = r_{i+1} + i/(r − i) · (h_i − h_{i+1})

    spreads the mass that f-DP forces onto fewer right guesses, where f̄⁻¹ is the inverse of the
    trade-off curve's blow-up x ↦ 1 − f(x): the least type-I error a test of power x needs. If
    the total r_0 + h_0 exceeds r/m (all the mass r guesses out of m can carry), no mechanism
    with that curve can make ≥ v right with probability τ: the claim is rejected.

    Shapes: r, v [P]; the result [P, G] = ``shape``, one column per candidate curve;
    ``inverse_power(x, cells)`` gives f̄⁻¹(x) for the cells (a boolean [P, G] mask) x belongs to.
    """
    r = np.asarray(r, dtype=np.float64)[:, None]
    v_int = np.asarray(v, dtype=np.int64)
    h = np.broadcast_to(significance * (r - v_int[:, None]) / m, shape).copy()
    mass = np.broadcast_to(significance * v_int[:, None] / m, shape).copy()
    budget = np.broadcast_to(r / m, shape)
    # Both sequences only grow as i falls, so a cell is settled once it is over budget
    # (rejected), or once h stops growing (then nothing changes any more: a fixed point).
    moving = np.broadcast_to(r > 0, shape).copy()
    i = int(v_int.max(initial=0)) - 1
    while i >= 0:
        live = moving & (i < v_int)[:, None]  # pairs with fewer right guesses have not started
        if not live.any():  # jump to where the next pair still moving starts
            waiting = v_int[(v_int - 1 < i) & moving.any(axis=1)]
            if not waiting.size:
                break
            i = int(waiting.max()) - 1
            continue
        grown = np.maximum(h[live], inverse_power(np.minimum(mass[live], 1.0), live))
        ri = r[:, 0][np.nonzero(live)[0]]
        mass[live] += i / np.maximum(ri - i, 1.0) * (grown - h[live])
        still = (grown > h[live]) & (mass[live] + grown <= budget[live])
        h[live] = grown
        moving[live] = still
        i -= 1
    return mass + h


def _gdp_required_mass(m: int, r: np.ndarray, v: np.ndarray, mus: np.ndarray,
                       significance: float) -> np.ndarray:
    """:func:`_one_run_required_mass` for f = G_μ, whose f̄⁻¹(x) = Φ(Φ⁻¹(x) − μ); mus [P, G]."""
    return _one_run_required_mass(
        m, r, v, mus.shape, lambda x, cells: special.ndtr(special.ndtri(x) - mus[cells]), significance)


def _gdp_mu_lb(m: int, r: np.ndarray, v: np.ndarray, significance: float) -> np.ndarray:
    """Per (r, v): the largest μ at which "the mechanism is μ-GDP" is rejected (0 if none).

    Rejection is monotone in μ (a smaller μ pulls more mass), so a geometric grid brackets the
    boundary and two finer grids inside the bracket narrow it to < 0.1%; the value returned is
    itself rejected (the safe side for a lower bound).
    """
    r = np.asarray(r, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    budget = r / m

    def rejected(mus: np.ndarray) -> np.ndarray:
        return _gdp_required_mass(m, r, v, mus, significance) > budget[:, None]

    grid = np.broadcast_to(np.geomspace(1e-3, 64.0, 64), (r.size, 64))
    rej = rejected(grid) & (r > 0)[:, None]
    lo = np.where(rej.any(axis=1), np.max(np.where(rej, grid, 0.0), axis=1), 0.0)
    hi = np.where(rej.all(axis=1), grid[:, -1], np.min(np.where(rej, np.inf, grid), axis=1))
    for _ in range(2):
        fine = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, 34)[None, 1:-1]
        rej = rejected(fine) & (lo > 0)[:, None]
        new_lo = np.maximum(lo, np.max(np.where(rej, fine, 0.0), axis=1))
        hi = np.minimum(hi, np.min(np.where(rej, np.inf, fine), axis=1))
        lo = new_lo
    return lo


def mu_one_run(m: int, r: int, v: int, *, confidence: float = 0.95) -> float:
    """Lower bound on μ of μ-GDP from one run: v of r guesses right among m canaries.

    Every μ-GDP claim with μ below the returned value is rejected at significance 1 − confidence
    (see :func:`_gdp_required_mass`). Like :func:`epsilon_gdp`, it is a bound on the assumption that
    the mechanism's trade-off curve is Gaussian (DP-SGD's nearly is); it is tighter than the
    (ε, δ) one-run bound because it uses the whole curve, not one point of it.
    """
    _check_one_run_counts(m, r, v)
    s = 1.0 - _check_confidence(confidence)
    return float(_gdp_mu_lb(int(m), np.array([r]), np.array([v]), s)[0])


def epsilon_one_run_fdp(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95) -> float:
    """The f-DP one-run bound expressed as ε at ``delta``: gdp_epsilon(mu_one_run(m, r, v), δ)."""
    delta = _check_delta(delta, allow_zero=False)
    return gdp_epsilon(mu_one_run(m, r, v, confidence=confidence), delta)


def inverse_power_table(epsilons: Any, deltas: Any) -> tuple[np.ndarray, np.ndarray]:
    """The trade-off curve an (ε, δ(ε)) privacy profile guarantees, as "least type-I error α
    needed for power x", tabulated on a grid of x (Dong, Roth, Su 2019, Proposition 2.12):

        f(α) = sup_ε max{0, 1 − δ(ε) − e^ε α, e^{−ε}(1 − δ(ε) − α)}
        α*(x) = max{0, sup_ε max[(x − δ(ε)) e^{−ε}, 1 − δ(ε) − e^ε (1 − x)]}

    ``epsilons`` must include 0. Use with :func:`curve_one_run_rejects` to audit a mechanism
    against its own accountant's curve (Mahloujifar et al. 2024's "hypothesized f-DP curve").
    """
    eps = np.asarray(epsilons, dtype=np.float64)[None, :]
    dlt = np.asarray(deltas, dtype=np.float64)[None, :]
    x = np.unique(np.concatenate([np.geomspace(1e-16, 1e-3, 1300), np.linspace(1e-3, 1.0, 1000)]))
    xs = x[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.maximum((xs - dlt) * np.exp(-eps), 1.0 - dlt - np.exp(eps) * (1.0 - xs))
    alpha = np.clip(np.nanmax(a, axis=1), 0.0, None)
    return x, np.minimum(alpha, x)  # the trivial test: α = power


def curve_one_run_rejects(m: int, r: Any, v: Any, table: tuple[np.ndarray, np.ndarray],
                          significance: float) -> np.ndarray:
    """Per (r, v): whether P[≥ v of r guesses right] ≥ significance is impossible for a
    mechanism with the trade-off curve of ``table`` (:func:`inverse_power_table`): the recursion
    of :func:`_one_run_required_mass` with that curve in place of G_μ."""
    x, alpha = table
    r = np.asarray(r, dtype=np.float64)
    mass = _one_run_required_mass(m, r, v, (r.size, 1), lambda xs, cells: np.interp(xs, x, alpha),
                                  significance)[:, 0]
    return (mass > r / m) & (r > 0)


def one_run_guesses(scores: Any, included: Any, k_positive: Sequence[int],
                    k_negative: Sequence[int], seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """(r, v) of each (k_positive[i], k_negative[i]) guess, ranked as :func:`one_run_audit`
    ranks (ties broken at random, never by position)."""
    scores = as_scores(scores, "scores")
    included = np.asarray(included, dtype=bool)
    order = np.lexsort((_rng(seed, _TIE_BREAK).random(scores.size), -scores))
    ranked = included[order]
    r = np.array([kp + kn for kp, kn in zip(k_positive, k_negative)])
    v = np.array([_one_run_v(ranked, kp, kn) for kp, kn in zip(k_positive, k_negative)])
    return r, v


@dataclasses.dataclass(frozen=True)
class OneRunAuditResult:
    """Outcome of :func:`one_run_audit`.

    Attributes:
      epsilon_lb: the ε lower bound.
      m: canaries the bound was evaluated on (the held-back part under ``correction="split"``).
      r: guesses made (k_positive + k_negative); v: guesses that were right.
      k_positive, k_negative: the guess counts behind the bound (scaled to the evaluated part).
      confidence, delta: the claim tested.
      correction: ``"none"`` (a single choice, nothing searched), ``"bonferroni"`` or ``"split"``.
      n_choices: how many (k_positive, k_negative) pairs were searched.
      bound: ``"eps-delta"`` (Steinke et al.'s (ε, δ) bound) or ``"f-dp"`` (Mahloujifar et al.'s
        bound for a Gaussian trade-off curve; then ``mu_lb`` is the μ-GDP lower bound and
        ``epsilon_lb`` its ε at ``delta``).
    """

    epsilon_lb: float
    m: int
    r: int
    v: int
    k_positive: int
    k_negative: int
    confidence: float
    delta: float
    correction: str
    n_choices: int
    bound: str = "eps-delta"
    mu_lb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain ints/floats/strings for JSON."""
        return _plain(dataclasses.asdict(self))


def _as_k_list(k: int | Sequence[int], name: str, m: int) -> list[int]:
    ks = [k] if _is_int(k) else list(k) if isinstance(k, (Sequence, np.ndarray)) else None
    if not ks or not all(_is_int(x) and 0 <= x <= m for x in ks):
        raise ValueError(
            f"{name} must be an integer or a non-empty sequence of integers in [0, m={m}], "
            f"got {_show(k)}."
        )
    return [int(x) for x in ks]


def _one_run_v(included_by_rank: np.ndarray, k_pos: int, k_neg: int) -> int:
    """Right guesses when the top k_pos are called "in" and the bottom k_neg "out"."""
    m = included_by_rank.size
    right_ins = int(np.count_nonzero(included_by_rank[:k_pos]))
    right_outs = int(np.count_nonzero(~included_by_rank[m - k_neg :])) if k_neg else 0
    return right_ins + right_outs


def one_run_audit(
    scores: Any,
    included: Any,
    *,
    k_positive: int | Sequence[int],
    k_negative: int | Sequence[int] | None = None,
    delta: float = 0.0,
    confidence: float = 0.95,
    correction: Correction = "bonferroni",
    split_fraction: float = 0.5,
    seed: int | None = 0,
    bound: Literal["eps-delta", "f-dp"] = "eps-delta",
    paired: bool = False,
) -> OneRunAuditResult:
    """Run the one-run audit (Steinke, Nasr, Jagielski 2023) on the canaries' scores.

    The auditor calls "in" the ``k_positive`` highest-scoring canaries, "out" the ``k_negative``
    lowest, and abstains on the rest; r = k_positive + k_negative, v = right calls, and the bound is
    :func:`epsilon_one_run` (m, r, v). Ties in score are broken at random (seeded), never by position,
    so an input sorted by membership cannot inflate v. The theorem assumes each canary was included
    independently with probability ½; ``included`` records what happened and is not checked for it.

    Passing sequences for ``k_positive`` / ``k_negative`` searches every pair, which must be paid for:

    * ``"bonferroni"``: each pair is bounded at significance (1 − confidence)/n_choices and the best
      bound is reported;
    * ``"split"``: a random ``split_fraction`` of the canaries picks the best pair (each k scaled by
      the part's share of m, rounded down), and the bound is computed on the other canaries alone with
      the chosen pair scaled likewise. Given the choosing part, the rest is a fresh one-run audit with
      fewer canaries, so the theorem applies unchanged.

    A single pair involves no search: the result then says ``correction="none"``.

    ``paired=True`` searches the pairs (k_positive[i], k_negative[i]) instead of every
    combination: fewer choices, so a smaller Bonferroni price when the auditor knows it wants as
    many "out" calls as "in" calls.

    ``bound="f-dp"`` bounds the same guesses with :func:`mu_one_run` (Mahloujifar et al. 2024)
    and reports μ_lb and its ε at ``delta`` (> 0): tighter, on the assumption of a Gaussian
    trade-off curve; the default (ε, δ) bound assumes nothing about the curve's shape.
    """
    scores = as_scores(scores, "scores")
    m = scores.size
    included_arr = np.asarray(included)
    if included_arr.shape != (m,) or not (
        included_arr.dtype == bool or np.all((included_arr == 0) | (included_arr == 1))
    ):
        raise ValueError(
            f"included must be a 1-D boolean (or 0/1) array with the length of scores ({m}), "
            f"got shape {included_arr.shape} and dtype {included_arr.dtype}."
        )
    included_arr = included_arr.astype(bool)
    if bound not in ("eps-delta", "f-dp"):
        raise ValueError(f"bound must be 'eps-delta' or 'f-dp', got {_show(bound)}.")
    if bound == "f-dp":
        _check_delta(delta, allow_zero=False)
    options = AuditOptions(
        confidence=confidence,
        delta=delta,
        correction=correction,
        split_fraction=split_fraction,
        seed=seed,
    )
    k_pos_list = _as_k_list(k_positive, "k_positive", m)
    k_neg_list = [0] if k_negative is None else _as_k_list(k_negative, "k_negative", m)
    if paired:
        if k_negative is None or len(k_pos_list) != len(k_neg_list):
            raise ValueError("paired=True needs k_positive and k_negative of the same length.")
        choices = list(zip(k_pos_list, k_neg_list))
    else:
        choices = list(itertools.product(k_pos_list, k_neg_list))
    for k_pos, k_neg in choices:
        if k_pos + k_neg > m:
            raise ValueError(
                f"k_positive + k_negative must be <= m={m}, "
                f"got {k_pos} + {k_neg} = {k_pos + k_neg}."
            )
    if all(k_pos + k_neg == 0 for k_pos, k_neg in choices):
        raise ValueError("k_positive + k_negative must be >= 1 for at least one choice, got 0.")

    tie_break = _rng(options.seed, _TIE_BREAK).random(m)
    order = np.lexsort((tie_break, -scores))  # highest score first, ties in random order
    ranked = included_arr[order]
    s = options.significance

    n_choices = len(choices)
    at = _one_run_at if bound == "eps-delta" else _fdp_one_run_at
    if n_choices == 1:
        best = at(ranked, choices[:1], s, options.delta)[0]
        used, m_eval = "none", m
    elif options.correction == "bonferroni":
        best = max(at(ranked, choices, s / n_choices, options.delta), key=_OneRunBound.strength)
        used, m_eval = "bonferroni", m
    else:
        m_choose = math.floor(options.split_fraction * m)
        m_eval = m - m_choose
        if m_choose == 0 or m_eval == 0:
            raise ValueError(
                f"split_fraction={options.split_fraction} leaves an empty part of the m={m} "
                "canaries; use more canaries or correction='bonferroni'."
            )
        choose = np.zeros(m, dtype=bool)
        choose[_rng(options.seed, _SPLIT).permutation(m)[:m_choose]] = True
        ranked_choose, ranked_eval = ranked[choose[order]], ranked[~choose[order]]

        def scaled(pair: tuple[int, int], size: int) -> tuple[int, int]:
            return (pair[0] * size) // m, (pair[1] * size) // m

        trials = at(ranked_choose, [scaled(pair, m_choose) for pair in choices], s, options.delta)
        chosen = choices[max(range(n_choices), key=lambda i: trials[i].strength())]
        best = at(ranked_eval, [scaled(chosen, m_eval)], s, options.delta)[0]
        used = "split"
    bound_result = best
    return OneRunAuditResult(
        epsilon_lb=bound_result.epsilon_lb,
        m=int(m_eval),
        r=bound_result.k_positive + bound_result.k_negative,
        v=bound_result.v,
        k_positive=bound_result.k_positive,
        k_negative=bound_result.k_negative,
        confidence=options.confidence,
        delta=options.delta,
        correction=used,
        n_choices=n_choices,
        bound=bound,
        mu_lb=bound_result.mu_lb,
    )


@dataclasses.dataclass(frozen=True)
class _OneRunBound:
    epsilon_lb: float
    v: int
    k_positive: int
    k_negative: int
    p_value_at_zero: float
    mu_lb: float | None = None

    def strength(self) -> tuple[float, float]:
        """Order of preference: larger ε_lb, then (all ε bounds 0) larger μ_lb or smaller p-value
        against ε = 0."""
        return self.epsilon_lb, self.mu_lb if self.mu_lb is not None else -self.p_value_at_zero


def _one_run_at(
    ranked: np.ndarray, pairs: list[tuple[int, int]], significance: float, delta: float
) -> list[_OneRunBound]:
    """The (ε, δ) one-run bound for each (k_positive, k_negative) on canaries ranked by score."""
    out = []
    for k_pos, k_neg in pairs:
        r, v = k_pos + k_neg, _one_run_v(ranked, k_pos, k_neg)
        p0 = _one_run_p_value(ranked.size, r, v, 0.0, delta) if r else 1.0
        out.append(_OneRunBound(
            epsilon_lb=float(_epsilon_one_run(ranked.size, r, v, significance, delta, p0)),
            v=v, k_positive=k_pos, k_negative=k_neg, p_value_at_zero=p0,
        ))
    return out


def _fdp_one_run_at(
    ranked: np.ndarray, pairs: list[tuple[int, int]], significance: float, delta: float
) -> list[_OneRunBound]:
    """The f-DP (μ-GDP) one-run bound for every pair at once (the recursion is vectorized)."""
    rs = np.array([k_pos + k_neg for k_pos, k_neg in pairs])
    vs = np.array([_one_run_v(ranked, k_pos, k_neg) for k_pos, k_neg in pairs])
    mus = _gdp_mu_lb(ranked.size, rs, vs, significance)
    return [
        _OneRunBound(
            epsilon_lb=gdp_epsilon(float(mu), delta), v=int(v), k_positive=k_pos, k_negative=k_neg,
            p_value_at_zero=math.nan, mu_lb=float(mu),
        )
        for (k_pos, k_neg), v, mu in zip(pairs, vs, mus)
    ]


# --------------------------------------------------------------------------------------------
# Threshold search on in/out scores
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ThresholdAuditResult:
    """Outcome of a threshold audit by :class:`CanaryScoreAuditor`.

    The test is "in iff score ≥ threshold". The counts are those the bound was computed from (the
    held-back part under ``correction="split"``). ``mu_lb`` is set by the GDP audit only.
    ``correction`` is ``"none"`` when the caller fixed the threshold, else ``"bonferroni"`` or
    ``"split"``; ``n_choices`` is the number of thresholds searched.
    """

    epsilon_lb: float
    method: str
    threshold: float
    true_positives: int
    n_positives: int
    false_positives: int
    n_negatives: int
    confidence: float
    delta: float
    correction: str
    n_choices: int
    mu_lb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain ints/floats/strings/None for JSON."""
        return _plain(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class TprAtFprResult:
    """Outcome of :meth:`CanaryScoreAuditor.tpr_at_given_fpr`.

    ``tpr`` and ``fpr`` are empirical at ``threshold``; ``false_positives`` ≤
    ``floor(fpr_target · n_negatives)`` is how many non-members back the figure. ``tpr_lb`` is a
    one-sided Clopper-Pearson lower bound on the TPR of that threshold at ``confidence``.
    """

    fpr_target: float
    threshold: float
    tpr: float
    tpr_lb: float
    fpr: float
    true_positives: int
    n_positives: int
    false_positives: int
    n_negatives: int
    confidence: float
    correction: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain ints/floats/strings for JSON (an infinite threshold becomes None)."""
        return _plain(dataclasses.asdict(self))


def _counts_at(
    in_sorted: np.ndarray, out_sorted: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives of "in iff score ≥ t" for each t (score arrays sorted ascending)."""
    tp = in_sorted.size - np.searchsorted(in_sorted, thresholds, side="left")
    fp = out_sorted.size - np.searchsorted(out_sorted, thresholds, side="left")
    return tp, fp


# A statistic maps (tp, n_pos, fp, n_neg, significance of each binomial bound) to one value per
# threshold, larger meaning a stronger bound: the ε of Clopper-Pearson, the μ of GDP.
_Statistic = Callable[[np.ndarray, int, np.ndarray, int, float], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Pick:
    """The threshold a search settled on and the counts its bound was computed from."""

    value: float
    threshold: float
    true_positives: int
    n_positives: int
    false_positives: int
    n_negatives: int
    correction: str
    n_choices: int

    @classmethod
    def at(cls, statistic, in_s, out_s, t, significance_each, correction, n_choices) -> _Pick:
        tp, fp = _counts_at(in_s, out_s, np.array([t]))
        value = statistic(tp, in_s.size, fp, out_s.size, significance_each)[0]
        return cls(
            value=float(value),
            threshold=float(t),
            true_positives=int(tp[0]),
            n_positives=int(in_s.size),
            false_positives=int(fp[0]),
            n_negatives=int(out_s.size),
            correction=correction,
            n_choices=int(n_choices),
        )

    def counts(self) -> dict[str, int]:
        return {
            "true_positives": self.true_positives,
            "n_positives": self.n_positives,
            "false_positives": self.false_positives,
            "n_negatives": self.n_negatives,
        }


def _best_threshold(statistic: _Statistic, in_s, out_s, significance_each: float) -> float:
    """The distinct score whose test maximizes ``statistic`` (the lowest among equals)."""
    candidates = np.union1d(in_s, out_s)
    tp, fp = _counts_at(in_s, out_s, candidates)
    values = statistic(tp, in_s.size, fp, out_s.size, significance_each)
    return float(candidates[int(np.argmax(values))])


class CanaryScoreAuditor:
    """Audits from the scores of canaries known to be in (members) and out (non-members).

    Built once from two 1-D score arrays (higher = more likely in) and checked once; each method
    estimates one quantity. The ε methods search the threshold t of the test "in iff score ≥ t" and
    pay for the search (see :class:`AuditOptions`):

    * ``"bonferroni"``: each of the n distinct scores is a candidate threshold, bounded at
      significance (1 − confidence)/n (halved again between its two binomial bounds); the best is
      reported. This is the practice of Nasr et al. 2023 and jax_privacy. Strictly, the candidate
      set is itself read off the data; the option with a clean argument is
    * ``"split"``: the threshold is chosen on a random ``split_fraction`` of each score array and
      the bound is computed on the remaining scores alone, with no further correction.

    Passing ``threshold=`` fixes the test in advance: no search, ``correction="none"``.

    >>> auditor = CanaryScoreAuditor(np.arange(100) + 30.0, np.arange(100.0))
    >>> result = auditor.epsilon_clopper_pearson(confidence=0.95)
    >>> result.correction, result.n_choices, result.epsilon_lb > 0
    ('bonferroni', 130, True)
    """

    def __init__(self, in_scores: Any, out_scores: Any) -> None:
        self._in = np.sort(as_scores(in_scores, "in_scores"))
        self._out = np.sort(as_scores(out_scores, "out_scores"))

    @property
    def n_in(self) -> int:
        """Number of in (member) canaries."""
        return int(self._in.size)

    @property
    def n_out(self) -> int:
        """Number of out (non-member) canaries."""
        return int(self._out.size)

    def _search(
        self, statistic: _Statistic, options: AuditOptions, threshold: float | None
    ) -> _Pick:
        s = options.significance
        if threshold is not None:
            if not _is_real(threshold) or not math.isfinite(threshold):
                raise ValueError(
                    f"threshold must be a finite number or None, got {_show(threshold)}."
                )
            return _Pick.at(statistic, self._in, self._out, threshold, s / 2, "none", 1)
        if options.correction == "bonferroni":
            n = np.union1d(self._in, self._out).size
            t = _best_threshold(statistic, self._in, self._out, s / (2 * n))
            return _Pick.at(statistic, self._in, self._out, t, s / (2 * n), "bonferroni", n)
        rng = _rng(options.seed, _SPLIT)
        in_choose, in_eval = _split(self._in, options.split_fraction, rng, "in_scores")
        out_choose, out_eval = _split(self._out, options.split_fraction, rng, "out_scores")
        n = np.union1d(in_choose, out_choose).size
        t = _best_threshold(statistic, in_choose, out_choose, s / 2)
        return _Pick.at(statistic, in_eval, out_eval, t, s / 2, "split", n)

    def epsilon_clopper_pearson(
        self,
        confidence: float = 0.95,
        delta: float = 0.0,
        *,
        correction: Correction = "bonferroni",
        threshold: float | None = None,
        split_fraction: float = 0.5,
        seed: int | None = 0,
    ) -> ThresholdAuditResult:
        """Best Clopper-Pearson ε lower bound over thresholds, corrected for the search.

        At each threshold the bound is that of :func:`epsilon_clopper_pearson` (Jagielski et al.
        2020): max(ln((TPR_lb − δ)/FPR_ub), ln((TNR_lb − δ)/FNR_ub), 0), each binomial bound
        one-sided at half the (corrected) significance.
        """
        options = AuditOptions(confidence, delta, correction, split_fraction, seed)

        def statistic(tp, n_pos, fp, n_neg, s_each):
            return _cp_epsilons(tp, n_pos, fp, n_neg, s_each, options.delta)

        pick = self._search(statistic, options, threshold)
        return ThresholdAuditResult(
            epsilon_lb=pick.value,
            method="clopper_pearson",
            threshold=pick.threshold,
            **pick.counts(),
            confidence=options.confidence,
            delta=options.delta,
            correction=pick.correction,
            n_choices=pick.n_choices,
        )

    def epsilon_gdp(
        self,
        confidence: float = 0.95,
        delta: float = 1e-5,
        *,
        correction: Correction = "bonferroni",
        threshold: float | None = None,
        split_fraction: float = 0.5,
        seed: int | None = 0,
    ) -> ThresholdAuditResult:
        """Best GDP ε lower bound over thresholds, corrected for the search (Nasr et al. 2023).

        Maximizes μ_lb = Φ⁻¹(1 − FPR_ub) − Φ⁻¹(FNR_ub) over thresholds (see
        :func:`mu_gdp_lower_bound`) and reports ``gdp_epsilon(μ_lb, delta)``; ε grows with μ, so the
        threshold that maximizes μ_lb maximizes the ε bound too. δ must be > 0.
        """
        delta = _check_delta(delta, allow_zero=False)
        options = AuditOptions(confidence, delta, correction, split_fraction, seed)
        pick = self._search(_gdp_mus, options, threshold)
        return ThresholdAuditResult(
            epsilon_lb=gdp_epsilon(pick.value, options.delta),
            method="gdp",
            threshold=pick.threshold,
            **pick.counts(),
            confidence=options.confidence,
            delta=options.delta,
            correction=pick.correction,
            n_choices=pick.n_choices,
            mu_lb=pick.value,
        )

    def tpr_at_given_fpr(self, fpr: float, *, confidence: float = 0.95) -> TprAtFprResult:
        """Highest empirical TPR of "in iff score ≥ t" with at most floor(fpr·n_out) false positives.

        Among the candidates (the distinct scores and +∞) whose false-positive count fits the
        budget, t reaches the highest TPR with the fewest false positives; there is no
        interpolation between thresholds. t depends on the out-scores alone,
        which are independent of the in-scores, so the one-sided Clopper-Pearson bound ``tpr_lb`` at
        significance 1 − confidence holds for it without correction (``correction="none"``).
        """
        if not _is_real(fpr) or not 0 < fpr < 1:
            raise ValueError(f"fpr must be in (0, 1), got {_show(fpr)}.")
        s = 1.0 - _check_confidence(confidence)
        budget = math.floor(fpr * self.n_out + 1e-9)
        candidates = np.append(np.union1d(self._in, self._out), np.inf)
        tp, fp = _counts_at(self._in, self._out, candidates)
        best = int(np.flatnonzero(fp <= budget)[0])  # candidates ascend: the first fit is best
        i = int(np.flatnonzero(tp == tp[best])[-1])  # same TPR, fewest false positives
        return TprAtFprResult(
            fpr_target=float(fpr),
            threshold=float(candidates[i]),
            tpr=float(tp[i] / self.n_in),
            tpr_lb=float(_cp_lower(tp[i], self.n_in, s)),
            fpr=float(fp[i] / self.n_out),
            true_positives=int(tp[i]),
            n_positives=self.n_in,
            false_positives=int(fp[i]),
            n_negatives=self.n_out,
            confidence=float(confidence),
        )


def _split(
    scores: np.ndarray, fraction: float, rng: np.random.Generator, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Random (choose, evaluate) parts of ``scores``, each returned sorted ascending."""
    n_choose = int(math.floor(fraction * scores.size))
    if n_choose == 0 or n_choose == scores.size:
        raise ValueError(
            f"{name} must leave at least one score in each part of the split, got {scores.size} "
            f"scores with split_fraction={fraction}."
        )
    perm = rng.permutation(scores.size)
    return np.sort(scores[perm[:n_choose]]), np.sort(scores[perm[n_choose:]])


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars → Python scalars; non-finite floats → None (JSON has no Infinity)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, (np.integer,)):
            value = int(value)
        elif isinstance(value, (float, np.floating)):
            value = float(value) if math.isfinite(value) else None
        out[key] = value
    return out
