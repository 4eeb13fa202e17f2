"""Secret canaries in CLINC150: how much of a 4-digit PIN leaks from MiniLM at each ε.

For each recipe (``head``: the default, head-only on the frozen encoder; ``full``: every
parameter fine-tuned) and each ε, one run is trained on CLINC150 with secrets planted
(``my pin code is d d d d``, R ∈ {1, 5, 20, 100}, ``--per-repetition`` secrets each, each with a
random intent as label), then ``attack extract`` ranks and recovers every secret: exposure,
enumeration and the ModIvA relaxation, raw and calibrated by a reference model trained on the
same data without secrets (the non-private head-only run: same tokenizer, never saw a secret).

    python -m experiments.secrets_clinc --out runs/secrets_clinc
    python -m experiments.secrets_clinc --out runs/secrets_full --recipes full --epsilons inf,8

Writes ``OUT/results-RECIPES.json`` (one row per run and R) and prints a table. Each run directory keeps
its ``extraction/report.json`` and ``extraction.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from dptrain import TrainConfig, train_run

CLINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"


def main(argv=None) -> int:
    from attacks.extraction import run_extraction

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=str(CLINC))
    parser.add_argument("--recipes", default="head", help="comma-separated: head, full")
    parser.add_argument("--epsilons", default="inf,8,1")
    parser.add_argument("--repetitions", default="1,5,20,100")
    parser.add_argument("--per-repetition", type=int, default=2)
    parser.add_argument("--head-dropouts", default="0", help="head recipe: dropout values to try")
    parser.add_argument("--steps", type=int, default=100, help="relaxation steps")
    parser.add_argument("--restarts", type=int, default=16)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = f"repetitions={args.repetitions};per_repetition={args.per_repetition};length=4"
    reference = args.out / "reference_head_inf"
    if not (reference / "privacy.json").exists():
        print("[secrets] reference: head-only, epsilon inf, no secrets", flush=True)
        train_run(TrainConfig(data=args.data, model="minilm", epsilon=math.inf), reference,
                  resume=(reference / "checkpoint").exists(), progress=False)
    rows = []
    for recipe in args.recipes.split(","):
        dropouts = [float(d) for d in args.head_dropouts.split(",")] if recipe == "head" else [None]
        for dropout in dropouts:
            for eps in [float(e) for e in args.epsilons.split(",")]:
                name = f"{recipe}_eps{eps:g}" + ("" if dropout in (None, 0.0) else f"_drop{dropout:g}")
                run = args.out / name
                config = TrainConfig(data=args.data, model="minilm", epsilon=eps,
                                     trainable="head" if recipe == "head" else "all",
                                     head_dropout=dropout, secrets=spec)
                t0 = time.monotonic()
                if not (run / "privacy.json").exists():
                    print(f"[secrets] {name}: training", flush=True)
                    summary = train_run(config, run, resume=(run / "checkpoint").exists(),
                                        progress=False)
                else:
                    from dptrain.trainer import RunSummary

                    summary = RunSummary.load(run)
                train_s = time.monotonic() - t0
                t0 = time.monotonic()
                report = run_extraction(run, reference=reference, steps=args.steps,
                                        restarts=args.restarts, progress=False)
                attack_s = time.monotonic() - t0
                for line in report["summary"]:
                    print(f"[secrets] {name}: {line}", flush=True)
                for r, row in report["by_repetitions"].items():
                    rows.append({"run": name, "recipe": recipe, "head_dropout": dropout,
                                 "epsilon": eps, "accuracy": summary.metrics["accuracy"],
                                 "repetitions": int(r), **row, "train_seconds": train_s,
                                 "attack_seconds": attack_s})
                results = args.out / f"results-{args.recipes.replace(',', '-')}.json"
                results.write_text(json.dumps(rows, indent=2) + "\n")
    print("| run | acc | R | exposure raw / cal. (control) | enum. exact raw / cal. | relax. exact raw / cal. |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        raw, cal = r["raw"], r.get("calibrated", {})
        def rate(kind, method):
            return f"{kind[method]['exact_match_rate']:.2f}" if method in kind else "-"
        print(f"| {r['run']} | {r['accuracy']:.3f} | {r['repetitions']} | "
              f"{raw['mean_exposure']:.1f} / {cal.get('mean_exposure', float('nan')):.1f} "
              f"({raw['mean_control_exposure']:.1f}) | {rate(raw, 'enumeration')} / "
              f"{rate(cal, 'enumeration') if cal else '-'} | {rate(raw, 'relaxation')} / "
              f"{rate(cal, 'relaxation') if cal else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
