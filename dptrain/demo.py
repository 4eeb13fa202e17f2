"""``dptrain demo``: the main job on built-in defaults.

Trains the same classifier three times on the built-in synthetic intents — without privacy, at
ε = 8 and at ε = 1 (δ = 1e-5) — and prints accuracy and ε side by side, with a privacy–utility
figure. Then it attacks each model as a privacy reviewer would first: the loss-threshold
membership-inference attack (Yeom et al. 2018; no shadow models, so it takes seconds), with its
AUC, TPR at 1% FPR and the empirical ε lower bound next to the claimed ε (each run's
``attacks/report.json`` and ``attacks/roc.png``). LiRA, RMIA and the one-run audit cost extra
training runs: ``dptrain attack mia --run DIR`` and ``dptrain audit``.

Uses the packaged all-MiniLM-L6-v2 when it is installed, else the tiny random BERT. Finished runs
and attack reports are reused, stopped runs resumed from their checkpoint (or restarted when they
stopped before the first one), so running the demo again after a crash loses nothing; it never
overwrites what it did not write (:mod:`dptrain.outputs`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Sequence

from . import rundir
from .errors import ConfigError, DPTrainError
from .models import MINILM, TINY, minilm_available
from .outputs import OutputDir
from .summary import print_rows, print_table, privacy_utility_png
from .trainer import RunSummary, TrainConfig, train_run

EPSILONS = (math.inf, 8.0, 1.0)
COMMAND = "dptrain demo"
SUMMARY = "summary.json"
FIGURE = "privacy_utility.png"


def demo_config(model: str, quick: bool) -> TrainConfig:
    """The demo's recipe: AdamW, automatic clipping, Poisson batches; head-only for MiniLM."""
    if quick:
        return TrainConfig(data="synthetic", model=model, synthetic_per_intent=30, epochs=2.0,
                           batch_size=64, lr=2e-3, delta=1e-5, seed=0)
    if model == TINY:
        return TrainConfig(data="synthetic", model=model, synthetic_per_intent=120, epochs=8.0,
                           batch_size=256, lr=3e-3, delta=1e-5, seed=0)
    # MiniLM: exactly what `dptrain train` does with no flags (the head of the mean-pooled
    # encoder on cached features, trainer.recipe's batch, epochs and lr): the demo shows the default.
    return TrainConfig(data="synthetic", model=model, synthetic_per_intent=80, delta=1e-5, seed=0)


def attack_plan(run_dir: Path) -> tuple[str, Path]:
    """Where the loss attack's report on ``run_dir`` comes from: ``("reuse", dir)`` or
    ``("attack", dir)``; decided before anything is trained, refused (ConfigError) if nowhere.

    ``attacks/`` is reused when it holds a report with the loss attack that ``dptrain attack
    mia`` wrote. A report there with other attacks (the user's own), or one that command did not
    write, is never overwritten, nor read: the demo's own then goes to ``attacks-loss/``.
    """
    from attacks.membership import report_dir
    from attacks.report import FILES, REPORT

    candidates = ("attacks", "attacks-loss")
    for sub in candidates:
        outputs = report_dir(run_dir, run_dir / sub)
        if outputs.owns(REPORT):
            if "loss" in rundir.read_json(outputs.path / REPORT).get("attacks", {}):
                return "reuse", outputs.path
            continue
        if (outputs.path / REPORT).exists() and sub != candidates[-1]:
            continue
        try:
            outputs.check(files=FILES)
        except ConfigError:
            if sub == candidates[-1]:
                raise
            continue
        return "attack", outputs.path
    raise AssertionError("unreachable")  # pragma: no cover


def attack_run(run_dir: Path) -> tuple[dict, Path]:
    """The loss attack's report on a finished run and where it is, reused or computed now."""
    from attacks.membership import run_membership_inference
    from attacks.report import REPORT

    action, out = attack_plan(run_dir)
    if action == "reuse":
        return rundir.read_json(out / REPORT), out
    return run_membership_inference(run_dir, out, attacks=["loss"], progress=False), out


# The demo's table judges by the assumption-free Clopper-Pearson bound alone.
_VERDICT_SHOWN = {"no claim": "no claim", "refuted": "claim refuted!",
                  "refuted if gaussian": "consistent", "consistent": "consistent"}


def attack_rows(summaries: Sequence[RunSummary], reports: Sequence[dict]) -> list[list[str]]:
    """One row per run: claimed ε, the loss attack's AUC and TPR@1% FPR, the empirical ε bound."""
    from attacks.metrics import fpr_key

    rows = [["run", "ε claimed", "attack AUC", "TPR@1%FPR", "ε ≥ (measured)", "verdict"]]
    for s, report in zip(summaries, reports):
        claimed = float(s.privacy["epsilon"])
        loss = report["attacks"]["loss"]
        measured = report["empirical_epsilon"]["clopper_pearson"]
        rows.append([Path(s.out_dir).name, "∞" if not math.isfinite(claimed) else f"{claimed:.2f}",
                     f"{loss['auc']:.3f}", f"{loss['tpr_at_fpr'][fpr_key(0.01)]:.1%}",
                     f"{measured:.2f}", _VERDICT_SHOWN[report["verdict"]]])
    return rows


def _differences(saved: TrainConfig, config: TrainConfig) -> str:
    """The fields in which a run's saved config departs from the demo's recipe. A field the
    recipe leaves to the trainer (None or 'auto') matches whatever the trainer chose and
    recorded: the choice follows from the other fields and the data."""
    differ = []
    for f in dataclasses.fields(TrainConfig):
        want, got = getattr(config, f.name), getattr(saved, f.name)
        if want is None or want == "auto" or got == want:
            continue
        differ.append(f"{f.name} {got!r} instead of {want!r}")
    return ", ".join(differ)


def run_plan(run_dir: Path, config: TrainConfig) -> str:
    """What the demo does with one of its run directories: 'train' (there is none), 'reuse' (a
    finished run), 'resume' (a checkpoint) or 'restart' (stopped before its first checkpoint).

    Only directories the demo made itself come here (its manifest says so). A finished or
    stopped run of another recipe — another --model, --quick or not — is refused, never mixed in.
    """
    if not run_dir.exists():
        return "train"
    finished = (run_dir / rundir.PRIVACY).exists()
    stopped = any((path / "state.json").exists() for path in
                  (run_dir / rundir.CHECKPOINT, run_dir / f".{rundir.CHECKPOINT}.old"))
    if not (finished or stopped):
        return "restart"
    saved = rundir.read_json(run_dir / rundir.CONFIG)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ConfigError(f"{run_dir / rundir.CONFIG} holds no training configuration.")
    differences = _differences(TrainConfig.from_dict(saved["config"]), config)
    if differences:
        raise ConfigError(
            f"{run_dir} holds a {'finished' if finished else 'stopped'} run of another recipe "
            f"({differences}); the demo does not mix recipes: choose another --out, or rerun "
            "with the same --model and --quick."
        )
    return "reuse" if finished else "resume"


_DOING = {"train": "training", "resume": "resuming", "restart": "restarting (it stopped before "
          "its first checkpoint)"}


def run_demo(out: Path, model: str | None = None, quick: bool = False, progress: bool = True) -> list[RunSummary]:
    """Train, attack and compare; rerun after a crash, it picks up where it stopped.

    Before anything is trained, the demo refuses (ConfigError) what it cannot do without
    overwriting something it did not write (:mod:`dptrain.outputs`): a summary.json or
    privacy_utility.png of someone else's in ``out``, a run directory it did not make, a run of
    another recipe. Its run directories are recorded in ``out``'s manifest before they are made;
    on a rerun each is reused (finished), resumed (checkpoint) or restarted from scratch
    (stopped before its first checkpoint: no privacy was spent on anything released).
    """
    out = Path(out)
    model = model or (MINILM if minilm_available() else TINY)
    base = demo_config(model, quick)
    outputs = OutputDir(out, COMMAND)
    runs = [(eps, "eps_inf" if math.isinf(eps) else f"eps_{eps:g}") for eps in EPSILONS]
    outputs.check(files=(SUMMARY, FIGURE), dirs=[name for _, name in runs])
    plans = []
    for eps, name in runs:
        config = dataclasses.replace(base, epsilon=eps)
        action = run_plan(out / name, config)
        attack = attack_plan(out / name) if action in ("reuse", "resume") else None
        plans.append((eps, name, config, action, attack))

    summaries = []
    for eps, name, config, action, _ in plans:
        run_dir = out / name
        label = "non-private" if math.isinf(eps) else f"ε = {eps:g}"
        if action == "reuse":
            print(f"[demo] {label}: reusing the finished run in {run_dir}")
            summaries.append(RunSummary.load(run_dir))
            continue
        print(f"[demo] {label}: {_DOING[action]} {model} → {run_dir}", flush=True)
        if action == "restart":
            shutil.rmtree(run_dir)
        outputs.claim_dir(name)
        try:
            summaries.append(train_run(config, run_dir, resume=action == "resume",
                                       progress=progress))
        except DPTrainError:
            if not run_dir.exists():  # refused before it wrote anything (e.g. an unknown --model)
                outputs.unclaim_dir(name)
            raise
    from attacks.metrics import fpr_key

    print("[demo] attacking each model: loss-threshold membership inference", flush=True)
    attacked = [attack_run(Path(s.out_dir)) for s in summaries]
    reports = [report for report, _ in attacked]
    print()
    print_table(summaries)
    print("\nWhat an attacker measures (members vs held-out examples, 95% confidence):")
    print_rows(attack_rows(summaries, reports))
    outputs.remove(SUMMARY)  # written last: it marks a finished demo
    outputs.write_bytes(FIGURE, privacy_utility_png(summaries, title=f"{model} on synthetic intents"))
    outputs.write_json(SUMMARY, {
        "model": model,
        "runs": [{"run": str(s.out_dir), "target_epsilon": s.privacy["target_epsilon"],
                  "epsilon": s.privacy["epsilon"], "delta": s.privacy["delta"],
                  "accuracy": s.metrics["accuracy"], "macro_f1": s.metrics["macro_f1"],
                  "seconds": s.seconds,
                  "loss_attack_auc": r["attacks"]["loss"]["auc"],
                  "loss_attack_tpr_at_1pct_fpr": r["attacks"]["loss"]["tpr_at_fpr"][fpr_key(0.01)],
                  "empirical_epsilon_lb": r["empirical_epsilon"]["clopper_pearson"],
                  "attack_report": str(where / "report.json")}
                 for s, (r, where) in zip(summaries, attacked)],
    })
    print(f"\nprivacy–utility figure: {out / FIGURE}; ROC curves: {out}/*/attacks*/roc.png")
    return summaries
