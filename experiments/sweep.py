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

Each cell (variant, seed, ε) is one ``train_run`` in ``DIR/cells/<variant>/seed<s>/eps<ε>``;
a finished cell is never retrained and a stopped one resumes from its checkpoint, so a sweep
killed at any point continues where it stopped. Per cell, ``DIR/results.csv`` gets one row:
ε target and spent, δ, σ, q, steps, accuracy, macro-F1, worst-class recall and the spread of
per-class recall, the negative-flip rate against the non-private cell of the same variant and
seed (test examples it gets right and this cell gets wrong: what a team shipping an update
notices), and the cell's training time. ``DIR/accuracy.png``/``.svg`` plot accuracy against ε with
seed error bars and the non-private line; ``DIR/report.html`` is one self-contained page (plots
embedded) with the table, the configuration and a plain-language reading of the numbers.

Per test example the sweep keeps only whether each cell got it right
(``cells/.../private/test_correct.npy``), for the flip rates; nothing about training examples.
Membership attacks, audits and secret extraction per cell are the next step of this runner
(``dptrain attack``/``audit`` run on any cell directory meanwhile).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dptrain.errors import ConfigError

KEYS = {"name", "data", "model", "epsilons", "seeds", "recipe", "variants", "attacks"}
ATTACK_KEYS = {"mia": {"shadows"}, "white_box": {"canaries"}}
RESULTS = "results.csv"
REPORT = "report.html"
PLAN = "sweep.json"
COLUMNS = ("variant", "seed", "target_epsilon", "epsilon", "delta", "noise_multiplier",
           "sample_rate", "steps", "accuracy", "macro_f1", "worst_class_recall",
           "class_recall_spread", "negative_flip_rate", "seconds",
           "mia_best_auc", "mia_tpr_at_0.1%", "mia_tpr_at_1%", "mia_epsilon_lb_cp",
           "mia_epsilon_lb_gdp", "mia_seconds", "whitebox_epsilon_lb", "whitebox_seconds")


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

    def train_config(self, variant: str, seed: int, epsilon: float):
        from dptrain.trainer import TrainConfig

        return TrainConfig(**{"data": self.data, "model": self.model, **self.recipe,
                              **self.variants[variant], "epsilon": epsilon, "seed": seed})

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
    for e in raw.get("epsilons") or []:
        if isinstance(e, str) and e.strip().lower() in ("inf", "infinity"):
            epsilons.append(math.inf)
        elif isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0:
            epsilons.append(float(e))
        else:
            problems.append(f"epsilons: {e!r} is not a number > 0 or 'inf'")
    if "epsilons" in raw and not raw["epsilons"]:
        problems.append("epsilons is empty")
    for s in raw.get("seeds") or []:
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
    if not problems:
        for variant in variants:  # each recipe is checked by TrainConfig itself
            try:
                TrainConfig(**{"data": str(raw["data"]), "model": str(raw.get("model", "minilm")),
                               **recipe, **variants[variant], "epsilon": 1.0})
            except (ConfigError, TypeError) as exc:
                problems.append(f"variants.{variant}: {exc}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ".")
    return SweepConfig(name=str(raw.get("name", "sweep")), data=str(raw["data"]),
                       model=str(raw.get("model", "minilm")), epsilons=tuple(epsilons),
                       seeds=tuple(seeds), recipe=dict(recipe),
                       variants={str(k): dict(v) for k, v in variants.items()},
                       attacks={str(k): dict(v or {}) for k, v in attacks.items()})


def _tag(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def cell_dir(out: Path, variant: str, seed: int, epsilon: float) -> Path:
    return out / "cells" / variant / f"seed{seed}" / f"eps{_tag(epsilon)}"


def run_sweep(config: str | Path | dict | SweepConfig, out_dir: str | Path, *,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run (or continue) every cell, then write results.csv, the plots and report.html."""
    import shutil

    from dptrain import rundir
    from dptrain.demo import run_plan
    from dptrain.figures import rendered
    from dptrain.outputs import check_writable
    from dptrain.trainer import RunSummary, train_run

    cfg = config if isinstance(config, SweepConfig) else load_config(config)
    out = Path(out_dir)
    check_writable(out, f"--out {out}")
    if (out / PLAN).exists():
        saved = json.loads((out / PLAN).read_text())
        if saved != cfg.to_dict():
            raise ConfigError(f"--out {out} holds a different sweep ({PLAN} differs); continue it "
                              "with its own config or choose a new directory.")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty and holds no sweep; choose a new directory.")
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_json(out / PLAN, cfg.to_dict())

    cells = cfg.cells()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="sweep cells", unit="cell")
    rows, correct = [], {}
    for variant, seed, eps in cells:
        where = cell_dir(out, variant, seed, eps)
        recipe = cfg.train_config(variant, seed, eps)
        action = run_plan(where, recipe)  # as the demo: reuse, resume, or restart from scratch
        if action == "reuse":
            summary = RunSummary.load(where)
        else:
            if action == "restart":
                shutil.rmtree(where)
            where.parent.mkdir(parents=True, exist_ok=True)
            summary = train_run(recipe, where, resume=action == "resume", progress=False)
        kept = where / "private" / "test_correct.npy"
        if summary.test_correct is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            np.save(kept, summary.test_correct)
        correct[(variant, seed, eps)] = np.load(kept) if kept.exists() else None
        row = _row(variant, seed, eps, summary, correct)
        if "mia" in cfg.attacks:
            row.update(_membership(where, out / "shadows", cfg.attacks["mia"]))
        if "white_box" in cfg.attacks:
            row.update(_white_box(cfg, out, variant, seed, eps))
        rows.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({"last": f"{variant}/seed{seed}/ε={_tag(eps)}",
                             "acc": f"{rows[-1]['accuracy']:.3f}"}, refresh=False)
    if bar is not None:
        bar.close()
    write_results(out, rows)
    figures = {"accuracy": rendered(accuracy_figure(rows))}
    if "mia" in cfg.attacks:
        figures["attacks"] = rendered(attacks_figure(rows))
    if cfg.attacks:
        figures["audit"] = rendered(audit_figure(rows))
    for name, files in figures.items():
        for fmt, data in files.items():
            rundir.write_bytes_atomic(out / f"{name}.{fmt}", data)
    rundir.write_bytes_atomic(out / REPORT, report_html(cfg, rows, figures).encode("utf-8"))
    return rows


def _membership(cell: Path, shadows: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Membership inference on a cell (reused when its report exists); shadow models live in
    one cache for the whole sweep, keyed by recipe and data, so cells that can share them do."""
    from attacks.membership import run_membership_inference
    from attacks.metrics import fpr_key

    report_path = cell / "attacks" / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        report = run_membership_inference(cell, cell / "attacks", n_shadows=options.get("shadows", 8),
                                          shadow_dir=shadows, progress=False)
    attacks = report["attacks"].values()
    return {
        "mia_best_auc": max(a["auc"] for a in attacks),
        "mia_tpr_at_0.1%": max(a["tpr_at_fpr"][fpr_key(0.001)] for a in attacks),
        "mia_tpr_at_1%": max(a["tpr_at_fpr"][fpr_key(0.01)] for a in attacks),
        "mia_epsilon_lb_cp": report["empirical_epsilon"]["clopper_pearson"],
        "mia_epsilon_lb_gdp": report["empirical_epsilon"]["gdp"],
        "mia_seconds": report.get("seconds"),
    }


def _white_box(cfg: SweepConfig, out: Path, variant: str, seed: int, eps: float) -> dict[str, Any]:
    """A white-box audit of the cell's recipe (its own training run with gradient canaries).
    A finished one is read back; one that stopped cannot resume and starts again."""
    import shutil

    from attacks.whitebox_audit import WhiteBoxOptions, run_white_box_audit

    where = out / "whitebox" / variant / f"seed{seed}" / f"eps{_tag(eps)}"
    if (where / "report.json").exists():
        report = json.loads((where / "report.json").read_text())
    else:
        if where.exists():
            shutil.rmtree(where)  # the sweep's own stopped audit: its coins were never used
        where.parent.mkdir(parents=True, exist_ok=True)
        report = run_white_box_audit(cfg.train_config(variant, seed, eps), where,
                                     WhiteBoxOptions(canaries=cfg.attacks["white_box"].get("canaries")),
                                     progress=False)
    seconds = report.get("seconds", {})
    return {"whitebox_epsilon_lb": report["epsilon_lb"],
            "whitebox_seconds": sum(v for v in seconds.values() if isinstance(v, (int, float)))}


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
        "steps": p.get("steps"), "accuracy": float(m["accuracy"]), "macro_f1": float(m["macro_f1"]),
        "worst_class_recall": min(recalls) if recalls else float("nan"),
        "class_recall_spread": (max(recalls) - min(recalls)) if recalls else float("nan"),
        "negative_flip_rate": flips, "seconds": float(summary.seconds),
    }


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("inf" if isinstance(r.get(k), float) and math.isinf(r[k]) else r.get(k, ""))
                         for k in COLUMNS})
    from dptrain import rundir

    rundir.write_bytes_atomic(out / RESULTS, buf.getvalue().encode())


def _by_epsilon(rows, variant, key):
    """Finite ε targets, and the mean and standard deviation over seeds of ``key`` at each."""
    eps = sorted({r["target_epsilon"] for r in rows if r["variant"] == variant
                  and not math.isinf(r["target_epsilon"])})
    vals = [[r[key] for r in rows if r["variant"] == variant and r["target_epsilon"] == e] for e in eps]
    return eps, [float(np.mean(v)) for v in vals], [float(np.std(v)) for v in vals]


def accuracy_figure(rows: list[dict[str, Any]]):
    """Test accuracy against ε per variant (mean ± std over seeds), the non-private line dashed."""
    from dptrain.figures import pyplot

    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    _errorbars(ax, rows, "accuracy")
    ax.set(xlabel="ε (target; δ fixed)", ylabel="test accuracy",
           title="Privacy–utility (mean ± std over seeds)")
    ax.legend(fontsize=8)
    return fig


def _errorbars(ax, rows, key, label_suffix=""):
    for k, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        eps, mean, std = _by_epsilon(rows, variant, key)
        ref = [r[key] for r in rows if r["variant"] == variant and math.isinf(r["target_epsilon"])]
        if eps:
            ax.errorbar(eps, mean, yerr=std, marker="o", capsize=3, color=f"C{k}",
                        label=f"{variant}{label_suffix}")
        if ref:
            ax.axhline(float(np.mean(ref)), ls="--", color=f"C{k}", alpha=0.7,
                       label=f"{variant}{label_suffix}, non-private")
    ticks = sorted({r["target_epsilon"] for r in rows if not math.isinf(r["target_epsilon"])})
    ax.set_xscale("log")
    if ticks:
        from matplotlib.ticker import NullLocator

        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(alpha=0.3)


def attacks_figure(rows: list[dict[str, Any]]):
    """Best membership attack's TPR at 1% FPR and AUC against ε (mean ± std over seeds)."""
    from dptrain.figures import pyplot

    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4))
    _errorbars(left, rows, "mia_tpr_at_1%")
    left.axhline(0.01, color="grey", lw=1, ls=":", label="chance (TPR = FPR)")
    left.set(xlabel="ε", ylabel="TPR at 1% FPR (best attack)", title="Membership inference")
    _errorbars(right, rows, "mia_best_auc")
    right.axhline(0.5, color="grey", lw=1, ls=":", label="chance")
    right.set(xlabel="ε", ylabel="AUC (best attack)", title="Membership inference")
    for ax in (left, right):
        ax.legend(fontsize=7)
    return fig


def audit_figure(rows: list[dict[str, Any]]):
    """Empirical ε lower bounds against the theoretical ε, with the diagonal they cannot cross."""
    from dptrain.figures import pyplot

    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    finite = [r for r in rows if not math.isinf(r["target_epsilon"])]
    for key, label, marker in (("whitebox_epsilon_lb", "white-box audit", "o"),
                               ("mia_epsilon_lb_cp", "membership inference (indicative)", "s")):
        points = [(r["epsilon"], r[key]) for r in finite if key in r]
        if points:
            x, y = zip(*points)
            ax.scatter(x, y, marker=marker, label=label, alpha=0.8)
    top = max([r["epsilon"] for r in finite] or [1.0])
    ax.plot([0, top], [0, top], color="grey", ls="--", label="ε_lb = ε (a bound above it: a bug)")
    ax.set(xlabel="theoretical ε (spent)", ylabel="empirical ε lower bound (95%)",
           title="What the audits prove")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """Plain-language sentences generated from the numbers."""
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        ref = [r["accuracy"] for r in rows if r["variant"] == variant and math.isinf(r["target_epsilon"])]
        eps, mean, _ = _by_epsilon(rows, variant, "accuracy")
        _, flips, _ = _by_epsilon(rows, variant, "negative_flip_rate")
        _, worst, _ = _by_epsilon(rows, variant, "worst_class_recall")
        base = float(np.mean(ref)) if ref else None
        for e, acc, flip, w in zip(eps, mean, flips, worst):
            text = f"{variant}: at ε = {e:g} the test accuracy is {acc:.3f}"
            if base is not None:
                text += f", {100 * (base - acc):.1f} points below the non-private {base:.3f}"
            if not math.isnan(flip):
                text += f"; {100 * flip:.1f}% of test examples the non-private model gets right turn wrong"
            if not math.isnan(w):
                text += f"; the worst class keeps a recall of {w:.2f}"
            cells = [r for r in rows if r["variant"] == variant and r["target_epsilon"] == e]
            if all("mia_tpr_at_1%" in r for r in cells):
                tpr = max(r["mia_tpr_at_1%"] for r in cells)
                text += (f"; the best membership attack finds at most {100 * tpr:.1f}% of the "
                         "members at 1% false positives (chance: 1%)")
            if all("whitebox_epsilon_lb" in r for r in cells):
                lb = max(r["whitebox_epsilon_lb"] for r in cells)
                verdict = "a bug: above the claim" if lb > max(r["epsilon"] for r in cells) else "consistent"
                text += f"; the white-box audit proves ε ≥ {lb:.2f} ({verdict})"
            lines.append(text + ".")
    return lines


def report_html(cfg: SweepConfig, rows: list[dict[str, Any]], figures: dict[str, dict[str, bytes]]) -> str:
    """One self-contained page: reading, plots (embedded PNG), table, configuration."""
    def cell(v):
        if isinstance(v, float):
            return "∞" if math.isinf(v) else "–" if math.isnan(v) else f"{v:.4g}"
        return html.escape(str(v))

    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(files["png"]).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, files in figures.items())
    shown = [c for c in COLUMNS if any(c in r for r in rows)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in shown) + "</tr>" for r in rows)
    items = "".join(f"<li>{html.escape(line)}</li>" for line in reading(rows))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>dptrain sweep: {html.escape(cfg.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>Privacy–utility sweep: {html.escape(cfg.name)}</h1>"
        f"<h2>Reading</h2><ul>{items}</ul><h2>Plots</h2>{images}"
        f"<h2>Results</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<h2>Configuration</h2><pre>{html.escape(json.dumps(cfg.to_dict(), indent=2))}</pre>"
        "</body></html>")
