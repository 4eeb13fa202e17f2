"""`dptrain audit`: canaries and their coins, the one-run pipeline end to end, the command line.

The end-to-end tests train a tiny model twice on the same small synthetic data plus canaries:
without privacy, long enough to memorize the included canaries (the audit must then find a bound
well above 1), and with DP at ε = 1 (the bound must not exceed the claim: if it does, the engine,
the accountant or the audit is wrong, and the test must not be weakened to hide it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from attacks.audit import epsilon_one_run, one_run_p_value
from attacks.audit_run import AuditRunOptions, build_report, guess_grid, run_audit
from attacks.canaries import CanarySet, inclusion_coins, insert_canaries
from dptrain import rundir
from dptrain.cli import main
from dptrain.data import IntentData, Split, load_intent_data
from dptrain.errors import ConfigError
from dptrain.trainer import TrainConfig

PER_INTENT = 8  # 240 synthetic utterances, 192 of them in the training split
M = 192  # canaries: about 96 come in
RECIPE = dict(data="synthetic", model="tiny", synthetic_per_intent=PER_INTENT, epochs=30.0,
              batch_size=32, physical_batch_size=64, lr=3e-3, dp_seed=1)
CANARY_SEED = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> IntentData:
    return load_intent_data("synthetic", seed=0, synthetic_per_intent=PER_INTENT)


# ---------------------------------------------------------------------------------------------
# Canaries and coins
# ---------------------------------------------------------------------------------------------


def test_inclusion_is_fair_and_independent_coins():
    big = inclusion_coins(40_000, seed=11)
    assert stats.binomtest(int(big.sum()), big.size, 0.5).pvalue > 1e-4
    # neighbours are independent: P[both in] ≈ 1/4
    both = np.mean(big[1:] & big[:-1])
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / big.size)
    # over many seeds the count of m = 100 coins is Binomial(100, 1/2)
    counts = np.array([inclusion_coins(100, seed=s).sum() for s in range(400)])
    assert abs(counts.mean() - 50) < 5 * math.sqrt(25 / 400)
    assert 25 * 0.75 < counts.var() < 25 * 1.3
    observed = np.bincount(np.clip(counts, 40, 60) - 40, minlength=21)
    law = stats.binom(100, 0.5)
    expected = np.diff(np.concatenate([[0.0], law.cdf(np.arange(40, 60)), [1.0]])) * counts.size
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_coins_are_independent_of_training_randomness():
    m = 20_000
    for seed in range(5):
        coins = inclusion_coins(m, seed)
        assert np.array_equal(coins, inclusion_coins(m, seed))  # reproducible when seeded
        # the non-private sampler draws from default_rng(dp_seed); the private one from
        # SeedSequence(dp_seed); the audit's tie-breaks from its own spawn key: none may replay
        # the coins, so agreement with any of them is at chance level.
        others = [
            np.random.default_rng(seed).random(m) < 0.5,
            np.random.default_rng(np.random.SeedSequence(seed).generate_state(2)[0]).random(m) < 0.5,
            np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0]).random(m) < 0.5,
        ]
        for other in others:
            assert abs(np.mean(coins == other) - 0.5) < 5 * math.sqrt(0.25 / m)
    # unseeded: OS entropy, a different draw every time
    assert not np.array_equal(inclusion_coins(256, None), inclusion_coins(256, None))


def test_canaries_are_unique_disjoint_and_labelled(data):
    augmented, canaries = insert_canaries(data, M, seed=CANARY_SEED)
    assert isinstance(canaries, CanarySet) and canaries.m == M
    assert len(set(canaries.texts)) == M
    natural = {t.lower() for split in data.splits.values() for t in split.texts}
    assert natural.isdisjoint(t.lower() for t in canaries.texts)
    assert canaries.labels.dtype == np.int64
    assert canaries.labels.min() >= 0 and canaries.labels.max() < data.num_labels
    assert len(set(canaries.labels.tolist())) > 10  # uniformly random labels, not one class
    with pytest.raises(ValueError):
        canaries.included[0] = not canaries.included[0]  # read-only
    # texts and labels are public and fixed; only the coins change with the seed
    _, again = insert_canaries(data, M, seed=CANARY_SEED + 1)
    assert again.texts == canaries.texts and np.array_equal(again.labels, canaries.labels)
    assert not np.array_equal(again.included, canaries.included)


def test_augmented_training_set_and_member_ids(data):
    augmented, canaries = insert_canaries(data, M, seed=CANARY_SEED)
    n = len(data.train)
    idx = np.flatnonzero(canaries.included)
    assert canaries.num_natural == n and canaries.num_included == idx.size
    assert len(augmented.train) == n + idx.size
    assert augmented.train.texts[:n] == data.train.texts
    assert augmented.train.texts[n:] == tuple(canaries.texts[i] for i in idx)
    assert np.array_equal(augmented.train.labels[n:], canaries.labels[idx])
    assert augmented.validation == data.validation and augmented.test == data.test
    assert augmented.label_names == data.label_names
    ids = canaries.member_ids
    assert np.array_equal(ids, np.concatenate([np.arange(n), n + idx]))
    assert len(ids) == len(augmented.train) and len(set(ids.tolist())) == len(ids)


def test_a_canary_that_collides_with_the_data_is_replaced():
    from dptrain.synthetic import audit_canaries

    first = audit_canaries(3, ["a", "b"], 0)
    clash = "  " + first[1][0].upper() + " "  # the same text as an uncased tokenizer sees it
    split = Split(("hello there", clash, "good bye"), [0, 1, 0])
    data = IntentData(split, split, split, ("a", "b"), "test")
    _, canaries = insert_canaries(data, 3, seed=0)
    assert canaries.m == 3
    assert first[1][0] not in canaries.texts
    assert canaries.texts[0] == first[0][0] and canaries.texts[1] == first[2][0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: insert_canaries(d, 1, 0), "the number of canaries must be an integer >= 2, got 1."),
        (lambda d: insert_canaries(d, 10, "x"), "the canary seed must be an integer or None"),
        (lambda d: AuditRunOptions(confidence=1.0), "confidence must be in (0.5, 1), got 1.0."),
        (lambda d: AuditRunOptions(confidence=0.5), "confidence must be in (0.5, 1), got 0.5."),
        (lambda d: AuditRunOptions(canaries=1), "canaries must be an integer >= 2, got 1."),
        (lambda d: AuditRunOptions(correction="holm"), "correction must be one of bonferroni, split"),
    ],
)
def test_bad_options_are_refused(data, call, message):
    with pytest.raises(ConfigError) as info:
        call(data)
    assert message in str(info.value)


def test_guess_grid():
    assert guess_grid(1000) == [50, 100, 200, 500]
    assert guess_grid(192) == [9, 19, 38, 96]
    assert guess_grid(2) == [1]
    for m in range(2, 60):
        assert 2 * max(guess_grid(m)) <= m  # every pair (k+, k-) fits in m


# ---------------------------------------------------------------------------------------------
# The one-run bound itself: the δ term as the paper states it
# ---------------------------------------------------------------------------------------------


def _theorem_3_1(m, r, v, eps, delta):
    """Steinke, Nasr, Jagielski 2023, Theorem 3.1, literally: with f(x) = P[Binomial(r, q) ≥ x],
    q = e^ε/(1 + e^ε), P[W ≥ v] ≤ f(v) + 2mδ · max_{i ∈ {1..m}} (f(v − i) − f(v)) / i."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(x):
        return 1.0 if x <= 0 else float(stats.binom.sf(x - 1, r, q))

    alpha = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(f(v) + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [(60, 40, 35, 1.5, 1e-3), (200, 100, 80, 1.0, 1e-5), (30, 30, 30, 3.0, 1e-2),
     (100, 20, 3, 0.5, 1e-4), (50, 10, 0, 1.0, 1e-2)],
)
def test_one_run_p_value_is_theorem_3_1(m, r, v, eps, delta):
    # The code maximizes over i ≤ v only: for i > v, f(v − i) = 1, so the ratio only shrinks.
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        _theorem_3_1(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_one_run_published_check_value():
    assert epsilon_one_run(1000, 100, 100, confidence=0.95) == pytest.approx(3.493, abs=5e-4)


# ---------------------------------------------------------------------------------------------
# The report, from given scores (no training)
# ---------------------------------------------------------------------------------------------


def _fake_canaries(m, seed=0):
    included = inclusion_coins(m, seed)
    return CanarySet(texts=tuple(f"c{i}" for i in range(m)), labels=np.zeros(m, np.int64),
                     included=included, num_natural=500, seed=seed, text_seed=0)


def test_a_bound_above_the_claim_is_reported_loudly():
    canaries = _fake_canaries(1000)
    phi = np.where(canaries.included, 5.0, -5.0) + np.linspace(0, 1, 1000)  # perfect separation
    privacy = {"private": True, "epsilon": 0.5, "target_epsilon": 0.5, "delta": 1e-5,
               "num_examples": 1000}
    report = build_report(privacy, canaries, phi, AuditRunOptions())
    assert report["verdict"] == "refuted"
    assert report["one_run"]["epsilon_lb"] > 3
    text = "\n".join(report["summary"])
    assert "the bound exceeds the claimed ε: the claim is refuted or there is a bug" in text


def test_scores_without_signal_give_nothing_and_split_is_reported():
    canaries = _fake_canaries(400, seed=3)
    phi = np.random.default_rng(0).normal(size=400)  # independent of the coins
    privacy = {"private": True, "epsilon": 1.0, "target_epsilon": 1.0, "delta": 1e-5,
               "num_examples": 600}
    for correction in ("bonferroni", "split"):
        report = build_report(privacy, canaries, phi, AuditRunOptions(correction=correction))
        assert report["one_run"]["correction"] == correction
        assert report["one_run"]["epsilon_lb"] == 0.0
        assert report["verdict"] == "consistent"
        assert report["threshold_audits"]["clopper_pearson"]["correction"] == correction


# ---------------------------------------------------------------------------------------------
# End to end on a tiny model
# ---------------------------------------------------------------------------------------------

REPORT_KEYS = {"theoretical", "one_run", "verdict", "canaries", "score", "threshold_audits",
               "summary"}
ONE_RUN_KEYS = {"epsilon_lb", "m", "r", "v", "k_positive", "k_negative", "confidence", "delta",
                "correction", "n_choices", "score"}


def _check_files(out: Path, m: int) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert ONE_RUN_KEYS <= set(report["one_run"])
    one = report["one_run"]
    assert one["m"] == m and one["score"] == "phi" and one["confidence"] == 0.95
    assert one["correction"] == "bonferroni" and one["n_choices"] == 16
    assert one["r"] == one["k_positive"] + one["k_negative"] and 0 <= one["v"] <= one["r"]
    assert report["theoretical"] == json.loads((out / "run" / "privacy.json").read_text())
    assert (out / "canary_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    canaries = json.loads((out / "canaries.json").read_text())
    included = np.array(canaries["included"])
    assert report["canaries"]["m"] == m == len(canaries["texts"]) == len(canaries["phi"])
    assert report["canaries"]["included"] == int(included.sum())
    assert report["canaries"]["seed"] == CANARY_SEED
    members = json.loads((out / "run" / rundir.MEMBERS).read_text())
    n = report["canaries"]["num_natural_train"]
    assert members["member_ids"] == list(range(n)) + [n + int(i) for i in np.flatnonzero(included)]
    privacy = report["theoretical"]
    assert members["num_train_rows"] == n + int(included.sum())  # the accountant saw the canaries
    assert abs(privacy["dataset_size"] - members["num_train_rows"]) < 5 * 20  # ... counted privately
    # the one-run numbers can be recomputed from canaries.json alone
    phi = np.array(canaries["phi"])
    order = np.argsort(-phi, kind="stable")
    ranked = included[order]
    v = ranked[: one["k_positive"]].sum() + (~ranked[m - one["k_negative"]:]).sum()
    assert v == one["v"]  # (no ties in φ here, so the audit's tie-break cannot matter)
    return report


def test_non_private_overfit_model_leaks(tmp_path):
    config = TrainConfig(**RECIPE, epsilon=math.inf)
    outcome = run_audit(config, tmp_path / "audit",
                        AuditRunOptions(canaries=M, canary_seed=CANARY_SEED), progress=False)
    report = _check_files(tmp_path / "audit", M)
    assert report["verdict"] == "no claim" and report["one_run"]["delta"] == 0.0
    assert outcome.epsilon_lb == report["one_run"]["epsilon_lb"] >= 1.5
    assert report["score"]["included_median"] > report["score"]["excluded_median"] + 2
    assert any("ε ≥" in line and "Bonferroni over 16 choices" in line for line in outcome.summary)


def test_dp_model_at_epsilon_one_stays_below_its_claim(tmp_path):
    config = TrainConfig(**RECIPE, epsilon=1.0)
    outcome = run_audit(config, tmp_path / "audit",
                        AuditRunOptions(canaries=M, canary_seed=CANARY_SEED), progress=False)
    report = _check_files(tmp_path / "audit", M)
    claimed = report["theoretical"]["epsilon"]
    assert report["theoretical"]["private"] and 0.9 < claimed <= 1.0
    assert report["one_run"]["delta"] == report["theoretical"]["delta"] > 0
    # A violation here is a privacy bug (engine, accountant or audit): investigate, never relax.
    assert outcome.epsilon_lb <= claimed
    assert report["verdict"] == "consistent"
    assert any(line.endswith("consistent.") for line in outcome.summary)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

CLI_RUN = ["--model", "tiny", "--data", "synthetic", "--synthetic-per-intent", "2", "--epochs",
           "2", "--batch-size", "16", "--physical-batch-size", "64", "--dp-seed", "1", "--quiet"]


def test_cli_audit_writes_the_report(tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(["audit", *CLI_RUN, "--epsilon", "4", "--canaries", "20", "--canary-seed", "3",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "One-run audit:" in captured.out and f"audit written to {out}" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["one_run"]["m"] == 20 and report["canaries"]["seed"] == 3
    assert report["one_run"]["epsilon_lb"] <= report["theoretical"]["epsilon"]
    assert report["one_run"]["k_grid"] == [1, 2, 4, 10]
    assert (out / "canary_scores.png").exists() and (out / "run" / "model").is_dir()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--confidence", "1.5"], "confidence must be in (0.5, 1), got 1.5."),
        (["--canaries", "1"], "canaries must be an integer >= 2, got 1."),
        (["--canaries", "1000"], "canaries must be at most the 48 natural training examples"),
        (["--correction", "holm"], "correction must be one of bonferroni, split"),
        (["--epsilon", "-1"], "epsilon must be > 0"),
        (["--canaries", "x"], "expected an integer"),
    ],
)
def test_cli_audit_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    out = tmp_path / "audit"
    code = main(["audit", *CLI_RUN, "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err and captured.err.count("\n") == 1
    assert not out.exists()


def test_cli_audit_refuses_a_used_directory(tmp_path, capsys):
    out = tmp_path / "audit"
    out.mkdir()
    (out / "report.json").write_text("{}")
    code = main(["audit", *CLI_RUN, "--out", str(out)])
    assert code == 2 and "is not empty" in capsys.readouterr().err
