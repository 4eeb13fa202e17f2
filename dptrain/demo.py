"""``dptrain demo``: the main job on built-in defaults.

Trains the same classifier three times on the built-in synthetic intents — without privacy, at
ε = 8 and at ε = 1 (δ = 1e-5) — and prints accuracy and ε side by side, with a privacy–utility
figure. Uses the packaged all-MiniLM-L6-v2 when it is installed, else the tiny random BERT.
Finished runs are reused and stopped ones resumed, so running the demo again loses nothing.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from . import rundir
from .models import MINILM, TINY, minilm_available
from .summary import plot_privacy_utility, print_table
from .trainer import RunSummary, TrainConfig, train_run

EPSILONS = (math.inf, 8.0, 1.0)


def demo_config(model: str, quick: bool) -> TrainConfig:
    """The demo's recipe: full fine-tuning, AdamW, automatic clipping, logical batch 256."""
    if quick:
        return TrainConfig(data="synthetic", model=model, synthetic_per_intent=30, epochs=2.0,
                           batch_size=64, lr=2e-3, delta=1e-5, seed=0)
    if model == TINY:
        return TrainConfig(data="synthetic", model=model, synthetic_per_intent=120, epochs=8.0,
                           batch_size=256, lr=3e-3, delta=1e-5, seed=0)
    return TrainConfig(data="synthetic", model=model, synthetic_per_intent=80, epochs=3.0,
                       batch_size=128, lr=1e-3, delta=1e-5, seed=0)


def run_demo(out: Path, model: str | None = None, quick: bool = False, progress: bool = True) -> list[RunSummary]:
    out = Path(out)
    model = model or (MINILM if minilm_available() else TINY)
    base = demo_config(model, quick)
    summaries = []
    for eps in EPSILONS:
        run_dir = out / ("eps_inf" if math.isinf(eps) else f"eps_{eps:g}")
        config = dataclasses.replace(base, epsilon=eps)
        label = "non-private" if math.isinf(eps) else f"ε = {eps:g}"
        if (run_dir / rundir.PRIVACY).exists():
            print(f"[demo] {label}: reusing the finished run in {run_dir}")
            summaries.append(RunSummary.load(run_dir))
            continue
        resume = (run_dir / rundir.CHECKPOINT).exists()
        print(f"[demo] {label}: {'resuming' if resume else 'training'} {model} → {run_dir}", flush=True)
        summaries.append(train_run(config, run_dir, resume=resume, progress=progress))
    print()
    print_table(summaries)
    figure = out / "privacy_utility.png"
    plot_privacy_utility(figure, summaries, title=f"{model} on synthetic intents")
    rundir.write_json(out / "summary.json", {
        "model": model,
        "runs": [{"run": str(s.out_dir), "target_epsilon": s.privacy["target_epsilon"],
                  "epsilon": s.privacy["epsilon"], "delta": s.privacy["delta"],
                  "accuracy": s.metrics["accuracy"], "macro_f1": s.metrics["macro_f1"],
                  "seconds": s.seconds} for s in summaries],
    })
    print(f"\nprivacy–utility figure: {figure}")
    return summaries
