"""Audit bounds: published values, closed forms, soundness on mechanisms of known privacy, the
correction for searching, and errors.

Soundness tests simulate mechanisms whose privacy is exact — randomized response (ε-DP and no
better) and Gaussian scores N(μ, 1) vs N(0, 1) (μ-GDP and no better) — and check on fixed seeds that
the 95% lower bounds stay below the truth and are not vacuous.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from attacks.audit import (
    AuditOptions,
    CanaryScoreAuditor,
    clopper_pearson_interval,
    epsilon_clopper_pearson,
    epsilon_gdp,
    epsilon_one_run,
    gdp_delta,
    gdp_epsilon,
    mu_gdp_lower_bound,
    one_run_audit,
    one_run_p_value,
)

ROOT = Path(__file__).resolve().parents[1]


def _randomized_response(rng, included, eps):
    """Each canary reports its membership truthfully with probability e^ε/(1+e^ε): exactly ε-DP."""
    truthful = rng.random(included.size) < 1 / (1 + math.exp(-eps))
    return np.where(truthful, included, ~included).astype(float)


# ---------------------------------------------------------------------------------------------
# Published check values
# ---------------------------------------------------------------------------------------------


def test_clopper_pearson_published_value():
    # Two-sided 95% Clopper-Pearson intervals, i.e. each bound one-sided at 97.5%.
    assert epsilon_clopper_pearson(500, 1000, 10, 1000, confidence=0.95) == pytest.approx(
        3.242, abs=5e-4
    )


def test_gdp_published_value():
    assert gdp_epsilon(1.0, 1e-5) == pytest.approx(4.377, abs=5e-4)


def test_one_run_published_value():
    assert epsilon_one_run(1000, 100, 100, confidence=0.95, delta=0.0) == pytest.approx(
        3.493, abs=5e-4
    )


# ---------------------------------------------------------------------------------------------
# Closed forms and oracles
# ---------------------------------------------------------------------------------------------


def _random_count_cases(count, seed=0):
    rng = np.random.default_rng(seed)
    cases = [(0, 1, 0.95), (1, 1, 0.95), (0, 400, 0.999), (400, 400, 0.6)]  # the edges
    for _ in range(count):
        n = int(rng.integers(1, 401))
        cases.append((int(rng.integers(0, n + 1)), n, float(rng.uniform(0.6, 0.999))))
    return cases


@pytest.mark.parametrize("k, n, confidence", _random_count_cases(30))
def test_clopper_pearson_interval_solves_its_defining_equations(k, n, confidence):
    lo, hi = clopper_pearson_interval(k, n, confidence)
    half = (1 - confidence) / 2
    assert 0 <= lo <= k / n <= hi <= 1
    if k > 0:  # P[Bin(n, lo) ≥ k] = half
        assert stats.binom.sf(k - 1, n, lo) == pytest.approx(half, rel=1e-6)
    if k < n:  # P[Bin(n, hi) ≤ k] = half
        assert stats.binom.cdf(k, n, hi) == pytest.approx(half, rel=1e-6)


def test_clopper_pearson_epsilon_matches_formula_and_both_directions():
    lo_tp, _ = clopper_pearson_interval(900, 1000, 0.95)
    _, hi_fp = clopper_pearson_interval(300, 1000, 0.95)
    forward = math.log(lo_tp / hi_fp)
    backward = math.log((1 - hi_fp) / (1 - lo_tp))  # TNR_lb / FNR_ub wins here
    assert backward > forward
    assert epsilon_clopper_pearson(900, 1000, 300, 1000) == pytest.approx(backward, rel=1e-12)
    # δ only ever lowers the bound; higher confidence only lowers it.
    base = epsilon_clopper_pearson(500, 1000, 10, 1000)
    assert epsilon_clopper_pearson(500, 1000, 10, 1000, delta=1e-3) < base
    assert epsilon_clopper_pearson(500, 1000, 10, 1000, confidence=0.99) < base
    # No evidence at all: 0, never negative.
    assert epsilon_clopper_pearson(10, 1000, 500, 1000) == pytest.approx(0.0, abs=1e-12)
    assert epsilon_clopper_pearson(500, 1000, 500, 1000) == 0.0


def test_gdp_delta_closed_form_and_epsilon_is_its_root():
    for mu in (0.5, 1.0, 3.0):
        for eps in (0.0, 0.7, 2.0):
            naive = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
                -eps / mu - mu / 2
            )
            assert gdp_delta(mu, eps) == pytest.approx(naive, rel=1e-9, abs=1e-15)
        for delta in (1e-3, 1e-5, 1e-9):
            eps = gdp_epsilon(mu, delta)
            assert gdp_delta(mu, eps) == pytest.approx(delta, rel=1e-6)
            assert gdp_delta(mu, eps) >= delta  # the returned ε is on the safe (lower) side
    assert gdp_delta(1.0, 0.0) == pytest.approx(2 * stats.norm.cdf(0.5) - 1, rel=1e-12)
    assert gdp_epsilon(1.0, 0.5) == 0.0  # δ(0) = 0.383 ≤ 0.5 already
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    assert gdp_epsilon(2.0, 1e-5) > gdp_epsilon(1.0, 1e-5)


def test_mu_lower_bound_matches_formula():
    lo_tp, _ = clopper_pearson_interval(800, 1000, 0.95)
    _, hi_fp = clopper_pearson_interval(50, 1000, 0.95)
    expected = stats.norm.ppf(1 - hi_fp) - stats.norm.ppf(1 - lo_tp)
    assert mu_gdp_lower_bound(800, 1000, 50, 1000) == pytest.approx(expected, rel=1e-9)
    assert epsilon_gdp(800, 1000, 50, 1000, delta=1e-5) == pytest.approx(
        gdp_epsilon(expected, 1e-5), rel=1e-9
    )
    assert mu_gdp_lower_bound(500, 1000, 500, 1000) == 0.0


def _one_run_p_value_oracle(m, r, v, eps, delta):
    """The p-value of Steinke et al. written straight from the formula, one term at a time."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = stats.binom.pmf(np.arange(r + 1), r, q)
    beta = pmf[v:].sum()
    alpha = max((pmf[v - i : v].sum() / i for i in range(1, v + 1)), default=0.0)
    return min(beta + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [
        (1000, 100, 100, 3.0, 0.0),
        (1000, 100, 80, 1.0, 1e-5),
        (1000, 600, 600, 4.0, 1e-5),
        (200, 50, 30, 0.2, 1e-3),
        (50, 10, 0, 1.0, 1e-2),
    ],
)
def test_one_run_p_value_matches_oracle(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        _one_run_p_value_oracle(m, r, v, eps, delta), rel=1e-9, abs=1e-15
    )


@pytest.mark.parametrize(
    "m, r, v, delta",
    [(1000, 100, 100, 0.0), (1000, 600, 600, 1e-5), (1000, 400, 330, 1e-6), (500, 200, 150, 0.0)],
)
def test_one_run_epsilon_is_the_edge_of_rejection(m, r, v, delta):
    eps = epsilon_one_run(m, r, v, confidence=0.95, delta=delta)
    assert eps > 0
    assert one_run_p_value(m, r, v, eps, delta) <= 0.05
    assert one_run_p_value(m, r, v, eps + 1e-6, delta) > 0.05


def test_one_run_gives_nothing_without_evidence():
    assert epsilon_one_run(1000, 100, 50) == 0.0  # chance level
    assert epsilon_one_run(1000, 0, 0) == 0.0
    assert epsilon_one_run(1000, 100, 100, delta=1e-2) == 0.0  # 2mδ = 20: the δ term swamps


# ---------------------------------------------------------------------------------------------
# Soundness on mechanisms of known privacy
# ---------------------------------------------------------------------------------------------

SEEDS = range(6)


@pytest.mark.parametrize("eps", [1.0, 3.0])
def test_clopper_pearson_is_sound_and_tight_on_randomized_response(eps):
    n = 2000
    bounds = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        q = 1 / (1 + math.exp(-eps))
        tp, fp = int(rng.binomial(n, q)), int(rng.binomial(n, 1 - q))
        bounds.append(epsilon_clopper_pearson(tp, n, fp, n))
    assert max(bounds) < eps
    assert min(bounds) > 0.8 * eps


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_one_run_is_sound_on_randomized_response(eps):
    m, bounds = 1000, []
    for seed in SEEDS:
        # Inclusion and the audit share the seed: the audit's own streams must not replay it.
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5
        scores = _randomized_response(rng, included, eps)  # binary: top-k is decided by tie-breaks
        result = one_run_audit(scores, included, k_positive=200, k_negative=200, seed=seed)
        assert (result.correction, result.m, result.r) == ("none", m, 400)
        bounds.append(result.epsilon_lb)
    assert max(bounds) < eps
    assert min(bounds) > 0.5 * eps


@pytest.mark.parametrize("mu", [1.0, 2.0])
def test_threshold_audits_are_sound_on_gaussian_scores(mu):
    n, delta = 2000, 1e-5
    true_eps = gdp_epsilon(mu, delta)
    for seed in SEEDS[:3]:
        rng = np.random.default_rng(seed)
        auditor = CanaryScoreAuditor(rng.normal(mu, 1, n), rng.normal(0, 1, n))
        for correction in ("bonferroni", "split"):
            cp = auditor.epsilon_clopper_pearson(0.95, delta, correction=correction)
            gdp = auditor.epsilon_gdp(0.95, delta, correction=correction)
            assert cp.correction == gdp.correction == correction
            assert 0 < cp.epsilon_lb < true_eps
            assert 0 < gdp.mu_lb < mu
            assert cp.epsilon_lb < gdp.epsilon_lb < true_eps  # GDP is the sharper tool here
            assert gdp.epsilon_lb > 0.4 * true_eps  # and not vacuous, even on half the data


def test_one_run_is_sound_on_gaussian_scores_with_delta():
    mu, m, delta = 2.0, 1000, 1e-5
    for seed in SEEDS[:3]:
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5
        scores = rng.normal(size=m) + mu * included  # each canary: a μ-GDP Gaussian mechanism
        result = one_run_audit(
            scores, included, k_positive=[50, 100, 200], k_negative=[0, 100], delta=delta
        )
        assert 1.0 < result.epsilon_lb < gdp_epsilon(mu, delta)


def test_identical_distributions_give_zero():
    for seed in SEEDS[:3]:
        rng = np.random.default_rng(seed)
        auditor = CanaryScoreAuditor(rng.normal(size=500), rng.normal(size=500))
        assert auditor.epsilon_clopper_pearson().epsilon_lb == 0.0
        assert auditor.epsilon_gdp().epsilon_lb == 0.0


def test_tied_scores_sorted_by_membership_do_not_leak_through_tie_breaking():
    # Members first, all scores equal: breaking ties by position would give v = r = 200 and
    # ε_lb ≈ 4.2. Random tie-breaks give chance-level guesses.
    m = 1000
    included = np.arange(m) < m // 2
    results = [
        one_run_audit(np.zeros(m), included, k_positive=100, k_negative=100, seed=seed)
        for seed in range(10)
    ]
    assert abs(np.mean([r.v for r in results]) - 100) < 10
    assert max(r.epsilon_lb for r in results) < 0.5
    # The threshold audits put all tied scores on the same side of any threshold.
    assert CanaryScoreAuditor(np.zeros(50), np.zeros(50)).epsilon_clopper_pearson().epsilon_lb == 0


# ---------------------------------------------------------------------------------------------
# Searching must be paid for
# ---------------------------------------------------------------------------------------------


def test_uncorrected_search_over_k_exceeds_its_level_and_the_corrections_do_not():
    # Null mechanism (scores ignore membership, true ε = 0): every ε_lb > 0 is a false claim.
    # Bounding each k at 5% and keeping the best is wrong far more often than 5% of the time.
    m, ks, trials = 500, list(range(5, 251, 5)), 150
    wrong = {"uncorrected": 0, "bonferroni": 0, "split": 0}
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        included, scores = rng.random(m) < 0.5, rng.normal(size=m)
        by_hand = max(one_run_audit(scores, included, k_positive=k).epsilon_lb for k in ks)
        bonferroni = one_run_audit(scores, included, k_positive=ks)
        split = one_run_audit(scores, included, k_positive=ks, correction="split")
        assert bonferroni.epsilon_lb <= by_hand
        assert (bonferroni.correction, split.correction) == ("bonferroni", "split")
        assert bonferroni.n_choices == split.n_choices == len(ks)
        wrong["uncorrected"] += by_hand > 0
        wrong["bonferroni"] += bonferroni.epsilon_lb > 0
        wrong["split"] += split.epsilon_lb > 0
    assert wrong["uncorrected"] / trials > 0.1
    assert wrong["bonferroni"] / trials <= 0.05
    assert wrong["split"] / trials <= 0.05


def test_corrected_threshold_search_is_below_the_uncorrected_one():
    rng = np.random.default_rng(7)
    in_scores, out_scores = rng.normal(1.0, 1, 200), rng.normal(0, 1, 200)
    auditor = CanaryScoreAuditor(in_scores, out_scores)
    thresholds = np.union1d(in_scores, out_scores)
    for method in ("epsilon_clopper_pearson", "epsilon_gdp"):
        fixed = [getattr(auditor, method)(threshold=float(t)) for t in thresholds]
        assert {r.correction for r in fixed} == {"none"}
        uncorrected = max(r.epsilon_lb for r in fixed)
        bonferroni = getattr(auditor, method)(correction="bonferroni")
        split = getattr(auditor, method)(correction="split", split_fraction=0.5, seed=3)
        assert bonferroni.correction == "bonferroni" and bonferroni.n_choices == thresholds.size
        assert split.correction == "split"
        assert (split.n_positives, split.n_negatives) == (100, 100)  # bound on the held-back half
        assert 0 < bonferroni.epsilon_lb < uncorrected
        assert split.epsilon_lb < uncorrected


def test_one_run_split_reports_the_held_back_part():
    rng = np.random.default_rng(0)
    m = 1000
    included = rng.random(m) < 0.5
    scores = rng.normal(size=m) + 3.0 * included
    result = one_run_audit(
        scores, included, k_positive=[100, 200], k_negative=[0, 100], correction="split",
        split_fraction=0.4,
    )
    assert (result.correction, result.n_choices, result.m) == ("split", 4, 600)
    assert result.k_positive in (60, 120) and result.k_negative in (0, 60)
    assert result.r == result.k_positive + result.k_negative and 0 <= result.v <= result.r
    assert result.epsilon_lb > 0
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["correction"] == "split"


def test_tpr_at_given_fpr_agrees_with_metrics_and_bounds_it():
    from attacks.metrics import evaluate_attack

    rng = np.random.default_rng(1)
    in_scores = np.round(rng.normal(1.5, 1, 700), 1)  # rounded: ties
    out_scores = np.round(rng.normal(0, 1, 1000), 1)
    auditor = CanaryScoreAuditor(in_scores, out_scores)
    metrics = evaluate_attack(in_scores, out_scores, fpr_targets=(0.01, 0.1))
    for f in (0.01, 0.1):
        result = auditor.tpr_at_given_fpr(f)
        assert result.tpr == pytest.approx(metrics.tpr_at_fpr[f], abs=1e-12)
        assert result.false_positives == metrics.false_positives_at_fpr[f] <= math.floor(f * 1000)
        assert result.tpr_lb < result.tpr and result.correction == "none"
        assert np.mean(in_scores >= result.threshold) == pytest.approx(result.tpr)
    assert json.dumps(result.to_dict(), allow_nan=False)


def test_results_serialize_to_plain_json():
    auditor = CanaryScoreAuditor(np.arange(100) + 30.0, np.arange(100.0))
    for result in (auditor.epsilon_clopper_pearson(), auditor.epsilon_gdp()):
        d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
        assert d["method"] in ("clopper_pearson", "gdp") and d["correction"] == "bonferroni"
        assert isinstance(d["true_positives"], int) and isinstance(d["epsilon_lb"], float)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: epsilon_clopper_pearson(5, 10, 1, 10, confidence=1.3),
         "confidence must be in (0.5, 1), got 1.3."),
        (lambda: epsilon_clopper_pearson(5, 10, 1, 10, confidence=0.5),
         "confidence must be in (0.5, 1), got 0.5."),
        (lambda: epsilon_clopper_pearson(5, 10, 1, 10, delta=-0.1),
         "delta must be in [0, 1), got -0.1."),
        (lambda: epsilon_clopper_pearson(11, 10, 1, 10),
         "true_positives must be an integer in [0, n_positives=10], got 11."),
        (lambda: epsilon_clopper_pearson(5, 0, 1, 10),
         "n_positives must be an integer >= 1, got 0."),
        (lambda: epsilon_gdp(5, 10, 1, 10, delta=0.0), "delta must be in (0, 1), got 0.0."),
        (lambda: gdp_epsilon(-1.0, 1e-5), "mu must be a finite number >= 0, got -1.0."),
        (lambda: epsilon_one_run(100, 10, 11), "v must be an integer in [0, r=10], got 11."),
        (lambda: epsilon_one_run(100, 101, 1), "r must be an integer in [0, m=100], got 101."),
        (lambda: AuditOptions(correction="none"),
         "correction must be one of 'bonferroni', 'split', got 'none'."),
        (lambda: AuditOptions(split_fraction=1.0), "split_fraction must be in (0, 1), got 1.0."),
        (lambda: CanaryScoreAuditor([], [1.0]),
         "in_scores must be a non-empty 1-D array of finite numbers, got shape (0,)."),
        (lambda: CanaryScoreAuditor([1.0], [[1.0, 2.0]]),
         "out_scores must be a non-empty 1-D array of finite numbers, got shape (1, 2)."),
        (lambda: CanaryScoreAuditor([1.0, np.nan], [1.0]),
         "in_scores must be a non-empty 1-D array of finite numbers, got shape (2,) with 1 "
         "non-finite value(s)."),
        (lambda: CanaryScoreAuditor(["a"], [1.0]),
         "in_scores must be a non-empty 1-D array of finite numbers, got a list that is not "
         "numeric."),
        (lambda: CanaryScoreAuditor([1.0], [0.0]).epsilon_gdp(confidence=2),
         "confidence must be in (0.5, 1), got 2."),
        (lambda: CanaryScoreAuditor([1.0], [0.0]).epsilon_clopper_pearson(threshold=np.inf),
         "threshold must be a finite number or None, got inf."),
        (lambda: CanaryScoreAuditor([1.0], [0.0]).tpr_at_given_fpr(0.0),
         "fpr must be in (0, 1), got 0.0."),
        (lambda: CanaryScoreAuditor([1.0], [0.0]).epsilon_clopper_pearson(correction="split"),
         "in_scores must leave at least one score in each part of the split, got 1 scores with "
         "split_fraction=0.5."),
        (lambda: one_run_audit([1.0, 2.0], [True], k_positive=1),
         "included must be a 1-D boolean (or 0/1) array with the length of scores (2), got shape "
         "(1,) and dtype bool."),
        (lambda: one_run_audit([1.0, 2.0], [1, 0], k_positive=2, k_negative=1),
         "k_positive + k_negative must be <= m=2, got 2 + 1 = 3."),
        (lambda: one_run_audit([1.0, 2.0], [1, 0], k_positive=[]),
         "k_positive must be an integer or a non-empty sequence of integers in [0, m=2], got []."),
        (lambda: one_run_audit([1.0, 2.0], [1, 0], k_positive=0),
         "k_positive + k_negative must be >= 1 for at least one choice, got 0."),
    ],
)
def test_bad_input_is_refused_in_one_voice(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------
# A light module
# ---------------------------------------------------------------------------------------------


def test_importing_audit_pulls_in_neither_torch_nor_sklearn_nor_dptrain():
    code = (
        "import sys, attacks.audit\n"
        "heavy = {'torch', 'sklearn', 'dptrain'}\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
