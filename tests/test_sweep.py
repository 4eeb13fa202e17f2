"""dptrain sweep: config checks, a tiny sweep end to end, and continuing a stopped sweep."""

from __future__ import annotations

import csv
import math
from html.parser import HTMLParser

import pytest

from dptrain.cli import main
from experiments.sweep import COLUMNS, load_config, run_sweep

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TINY = {"name": "tiny", "data": "synthetic", "model": "tiny", "epsilons": ["inf", 4],
        "seeds": [0], "recipe": {"synthetic_per_intent": 12, "epochs": 2, "batch_size": 16}}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.rows, self.items = [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "tr":
            self.rows += 1
        elif tag == "li":
            self.items += 1


def test_a_tiny_sweep_end_to_end_and_continued(tmp_path):
    out = tmp_path / "sweep"
    rows = run_sweep(TINY, out, progress=False)
    assert [(r["seed"], r["target_epsilon"]) for r in rows] == [(0, math.inf), (0, 4.0)]
    private = rows[1]
    assert private["epsilon"] <= 4.0 and private["noise_multiplier"] > 0
    assert rows[0]["negative_flip_rate"] == 0.0 and 0.0 <= private["negative_flip_rate"] <= 1.0
    assert 0.0 <= private["worst_class_recall"] <= private["accuracy"] + 1e-9 or private["accuracy"] == 0
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == 2 and table[0]["target_epsilon"] == "inf"
    for name in ("accuracy.png", "accuracy.svg", "report.html", "sweep.json"):
        assert (out / name).stat().st_size > 0
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert len(page.images) == 1 and page.images[0].startswith("data:image/png;base64,")
    assert page.rows == 3 and page.items == 1  # header + 2 cells; one reading line per private ε

    # Continuing: finished cells are read back, never retrained.
    runs = sorted((out / "cells").rglob("privacy.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    again = run_sweep(TINY, out, progress=False)
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    assert again[1]["negative_flip_rate"] == private["negative_flip_rate"]

    with pytest.raises(Exception, match="different sweep"):
        run_sweep({**TINY, "seeds": [1]}, out, progress=False)


def test_every_config_problem_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: synthetic\nepsilons: [inf, -1, x]\nseeds: [0, 0.5]\nlr_typo: 1\n"
                   "recipe: {epochz: 2}\n")
    assert main(["sweep", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    for part in ("unknown key 'lr_typo'", "-1 is not a number > 0", "'x' is not a number",
                 "0.5 is not an integer", "unknown field 'epochz'"):
        assert part in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(Exception, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(Exception, match="lr must"):
        load_config({**TINY, "recipe": {"lr": -1.0}})


def test_a_sweep_with_attacks_and_white_box_audits(tmp_path):
    cfg = {**TINY, "attacks": {"mia": {"shadows": 2}, "white_box": {"canaries": 2000}}}
    out = tmp_path / "sweep"
    rows = run_sweep(cfg, out, progress=False)
    for r in rows:
        assert 0.0 <= r["mia_tpr_at_1%"] <= 1.0 and 0.0 <= r["mia_best_auc"] <= 1.0
        assert r["mia_epsilon_lb_cp"] >= 0.0 and r["whitebox_epsilon_lb"] >= 0.0
    assert rows[0]["whitebox_epsilon_lb"] >= 3  # ε = ∞: the canaries separate exactly
    assert rows[1]["whitebox_epsilon_lb"] <= rows[1]["epsilon"]
    for name in ("attacks.png", "attacks.svg", "audit.png", "audit.svg"):
        assert (out / name).stat().st_size > 0
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert len(page.images) == 3
    assert (out / "shadows").is_dir() and any((out / "shadows").iterdir())
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["whitebox_epsilon_lb"]) == pytest.approx(rows[1]["whitebox_epsilon_lb"])
    # continuing reads every report back: nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("report.json")}
    run_sweep(cfg, out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("report.json")} == stamps


def test_attack_options_are_checked():
    with pytest.raises(Exception) as info:
        load_config({**TINY, "attacks": {"mia": {"shadows": 1, "extra": 2}, "lira": {}}})
    message = str(info.value)
    for part in ("shadows must be an integer >= 2", "unknown option 'extra'", "unknown attack 'lira'"):
        assert part in message


def test_a_killed_sweep_continues_without_retraining(tmp_path):
    """A real SIGKILL while the second cell trains; the rerun keeps the first cell as it was."""
    import hashlib

    import yaml
    from test_cli_reliability_attacks import dptrain, kill_when

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**TINY, "epsilons": ["inf", 4, 2],
                                      "recipe": {**TINY["recipe"], "epochs": 6}}))
    out = tmp_path / "sweep"
    first = out / "cells" / "default" / "seed0" / "epsinf" / "privacy.json"
    second = out / "cells" / "default" / "seed0" / "eps4" / "config.json"
    kill_when(["sweep", "--config", config, "--out", out, "--quiet"], second.exists)
    assert first.exists() and not (out / "results.csv").exists()
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    proc = dptrain("sweep", "--config", config, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(first.read_bytes()).hexdigest() == digest
    with open(out / "results.csv") as f:
        assert [r["target_epsilon"] for r in csv.DictReader(f)] == ["inf", "4.0", "2.0"]
