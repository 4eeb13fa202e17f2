"""The membership-inference report: report.json for machines and reviewers, roc.png for eyes.

``report.json``::

    target       the run attacked: directory, model, data, recipe highlights, test accuracy
    theoretical  its privacy.json as written (ε spent, target ε, δ, σ, sampling rate, steps, ...)
    population   sizes, how population ids map to splits, who is a member, and which members and
                 non-members were evaluated (balanced by subsampling the larger group)
    shadows      K, the cache directory, how many were reused / resumed / trained, wall time
                 (null when only reference-free attacks ran)
    attacks      per attack: the metrics of attacks.metrics (AUC, balanced accuracy, advantage,
                 TPR at 0.1% / 1% / 10% FPR and the false positives behind each) plus
                 epsilon_lb {clopper_pearson, gdp}, confidence, correction and the full audit
                 results (threshold, counts)
    empirical_epsilon  the best bound over all attacks, Bonferroni-corrected over them
    verdict      the claim against those bounds (:func:`verdict`)
    summary      plain-English lines; the same lines `dptrain attack mia` prints
    seconds, files

``roc.png``: every attack's ROC curve on log-log axes (FPR from 1/n_nonmembers to 1), the chance
diagonal, and the boundary of what any (ε, δ)-DP mechanism allows (Kairouz et al. 2015):
TPR ≤ min(e^ε·FPR + δ, 1 − e^{−ε}(1 − δ − FPR)), with the excluded region shaded — a curve
entering it would contradict the claim. No region is drawn for ε = ∞.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from attacks.audit import ThresholdAuditResult
from attacks.metrics import AttackMetrics, fpr_key
from dptrain.outputs import OutputDir

COMMAND = "dptrain attack mia"
"""Who writes a membership-inference report (the manifest's ``by``)."""
REPORT = "report.json"
ROC_PNG = "roc.png"
SCORES = "scores.npz"
FILES = (SCORES, ROC_PNG, REPORT)
"""What a membership-inference report consists of, in the order it is written."""
HEADLINE_FPR = 0.01


@dataclasses.dataclass(frozen=True)
class AttackOutcome:
    """One attack's result: its metrics and its two empirical ε lower bounds."""

    name: str
    label: str
    description: str
    metrics: AttackMetrics
    clopper_pearson: ThresholdAuditResult
    gdp: ThresholdAuditResult

    def to_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "description": self.description, **self.metrics.to_dict()}
        out["epsilon_lb"] = {"clopper_pearson": self.clopper_pearson.epsilon_lb,
                             "gdp": self.gdp.epsilon_lb}
        out["confidence"] = self.clopper_pearson.confidence
        out["delta"] = self.clopper_pearson.delta
        out["correction"] = (f"{self.clopper_pearson.correction} over the "
                             f"{self.clopper_pearson.n_choices} distinct scores tried as "
                             "thresholds")
        out["audit"] = {"clopper_pearson": self.clopper_pearson.to_dict(),
                        "gdp": self.gdp.to_dict()}
        return out


def _number(value: Any) -> float:
    """privacy.json writes infinity as the string "inf"."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.2f}"


def verdict(claimed: float, clopper_pearson: float, gdp: float) -> str:
    """The claim against the measured bounds: 'no claim' (ε = ∞), 'refuted' (the
    assumption-free Clopper-Pearson bound exceeds it), 'refuted if gaussian' (only the GDP bound
    does) or 'consistent'.

    >>> verdict(1.0, 0.2, 1.5), verdict(math.inf, 3.0, 3.0)
    ('refuted if gaussian', 'no claim')
    """
    if not math.isfinite(claimed):
        return "no claim"
    if clopper_pearson > claimed:
        return "refuted"
    return "refuted if gaussian" if gdp > claimed else "consistent"


CHANCE_WARNING = ("WARNING: the attacked model is at chance level (it learned nothing; see "
                  "metrics.json chance_level), so no attack can find leakage in it: this "
                  "result says nothing about the recipe's privacy.")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few sentences a reviewer can read without the code, from a report's content."""
    theory = report["theoretical"]
    claimed = _number(theory.get("epsilon"))
    target, pop, attacks = report["target"], report["population"], report["attacks"]
    lines = []
    if math.isfinite(claimed):
        claim = f"claims ε = {claimed:.2f} at δ = {_number(theory.get('delta')):.1e}"
    elif str(theory.get("source", "")).startswith("none"):
        claim = "states no privacy claim"
    else:
        claim = "is not private (ε = ∞)"
    lines.append(f"Target {target['model']} on {target['data']} ({pop['n_members']} members, "
                 f"{pop['n_nonmembers']} non-members in the population) {claim}.")
    lines.append(f"Evaluated on {pop['evaluated']['how']}.")

    key = fpr_key(HEADLINE_FPR)
    best_name = max(attacks, key=lambda a: (attacks[a]["tpr_at_fpr"][key], attacks[a]["auc"]))
    best = attacks[best_name]
    fp, allowed = best["false_positives_at_fpr"][key], best["max_false_positives_at_fpr"][key]
    lines.append(
        f"The attack with the highest TPR at FPR {HEADLINE_FPR:.0%} ({best['label']}) reaches "
        f"TPR {best['tpr_at_fpr'][key]:.1%} at "
        f"FPR {HEADLINE_FPR:.0%} (backed by {fp} false positive{'s' if fp != 1 else ''} among "
        f"{best['n_nonmembers']} non-members; {allowed} allowed) and AUC {best['auc']:.3f}.")
    lines.append("AUC by attack: " + ", ".join(f"{a['label']} {a['auc']:.3f}"
                                               for a in attacks.values()) + ".")

    emp = report["empirical_epsilon"]
    cp, gdp = emp["clopper_pearson"], emp["gdp"]
    bound = (f"Empirical ε ≥ {cp:.2f} (Clopper-Pearson) and ≥ {gdp:.2f} (GDP) at "
             f"{emp['confidence']:.0%} confidence, best of {len(attacks)} "
             f"attack{'s' if len(attacks) > 1 else ''} with the confidence split over them")
    words = {
        "no claim": "; the run makes no privacy claim to test, so this measures leakage only.",
        "refuted": f", ABOVE the claimed ε = {claimed:.2f}: evidence that the claim is wrong "
                   "(or that the run broke an assumption of its accountant).",
        "refuted if gaussian": f": the GDP bound is above the claimed ε = {claimed:.2f}, the "
                               "assumption-free Clopper-Pearson bound is not — evidence against "
                               "the claim only if the mechanism is Gaussian-DP.",
        "consistent": f", below the claimed ε = {claimed:.2f}: no evidence against the claim.",
    }
    lines.append(bound + words[report["verdict"]])
    if target.get("learned") is False:
        lines.append(CHANCE_WARNING)
    lines.append("Caveat: these bounds count each evaluated example as an independent trial "
                 "against one trained model, so they are indicative; a formal audit includes "
                 "canaries at random (one run, Steinke et al. 2023).")
    return lines


def roc_png(outcomes: Sequence[AttackOutcome], epsilon: float, delta: float,
            title: str) -> bytes:
    """ROC curves on log-log axes with the chance line and the (ε, δ)-DP boundary, as PNG."""
    from dptrain.figures import png_bytes, pyplot

    plt = pyplot()

    n_neg = max(o.metrics.n_nonmembers for o in outcomes)
    n_pos = max(o.metrics.n_members for o in outcomes)
    lo_x, lo_y = 1.0 / n_neg, 1.0 / n_pos
    lo = min(lo_x, lo_y)
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    grid = np.logspace(math.log10(lo) - 0.5, 0, 400)
    if math.isfinite(epsilon):
        limit = np.minimum(math.exp(epsilon) * grid + delta,
                           1 - math.exp(-epsilon) * (1 - delta - grid))
        limit = np.clip(limit, 0, 1)
        ax.fill_between(grid, limit, 1, color="0.5", alpha=0.15, lw=0,
                        label="excluded by the (ε, δ) claim")
        ax.plot(grid, limit, color="black", lw=1.2,
                label=f"(ε, δ)-DP limit, ε = {epsilon:.2f}, δ = {delta:.0e}")
    ax.plot(grid, grid, ls="--", color="gray", lw=1, label="chance")
    key = HEADLINE_FPR
    for o in outcomes:
        m = o.metrics
        # Points at FPR 0 cannot sit on a log axis: the curve starts at one false positive.
        ax.plot(m.fpr, m.tpr, lw=1.6,
                label=f"{o.label}: AUC {m.auc:.3f}, TPR {m.tpr_at_fpr[key]:.1%} @ 1% FPR")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo_x, 1)
    ax.set_ylim(lo_y, 1.02)
    ax.set(xlabel=f"false positive rate (non-members: {n_neg})",
           ylabel=f"true positive rate (members: {n_pos})", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=7.5)
    return png_bytes(fig)


def write_mia_report(
    out_dir: str | Path | OutputDir,
    *,
    target: dict[str, Any],
    theoretical: dict[str, Any],
    population: dict[str, Any],
    shadows: dict[str, Any] | None,
    outcomes: Sequence[AttackOutcome],
    combined: dict[str, Any],
    confidence: float,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """Write roc.png, then report.json, to ``out_dir`` (atomically, recorded in its manifest:
    :mod:`dptrain.outputs`); return the report. report.json comes last: it marks a finished set.
    """
    if not outcomes:
        raise ValueError("outcomes must hold at least one attack, got none.")
    out = out_dir if isinstance(out_dir, OutputDir) else OutputDir(out_dir, COMMAND)
    report: dict[str, Any] = {
        "target": target,
        "theoretical": theoretical,
        "population": population,
        "shadows": shadows,
        "attacks": {o.name: o.to_dict() for o in outcomes},
        "empirical_epsilon": combined,
        "confidence": confidence,
    }
    report["verdict"] = verdict(_number(theoretical.get("epsilon")),
                                combined["clopper_pearson"], combined["gdp"])
    report["summary"] = summary_lines(report)
    report["seconds"] = seconds
    report["files"] = {"report": REPORT, "roc": ROC_PNG, "scores": SCORES}
    claimed = _number(theoretical.get("epsilon"))
    delta = _number(theoretical.get("delta"))
    name = Path(target.get("run_dir", "target")).name
    out.write_bytes(ROC_PNG, roc_png(outcomes, claimed, delta if math.isfinite(delta) else 0.0,
                                     f"Membership inference on {name} (claimed ε = {_eps(claimed)})"))
    out.write_json(REPORT, report)
    return report
