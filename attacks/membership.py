"""``dptrain attack mia``: membership inference against a finished run, and its report.

The question: "this model claims ε = 8 — how much does it actually leak?". Steps:

1. Read the run directory and rebuild its population (train ∪ validation ∪ test of the run's own
   data source, checked against the recorded fingerprint; :func:`attacks.shadows.load_target`).
   Members are the run's training examples, non-members the rest of the population.
2. The target's signals on the whole population (:mod:`attacks.signals`).
3. K reference models trained with the target's recipe on balanced random halves of the
   population, from the shared cache or trained now (:mod:`attacks.shadows`); attacks that need
   none (``loss``) do not trigger any training.
4. Every attack's score on every population example (:mod:`attacks.mia`).
5. Evaluation on equally many members and non-members: the larger group is subsampled at random
   (seeded) to the size of the smaller one (and both to ``max_eval`` if given), so that AUC,
   balanced accuracy and the audits weigh both sides alike. Metrics from
   :func:`attacks.metrics.evaluate_attack`; empirical ε lower bounds from
   :class:`attacks.audit.CanaryScoreAuditor` — Clopper-Pearson (Jagielski et al. 2020) and GDP
   (Nasr et al. 2023) — with the search over thresholds paid for by Bonferroni, at the δ of
   privacy.json (1e-5 for a non-private run, which has none).
6. ``report.json``, ``roc.png`` and ``scores.npz`` in the output directory (:mod:`attacks.report`).

Per attack, a bound holds at ``confidence`` for that attack alone. The headline bound takes the
best over all attacks run, so it is computed with the significance split over them (Bonferroni
again) and holds at ``confidence`` as it stands.

What the bounds are not: they treat each evaluated example as an independent trial against one
trained model. DP bounds the distinguishability of neighbouring datasets; a single model trained
on a fixed split does not give independent trials, so these figures measure leakage and are
indicative as ε bounds, not a formal audit. A formal one needs examples included at random and
independently — canaries, one run (Steinke, Nasr, Jagielski 2023).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attacks import mia
from attacks.signals import Signals
from dptrain import rundir
from dptrain.errors import ConfigError
from dptrain.features import stored_in

log = logging.getLogger(__name__)

NONPRIVATE_DELTA = 1e-5
"""δ at which a non-private run (whose privacy.json has none) is audited."""

DEFAULT_ATTACKS = ("loss", "lira_online", "lira_offline", "rmia")


@dataclasses.dataclass(frozen=True)
class _Attack:
    label: str
    needs_reference: bool
    score: Callable[[Signals, Any, int], tuple[np.ndarray, str]]


def _loss(target: Signals, shadows: Any, seed: int) -> tuple[np.ndarray, str]:
    return mia.loss_attack(target.loss), "score = -loss of the target (Yeom et al. 2018)"


def _lira(online: bool):
    def score(target: Signals, shadows: Any, seed: int) -> tuple[np.ndarray, str]:
        options = mia.LiraOptions(online=online)
        scores = mia.lira(target.phi, shadows.stack("phi"), shadows.in_mask, options)
        return scores, f"LiRA (Carlini et al. 2022) on phi, {options.describe(shadows.n_shadows)}"
    return score


def _rmia(online: bool):
    def score(target: Signals, shadows: Any, seed: int) -> tuple[np.ndarray, str]:
        options = mia.RmiaOptions(online=online, seed=seed)
        scores = mia.rmia(target.label_prob, shadows.stack("label_prob"), shadows.in_mask, options)
        n_z = min(options.n_population or len(target), len(target))
        return scores, (f"RMIA (Zarifzadeh et al. 2024) on p_y, {options.describe()}; "
                        f"{n_z} population samples z drawn from the whole population (seeded), "
                        "never x itself")
    return score


ATTACKS: dict[str, _Attack] = {
    "loss": _Attack("loss threshold", False, _loss),
    "lira_online": _Attack("LiRA online", True, _lira(True)),
    "lira_offline": _Attack("LiRA offline", True, _lira(False)),
    "rmia": _Attack("RMIA", True, _rmia(True)),
    "rmia_offline": _Attack("RMIA offline", True, _rmia(False)),
}
"""Every attack by name: its label in reports, whether it needs reference models, its scorer."""


def _check_attacks(attacks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(attacks, str):
        attacks = [a for a in attacks.split(",")]
    names = tuple(dict.fromkeys(a.strip() for a in attacks))
    if not names or "" in names:
        raise ConfigError(f"attacks must name at least one of {', '.join(ATTACKS)}, got none.")
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise ConfigError(
            f"attacks must be among {', '.join(ATTACKS)}, got unknown {', '.join(map(repr, unknown))}."
        )
    return names


def _check_options(confidence: Any, max_eval: Any, seed: Any) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) \
            or not 0.5 < confidence < 1:
        raise ConfigError(f"confidence must be in (0.5, 1), got {confidence!r}.")
    if max_eval is not None and (isinstance(max_eval, bool) or not isinstance(max_eval, int)
                                 or max_eval < 1):
        raise ConfigError(f"max_eval must be an integer >= 1 or None, got {max_eval!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}.")


def balanced_evaluation_set(
    is_member: np.ndarray, *, max_eval: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """Equally many member and non-member ids, subsampled at random; and a sentence saying how."""
    members, nonmembers = np.flatnonzero(is_member), np.flatnonzero(~is_member)
    if members.size == 0 or nonmembers.size == 0:
        raise ConfigError(
            f"membership inference needs members and non-members in the population, got "
            f"{members.size} and {nonmembers.size}."
        )
    n = min(members.size, nonmembers.size, max_eval or math.inf)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x65766C]))  # "evl" stream
    pick_m = np.sort(rng.choice(members, size=n, replace=False))
    pick_n = np.sort(rng.choice(nonmembers, size=n, replace=False))
    cut = []
    if members.size > n:
        cut.append(f"members subsampled at random from {members.size}")
    if nonmembers.size > n:
        cut.append(f"non-members subsampled at random from {nonmembers.size}")
    how = (f"{n} members vs {n} non-members; " + ("; ".join(cut) if cut else "all of them")
           + f" (seed {seed}), so that both sides weigh alike")
    return pick_m, pick_n, how


@stored_in("run_dir")  # the encoder outputs the run stored when it trained: not encoded again
def run_membership_inference(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    n_shadows: int = 8,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    shadow_dir: str | Path | None = None,
    confidence: float = 0.95,
    max_eval: int | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Attack the run in ``run_dir``; write report.json, roc.png and scores.npz to ``out_dir``.

    Args:
      run_dir: a finished run directory (``dptrain train``).
      out_dir: where the report goes (default ``run_dir/attacks``).
      n_shadows: reference models K (even, >= 2), cached and reused (see :mod:`attacks.shadows`).
      attacks: names from :data:`ATTACKS`.
      shadow_dir: root of the shadow cache (default ``run_dir/../.dptrain-shadows``).
      confidence: of every empirical ε bound, in (0.5, 1).
      max_eval: cap on the members (and on the non-members) evaluated.
      seed: of the shadows' assignment, the balancing subsample and RMIA's population draw.
      device: where shadows train and signals are computed (``auto``: CUDA when available).

    Returns the report (the content of report.json). Raises ConfigError, DataError or ModelError
    for bad input, before any training.
    """
    from attacks.report import COMMAND, FILES
    from attacks.shadows import TASKS, check_n_shadows, check_run_dir, default_root, \
        ensure_shadows, load_target, population_signals
    from dptrain.outputs import check_writable

    from dptrain.device import resolve

    started = time.monotonic()
    resolve(device, "fp32")  # refused here when it is not there
    names = _check_attacks(attacks)
    _check_options(confidence, max_eval, seed)
    need_reference = any(ATTACKS[a].needs_reference for a in names)
    if need_reference:
        check_n_shadows(n_shadows)
    # Everything that can be refused is refused here, before a model is loaded or trained.
    check_run_dir(run_dir, TASKS)
    outputs = report_dir(run_dir, out_dir)
    earlier = outputs.check(files=FILES)
    if need_reference:
        root = Path(shadow_dir) if shadow_dir is not None else default_root(run_dir)
        check_writable(root, f"the shadow cache {root}")
    target = load_target(run_dir)
    if earlier:
        print(f"replacing what {COMMAND} wrote earlier in {outputs.path}: {', '.join(earlier)}",
              flush=True)
    target_signals = population_signals(target.run_dir, target, device)

    shadows = None
    if need_reference:
        shadows = ensure_shadows(target, n_shadows, root=shadow_dir, seed=seed, progress=progress,
                                 device=device)

    claimed_delta = target.privacy.get("delta")
    delta = float(claimed_delta) if claimed_delta is not None else NONPRIVATE_DELTA
    population = {
        "n_population": target.n_population,
        "splits": target.split_sizes,
        "ids": "train example i -> i, validation j -> N_train + j, test k -> N_train + N_val + k",
        "members": f"the run's training split ({rundir.MEMBERS})",
        "nonmembers": "its validation and test splits",
        "fingerprint": target.population_fingerprint,
    }
    target_info = {
        "run_dir": str(target.run_dir),
        "model": target.config.model,
        "data": target.config.data,
        "trainable": target.config.trainable,
        "epochs": target.config.epochs,
        "batch_size": target.config.batch_size,
        "test_accuracy": _test_accuracy(target.run_dir),
        "learned": model_learned(target.run_dir),
    }
    if target.task != "intent":  # per utterance: ℓ_i = intent CE + the mean of its tag CEs
        target_info["task"] = target.task
        target_info["slot_f1"] = _metric(target.run_dir, "slot_f1")
        population["unit"] = "one utterance; its signal is the training loss of all its tokens"
    return score_and_report(
        outputs, names=names, target_signals=target_signals, shadows=shadows,
        is_member=target.is_member, delta=delta, theoretical=target.privacy,
        target_info=target_info, population=population, confidence=confidence,
        max_eval=max_eval, seed=seed, started=started)


def score_and_report(outputs, *, names, target_signals: Signals, shadows, is_member: np.ndarray,
                     delta: float, theoretical: dict[str, Any], target_info: dict[str, Any],
                     population: dict[str, Any], confidence: float, max_eval: int | None,
                     seed: int, started: float) -> dict[str, Any]:
    """Steps 4–6: every attack's scores, their evaluation on a balanced set, the empirical ε
    bounds, and the files. ``population`` describes who the members are (completed here)."""
    from attacks.audit import CanaryScoreAuditor
    from attacks.metrics import evaluate_attack
    from attacks.report import REPORT, SCORES, AttackOutcome, write_mia_report

    pick_m, pick_n, how = balanced_evaluation_set(is_member, max_eval=max_eval, seed=seed)
    confidence_each = 1 - (1 - confidence) / len(names)

    outcomes, all_scores, headline = [], {}, []
    for name in names:
        spec = ATTACKS[name]
        scores, description = spec.score(target_signals, shadows, seed)
        all_scores[name] = scores
        member_scores, nonmember_scores = scores[pick_m], scores[pick_n]
        auditor = CanaryScoreAuditor(member_scores, nonmember_scores)
        outcomes.append(AttackOutcome(
            name=name, label=spec.label, description=description,
            metrics=evaluate_attack(member_scores, nonmember_scores),
            clopper_pearson=auditor.epsilon_clopper_pearson(confidence, delta),
            gdp=auditor.epsilon_gdp(confidence, delta)))
        headline.append((name,
                         auditor.epsilon_clopper_pearson(confidence_each, delta),
                         auditor.epsilon_gdp(confidence_each, delta)))

    best_cp = max(headline, key=lambda h: h[1].epsilon_lb)
    best_gdp = max(headline, key=lambda h: h[2].epsilon_lb)
    combined = {
        "clopper_pearson": best_cp[1].epsilon_lb,
        "clopper_pearson_attack": best_cp[0],
        "gdp": best_gdp[2].epsilon_lb,
        "gdp_attack": best_gdp[0],
        "confidence": confidence,
        "confidence_per_attack": confidence_each,
        "delta": delta,
        "correction": (f"Bonferroni over the {len(names)} attacks (each bounded at confidence "
                       f"{confidence_each:.4g}) and, within each, over its thresholds"),
    }

    import io

    buf = io.BytesIO()
    np.savez(buf, member_ids=pick_m, nonmember_ids=pick_n, is_member=is_member,
             **{f"scores_{name}": s for name, s in all_scores.items()})
    # An earlier report goes first, so that a crash in between never leaves it beside new scores.
    outputs.remove(REPORT)
    outputs.write_bytes(SCORES, buf.getvalue())

    n_members = int(is_member.sum())
    population = {
        **population,
        "n_members": n_members,
        "n_nonmembers": int(is_member.size) - n_members,
        "evaluated": {"n_members": int(pick_m.size), "n_nonmembers": int(pick_n.size),
                      "how": how, "seed": seed, "max_eval": max_eval},
    }
    return write_mia_report(
        outputs, target=target_info, theoretical=theoretical, population=population,
        shadows=None if shadows is None else shadows.to_dict(), outcomes=outcomes,
        combined=combined, confidence=confidence, seconds=time.monotonic() - started)


def report_dir(run_dir: str | Path, out_dir: str | Path | None = None):
    """The :class:`~dptrain.outputs.OutputDir` a report of ``run_dir`` goes to: ``out_dir``, or
    ``run_dir/attacks`` by default."""
    from attacks.report import COMMAND
    from dptrain.outputs import OutputDir

    if out_dir is not None:
        return OutputDir(out_dir, COMMAND)
    from dptrain import rundir

    out = Path(run_dir) / rundir.ATTACKS
    return OutputDir(out, COMMAND, what=f"the report directory {out} (default --out)")


def model_learned(run_dir: Path) -> bool | None:
    """metrics.json's verdict on whether the model beats chance (None: not recorded)."""
    try:
        return bool(rundir.read_json(run_dir / rundir.METRICS)["chance_level"]["learned"])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


def _test_accuracy(run_dir: Path) -> float | None:
    return _metric(run_dir, "accuracy")


def _metric(run_dir: Path, name: str) -> float | None:
    try:
        return float(rundir.read_json(run_dir / rundir.METRICS)[name])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None
