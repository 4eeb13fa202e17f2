"""White-box audits: gradient canaries through the engine, the f-DP one-run bound, planted bugs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attacks.audit import (epsilon_one_run, gdp_epsilon, mu_one_run, one_run_audit)
from dptrain.gradient_canaries import DiracCanaries
from dptrain.private_training import make_private
from experiments.planted_bugs import BUGS, audit_engine, replay_steps

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ------------------------------------------------------------------ the f-DP one-run bound
def test_fdp_bound_is_valid_for_gaussian_canaries():
    """Idealized game at a true μ: the bound exceeds μ in at most ~5% of audits, and is not
    vacuous (the median bound is over half of μ)."""
    rng = np.random.default_rng(0)
    mu, m, k, trials = 1.0, 2000, 100, 120
    from attacks.audit import _gdp_mu_lb

    rs, vs = [], []
    for _ in range(trials):
        b = rng.random(m) < 0.5
        order = np.argsort(-rng.normal(mu * b, 1.0))
        vs.append(int(b[order[:k]].sum() + (~b[order[-k:]]).sum()))
        rs.append(2 * k)
    lbs = _gdp_mu_lb(m, np.array(rs), np.array(vs), 0.05)
    assert (lbs > mu).mean() <= 0.05
    assert 0.5 * mu < np.median(lbs) < mu


@pytest.mark.parametrize("m,r,v", [(1000, 100, 100), (1000, 100, 90), (1000, 1000, 700),
                                   (10_000, 2000, 1800), (100, 10, 10), (10**6, 2000, 1700)])
def test_fdp_bound_is_never_looser_than_the_eps_delta_bound(m, r, v):
    fdp = gdp_epsilon(mu_one_run(m, r, v), 1e-5)
    epsd = epsilon_one_run(m, r, v, delta=1e-5)
    assert fdp >= epsd > 0


def test_fdp_bound_grows_with_right_guesses_and_is_zero_at_chance():
    bounds = [mu_one_run(1000, 200, v) for v in (100, 130, 160, 190, 200)]
    assert bounds[0] == 0.0
    assert all(a < b for a, b in zip(bounds, bounds[1:]))


def test_one_run_audit_reports_the_fdp_bound_with_its_correction():
    rng = np.random.default_rng(1)
    b = rng.random(20_000) < 0.5
    x = rng.normal(0.8 * b, 1.0)
    ks = [20, 100, 500]
    single = one_run_audit(x, b, k_positive=100, k_negative=100, delta=1e-5, bound="f-dp")
    searched = one_run_audit(x, b, k_positive=ks, k_negative=ks, delta=1e-5, bound="f-dp", paired=True)
    assert single.correction == "none" and searched.correction == "bonferroni"
    assert searched.n_choices == 3 and searched.bound == "f-dp"
    assert searched.epsilon_lb == pytest.approx(gdp_epsilon(searched.mu_lb, 1e-5))
    assert 0 < searched.mu_lb < 0.8
    with pytest.raises(ValueError, match="delta"):
        one_run_audit(x, b, k_positive=100, bound="f-dp", delta=0.0)
    with pytest.raises(ValueError, match="same length"):
        one_run_audit(x, b, k_positive=[1, 2], k_negative=[1], paired=True)


def test_mechanism_curve_bound_is_valid_and_close_to_the_gaussian_one_at_q_1():
    """At q = 1, one step, DP-SGD is the Gaussian mechanism: the bound against its own PRV curve
    must stay below the claimed ε (10 simulated audits) and agree with the μ-GDP bound."""
    from attacks.whitebox_audit import bound_scores, mechanism_bound
    from dptrain.accounting import epsilon_after

    sigma, m = 2.0, 20_000
    claim = epsilon_after(sigma, 1.0, 1, 1e-5)
    rng = np.random.default_rng(3)
    for trial in range(10):
        b = rng.random(m) < 0.5
        scores = (rng.normal(b.astype(float), sigma) - 0.5) / sigma**2
        mech = mechanism_bound(scores, b, sample_rate=1.0, steps=1, delta=1e-5)
        assert 0 < mech["epsilon_lb"] <= claim
        if trial == 0:
            gdp = bound_scores(scores, b, delta=1e-5)["f_dp"]["epsilon_lb"]
            assert mech["epsilon_lb"] == pytest.approx(gdp, rel=0.05)


def test_curve_recursion_equals_the_gaussian_one_for_a_gaussian_table():
    from scipy import special

    from attacks.audit import _gdp_required_mass, curve_one_run_rejects

    mu = 0.4  # between the pairs' μ bounds (0.30, 0.37 / 0.44, 0.63): some reject, some not
    x = np.unique(np.concatenate([np.geomspace(1e-16, 1e-3, 3000), np.linspace(1e-3, 1, 3000)]))
    table = (x, special.ndtr(special.ndtri(x) - mu))
    r, v = np.array([200, 2000, 400, 100]), np.array([170, 1500, 300, 95])
    want = _gdp_required_mass(10_000, r, v, np.full((4, 1), mu), 0.05)[:, 0] > r / 10_000
    assert (curve_one_run_rejects(10_000, r, v, table, 0.05) == want).all()
    assert want.any() and not want.all()


# ------------------------------------------------------------------ canaries through the engine
def _mlp(seed=0, hidden=64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))


def test_dirac_rows_are_clipped_like_examples():
    model = _mlp()
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), num_examples=10,
                      batch_size=5, steps=1, noise_multiplier=1.0, max_grad_norm=0.5)
    params = dp.clipper.parameters
    idx = torch.tensor([0, 0, 3, 2])
    off = torch.tensor([5, 7, 1, 0])
    val = torch.tensor([3.0, -0.2, -10.0, 0.4], dtype=torch.float64)
    added = dp.clipper.clip_and_add_dirac(idx, off, val)
    assert torch.allclose(added, torch.tensor([0.5, -0.2, -0.5, 0.4], dtype=torch.float64), atol=1e-6)
    for i, p in enumerate(params):
        expect = torch.zeros(p.numel())
        for j in range(4):
            if idx[j] == i:
                expect[off[j]] += float(added[j])
        got = p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
        assert torch.allclose(got, expect)
    dp.detach()


def test_one_canary_moves_the_release_by_exactly_c_at_its_coordinate():
    """Same seeds, one canary's coin flipped: the updates differ by C/(qN) at its coordinate
    only (q = 1: it is in every step)."""
    released = []
    for coin in (True, False):
        model = _mlp(hidden=16)
        x, y = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
        dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), num_examples=6,
                          batch_size=6, steps=2, noise_multiplier=0.7, max_grad_norm=0.3, seed=4)
        canaries = DiracCanaries(50, seed=9)
        canaries.included[:] = False
        canaries.included[7] = coin
        dp.attach_canaries(canaries)
        before = torch.cat([p.detach().reshape(-1).clone() for p in dp.clipper.parameters])
        for idx in dp.sampler:
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            dp.optimizer.step()
            dp.optimizer.zero_grad()
            break  # one step: the weights then differ, the next step's real gradients too
        after = torch.cat([p.detach().reshape(-1) for p in dp.clipper.parameters])
        released.append(before - after)  # lr 1, plain SGD: the released update itself
        starts = np.cumsum([0] + [p.numel() for p in dp.clipper.parameters])
        coord = int(starts[int(canaries.param_index[7])] + canaries.offset[7])
        sign = canaries.signs[7]
        dp.detach()
    diff = released[0] - released[1]
    assert float(diff[coord]) == pytest.approx(sign * 0.3 / 6, rel=1e-4)
    diff[coord] = 0
    assert float(diff.abs().max()) < 1e-7


def test_auditor_scores_follow_the_gaussian_mechanism():
    """q = 1, one step: y = b + N(0, σ²) per canary, score (y − ½)/σ²."""
    model = torch.nn.Sequential(torch.nn.Linear(300, 400))
    sigma = 2.0
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), num_examples=4,
                      batch_size=4, steps=1, noise_multiplier=sigma, max_grad_norm=1.0, seed=0)
    canaries = DiracCanaries(100_000, seed=1)
    dp.attach_canaries(canaries)
    x = torch.randn(4, 300)
    for idx in dp.sampler:
        model(x[idx]).pow(2).mean().backward()
        dp.optimizer.step()
    dp.detach()
    y = canaries.all_iterates * sigma**2 + 0.5
    inc = canaries.included
    for group, mean in ((y[inc], 1.0), (y[~inc], 0.0)):
        se = sigma / np.sqrt(group.size)
        assert abs(group.mean() - mean) < 6 * se
        assert abs(group.std() / sigma - 1) < 6 / np.sqrt(2 * group.size)


def test_canaries_need_distinct_coordinates():
    from dptrain.errors import ConfigError

    model = torch.nn.Linear(3, 2)
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), num_examples=4,
                      batch_size=2, steps=1, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="8 parameters; use at most 8"):
        dp.attach_canaries(DiracCanaries(9))
    capped = DiracCanaries(9, at_most_parameters=True)
    dp.attach_canaries(capped)
    assert capped.m == 8 and capped.included.size == 8
    dp.detach()


# ------------------------------------------------------------------ planted bugs
@pytest.mark.parametrize("epsilon", [1.0, 2.0])
@pytest.mark.parametrize("bug", ["half_sigma", "no_clipping", "one_layer_norm"])
def test_white_box_audit_catches_planted_bug(bug, epsilon):
    result = audit_engine(bug, epsilon, m=10**6)
    assert result["epsilon_lb_fdp"] > epsilon, result


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
def test_white_box_audit_catches_noise_of_two_ranks_mostly(epsilon):
    """σ/√2 is at the edge of what one run can see (true ε ≈ 1.47 at a claim of 1): the bound
    passes the claim in most audits and never falls to where a correct engine's bounds lie."""
    bounds = [audit_engine("two_ranks", epsilon, m=10**6, seed=seed)["epsilon_lb_fdp"] for seed in range(3)]
    assert sum(b > epsilon for b in bounds) >= 2, bounds
    assert min(bounds) > 0.9 * epsilon, bounds


def test_guesses_are_planned_from_the_claim_alone():
    from attacks.whitebox_audit import GUESS_FRACTIONS, plan_guesses

    plan = plan_guesses(100_000, noise_multiplier=2.0, sample_rate=1.0, steps=1)
    assert len(plan) == 3 and plan[1] == 2 * plan[0] and set(plan) - {0.5} <= {
        f * s for f in GUESS_FRACTIONS for s in (0.5, 1, 2)}
    assert plan == plan_guesses(100_000, noise_multiplier=2.0, sample_rate=1.0, steps=1)
    assert plan_guesses(100_000, noise_multiplier=0.0, sample_rate=0.1, steps=5) == GUESS_FRACTIONS


def test_correct_engine_stays_below_its_claim_in_20_audits():
    results = [audit_engine(None, 2.0 if seed % 2 else 1.0, m=200_000, seed=seed) for seed in range(20)]
    ratios = [r["epsilon_lb_fdp"] / r["claimed_epsilon"] for r in results]
    assert max(ratios) <= 1.0, ratios
    assert min(ratios) > 0.4, ratios  # and the audit is not vacuous


def test_correct_engine_with_subsampling_stays_below_its_claim():
    """q = 0.1, ten steps, bound against the run's own curve (three audits)."""
    for seed in range(3):
        r = audit_engine(None, 2.0, m=200_000, seed=seed, sample_rate=0.1, steps=10, mechanism=True)
        assert 0 < r["epsilon_lb_mechanism"] <= r["claimed_epsilon"], r


@pytest.mark.parametrize("bug", [None, *BUGS])
def test_grey_box_replay_catches_every_planted_bug(bug):
    result = replay_steps(bug)
    assert result["passed"] == (bug is None), result


# ------------------------------------------------------------------ the audit command
def test_white_box_audit_of_a_training_run(tmp_path):
    from attacks.whitebox_audit import WhiteBoxOptions, run_white_box_audit
    from dptrain.trainer import TrainConfig

    cfg = TrainConfig(data="synthetic", model="tiny", epsilon=float("inf"), synthetic_per_intent=20,
                      epochs=2, batch_size=16)
    report = run_white_box_audit(cfg, tmp_path / "inf", WhiteBoxOptions(canaries=20_000, canary_seed=1),
                                 progress=False)
    assert report["verdict"] == "no claim"
    assert report["views"]["all_iterates"]["f_dp"]["epsilon_lb"] >= 5
    assert report["epsilon_lb"] == report["views"]["all_iterates"]["mechanism"]["epsilon_lb"] >= 5
    files = {p.name for p in (tmp_path / "inf").iterdir()}
    assert {"audit.json", "report.json", "canaries.npz", "canary_scores.png", "run"} <= files
    run_files = {p.name for p in (tmp_path / "inf" / "run").rglob("*")}
    assert not any("canar" in f for f in run_files)  # the shipped run holds no audit secret
    with np.load(tmp_path / "inf" / "canaries.npz", allow_pickle=False) as z:
        assert z["included"].size == 20_000

    cfg = TrainConfig(data="synthetic", model="tiny", epsilon=2.0, synthetic_per_intent=20,
                      epochs=2, batch_size=16)
    report = run_white_box_audit(cfg, tmp_path / "e2", WhiteBoxOptions(canaries=20_000, canary_seed=1),
                                 progress=False)
    assert report["verdict"] == "consistent"
    assert 0 < report["epsilon_lb"] <= report["claimed_epsilon"]
    assert json.loads((tmp_path / "e2" / "report.json").read_text())["summary"] == report["summary"]


def test_white_box_cli_refusals(tmp_path, capsys):
    from dptrain.cli import main

    assert main(["audit", "--white-box", "--resume", "--out", str(tmp_path / "a")]) == 2
    assert "cannot be resumed" in capsys.readouterr().err
    assert main(["audit", "--white-box", "--data", "synthetic", "--model", "tiny", "--canaries",
                 "5000000", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "use at most" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_canaries_need_the_runs_sample_rate():
    from dptrain.engine import PerSampleClipper
    from dptrain.errors import ConfigError
    from dptrain.optimizer import DPOptimizer

    model = _mlp()
    clipper = PerSampleClipper(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clipper, noise_multiplier=1.0,
                      expected_batch_size=4)
    with pytest.raises(ConfigError, match="sample_rate"):
        opt.attach_canaries(DiracCanaries(10), steps=3)
    clipper.detach()
