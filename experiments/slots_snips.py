"""Joint intent + slot models on SNIPS 2017 at several ε, tried as a new user would.

``dptrain train --task joint`` with the default encoder (``--model auto``: all-mpnet-base-v2 when
installed; ``--set model=minilm`` for all-MiniLM-L6-v2) on ``../shared/data/snips/``
(7 intents, the ``train_*_full.json`` files as train with 10% held out as test, the
``validate_*.json`` files as validation; one file is not UTF-8 and is read as Windows-1252),
δ = 1e-5, one run per ε under ``--out`` (finished runs are reused, stopped ones resumed). Writes
``--out/snips.json``: intent accuracy, slot F1, frame accuracy, ε spent and wall time per run.

    python -m experiments.slots_snips --out runs/snips
    python -m experiments.slots_snips --out runs/snips-lora --set trainable=lora --set lr=5e-3 \
        --set batch_size=512 --set epochs=3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from dptrain import rundir
from dptrain.features import feature_store
from dptrain.summary import print_table
from dptrain.trainer import RunSummary, TrainConfig, train_run
from experiments.quality_clinc import parse_overrides

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "snips"
# The default recipe (only the data, the task, δ and the seed are set): what a user gets with no
# flags. The first measurement used LoRA: --set trainable=lora --set lr=5e-3 --set
# batch_size=512 --set epochs=3.
RECIPE = TrainConfig(data=str(DEFAULT_DATA), model="auto", task="joint", delta=1e-5, seed=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", default="inf,8,1")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    recipe = dataclasses.replace(RECIPE, **parse_overrides(args.set, RECIPE))
    summaries, rows = [], []
    with feature_store(args.out / "private" / "features"):  # one encoding for every ε, kept
        for eps in [float(e) for e in args.epsilons.split(",")]:
            _run(recipe, eps, args.out, summaries, rows)
    print_table(summaries)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snips.json").write_text(json.dumps(
        {"recipe": rundir._jsonable(recipe.to_dict()), "runs": rundir._jsonable(rows)}, indent=2) + "\n")
    return 0


def _run(recipe, eps, out_root, summaries, rows) -> None:
    """Train (or reuse, or resume) the run of one ε; append its summary and row."""
    out = out_root / f"eps_{'inf' if math.isinf(eps) else f'{eps:g}'}"
    started = time.monotonic()
    done = (out / rundir.PRIVACY).exists()
    summary = (RunSummary.load(out) if done else
               train_run(dataclasses.replace(recipe, epsilon=eps), out,
                         resume=(out / rundir.CHECKPOINT).exists()))
    summaries.append(summary)
    m, p = summary.metrics, summary.privacy
    rows.append({"run": str(out), "target_epsilon": eps, "epsilon": p["epsilon"],
                 "noise_multiplier": p["noise_multiplier"], "steps": p["steps"],
                 "intent_accuracy": m.get("intent_accuracy"), "slot_f1": m["slot_f1"],
                 "frame_accuracy": m["frame_accuracy"],
                 "minutes": m.get("train_seconds", time.monotonic() - started) / 60})


if __name__ == "__main__":
    raise SystemExit(main())
