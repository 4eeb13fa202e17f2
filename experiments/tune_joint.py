"""Choose the joint intent + slot heads recipe on public data: the built-in synthetic slots.

Every setting is a full ``dptrain train --task joint`` run (MiniLM, heads on cached token states,
Poisson batches, per-utterance clipping, calibrated noise, PRV accountant) scored on the
*validation* split; the token states are computed once per process, so a setting costs seconds.
Writes ``--out`` (JSON): each setting's validation intent accuracy, slot F1 and frame accuracy,
and the test numbers of the best setting per ε.

    python -m experiments.tune_joint --out runs/tune_joint.json \\
        --grid batch_size=360,720,1440 --grid epochs=40,100 --grid lr=3e-2,1e-1
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import tempfile
import time
from pathlib import Path

from dptrain.features import feature_store
from dptrain.trainer import TrainConfig, train_run
from experiments.quality_clinc import parse_overrides

BASE = TrainConfig(data="synthetic", model="minilm", task="joint", delta=1e-5, seed=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", default="8")
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="the token states' store, kept across invocations "
                        "(default: OUT's name + '-features' beside it)")
    args = parser.parse_args(argv)
    base = dataclasses.replace(BASE, **parse_overrides(args.set, BASE))
    axes = [(g.split("=", 1)[0], g.split("=", 1)[1].split(",")) for g in args.grid]
    rows = []
    store = args.feature_cache or args.out.with_name(args.out.stem + "-features")
    with tempfile.TemporaryDirectory() as tmp, feature_store(store):
        for eps in [float(e) for e in args.epsilons.split(",")]:
            for values in itertools.product(*[v for _, v in axes]):
                sets = [f"{name}={v}" for (name, _), v in zip(axes, values)]
                config = dataclasses.replace(base, epsilon=eps, **parse_overrides(sets, base))
                started = time.monotonic()
                out = Path(tmp) / f"run{len(rows)}"
                m = train_run(config, out, progress=False).metrics
                val = json.loads((out / "curves.json").read_text())[-1]
                rows.append({"epsilon": eps, **dict(s.split("=", 1) for s in sets),
                             "val_intent_accuracy": m.get("validation_intent_accuracy"),
                             "val_slot_f1": m["validation_slot_f1"],
                             "test_intent_accuracy": m.get("intent_accuracy"),
                             "test_slot_f1": m["slot_f1"], "test_frame_accuracy": m["frame_accuracy"],
                             "seconds": time.monotonic() - started, "final_val": val})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "final_val"}), flush=True)
    best = {}
    for r in rows:
        key = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}"
        if key not in best or r["val_slot_f1"] > best[key]["val_slot_f1"]:
            best[key] = r
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"base": {k: str(v) for k, v in base.to_dict().items()},
                                    "grid": dict(axes), "runs": rows, "best": best}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
