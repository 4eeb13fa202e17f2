"""``dptrain sweep``: an ε grid × seeds × recipe variants, from one YAML file to a table, plots
and one HTML page a privacy reviewer can read.

The config (checked once, up front, every problem in one message; unknown keys are refused)::

    name: clinc150-minilm            # free text, shown in the report
    data: ../shared/data/clinc150/data_full.json   # or "synthetic"
    model: minilm                    # any --model of dptrain train
    epsilons: [inf, 8, 4, 2, 1]      # "inf" is the non-private reference of each seed
    seeds: [0, 1, 2]
    recipe: {delta: 1.0e-5}          # TrainConfig fields shared by every cell
    variants:                        # optional: name -> TrainConfig fields (default: one, "default")
      head: {trainable: head}
      full: {trainable: all}
    attacks:                         # optional, each with its options
      mia: {shadows: 8}              # LiRA, RMIA and loss; shadow models shared by the cells that can
      audit: {canaries: 1000}        # natural one-run audit (Steinke et al. 2023), its own run
      white_box: {}                  # white-box audit with gradient canaries, its own run
      extraction: {secrets: "repetitions=1,5,20;per_repetition=2;length=4"}   # planted in the cell

Each cell (variant, seed, ε) is one ``train_run`` in ``DIR/cells/<variant>/seed<s>/eps<ε>``, with
the extraction's secret canaries planted in its training data. The audits need their own runs
(their canaries would change the model the other numbers describe): ``DIR/audits/…`` and
``DIR/whitebox/…``. The work is a list of jobs in stages — train the cells; then shadow models,
audits and extraction; then membership inference — run by :mod:`experiments.sweep_backends`
(this process, a local process pool, or Ray). A finished job is never redone and a stopped
training resumes from its checkpoint, so a sweep killed at any point continues where it stopped.

Outputs: ``DIR/results.csv`` (one row per cell: ε target and spent, δ, σ, q, steps, accuracy,
macro-F1, worst-class recall and the spread of per-class recall, the negative-flip rate against
the non-private cell of the same variant and seed, the membership attacks' AUC and TPR at low
FPR with their empirical ε, the audits' ε lower bounds, exposure and extraction rate per
repetition count, and seconds per stage; with ``task: joint`` also slot F1, frame accuracy and
the worst slot type's F1, ``accuracy`` being the intent accuracy), ``DIR/timing.json`` (where the
time went), PNG + SVG plots and ``DIR/report.html`` (:mod:`experiments.sweep_report`).

Per test example the sweep keeps only whether each cell got it right
(``cells/.../private/test_correct.npy``), for the flip rates; nothing about training examples.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from dptrain.errors import ConfigError
from dptrain.features import stored_in
from dptrain.rundir import read_json as _read

KEYS = {"name", "data", "model", "epsilons", "seeds", "recipe", "variants", "attacks"}
ATTACK_KEYS = {"mia": {"shadows"}, "audit": {"canaries"}, "white_box": {"canaries"},
               "extraction": {"secrets", "methods"}}
DEFAULT_SECRETS = "repetitions=1,5,20;per_repetition=2;length=4"
"""Secret canaries a sweep plants when ``attacks.extraction`` names none: 4-digit PINs."""
PLAN = "sweep.json"
COMMAND = "dptrain sweep"
TIMING = "timing.json"
STAGES = ("train", "shadows", "audit", "white_box", "extraction", "mia")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str
    data: str
    model: str
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    recipe: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    attacks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def cells(self) -> list[tuple[str, int, float]]:
        """(variant, seed, ε) in run order: the non-private reference of a seed first."""
        order = sorted(self.epsilons, key=lambda e: (not math.isinf(e), -e))
        return [(v, s, e) for v in self.variants for s in self.seeds for e in order]

    def train_config(self, variant: str, seed: int, epsilon: float, *, secrets: bool = True,
                     device: str | None = None):
        """The cell's recipe; with the extraction's secrets planted unless ``secrets`` is False
        (the audits' own runs); on ``device`` when given (where a job runs is not the recipe)."""
        from dptrain.trainer import TrainConfig

        fields = {"data": self.data, "model": self.model, **self.recipe, **self.variants[variant],
                  "epsilon": epsilon, "seed": seed}
        if device is not None:
            fields["device"] = device
        if "extraction" in self.attacks:
            fields["secrets"] = self.secrets if secrets else None
        return TrainConfig(**fields)

    @property
    def secrets(self) -> str | None:
        options = self.attacks.get("extraction")
        return None if options is None else options.get("secrets", DEFAULT_SECRETS)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "data": self.data, "model": self.model,
                "epsilons": ["inf" if math.isinf(e) else e for e in self.epsilons],
                "seeds": list(self.seeds), "recipe": self.recipe, "variants": self.variants,
                "attacks": self.attacks}


def load_config(source: str | Path | dict) -> SweepConfig:
    """Read and check a sweep config (a YAML/JSON file or a dict); every problem in one message."""
    import yaml

    from dptrain.trainer import TrainConfig

    if isinstance(source, dict):
        raw, where = source, "the sweep config"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file.")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
        where = f"--config {path}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values.")
    problems = [f"unknown key {k!r} (allowed: {', '.join(sorted(KEYS))})" for k in raw if k not in KEYS]
    for key in ("data", "epsilons", "seeds"):
        if key not in raw:
            problems.append(f"{key!r} is missing")
    epsilons, seeds = [], []
    for key in ("epsilons", "seeds"):
        if key in raw and not isinstance(raw[key], list):
            problems.append(f"{key} must be a list, e.g. {key}: [{raw[key]}]")
    from dptrain.accounting import MAX_TARGET_EPSILON

    for e in _listed(raw.get("epsilons")):
        if isinstance(e, str) and e.strip().lower() in ("inf", "infinity"):
            epsilons.append(math.inf)
        elif (isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e <= MAX_TARGET_EPSILON):
            epsilons.append(float(e))
        else:
            problems.append(f"epsilons: {e!r} is not a number in (0, {MAX_TARGET_EPSILON:g}] or 'inf'")
    if "epsilons" in raw and not raw["epsilons"]:
        problems.append("epsilons is empty")
    for s in _listed(raw.get("seeds")):
        if isinstance(s, int) and not isinstance(s, bool):
            seeds.append(s)
        else:
            problems.append(f"seeds: {s!r} is not an integer")
    if len(set(epsilons)) != len(epsilons) or len(set(seeds)) != len(seeds):
        problems.append("epsilons and seeds must not repeat")
    recipe = raw.get("recipe") or {}
    variants = raw.get("variants") or {"default": {}}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "model", "epsilon", "seed"}
    for label, overrides in [("recipe", recipe)] + [(f"variants.{k}", v) for k, v in
                                                    (variants.items() if isinstance(variants, dict) else [])]:
        if not isinstance(overrides, dict):
            problems.append(f"{label} must be a mapping of recipe fields")
            continue
        problems += [f"{label}: unknown field {k!r}" for k in overrides if k not in fields]
    if not isinstance(variants, dict):
        problems.append("variants must map names to recipe fields")
    attacks = raw.get("attacks") or {}
    if not isinstance(attacks, dict):
        problems.append("attacks must map mia / white_box to their options")
        attacks = {}
    for name, options in attacks.items():
        if name not in ATTACK_KEYS:
            problems.append(f"attacks: unknown attack {name!r} (allowed: {', '.join(sorted(ATTACK_KEYS))})")
            continue
        options = options or {}
        if not isinstance(options, dict):
            problems.append(f"attacks.{name} must be a mapping")
            continue
        problems += [f"attacks.{name}: unknown option {k!r}" for k in options if k not in ATTACK_KEYS[name]]
        for key, low in (("shadows", 2), ("canaries", 2)):
            value = options.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                problems.append(f"attacks.{name}.{key} must be an integer >= {low}, got {value!r}")
            elif key == "shadows" and value is not None and value % 2:
                problems.append(f"attacks.{name}.shadows must be even (every example is IN for "
                                f"exactly half of the shadow models), got {value}")
        if name == "extraction":
            problems += _extraction_problems(options, recipe, variants)
    if not problems:
        for variant in variants:  # each recipe is checked by TrainConfig itself
            task = {**recipe, **variants[variant]}.get("task", "intent")
            if task == "slots":  # the plots and the reading follow the intent accuracy
                problems.append(f"variants.{variant}: task 'slots': sweeps train intent "
                                "classifiers or joint models (task: joint); train, attack and "
                                "audit a slots-only model one run at a time")
                continue
            try:
                TrainConfig(**{"data": str(raw["data"]), "model": str(raw.get("model", "minilm")),
                               **recipe, **variants[variant], "epsilon": 1.0})
            except (ConfigError, TypeError) as exc:
                problems.append(f"variants.{variant}: {exc}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ".")
    return SweepConfig(name=str(raw.get("name", "sweep")), data=_where(raw["data"]),
                       model=str(raw.get("model", "minilm")), epsilons=tuple(epsilons),
                       seeds=tuple(seeds), recipe=dict(recipe),
                       variants={str(k): dict(v) for k, v in variants.items()},
                       attacks={str(k): dict(v or {}) for k, v in attacks.items()})


def _listed(value) -> list:
    return value if isinstance(value, list) else []


def _where(path) -> str:
    """A data path as every later run of the sweep will see it: resolved once, against the
    directory the sweep runs from (as ``dptrain train --data`` is), so that rerunning the same
    command, or the same config with the absolute path written out, is the same sweep."""
    text = str(path)
    if text == "synthetic":
        return text
    return str(Path(text).expanduser().resolve())


def _extraction_problems(options: dict[str, Any], recipe: Any, variants: Any) -> list[str]:
    from attacks.extraction import METHODS
    from dptrain.secret_canaries import parse_spec

    problems = []
    planted = [label for label, fields in [("recipe", recipe)] + list(
        variants.items() if isinstance(variants, dict) else []) if isinstance(fields, dict)
        and fields.get("secrets") is not None]
    if planted:
        problems.append(f"{', '.join(planted)} plant secrets and attacks.extraction does too: "
                        "give them once, as attacks.extraction.secrets")
    try:
        parse_spec(options.get("secrets", DEFAULT_SECRETS))
    except ConfigError as exc:
        problems.append(f"attacks.extraction.secrets: {str(exc).rstrip('.')}")
    methods = options.get("methods", ["enumerate"])
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods):
        problems.append(f"attacks.extraction.methods must be a list of {', '.join(METHODS)}, "
                        f"got {methods!r}")
    return problems


def _tag(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def cell_dir(out: Path, variant: str, seed: int, epsilon: float) -> Path:
    return _cell_path(out, "cells", (variant, seed, epsilon))


def _cell_path(out: Path, kind: str, cell: tuple[str, int, float]) -> Path:
    """Where a cell's own run (kind "cells") or one of its audits ("audits", "whitebox") lives."""
    variant, seed, eps = cell
    return Path(out) / kind / variant / f"seed{seed}" / f"eps{_tag(eps)}"


def _differences(saved, config) -> str:
    """The fields in which a run's saved config departs from the cell's recipe. A field the
    recipe leaves to the trainer (None or 'auto') matches whatever the trainer chose and
    recorded: the choice follows from the other fields and the data."""
    from dptrain.trainer import TrainConfig

    differ = []
    for f in dataclasses.fields(TrainConfig):
        want, got = getattr(config, f.name), getattr(saved, f.name)
        if want is None or want == "auto" or got == want or f.name == "device":  # where, not what
            continue
        differ.append(f"{f.name} {got!r} instead of {want!r}")
    return ", ".join(differ)


def run_plan(run_dir: Path, config) -> str:
    """What a sweep does with one of its cell directories: 'train' (there is none), 'reuse' (a
    finished run), 'resume' (a checkpoint) or 'restart' (stopped before its first checkpoint).

    Only directories the sweep made itself come here. A finished or stopped run of another
    recipe is refused, never mixed in.
    """
    from dptrain import rundir
    from dptrain.trainer import TrainConfig

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
    differences = _differences(TrainConfig.saved(saved["config"]), config)
    if differences:
        raise ConfigError(
            f"{run_dir} holds a {'finished' if finished else 'stopped'} run of another recipe "
            f"({differences}); a sweep does not mix recipes: choose another --out, or rerun "
            "with the same configuration (the demo: the same --model and --quick)."
        )
    return "reuse" if finished else "resume"


# --------------------------------------------------------------------------------------------
# Jobs: each reads and writes files under the sweep directory only, and does nothing when done
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of a sweep's work, small and picklable (for process pools and Ray)."""

    stage: str
    out: str
    config: dict
    cell: tuple[str, int, float]
    shadow: int = -1  # stage "shadows": which shadow model of the cell's cache
    device: str = "auto"  # where it runs (not part of the sweep's identity)

    @property
    def name(self) -> str:
        variant, seed, eps = self.cell
        name = f"{self.stage} {variant}/seed{seed}/ε={_tag(eps)}"
        return name + (f" #{self.shadow}" if self.stage == "shadows" else "")


def run_job(job: Job) -> str:
    """Do the job unless it is done; say what it did: "reused" (nothing), "ran", "resumed"
    (from a checkpoint) or "restarted" (stopped before its first checkpoint: from scratch)."""
    cfg = load_config(job.config)
    out = Path(job.out)
    return _STAGE_RUNNERS[job.stage](cfg, out, job)


def _train_cell(cfg: SweepConfig, out: Path, job: Job) -> str:
    import shutil

    from dptrain.trainer import train_run

    where = cell_dir(out, *job.cell)
    recipe = cfg.train_config(*job.cell, device=job.device)
    action = run_plan(where, recipe)  # reuse, resume, or restart from scratch
    if action == "reuse":
        return "reused"
    if action == "restart":
        shutil.rmtree(where)
    where.parent.mkdir(parents=True, exist_ok=True)
    summary = train_run(recipe, where, resume=action == "resume", progress=False)
    if summary.test_correct is not None:
        from dptrain import rundir

        buf = io.BytesIO()
        np.save(buf, summary.test_correct)
        rundir.write_bytes_atomic(where / "private" / "test_correct.npy", buf.getvalue())
    return {"train": "ran", "resume": "resumed", "restart": "restarted"}[action]


def _train_shadow(cfg: SweepConfig, out: Path, job: Job) -> str:
    from attacks.shadows import load_target, train_shadow

    target = load_target(cell_dir(out, *job.cell))
    state = train_shadow(target, cfg.attacks["mia"].get("shadows", 8), job.shadow,
                         root=out / "shadows", device=job.device)
    return {"finished": "reused", "new": "ran", "stopped": "resumed", "stale": "restarted"}[state]


def _membership(cfg: SweepConfig, out: Path, job: Job) -> str:
    """LiRA, RMIA and loss on the cell; shadows come from the sweep's one cache (trained by the
    shadow jobs before, so this only scores)."""
    from attacks.membership import run_membership_inference

    cell = cell_dir(out, *job.cell)
    if (cell / "attacks" / "report.json").exists():
        return "reused"
    run_membership_inference(cell, cell / "attacks", n_shadows=cfg.attacks["mia"].get("shadows", 8),
                             shadow_dir=out / "shadows", progress=False, device=job.device)
    return "ran"


def _natural_audit(cfg: SweepConfig, out: Path, job: Job) -> str:
    """The one-run audit with natural canaries (its own run); a stopped one is resumed."""
    import shutil

    from attacks.audit_run import PLAN as AUDIT_PLAN, REPORT as AUDIT_REPORT, AuditRunOptions, \
        resume_audit, run_audit

    where = _cell_path(out, "audits", job.cell)
    if (where / AUDIT_REPORT).exists():
        return "reused"
    if (where / AUDIT_PLAN).exists():
        resume_audit(where, progress=False)
        return "resumed"
    if where.exists():
        shutil.rmtree(where)  # the sweep's own audit, stopped before it wrote its plan
    where.parent.mkdir(parents=True, exist_ok=True)
    run_audit(cfg.train_config(*job.cell, secrets=False, device=job.device), where,
              AuditRunOptions(canaries=cfg.attacks["audit"].get("canaries")), progress=False)
    return "ran"


def _white_box(cfg: SweepConfig, out: Path, job: Job) -> str:
    """A white-box audit of the cell's recipe (its own training run with gradient canaries).
    One that stopped cannot resume (its coins must stay unused) and starts again."""
    import shutil

    from attacks.whitebox_audit import WhiteBoxOptions, run_white_box_audit

    where = _cell_path(out, "whitebox", job.cell)
    if (where / "report.json").exists():
        return "reused"
    restarted = where.exists()
    if restarted:
        shutil.rmtree(where)
    where.parent.mkdir(parents=True, exist_ok=True)
    run_white_box_audit(cfg.train_config(*job.cell, secrets=False, device=job.device), where,
                        WhiteBoxOptions(canaries=cfg.attacks["white_box"].get("canaries")),
                        progress=False)
    return "restarted" if restarted else "ran"


def _extraction(cfg: SweepConfig, out: Path, job: Job) -> str:
    """Rank and recover every secret planted in the cell (white-box: the attacker holds the
    weights and knows each secret's prefix, length, candidates and label)."""
    from attacks.extraction import run_extraction

    cell = cell_dir(out, *job.cell)
    if (cell / "extraction" / "report.json").exists():
        return "reused"
    run_extraction(cell, cell / "extraction", methods=cfg.attacks["extraction"].get(
        "methods", ["enumerate"]), progress=False)
    return "ran"


_STAGE_RUNNERS = {"train": _train_cell, "shadows": _train_shadow, "audit": _natural_audit,
                  "white_box": _white_box, "extraction": _extraction, "mia": _membership}


def plan_jobs(cfg: SweepConfig, out: Path, stage: str, device: str = "auto") -> list[Job]:
    """The jobs of one stage. Shadow jobs need the cells trained: one job per shadow model of
    each distinct cache (cells whose recipe and population agree share their shadows)."""
    base = {"out": str(out), "config": cfg.to_dict(), "device": device}
    cells = cfg.cells()
    if stage == "train":
        return [Job("train", cell=c, **base) for c in cells]
    wanted = {"audit": "audit", "white_box": "white_box", "extraction": "extraction", "mia": "mia",
              "shadows": "mia"}[stage]
    if wanted not in cfg.attacks:
        return []
    if stage != "shadows":
        return [Job(stage, cell=c, **base) for c in cells]
    from attacks.shadows import cache_key, load_target

    first: dict[str, tuple[str, int, float]] = {}
    for c in cells:
        first.setdefault(cache_key(load_target(cell_dir(out, *c))), c)
    k = cfg.attacks["mia"].get("shadows", 8)
    return [Job("shadows", cell=c, shadow=i, **base) for c in first.values() for i in range(k)]


@stored_in("out_dir")  # one feature store for every cell, attack and audit of the sweep
def run_sweep(config: str | Path | dict | SweepConfig, out_dir: str | Path, *,
              progress: bool = True, workers: int = 1, backend: str = "local",
              threads_per_job: int | None = None, ray_address: str | None = None,
              command: str = COMMAND, device: str = "auto") -> list[dict[str, Any]]:
    """Run (or continue) every job, then write results.csv, timing.json, the plots and report.html.

    ``workers``/``backend``/``threads_per_job``/``ray_address``: where the jobs run
    (:mod:`experiments.sweep_backends`). ``command`` names the writer in the directory's
    manifest (:mod:`dptrain.outputs`): a sweep replaces only what it wrote itself. Everything
    that can be refused — the config, the options, a foreign file in the way, a model or data
    that does not load — is refused before anything is written. Returns one row per cell.
    """
    import time

    from dptrain.device import check_spelling, resolve
    from dptrain.outputs import OutputDir

    from experiments import sweep_report
    from experiments.sweep_backends import Executor, check

    cfg = config if isinstance(config, SweepConfig) else load_config(config)
    check(backend, workers, threads_per_job)
    if backend == "local":  # where the jobs run: this machine's device, checked now
        resolve(device, "fp32", private=False)
    else:  # on Ray, each node's when its job starts
        check_spelling(device, "auto")
    outputs = OutputDir(out_dir, command)
    out = outputs.path
    dirs = [d for d, needs in (("cells", None), ("shadows", "mia"), ("audits", "audit"),
                               ("whitebox", "white_box")) if needs is None or needs in cfg.attacks]
    outputs.check(files=(PLAN, TIMING) + sweep_report.FILES, dirs=dirs)
    same_plan = outputs.owns(PLAN) and _read(out / PLAN) == cfg.to_dict()
    if outputs.owns(PLAN) and not same_plan and _started(out):
        raise ConfigError(f"--out {out} holds a different sweep ({PLAN} differs); continue it "
                          "with its own config or choose a new directory.")
    if not same_plan:  # a new sweep, or a plan nothing was trained for yet
        preflight(cfg)
        outputs.write_json(PLAN, cfg.to_dict())
    for d in dirs:
        outputs.claim_dir(d)

    stages: dict[str, dict[str, Any]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # every job is known up front but the shadows' (cells that share a population share
        # them: known once the cells are trained); until then count K per cell, an upper bound
        per_cell = 1 + sum(stage in cfg.attacks for stage in ("audit", "white_box", "extraction", "mia"))
        guessed_shadows = len(cfg.cells()) * cfg.attacks["mia"].get("shadows", 8) if "mia" in cfg.attacks else 0
        bar = tqdm(total=len(cfg.cells()) * per_cell + guessed_shadows, desc="sweep", unit="job",
                   dynamic_ncols=True)
    with Executor(backend, workers, threads_per_job, ray_address) as executor:
        if bar is not None:
            bar.write(f"[sweep] {len(cfg.cells())} cells; jobs run in {executor.describe()}")
        for stage in STAGES:
            jobs = plan_jobs(cfg, out, stage, device)
            if not jobs:
                continue
            started, ran = time.monotonic(), []

            def done(job: Job, what: str) -> None:
                ran.append(what != "reused")
                if what in ("resumed", "restarted"):  # what a rerun after a crash did
                    line = f"[sweep] {job.name}: {what}" + (
                        " (it stopped before its first checkpoint)" if what == "restarted" else
                        " (from its checkpoint)")
                    if bar is None:
                        print(line, flush=True)
                    else:
                        bar.write(line)
                if bar is not None:
                    bar.set_description(f"sweep: {stage}")
                    bar.set_postfix_str(f"{job.name} {what}", refresh=False)
                    bar.update(1)

            if bar is not None and stage == "shadows":
                bar.total += len(jobs) - guessed_shadows
                bar.refresh()
            executor.map(run_job, jobs, done)
            stages[stage] = {"jobs": len(jobs), "ran": sum(ran),
                             "wall_seconds": time.monotonic() - started}
    if bar is not None:
        bar.close()
    started = time.monotonic()
    rows = collect_rows(cfg, out)
    work = work_seconds(cfg, out, rows)
    sweep_report.write_all(outputs, cfg, rows, per_class_points(cfg, out), work)
    stages["report"] = {"jobs": 1, "ran": 1, "wall_seconds": time.monotonic() - started}
    outputs.write_json(TIMING, {
        "description": "where the sweep's time went: work_seconds adds up every job's own "
                       "seconds as its run directory and reports record them (so it survives "
                       "a restart); wall_seconds is this invocation's, which skips finished jobs",
        "backend": executor.describe(), "this_invocation": stages, "work_seconds": work,
    })
    return rows


def _started(out: Path) -> bool:
    """Whether any job of the sweep in ``out`` has written anything (a plan alone can still be
    corrected)."""
    return any(any(p.iterdir()) for p in (out / d for d in ("cells", "shadows", "audits", "whitebox"))
               if p.is_dir())


def preflight(cfg: SweepConfig) -> None:
    """Load every model and data source of the sweep once (no training), and check what needs
    the data's size (δ < 1/N, audit canaries ≤ N), so that a typo in a path or a value out of
    range is refused before the sweep writes anything."""
    from dptrain.data import load_intent_data
    from dptrain.models import load_model

    seen = set()
    for variant in cfg.variants:
        recipe = cfg.train_config(variant, cfg.seeds[0], cfg.epsilons[0])
        key = (recipe.task, recipe.data, recipe.model, recipe.pooling, recipe.text_column,
               recipe.label_column, recipe.delta)
        if key in seen:
            continue
        seen.add(key)
        if recipe.task == "joint":  # the joint trainer's reader (SNIPS layout, token/tag rows)
            from dptrain.slot_data import load_slot_data
            from dptrain.slot_trainer import load_encoder

            data = load_slot_data(recipe.data, seed=recipe.seed,
                                  synthetic_per_intent=recipe.synthetic_per_intent)
        else:
            data = load_intent_data(recipe.data, text_column=recipe.text_column,
                                    label_column=recipe.label_column, seed=recipe.seed,
                                    synthetic_per_intent=recipe.synthetic_per_intent)
        n = len(data.train)
        if recipe.delta is not None and not recipe.delta < 1.0 / n:
            raise ConfigError(f"variants.{variant}: delta must be < 1/N = {1.0 / n:.3g} for the "
                              f"{n} training examples of {recipe.data}, got {recipe.delta:g}.")
        canaries = cfg.attacks.get("audit", {}).get("canaries")  # natural canaries: rows of N
        if canaries is not None and canaries > n:
            raise ConfigError(f"attacks.audit.canaries must be at most the {n} training "
                              f"examples of {recipe.data}, got {canaries}.")
        if recipe.task == "joint":
            load_encoder(recipe.model)
        else:
            load_model(recipe.model, data.num_labels, data.label_names, recipe.pooling)


# --------------------------------------------------------------------------------------------
# Rows: everything read back from the files the jobs wrote
# --------------------------------------------------------------------------------------------


def collect_rows(cfg: SweepConfig, out: Path) -> list[dict[str, Any]]:
    from dptrain.trainer import RunSummary

    correct = {}
    for c in cfg.cells():
        kept = cell_dir(out, *c) / "private" / "test_correct.npy"
        correct[c] = np.load(kept) if kept.exists() else None
    rows = []
    for c in cfg.cells():
        where = cell_dir(out, *c)
        row = _row(*c, RunSummary.load(where), correct)
        row["train_seconds"] = row.pop("seconds")
        if "mia" in cfg.attacks:
            row.update(_membership_fields(where / "attacks" / "report.json"))
        if "audit" in cfg.attacks:
            row.update(_audit_fields(_cell_path(out, "audits", c)))
        if "white_box" in cfg.attacks:
            row.update(_white_box_fields(_cell_path(out, "whitebox", c) / "report.json"))
        if "extraction" in cfg.attacks:
            row.update(_extraction_fields(where / "extraction" / "report.json"))
        rows.append(row)
    return rows


def _membership_fields(report_path: Path) -> dict[str, Any]:
    from attacks.metrics import fpr_key

    report = _read(report_path)
    attacks = report["attacks"].values()
    return {
        "mia_best_auc": max(a["auc"] for a in attacks),
        "mia_tpr_at_0.1%": max(a["tpr_at_fpr"][fpr_key(0.001)] for a in attacks),
        "mia_tpr_at_1%": max(a["tpr_at_fpr"][fpr_key(0.01)] for a in attacks),
        "mia_epsilon_lb_cp": report["empirical_epsilon"]["clopper_pearson"],
        "mia_epsilon_lb_gdp": report["empirical_epsilon"]["gdp"],
        "mia_seconds": report.get("seconds"),
    }


def _audit_fields(where: Path) -> dict[str, Any]:
    from attacks.audit_run import REPORT as AUDIT_REPORT, RUN
    from dptrain.trainer import RunSummary

    report = _read(where / AUDIT_REPORT)
    return {"audit_epsilon_lb": report["one_run"]["epsilon_lb"],
            "audit_seconds": RunSummary.load(where / RUN).seconds}


def _white_box_fields(report_path: Path) -> dict[str, Any]:
    report = _read(report_path)
    seconds = report.get("seconds", {})
    return {"whitebox_epsilon_lb": report["epsilon_lb"],
            "whitebox_seconds": sum(v for v in seconds.values() if isinstance(v, (int, float)))}


def _extraction_fields(report_path: Path) -> dict[str, Any]:
    """Per repetition count R: mean exposure (bits) and the share of secrets recovered exactly
    (by enumeration when it ran, else by the relaxation); uncalibrated scores."""
    report = _read(report_path)
    fields: dict[str, Any] = {"extraction_seconds": report.get("seconds")}
    for r, entry in report["by_repetitions"].items():
        raw = entry.get("raw", {})
        method = raw.get("enumeration") or raw.get("relaxation") or {}
        fields[f"exposure_r{r}"] = raw.get("mean_exposure")
        fields[f"extracted_r{r}"] = method.get("exact_match_rate")
    return fields


def per_class_points(cfg: SweepConfig, out: Path) -> list[dict[str, Any]]:
    """Per private cell and class: the class's training examples and the recall it lost against
    the non-private cell of the same variant and seed (Bagdasaryan et al. 2019: DP costs the
    small classes most)."""
    from dptrain.data import load_intent_data
    from dptrain.trainer import RunSummary

    sizes: dict[tuple, dict[str, int]] = {}
    points = []
    for variant, seed, eps in cfg.cells():
        if math.isinf(eps) or math.inf not in cfg.epsilons:
            continue
        recipe = cfg.train_config(variant, seed, eps)
        if recipe.task != "intent":  # per intent class; joint rows carry the worst slot type F1
            continue
        key = (recipe.data, recipe.seed, recipe.synthetic_per_intent, recipe.text_column,
               recipe.label_column)
        if key not in sizes:
            data = load_intent_data(recipe.data, text_column=recipe.text_column,
                                    label_column=recipe.label_column, seed=recipe.seed,
                                    synthetic_per_intent=recipe.synthetic_per_intent)
            counts = np.bincount(data.train.labels, minlength=len(data.label_names))
            sizes[key] = {name: int(c) for name, c in zip(data.label_names, counts)}
        ref = RunSummary.load(cell_dir(out, variant, seed, math.inf)).metrics.get("per_class", {})
        mine = RunSummary.load(cell_dir(out, variant, seed, eps)).metrics.get("per_class", {})
        for name, size in sizes[key].items():
            if name in ref and name in mine and mine[name].get("support", 0) > 0:
                points.append({"variant": variant, "seed": seed, "target_epsilon": eps,
                               "class": name, "train_size": size,
                               "recall_loss": ref[name]["recall"] - mine[name]["recall"]})
    return points


def work_seconds(cfg: SweepConfig, out: Path, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of work per stage, from what the runs and reports recorded."""
    from dptrain.trainer import RunSummary

    total = {"train": sum(r["train_seconds"] for r in rows)}
    for stage, key in (("mia", "mia_seconds"), ("audit", "audit_seconds"),
                       ("white_box", "whitebox_seconds"), ("extraction", "extraction_seconds")):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            total[stage] = float(sum(values))
    shadows = out / "shadows"
    if shadows.is_dir():
        total["shadows"] = float(sum(RunSummary.load(p.parent).seconds
                                     for p in shadows.glob("*/shadow-*/privacy.json")))
    return total


def _row(variant, seed, eps, summary, correct) -> dict[str, Any]:
    m, p = summary.metrics, summary.privacy
    recalls = [c["recall"] for c in m.get("per_class", {}).values() if c.get("support", 0) > 0]
    ref = correct.get((variant, seed, math.inf))
    mine = correct.get((variant, seed, eps))
    flips = (float(np.mean(ref & ~mine)) if ref is not None and mine is not None
             and ref.shape == mine.shape else float("nan"))
    return {
        "variant": variant, "seed": seed, "target_epsilon": eps,
        "epsilon": float(p["epsilon"]), "delta": p.get("delta"),
        "noise_multiplier": p.get("noise_multiplier"), "sample_rate": p.get("sample_rate"),
        "steps": p.get("steps"), "accuracy": float(m["accuracy"]),
        "macro_f1": float(m.get("macro_f1", float("nan"))),  # (intent classifiers)
        "worst_class_recall": min(recalls) if recalls else float("nan"),
        "class_recall_spread": (max(recalls) - min(recalls)) if recalls else float("nan"),
        "negative_flip_rate": flips, "seconds": float(summary.seconds),
        **({"slot_f1": float(m["slot_f1"]), "frame_accuracy": float(m["frame_accuracy"]),
            "worst_slot_type_f1": min((t["f1"] for t in m.get("per_type", {}).values()
                                       if t.get("support", 0) > 0), default=float("nan"))}
           if "slot_f1" in m else {}),  # joint models: accuracy is the intent accuracy
    }


