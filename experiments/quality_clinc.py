"""Privacy–utility of the default recipe on a real task: CLINC150 at ε = ∞, 8, 3, 1.

Tried as a new user would: ``dptrain train`` with the packaged all-MiniLM-L6-v2 on
``../shared/data/clinc150/data_full.json`` (150 in-scope intents, 15,000 train / 3,000 validation /
4,500 test; out-of-scope rows dropped by the loader), δ = 1e-5. One run per ε, each in its own run
directory under ``--out`` (finished runs are reused, stopped ones resumed). Writes
``--out/quality.json`` (accuracy, macro-F1, ε spent, wall time per run) and
``--out/privacy_utility.png``.

    python -m experiments.quality_clinc --out runs/clinc
    python -m experiments.quality_clinc --out runs/clinc --epsilons 8 --set lr=5e-4 --set epochs=6
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from dptrain import rundir
from dptrain.features import feature_store
from dptrain.summary import plot_privacy_utility, print_table
from dptrain.trainer import RunSummary, TrainConfig, train_run

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"

# The recipe is dptrain's default (``dptrain.trainer.recipe``): the head of the mean-pooled
# all-MiniLM-L6-v2 trained on cached features, logical batch N/8 capped at 2048, 40 epochs,
# AdamW lr 3e-2, automatic clipping — chosen on public validation splits (experiments/tune_head).
# Only the data, δ and the seed are set here, so this measures what a user gets with no flags.
# The non-private baseline of the same recipe is the linear probe; --baseline-set
# trainable=last-6 --baseline-set lr=1e-3 --baseline-set batch_size=256 --baseline-set epochs=3
# gives full fine-tuning.
RECIPE = TrainConfig(data=str(DEFAULT_DATA), delta=1e-5, seed=0)  # model: auto, as a user gets it


def parse_overrides(items: list[str], recipe: TrainConfig = RECIPE) -> dict:
    """``["lr=5e-4", "epochs=6"]`` → ``{"lr": 0.0005, "epochs": 6.0}``, typed like ``recipe``."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {item}: unknown field {key!r}")
        kind = str(fields[key].type)  # e.g. "float | None": typed by the field, not its default
        if kind.startswith("bool"):
            out[key] = value.lower() in ("1", "true", "yes")
        elif kind.startswith("int"):
            out[key] = int(value)
        elif kind.startswith("float"):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a recipe field (repeatable), e.g. --set lr=5e-4")
    parser.add_argument("--baseline-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="overrides for the ε = ∞ run only")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="the encoder outputs' store (default: OUT/private/features): one "
                        "encoding for every ε, and for later invocations")
    args = parser.parse_args(argv)
    with feature_store(args.feature_cache or args.out / "private" / "features"):
        return _measure(args)


def _measure(args) -> int:
    recipe = dataclasses.replace(RECIPE, **parse_overrides(args.set))
    if recipe.data == str(DEFAULT_DATA) and not DEFAULT_DATA.exists():
        raise SystemExit(f"{DEFAULT_DATA} not found: pass --set data=PATH")
    summaries = []
    for text in args.epsilons.split(","):
        eps = float(text)
        config = dataclasses.replace(recipe, epsilon=eps)
        if math.isinf(eps):
            config = dataclasses.replace(config, **parse_overrides(args.baseline_set))
        run_dir = args.out / ("eps_inf" if math.isinf(eps) else f"eps_{eps:g}")
        if (run_dir / rundir.PRIVACY).exists():
            summaries.append(RunSummary.load(run_dir))
        else:
            resume = (run_dir / rundir.CHECKPOINT).exists()
            print(f"[quality] ε = {eps:g}: {'resuming' if resume else 'training'} → {run_dir}", flush=True)
            summaries.append(train_run(config, run_dir, resume=resume, progress=not args.quiet))
        s = summaries[-1]
        print(f"[quality] ε = {eps:g}: test accuracy {s.metrics['accuracy']:.4f}, "
              f"ε spent {s.privacy['epsilon']}, {s.seconds / 60:.1f} min", flush=True)
    print_table(summaries)
    plot_privacy_utility(args.out / "privacy_utility.png", summaries,
                         title=f"{summaries[0].config.model} on CLINC150")
    rundir.write_json(args.out / "quality.json", {
        "recipe": {k: v for k, v in recipe.to_dict().items() if k != "epsilon"},
        "runs": [{"run": str(s.out_dir), "target_epsilon": s.privacy["target_epsilon"],
                  "epsilon": s.privacy["epsilon"], "delta": s.privacy["delta"],
                  "noise_multiplier": s.privacy["noise_multiplier"], "steps": s.privacy["steps"],
                  "accuracy": s.metrics["accuracy"], "macro_f1": s.metrics["macro_f1"],
                  "validation_accuracy": s.metrics["validation_accuracy"],
                  "minutes": s.seconds / 60,
                  "config": s.config.to_dict()} for s in summaries],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
