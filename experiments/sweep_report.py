"""What a sweep shows: ``results.csv``, the plots (PNG + SVG) and one self-contained HTML page.

Plots, all with seed error bars (mean ± standard deviation over seeds):

- ``accuracy``: test accuracy against ε, the non-private accuracy as a dashed line (of a
  joint intent + slot model: its intent accuracy);
- ``slot_f1``: a joint model's entity-level slot F1 and frame accuracy against ε, the same way;
- ``attacks``: the best membership attack's TPR at 1% FPR and its AUC against ε;
- ``audit``: every empirical ε lower bound against the theoretical ε, with the diagonal a
  correct implementation never crosses;
- ``extraction``: secret exposure (bits) and the share of secrets recovered exactly against ε,
  one line per repetition count;
- ``per_class``: recall lost to DP per class against the class's training examples (DP costs
  small classes most: Bagdasaryan, Poursaeed, Shmatikov 2019); when every class is the same
  size, box plots of the per-class loss at each ε instead.

``report.html`` embeds the PNGs (no network), the table, where the time went, the configuration
and environment, and a reading of the numbers generated from them.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import platform
import re
from typing import Any

import numpy as np

RESULTS = "results.csv"
REPORT = "report.html"
BASE_COLUMNS = ("variant", "seed", "target_epsilon", "epsilon", "delta", "noise_multiplier",
                "sample_rate", "steps", "accuracy", "macro_f1", "worst_class_recall",
                "class_recall_spread", "negative_flip_rate")
SLOT_COLUMNS = ("slot_f1", "frame_accuracy", "worst_slot_type_f1")  # joint models only
ATTACK_COLUMNS = ("mia_best_auc", "mia_tpr_at_0.1%", "mia_tpr_at_1%", "mia_epsilon_lb_cp",
                  "mia_epsilon_lb_gdp", "audit_epsilon_lb", "whitebox_epsilon_lb")
FIGURES = ("accuracy", "slot_f1", "attacks", "audit", "extraction", "per_class")
FILES = (RESULTS, REPORT) + tuple(f"{name}.{fmt}" for name in FIGURES for fmt in ("png", "svg"))
"""Every file a sweep may write at its top level (checked before it starts)."""
SECONDS_COLUMNS = ("train_seconds", "mia_seconds", "audit_seconds", "whitebox_seconds",
                   "extraction_seconds")


def _repetitions(rows: list[dict[str, Any]]) -> list[int]:
    found = {int(m.group(1)) for r in rows for k in r if (m := re.fullmatch(r"exposure_r(\d+)", k))}
    return sorted(found)


def columns(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The CSV's columns: the cell's recipe and utility, then every attack that ran, exposure and
    extraction rate per repetition count, and seconds per stage."""
    present = lambda c: any(c in r for r in rows)  # noqa: E731
    extraction = [c for r in _repetitions(rows) for c in (f"exposure_r{r}", f"extracted_r{r}")]
    return (BASE_COLUMNS + tuple(c for c in SLOT_COLUMNS + ATTACK_COLUMNS if present(c))
            + tuple(extraction)
            + tuple(c for c in SECONDS_COLUMNS if present(c)))


def write_results(outputs, rows: list[dict[str, Any]]) -> None:
    shown = columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=shown, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("inf" if isinstance(r.get(k), float) and math.isinf(r[k]) else
                             "" if r.get(k) is None else r.get(k, "")) for k in shown})
    outputs.write_bytes(RESULTS, buf.getvalue().encode())


def write_all(outputs, cfg, rows: list[dict[str, Any]], per_class: list[dict[str, Any]],
              timing: dict[str, float] | None = None) -> dict:
    """results.csv, every plot that has data (PNG + SVG), and report.html, through ``outputs``
    (a :class:`dptrain.outputs.OutputDir`); returns the figures."""
    from dptrain.figures import rendered

    write_results(outputs, rows)
    figures = {"accuracy": rendered(accuracy_figure(rows))}
    if any("slot_f1" in r for r in rows):
        figures["slot_f1"] = rendered(slot_figure(rows))
    if any("mia_best_auc" in r for r in rows):
        figures["attacks"] = rendered(attacks_figure(rows))
    if any(k in r for r in rows for k in ("mia_epsilon_lb_cp", "audit_epsilon_lb", "whitebox_epsilon_lb")):
        figures["audit"] = rendered(audit_figure(rows))
    if _repetitions(rows):
        figures["extraction"] = rendered(extraction_figure(rows))
    if per_class:
        figures["per_class"] = rendered(per_class_figure(per_class))
    for name, files in figures.items():
        for fmt, data in files.items():
            outputs.write_bytes(f"{name}.{fmt}", data)
    page = report_html(cfg, rows, figures, reading(rows, per_class), timing)
    outputs.write_bytes(REPORT, page.encode("utf-8"))
    return figures


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _by_epsilon(rows, variant, key):
    """Finite ε targets, and the mean and standard deviation over seeds of ``key`` at each."""
    eps = sorted({r["target_epsilon"] for r in rows if r["variant"] == variant
                  and not math.isinf(r["target_epsilon"]) and _number(r.get(key))})
    vals = [[r[key] for r in rows if r["variant"] == variant and r["target_epsilon"] == e
             and _number(r.get(key))] for e in eps]
    return eps, [float(np.mean(v)) for v in vals], [float(np.std(v)) for v in vals]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _errorbars(ax, rows, key, label_suffix="", color_offset=0):
    for k, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        eps, mean, std = _by_epsilon(rows, variant, key)
        ref = [r[key] for r in rows if r["variant"] == variant and math.isinf(r["target_epsilon"])
               and _number(r.get(key))]
        color = f"C{k + color_offset}"
        if eps:
            ax.errorbar(eps, mean, yerr=std, marker="o", capsize=3, color=color,
                        label=f"{variant}{label_suffix}")
        if ref:
            ax.axhline(float(np.mean(ref)), ls="--", color=color, alpha=0.7,
                       label=f"{variant}{label_suffix}, non-private")
    _epsilon_axis(ax, rows)


def _epsilon_axis(ax, rows):
    ticks = sorted({r["target_epsilon"] for r in rows if not math.isinf(r["target_epsilon"])})
    ax.set_xscale("log")
    if ticks:
        from matplotlib.ticker import NullLocator

        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(alpha=0.3)


def accuracy_figure(rows: list[dict[str, Any]]):
    """Test accuracy against ε per variant (mean ± std over seeds), the non-private line dashed."""
    from dptrain.figures import pyplot

    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    _errorbars(ax, rows, "accuracy")
    ax.set(xlabel="ε (target; δ fixed)", ylabel="test accuracy",
           title="Privacy–utility (mean ± std over seeds)")
    ax.legend(fontsize=8)
    return fig


def slot_figure(rows: list[dict[str, Any]]):
    """A joint model's slot F1 and frame accuracy against ε (mean ± std over seeds), the
    non-private lines dashed."""
    from dptrain.figures import pyplot

    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "slot_f1", "test slot F1 (entity level)"),
                           (axes[1], "frame_accuracy", "test frame accuracy")):
        _errorbars(ax, [r for r in rows if key in r], key)
        ax.set(xlabel="ε (target; δ fixed)", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle("Slots: privacy–utility (mean ± std over seeds)")
    return fig


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


AUDITS = (("whitebox_epsilon_lb", "white-box audit (gradient canaries)", "o"),
          ("audit_epsilon_lb", "one-run audit (natural canaries)", "^"),
          ("mia_epsilon_lb_cp", "membership inference (indicative)", "s"))


def audit_figure(rows: list[dict[str, Any]]):
    """Empirical ε lower bounds against the theoretical ε (mean ± std over seeds), with the
    diagonal they cannot cross."""
    from dptrain.figures import pyplot

    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    finite = [r for r in rows if not math.isinf(r["target_epsilon"])]
    for key, label, marker in AUDITS:
        groups: dict[float, list[tuple[float, float]]] = {}
        for r in finite:
            if _number(r.get(key)):
                groups.setdefault(r["target_epsilon"], []).append((r["epsilon"], r[key]))
        if groups:
            x = [float(np.mean([p[0] for p in g])) for g in groups.values()]
            y = [float(np.mean([p[1] for p in g])) for g in groups.values()]
            err = [float(np.std([p[1] for p in g])) for g in groups.values()]
            ax.errorbar(x, y, yerr=err, marker=marker, ls="none", capsize=3, label=label, alpha=0.85)
    top = max([r["epsilon"] for r in finite] or [1.0])
    ax.plot([0, top], [0, top], color="grey", ls="--", label="ε_lb = ε (a bound above it: a bug)")
    ax.set(xlabel="theoretical ε (spent)", ylabel="empirical ε lower bound (95%)",
           title="What the audits prove")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def extraction_figure(rows: list[dict[str, Any]]):
    """Exposure and exact-extraction rate of planted secrets against ε, one line per repetition
    count R (the non-private value dashed)."""
    from dptrain.figures import pyplot

    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4))
    reps = _repetitions(rows)
    for k, r in enumerate(reps):
        for ax, key in ((left, f"exposure_r{r}"), (right, f"extracted_r{r}")):
            sub = [dict(row, variant=f"R = {r}" + (f" ({row['variant']})" if len(
                {x["variant"] for x in rows}) > 1 else "")) for row in rows]
            _errorbars(ax, sub, key, color_offset=k)
    left.set(xlabel="ε", ylabel="mean exposure (bits)", title="Secret exposure (Carlini et al. 2019)")
    right.set(xlabel="ε", ylabel="secrets recovered exactly", title="Secret extraction",
              ylim=(-0.05, 1.05))
    for ax in (left, right):
        ax.legend(fontsize=7)
    return fig


def per_class_figure(points: list[dict[str, Any]]):
    """Recall lost to DP per class against its training examples; one colour per ε, averaged
    over seeds per class."""
    from dptrain.figures import pyplot

    fig, ax = pyplot().subplots(figsize=(6.5, 4.5))
    eps_values = sorted({p["target_epsilon"] for p in points}, reverse=True)
    if len({p["train_size"] for p in points}) == 1:  # equal classes: how unevenly the loss falls
        size = points[0]["train_size"]
        losses = [[float(np.mean([q["recall_loss"] for q in points if q["target_epsilon"] == eps
                                  and q["class"] == c and q["variant"] == v]))
                   for v, c in dict.fromkeys((q["variant"], q["class"]) for q in points
                                             if q["target_epsilon"] == eps)]
                  for eps in eps_values]
        ax.boxplot(losses, showmeans=True)
        ax.set_xticks(range(1, len(eps_values) + 1), [f"ε = {e:g}" for e in eps_values])
        ax.axhline(0, color="grey", lw=1)
        ax.set(ylabel="recall lost to DP per class (non-private − private)",
               title=f"Who pays for privacy: every class has {size} training examples;\n"
                     "the spread shows how unevenly the loss falls")
        ax.grid(alpha=0.3, axis="y")
        return fig
    for k, eps in enumerate(eps_values):
        by_class: dict[tuple, list[float]] = {}
        for p in points:
            if p["target_epsilon"] == eps:
                by_class.setdefault((p["variant"], p["class"], p["train_size"]), []).append(p["recall_loss"])
        sizes = [key[2] for key in by_class]
        losses = [float(np.mean(v)) for v in by_class.values()]
        ax.scatter(sizes, losses, s=14, alpha=0.6, color=f"C{k}", label=f"ε = {eps:g}")
    ax.axhline(0, color="grey", lw=1)
    ax.set(xlabel="training examples in the class", ylabel="recall lost to DP (non-private − private)",
           title="Who pays for privacy: per-class loss vs class size")
    if len({p["train_size"] for p in points}) > 1:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# Reading and page
# --------------------------------------------------------------------------------------------


def reading(rows: list[dict[str, Any]], per_class: list[dict[str, Any]] | None = None) -> list[str]:
    """Plain-language sentences generated from the numbers."""
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        ref = [r["accuracy"] for r in rows if r["variant"] == variant and math.isinf(r["target_epsilon"])]
        eps, mean, _ = _by_epsilon(rows, variant, "accuracy")
        base = float(np.mean(ref)) if ref else None
        for e, acc in zip(eps, mean):
            cells = [r for r in rows if r["variant"] == variant and r["target_epsilon"] == e]
            what = "intent accuracy" if any("slot_f1" in r for r in cells) else "test accuracy"
            text = f"{variant}: at ε = {e:g} the {what} is {acc:.3f}"
            if base is not None:
                text += f", {100 * (base - acc):.1f} points below the non-private {base:.3f}"
            slot = [r["slot_f1"] for r in cells if _number(r.get("slot_f1"))]
            if slot:
                slot_ref = [r["slot_f1"] for r in rows if r["variant"] == variant
                            and math.isinf(r["target_epsilon"]) and _number(r.get("slot_f1"))]
                text += f"; the slot F1 is {float(np.mean(slot)):.3f}"
                if slot_ref:
                    text += f" (non-private {float(np.mean(slot_ref)):.3f})"
            flips = [r["negative_flip_rate"] for r in cells if _number(r.get("negative_flip_rate"))]
            if flips:
                text += (f"; {100 * float(np.mean(flips)):.1f}% of test examples the non-private "
                         "model gets right turn wrong")
            worst = [r["worst_class_recall"] for r in cells if _number(r.get("worst_class_recall"))]
            if worst:
                text += f"; the worst class keeps a recall of {float(np.mean(worst)):.2f}"
            if all("mia_tpr_at_1%" in r for r in cells):
                tpr = max(r["mia_tpr_at_1%"] for r in cells)
                text += (f"; the best membership attack finds at most {100 * tpr:.1f}% of the "
                         "members at 1% false positives (chance: 1%)")
            claimed = max(r["epsilon"] for r in cells)
            for key, what in (("whitebox_epsilon_lb", "the white-box audit"),
                              ("audit_epsilon_lb", "the one-run audit")):
                if all(_number(r.get(key)) for r in cells):
                    lb = max(r[key] for r in cells)
                    verdict = "a bug: above the claim" if lb > claimed else "consistent with the claim"
                    text += f"; {what} proves ε ≥ {lb:.2f} ({verdict})"
            extracted = _extracted(rows, cells)
            if extracted:
                text += "; secrets recovered exactly: " + extracted
            lines.append(text + ".")
        if base is not None:
            extracted = _extracted(rows, [r for r in rows if r["variant"] == variant
                                          and math.isinf(r["target_epsilon"])])
            if extracted:
                lines.append(f"{variant}, without privacy: secrets recovered exactly: {extracted}.")
    if per_class:
        sizes = {p["train_size"] for p in per_class}
        if len(sizes) == 1:
            text = (f"Every class has {sizes.pop()} training examples here, so the per-class "
                    "plot cannot show whether DP costs small classes more; it shows how "
                    "unevenly the loss falls on equal classes")
            low = min(p["target_epsilon"] for p in per_class)
            by_class: dict[tuple, list[float]] = {}
            for p in per_class:
                if p["target_epsilon"] == low:
                    by_class.setdefault((p["variant"], p["class"]), []).append(p["recall_loss"])
            losses = np.sort([float(np.mean(v)) for v in by_class.values()])[::-1]
            top = losses[:max(1, len(losses) // 10)]
            lines.append(text + f": at ε = {low:g} the tenth of the classes hit hardest lose "
                         f"{100 * float(np.mean(top)):.1f} points of recall, the median class "
                         f"{100 * float(np.median(losses)):.1f}.")
        else:
            small = np.median(sorted(sizes))
            lo = [p["recall_loss"] for p in per_class if p["train_size"] <= small]
            hi = [p["recall_loss"] for p in per_class if p["train_size"] > small]
            if lo and hi:
                lines.append(f"Classes with at most {small:g} training examples lose "
                             f"{100 * float(np.mean(lo)):.1f} points of recall on average, larger "
                             f"ones {100 * float(np.mean(hi)):.1f}.")
    return lines


SUMMARY_KEYS = (("variant", "variant"), ("seed", "seed"), ("target_epsilon", "ε target"),
                ("epsilon", "ε spent"), ("accuracy", "accuracy"), ("slot_f1", "slot F1"),
                ("negative_flip_rate", "flips"),
                ("mia_tpr_at_1%", "MIA TPR@1%"), ("audit_epsilon_lb", "one-run ε≥"),
                ("whitebox_epsilon_lb", "white-box ε≥"))


def summary_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The terminal's table: per cell, utility and the headline of each attack that ran, and
    the highest extraction rate over repetition counts."""
    keys = [(k, label) for k, label in SUMMARY_KEYS if any(k in r for r in rows)]
    reps = _repetitions(rows)
    header = [label for _, label in keys] + ([f"exposure (R={reps[-1]})", f"extracted (R={reps[-1]})"]
                                             if reps else [])

    def fmt(v):
        if isinstance(v, float):
            return "∞" if math.isinf(v) else "–" if math.isnan(v) else f"{v:.3g}"
        return "–" if v is None else str(v)

    return [header] + [[fmt(r.get(k)) for k, _ in keys]
                       + ([fmt(r.get(f"exposure_r{reps[-1]}")), fmt(r.get(f"extracted_r{reps[-1]}"))]
                          if reps else []) for r in rows]


def _extracted(rows: list[dict[str, Any]], cells: list[dict[str, Any]]) -> str:
    """'50% at R = 1, 100% at R = 20': the mean exact-extraction rate of ``cells`` per
    repetition count that every one of them measured ('' when none)."""
    reps = [r for r in _repetitions(rows) if all(_number(c.get(f"extracted_r{r}")) for c in cells)]
    return ", ".join(f"{100 * float(np.mean([c[f'extracted_r{r}'] for c in cells])):.0f}% at R = {r}"
                     for r in reps)


def environment() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("dptrain", "torch", "transformers", "opacus", "numpy"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return found


def report_html(cfg, rows: list[dict[str, Any]], figures: dict[str, dict[str, bytes]],
                lines: list[str] | None = None, timing: dict[str, float] | None = None) -> str:
    """One self-contained page: reading, plots (embedded PNG), table, time, configuration."""
    def cell(v):
        if isinstance(v, float):
            return "∞" if math.isinf(v) else "–" if math.isnan(v) else f"{v:.4g}"
        return "–" if v is None else html.escape(str(v))

    lines = reading(rows) if lines is None else lines
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(files["png"]).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, files in figures.items())
    shown = columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in shown) + "</tr>" for r in rows)
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    time_table = ""
    if timing:
        total = sum(timing.values()) or 1.0
        time_table = ("<h2>Where the time went</h2><table><thead><tr><th>stage</th><th>seconds</th>"
                      "<th>share</th></tr></thead><tbody>" + "".join(
                          f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td><td>{100 * v / total:.0f}%</td></tr>"
                          for k, v in timing.items()) + "</tbody></table>")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>dptrain sweep: {html.escape(cfg.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%}.wide{overflow-x:auto}</style></head><body>"
        f"<h1>Privacy–utility sweep: {html.escape(cfg.name)}</h1>"
        f"<h2>Reading</h2><ul>{items}</ul><h2>Plots</h2>{images}"
        f"<h2>Results</h2><div class=wide><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
        "</table></div>"
        f"{time_table}"
        f"<h2>Configuration</h2><pre>{html.escape(json.dumps(cfg.to_dict(), indent=2))}</pre>"
        f"<h2>Environment</h2><pre>{html.escape(json.dumps(environment(), indent=2))}</pre>"
        "</body></html>")
