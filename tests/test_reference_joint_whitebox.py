"""Independent reference check of the white-box (Dirac gradient canary) audit on JOINT runs.

Written from the mathematics and the public interface only (``DiracCanaries`` and its
``observe`` score, ``run_white_box_audit``, ``TrainConfig``/``privacy.json``); no look at how the
trainers insert the canaries.

The mechanism. At step t the auditor reads, for canary j (in units of the sensitivity S and
multiplied by the canary's sign)

    y_jt = b_j * s_jt * a + sigma * Z_jt,      Z_jt iid N(0, 1),

where b_j is the coin, s_jt whether the canary was Poisson-sampled at t, and a the clipped canary
magnitude: the canary gradient is ``spike * S`` with spike > 1, so correct clipping cuts it to
S, i.e. a = 1 (automatic clipping AUTO-S gives spike / (spike + gamma), within 1e-3 of 1). The
score of ``observe`` adds, per step, the log likelihood ratio of the Poisson-subsampled Gaussian

    f(y) = log(1 - q + q * exp((y - 1/2) / sigma^2)).

Hence, exactly:

* excluded canary: score = sum_t f(sigma Z_t), T iid terms (the null), mean T*mu0, var T*v0
  with mu0 = E f(sigma Z), v0 = Var f(sigma Z);
* included canary sampled k times: k terms f(1 + sigma Z) and T - k terms f(sigma Z), mean
  k*mu1 + (T - k)*mu0, var k*v1 + (T - k)*v0.

Checks (``check_canaries``):

A. per step (the increments of ``all_iterates`` recorded around every ``observe`` call, and the
   increments of ``times_sampled``): f is strictly increasing, so each increment gives y back
   exactly; z = (y - shift)/sigma must be N(0, 1) (mean, variance, KS) for the un-shifted steps,
   and the shifted steps must have mean shift a = 1 and the same noise; included canaries must be
   sampled at rate q, excluded ones never;
B. final scores only (``all_iterates``, ``times_sampled``, ``included``): excluded mean/variance
   against T*mu0 / T*v0 and a two-sample KS against a Monte-Carlo draw of the exact null;
   included canaries standardised by their own k, mean 0 / variance 1, and KS against a
   Monte-Carlo draw with the same k's.

Tolerances: 5 standard errors for means/variances, p > 1e-3 for the KS tests (all seeds fixed).
``test_check_fails_on_planted_bugs`` feeds the same check with simulated canaries from broken
engines (noise sigma/2 or sigma/sqrt 2, canary magnitude 0, 2 or 10 (unclipped)) and requires it
to fail, and with a correct simulated engine and requires it to pass.

Every test prints ``RESULT`` lines (run with ``-s``).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from dptrain.gradient_canaries import DiracCanaries

M = 20_000
CANARY_SEED = 7
DP_SEED = 3
EPSILON = 2.0
N_SE = 5.0  # tolerance on means / variances, in standard errors
KS_P = 1e-3  # KS tests must not reject at this level
MIN_GROUP = 500  # per-parameter-tensor noise checks only for tensors holding this many canaries


# --------------------------------------------------------------------------- the maths
def f_score(y: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """The per-step log likelihood ratio of the Poisson-subsampled Gaussian (observe's score)."""
    y = np.asarray(y, dtype=np.float64)
    if q >= 1.0:
        return (y - 0.5) / sigma**2
    return np.logaddexp(math.log1p(-q), math.log(q) + (y - 0.5) / sigma**2)


def f_inverse(s: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """y from a per-step score increment (f is strictly increasing; -inf when s <= log(1-q))."""
    s = np.asarray(s, dtype=np.float64)
    if q >= 1.0:
        return s * sigma**2 + 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log(np.expm1(s - math.log1p(-q)) * (1.0 - q) / q)  # (y - 1/2) / sigma^2
    return sigma**2 * x + 0.5


def step_moments(shift: float, sigma: float, q: float) -> tuple[float, float]:
    """Mean and variance of f(shift + sigma Z), Z ~ N(0, 1), by quadrature."""
    def moment(p):
        g = lambda z: f_score(shift + sigma * z, sigma, q) ** p * stats.norm.pdf(z)  # noqa: E731
        return integrate.quad(g, -14, 14, limit=400, epsabs=1e-13, epsrel=1e-11)[0]

    m1, m2 = moment(1), moment(2)
    return m1, m2 - m1**2


def simulate_scores(k: np.ndarray, steps: int, sigma: float, q: float, rng, *,
                    true_sigma: float | None = None, magnitude: float = 1.0) -> np.ndarray:
    """Final scores of canaries each shifted in k[i] of ``steps`` steps (score at claimed sigma,
    noise at ``true_sigma``, shift ``magnitude``)."""
    true_sigma = sigma if true_sigma is None else true_sigma
    y = true_sigma * rng.standard_normal((k.size, steps))
    y += magnitude * (np.arange(steps)[None, :] < k[:, None])
    return f_score(y, sigma, q).sum(axis=1)


def var_se(x: np.ndarray) -> float:
    """Standard error of the sample variance (from the sample's fourth central moment)."""
    c = x - x.mean()
    return math.sqrt(max(np.mean(c**4) - np.mean(c**2) ** 2, 0.0) / x.size)


def check_canaries(inc: np.ndarray, sampled: np.ndarray, included: np.ndarray, *, sigma: float,
                   q: float, steps: int, groups: np.ndarray | None = None, label: str = "",
                   seed: int = 0, per_step: bool = True, final: bool = True
                   ) -> tuple[dict, list[str]]:
    """The reference check. ``inc``: (steps, m) per-step score increments; ``sampled``:
    (steps, m) 0/1, canary j added at step t. Returns (measured numbers, failures)."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    fails: list[str] = []
    out: dict = {}
    inc = np.asarray(inc, dtype=np.float64)
    sampled = np.asarray(sampled) > 0
    included = np.asarray(included, dtype=bool)
    T, m = inc.shape
    if T != steps:
        fails.append(f"{T} observed steps, privacy.json says {steps}")
    n_inc, n_exc = int(included.sum()), int((~included).sum())

    # ---- sampling of the canaries: included at rate q, excluded never
    if sampled[:, ~included].any():
        fails.append("an excluded canary was added to a step")
    n_added = int(sampled[:, included].sum())
    exp_added, sd_added = n_inc * T * q, math.sqrt(n_inc * T * q * (1 - q))
    out["sampled_rate"] = n_added / max(n_inc * T, 1)
    if abs(n_added - exp_added) > N_SE * sd_added:
        fails.append(f"canaries sampled {n_added} times, expected {exp_added:.0f} +- {sd_added:.0f}")

    # ---- A: per step, the released coordinate itself
    if per_step:
        y = f_inverse(inc, sigma, q)
        shifted = sampled & included[None, :]
        if not np.isfinite(y).all():
            fails.append(f"{int((~np.isfinite(y)).sum())} per-step increments outside f's range")
            y = np.where(np.isfinite(y), y, 0.0)
        z0 = y[~shifted] / sigma
        n0 = z0.size
        out["n_null"], out["n_shifted"] = n0, int(shifted.sum())
        out["null_z_mean"], out["null_z_var"] = float(z0.mean()), float(z0.var())
        out["null_ks_p"] = float(stats.kstest(z0, "norm").pvalue)
        if abs(z0.mean()) > N_SE / math.sqrt(n0):
            fails.append(f"un-shifted steps: noise mean {z0.mean():.4g} sigma, not 0")
        if abs(z0.var() - 1) > N_SE * math.sqrt(2 / n0):
            fails.append(f"un-shifted steps: noise variance {z0.var():.4g} sigma^2, not 1")
        if out["null_ks_p"] < KS_P:
            fails.append(f"un-shifted steps: not N(0, sigma^2) (KS p = {out['null_ks_p']:.3g})")
        y1 = y[shifted]
        n1 = y1.size
        if n1 >= 2:
            out["shift"], out["shifted_z_var"] = float(y1.mean()), float((y1 / sigma).var())
            out["shifted_ks_p"] = float(stats.kstest((y1 - 1.0) / sigma, "norm").pvalue)
            if abs(y1.mean() - 1.0) > N_SE * sigma / math.sqrt(n1):
                fails.append(f"canary shift {y1.mean():.4g} S, not 1 S "
                             f"(+- {sigma / math.sqrt(n1):.2g})")
            if abs(out["shifted_z_var"] - 1) > N_SE * math.sqrt(2 / n1):
                fails.append(f"shifted steps: noise variance {out['shifted_z_var']:.4g} sigma^2, not 1")
            if out["shifted_ks_p"] < KS_P:
                fails.append(f"shifted steps: not N(1, sigma^2) (KS p = {out['shifted_ks_p']:.3g})")
        if groups is not None:  # the noise per parameter tensor (e.g. word vs position embeddings)
            out["groups"] = {}
            for g in np.unique(groups):
                cols = (groups == g)[None, :] & ~shifted
                zg = y[cols] / sigma
                if zg.size < MIN_GROUP:
                    continue
                out["groups"][int(g)] = (zg.size, float(zg.mean()), float(zg.var()))
                if abs(zg.mean()) > N_SE / math.sqrt(zg.size) or \
                        abs(zg.var() - 1) > N_SE * math.sqrt(2 / zg.size):
                    fails.append(f"parameter tensor {g}: noise mean {zg.mean():.4g}, variance "
                                 f"{zg.var():.4g} (sigma units) on {zg.size} un-shifted steps")

    # ---- B: final scores only
    if final:
        score = inc.sum(axis=0)
        k = sampled.sum(axis=0).astype(np.int64)
        mu0, v0 = step_moments(0.0, sigma, q)
        mu1, v1 = step_moments(1.0, sigma, q)
        out["step_moments"] = (mu0, v0, mu1, v1)
        e = score[~included]
        pred_mean, pred_var = T * mu0, T * v0
        out["exc_mean"], out["exc_var"] = float(e.mean()), float(e.var())
        out["exc_pred"] = (pred_mean, pred_var)
        if abs(e.mean() - pred_mean) > N_SE * math.sqrt(pred_var / n_exc):
            fails.append(f"excluded score mean {e.mean():.5g}, predicted {pred_mean:.5g} "
                         f"+- {math.sqrt(pred_var / n_exc):.2g}")
        if abs(e.var() - pred_var) > N_SE * var_se(e):
            fails.append(f"excluded score variance {e.var():.5g}, predicted {pred_var:.5g} "
                         f"+- {var_se(e):.2g}")
        null = simulate_scores(np.zeros(100_000, dtype=np.int64), T, sigma, q, rng)
        out["exc_ks_p"] = float(stats.ks_2samp(e, null).pvalue)
        if out["exc_ks_p"] < KS_P:
            fails.append(f"excluded scores do not follow the null (KS p = {out['exc_ks_p']:.3g})")

        s, ki = score[included], k[included]
        mean_k = ki * mu1 + (T - ki) * mu0
        var_k = ki * v1 + (T - ki) * v0
        zi = (s - mean_k) / np.sqrt(var_k)
        out["inc_mean"], out["inc_pred_mean"] = float(s.mean()), float(mean_k.mean())
        out["inc_var"] = float(s.var())
        out["inc_pred_var"] = float(var_k.mean() + mean_k.var())  # law of total variance
        out["inc_z_mean"], out["inc_z_var"] = float(zi.mean()), float(zi.var())
        if abs(zi.mean()) > N_SE / math.sqrt(n_inc):
            fails.append(f"included scores: standardised mean {zi.mean():.4g}, not 0 "
                         f"(raw {s.mean():.5g} vs predicted {mean_k.mean():.5g})")
        if abs(zi.var() - 1) > N_SE * var_se(zi):
            fails.append(f"included scores: standardised variance {zi.var():.4g}, not 1")
        reps = 10
        alt = simulate_scores(np.repeat(ki, reps), T, sigma, q, rng)
        out["inc_ks_p"] = float(stats.ks_2samp(s, alt).pvalue)
        if out["inc_ks_p"] < KS_P:
            fails.append(f"included scores do not follow the predicted law (KS p = {out['inc_ks_p']:.3g})")

    _print(label, out, fails)
    return out, fails


def _print(label: str, out: dict, fails: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.5g}"
        if isinstance(v, tuple):
            return "(" + ", ".join(fmt(x) for x in v) + ")"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{a}: {fmt(b)}" for a, b in v.items()) + "}"
        return str(v)

    print(f"RESULT {label}: " + "; ".join(f"{k}={fmt(v)}" for k, v in out.items()))
    print(f"RESULT {label}: {'PASS' if not fails else 'FAIL: ' + ' | '.join(fails)}")


def simulate_engine(sigma: float, q: float, steps: int, m: int, seed: int, *,
                    true_sigma: float | None = None, magnitude: float = 1.0):
    """Per-step increments and sampling of m canaries through a (possibly broken) engine."""
    rng = np.random.default_rng(seed)
    true_sigma = sigma if true_sigma is None else true_sigma
    included = rng.random(m) < 0.5
    sampled = (rng.random((steps, m)) < q) & included[None, :]
    y = magnitude * sampled + true_sigma * rng.standard_normal((steps, m))
    return f_score(y, sigma, q), sampled, included


# --------------------------------------------------------------------------- the real runs
def _audit(task: str, out_dir):
    """One white-box audit of a private tiny run; records every observe call's increments."""
    from attacks.whitebox_audit import WhiteBoxOptions, run_white_box_audit
    from dptrain.trainer import TrainConfig

    log: dict = {"inc": [], "sampled": [], "objects": []}
    original = DiracCanaries.observe

    def observe(self, released):
        before = self.all_iterates.copy()
        prev = log.get("prev_ts")
        if prev is None or prev.shape != self.times_sampled.shape:
            prev = np.zeros_like(self.times_sampled)
        original(self, released)
        log["inc"].append(self.all_iterates - before)
        log["sampled"].append(self.times_sampled - prev)
        log["prev_ts"] = self.times_sampled.copy()
        if not any(o is self for o in log["objects"]):
            log["objects"].append(self)

    cfg = TrainConfig(model="tiny", data="synthetic", task=task, synthetic_per_intent=10,
                      epochs=2, batch_size=16, epsilon=EPSILON, dp_seed=DP_SEED,
                      physical_batch_size=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    DiracCanaries.observe = observe
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = run_white_box_audit(cfg, out_dir, WhiteBoxOptions(canaries=M,
                                         canary_seed=CANARY_SEED), progress=False)
    finally:
        DiracCanaries.observe = original
        torch.set_num_threads(threads)
    privacy = json.loads((out_dir / "run" / "privacy.json").read_text())
    with np.load(out_dir / "canaries.npz", allow_pickle=False) as z:
        secrets = {k: z[k] for k in z.files}
    return {"report": report, "privacy": privacy, "secrets": secrets, "objects": log["objects"],
            "inc": np.array(log["inc"]), "sampled": np.array(log["sampled"])}


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref_joint_whitebox")
    return {task: _audit(task, base / task) for task in ("joint", "intent")}


@pytest.mark.parametrize("task", ["joint", "intent"])
def test_canary_scores_follow_the_gaussian_mechanism(audits, task):
    a = audits[task]
    p, sec = a["privacy"], a["secrets"]
    sigma, q, T = float(p["noise_multiplier"]), float(p["sample_rate"]), int(p["steps"])
    print(f"RESULT {task}: privacy sigma={sigma:.6g} q={q:.6g} steps={T} "
          f"sensitivity={p.get('sensitivity')} unit={p.get('unit')!r} epsilon={p['epsilon']:.4g}")
    assert p["private"] and sigma > 0 and 0 < q < 1 and T > 0
    assert len(a["objects"]) == 1, "observe must be called on the audit's one canary set"
    inc, sampled = a["inc"], a["sampled"]
    assert inc.shape == (T, M), f"observe called {inc.shape[0]} times for {T} steps"
    # the recorded steps add up to what the audit reports
    np.testing.assert_allclose(inc.sum(axis=0), sec["all_iterates"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(sampled.sum(axis=0), sec["times_sampled"])
    c = a["objects"][0]
    np.testing.assert_array_equal(sec["included"], c.included)
    groups = c.param_index.numpy()
    print(f"RESULT {task}: canaries per parameter tensor: {c.coordinates()}")
    _, fails = check_canaries(inc, sampled, sec["included"], sigma=sigma, q=q, steps=T,
                              groups=groups, label=f"{task} real run", seed=1)
    assert not fails, fails


@pytest.mark.parametrize("task", ["joint", "intent"])
def test_last_iterate_movement_is_symmetric_when_excluded(audits, task):
    """Signs are independent of everything else: an excluded canary's signed movement is
    symmetric about 0; an included one moves its way."""
    sec = audits[task]["secrets"]
    x, inc = sec["last_iterate"], sec["included"]
    e, i = x[~inc], x[inc]
    se_e = e.std() / math.sqrt(e.size)
    diff_se = math.sqrt(e.var() / e.size + i.var() / i.size)
    p_sym = float(stats.ks_2samp(e[e > 0], -e[e < 0]).pvalue)
    print(f"RESULT {task} last iterate: excluded mean {e.mean():.4g} (se {se_e:.2g}), included "
          f"mean {i.mean():.4g}, difference/se {(i.mean() - e.mean()) / diff_se:.3g}, "
          f"symmetry KS p {p_sym:.3g}")
    assert np.isfinite(x).all()
    assert abs(e.mean()) <= N_SE * se_e
    assert p_sym > KS_P
    assert i.mean() - e.mean() > N_SE * diff_se


def test_joint_and_intent_agree(audits):
    """Same canary seed, same claimed mechanism: the two trainers' canaries must measure the same
    noise (their numbers differ only by the noise draw)."""
    res = {}
    for task in ("joint", "intent"):
        a = audits[task]
        p = a["privacy"]
        assert p["unit"] != "" and p["sensitivity"] == audits["intent"]["privacy"]["sensitivity"]
        out, fails = check_canaries(a["inc"], a["sampled"], a["secrets"]["included"],
                                    sigma=float(p["noise_multiplier"]), q=float(p["sample_rate"]),
                                    steps=int(p["steps"]), label=f"{task} (per-step only)",
                                    final=False)
        res[task] = out
    j, i = res["joint"], res["intent"]
    sigma = float(audits["joint"]["privacy"]["noise_multiplier"])
    # two estimates of the same noise variance and canary shift (independent or, with the same
    # seeds, positively correlated: the independent-case standard error is conservative)
    se_var = math.sqrt(2 / j["n_null"] + 2 / i["n_null"])
    se_shift = sigma * math.sqrt(1 / j["n_shifted"] + 1 / i["n_shifted"])
    print(f"RESULT joint vs intent: noise variance {j['null_z_var']:.5g} vs {i['null_z_var']:.5g} "
          f"(se {se_var:.2g}); shift {j['shift']:.5g} vs {i['shift']:.5g} (se {se_shift:.2g})")
    assert abs(j["null_z_var"] - i["null_z_var"]) <= N_SE * se_var
    assert abs(j["shift"] - i["shift"]) <= N_SE * se_shift


@pytest.mark.parametrize("task", ["joint", "intent"])
def test_audit_bound_stays_below_the_claim(audits, task):
    r = audits[task]["report"]
    print(f"RESULT {task} audit: epsilon_lb={r['epsilon_lb']:.4g} claimed={r['claimed_epsilon']:.4g} "
          f"verdict={r['verdict']} f_dp={r['views']['all_iterates']['f_dp']['epsilon_lb']:.4g} "
          f"last_iterate f_dp={r['views']['last_iterate']['f_dp']['epsilon_lb']:.4g}")
    assert r["claimed_epsilon"] == pytest.approx(audits[task]["privacy"]["epsilon"])
    assert r["epsilon_lb"] <= r["claimed_epsilon"]
    assert r["verdict"] == "consistent"
    assert r["epsilon_lb"] > 0  # not vacuous: 20 000 canaries see something


# --------------------------------------------------------------------------- the check can fail
SIM = dict(sigma=1.201171875, q=1 / 15, steps=30)  # the runs' own claimed mechanism


@pytest.mark.parametrize("bug,kwargs", [
    ("none", {}),
    ("half_sigma", {"true_sigma": SIM["sigma"] / 2}),
    ("sigma_over_sqrt2", {"true_sigma": SIM["sigma"] / math.sqrt(2)}),
    ("sigma_10pct_small", {"true_sigma": SIM["sigma"] * 0.9}),
    ("canary_missing", {"magnitude": 0.0}),
    ("canary_doubled", {"magnitude": 2.0}),
    ("canary_unclipped", {"magnitude": 10.0}),
    ("canary_half", {"magnitude": 0.5}),
])
def test_check_fails_on_planted_bugs(bug, kwargs):
    inc, sampled, included = simulate_engine(SIM["sigma"], SIM["q"], SIM["steps"], M, seed=11,
                                             **kwargs)
    _, fails = check_canaries(inc, sampled, included, **SIM, label=f"simulated {bug}", seed=2)
    # the final-score statistic alone (what the audit keeps) must also see every one of them
    _, fails_final = check_canaries(inc, sampled, included, **SIM, per_step=False,
                                    label=f"simulated {bug} (final scores only)", seed=2)
    if bug == "none":
        assert not fails and not fails_final, (fails, fails_final)
    else:
        assert fails and fails_final, bug
