"""Attack metrics against scikit-learn, a brute-force oracle and Gaussian closed forms."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from attacks.metrics import AttackMetrics, evaluate_attack

ROOT = Path(__file__).resolve().parents[1]


def _brute_force(members, nonmembers, f):
    """Best TPR of "member iff score ≥ t" over every t with ≤ floor(f·n) false positives, and the
    fewest false positives that reach it; also the best TPR − FPR."""
    best_tpr, best_fp = 0.0, 0
    for t in np.append(np.union1d(members, nonmembers), np.inf)[::-1]:  # high to low threshold
        tpr, fp = np.mean(members >= t), int(np.sum(nonmembers >= t))
        if fp <= math.floor(f * nonmembers.size + 1e-9) and tpr > best_tpr:
            best_tpr, best_fp = tpr, fp
    advantage = max(
        np.mean(members >= t) - np.mean(nonmembers >= t)
        for t in np.append(np.union1d(members, nonmembers), np.inf)
    )
    return best_tpr, best_fp, advantage


@pytest.mark.parametrize("seed", range(12))
def test_matches_scikit_learn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_in, n_out = int(rng.integers(1, 60)), int(rng.integers(1, 60))
    # Rounded scores: plenty of ties, within and across the classes.
    members = np.round(rng.normal(rng.uniform(0, 2), 1, n_in), 1)
    nonmembers = np.round(rng.normal(0, 1, n_out), 1)
    targets = (0.01, 0.05, 0.1, 0.3)
    metrics = evaluate_attack(members, nonmembers, fpr_targets=targets)

    labels = np.r_[np.ones(n_in), np.zeros(n_out)]
    scores = np.r_[members, nonmembers]
    assert metrics.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert metrics.advantage == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    assert metrics.balanced_accuracy == pytest.approx((1 + metrics.advantage) / 2, abs=1e-12)
    for f in targets:
        best_tpr, best_fp, advantage = _brute_force(members, nonmembers, f)
        assert metrics.tpr_at_fpr[f] == pytest.approx(best_tpr, abs=1e-12)
        assert metrics.false_positives_at_fpr[f] == best_fp
        assert metrics.max_false_positives_at_fpr[f] == math.floor(f * n_out + 1e-9)
        assert metrics.advantage == pytest.approx(advantage, abs=1e-12)
    assert (metrics.n_members, metrics.n_nonmembers) == (n_in, n_out)


def test_gaussian_scores_match_closed_forms():
    # Members ~ N(μ, 1), non-members ~ N(0, 1): AUC = Φ(μ/√2), TPR at FPR f = 1 − Φ(z_f − μ) with
    # z_f = Φ⁻¹(1 − f), advantage = 2Φ(μ/2) − 1 (threshold at μ/2). Tolerances are 4 standard
    # errors at this n: Hanley-McNeil for the AUC; for TPR at FPR the binomial error of the members
    # plus the threshold's error, propagated through the ROC slope φ(z_f − μ)/φ(z_f).
    mu, n = 1.0, 20_000
    rng = np.random.default_rng(0)
    targets = (0.001, 0.01, 0.1)
    metrics = evaluate_attack(rng.normal(mu, 1, n), rng.normal(0, 1, n), fpr_targets=targets)

    auc = stats.norm.cdf(mu / math.sqrt(2))
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se_auc = math.sqrt((auc * (1 - auc) + (n - 1) * (q1 - auc**2) + (n - 1) * (q2 - auc**2)) / n**2)
    assert metrics.auc == pytest.approx(auc, abs=4 * se_auc)

    for f in targets:
        z = stats.norm.isf(f)
        tpr = stats.norm.sf(z - mu)
        slope = stats.norm.pdf(z - mu) / stats.norm.pdf(z)
        se = math.sqrt(tpr * (1 - tpr) / n + slope**2 * f * (1 - f) / n)
        assert metrics.tpr_at_fpr[f] == pytest.approx(tpr, abs=4 * se)
        assert metrics.max_false_positives_at_fpr[f] == round(f * n)

    advantage = 2 * stats.norm.cdf(mu / 2) - 1
    # The maximum of a noisy curve is biased up: a looser, fixed tolerance.
    assert metrics.advantage == pytest.approx(advantage, abs=0.02)


def test_perfect_separation():
    metrics = evaluate_attack(np.linspace(10, 11, 50), np.linspace(0, 1, 1000))
    assert metrics.auc == 1.0 and metrics.advantage == 1.0 and metrics.balanced_accuracy == 1.0
    assert metrics.tpr_at_fpr == {0.001: 1.0, 0.01: 1.0, 0.1: 1.0}
    assert metrics.false_positives_at_fpr == {0.001: 0, 0.01: 0, 0.1: 0}


def test_identical_distributions_are_at_chance():
    rng = np.random.default_rng(1)
    n = 20_000
    metrics = evaluate_attack(rng.normal(size=n), rng.normal(size=n))
    assert metrics.auc == pytest.approx(0.5, abs=4 * math.sqrt(1 / (6 * n)))  # Mann-Whitney SE
    assert metrics.tpr_at_fpr[0.1] == pytest.approx(0.1, abs=0.01)
    assert metrics.advantage < 0.03


def test_all_tied_scores_carry_no_information():
    metrics = evaluate_attack(np.ones(100), np.ones(1000))
    assert metrics.auc == 0.5 and metrics.advantage == 0.0 and metrics.balanced_accuracy == 0.5
    assert metrics.tpr_at_fpr == {0.001: 0.0, 0.01: 0.0, 0.1: 0.0}


def test_reports_how_many_false_positives_back_each_figure():
    rng = np.random.default_rng(2)
    metrics = evaluate_attack(rng.normal(2, 1, 300), rng.normal(0, 1, 1000))
    # With 1000 non-members, "TPR at 0.1% FPR" rests on at most one false positive.
    assert metrics.max_false_positives_at_fpr == {0.001: 1, 0.01: 10, 0.1: 100}
    for f, fp in metrics.false_positives_at_fpr.items():
        assert 0 <= fp <= metrics.max_false_positives_at_fpr[f]
    small = evaluate_attack(rng.normal(2, 1, 300), rng.normal(0, 1, 500))
    assert small.max_false_positives_at_fpr[0.001] == 0  # really a TPR at FPR 0
    # Budgets are computed in counts, immune to 0.29 · 100 = 28.999999999999996.
    assert evaluate_attack([1.0], np.arange(100.0), fpr_targets=(0.29,)).max_false_positives_at_fpr[
        0.29
    ] == 29


def test_to_dict_is_plain_json_and_keeps_the_curve_out_by_default():
    rng = np.random.default_rng(3)
    metrics = evaluate_attack(rng.normal(1, 1, 200), rng.normal(0, 1, 300))
    d = json.loads(json.dumps(metrics.to_dict(), allow_nan=False))
    assert set(d) == {
        "auc", "balanced_accuracy", "advantage", "tpr_at_fpr", "false_positives_at_fpr",
        "max_false_positives_at_fpr", "n_members", "n_nonmembers",
    }
    assert set(d["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    assert d["tpr_at_fpr"]["0.01"] == metrics.tpr_at_fpr[0.01]
    full = json.loads(json.dumps(metrics.to_dict(include_curve=True), allow_nan=False))
    assert len(full["fpr"]) == len(full["tpr"]) == len(full["thresholds"]) == metrics.fpr.size
    assert full["thresholds"][0] is None  # +inf has no JSON spelling
    assert full["fpr"][0] == 0.0 and full["tpr"][-1] == 1.0


def test_result_is_frozen_and_its_curve_read_only():
    metrics = evaluate_attack([1.0, 2.0], [0.0, 1.5])
    assert isinstance(metrics, AttackMetrics)
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics.auc = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        metrics.tpr[0] = 1.0
    assert "thresholds" not in repr(metrics)


@pytest.mark.parametrize(
    "members, nonmembers, targets, message",
    [
        ([], [1.0], (0.1,),
         "member_scores must be a non-empty 1-D array of finite numbers, got shape (0,)."),
        ([1.0], np.zeros((2, 2)), (0.1,),
         "nonmember_scores must be a non-empty 1-D array of finite numbers, got shape (2, 2)."),
        ([1.0, np.inf], [1.0], (0.1,),
         "member_scores must be a non-empty 1-D array of finite numbers, got shape (2,) with 1 "
         "non-finite value(s)."),
        ([1.0], [1.0], (0.1, 1.5), "fpr_targets must be in (0, 1), got 1.5."),
        ([1.0], [1.0], (),
         "fpr_targets must be a non-empty sequence of numbers in (0, 1), got ()."),
    ],
)
def test_bad_input_is_refused_in_one_voice(members, nonmembers, targets, message):
    with pytest.raises(ValueError) as info:
        evaluate_attack(members, nonmembers, fpr_targets=targets)
    assert str(info.value) == message


def test_importing_metrics_does_not_pull_in_torch():
    code = "import sys, attacks.metrics\nprint('torch' in sys.modules)\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
