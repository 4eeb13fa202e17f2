"""``dptrain audit``: one training run with audit canaries, and the ε it provably spends at least.

The pipeline (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run"):

1. load the data with the recipe's options (:func:`dptrain.data.load_intent_data`);
2. make m canaries and include each with probability ½ (:func:`attacks.canaries.insert_canaries`);
3. train once with the given recipe on the natural training split plus the included canaries
   (:func:`dptrain.trainer.train_run`, into ``DIR/run``; its members.json names the included
   canaries as population ids N + i);
4. score all m canaries with the trained model: φ of the canary's own label;
5. guess "in" on the k₊ highest scores and "out" on the k₋ lowest, abstain on the rest, and turn
   the r = k₊ + k₋ guesses, v of them right, into ε_lb (:func:`attacks.audit.one_run_audit`),
   with the search over (k₊, k₋) paid for by Bonferroni (default) or a split;
6. write ``DIR/report.json``, ``DIR/canary_scores.png`` and ``DIR/canaries.json``.

Crash safety. ``DIR/audit.json`` (the recipe and options) and ``DIR/canaries.json`` (texts,
labels and the inclusion coins) are written before training starts; ``report.json`` last, as the
mark of a finished audit. ``dptrain audit --resume --out DIR`` (:func:`resume_audit`) continues a
stopped audit with the same canaries and coins: the same mechanism, run to its end, with the ε
its checkpoint already spent kept by the trainer. A new audit refuses a non-empty directory.

What is audited. The accountant of the run accounts for the training set it was given, natural
examples plus included canaries (N in its sample rate is that total): that is the correct DP
accounting of the audited mechanism, DP-SGD on "data ∪ included canaries", and adding or removing
one canary is exactly the add/remove neighbouring relation the guarantee is stated for. The bound
is tested against the run's spent ε at its δ; a non-private run (ε = ∞) is audited at δ = 0.
One caveat, shared with every DP-SGD implementation that sets q = B/N from the data: the sample
rate, number of steps and noise multiplier are computed from the training-set size, which depends
on how many canaries came in; the accounting treats N as public. The scores do not see N, and
the audit treats the mechanism as the accountant does.

The score is φ = log p_y − log Σ_{j≠y} p_j of the canary's assigned label y (LiRA's logit-scaled
confidence). The loss −log p_y = log(1 + e^−φ) is a decreasing function of φ, so the two rank the
canaries alike and every bound here depends on ranks only; φ is used because it keeps resolving
memorized canaries where p_y rounds to 1 and the loss to 0 (ties there would be broken at random,
losing information), and because its distribution is near-Gaussian, which the GDP estimate and
the histogram are read against.

Guess counts. k₊ and k₋ each range over 5%, 10%, 20% and 50% of m (16 pairs when m ≥ 20): few
enough that Bonferroni costs little (significance / 16: about 0.5 in ε at m = 1000), wide enough
to catch both a few strongly memorized canaries and a broad shift. The threshold audits
(Clopper-Pearson, GDP) of :class:`attacks.audit.CanaryScoreAuditor` are reported beside it with
their own correction; they treat each canary as an independent trial, which the one-run theorem
does not justify for them, so they are indications, and only the one-run bound decides the
verdict.

Canaries. ``canaries=None`` means min(1000, N) for N natural training examples; an explicit m
larger than N is refused rather than silently reduced (the audited model would mostly be fitting
random words, and a report should audit the m that was asked for). The coins are OS entropy
unless ``canary_seed`` is set (experiments only: a known seed tells anyone which canaries were in).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dptrain import rundir
from dptrain.errors import ConfigError, DPTrainError
from dptrain.outputs import MANIFEST, OutputDir, check_writable

COMMAND = "dptrain audit"
DEFAULT_CANARIES = 1000
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5)
PLAN = "audit.json"
REPORT = "report.json"
SCORES_PNG = "canary_scores.png"
CANARIES = "canaries.json"
RUN = "run"
FILES = (PLAN, CANARIES, SCORES_PNG, REPORT)
_CORRECTIONS = ("bonferroni", "split")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class AuditRunOptions:
    """How ``dptrain audit`` audits; checked here, before anything is trained.

    Attributes:
      canaries: m, the number of canaries (>= 2); None for min(1000, N natural training examples).
      confidence: probability that each reported bound holds, in (0.5, 1).
      correction: how the search over guess counts and thresholds is paid for: "bonferroni" or
        "split".
      canary_seed: seed of the inclusion coins; None draws them from OS entropy.
      text_seed: seed of the canary texts and labels (public).
      guess_fractions: the fractions of m that k₊ and k₋ range over.
    """

    canaries: int | None = None
    confidence: float = 0.95
    correction: str = "bonferroni"
    canary_seed: int | None = None
    text_seed: int = 0
    guess_fractions: tuple[float, ...] = GUESS_FRACTIONS

    def __post_init__(self) -> None:
        if self.canaries is not None and (not _is_int(self.canaries) or self.canaries < 2):
            raise ConfigError(f"canaries must be an integer >= 2, got {self.canaries!r}.")
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.5 < c < 1:
            raise ConfigError(f"confidence must be in (0.5, 1), got {c!r}.")
        if self.correction not in _CORRECTIONS:
            raise ConfigError(
                f"correction must be one of {', '.join(_CORRECTIONS)}, got {self.correction!r}."
            )
        if self.canary_seed is not None and not _is_int(self.canary_seed):
            raise ConfigError(f"canary_seed must be an integer or None, got {self.canary_seed!r}.")
        if not _is_int(self.text_seed):
            raise ConfigError(f"text_seed must be an integer, got {self.text_seed!r}.")
        fractions = tuple(self.guess_fractions)
        if not fractions or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 0.5
            for f in fractions
        ):
            raise ConfigError(
                f"guess_fractions must be a non-empty sequence of numbers in (0, 0.5], got "
                f"{self.guess_fractions!r}."
            )
        object.__setattr__(self, "guess_fractions", fractions)


def guess_grid(m: int, fractions=GUESS_FRACTIONS) -> list[int]:
    """The guess counts searched on each side: floor(f·m) for each f (at least 1), distinct.

    Every fraction is ≤ ½, so any pair (k₊, k₋) of the grid has k₊ + k₋ ≤ m.

    >>> guess_grid(1000)
    [50, 100, 200, 500]
    >>> guess_grid(10)
    [1, 2, 5]
    """
    return sorted({max(1, math.floor(f * m)) for f in fractions})


@dataclasses.dataclass(frozen=True)
class AuditOutcome:
    """What :func:`run_audit` produced: the report (as written to report.json) and its files."""

    out_dir: Path
    report: dict[str, Any]

    @property
    def summary(self) -> list[str]:
        return list(self.report["summary"])

    @property
    def epsilon_lb(self) -> float:
        return float(self.report["one_run"]["epsilon_lb"])


def check_new_audit_dir(outputs: OutputDir, resumable: bool = True) -> None:
    """A new audit needs an empty (or new), writable directory: it draws fresh coins."""
    out = outputs.path
    if os.path.lexists(out) and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()):
        if resumable and outputs.owns(PLAN) and not outputs.owns(REPORT):
            raise ConfigError(
                f"--out {out} is not empty: it holds a stopped audit; continue it with "
                f"dptrain audit --resume --out {out} (a new audit draws fresh coins, so it "
                "needs a new directory)."
            )
        raise ConfigError(
            f"--out {out} is not empty; an audit draws fresh coins, so choose a new directory."
        )
    check_writable(out, f"--out {out}")


def run_audit(config, out_dir: str | Path, options: AuditRunOptions | None = None, *,
              progress: bool = True) -> AuditOutcome:
    """Insert canaries, train once with ``config`` (a TrainConfig), score, bound ε, write DIR.

    See the module docstring for what is audited and why. Raises
    :class:`~dptrain.errors.DPTrainError` subclasses on bad input, before anything is written.
    The recipe, the options and the canaries with their coins are written (``audit.json``,
    ``canaries.json``) before training starts, so that :func:`resume_audit` can continue the
    very same audit after a crash.
    """
    from dptrain.trainer import fingerprint

    from attacks.canaries import insert_canaries

    from dptrain.encoders import resolve_model

    # the encoder --model auto stands for, recorded resolved
    config = dataclasses.replace(config, model=resolve_model(config.model, config.task))
    options = options or AuditRunOptions()
    outputs = OutputDir(out_dir, COMMAND)
    check_new_audit_dir(outputs)
    data, slots = _natural_data(config)
    n_natural = len(data.train)
    m = options.canaries if options.canaries is not None else min(DEFAULT_CANARIES, n_natural)
    if m > n_natural:
        raise ConfigError(
            f"canaries must be at most the {n_natural} natural training examples, got {m}; "
            f"pass --canaries {n_natural} or fewer (or more data)."
        )
    if m < 2:
        raise ConfigError(f"canaries must be an integer >= 2, got {m} (the training split is tiny).")
    augmented, canaries = insert_canaries(data, m, options.canary_seed, text_seed=options.text_seed)
    augmented = _trained_data(augmented, slots, canaries)

    outputs.write_json(PLAN, {
        "description": "what this audit is, written before training so that dptrain audit "
                       "--resume continues it with the same canaries and coins (canaries.json)",
        "config": config.to_dict(),
        "options": dataclasses.asdict(options),
        "natural_train_fingerprint": fingerprint(data.train.texts, data.train.labels),
    })
    outputs.write_json(CANARIES, canaries.to_dict())
    try:
        return _train_and_report(outputs, config, options, canaries, augmented, "train", progress)
    except DPTrainError:
        take_back_if_refused(outputs, (CANARIES, PLAN))
        raise


def take_back_if_refused(outputs: OutputDir, written: tuple[str, ...]) -> None:
    """The trainer refused the recipe (unknown model, batch larger than the data, ...) before
    writing anything in DIR/run: remove what the audit wrote first, so bad input leaves no trace."""
    if (outputs.path / RUN / rundir.CONFIG).exists():
        return  # training had begun: keep everything for the user to see or resume
    if (outputs.path / RUN).is_dir() and not any((outputs.path / RUN).iterdir()):
        (outputs.path / RUN).rmdir()
    outputs.unclaim_dir(RUN)
    for name in written:
        outputs.remove(name)


def resume_audit(out_dir: str | Path, *, progress: bool = True) -> AuditOutcome:
    """Continue the audit that stopped in ``out_dir``, with its recipe, options and canaries.

    The run in ``DIR/run`` is resumed from its checkpoint (the ε it spent is kept), restarted
    from scratch when it stopped before its first checkpoint, or reused when it finished (the
    audit then stopped while scoring). Only what ``dptrain audit`` wrote there is trusted: a
    changed ``audit.json`` or ``canaries.json`` is refused, as is a finished audit.
    """
    from dptrain.errors import DataError
    from dptrain.trainer import TrainConfig, fingerprint

    outputs = OutputDir(out_dir, COMMAND)
    out = outputs.path
    if not out.is_dir():
        raise ConfigError(f"--out {out} not found: there is no stopped audit to resume.")
    if outputs.owns(REPORT):
        raise ConfigError(f"--out {out} holds a finished audit; there is nothing to resume.")
    from attacks.whitebox_audit import stopped_white_box

    if stopped_white_box(out):
        raise ConfigError(
            f"--out {out} holds a white-box audit that stopped before its report; white-box "
            "audits cannot be resumed (their canaries' running scores were in memory): run the "
            "same dptrain audit --white-box command again, it starts over in this directory.")
    if not (outputs.owns(PLAN) and outputs.owns(CANARIES)):
        raise ConfigError(
            f"--out {out} holds no stopped audit to resume: no {PLAN} and {CANARIES} that "
            f"dptrain audit wrote (or they changed since; see {MANIFEST})."
        )
    if os.path.lexists(out / RUN) and not outputs.owns_dir(RUN):
        raise ConfigError(f"--out {out} holds a {RUN}/ that dptrain audit did not make; "
                          "it will not resume into it.")
    outputs.check(files=FILES, dirs=(RUN,))  # writable; temporaries of a killed write removed
    plan = rundir.read_json(out / PLAN)
    config = TrainConfig.saved(plan["config"])
    options = AuditRunOptions(**plan["options"])
    data, slots = _natural_data(config)
    if fingerprint(data.train.texts, data.train.labels) != plan["natural_train_fingerprint"]:
        raise DataError(
            f"the data of the audit in {out} changed since it started: {config.data!r} no "
            "longer gives the same training set; resume needs the very same data."
        )
    canaries = _stored_canaries(rundir.read_json(out / CANARIES))
    augmented = _trained_data(_with_canaries(data, canaries), slots, canaries)

    run_dir = out / RUN
    stopped = any((path / "state.json").exists() for path in
                  (run_dir / rundir.CHECKPOINT, run_dir / f".{rundir.CHECKPOINT}.old"))
    if (run_dir / rundir.PRIVACY).exists():
        action = "reuse"
    elif stopped:
        action = "resume"
    else:
        action = "restart" if run_dir.exists() else "train"
    print(f"resuming the audit in {out}: {_DOING[action]} the run in {run_dir}", flush=True)
    return _train_and_report(outputs, config, options, canaries, augmented, action, progress)


_DOING = {"reuse": "reusing the finished", "resume": "resuming (from its checkpoint)",
          "restart": "restarting (it stopped before its first checkpoint)",
          "train": "training"}


def _natural_data(config):
    """(the data as texts and labels, which the canaries are made against and fingerprinted
    by; the tagged utterances of a ``--task joint|slots`` recipe, or None)."""
    if config.task == "intent":
        from dptrain.data import load_intent_data

        return load_intent_data(
            config.data, text_column=config.text_column, label_column=config.label_column,
            seed=config.seed, synthetic_per_intent=config.synthetic_per_intent), None
    from dptrain.slot_data import as_intent_data, load_slot_data

    slots = load_slot_data(config.data, seed=config.seed,
                           synthetic_per_intent=config.synthetic_per_intent)
    return as_intent_data(slots), slots


def _trained_data(augmented, slots, canaries):
    """What the audited run trains on: ``augmented`` itself, or for slot models the tagged
    utterances followed by the included canaries as tagged utterances, in canary order."""
    if slots is None:
        return augmented
    from attacks.canaries import canary_utterances

    tagged = canary_utterances(canaries, slots.intents, slots.slot_types)
    included = tuple(tagged[i] for i in np.flatnonzero(canaries.included))
    return dataclasses.replace(slots, train=slots.train + included, source=augmented.source)


def _stored_canaries(stored: dict[str, Any]):
    from attacks.canaries import CanarySet

    return CanarySet(texts=tuple(stored["texts"]), labels=np.asarray(stored["labels"]),
                     included=np.asarray(stored["included"], dtype=bool),
                     num_natural=int(stored["num_natural"]), seed=stored["seed"],
                     text_seed=int(stored["text_seed"]))


def _with_canaries(data, canaries):
    """The training split of :func:`attacks.canaries.insert_canaries` for stored canaries: the
    natural examples, then the included canaries in canary order."""
    from dptrain.data import Split

    if canaries.num_natural != len(data.train):
        raise ConfigError(f"the canaries were added to {canaries.num_natural} natural training "
                          f"examples, but the data now has {len(data.train)}.")
    idx = np.flatnonzero(canaries.included)
    train = Split(data.train.texts + tuple(canaries.texts[i] for i in idx),
                  np.concatenate([data.train.labels, canaries.labels[idx]]))
    return dataclasses.replace(
        data, train=train, source=f"{data.source} + {idx.size} of {canaries.m} audit canaries")


def _train_and_report(outputs: OutputDir, config, options: AuditRunOptions, canaries, augmented,
                      action: str, progress: bool) -> AuditOutcome:
    """Train (or resume, restart, reuse) DIR/run, score the canaries, write the report last."""
    import shutil

    from dptrain.trainer import RunSummary, train_run

    run_dir = outputs.path / RUN
    if action == "reuse":
        summary = RunSummary.load(run_dir)
    else:
        if action == "restart":
            shutil.rmtree(run_dir)
        outputs.claim_dir(RUN)
        summary = train_run(
            config, run_dir, resume=action == "resume", data=augmented,
            member_ids=canaries.member_ids, progress=progress,
            extra_info={"audit": {"canaries": canaries.m, "included": canaries.num_included,
                                  "coins": canaries.seed_policy}},
        )
    phi, loss = _score(run_dir, canaries, config.max_length, config.task)
    report = build_report(summary.privacy, canaries, phi, options,
                          model=config.model, data=config.data,
                          learned=summary.metrics.get("chance_level", {}).get("learned"))
    outputs.write_json(CANARIES, {
        **canaries.to_dict(), "score": "phi", "phi": phi.tolist(), "loss": loss.tolist(),
    })
    outputs.write_bytes(SCORES_PNG, _scores_png(phi, canaries.included, report))
    outputs.write_json(REPORT, report)  # last: its presence marks a finished audit
    return AuditOutcome(outputs.path, report)


def _score(run_dir: Path, canaries, max_length: int, task: str = "intent"
           ) -> tuple[np.ndarray, np.ndarray]:
    """φ and loss of every canary (included or not) under its assigned label (slot models: under
    its intent and tags, per utterance, :func:`attacks.signals.joint_signals`)."""
    from transformers.utils import logging as hf_logging

    from attacks.signals import compute_signals, joint_signals, load_classifier

    if task != "intent":
        from attacks.canaries import canary_utterances
        from dptrain.slot_trainer import load_joint

        model, tokenizer, meta = load_joint(run_dir / rundir.MODEL)
        # the model's tags are the natural data's (canaries add none): the same slot types
        # the canaries' tags were drawn from
        types = tuple(sorted({t[2:] for t in meta["tags"] if t != "O"}))
        utterances = canary_utterances(canaries, meta["intents"], types)
        signals = joint_signals(model, tokenizer, utterances, meta["intents"], meta["tagset"],
                                max_length=max_length)
        return signals.phi, signals.loss

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, tokenizer = load_classifier(run_dir)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    signals = compute_signals(model, tokenizer, canaries.texts, canaries.labels,
                              max_length=max_length)
    return signals.phi, signals.loss


def build_report(privacy: dict[str, Any], canaries, phi: np.ndarray, options: AuditRunOptions,
                 *, model: str = "", data: str = "", learned: bool | None = None) -> dict[str, Any]:
    """The report.json content from the run's privacy record, the canaries and their scores.

    Needs numpy/scipy only (through :mod:`attacks.audit`): an audit of scores from any framework
    can be built with it.
    """
    from attacks.audit import one_run_audit

    included = np.asarray(canaries.included, dtype=bool)
    m = included.size
    private = bool(privacy.get("private", False))
    claimed = float(privacy["epsilon"]) if private else math.inf
    delta = float(privacy["delta"]) if private else 0.0
    grid = guess_grid(m, options.guess_fractions)
    result = one_run_audit(
        phi, included, k_positive=grid, k_negative=grid, delta=delta,
        confidence=options.confidence, correction=options.correction,
    )
    one_run = {**result.to_dict(), "score": "phi", "k_grid": grid,
               "guess_fractions": list(options.guess_fractions)}

    gdp_delta = delta if private else _default_delta(int(privacy.get("dataset_size") or privacy.get("num_examples") or m))
    threshold_audits = _threshold_audits(phi, included, options, delta, gdp_delta)

    if not private:
        verdict = "no claim"
    elif result.epsilon_lb > claimed:
        verdict = "refuted"
    else:
        verdict = "consistent"
    report = {
        "theoretical": privacy,
        "one_run": one_run,
        "verdict": verdict,
        "canaries": {
            "m": m,
            "included": int(included.sum()),
            "excluded": int(m - included.sum()),
            "num_natural_train": int(canaries.num_natural),
            "generated": (
                "random sequences of 6 to 10 words from dptrain.synthetic.CANARY_WORDS with "
                "uniformly random labels (dptrain.synthetic.audit_canaries, text_seed "
                f"{canaries.text_seed}); none coincides with a text of the data"
            ),
            "inclusion": "each canary independently with probability 1/2",
            "coins": canaries.seed_policy,
            "seed": canaries.seed,
            "population_ids": (
                f"natural training examples 0..{canaries.num_natural - 1}, canary i is "
                f"{canaries.num_natural} + i (see {RUN}/{rundir.MEMBERS})"
            ),
        },
        "score": {
            "name": "phi",
            "definition": "log p_y - log sum_{j != y} p_j for the canary's assigned label y "
                          "(higher = more likely a member)",
            "included_median": _median(phi[included]),
            "excluded_median": _median(phi[~included]),
        },
        "threshold_audits": threshold_audits,
        "model_learned": learned,
    }
    report["summary"] = _summary_lines(report, claimed, delta, private, model, data)
    if learned is False:
        from attacks.report import CHANCE_WARNING

        report["summary"].append(CHANCE_WARNING)
    return report


def _default_delta(n: int) -> float:
    return min(1e-5, 1.0 / (10 * max(n, 1)))


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if x.size else None


def _threshold_audits(phi, included, options: AuditRunOptions, delta: float,
                      gdp_delta: float) -> dict[str, Any]:
    from attacks.audit import CanaryScoreAuditor

    note = ("each canary is treated as an independent trial, which the one-run theorem does not "
            "justify for these tests: an indication beside the one-run bound, not a bound; GDP "
            "further assumes the mechanism is mu-GDP")
    try:
        auditor = CanaryScoreAuditor(phi[included], phi[~included])
        cp = auditor.epsilon_clopper_pearson(options.confidence, delta,
                                             correction=options.correction)
        gdp = auditor.epsilon_gdp(options.confidence, gdp_delta, correction=options.correction)
    except ValueError as exc:  # all canaries on one side, or too few to split
        return {"skipped": " ".join(str(exc).split()), "note": note}
    return {"clopper_pearson": cp.to_dict(), "gdp": gdp.to_dict(), "note": note}


def _fmt_eps(x: float) -> str:
    return "∞" if not math.isfinite(x) else f"{x:.3g}"


def _correction_words(r: dict[str, Any]) -> str:
    if r["correction"] == "bonferroni":
        return f"Bonferroni over {r['n_choices']} choices"
    if r["correction"] == "split":
        return (f"split: chosen among {r['n_choices']} on a random half, bounded on the other "
                f"{r['m']} canaries")
    return "a single choice fixed in advance"


def _summary_lines(report, claimed, delta, private, model, data) -> list[str]:
    r, c = report["one_run"], report["canaries"]
    conf = f"{100 * r['confidence']:g}%"
    what = f"{model} on {data}: " if model or data else ""
    lines = [
        f"Audited {what}{c['num_natural_train']} natural training examples + {c['included']} of "
        f"{c['m']} canaries (each in with probability 1/2; coins: {c['coins'].split(' (')[0]}).",
        f"One-run audit: {r['r']} guesses, {r['v']} correct; ε ≥ {r['epsilon_lb']:.3g} at {conf} "
        f"confidence ({_correction_words(r)}; δ = {delta:.3g}; score φ).",
    ]
    if not private:
        lines.append("Claimed ε = ∞ (non-private run): nothing to refute; the bound measures "
                     "leakage.")
    elif report["verdict"] == "refuted":
        lines.append(
            f"!!! ε_lb = {r['epsilon_lb']:.3g} > claimed ε = {_fmt_eps(claimed)} at δ = "
            f"{delta:.3g}: the bound exceeds the claimed ε: the claim is refuted or there is a "
            "bug (engine, accountant or audit). Do not trust this run's guarantee. !!!"
        )
    else:
        lines.append(f"Claimed ε = {_fmt_eps(claimed)} at δ = {delta:.3g}: consistent.")
    t = report["threshold_audits"]
    if "skipped" in t:
        lines.append(f"Threshold audits skipped: {t['skipped']}")
    else:
        cp, gdp = t["clopper_pearson"], t["gdp"]
        lines.append(
            f"Threshold audits (indications, canaries treated as independent trials): "
            f"Clopper-Pearson ε ≥ {cp['epsilon_lb']:.3g}, GDP ε ≈ {gdp['epsilon_lb']:.3g} at "
            f"δ = {gdp['delta']:.3g} ({cp['correction']} over {cp['n_choices']} thresholds)."
        )
        if private and max(cp["epsilon_lb"], gdp["epsilon_lb"]) > claimed:
            lines.append("Warning: a threshold audit exceeds the claimed ε; it is not a rigorous "
                         "bound in one run, but look into it.")
    return lines


def _scores_png(phi: np.ndarray, included: np.ndarray, report) -> bytes:
    from dptrain.figures import png_bytes, pyplot

    plt = pyplot()

    included = np.asarray(included, dtype=bool)
    r = report["one_run"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bins = np.histogram_bin_edges(phi, bins=min(50, max(10, phi.size // 10)))
    ax.hist(phi[included], bins=bins, alpha=0.6, color="tab:red",
            label=f"included ({int(included.sum())})")
    ax.hist(phi[~included], bins=bins, alpha=0.6, color="tab:blue",
            label=f"excluded ({int((~included).sum())})")
    # The chosen guesses as thresholds on all m scores (under a split they were applied to the
    # held-out part; the rank is scaled to the whole set, so the lines are approximate there).
    ranked = np.sort(phi)[::-1]
    scale = phi.size / max(r["m"], 1)
    k_pos = min(phi.size, round(r["k_positive"] * scale))
    k_neg = min(phi.size, round(r["k_negative"] * scale))
    if k_pos:
        ax.axvline(ranked[k_pos - 1], color="darkred", ls="--",
                   label=f"guess in: top {r['k_positive']}")
    if k_neg:
        ax.axvline(ranked[phi.size - k_neg], color="navy", ls="--",
                   label=f"guess out: bottom {r['k_negative']}")
    claimed = report["theoretical"].get("epsilon")
    claimed_text = _fmt_eps(float(claimed)) if isinstance(claimed, (int, float)) else "∞"
    ax.set(xlabel=r"$\varphi = \log p_y - \log \sum_{j \neq y} p_j$ of the canary's label",
           ylabel="canaries",
           title=f"One-run audit: ε ≥ {r['epsilon_lb']:.2f} at {100 * r['confidence']:g}% "
                 f"(claimed ε = {claimed_text})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png_bytes(fig, dpi=110)
