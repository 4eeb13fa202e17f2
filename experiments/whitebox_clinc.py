"""White-box audits of real runs: how close one run gets to the claimed ε, and what it costs.

For each ε, one ``dptrain audit --white-box`` of the default recipe (MiniLM head on cached
features, CLINC150, δ = 1e-5) and, for the cost, one plain training run of the same recipe.
Writes ``--out/whitebox.json`` (per ε: claimed ε, f-DP and (ε, δ) bounds for all iterates and the
last iterate, their ratio to the claim, m, seconds with and without canaries)::

    python -m experiments.whitebox_clinc --out runs/whitebox_clinc
    python -m experiments.whitebox_clinc --out runs/wb_full --intents 20 --epsilons inf,8 \\
        --set trainable=all --no-cost
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from attacks.whitebox_audit import WhiteBoxOptions, run_white_box_audit
from dptrain.trainer import train_run

from .quality_clinc import RECIPE, parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", default="inf,8,4,2,1")
    parser.add_argument("--canaries", type=int, default=None, help="default: the audit's own")
    parser.add_argument("--no-cost", action="store_true", help="skip the plain training runs")
    parser.add_argument("--intents", type=int, default=None,
                        help="keep the first K intents (a shorter full fine-tuning run)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; choose a new --out.")
    args.out.mkdir(parents=True)
    recipe = dataclasses.replace(RECIPE, **parse_overrides(args.set))
    if args.intents is not None:
        from .attack_clinc import write_subset

        subset = args.out / f"clinc{args.intents}.json"
        write_subset(Path(recipe.data), args.intents, subset)
        recipe = dataclasses.replace(recipe, data=str(subset.resolve()))
    rows = []
    for eps in (float(e) for e in args.epsilons.split(",")):
        cfg = dataclasses.replace(recipe, epsilon=eps)
        tag = "inf" if math.isinf(eps) else f"{eps:g}"
        report = run_white_box_audit(cfg, args.out / f"audit_eps{tag}",
                                     WhiteBoxOptions(canaries=args.canaries), progress=False)
        row = {"target_epsilon": eps, "claimed_epsilon": report["claimed_epsilon"],
               "m": report["canaries"]["m"], "seconds_with_canaries": report["seconds"]["training_with_canaries"],
               "seconds_bounds": report["seconds"]["bounds"]}
        for view, v in report["views"].items():
            mech = v["mechanism"]["epsilon_lb"] if "mechanism" in v else v["f_dp"]["epsilon_lb"]
            row[view] = {"mechanism": mech, "f_dp": v["f_dp"]["epsilon_lb"], "mu_lb": v["f_dp"]["mu_lb"],
                         "eps_delta": v["eps_delta"]["epsilon_lb"],
                         "ratio": mech / report["claimed_epsilon"] if report["claimed_epsilon"] else None}
        if not args.no_cost:
            started = time.monotonic()
            train_run(cfg, args.out / f"plain_eps{tag}", progress=False)
            row["seconds_plain"] = time.monotonic() - started
            row["cost_ratio"] = (row["seconds_with_canaries"] + row["seconds_bounds"]) / row["seconds_plain"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "whitebox.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
