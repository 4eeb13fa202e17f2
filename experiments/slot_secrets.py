"""Secrets in slot values vs in sequence classifiers: how much of a planted PIN can be extracted?

The setting of Parikh, Dupuy and Gupta (ACL 2022): an NLU training set holds "my pin code is
4 0 7 2" R times. Two models are trained on the same utterances with the same secrets and the
default recipe of their task: a joint intent + slot model (the value tagged ``B-pin I-pin …``;
the attacker knows the carrier phrase, the slot type and the intent) and an intent classifier
(the attacker knows the carrier phrase and the intent). Each is attacked by exhaustive
enumeration of the value space (``dptrain attack extract``, raw scores: no reference model), at
each ε. Writes ``--out/slot_secrets.json`` (exposure, rank, exact recovery per R, task and ε)
and prints a table.

The intent classifier reads the same utterances as texts (written to ``--out/intents.jsonl``
with their splits, from the public data only; the secrets are planted by the trainer).

    python -m experiments.slot_secrets --out runs/slot_secrets
    python -m experiments.slot_secrets --out runs/slot_secrets_synth --data synthetic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from dptrain import rundir
from dptrain.trainer import RunSummary, TrainConfig, train_run
from experiments.quality_clinc import parse_overrides
from experiments.slots_snips import DEFAULT_DATA

SECRETS = "repetitions=1,10,100;per_repetition=2;length=4"


def intent_view(slot_source: str, out: Path, seed: int) -> str:
    """The slot data as an intent JSONL file with its splits (what the classifier trains on)."""
    from dptrain.data import write_jsonl
    from dptrain.slot_data import as_intent_data, load_slot_data

    path = out / "intents.jsonl"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, as_intent_data(load_slot_data(slot_source, seed=seed)))
    return str(path)


def main(argv=None) -> int:
    from attacks.extraction import run_extraction

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="slot data (default: SNIPS)")
    parser.add_argument("--epsilons", default="inf,8")
    parser.add_argument("--secrets", default=SECRETS)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    base = TrainConfig(data=args.data, model="minilm", delta=1e-5, seed=0, dp_seed=7,
                       secrets=args.secrets)
    base = dataclasses.replace(base, **parse_overrides(args.set, base))
    sources = {"joint": args.data, "intent": intent_view(args.data, args.out, base.seed)}
    rows = []
    for eps in [float(e) for e in args.epsilons.split(",")]:
        for task, data in sources.items():
            out = args.out / f"{task}_eps_{'inf' if math.isinf(eps) else f'{eps:g}'}"
            started = time.monotonic()
            summary = (RunSummary.load(out) if (out / rundir.PRIVACY).exists() else
                       train_run(dataclasses.replace(base, task=task, data=data, epsilon=eps), out,
                                 resume=(out / rundir.CHECKPOINT).exists()))
            report = run_extraction(out, out / "extraction", methods=("enumerate",),
                                    progress=False)
            m = summary.metrics
            for r, stats in report["by_repetitions"].items():
                raw = stats["raw"]
                rows.append({"task": task, "epsilon": eps, "repetitions": int(r),
                             "mean_exposure_bits": raw["mean_exposure"],
                             "median_rank": raw["median_rank"],
                             "exact_recovery": raw["enumeration"]["exact_match_rate"],
                             "token_accuracy": raw["enumeration"]["token_accuracy"],
                             "control_exposure_bits": raw["mean_control_exposure"],
                             "intent_accuracy": m.get("intent_accuracy", m.get("accuracy")),
                             "slot_f1": m.get("slot_f1"),
                             "minutes": (time.monotonic() - started) / 60})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'task':7} {'ε':>5} {'R':>4} {'exposure':>9} {'rank':>7} {'exact':>6} {'tokens':>7} "
          f"{'control':>8}")
    for r in rows:
        print(f"{r['task']:7} {r['epsilon']:>5g} {r['repetitions']:>4} {r['mean_exposure_bits']:>9.2f} "
              f"{r['median_rank']:>7.0f} {r['exact_recovery']:>6.2f} {r['token_accuracy']:>7.2f} "
              f"{r['control_exposure_bits']:>8.2f}")
    (args.out / "slot_secrets.json").write_text(json.dumps(
        {"secrets": args.secrets, "recipe": rundir._jsonable(base.to_dict()), "rows": rows},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
