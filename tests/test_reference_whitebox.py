"""Independent reference checks for the white-box (gradient-canary) audit.

Written from the mathematics and the public API only:

1. Dirac canary clipping: a per-example gradient ``v`` on one coordinate, flat-clipped with bound
   C, contributes exactly ``min(1, C / (|v| + 1e-6)) * v`` to that coordinate and nothing
   elsewhere; several canaries in one call are clipped independently; ``|contribution| <= C``.
2. Sensitivity of a DP step to one canary coin: same seed (same sampling, same noise), coin in
   vs. out, the released update differs by exactly ``C / (q N) * sign`` at that canary's
   coordinate for each step in which it was sampled, and is identical everywhere else.
3. Noise statistics of the all-iterates score at q = 1, one step: ``(y - 1/2) / sigma^2`` with
   ``y ~ N(b, sigma^2)``, b the coin.
4. The f-DP one-run lower bound ``mu_one_run`` is valid (Monte Carlo of the idealised game),
   non-vacuous, monotone in v, and not looser than the (eps, delta) one-run bound.

Every check prints a ``RESULT`` line with the measured numbers (run with ``-s``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm

from attacks.audit import epsilon_one_run, gdp_epsilon, mu_one_run
from dptrain.gradient_canaries import DiracCanaries
from dptrain.private_training import make_private

STAB = 1e-6
DELTA = 1e-5


@pytest.fixture(autouse=True)
def _quiet_and_single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that also records every parameter's .grad at the moment it steps (the release)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=0.0)
        self.released: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        rec = []
        for group in self.param_groups:
            for p in group["params"]:
                rec.append(None if p.grad is None else p.grad.detach().clone())
        self.released.append(rec)
        return super().step(closure)


def _in_clipper_order(opt, dp, tensors):
    """Reorder a list aligned with the optimizer's parameters into dp.clipper.parameters order
    (the list that DiracCanaries.param_index indexes)."""
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    out = []
    for p in dp.clipper.parameters:
        (k,) = [i for i, q in enumerate(opt_params) if q is p]
        out.append(tensors[k])
    return out


def train(model, opt, x, y, *, q, steps, sigma, C, seed, canaries=None, flip=None):
    """Run the documented DP training loop; ``flip`` (index) flips that canary's coin before training."""
    N = x.shape[0]
    dp = make_private(model, opt, num_examples=N, batch_size=q * N, steps=steps,
                      noise_multiplier=sigma, delta=DELTA, max_grad_norm=C, seed=seed)
    if canaries is not None:
        if flip is not None:
            canaries.included[flip] = not canaries.included[flip]
        dp.attach_canaries(canaries)
    for idx in dp.sampler:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        if idx.numel() > 0:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
        dp.optimizer.step()
        dp.optimizer.zero_grad()
    return dp


# --------------------------------------------------------------------------- #
# 1. Dirac canary clipping
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("C", [0.7, 3.0])
@pytest.mark.parametrize("preexisting_grad", [False, True])
def test_clip_and_add_dirac_exact(C, preexisting_grad):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = make_private(model, opt, num_examples=10, batch_size=5, steps=1,
                      noise_multiplier=1.0, delta=DELTA, max_grad_norm=C, seed=0)
    params = list(dp.clipper.parameters)
    assert len(params) == 4
    # canary coordinates are indices into dp.clipper.parameters (whatever its order); pick
    # offsets valid for each parameter's size.
    sizes = [p.numel() for p in params]
    gen = torch.Generator().manual_seed(7)
    if preexisting_grad:
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    else:
        for p in params:
            p.grad = None
    before = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]

    # canaries in every parameter; different magnitudes above/below C; a repeated coordinate.
    pidx = torch.tensor([0, 1, 2, 3, 0, 2, 0], dtype=torch.long)
    offs = torch.tensor([sizes[0] - 1, 2, sizes[2] - 1, 0, 1, sizes[2] - 1, 0], dtype=torch.long)
    vals = torch.tensor([10.0, -0.3, -2.5, 0.05, -10.0, 1.7, 1e-8], dtype=params[0].dtype)

    added = dp.clipper.clip_and_add_dirac(pidx, offs, vals)

    v64 = vals.double()
    expected_added = torch.clamp(C / (v64.abs() + STAB), max=1.0) * v64
    expected = [b.double().clone() for b in before]
    for j in range(len(vals)):
        expected[int(pidx[j])].view(-1)[int(offs[j])] += expected_added[j]

    max_err_added = (torch.as_tensor(added).double().reshape(-1) - expected_added).abs().max().item()
    max_err_grad = max((p.grad.double() - e).abs().max().item() for p, e in zip(params, expected))
    print(f"RESULT clip_and_add_dirac C={C} preexisting={preexisting_grad}: "
          f"max|added-exp|={max_err_added:.3g} max|grad-exp|={max_err_grad:.3g} "
          f"added={torch.as_tensor(added).tolist()} expected={expected_added.tolist()}")
    assert max_err_added < 1e-6
    assert max_err_grad < 1e-6
    # sensitivity: each canary's contribution is at most C
    assert torch.as_tensor(added).double().abs().max().item() <= C * (1 + 1e-9)
    # nothing anywhere else: coordinates not touched by a canary keep their old value exactly
    touched = {(int(a), int(b)) for a, b in zip(pidx, offs)}
    for i, (p, b) in enumerate(zip(params, before)):
        mask = torch.ones(p.numel(), dtype=torch.bool)
        for (a, o) in touched:
            if a == i:
                mask[o] = False
        assert torch.equal(p.grad.detach().reshape(-1)[mask], b.reshape(-1)[mask])


# --------------------------------------------------------------------------- #
# 2. Sensitivity of a whole DP step to one canary coin
# --------------------------------------------------------------------------- #
def _data(N=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, generator=g), torch.randint(0, 2, (N,), generator=g)


def _pair_runs(*, q, steps, C, sigma, lr, m, j, seed=11, N=8):
    x, y = _data(N)
    out = []
    for flip in (None, j):
        model = small_model()
        opt = RecordingSGD(model.parameters(), lr=lr)
        can = DiracCanaries(m, seed=123)
        dp = train(model, opt, x, y, q=q, steps=steps, sigma=sigma, C=C, seed=seed,
                   canaries=can, flip=flip)
        out.append((model, opt, can, dp))
    return out


@pytest.mark.parametrize("j", [0, 3])
def test_one_canary_sensitivity_every_step(j):
    """q = 1, T = 3, lr = 0 (the model, hence the data gradients, are the same in both runs at
    every step): the per-step releases differ only at canary j's coordinate, by C/(qN)*sign."""
    q, T, C, sigma, m, N = 1.0, 3, 0.7, 1.3, 6, 8
    (mA, oA, cA, dA), (mB, oB, cB, dB) = _pair_runs(q=q, steps=T, C=C, sigma=sigma, lr=0.0,
                                                  m=m, j=j, N=N)
    assert cA.included[j] != cB.included[j]
    assert np.array_equal(np.delete(cA.included, j), np.delete(cB.included, j))
    assert torch.equal(cA.param_index, cB.param_index) and torch.equal(cA.offset, cB.offset)
    # orient: run "in" minus run "out"
    (c_in, o_in, d_in), (c_out, o_out, d_out) = (
        ((cA, oA, dA), (cB, oB, dB)) if cA.included[j] else ((cB, oB, dB), (cA, oA, dA)))
    pi, off = int(c_in.param_index[j]), int(c_in.offset[j])
    sign = float(c_in.signs[j])
    expected = C / (q * N) * sign
    assert len(o_in.released) == len(o_out.released) == T
    diffs_at, max_elsewhere = [], 0.0
    for t in range(T):
        for i, (g_in, g_out) in enumerate(zip(_in_clipper_order(o_in, d_in, o_in.released[t]),
                                              _in_clipper_order(o_out, d_out, o_out.released[t]))):
            d = (g_in.double() - g_out.double()).reshape(-1)
            if i == pi:
                diffs_at.append(d[off].item())
                d = d.clone()
                d[off] = 0.0
            max_elsewhere = max(max_elsewhere, d.abs().max().item())
    print(f"RESULT sensitivity j={j}: expected per-step diff {expected:.6g}, got {diffs_at}, "
          f"max|diff| elsewhere={max_elsewhere:.3g}, times_sampled in={c_in.times_sampled[j]} "
          f"out={c_out.times_sampled[j]}")
    assert np.allclose(diffs_at, expected, rtol=1e-5, atol=1e-7)
    assert max_elsewhere == 0.0
    assert int(c_in.times_sampled[j]) == T
    assert int(c_out.times_sampled[j]) == 0


def test_one_canary_sensitivity_parameters_after_sgd_lr1():
    """q = 1, one step of SGD(lr=1): parameters after the step differ by -C/(qN)*sign at the
    canary coordinate (theta' = theta - released), identical elsewhere."""
    q, C, sigma, m, N, j = 1.0, 0.7, 1.3, 6, 8, 2
    (mA, oA, cA, dA), (mB, oB, cB, dB) = _pair_runs(q=q, steps=1, C=C, sigma=sigma, lr=1.0,
                                                  m=m, j=j, N=N)
    (d_in, c_in), (d_out, _) = ((dA, cA), (dB, cB)) if cA.included[j] else ((dB, cB), (dA, cA))
    pi, off = int(c_in.param_index[j]), int(c_in.offset[j])
    expected = -C / (q * N) * float(c_in.signs[j])
    got, elsewhere = None, 0.0
    for i, (p_in, p_out) in enumerate(zip(d_in.clipper.parameters, d_out.clipper.parameters)):
        d = (p_in.detach().double() - p_out.detach().double()).reshape(-1)
        if i == pi:
            got = d[off].item()
            d = d.clone()
            d[off] = 0.0
        elsewhere = max(elsewhere, d.abs().max().item())
    print(f"RESULT params after lr=1 step: expected {expected:.6g}, got {got}, elsewhere {elsewhere:.3g}")
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert elsewhere == 0.0


def test_clipper_parameters_listed_module_by_module():
    """dp.clipper.parameters (the order canaries' param_index refers to) holds exactly the
    model's trainable parameters, module by module in model order, each module's by name."""
    model = small_model()
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), num_examples=10,
                      batch_size=5, steps=1, noise_multiplier=1.0, delta=DELTA, max_grad_norm=1.0,
                      seed=0)
    want = [getattr(mod, n) for mod in model.modules()
            for n, _ in sorted(mod.named_parameters(recurse=False))]
    got = dp.clipper.parameters
    assert len(got) == len(want) == len(list(model.parameters()))
    assert all(a is b for a, b in zip(got, want))


def test_times_sampled_poisson_rate():
    """q < 1: an included canary is Poisson-sampled at rate q each step, so times_sampled ~
    Binomial(T, q); an excluded one is never sampled."""
    q, T, N, m = 0.25, 4, 40, 2000
    torch.manual_seed(1)
    model = nn.Linear(100, 30)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 100, generator=g), torch.randint(0, 30, (N,), generator=g)
    can = DiracCanaries(m, seed=9)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, q=q, steps=T, sigma=1.0,
          C=1.0, seed=3, canaries=can)
    inc = np.asarray(can.included, dtype=bool)
    ts = np.asarray(can.times_sampled)
    mean, exp, se = ts[inc].mean(), q * T, math.sqrt(T * q * (1 - q) / inc.sum())
    print(f"RESULT times_sampled q={q} T={T}: mean over included={mean:.4f} (exp {exp}, z={(mean-exp)/se:.2f}), "
          f"max={ts[inc].max()}, excluded all zero={bool(np.all(ts[~inc] == 0))}")
    assert abs(mean - exp) < 6 * se
    assert ts[inc].max() <= T and np.all(ts[~inc] == 0)


# --------------------------------------------------------------------------- #
# 3. Noise statistics of the all-iterates score (q = 1, one step)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("sigma", [2.0, 0.8])
def test_all_iterates_score_distribution(sigma):
    m = 200_000 if sigma == 2.0 else 60_000
    # A linear model without bias fed zero inputs: the data gradient is exactly zero on every
    # coordinate, so the release at a canary coordinate is only canary + Gaussian noise.
    torch.manual_seed(0)
    model = nn.Linear(600, 500, bias=False)  # 300k coordinates >= m
    N = 4
    x = torch.zeros(N, 600)
    y = torch.randint(0, 500, (N,))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    can = DiracCanaries(m, seed=123)
    train(model, opt, x, y, q=1.0, steps=1, sigma=sigma, C=1.0, seed=5, canaries=can)
    inc = np.asarray(can.included, dtype=bool)
    s = np.asarray(can.all_iterates, dtype=np.float64)
    n_in, n_out = int(inc.sum()), int((~inc).sum())
    # fair coins
    assert abs(n_in / m - 0.5) < 6 * math.sqrt(0.25 / m)
    # times sampled: 1 for included (q = 1, T = 1), 0 for excluded
    assert np.all(can.times_sampled[inc] == 1) and np.all(can.times_sampled[~inc] == 0)
    sd = 1.0 / sigma
    results = {}
    for name, grp, mean_exp in (("in", s[inc], 0.5 / sigma**2), ("out", s[~inc], -0.5 / sigma**2)):
        n = grp.size
        mean, std = grp.mean(), grp.std(ddof=1)
        se_mean, se_std = sd / math.sqrt(n), sd / math.sqrt(2 * (n - 1))
        results[name] = (mean, mean_exp, (mean - mean_exp) / se_mean, std, sd, (std - sd) / se_std)
    print(f"RESULT all-iterates sigma={sigma} m={m}: " + "; ".join(
        f"{k}: mean={v[0]:.5f} (exp {v[1]:.5f}, z={v[2]:.2f}) std={v[3]:.5f} (exp {v[4]:.5f}, z={v[5]:.2f})"
        for k, v in results.items()))
    for k, (mean, mean_exp, zm, std, sd_exp, zs) in results.items():
        assert abs(zm) < 6, (k, mean, mean_exp)
        assert abs(zs) < 6, (k, std, sd_exp)
    # scores are Gaussian (no heavy tails / no clipping artefact): 4th standardized moment ~ 3
    for grp, mu0 in ((s[inc], 0.5 / sigma**2), (s[~inc], -0.5 / sigma**2)):
        z = (grp - mu0) / sd
        kurt = np.mean(z**4)
        assert abs(kurt - 3.0) < 6 * math.sqrt(96.0 / grp.size), kurt


# --------------------------------------------------------------------------- #
# 4. f-DP one-run lower bound: Monte Carlo validity, non-vacuity, monotonicity
# --------------------------------------------------------------------------- #
def _simulate_v(rng, mu, m, k):
    b = rng.random(m) < 0.5
    x = rng.standard_normal(m) + mu * b
    order = np.argsort(x)
    top, bottom = order[-k:], order[:k]
    return int(b[top].sum() + (~b[bottom]).sum())


def _mc(mu, m, k, trials, seed):
    rng = np.random.default_rng(seed)
    vs = np.array([_simulate_v(rng, mu, m, k) for _ in range(trials)])
    cache = {v: mu_one_run(m, 2 * k, int(v)) for v in np.unique(vs)}
    bounds = np.array([cache[v] for v in vs])
    return vs, bounds


@pytest.mark.parametrize("mu,m,k", [(1.0, 2000, 100), (2.0, 1000, 30), (0.5, 5000, 500)])
def test_mu_one_run_valid_and_nonvacuous(mu, m, k):
    trials = 200
    vs, bounds = _mc(mu, m, k, trials, seed=2024)
    frac_over = float(np.mean(bounds > mu))
    med = float(np.median(bounds))
    print(f"RESULT mu_one_run MC mu={mu} m={m} r={2*k} trials={trials}: mean v={vs.mean():.1f}, "
          f"frac(bound>mu)={frac_over:.3f}, median bound={med:.3f}, max bound={bounds.max():.3f}")
    assert frac_over <= 0.12
    assert med > 0.4 * mu


def test_mu_one_run_valid_under_null():
    """mu = 0 (no leakage): the 95% lower bound must be positive in at most ~5% of trials."""
    m, k, trials = 2000, 100, 200
    vs, bounds = _mc(0.0, m, k, trials, seed=7)
    frac_pos = float(np.mean(bounds > 1e-9))
    print(f"RESULT mu_one_run null: mean v={vs.mean():.1f}, frac(bound>0)={frac_pos:.3f}, "
          f"max bound={bounds.max():.3f}")
    assert frac_pos <= 0.12


def test_mu_one_run_monotone_and_zero_at_chance():
    m, r = 2000, 200
    vals = [mu_one_run(m, r, v) for v in range(r // 2, r + 1, 5)]
    print(f"RESULT mu_one_run m={m} r={r} v=100..200 step 5: {np.round(vals, 4).tolist()}")
    assert all(b >= a - 1e-9 for a, b in zip(vals, vals[1:]))
    assert vals[0] <= 1e-3  # v = r/2 is chance: no evidence
    assert vals[-1] > vals[0]
    for v in (50, 80):
        assert mu_one_run(m, r, v) <= 1e-3


def test_gdp_epsilon_matches_gdp_tradeoff():
    """gdp_epsilon(mu, delta) solves delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    for mu in (0.3, 1.0, 2.5):
        eps = gdp_epsilon(mu, DELTA)
        d = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        print(f"RESULT gdp_epsilon mu={mu}: eps={eps:.5f}, delta(eps)={d:.4g}")
        assert d == pytest.approx(DELTA, rel=1e-3)


CASES = [(1000, 100, 90), (2000, 200, 150), (2000, 200, 180), (10000, 1000, 700),
         (1000, 50, 50), (100000, 2000, 1500), (5000, 500, 400)]


def test_fdp_bound_not_looser_than_eps_delta_bound():
    rows, bad = [], []
    for m, r, v in CASES:
        mu = mu_one_run(m, r, v)
        e_f = gdp_epsilon(mu, DELTA) if mu > 0 else 0.0
        e_sj = epsilon_one_run(m, r, v, delta=DELTA)
        rows.append(f"(m={m},r={r},v={v}): mu={mu:.4f} eps_fdp={e_f:.4f} eps_SNJ={e_sj:.4f}")
        if e_f < e_sj - 1e-6:
            bad.append((m, r, v, e_f, e_sj))
    print("RESULT f-DP vs (eps,delta):\n  " + "\n  ".join(rows))
    assert not bad, f"f-DP bound looser than the (eps, delta) bound on {bad}"
