"""Membership-inference attacks on synthetic signals whose separation is known.

The model of the signals: each example x has a difficulty μ_x ~ N(0, 2²); under any model (the
target or a reference) φ = μ_x + Δ·[x in its training set] + N(0, 1). An attacker who knew μ_x and
Δ would score φ − μ_x and reach AUC Φ(Δ/√2); one who thresholds φ alone (the loss attack) only
Φ(Δ/√10), because the spread of difficulties hides membership. LiRA estimates μ_x from reference
models and should close that gap; with Δ = 0 nothing can beat chance and the audit must find no ε.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from attacks.audit import CanaryScoreAuditor
from attacks.mia import (
    FIXED_VARIANCE_BELOW,
    LiraOptions,
    RmiaOptions,
    lira,
    loss_attack,
    rmia,
    rmia_marginal,
)
from attacks.shadows import balanced_assignment

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int, k: int, delta: float, seed: int = 0):
    """(target φ, reference φ [k, n], in_mask [k, n], target membership [n])."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.0, 2.0, n)
    member = np.zeros(n, dtype=bool)
    member[rng.permutation(n)[: n // 2]] = True
    in_mask = balanced_assignment(n, k, seed=seed)
    target = difficulty + delta * member + rng.normal(size=n)
    reference = difficulty + delta * in_mask + rng.normal(size=(k, n))
    return target, reference, in_mask, member


def auc(member, scores) -> float:
    return float(roc_auc_score(member, scores))


def auc_standard_error(a: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982): the standard error of an empirical AUC."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return math.sqrt(var)


# ---------------------------------------------------------------------------------------------
# Known separation is recovered
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [1.0, 2.0])
def test_lira_online_recovers_the_oracle_auc(delta):
    n, k = 2000, 64
    target, reference, in_mask, member = synthetic(n, k, delta, seed=1)
    expected = float(stats.norm.cdf(delta / math.sqrt(2)))
    got = auc(member, lira(target, reference, in_mask))
    # 4 standard errors of the empirical AUC, plus what estimating μ_in, μ_out from 32 models
    # each costs (the midpoint's variance adds 1/K to the unit noise: ~0.003 AUC here).
    tolerance = 4 * auc_standard_error(expected, n // 2, n // 2) + 0.01
    assert got == pytest.approx(expected, abs=tolerance)


def test_lira_removes_per_example_difficulty_and_beats_the_loss_attack():
    target, reference, in_mask, member = synthetic(2000, 64, 1.0, seed=2)
    raw = auc(member, loss_attack(-target))  # φ falls as the loss grows: −loss ranks like φ
    assert raw == pytest.approx(stats.norm.cdf(1 / math.sqrt(10)), abs=0.05)
    online = auc(member, lira(target, reference, in_mask))
    assert online > raw + 0.08


def test_offline_lira_and_rmia_are_well_above_chance():
    target, reference, in_mask, member = synthetic(2000, 16, 1.0, seed=3)
    raw = auc(member, target)
    assert auc(member, lira(target, reference, in_mask, LiraOptions(online=False))) > 0.7 > raw
    p, p_ref = expit(target), expit(reference)  # φ is the log-odds of p_y
    assert auc(member, rmia(p, p_ref, in_mask)) > 0.68 > raw
    assert auc(member, rmia(p, p_ref, in_mask, RmiaOptions(online=False))) > 0.64


@pytest.mark.parametrize("k", [2, 4])
def test_fixed_variance_lira_works_with_two_or_four_reference_models(k):
    target, reference, in_mask, member = synthetic(2000, k, 2.0, seed=4)
    raw = auc(member, target)  # Φ(2/√10) ≈ 0.74
    assert LiraOptions().uses_fixed_variance(k)
    for online in (True, False):
        scores = lira(target, reference, in_mask, LiraOptions(online=online))
        assert np.isfinite(scores).all()
        # over 20 seeds the gain is 0.09-0.11 (K = 2) and 0.14 (K = 4), never below 0.055
        assert auc(member, scores) > raw + (0.04 if k == 2 else 0.08)


def test_without_separation_every_attack_is_at_chance_and_the_audit_finds_no_epsilon():
    n = 2000
    target, reference, in_mask, member = synthetic(n, 8, 0.0, seed=5)
    se = auc_standard_error(0.5, n // 2, n // 2)
    p, p_ref = expit(target), expit(reference)
    attacks = {
        "loss": loss_attack(-target),
        "lira_online": lira(target, reference, in_mask),
        "lira_offline": lira(target, reference, in_mask, LiraOptions(online=False)),
        "rmia": rmia(p, p_ref, in_mask),
        "rmia_offline": rmia(p, p_ref, in_mask, RmiaOptions(online=False)),
    }
    for name, scores in attacks.items():
        assert auc(member, scores) == pytest.approx(0.5, abs=4 * se), name
        auditor = CanaryScoreAuditor(scores[member], scores[~member])
        assert auditor.epsilon_clopper_pearson(0.95, 1e-5).epsilon_lb < 0.05, name
        assert auditor.epsilon_gdp(0.95, 1e-5).epsilon_lb < 0.05, name


# ---------------------------------------------------------------------------------------------
# The formulas, by hand
# ---------------------------------------------------------------------------------------------


def test_lira_matches_the_gaussian_likelihood_ratio_by_hand():
    # Example 0: IN values 1 and 3 (mean 2, unbiased variance 2), OUT values −1 and 1 (mean 0,
    # variance 2). Example 1 mirrors it so the pooled variance is 2 as well.
    reference = np.array([[1.0, -1.0], [3.0, 1.0], [-1.0, 1.0], [1.0, 3.0]])
    in_mask = np.array([[True, False], [True, False], [False, True], [False, True]])
    target = np.array([2.0, 0.5])
    for fixed in (False, True):
        s = lira(target, reference, in_mask, LiraOptions(fixed_variance=fixed))
        want = stats.norm.logpdf(target, [2, 2], math.sqrt(2)) - stats.norm.logpdf(
            target, [0, 0], math.sqrt(2))
        np.testing.assert_allclose(s, want, rtol=1e-12)
        off = lira(target, reference, in_mask, LiraOptions(online=False, fixed_variance=fixed))
        np.testing.assert_allclose(off, (target - 0) / math.sqrt(2), rtol=1e-12)


def test_per_example_variance_is_the_default_from_64_reference_models():
    assert LiraOptions().uses_fixed_variance(FIXED_VARIANCE_BELOW - 1)
    assert not LiraOptions().uses_fixed_variance(FIXED_VARIANCE_BELOW)
    assert LiraOptions(fixed_variance=True).uses_fixed_variance(1000)
    assert "per-example" in LiraOptions(fixed_variance=False).describe(4)
    assert "fixed" in LiraOptions().describe(8)


def test_an_example_without_in_or_out_models_falls_back_to_the_average_gap():
    # Examples 1..3 have both groups (IN − OUT gaps 2.0, 1.8, 1.8); example 0 has OUT values with
    # mean 0 and no IN value at all.
    reference = np.array([[0.0, 2.0, 5.0, -1.0], [0.2, 0.0, 3.0, -3.0],
                          [-0.2, 2.2, 4.8, -1.2], [0.0, 0.2, 3.2, -2.8]])
    in_mask = np.array([[False, True, True, True], [False, False, False, False],
                        [False, True, True, True], [False, False, False, False]])
    gap = (2.0 + 1.8 + 1.8) / 3
    fixed = LiraOptions(fixed_variance=True)

    def score0(phi, mask, options):
        return lira(np.array([phi, 2.0, 5.0, -1.0]), reference, mask, options)[0]

    # μ_in(0) = μ_out(0) + gap, so the fixed-variance ratio changes sign halfway, at gap / 2
    assert score0(gap / 2, in_mask, fixed) == pytest.approx(0.0, abs=1e-12)
    assert score0(gap, in_mask, fixed) > 0 > score0(0.0, in_mask, fixed)
    # offline, an example IN everywhere takes μ_out = μ_in − gap (its own difficulty kept)
    all_in = in_mask.copy()
    all_in[:, 0] = True
    assert score0(-gap, all_in, LiraOptions(online=False)) == pytest.approx(0.0, abs=1e-12)
    # per-example variance: the missing group's variance is the pooled one; still finite
    assert np.isfinite(score0(1.0, in_mask, LiraOptions(fixed_variance=False)))


def rmia_oracle(p, p_ref, in_mask, a, gamma, online, population):
    """RMIA by its definition, one pair (x, z) at a time."""
    n = p.size
    if online:
        marginal = p_ref.mean(axis=0)
    else:
        out = [p_ref[~in_mask[:, i], i].mean() for i in range(n)]
        marginal = (1 + a) / 2 * np.array(out) + (1 - a) / 2
    lr = p / marginal
    scores = np.empty(n)
    for x in range(n):
        zs = [z for z in population if z != x]
        scores[x] = np.mean([lr[x] / lr[z] >= gamma for z in zs])
    return scores


@pytest.mark.parametrize("online, a, gamma", [(True, 0.3, 1.0), (False, 0.3, 1.0),
                                              (False, 0.0, 2.0), (True, 1.0, 0.5)])
def test_rmia_matches_its_definition_pair_by_pair(online, a, gamma):
    rng = np.random.default_rng(7)
    n, k = 40, 6
    p = rng.uniform(0.01, 1.0, n)
    p_ref = rng.uniform(0.01, 1.0, (k, n))
    in_mask = balanced_assignment(n, k, seed=3)
    got = rmia(p, p_ref, in_mask, RmiaOptions(online=online, a=a, gamma=gamma))
    want = rmia_oracle(p, p_ref, in_mask, a, gamma, online, range(n))
    np.testing.assert_allclose(got, want, atol=1e-12)
    # a population subset, given as a mask: z only from it, never x itself
    mask = np.zeros(n, dtype=bool)
    mask[::3] = True
    got = rmia(p, p_ref, in_mask, RmiaOptions(online=online, a=a, gamma=gamma), population=mask)
    np.testing.assert_allclose(got, rmia_oracle(p, p_ref, in_mask, a, gamma, online,
                                                np.flatnonzero(mask)), atol=1e-12)


def test_rmia_offline_marginal_and_population_draw():
    p_ref = np.array([[0.2, 0.9], [0.4, 0.5]])
    in_mask = np.array([[False, True], [True, False]])
    np.testing.assert_allclose(rmia_marginal(p_ref, in_mask, RmiaOptions(online=False, a=0.3)),
                               [0.65 * 0.2 + 0.35, 0.65 * 0.5 + 0.35])
    np.testing.assert_allclose(rmia_marginal(p_ref, in_mask), [0.3, 0.7])
    rng = np.random.default_rng(0)
    p, p_ref = rng.uniform(size=300), rng.uniform(size=(4, 300))
    in_mask = balanced_assignment(300, 4)
    small = RmiaOptions(n_population=50, seed=1)
    s1, s2 = rmia(p, p_ref, in_mask, small), rmia(p, p_ref, in_mask, small)
    np.testing.assert_array_equal(s1, s2)  # seeded
    # 50 samples z; an x among them is compared with the other 49
    counts = np.rint(s1 * 50), np.rint(s1 * 49)
    assert np.all(np.isclose(counts[0], s1 * 50) | np.isclose(counts[1], s1 * 49))
    # the score orders examples as the likelihood ratio does
    lr = p / p_ref.mean(axis=0)
    full = rmia(p, p_ref, in_mask, RmiaOptions(n_population=None))
    assert np.all(np.diff(full[np.argsort(lr)]) >= -1e-12)


def test_underflowing_probabilities_stay_finite():
    p = np.array([0.0, 1e-320, 0.5, 1.0])
    p_ref = np.array([[0.0, 0.1, 0.5, 1.0], [0.0, 0.2, 0.4, 0.9]])
    in_mask = np.array([[True, False, True, False], [False, True, False, True]])
    s = rmia(p, p_ref, in_mask)
    assert np.isfinite(s).all() and s.min() >= 0 and s.max() <= 1


def test_loss_attack_negates_the_loss():
    np.testing.assert_array_equal(loss_attack([0.5, 3.0]), [-0.5, -3.0])


# ---------------------------------------------------------------------------------------------
# Input validation: one voice
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_one_message():
    phi, ref, m = np.zeros(3), np.zeros((4, 3)), balanced_assignment(3, 4)
    with pytest.raises(ValueError, match=r"^n_shadows must be >= 2, got 1\.$"):
        lira(phi, ref[:1], m[:1])
    with pytest.raises(ValueError, match=r"reference_phi must be a \[n_shadows, n_examples=3\]"):
        lira(phi, np.zeros((4, 2)), m)
    with pytest.raises(ValueError, match="in_mask must have the shape"):
        lira(phi, ref, m[:, :2])
    with pytest.raises(ValueError, match="in_mask must hold booleans"):
        lira(phi, ref, np.full((4, 3), 0.5))
    with pytest.raises(ValueError, match="non-finite"):
        lira(phi, np.full((4, 3), np.nan), m)
    with pytest.raises(ValueError, match="target_phi must be a non-empty 1-D array"):
        lira([np.inf, 0, 0], ref, m)
    with pytest.raises(ValueError, match="at least one IN reference value"):
        lira(phi, ref, np.zeros((4, 3), dtype=bool))
    with pytest.raises(ValueError, match="at least one OUT reference value"):
        lira(phi, ref, np.ones((4, 3), dtype=bool), LiraOptions(online=False))
    with pytest.raises(ValueError, match=r"target_prob must be probabilities in \[0, 1\]"):
        rmia(np.array([0.5, 1.5, 0.2]), np.full((4, 3), 0.5), m)
    with pytest.raises(ValueError, match="n_examples must be >= 2 for RMIA"):
        rmia(np.array([0.5]), np.full((2, 1), 0.5), np.array([[True], [False]]))
    with pytest.raises(ValueError, match=r"population mask must have shape \(3,\)"):
        rmia(np.full(3, 0.5), np.full((4, 3), 0.5), m, population=np.ones(2, dtype=bool))
    with pytest.raises(ValueError, match=r"population indices must be in \[0, 3\)"):
        rmia(np.full(3, 0.5), np.full((4, 3), 0.5), m, population=np.array([0, 5]))
    with pytest.raises(ValueError, match="at least one example other than each scored one"):
        rmia(np.full(3, 0.5), np.full((4, 3), 0.5), m, population=np.array([1]))
    with pytest.raises(ValueError, match=r"^min_std must be a finite number > 0, got 0\.$"):
        LiraOptions(min_std=0)
    with pytest.raises(ValueError, match=r"^fixed_variance must be True, False or None"):
        LiraOptions(fixed_variance="yes")
    with pytest.raises(ValueError, match=r"^a must be in \[0, 1\], got 1\.5\.$"):
        RmiaOptions(a=1.5)
    with pytest.raises(ValueError, match=r"^gamma must be a finite number > 0, got 0\.$"):
        RmiaOptions(gamma=0)
    with pytest.raises(ValueError, match=r"^n_population must be an integer >= 1 or None"):
        RmiaOptions(n_population=0)


def test_importing_the_attack_maths_pulls_in_neither_torch_nor_sklearn():
    code = (
        "import sys, attacks.mia\n"
        "heavy = {'torch', 'sklearn', 'transformers', 'dptrain'}\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
