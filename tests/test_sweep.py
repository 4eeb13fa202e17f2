"""dptrain sweep: config checks, a tiny sweep end to end with every attack, continuing a stopped
(SIGKILLed) sweep, and the same results.csv from a process pool and from Ray."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser

import pytest

from dptrain.cli import main
from dptrain.outputs import MANIFEST
from experiments.sweep import cell_dir, load_config, run_sweep
from experiments.sweep_report import BASE_COLUMNS

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TINY = {"name": "tiny", "data": "synthetic", "model": "tiny", "epsilons": ["inf", 4],
        "seeds": [0], "recipe": {"synthetic_per_intent": 12, "epochs": 2, "batch_size": 16}}


class _Page(HTMLParser):
    """What a browser would show: images, rows per table, reading items, section titles."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.items, self.titles, self._in = [], [], 0, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append((dict(attrs)["src"], dict(attrs).get("alt")))
        elif tag == "table":
            self.tables.append(0)
        elif tag == "tr":
            self.tables[-1] += 1
        elif tag == "li":
            self.items += 1
        self._in = tag

    def handle_data(self, data):
        if self._in == "h2":
            self.titles.append(data)

    def check_images(self):
        import base64

        for src, _ in self.images:
            assert src.startswith("data:image/png;base64,")
            assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        return [alt for _, alt in self.images]


def _browser() -> str | None:
    import shutil

    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)


def _check_in_a_browser(page, images: int) -> None:
    """Open the report in a headless browser when one is installed (``apt install chromium``):
    the DOM it builds holds every image and table, and the page it paints is not blank.
    Without one, the parse-based checks of the callers stand alone."""
    import subprocess

    import numpy as np
    from matplotlib.image import imread

    browser = _browser()
    if browser is None:
        return
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1100,2400"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count("<img") == images and dom.count("<table") >= 2
    shot = page.parent / "screenshot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, cwd=page.parent)
    pixels = imread(shot)
    assert pixels.shape[0] > 1000 and float(np.std(pixels)) > 0.05
    shot.unlink()


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
    assert tuple(table[0]) == BASE_COLUMNS + ("train_seconds",) and len(table) == 2
    assert table[0]["target_epsilon"] == "inf"
    for name in ("accuracy.png", "accuracy.svg", "per_class.png", "per_class.svg", "report.html",
                 "sweep.json", "timing.json"):
        assert (out / name).stat().st_size > 0
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.check_images() == ["accuracy", "per_class"]
    assert page.tables[0] == 3  # header + 2 cells
    # one reading line per private ε, one on the per-class plot (the classes are equal here)
    assert page.items == 2
    assert {"Reading", "Plots", "Results", "Where the time went", "Configuration",
            "Environment"} <= set(page.titles)
    _check_in_a_browser(out / "report.html", images=2)

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
    for part in ("unknown key 'lr_typo'", "-1 is not a number in (0, 100]", "'x' is not a number",
                 "0.5 is not an integer", "unknown field 'epochz'"):
        assert part in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(Exception, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(Exception, match="lr must"):
        load_config({**TINY, "recipe": {"lr": -1.0}})
    with pytest.raises(Exception, match="sweeps train intent classifiers or joint models"):
        load_config({**TINY, "recipe": {"task": "slots"}})


ATTACKS = {"mia": {"shadows": 2}, "audit": {"canaries": 20}, "white_box": {"canaries": 2000},
           "extraction": {"secrets": "repetitions=1,8;per_repetition=1;length=2"}}


def test_a_sweep_of_joint_models_with_every_attack_and_audit(tmp_path):
    """task: joint: the cells are intent + slot models; results.csv adds slot F1, frame accuracy
    and the worst slot type's F1, the report a slot plot and the slot F1 in its reading; the
    attacks and audits run on the joint cells (secrets in slot values)."""
    cfg = {**TINY, "recipe": {**TINY["recipe"], "task": "joint", "synthetic_per_intent": 8},
           "attacks": ATTACKS}
    out = tmp_path / "sweep"
    rows = run_sweep(cfg, out, progress=False)
    assert [r["target_epsilon"] for r in rows] == [math.inf, 4.0]
    for r in rows:
        assert 0.0 <= r["worst_slot_type_f1"] <= r["slot_f1"] <= 1.0
        assert 0.0 <= r["frame_accuracy"] <= r["accuracy"] <= 1.0  # a right frame has a right intent
        assert math.isnan(r["macro_f1"])
        assert 0.0 <= r["mia_tpr_at_1%"] <= 1.0 and r["audit_epsilon_lb"] >= 0.0
        assert 0.0 <= r["exposure_r8"] <= math.log2(100) + 1e-9
    assert rows[0]["whitebox_epsilon_lb"] >= 3  # ε = ∞: the canaries separate exactly
    for key in ("whitebox_epsilon_lb", "audit_epsilon_lb", "mia_epsilon_lb_cp"):
        assert rows[1][key] <= rows[1]["epsilon"]
    for r in rows:
        saved = json.loads((cell_dir(out, r["variant"], 0, r["target_epsilon"]) / "config.json").read_text())
        assert saved["config"]["task"] == "joint"
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.check_images() == ["accuracy", "slot_f1", "attacks", "audit", "extraction"]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["slot_f1"]) == pytest.approx(rows[1]["slot_f1"])
    from experiments.sweep_report import reading

    line = reading(rows)[0]
    assert "the intent accuracy is" in line and f"the slot F1 is {rows[1]['slot_f1']:.3f}" in line


def test_a_sweep_with_every_attack_and_audit(tmp_path):
    import json

    cfg = {**TINY, "attacks": ATTACKS}
    out = tmp_path / "sweep"
    rows = run_sweep(cfg, out, progress=False)
    for r in rows:
        assert 0.0 <= r["mia_tpr_at_1%"] <= 1.0 and 0.0 <= r["mia_best_auc"] <= 1.0
        assert r["mia_epsilon_lb_cp"] >= 0.0 and r["whitebox_epsilon_lb"] >= 0.0
        assert r["audit_epsilon_lb"] >= 0.0
        for rep in (1, 8):  # a 2-digit secret: 100 candidates, exposure in [0, log2 100]
            assert 0.0 <= r[f"exposure_r{rep}"] <= math.log2(100) + 1e-9
            assert r[f"extracted_r{rep}"] in (0.0, 1.0)
    assert rows[0]["whitebox_epsilon_lb"] >= 3  # ε = ∞: the canaries separate exactly
    for key in ("whitebox_epsilon_lb", "audit_epsilon_lb", "mia_epsilon_lb_cp"):
        assert rows[1][key] <= rows[1]["epsilon"]
    # the secrets were planted in the cells' training data, and only there
    for cell in (out / "cells").rglob("privacy.json"):
        planted = json.loads((cell.parent / "private" / "secrets.json").read_text())
        assert sorted(s["repetitions"] for s in planted["secrets"]) == [1, 8]
    for audit_run in list((out / "audits").rglob("privacy.json")) + list((out / "whitebox").rglob("privacy.json")):
        assert not (audit_run.parent / "private" / "secrets.json").exists()
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.check_images() == ["accuracy", "attacks", "audit", "extraction", "per_class"]
    for name in page.check_images():
        assert (out / f"{name}.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (out / "shadows").is_dir() and any((out / "shadows").iterdir())
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["whitebox_epsilon_lb"]) == pytest.approx(rows[1]["whitebox_epsilon_lb"])
    assert float(table[1]["extracted_r8"]) == rows[1]["extracted_r8"]
    timing = json.loads((out / "timing.json").read_text())
    assert set(timing["work_seconds"]) == {"train", "shadows", "mia", "audit", "white_box", "extraction"}
    assert timing["this_invocation"]["shadows"]["jobs"] == 4  # 2 per ε: both seeds' data agree
    # continuing reads every report back: nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name not in ("timing.json", MANIFEST)}
    again = run_sweep(cfg, out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name not in ("timing.json", MANIFEST)} == stamps
    assert again == rows
    assert json.loads((out / "timing.json").read_text())["this_invocation"]["train"]["ran"] == 0


def test_attack_options_are_checked():
    with pytest.raises(Exception) as info:
        load_config({**TINY, "attacks": {"mia": {"shadows": 1, "extra": 2}, "lira": {}}})
    message = str(info.value)
    for part in ("shadows must be an integer >= 2", "unknown option 'extra'", "unknown attack 'lira'"):
        assert part in message
    with pytest.raises(Exception) as info:
        load_config({**TINY, "recipe": {**TINY["recipe"], "secrets": "repetitions=1"},
                     "attacks": {"extraction": {"secrets": "repetitions=x", "methods": ["guess"]}}})
    message = str(info.value)
    for part in ("recipe plant secrets and attacks.extraction does too", "attacks.extraction.secrets:",
                 "attacks.extraction.methods must be"):
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


def test_a_process_pool_and_ray_give_the_same_results(tmp_path):
    """Same config, same seeds (dp_seed fixes the noise and the batches): the CSV of a local pool
    of 2 processes, of this process, and of a local Ray instance agree in everything but time."""
    pytest.importorskip("ray", reason="the Ray backend is an optional extra (dptrain[ray])")
    cfg = {**TINY, "recipe": {**TINY["recipe"], "dp_seed": 3},
           "attacks": {"extraction": ATTACKS["extraction"]}}

    def table(out):
        with open(out / "results.csv") as f:
            return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in csv.DictReader(f)]

    def same(rows, others):  # equal, but for the last bits of a float (ε composes the dataset-
        # size count by FFT, whose rounding depends on the process's thread settings: 1e-15)
        def close(a, b):
            try:
                return math.isclose(float(a), float(b), rel_tol=1e-12)
            except ValueError:
                return a == b
        return len(rows) == len(others) and all(
            r.keys() == o.keys() and all(close(r[k], o[k]) for k in r) for r, o in zip(rows, others))

    run_sweep(cfg, tmp_path / "pool", progress=False, workers=2)
    run_sweep(cfg, tmp_path / "ray", progress=False, backend="ray", threads_per_job=1)
    pool, ray_rows = table(tmp_path / "pool"), table(tmp_path / "ray")
    assert len(pool) == 2 and same(pool, ray_rows)
    assert not same(pool, pool[::-1])  # the cells differ: the comparison can fail
    run_sweep(cfg, tmp_path / "here", progress=False, workers=1, threads_per_job=1)
    assert same(table(tmp_path / "here"), pool)


def test_backend_options_are_checked(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    import yaml

    config.write_text(yaml.safe_dump(TINY))
    for extra, part in ((["--workers", "0"], "--workers must be an integer >= 1"),
                        (["--threads-per-job", "0"], "--threads-per-job must be an integer >= 1")):
        assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert part in err and "\n" not in err
    assert not (tmp_path / "o").exists()
