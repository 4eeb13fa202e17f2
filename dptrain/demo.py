"""``dptrain demo``: the whole story on built-in defaults, in minutes on a laptop's CPU.

One sweep (:mod:`experiments.sweep`) of the default recipe on the built-in synthetic intents at
ε = ∞, 8 and 1 (δ = 1e-5):

1. train each model, with secret canaries (4-digit PINs, planted 1, 5 and 20 times) in its
   training data;
2. attack each as a privacy reviewer would: membership inference (LiRA, RMIA and the loss
   attack, with shadow models shared by the cells), the one-run audit with natural canaries,
   the white-box audit with gradient canaries (each audit in its own run), and extraction of
   the planted secrets;
3. write ``results.csv``, the plots and ``report.html``, and print a summary table that says
   where to look.

Uses the packaged all-MiniLM-L6-v2 when it is installed, else the tiny random BERT. Run again
after a crash, it continues where it stopped (finished runs and reports are reused, stopped runs
resumed); it never overwrites what it did not write (:mod:`dptrain.outputs`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from .encoders import AUTO, MINILM, MPNET, available
from .models import TINY
from .trainer import TrainConfig

EPSILONS = (math.inf, 8.0, 1.0)
DEMO_PREFERENCE = (MINILM, MPNET)
"""The demo's encoder: MiniLM when installed (the whole story in minutes), else mpnet. With
mpnet the same demo took 16 min on 2 shared cores (its shadows and secret extraction run a 110M
model): ``dptrain demo --model mpnet`` shows it; ``dptrain train`` defaults to mpnet."""
COMMAND = "dptrain demo"


def demo_config(model: str, quick: bool) -> TrainConfig:
    """The demo's recipe: AdamW, automatic clipping, Poisson batches; head-only for a packaged
    encoder."""
    if quick:
        return TrainConfig(data="synthetic", model=model, synthetic_per_intent=30, epochs=2.0,
                           batch_size=64, lr=2e-3, delta=1e-5, seed=0)
    if model == TINY:
        return TrainConfig(data="synthetic", model=model, synthetic_per_intent=120, epochs=8.0,
                           batch_size=256, lr=3e-3, delta=1e-5, seed=0)
    # mpnet or MiniLM: exactly what `dptrain train` does with no flags (the head of the mean-pooled
    # encoder on cached features, trainer.recipe's batch, epochs and lr): the demo shows the default.
    return TrainConfig(data="synthetic", model=model, synthetic_per_intent=80, delta=1e-5, seed=0)


def demo_sweep(model: str, quick: bool) -> dict[str, Any]:
    """The demo as a sweep config: the recipe above, three ε, one seed, every attack."""
    recipe = demo_config(model, quick)
    default = TrainConfig(data="synthetic")
    fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name not in ("data", "model", "epsilon", "seed")
              and getattr(recipe, f.name) != getattr(default, f.name)}
    if quick:
        attacks = {"mia": {"shadows": 2}, "audit": {"canaries": 50},
                   "white_box": {"canaries": 5000},
                   "extraction": {"secrets": "repetitions=1,20;per_repetition=1;length=2"}}
    else:
        attacks = {"mia": {"shadows": 8}, "audit": {}, "white_box": {},
                   "extraction": {"secrets": "repetitions=1,5,20;per_repetition=2;length=4"}}
    return {"name": f"dptrain demo: {model} on the built-in synthetic intents"
                    + (" (quick)" if quick else ""),
            "data": "synthetic", "model": model,
            "epsilons": ["inf" if math.isinf(e) else e for e in EPSILONS], "seeds": [recipe.seed],
            "recipe": fields, "attacks": attacks}


def run_demo(out: Path, model: str | None = None, quick: bool = False, progress: bool = True,
             workers: int = 1) -> list[dict[str, Any]]:
    """Train, attack, audit and report; rerun after a crash, it picks up where it stopped.

    Returns the sweep's rows (one per ε) and prints the summary table.
    """
    from experiments.sweep import run_sweep
    from experiments.sweep_report import REPORT, RESULTS, summary_table

    from .summary import print_rows

    out = Path(out)
    if model is None or model == AUTO:  # the faster packaged encoder, else the test model
        model = next((m for m in DEMO_PREFERENCE if available(m)), TINY)
    print(f"[demo] {model} on the built-in synthetic intents at ε = ∞, 8, 1: train with planted "
          "secrets, then membership inference, one-run and white-box audits, secret extraction",
          flush=True)
    rows = run_sweep(demo_sweep(model, quick), out, progress=progress, workers=workers,
                     command=COMMAND)
    print()
    print_rows(summary_table(rows))
    print(f"""
Where to look ({out}):
  {out / REPORT}     the whole story on one page: plots, table, a reading of the numbers
  {out / 'accuracy.png'}    what each ε costs in accuracy
  {out / 'attacks.png'}     how far membership inference gets (chance: TPR = 1% at 1% FPR)
  {out / 'audit.png'}       what the audits prove (a point above the diagonal would be a bug)
  {out / 'extraction.png'}  whether planted secrets can be read back out of the weights
  {out / RESULTS}    every number; timing.json: where the time went""")
    return rows
