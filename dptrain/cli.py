"""The ``dptrain`` command line: ``train``, ``demo`` (and the attack commands).

Bad input — a missing file, an unknown column, an impossible ε, an unknown model — prints one
line on stderr and exits with code 2; nothing already in the output directory is touched.
The ``train`` flags are generated from :class:`~dptrain.trainer.TrainConfig`, the one source of
truth for options in Python, JSON and on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import logging
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import rundir

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error of the tool."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _claim_flags(parser) -> None:
    """--claimed-epsilon and --delta: what the trainer of a model trained elsewhere claims."""
    parser.add_argument("--claimed-epsilon", type=_number, default=None,
                        help="with --model: the ε its trainer claims, to test against")
    parser.add_argument("--delta", type=_number, default=None, help="with --model: the δ of that claim")


def _number(text: str) -> float:
    """A float; infinity only when written as 'inf' (``1e400`` would overflow to it, and an
    infinite ε means no privacy at all), never NaN."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if math.isinf(value) and text.strip().lstrip("+-").lower() not in ("inf", "infinity"):
        raise argparse.ArgumentTypeError(f"{text!r} is too large to be a number here (write "
                                         "'inf' if you mean infinity)")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


_PARSERS: dict[str, Callable[[str], object]] = {"float": _number, "int": _integer, "str": str}


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip: Sequence[str] = ()) -> None:
    """One ``--flag`` per dataclass field, typed from its annotation, help from its metadata."""
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        kind = str(f.type).replace(" | None", "").replace("Optional[", "").rstrip("]")
        shown = f.metadata.get("default_text", f.default)  # the help text itself never says it
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=_PARSERS.get(kind, str),
            default=argparse.SUPPRESS, metavar=f.name.upper(),
            help=f"{f.metadata.get('help', '')} (default: {shown})",
        )


def _config_from(args: argparse.Namespace, config_cls, base=None):
    names = {f.name for f in dataclasses.fields(config_cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if base is not None:
        return dataclasses.replace(base, **given)
    return config_cls(**given)


def build_parser() -> argparse.ArgumentParser:
    from .trainer import TrainConfig

    parser = _Parser(prog="dptrain", description="Differentially private fine-tuning of text "
                     "classifiers, and attacks that measure what the models leak.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="fine-tune a classifier with DP-SGD (or epsilon inf)",
                           description="Fine-tune an intent classifier with DP-SGD and write a run "
                           "directory: model, config.json, privacy.json, metrics.json, "
                           "members.json, curves.")
    train.add_argument("--out", required=True, type=Path, help="run directory to create")
    train.add_argument("--resume", action="store_true",
                       help="continue the stopped run in --out (its saved configuration is used)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--nproc", type=_integer, default=1, help="processes on this machine "
                       "(one per GPU): each trains on its part of every Poisson batch, noise "
                       "is drawn once per step (torchrun -m dptrain train ... does the same "
                       "across machines)")
    add_config_flags(train, TrainConfig)
    train.set_defaults(handler=_cmd_train)

    demo = sub.add_parser("demo", help="the whole story on built-in defaults: train at "
                          "epsilon inf, 8 and 1, attack and audit each model, write a report",
                          description="Train the default recipe on the built-in synthetic "
                          "intents without privacy, at epsilon 8 and at epsilon 1, with secret "
                          "canaries planted; attack each model (membership inference, secret "
                          "extraction), audit each recipe (one-run and white-box audits); write "
                          "results.csv, plots and report.html, and print a summary.")
    demo.add_argument("--out", type=Path, default=Path("dptrain-demo"),
                      help="directory for the runs and the report (default: ./dptrain-demo); "
                      "run again after a crash, the demo continues where it stopped")
    demo.add_argument("--workers", type=_integer, default=1,
                      help="jobs at once in a local process pool (default: 1)")
    demo.add_argument("--model", default=None,
                      help="model (default: 'minilm' when installed, the faster story; else 'mpnet'; else 'tiny')")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster version (tests, CI)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)

    audit = sub.add_parser("audit", help="one-run privacy audit: train once with canaries, "
                           "report a lower bound on epsilon",
                           description="Insert M audit canaries (each included with probability "
                           "1/2), train once with the given recipe, score the canaries and report "
                           "a one-run lower bound on epsilon (Steinke, Nasr, Jagielski 2023) in "
                           "DIR/report.json, with DIR/canary_scores.png and the run in DIR/run.")
    audit.add_argument("--out", required=True, type=Path,
                       help="audit directory to create (with --resume: the stopped audit's)")
    audit.add_argument("--resume", action="store_true",
                       help="continue the stopped audit in --out, with its saved recipe, options "
                       "and canaries")
    # Audit options default to "not given", so that --resume can refuse them (see _cmd_audit).
    audit.add_argument("--canaries", type=_integer, default=argparse.SUPPRESS, metavar="M",
                       help="number of audit canaries, >= 2 and at most the natural training "
                       "examples (default: 1000, or the training-set size when smaller)")
    audit.add_argument("--confidence", type=_number, default=argparse.SUPPRESS,
                       help="probability that each reported bound holds, in (0.5, 1) "
                       "(default: 0.95)")
    audit.add_argument("--correction", default=argparse.SUPPRESS,
                       help="how the choice of guess counts and thresholds is paid for: "
                       "bonferroni | split (default: bonferroni)")
    audit.add_argument("--canary-seed", type=_integer, default=argparse.SUPPRESS,
                       help="seed of the canaries' inclusion coins (default: OS entropy; a known "
                       "seed tells anyone which canaries were in: experiments only)")
    audit.add_argument("--white-box", action="store_true",
                       help="audit the guarantee itself: insert M gradient (Dirac) canaries into "
                            "the run's clipping and noise and bound epsilon from every released "
                            "update and from the final weights (default M: 100000, at most the "
                            "trained parameters); exit 1 if a bound exceeds the claimed epsilon")
    audit.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(audit, TrainConfig)
    audit.set_defaults(handler=_cmd_audit)

    check = sub.add_parser(
        "check", help="replay check: does per-sample clipping bound each example's influence "
        "on this model?",
        description="Runs the DP engine on a batch of the built-in synthetic intents and on each "
        "one-example-removed neighbour; the pre-noise sum must move by at most the sensitivity, "
        "each example's contribution must not depend on the others, and must match a plain "
        "per-example backward pass. Exit 0 if it passes, 1 if not. No private data is used.")
    check.add_argument("--model", default="minilm", help="as for train (default: minilm)")
    check.add_argument("--trainable", default="all", help="as for train (default: all)")
    check.add_argument("--pooling", default="auto", help="as for train (default: auto)")
    check.add_argument("--max-grad-norm", default="1.0",
                       help="clipping bound C or 'auto' (default: 1.0)")
    check.add_argument("--batch-size", type=_integer, default=8, help="examples (default: 8)")
    check.set_defaults(handler=_cmd_check)

    sweep = sub.add_parser(
        "sweep", help="privacy-utility sweep: an epsilon grid x seeds x recipe variants from one "
        "YAML config, to results.csv, plots and report.html",
        description="Trains every (variant, seed, epsilon) cell of the config and runs its "
        "attacks and audits (finished jobs are reused, stopped runs resumed: rerun the same "
        "command after a crash), then writes DIR/results.csv, DIR/timing.json, the plots "
        "(.png/.svg) and DIR/report.html. See experiments/configs/ for examples.")
    sweep.add_argument("--config", required=True, type=Path, help="the sweep's YAML file")
    sweep.add_argument("--out", required=True, type=Path, help="sweep directory (created, or "
                       "the same sweep's directory to continue it)")
    sweep.add_argument("--workers", type=_integer, default=1, help="local backend: jobs run "
                       "at once in a process pool (default: 1, in this process: one training "
                       "run already uses every core)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local (default) or ray: one Ray task per job on the cluster named "
                       "by RAY_ADDRESS / --ray-address, else a local Ray (pip install 'dptrain[ray]')")
    sweep.add_argument("--threads-per-job", type=_integer, default=None, help="PyTorch threads "
                       "(Ray: CPUs) per job (default: cores / workers; 1 on Ray)")
    sweep.add_argument("--ray-address", default=None, help="the Ray cluster to join")
    sweep.add_argument("--device", default="auto", help="where every job trains and attacks: "
                       "auto (CUDA when available) | cpu | cuda | cuda:N | mps; not part of the "
                       "sweep's identity (continue it on another device)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(handler=_cmd_sweep)
    attack = sub.add_parser("attack", help="attack a trained run: membership inference, "
                            "secret extraction",
                            description="Attacks that measure what a trained run leaks.")
    attack_sub = attack.add_subparsers(dest="attack", required=True, parser_class=_Parser)
    mia = attack_sub.add_parser(
        "mia", help="membership inference (loss, LiRA, RMIA) with empirical epsilon bounds",
        description="Membership inference against a finished run: the loss attack, LiRA online "
        "and offline, RMIA, with reference (shadow) models trained with the run's own recipe on "
        "random halves of its population (cached and reused). Writes report.json (metrics, "
        "empirical epsilon lower bounds next to the claimed epsilon), roc.png and scores.npz.")
    mia.add_argument("--run", type=Path, default=None, help="finished run directory to attack")
    foreign = mia.add_argument_group(
        "a model trained elsewhere (instead of --run)",
        "an HF sequence-classifier directory, the population and which rows were members; the "
        "loss attack alone unless --reference-recipe names how to train reference models")
    foreign.add_argument("--model", type=Path, default=None, help="classifier directory to attack")
    foreign.add_argument("--data", type=Path, default=None,
                         help="the population, any format train --data reads (rows in file order)")
    foreign.add_argument("--members", type=Path, default=None,
                         help="0-based row numbers of the members: JSON list, {\"member_ids\": "
                              "[...]}, or one per line")
    foreign.add_argument("--text-column", default="text", help="text column of --data")
    foreign.add_argument("--label-column", default="label", help="label column of --data")
    foreign.add_argument("--reference-recipe", type=Path, default=None,
                         help="JSON/YAML of train options (or a run's config.json) for reference "
                              "models: enables LiRA and RMIA")
    _claim_flags(foreign)
    foreign.add_argument("--max-length", type=_integer, default=64,
                         help="truncate texts to this many tokens (default: 64)")
    mia.add_argument("--out", type=Path, default=None,
                     help="directory for the report (default: RUN/attacks); a report this "
                     "command wrote there is replaced, any other file is never overwritten")
    mia.add_argument("--shadows", type=_integer, default=8, metavar="K",
                     help="reference models, even, >= 2 (default: 8)")
    mia.add_argument("--attacks", default=None,
                     help="comma-separated: loss, lira_online, lira_offline, rmia, rmia_offline "
                     "(default: loss,lira_online,lira_offline,rmia; loss alone for --model "
                     "without --reference-recipe)")
    mia.add_argument("--shadow-dir", type=Path, default=None,
                     help="root of the shadow-model cache (default: RUN/../.dptrain-shadows)")
    mia.add_argument("--confidence", type=_number, default=0.95,
                     help="probability that each epsilon bound holds, in (0.5, 1) (default: 0.95)")
    mia.add_argument("--max-eval", type=_integer, default=None, metavar="N",
                     help="evaluate at most N members and N non-members (default: all of the "
                     "smaller group)")
    mia.add_argument("--seed", type=_integer, default=0,
                     help="seed of the shadow assignment, the balancing and RMIA (default: 0)")
    mia.add_argument("--device", default="auto", help="where shadow models train and signals "
                     "are computed: auto (CUDA when available) | cpu | cuda | cuda:N | mps")
    mia.add_argument("--quiet", action="store_true", help="no progress bar")
    mia.set_defaults(handler=_cmd_attack_mia)
    extract = attack_sub.add_parser(
        "extract", help="white-box extraction of the secrets planted with train --secrets",
        description="Rank and recover the secret canaries planted in a run (train --secrets): "
        "exposure (Carlini et al. 2019) and extraction by enumeration and by the ModIvA "
        "relaxation (Parikh et al. 2022), raw and, with --reference, calibrated. Writes "
        "report.json and extraction.png (no secret token is written).")
    extract.add_argument("--run", type=Path, default=None, help="finished run trained with --secrets")
    extract.add_argument("--model", type=Path, default=None,
                         help="instead of --run: a classifier trained elsewhere (with --canaries)")
    extract.add_argument("--canaries", type=Path, default=None,
                         help="with --model: JSON of the secrets in its training data, laid out "
                              "like a run's private/secrets.json")
    _claim_flags(extract)
    extract.add_argument("--out", type=Path, default=None,
                         help="directory for the report (default: RUN/extraction)")
    extract.add_argument("--reference", type=Path, default=None,
                         help="a run (or model directory) trained without the secrets, same "
                         "tokenizer: calibrates every score by subtracting its own")
    extract.add_argument("--methods", default="enumerate,relax",
                         help="comma-separated: enumerate, relax (default: both)")
    extract.add_argument("--max-enumerate", type=_integer, default=1_000_000, metavar="S",
                         help="enumerate spaces up to S candidates exactly; estimate the rank of "
                         "larger ones from --samples random candidates (default: 1000000)")
    extract.add_argument("--samples", type=_integer, default=20_000,
                         help="random candidates for a rank estimate (default: 20000)")
    extract.add_argument("--restarts", type=_integer, default=16,
                         help="relaxation restarts, run as one batch (default: 16)")
    extract.add_argument("--steps", type=_integer, default=100,
                         help="relaxation Adam steps (default: 100)")
    extract.add_argument("--seed", type=_integer, default=0, help="attack seed (default: 0)")
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(handler=_cmd_attack_extract)

    # -v works after the sub-command too (dptrain train -v ...), from one shared definition.
    for command in (*sub.choices.values(), *attack_sub.choices.values()):
        _add_common_flags(command)
    for command in (train, demo, audit, sweep, mia):
        command.add_argument(
            "--feature-cache", type=Path, default=None, metavar="DIR",
            help="a private directory (created 0700) where the frozen encoder's outputs are "
            "kept, so that later commands on the same data do not encode it again (default: "
            "private/features/ of the run, sweep or audit directory; attack mia reads the "
            "run's). It holds functions of the training data: never share it")
    return parser


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every sub-command takes after its name as well as before it. SUPPRESS: a flag not
    repeated after the sub-command must not reset the one given before it."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log more")


def _cmd_train(args: argparse.Namespace) -> int:
    from .summary import print_table
    from .trainer import TrainConfig, train_run

    if args.resume:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        given = sorted(k for k in vars(args) if k in names)
        if given:
            from .errors import ConfigError

            raise ConfigError(
                f"--resume continues with the run's saved configuration; drop "
                f"{', '.join('--' + g.replace('_', '-') for g in given)}."
            )
        config = TrainConfig()
    else:
        config = _config_from(args, TrainConfig)  # bad flags are refused here, before any launch
    from .distributed import init_from_env, launch

    if args.nproc < 1:
        from .errors import ConfigError

        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}.")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .trainer import prepare_out_dir

        prepare_out_dir(args.out, args.resume)  # refuse a taken --out before starting K processes
        argv, skip = [], False
        for token in args.argv:  # the same command without --nproc, in every process
            if skip or token.startswith("--nproc="):
                skip = False
                continue
            skip = token == "--nproc"
            if not skip:
                argv.append(token)
        return launch(args.nproc, argv, resume_hint=f"continue with dptrain train --resume "
                      f"--out {args.out}", verbose=args.verbose)
    dist = init_from_env()  # under torchrun: join the group
    summary = train_run(config, args.out, resume=args.resume,
                        progress=not args.quiet and (dist is None or dist.main))
    if dist is None or dist.main:
        print_table([summary])
        print(f"run written to {summary.out_dir}" + (f" ({dist.world} processes)" if dist else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, model=args.model, quick=args.quick, progress=not args.quiet,
             workers=args.workers)
    return 0


_AUDIT_OPTIONS = {"canaries": "--canaries", "confidence": "--confidence",
                  "correction": "--correction", "canary_seed": "--canary-seed"}


def _cmd_audit(args: argparse.Namespace) -> int:
    from attacks.audit_run import AuditRunOptions, resume_audit, run_audit

    from .trainer import TrainConfig

    if args.white_box:
        return _white_box_audit(args)
    if args.resume:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        given = sorted(k for k in vars(args) if k in names or k in _AUDIT_OPTIONS)
        if given:
            from .errors import ConfigError

            flags = [_AUDIT_OPTIONS.get(g, "--" + g.replace("_", "-")) for g in given]
            raise ConfigError(f"--resume continues the audit with its saved recipe, options and "
                              f"canaries; drop {', '.join(flags)}.")
        outcome = resume_audit(args.out, progress=not args.quiet)
    else:
        options = AuditRunOptions(**{k: getattr(args, k) for k in _AUDIT_OPTIONS if k in args})
        config = _config_from(args, TrainConfig)
        outcome = run_audit(config, args.out, options, progress=not args.quiet)
    for line in outcome.summary:
        print(line)
    print(f"audit written to {outcome.out_dir}")
    return 0


def _white_box_audit(args: argparse.Namespace) -> int:
    from attacks.whitebox_audit import WhiteBoxOptions, run_white_box_audit

    from .errors import ConfigError
    from .trainer import TrainConfig

    if args.resume:
        raise ConfigError("a white-box audit cannot be resumed (its canaries' scores live in "
                          "memory during training); start it again in a new --out.")
    if "correction" in args:
        raise ConfigError("--correction applies to the natural-canary audit; the white-box audit "
                          "always uses Bonferroni over its guess counts.")
    options = WhiteBoxOptions(**{k: getattr(args, k) for k in ("canaries", "confidence", "canary_seed")
                                 if k in args})
    report = run_white_box_audit(_config_from(args, TrainConfig), args.out, options,
                                 progress=not args.quiet)
    for line in report["summary"]:
        print(line)
    print(f"audit written to {args.out}")
    return 1 if report["verdict"] == "refuted" else 0


def _cmd_attack_mia(args: argparse.Namespace) -> int:
    from attacks.membership import run_membership_inference
    from attacks.metrics import fpr_key

    from .summary import print_rows

    from .errors import ConfigError

    attacks = args.attacks.split(",") if args.attacks is not None else None
    if (args.run is None) == (args.model is None):
        which = "neither" if args.run is None else "both"
        raise ConfigError(f"give exactly one of --run (a dptrain run) or --model (a classifier "
                          f"trained elsewhere, with --data and --members); got {which}.")
    if args.model is not None:
        from attacks.foreign import run_foreign_membership_inference

        missing = [flag for flag, value in (("--data", args.data), ("--members", args.members),
                                            ("--out", args.out)) if value is None]
        if missing:
            raise ConfigError(f"--model needs {', '.join(missing)}.")
        report = run_foreign_membership_inference(
            args.model, args.data, args.members, args.out, text_column=args.text_column,
            label_column=args.label_column, reference_recipe=args.reference_recipe,
            n_shadows=args.shadows, attacks=attacks, shadow_dir=args.shadow_dir,
            claimed_epsilon=args.claimed_epsilon, delta=args.delta, confidence=args.confidence,
            max_eval=args.max_eval, max_length=args.max_length, seed=args.seed,
            progress=not args.quiet, device=args.device)
    else:
        foreign_only = [f for f, v in (("--data", args.data), ("--members", args.members),
                                       ("--reference-recipe", args.reference_recipe),
                                       ("--claimed-epsilon", args.claimed_epsilon)) if v is not None]
        if foreign_only:
            raise ConfigError(f"{', '.join(foreign_only)} go with --model, not --run (a run "
                              "directory records its data, members and ε).")
        report = run_membership_inference(
            args.run, args.out, n_shadows=args.shadows,
            attacks=attacks or ["loss", "lira_online", "lira_offline", "rmia"],
            shadow_dir=args.shadow_dir, confidence=args.confidence, max_eval=args.max_eval,
            seed=args.seed, progress=not args.quiet, device=args.device)
    rows = [["attack", "AUC", "TPR@0.1%", "TPR@1%", "TPR@10%", "eps_lb CP", "eps_lb GDP"]]
    for name, a in report["attacks"].items():
        rows.append([name, f"{a['auc']:.3f}",
                     *(f"{a['tpr_at_fpr'][fpr_key(f)]:.1%}" for f in (0.001, 0.01, 0.1)),
                     f"{a['epsilon_lb']['clopper_pearson']:.2f}", f"{a['epsilon_lb']['gdp']:.2f}"])
    print_rows(rows)
    if len(report["attacks"]) > 1:
        print(f"(eps_lb per attack at {report['empirical_epsilon']['confidence']:.0%} confidence "
              "each; the bound below is the best attack's with that confidence split over all "
              f"{len(report['attacks'])}, so it is lower)")
    for line in report["summary"]:
        print(line)
    out = args.out if args.out is not None else args.run / _DEFAULT_OUT["mia"]
    print(f"report written to {out}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.sweep import run_sweep
    from experiments.sweep_report import REPORT, RESULTS, summary_table

    from .summary import print_rows

    rows = run_sweep(args.config, args.out, progress=not args.quiet, workers=args.workers,
                     backend=args.backend, threads_per_job=args.threads_per_job,
                     ray_address=args.ray_address, device=args.device)
    print_rows(summary_table(rows))
    print(f"sweep written to {args.out}: {RESULTS}, timing.json, plots (*.png, *.svg), {REPORT}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import check_model
    from .trainer import clip_bound

    result = check_model(args.model, trainable=args.trainable, pooling=args.pooling,
                         max_grad_norm=clip_bound(args.max_grad_norm), batch_size=args.batch_size)
    for line in result.lines():
        print(line)
    return 0 if result.passed else 1


def _cmd_attack_extract(args: argparse.Namespace) -> int:
    from attacks.extraction import run_extraction

    report = run_extraction(
        args.run, args.out, reference=args.reference, methods=args.methods.split(","),
        max_enumerate=args.max_enumerate, samples=args.samples, restarts=args.restarts,
        steps=args.steps, seed=args.seed, progress=not args.quiet, model_dir=args.model,
        canaries=args.canaries, claimed_epsilon=args.claimed_epsilon, delta=args.delta)
    for line in report["summary"]:
        print(line)
    out = args.out if args.out is not None else args.run / _DEFAULT_OUT["extract"]
    print(f"report written to {out}")
    return 0


_RESUMABLE = {"train": "continue with --resume", "audit": "continue with --resume",
              "demo": "run it again to continue",
              "attack": "run it again to continue: finished shadow models are reused"}


def _command_path(args: argparse.Namespace) -> str:
    """The sub-command as typed, e.g. 'attack mia', for message prefixes."""
    return " ".join(v for v in (args.command, getattr(args, "attack", None)) if v)


_DEFAULT_OUT = {"mia": rundir.ATTACKS, "extract": rundir.EXTRACTION}  # an attack's default: in the run


def _written_dir(args: argparse.Namespace) -> tuple[Path | None, bool]:
    """The directory a command writes (None: it writes nothing), and whether it may be created
    with its parents (an explicit --out) or only inside an existing run (an attack's default)."""
    out = getattr(args, "out", None)
    if out is not None:
        if getattr(args, "resume", False) and not out.is_dir():
            return None, False  # nothing to resume: the command says so, and creates nothing
        return out, True
    sub = getattr(args, "attack", None)
    run = getattr(args, "run", None)
    if sub in _DEFAULT_OUT and run is not None:
        return run / _DEFAULT_OUT[sub], False
    return None, False


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import DPTrainError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    command = _command_path(args)
    try:
        from .features import feature_store
        from .rundir import exclusive

        written, create = _written_dir(args)
        with contextlib.ExitStack() as stack:
            if written is not None:  # one command at a time per directory, across processes
                what = "--out" if create else "the attack directory"
                stack.enter_context(exclusive(written, what, create))
            stack.enter_context(feature_store(getattr(args, "feature_cache", None)))
            return args.handler(args)
    except DPTrainError as exc:
        message = " ".join(str(exc).split())
        if message.endswith("..") and not message.endswith("..."):
            message = message[:-1]  # a quoted reason that ended in its own full stop
        print(f"dptrain {command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        hint = f" ({_RESUMABLE[args.command]})" if args.command in _RESUMABLE else ""
        print(f"dptrain {command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
