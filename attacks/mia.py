"""Membership-inference attacks on arrays: loss threshold, LiRA, RMIA.

Every attack here maps what an attacker observed to one score per example, higher meaning "more
likely a member" — the convention of :mod:`attacks.metrics` and :mod:`attacks.audit`. Inputs are
the target model's signal on each example (see :mod:`attacks.signals`) and, for the attacks that
calibrate per example, the same signal under K reference ("shadow") models together with an IN/OUT
matrix ``in_mask[k, i]`` = "example i was in the training set of reference model k".

* **Loss** (Yeom, Giacomelli, Fredrikson, Jha 2018, "Privacy risk in machine learning"):
  score = −loss. Needs no reference model, and is blind to how hard each example is.
* **LiRA** (Carlini, Chien, Nasr, Song, Terzis, Tramèr 2022, "Membership inference attacks from
  first principles", §IV): on the logit-scaled confidence φ = log p_y − log(1 − p_y), fit
  per-example Gaussians to the reference models' φ with x IN, N(μ_in(x), σ_in²), and OUT,
  N(μ_out(x), σ_out²). Online (their eq. 4): score = log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²).
  Offline (§VI-C): a one-sided test against the OUT Gaussian only; the score is the standardized
  z = (φ − μ_out)/σ_out, a strictly increasing function of the test's confidence Φ(z) that, unlike
  Φ(z), never rounds to ties in the far tail.
  *Fixed variance* (§VI-A, recommended below 64 reference models): one global σ instead of
  per-example ones, which are too noisy to estimate from a few models.
* **RMIA** (Zarifzadeh, Liu, Jia, Shokri 2024, "Low-cost high-power membership inference
  attacks", §3): with Pr(x|θ) = p_y under the target and Pr(x) its average under reference models,
  LR(x, z) = [Pr(x|θ)/Pr(x)] / [Pr(z|θ)/Pr(z)], and score(x) = the fraction of population samples
  z with LR(x, z) ≥ γ. Online, Pr(x) is the mean over all reference models; offline, only OUT
  models are used and Pr(x) = ((1+a)/2)·mean_OUT Pr(x|θ') + (1−a)/2 (their §4, "offline").

Statistics per example (means, variances) come from ``in_mask``. When an example has no IN (or no
OUT) reference value, its missing mean is taken as the other group's mean shifted by the average
IN−OUT gap of the examples that have both (so the example keeps its own difficulty), or the global
mean of that group when no example has both; a missing variance is the global (pooled) one. With
the balanced assignment of :mod:`attacks.shadows` every example has K/2 of each and none of this is
needed.

This module uses numpy only: importing it does not pull in torch, scikit-learn or the trainer.

>>> phi = np.array([3.0, -1.0])
>>> ref = np.array([[2.9, -1.2], [0.1, -3.0], [3.1, -0.8], [0.0, -3.1]])
>>> inn = np.array([[True, True], [False, False], [True, True], [False, False]])
>>> s = lira(phi, ref, inn)
>>> bool(s[0] > 0 and s[1] > 0)
True
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from typing import Any

import numpy as np

from attacks.audit import as_scores

log = logging.getLogger(__name__)

FIXED_VARIANCE_BELOW = 64
"""Reference-model count below which LiRA uses one global variance by default (Carlini et al.
2022, §VI-A: per-example variances need many models; with few, a fixed variance does better)."""

DEFAULT_RMIA_A = 0.3
"""Default ``a`` of offline RMIA. Pr(x) averages IN and OUT likelihoods; offline there are no IN
models, so RMIA models Pr_IN(x) ≈ a·Pr_OUT(x) + (1 − a) — a straight line between "training changes
nothing" (a = 1) and "members are fitted to p_y = 1" (a = 0). Small fine-tuned classifiers fit most
training examples close to p_y = 1, so a small a is right for them; 0.3 is the default of the
authors' own implementation (privacytrustlab/ml_privacy_meter) and close to the values they report
fitting on their image benchmarks. It can be tuned on a pair of reference models (train one, attack
it with the others, keep the a with the best AUC)."""


# --------------------------------------------------------------------------------------------
# Validation (one voice: what, the allowed range, what came in)
# --------------------------------------------------------------------------------------------


def _show(x: Any) -> str:
    return str(x) if isinstance(x, numbers.Number) else repr(x)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _check_reference(
    target: Any, reference: Any, in_mask: Any, target_name: str, reference_name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """target [n], reference [K, n] finite floats, in_mask [K, n] booleans, K >= 2."""
    t = as_scores(target, target_name)
    try:
        r = np.asarray(reference, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"{reference_name} must be a [n_shadows, n_examples] array of finite numbers, got a "
            f"{type(reference).__name__} that is not numeric."
        ) from None
    if r.ndim != 2 or r.shape[1] != t.size:
        raise ValueError(
            f"{reference_name} must be a [n_shadows, n_examples={t.size}] array, got shape "
            f"{r.shape}."
        )
    if r.shape[0] < 2:
        raise ValueError(f"n_shadows must be >= 2, got {r.shape[0]}.")
    n_bad = int(np.count_nonzero(~np.isfinite(r)))
    if n_bad:
        raise ValueError(
            f"{reference_name} must hold finite numbers, got {n_bad} non-finite value(s)."
        )
    m = np.asarray(in_mask)
    if m.shape != r.shape:
        raise ValueError(
            f"in_mask must have the shape of {reference_name} {r.shape}, got {m.shape}."
        )
    if m.dtype != np.bool_:
        if not (np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all()):
            raise ValueError(f"in_mask must hold booleans (or 0/1), got dtype {m.dtype}.")
        m = m.astype(bool)
    return t, r, m


def _check_probabilities(values: np.ndarray, name: str) -> None:
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got values from {values.min():g} to "
            f"{values.max():g}."
        )


# --------------------------------------------------------------------------------------------
# Loss attack
# --------------------------------------------------------------------------------------------


def loss_attack(target_loss: Any) -> np.ndarray:
    """Score = −loss of the target model (Yeom et al. 2018): low loss means member.

    >>> loss_attack([0.1, 2.0])
    array([-0.1, -2. ])
    """
    return -as_scores(target_loss, "target_loss")


# --------------------------------------------------------------------------------------------
# LiRA
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LiraOptions:
    """How LiRA fits its Gaussians.

    Attributes:
      online: use both IN and OUT reference models (the likelihood ratio) or only OUT ones (the
        one-sided test of offline LiRA).
      fixed_variance: one global variance (True) or one per example and group (False); None
        chooses fixed below :data:`FIXED_VARIANCE_BELOW` reference models.
      min_std: floor of every fitted standard deviation, so that an example on which the reference
        models happen to agree does not get an infinite score. φ is a log-odds; spreads below a
        thousandth of a nat are rounding, not signal.
    """

    online: bool = True
    fixed_variance: bool | None = None
    min_std: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.online, (bool, np.bool_)):
            raise ValueError(f"online must be True or False, got {_show(self.online)}.")
        if self.fixed_variance is not None and not isinstance(self.fixed_variance, (bool, np.bool_)):
            raise ValueError(
                f"fixed_variance must be True, False or None, got {_show(self.fixed_variance)}."
            )
        if not _is_real(self.min_std) or not 0 < self.min_std < math.inf:
            raise ValueError(f"min_std must be a finite number > 0, got {_show(self.min_std)}.")

    def uses_fixed_variance(self, n_shadows: int) -> bool:
        """Whether the global variance is used with ``n_shadows`` reference models."""
        if self.fixed_variance is None:
            return n_shadows < FIXED_VARIANCE_BELOW
        return bool(self.fixed_variance)

    def describe(self, n_shadows: int) -> str:
        """A few words for reports, e.g. 'online, fixed variance (8 reference models < 64)'."""
        mode = "online" if self.online else "offline"
        if self.uses_fixed_variance(n_shadows):
            why = (f" ({n_shadows} reference models < {FIXED_VARIANCE_BELOW})"
                   if self.fixed_variance is None else "")
            return f"{mode}, fixed (global) variance{why}"
        return f"{mode}, per-example variance"


@dataclasses.dataclass(frozen=True)
class _GroupStats:
    """Per-example mean and variance of the reference values of one group (IN or OUT)."""

    count: np.ndarray  # [n] number of reference values
    mean: np.ndarray  # [n], NaN where count == 0
    sq_dev: np.ndarray  # [n] sum of squared deviations from the mean (0 where count < 2)


def _group_stats(values: np.ndarray, mask: np.ndarray) -> _GroupStats:
    count = mask.sum(axis=0)
    total = np.where(mask, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    dev = np.where(mask, values - np.nan_to_num(mean)[None, :], 0.0)
    return _GroupStats(count=count, mean=mean, sq_dev=(dev**2).sum(axis=0))


def _fill_means(inn: _GroupStats, out: _GroupStats, values, mask) -> tuple[np.ndarray, np.ndarray]:
    """Means of both groups for every example, filling a missing one as the module doc says."""
    mu_in, mu_out = inn.mean.copy(), out.mean.copy()
    both = (inn.count > 0) & (out.count > 0)
    if both.any():
        gap = float(np.mean(mu_in[both] - mu_out[both]))
        fill_in, fill_out = mu_out + gap, mu_in - gap
    else:
        fill_in = np.full_like(mu_in, values[mask].mean() if mask.any() else np.nan)
        fill_out = np.full_like(mu_out, values[~mask].mean() if (~mask).any() else np.nan)
    missing_in, missing_out = inn.count == 0, out.count == 0
    if missing_in.any() or missing_out.any():
        log.info("LiRA: %d example(s) without IN and %d without OUT reference values use filled "
                 "means", int(missing_in.sum()), int(missing_out.sum()))
    mu_in = np.where(missing_in, fill_in, mu_in)
    mu_out = np.where(missing_out, fill_out, mu_out)
    return mu_in, mu_out


def _pooled_variance(values: np.ndarray, groups: list[_GroupStats]) -> float:
    """Within-example variance pooled over examples and the given groups (unbiased).

    Σ squared deviations from each example's group mean / Σ (count − 1). When no group of any
    example holds two values (K = 2: one IN and one OUT model per example) there is no
    within-example spread to pool; the variance of ``values`` (all the reference values the
    attack uses) stands in. With one variance shared by IN and OUT, as here, its value only
    scales LiRA's scores and never changes their order.
    """
    ss = sum(float(g.sq_dev.sum()) for g in groups)
    dof = sum(float(np.maximum(g.count - 1, 0).sum()) for g in groups)
    if dof > 0 and ss > 0:
        return ss / dof
    spread = float(np.var(values))
    return spread if spread > 0 else 1.0


def lira(
    target_phi: Any, reference_phi: Any, in_mask: Any, options: LiraOptions = LiraOptions()
) -> np.ndarray:
    """LiRA scores (Carlini et al. 2022) of the examples, from φ under the target and references.

    Args:
      target_phi: [n] φ of each example under the target model.
      reference_phi: [K, n] φ under each reference model.
      in_mask: [K, n] booleans, True where example i was in reference model k's training set.
      options: online/offline, fixed or per-example variance.

    Online: log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²). Offline: (φ − μ_out)/σ_out. With fixed
    variance σ_in = σ_out = σ, the variance of φ about its example's group mean pooled over all
    examples, both groups (online) or OUT only (offline). With per-example variance each example's
    own unbiased sample variance is used where its group holds at least two values, else the pooled
    one. Every σ is floored at ``options.min_std``.
    """
    t, r, m = _check_reference(target_phi, reference_phi, in_mask, "target_phi", "reference_phi")
    if not (~m).any() or (options.online and not m.any()):
        need = "OUT" if not (~m).any() else "IN"
        raise ValueError(f"in_mask must mark at least one {need} reference value, got none.")
    k = r.shape[0]
    inn, out = _group_stats(r, m), _group_stats(r, ~m)
    mu_in, mu_out = _fill_means(inn, out, r, m)
    fixed = options.uses_fixed_variance(k)
    floor = options.min_std**2

    if options.online:
        pooled = _pooled_variance(r.ravel(), [inn, out])
        if fixed:
            var_in = var_out = np.full(t.size, max(pooled, floor))
        else:
            var_in = _per_example_variance(inn, pooled, floor)
            var_out = _per_example_variance(out, pooled, floor)
        return _log_normal(t, mu_in, var_in) - _log_normal(t, mu_out, var_out)

    pooled = _pooled_variance(r[~m], [out])
    var_out = (np.full(t.size, max(pooled, floor)) if fixed
               else _per_example_variance(out, pooled, floor))
    return (t - mu_out) / np.sqrt(var_out)


def _per_example_variance(g: _GroupStats, pooled: float, floor: float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        own = g.sq_dev / np.maximum(g.count - 1, 1)
    return np.maximum(np.where(g.count >= 2, own, pooled), floor)


def _log_normal(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """log N(x; mean, var) without the constant −½ log 2π (it cancels in a ratio)."""
    return -0.5 * (x - mean) ** 2 / var - 0.5 * np.log(var)


# --------------------------------------------------------------------------------------------
# RMIA
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RmiaOptions:
    """How RMIA estimates Pr(x) and which population samples z it compares against.

    Attributes:
      online: Pr(x) = mean of Pr(x|θ') over all reference models (True), or the offline
        ((1+a)/2)·mean_OUT + (1−a)/2 (False).
      a: the offline interpolation coefficient in [0, 1]; see :data:`DEFAULT_RMIA_A`.
      gamma: the threshold γ > 0 on LR(x, z); 1 by default (x dominates z).
      n_population: how many population samples z to draw (without replacement, seeded) from the
        eligible examples; None or more than there are: all of them. An example is never compared
        with itself.
      seed: seed of the draw of z.
    """

    online: bool = True
    a: float = DEFAULT_RMIA_A
    gamma: float = 1.0
    n_population: int | None = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.online, (bool, np.bool_)):
            raise ValueError(f"online must be True or False, got {_show(self.online)}.")
        if not _is_real(self.a) or not 0 <= self.a <= 1:
            raise ValueError(f"a must be in [0, 1], got {_show(self.a)}.")
        if not _is_real(self.gamma) or not 0 < self.gamma < math.inf:
            raise ValueError(f"gamma must be a finite number > 0, got {_show(self.gamma)}.")
        if self.n_population is not None and (
            not _is_int(self.n_population) or self.n_population < 1
        ):
            raise ValueError(
                f"n_population must be an integer >= 1 or None, got {_show(self.n_population)}."
            )
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {_show(self.seed)}.")

    def describe(self) -> str:
        if self.online:
            return f"online (Pr(x) = mean over all reference models), gamma = {self.gamma:g}"
        return f"offline (a = {self.a:g}), gamma = {self.gamma:g}"


_TINY = np.finfo(np.float64).tiny


def rmia_marginal(reference_prob: Any, in_mask: Any, options: RmiaOptions = RmiaOptions()) -> np.ndarray:
    """Pr(x) of RMIA from the reference models' p_y [K, n] (see :class:`RmiaOptions`).

    Offline, an example without any OUT model falls back to the mean over all its reference
    models (the online estimate).
    """
    r = np.asarray(reference_prob, dtype=np.float64)
    m = np.asarray(in_mask, dtype=bool)
    overall = r.mean(axis=0)
    if options.online:
        return overall
    out = _group_stats(r, ~m)
    mean_out = np.where(out.count > 0, np.nan_to_num(out.mean), overall)
    offline = 0.5 * (1 + options.a) * mean_out + 0.5 * (1 - options.a)
    return np.where(out.count > 0, offline, overall)


def rmia(
    target_prob: Any,
    reference_prob: Any,
    in_mask: Any,
    options: RmiaOptions = RmiaOptions(),
    *,
    population: Any = None,
) -> np.ndarray:
    """RMIA scores (Zarifzadeh et al. 2024) of every example, in [0, 1].

    Args:
      target_prob: [n] Pr(x|θ) = p_y of each example under the target model.
      reference_prob: [K, n] p_y under each reference model.
      in_mask: [K, n] booleans, True where example i was in reference model k's training set.
      options: online/offline, a, γ and the population draw.
      population: the examples eligible as population samples z — a boolean mask [n] or indices;
        None: all. z are drawn from the same arrays, so their Pr(z|θ) and Pr(z) are computed
        exactly like those of x.

    score(x) = #{z ≠ x : LR(x)/LR(z) ≥ γ} / #{z ≠ x} with LR(·) = Pr(·|θ)/Pr(·), computed in log
    space. Probabilities that underflow to 0 are floored at the smallest positive double.
    Because every x is compared with the same z, the score orders examples as LR(x) does; the
    population turns it into a calibrated rank ("x beats 93% of population samples").
    """
    t, r, m = _check_reference(target_prob, reference_prob, in_mask, "target_prob", "reference_prob")
    _check_probabilities(t, "target_prob")
    _check_probabilities(r, "reference_prob")
    n = t.size
    if n < 2:
        raise ValueError(f"n_examples must be >= 2 for RMIA (x is never compared with itself), got {n}.")
    marginal = rmia_marginal(r, m, options)
    log_lr = np.log(np.maximum(t, _TINY)) - np.log(np.maximum(marginal, _TINY))

    eligible = _population_indices(population, n)
    rng = np.random.default_rng(options.seed)
    if options.n_population is not None and options.n_population < eligible.size:
        eligible = np.sort(rng.choice(eligible, size=options.n_population, replace=False))
    z_sorted = np.sort(log_lr[eligible])
    threshold = log_lr - math.log(options.gamma)
    count = np.searchsorted(z_sorted, threshold, side="right").astype(np.float64)
    is_z = np.zeros(n, dtype=bool)
    is_z[eligible] = True
    self_counted = is_z & (log_lr <= threshold)
    count -= self_counted
    size = eligible.size - is_z.astype(np.float64)
    if (size <= 0).any():
        raise ValueError(
            f"population must hold at least one example other than each scored one, got "
            f"{eligible.size} eligible example(s)."
        )
    return count / size


def _population_indices(population: Any, n: int) -> np.ndarray:
    if population is None:
        return np.arange(n)
    p = np.asarray(population)
    if p.dtype == np.bool_:
        if p.shape != (n,):
            raise ValueError(f"population mask must have shape ({n},), got {p.shape}.")
        idx = np.flatnonzero(p)
    elif np.issubdtype(p.dtype, np.integer) and p.ndim == 1:
        if p.size and (p.min() < 0 or p.max() >= n):
            raise ValueError(
                f"population indices must be in [0, {n}), got {int(p.min())} to {int(p.max())}."
            )
        idx = np.unique(p)
    else:
        raise ValueError(
            f"population must be a boolean mask or 1-D integer indices, got dtype {p.dtype} and "
            f"shape {p.shape}."
        )
    if idx.size == 0:
        raise ValueError("population must hold at least one example, got none.")
    return idx
