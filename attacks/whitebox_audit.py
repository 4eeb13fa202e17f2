"""``dptrain audit --white-box``: gradient canaries in the user's real run, and the ε it spends at least.

The natural-canary audit (:mod:`attacks.audit_run`) asks what an attacker holding the final
model learns about sentences; it is the right test of real leakage, and far too weak to test the
*guarantee* (a non-private run certified only ε ≥ 0.56 there). This audit tests the guarantee:

1. m Dirac gradient canaries (:mod:`dptrain.gradient_canaries`), each included by a secret fair
   coin and then Poisson-sampled like every example, enter every step of the training run through
   the engine's own clipping, summing and noise;
2. the auditor, who knows everything but the coins and the noise (as DP's adversary may), scores
   each canary from **all iterates** (the log likelihood ratio of its coordinate over every
   released update) and from the **last iterate** (how far its coordinate moved in the final
   weights);
3. guesses on the highest and lowest scores become two one-run lower bounds
   (:func:`attacks.audit.one_run_audit`): Steinke, Nasr, Jagielski 2023's (ε, δ) bound, which
   assumes nothing about the mechanism, and Mahloujifar, Melis, Chaudhuri 2024's f-DP bound, which
   assumes a Gaussian trade-off curve (as DP-SGD nearly has) and is much tighter.

Guess counts: k "in" calls on the top scores and, in a private run, as many "out" calls on the
bottom. A private run plans k before looking at the scores, by simulating its claimed mechanism
(:func:`plan_guesses`: three choices); a non-private run searches k in GUESS_FRACTIONS·m. Either
search is paid for by Bonferroni. The (ε, δ) bound's δ term grows as 2·m·δ,
so it is computed on a random subset of m' = min(m, 1/(20δ)) canaries (the others are then part of
the mechanism; the theorem holds given them); the f-DP bound uses all m.

A bound above the claimed ε proves that the run is less private than its accountant says (at the
stated confidence): an engine or accounting bug. A bound below it proves nothing more than that
this audit did not find one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from attacks.audit_run import PLAN, REPORT, RUN, SCORES_PNG  # the same layout as the natural audit
from dptrain.errors import ConfigError, DPTrainError
from dptrain.outputs import OutputDir

COMMAND = "dptrain audit --white-box"
DEFAULT_CANARIES = 100_000
GUESS_FRACTIONS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
SECRETS = "canaries.npz"


def stopped_white_box(out: Path) -> bool:
    """Whether ``out`` holds a white-box audit this command began and that stopped before its
    report (killed while training or scoring)."""
    outputs = OutputDir(out, COMMAND)
    return Path(out).is_dir() and outputs.owns(PLAN) and not outputs.owns(REPORT)


def _clear(outputs: OutputDir) -> None:
    """Remove what a stopped white-box audit wrote (and only that), so it can start over."""
    import shutil

    if outputs.owns_dir(RUN):
        shutil.rmtree(outputs.path / RUN, ignore_errors=True)
        outputs.unclaim_dir(RUN)
    for name in (PLAN, SECRETS, SCORES_PNG):
        outputs.remove(name)
VIEWS = ("all_iterates", "last_iterate")


@dataclasses.dataclass(frozen=True)
class WhiteBoxOptions:
    """How the white-box audit runs.

    Attributes:
      canaries: m gradient canaries (default 100 000, capped at the trained parameter count).
      confidence: probability that each reported bound holds, in (0.5, 1).
      canary_seed: seed of coins, signs and canary sampling; None: OS entropy.
    """

    canaries: int | None = None
    confidence: float = 0.95
    canary_seed: int | None = None

    def __post_init__(self) -> None:
        m = self.canaries
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2):
            raise ConfigError(f"canaries must be an integer >= 2, got {m!r}.")
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.5 < c < 1:
            raise ConfigError(f"confidence must be in (0.5, 1), got {c!r}.")
        if self.canary_seed is not None and (isinstance(self.canary_seed, bool)
                                             or not isinstance(self.canary_seed, (int, np.integer))):
            raise ConfigError(f"canary_seed must be an integer or None, got {self.canary_seed!r}.")


def guess_counts(m: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[int]:
    """k for each fraction of m (at least 1, at most m/2), distinct."""
    return sorted({min(m // 2, max(1, int(f * m))) for f in fractions} - {0})


def guess_pairs(m: int, private: bool = True,
                fractions: Sequence[float] = GUESS_FRACTIONS) -> tuple[list[int], list[int]]:
    """(k_in, k_out) pairs, chosen from public facts only (so they cost no extra correction): a
    private run calls k "in" on the top scores and as many "out" on the bottom; a non-private
    run calls only "in" (without noise the scores separate exactly, except for included canaries
    that were never sampled, which look excluded and would spoil "out" calls)."""
    ks = guess_counts(m, fractions)
    return ks, (ks if private else [0] * len(ks))


def plan_guesses(m: int, *, noise_multiplier: float, sample_rate: float, steps: int,
                 simulate: int = 100_000, budget: int = 60_000_000, replicates: int = 3,
                 seed: int = 0) -> tuple[float, ...]:
    """Guess fractions chosen before looking at the scores, from the claimed mechanism alone.

    Canaries of a correct run at the claimed (σ, q, steps) are simulated (coins, Poisson
    sampling, Gaussian noise, the same log-likelihood-ratio score; all m of them when m·steps·3
    ≤ ``budget`` draws, else at least ``simulate``); the fraction of GUESS_FRACTIONS whose paired
    guesses give the largest μ-GDP bound there, averaged over ``replicates`` simulations, with
    its halving and doubling, is the plan: three choices instead of twelve, so Bonferroni costs less, aimed where an engine
    slightly less private than claimed shows first. Uses public facts only (the claim), never
    the audited scores. A non-private run (σ = 0) keeps the whole grid.
    """
    from attacks.audit import _gdp_mu_lb

    if noise_multiplier <= 0:
        return GUESS_FRACTIONS
    rng = np.random.default_rng([seed, 0x91a])
    # The best k is nearly a count, not a fraction: simulate all m canaries when affordable.
    n = min(m, max(simulate, budget // max(int(steps), 1) // replicates))
    ks = guess_counts(n)
    mus = np.zeros(len(ks))
    sigma, q = float(noise_multiplier), float(sample_rate)
    for _ in range(replicates):  # average: the argmax of one simulation chases its noise
        b = rng.random(n) < 0.5
        score = np.zeros(n)
        for _ in range(int(steps)):
            y = rng.standard_normal(n) * sigma
            y += b & (rng.random(n) < q) if q < 1 else b
            score += ((y - 0.5) / sigma**2 if q >= 1 else
                      np.logaddexp(math.log1p(-q), math.log(q) + (y - 0.5) / sigma**2))
        ranked = b[np.argsort(-score, kind="stable")]
        v = np.array([ranked[:k].sum() + (~ranked[n - k:]).sum() for k in ks])
        mus += _gdp_mu_lb(n, 2 * np.array(ks), v, 0.05) / replicates
    best = GUESS_FRACTIONS[min(int(np.argmax(mus)), len(GUESS_FRACTIONS) - 1)]
    return tuple(sorted({best / 2, best, min(2 * best, 0.5)}))


def bound_scores(scores: np.ndarray, included: np.ndarray, *, delta: float,
                 confidence: float = 0.95, seed: int = 0, private: bool = True,
                 fractions: Sequence[float] = GUESS_FRACTIONS) -> dict[str, Any]:
    """Both one-run bounds on the same guesses (see the module docstring)."""
    from attacks.audit import one_run_audit

    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = scores.size
    kp, kn = guess_pairs(m, private, fractions)
    fdp = one_run_audit(scores, included, k_positive=kp, k_negative=kn, delta=delta,
                        confidence=confidence, bound="f-dp", paired=True, seed=seed)
    m_sub = max(2, min(m, int(1.0 / (20.0 * delta))))
    subset = np.sort(np.random.default_rng([seed, 0x5eb]).permutation(m)[:m_sub])
    kp, kn = guess_pairs(m_sub, private, fractions)
    epsd = one_run_audit(scores[subset], included[subset], k_positive=kp, k_negative=kn,
                         delta=delta, confidence=confidence, paired=True, seed=seed)
    return {"f_dp": fdp.to_dict(), "eps_delta": {**epsd.to_dict(), "subset_of": m}}


SIGMA_RANGE = (0.3, 64.0)  # noise multipliers the mechanism-curve search covers


def mechanism_bound(scores: np.ndarray, included: np.ndarray, *, sample_rate: float, steps: int,
                    delta: float, confidence: float = 0.95, seed: int = 0,
                    private: bool = True,
                    fractions: Sequence[float] = GUESS_FRACTIONS) -> dict[str, Any]:
    """One-run bound against the run's own mechanism family (Mahloujifar et al. 2024's
    "hypothesized f-DP curve"): DP-SGD with the run's q and steps, at noise multiplier σ, has the
    trade-off curve of its PRV privacy profile. The audit rejects σ when the guesses are too
    good for that curve; σ_lb is the least noise it cannot rule out... precisely, every σ ≥ σ_lb
    is rejected, and ε_lb is the accountant's ε of (σ_lb, q, steps) at δ. Bonferroni over the
    same guess pairs as :func:`bound_scores`.
    """
    from attacks.audit import curve_one_run_rejects, inverse_power_table, one_run_guesses
    from dptrain.accounting import epsilon_after, privacy_profile

    kp, kn = guess_pairs(scores.size, private, fractions)
    r, v = one_run_guesses(scores, included, kp, kn, seed=seed)
    significance = (1.0 - confidence) / len(kp)

    def rejected(sigma: float) -> bool:
        table = inverse_power_table(*privacy_profile(sigma, sample_rate, steps))
        return bool(curve_one_run_rejects(scores.size, r, v, table, significance).any())

    lo, hi = SIGMA_RANGE
    if not rejected(hi):  # even a very private mechanism could have guessed this well
        return {"epsilon_lb": 0.0, "sigma_lb": None, "guesses": None}
    if rejected(lo):
        sigma = lo  # bounded by the search range: ε_lb is at least this
    else:
        for _ in range(14):  # geometric bisection: σ to ~0.1%
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if rejected(mid) else (mid, hi)
        sigma = hi  # rejected: the safe side
    eps = epsilon_after(sigma, sample_rate, steps, delta)
    best = int(np.argmax(v / np.maximum(r, 1)))
    return {"epsilon_lb": eps, "sigma_lb": sigma, "sample_rate": sample_rate, "steps": steps,
            "n_choices": len(kp), "correction": "bonferroni", "confidence": confidence,
            "delta": delta, "r": int(r[best]), "v": int(v[best])}


def run_white_box_audit(config, out_dir: str | Path, options: WhiteBoxOptions | None = None, *,
                        progress: bool = True) -> dict[str, Any]:
    """Train ``config`` (a TrainConfig) once with m gradient canaries; write and return the report.

    Files in ``out_dir``: ``audit.json`` (recipe and options, written first), ``run/`` (the
    trained run: the model a user could ship, with no canary in it that changes its function on
    text), ``canaries.npz`` (coins, signs, coordinates and scores: audit secrets), ``report.json``
    (last) and ``canary_scores.png``. Bad input raises before anything is written.
    """
    from attacks.audit_run import check_new_audit_dir, take_back_if_refused
    from dptrain.gradient_canaries import DiracCanaries
    from dptrain.trainer import train_run

    from dptrain.encoders import resolve_model

    # the encoder --model auto stands for, recorded resolved
    config = dataclasses.replace(config, model=resolve_model(config.model, config.task))
    options = options or WhiteBoxOptions()
    outputs = OutputDir(out_dir, COMMAND)
    if stopped_white_box(outputs.path):  # it cannot be resumed: this audit starts it over
        _clear(outputs)
    check_new_audit_dir(outputs, resumable=False)
    m = options.canaries if options.canaries is not None else DEFAULT_CANARIES
    canaries = DiracCanaries(m, seed=options.canary_seed,  # checks m
                             at_most_parameters=options.canaries is None)
    outputs.write_json(PLAN, {
        "description": "a white-box one-run audit: gradient canaries inserted into the training "
                       "run below (cannot be resumed: the canaries' running scores are in memory)",
        "config": config.to_dict(), "options": dataclasses.asdict(options),
    })
    started = time.monotonic()
    try:
        outputs.claim_dir(RUN)
        summary = train_run(config, outputs.path / RUN, gradient_canaries=canaries, progress=progress,
                            extra_info={"white_box_audit": {"canaries": m}})
    except DPTrainError:
        take_back_if_refused(outputs, (PLAN,))
        raise
    train_seconds = time.monotonic() - started
    scores = {"all_iterates": canaries.all_iterates.copy(), "last_iterate": canaries.last_iterate()}
    started = time.monotonic()
    report = build_report(summary.privacy, canaries, scores, options.confidence)
    report["seconds"] = {"training_with_canaries": train_seconds,
                         "bounds": time.monotonic() - started}
    report["summary"] = summary_lines(report, config.model, config.data)
    outputs.write_bytes(SCORES_PNG, scores_png(scores, canaries.included, report))
    import io

    buf = io.BytesIO()
    np.savez(buf, included=canaries.included, signs=canaries.signs,
             parameter_index=canaries.param_index.numpy(), offset=canaries.offset.numpy(),
             all_iterates=scores["all_iterates"], last_iterate=scores["last_iterate"],
             times_sampled=canaries.times_sampled)
    outputs.write_bytes(SECRETS, buf.getvalue())
    outputs.write_json(REPORT, report)  # last: marks a finished audit
    return report


def build_report(privacy: dict[str, Any], canaries, scores: dict[str, np.ndarray],
                 confidence: float) -> dict[str, Any]:
    """report.json from the run's privacy record and the canaries' scores."""
    private = bool(privacy.get("private"))
    claimed = float(privacy["epsilon"]) if private else math.inf
    n = int(privacy.get("dataset_size") or privacy.get("num_examples") or 1)  # (older runs)
    delta = float(privacy["delta"]) if private else min(1e-5, 1.0 / (10 * n))
    fractions = plan_guesses(canaries.m, noise_multiplier=float(privacy["noise_multiplier"] or 0.0),
                             sample_rate=float(privacy["sample_rate"]), steps=int(privacy["steps"]))
    views = {}
    for view in VIEWS:
        views[view] = bound_scores(scores[view], canaries.included, delta=delta,
                                   confidence=confidence, private=private, fractions=fractions)
    # The primary bound (its bisection computes a PRV profile per step): all iterates only; the
    # last iterate is post-processing of them, so its Gaussian-curve bound is shown beside it.
    views["all_iterates"]["mechanism"] = mechanism_bound(
        scores["all_iterates"], canaries.included, sample_rate=float(privacy["sample_rate"]),
        steps=int(privacy["steps"]), delta=delta, confidence=confidence, private=private,
        fractions=fractions)
    best = views["all_iterates"]["mechanism"]["epsilon_lb"]  # the primary bound decides
    verdict = "no claim" if not private else "refuted" if best > claimed else "consistent"
    sampled = canaries.times_sampled[canaries.included]
    return {
        "kind": "white-box one-run audit (gradient canaries)",
        "theoretical": privacy,
        "claimed_epsilon": claimed if private else None,
        "delta": delta,
        "verdict": verdict,
        "canaries": {
            "m": canaries.m, "included": int(canaries.included.sum()),
            "spike": f"{canaries.spike:g} x the sensitivity on one coordinate (clipping must cut it)",
            "coordinates": canaries.coordinates(),
            "chosen": "the m coordinates with the smallest |clipped real-data sum| at the first step",
            "times_sampled_included": {"mean": float(sampled.mean()) if sampled.size else 0.0,
                                       "never": int((sampled == 0).sum())},
        },
        "views": views,
        "guess_fractions": list(fractions),
        "epsilon_lb": best,
        "primary": "all iterates, against the run's own DP-SGD trade-off curve (PRV profile of "
                   "its q and steps); the other bounds are shown for comparison: each holds at the "
                   "stated confidence on its own, their maximum does not",
        "ratio_to_claim": best / claimed if private and claimed > 0 else None,
        "confidence": confidence,
    }


def summary_lines(report: dict[str, Any], model: str = "", data: str = "") -> list[str]:
    c, claimed = report["canaries"], report["claimed_epsilon"]
    conf = f"{100 * report['confidence']:g}%"
    lines = [f"White-box audit of {model} on {data}: {c['m']} gradient canaries, {c['included']} "
             f"included (each with probability 1/2), through the run's own clipping and noise."]
    for view, v in report["views"].items():
        f, e = v["f_dp"], v["eps_delta"]
        mech = v.get("mechanism")
        own = "" if mech is None else (
            f"ε ≥ {mech['epsilon_lb']:.3g} (the run's own DP-SGD curve"
            f"{'' if mech['sigma_lb'] is None else ', σ ≤ %.3g' % mech['sigma_lb']}), ")
        lines.append(
            f"{view.replace('_', ' ')}: {own}{'ε ≥ ' if not own else ''}{f['epsilon_lb']:.3g} "
            f"(Gaussian curve, μ ≥ {f['mu_lb']:.3g}; {f['v']}/{f['r']} guesses right), "
            f"{e['epsilon_lb']:.3g} ((ε, δ) bound on {e['m']} canaries); {conf}, "
            f"δ = {report['delta']:.3g}.")
    if claimed is None:
        lines.append("Claimed ε = ∞ (non-private run): the bounds measure how much an update "
                     "reveals; only the number of canaries limits them.")
    elif report["verdict"] == "refuted":
        lines.append(f"!!! ε_lb = {report['epsilon_lb']:.3g} > claimed ε = {claimed:.3g}: this run "
                     "is less private than its accountant says. Do not trust its guarantee. !!!")
    else:
        ratio = report["epsilon_lb"] / claimed if claimed > 0 else float("nan")
        lines.append(f"Claimed ε = {claimed:.3g}: consistent; the audit proves ε ≥ "
                     f"{report['epsilon_lb']:.3g} ({ratio:.0%} of the claim).")
    return lines


def scores_png(scores: dict[str, np.ndarray], included: np.ndarray, report: dict[str, Any]) -> bytes:
    """Histograms of the canaries' scores, included vs excluded, one panel per view."""
    from dptrain.figures import png_bytes, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, view in zip(axes, VIEWS):
        s = np.asarray(scores[view], dtype=np.float64)
        finite = s[np.isfinite(s)]
        bins = np.histogram_bin_edges(finite, bins=60) if finite.size else 10
        ax.hist(s[included], bins=bins, alpha=0.6, color="tab:red", label="included")
        ax.hist(s[~included], bins=bins, alpha=0.6, color="tab:blue", label="excluded")
        v = report["views"][view]
        best = v["mechanism"]["epsilon_lb"] if "mechanism" in v else v["f_dp"]["epsilon_lb"]
        ax.set(title=f"{view.replace('_', ' ')}: ε ≥ {best:.2f}", xlabel="score",
               ylabel="canaries", yscale="log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    claimed = report["claimed_epsilon"]
    fig.suptitle(f"White-box audit, {report['canaries']['m']} gradient canaries "
                 f"(claimed ε = {'∞' if claimed is None else f'{claimed:.3g}'})")
    return png_bytes(fig, dpi=110)
