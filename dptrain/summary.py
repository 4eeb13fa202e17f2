"""Side-by-side summaries of finished runs: a table for the terminal, a privacy–utility figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


def _eps(value) -> str:
    value = float(value)
    return "∞" if not math.isfinite(value) else f"{value:.2f}"


def table_rows(summaries: Sequence) -> list[list[str]]:
    if summaries and all("slot_f1" in s.metrics for s in summaries):
        return _slot_rows(summaries)
    rows = [["run", "ε target", "ε spent", "δ", "σ", "steps", "val acc", "test acc", "macro-F1", "time"]]
    for s in summaries:
        p, m = s.privacy, s.metrics
        rows.append([
            Path(s.out_dir).name,
            _eps(p["target_epsilon"]),
            _eps(p["epsilon"]),
            "-" if p["delta"] is None else f"{p['delta']:.1e}",
            f"{p['noise_multiplier']:.3f}",
            str(p["steps"]),
            f"{m['validation_accuracy']:.3f}",
            f"{m['accuracy']:.3f}",
            f"{m['macro_f1']:.3f}",
            f"{s.seconds / 60:.1f} min",
        ])
    return rows


def _slot_rows(summaries: Sequence) -> list[list[str]]:
    """Joint/slot runs: test intent accuracy, entity-level slot F1, frame accuracy."""
    rows = [["run", "ε target", "ε spent", "δ", "σ", "steps", "intent acc", "slot F1",
             "frame acc", "time"]]
    for s in summaries:
        p, m = s.privacy, s.metrics
        rows.append([
            Path(s.out_dir).name, _eps(p["target_epsilon"]), _eps(p["epsilon"]),
            "-" if p["delta"] is None else f"{p['delta']:.1e}", f"{p['noise_multiplier']:.3f}",
            str(p["steps"]),
            f"{m['intent_accuracy']:.3f}" if "intent_accuracy" in m else "-",
            f"{m['slot_f1']:.3f}", f"{m['frame_accuracy']:.3f}", f"{s.seconds / 60:.1f} min",
        ])
    return rows


def print_table(summaries: Sequence, file=None) -> None:
    print_rows(table_rows(summaries), file=file)
    for line in chance_warnings(summaries):
        print(line, file=file)


def chance_warnings(summaries: Sequence) -> list[str]:
    """One warning per run whose model learned nothing (``metrics.json`` ``chance_level``)."""
    lines = []
    for s in summaries:
        chance = s.metrics.get("chance_level")
        if chance and not chance["learned"]:
            lines.append(
                f"warning: {Path(s.out_dir).name} is at chance level (test accuracy "
                f"{s.metrics['accuracy']:.3f}; always answering the most frequent label gives "
                f"{chance['majority_class_accuracy']:.3f}, p = {chance['p_value']:.2g}): the model "
                "learned nothing, so attacks and audits on it prove nothing.")
    return lines


def print_rows(rows: Sequence[Sequence[str]], file=None) -> None:
    """A header row and data rows as aligned columns: first left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "  ".join("-" * w for w in widths)
    for k, row in enumerate(rows):
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))),
              file=file)
        if k == 0:
            print(line, file=file)


def plot_privacy_utility(path: Path, summaries: Sequence, title: str) -> None:
    """Write :func:`privacy_utility_png` to ``path``, atomically."""
    from .rundir import write_bytes_atomic

    write_bytes_atomic(Path(path), privacy_utility_png(summaries, title))


def privacy_utility_png(summaries: Sequence, title: str) -> bytes:
    """Test accuracy against ε (log axis), the non-private run as a dashed line; PNG bytes."""
    from .figures import png_bytes, pyplot

    plt = pyplot()
    private = sorted((s for s in summaries if math.isfinite(s.privacy["epsilon"])),
                     key=lambda s: s.privacy["epsilon"])
    baseline = [s for s in summaries if not math.isfinite(s.privacy["epsilon"])]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if private:
        ax.plot([s.privacy["epsilon"] for s in private], [s.metrics["accuracy"] for s in private],
                marker="o", label="DP-SGD")
        for s in private:
            ax.annotate(f"{s.metrics['accuracy']:.2f}", (s.privacy["epsilon"], s.metrics["accuracy"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log")
        # plain numbers at the runs' own ε, not "2×10⁰" log-axis labels
        from matplotlib.ticker import NullFormatter

        ax.set_xticks([s.privacy["epsilon"] for s in private])
        ax.set_xticklabels([f"{s.privacy['epsilon']:.3g}" for s in private])
        ax.xaxis.set_minor_formatter(NullFormatter())
    for s in baseline:
        ax.axhline(s.metrics["accuracy"], ls="--", color="gray",
                   label=f"non-private ({s.metrics['accuracy']:.2f})")
    ax.set(xlabel="ε spent (δ fixed; log scale)", ylabel="test accuracy", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    return png_bytes(fig)
