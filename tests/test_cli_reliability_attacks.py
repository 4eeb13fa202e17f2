"""`dptrain attack mia`, `audit` and `demo` as a user runs them: real processes, real exit codes,
real SIGKILLs.

Every refusal must be one line on stderr (no traceback), exit code 2, and leave every directory
as it was, byte for byte. Every crash — a SIGKILL at a chosen moment — must be recoverable by
running the command again (``audit --resume``, ``demo`` again). Outputs follow one policy
(:mod:`dptrain.outputs`): a command replaces or reuses only what its manifest says it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dptrain import TrainConfig, rundir, train_run
from dptrain.outputs import MANIFEST, OutputDir, check_writable

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
TINY = TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=2, epochs=1, batch_size=8,
                   physical_batch_size=16, epsilon=8.0, dp_seed=0)


def dptrain(*args, prefix=(), timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "dptrain", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def refused(proc: subprocess.CompletedProcess, command: str, *expected: str) -> str:
    """Exit 2, one line on stderr that starts with the full sub-command, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"dptrain {command}: error: "), err
    for text in expected:
        assert text in err, err
    return err


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of its bytes (``/`` for directories)."""
    return {str(p.relative_to(root)): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*"))}


def kill_when(args, ready, timeout: float = 120.0, stdout: Path | None = None) -> None:
    """Start ``dptrain *args`` and SIGKILL it as soon as ``ready()`` holds (its unbuffered
    stdout into the file ``stdout``, if given)."""
    sink = open(stdout, "w") if stdout is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "dptrain", *map(str, args)],
                            env={**ENV, "PYTHONUNBUFFERED": "1"}, stdout=sink,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"dptrain {args[0]} ended (code {proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        if stdout is not None:
            sink.close()
    assert proc.returncode == -signal.SIGKILL


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def read_only(directory: Path) -> list[str]:
    """Make ``directory`` read-only for the command that the returned prefix starts.

    As a normal user: chmod 555 (the test restores it). As root, who ignores permissions: a
    read-only bind mount inside a private mount namespace (``unshare``), seen by that process
    alone.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    if not _unshare_works():
        pytest.skip("running as root without unshare: no way to make a directory read-only")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, str(directory)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny private run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("reliability") / "runs" / "target"
    train_run(TINY, out, progress=False)
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    copy = tmp_path / "runs" / "target"
    shutil.copytree(run_dir, copy)
    return copy


# ---------------------------------------------------------------------------------------------
# The policy itself
# ---------------------------------------------------------------------------------------------


def test_output_dir_replaces_only_its_own_unchanged_files(tmp_path):
    out = OutputDir(tmp_path / "out", "dptrain test")
    assert out.check(files=["a.json"]) == [] and not out.path.exists()  # nothing created
    out.write_json("a.json", {"x": 1})
    assert out.check(files=["a.json"]) == ["a.json"] and out.owns("a.json")
    out.write_json("a.json", {"x": 2})  # its own: replaced
    manifest = json.loads((out.path / MANIFEST).read_text())
    assert manifest["files"]["a.json"] == {
        "by": "dptrain test", "sha256": hashlib.sha256((out.path / "a.json").read_bytes()).hexdigest()}
    assert not OutputDir(out.path, "dptrain other").owns("a.json")  # another command's
    (out.path / "a.json").write_text("edited by hand")
    with pytest.raises(Exception, match="a.json, which dptrain test did not write"):
        out.check(files=["a.json"])
    (out.path / "b.json").write_text("the user's")
    with pytest.raises(Exception, match="b.json"):
        out.check(files=["b.json"])


def test_a_write_killed_between_manifest_and_file_is_still_recognised(tmp_path, monkeypatch):
    """The manifest names the new bytes before the file is replaced, and keeps the old ones'
    until the replacement is done: at every moment the file on disk is known to be ours."""
    import dptrain.rundir

    out = OutputDir(tmp_path, "dptrain test")
    out.write_bytes("f.bin", b"old")
    real = dptrain.rundir.write_bytes_atomic

    def killed(path, data):
        if Path(path).name == "f.bin":
            assert out.owns("f.bin")  # old bytes, manifest already naming the new ones
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(dptrain.rundir, "write_bytes_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        out.write_bytes("f.bin", b"new")
    monkeypatch.undo()
    assert out.owns("f.bin") and out.check(files=["f.bin"]) == ["f.bin"]
    (tmp_path / "f.bin").write_bytes(b"new")  # as if the rename had happened
    assert out.owns("f.bin")


@pytest.mark.parametrize("where", ["/proc/x/out", "/sys/x", "file"])
def test_check_writable_refuses_without_writing(tmp_path, where):
    if where == "file":
        (tmp_path / "file").write_text("x")
        where = str(tmp_path / "file" / "out")
    before = snapshot(tmp_path)
    with pytest.raises(Exception, match="--out"):
        check_writable(where, f"--out {where}")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# dptrain attack mia
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [True, False], ids=["--out", "default RUN/attacks"])
def test_mia_never_overwrites_a_report_it_did_not_write(run_copy, tmp_path, given):
    out = tmp_path / "mine" if given else run_copy / "attacks"
    out.mkdir()
    (out / "report.json").write_text('{"my": "notes"}')
    before = snapshot(tmp_path)
    args = ["attack", "mia", "--run", run_copy, "--shadows", "2", "--quiet"]
    err = refused(dptrain(*args, *(["--out", out] if given else [])), "attack mia",
                  f"{out} ", "report.json, which dptrain attack mia did not write")
    assert ("(default --out)" in err) != given
    assert snapshot(tmp_path) == before  # no shadow cache either: refused before any work


def test_mia_replaces_its_own_report_and_says_so(run_copy, tmp_path):
    out = tmp_path / "report"
    args = ["attack", "mia", "--run", run_copy, "--attacks", "loss", "--out", out, "--quiet"]
    first = dptrain(*args)
    assert first.returncode == 0, first.stderr
    assert "replacing" not in first.stdout
    second = dptrain(*args)
    assert second.returncode == 0, second.stderr
    assert (f"replacing what dptrain attack mia wrote earlier in {out}: "
            "scores.npz, roc.png, report.json") in second.stdout
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == {"scores.npz", "roc.png", "report.json"}
    # edited since: no longer what the command wrote, so refused like a stranger's file
    report = out / "report.json"
    report.write_text(report.read_text().replace('"verdict"', '"verdict_edited"'))
    before = snapshot(tmp_path)
    refused(dptrain(*args), "attack mia", "report.json", "changed since")
    assert snapshot(tmp_path) == before


def unwritable_out(tmp_path: Path, where: str) -> tuple[Path, list]:
    """An --out that cannot be written, and the command prefix that makes it so."""
    if where == "read-only":
        out = tmp_path / "ro"
        return out, read_only(out)
    if where == "under a file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "out", []
    return Path(where), []


@pytest.mark.parametrize("where", ["read-only", "/proc/x", "under a file"])
def test_mia_unwritable_out_fails_at_once(run_copy, tmp_path, where):
    out, prefix = unwritable_out(tmp_path, where)
    before = snapshot(tmp_path)
    started = time.monotonic()
    proc = dptrain("attack", "mia", "--run", run_copy, "--shadows", "2", "--out", out,
                   "--quiet", prefix=prefix)
    refused(proc, "attack mia", f"--out {out}")
    assert time.monotonic() - started < 20  # no model loaded, no shadow trained (was 26 s)
    assert snapshot(tmp_path) == before


def test_mia_suggests_resume_only_for_a_run_with_a_checkpoint(run_copy):
    (run_copy / "privacy.json").unlink()
    err = refused(dptrain("attack", "mia", "--run", run_copy), "attack mia", "unfinished run",
                  "stopped before its first checkpoint")
    assert "--resume" not in err
    (run_copy / "checkpoint").mkdir()
    (run_copy / "checkpoint" / "state.json").write_text("{}")
    refused(dptrain("attack", "mia", "--run", run_copy), "attack mia",
            f"dptrain train --resume --out {run_copy}")


def test_verbose_after_the_subcommand_and_full_command_in_errors(tmp_path):
    from dptrain.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "-v", "--out", "x"]).verbose is True
    assert parse(["-v", "train", "--out", "x"]).verbose is True  # the top-level flag stays
    assert parse(["train", "--out", "x"]).verbose is False
    assert parse(["attack", "mia", "--verbose", "--run", "r"]).verbose is True
    assert parse(["audit", "-v", "--out", "x"]).verbose is True
    assert parse(["demo", "-v"]).verbose is True
    missing = tmp_path / "missing"
    refused(dptrain("attack", "mia", "-v", "--run", missing), "attack mia",
            f"run directory {missing} not found")
    refused(dptrain("train", "-v", "--data", missing, "--out", tmp_path / "o"), "train",
            "missing")


# ---------------------------------------------------------------------------------------------
# dptrain audit
# ---------------------------------------------------------------------------------------------

AUDIT = ["audit", "--model", "tiny", "--data", "synthetic", "--synthetic-per-intent", "2",
         "--epochs", "4", "--batch-size", "16", "--physical-batch-size", "64", "--dp-seed", "1",
         "--canaries", "20", "--canary-seed", "3", "--epsilon", "4", "--quiet"]


@pytest.mark.parametrize("where", ["read-only", "/proc/x", "under a file"])
def test_audit_unwritable_out_is_one_line(tmp_path, where):
    out, prefix = unwritable_out(tmp_path, where)
    before = snapshot(tmp_path)
    refused(dptrain(*AUDIT, "--out", out, prefix=prefix), "audit", f"--out {out}")
    assert snapshot(tmp_path) == before


def test_audit_recipe_refused_by_the_trainer_leaves_nothing(tmp_path):
    """The canaries are stored before training; a recipe the trainer refuses takes them back."""
    out = tmp_path / "new" / "audit"
    before = snapshot(tmp_path)
    refused(dptrain(*AUDIT, "--batch-size", "500", "--out", out), "audit",
            "batch_size must be <=")
    assert snapshot(tmp_path) == before


def _canaries(out: Path) -> dict:
    stored = json.loads((out / "canaries.json").read_text())
    return {k: stored[k] for k in ("texts", "labels", "included", "num_natural", "seed")}


def test_audit_resumes_from_its_checkpoint_after_sigkill(tmp_path):
    out = tmp_path / "audit"
    state = out / "run" / "checkpoint" / "state.json"
    kill_when([*AUDIT, "--checkpoint-every", "2", "--out", out], state.exists)
    assert not (out / "run" / "privacy.json").exists() and not (out / "report.json").exists()
    canaries = _canaries(out)  # stored before training began
    steps_done = json.loads(state.read_text())["step"]

    before = snapshot(tmp_path)
    refused(dptrain(*AUDIT, "--out", out), "audit", "stopped audit",
            f"dptrain audit --resume --out {out}")
    refused(dptrain("audit", "--resume", "--epsilon", "3", "--out", out), "audit",
            "drop --epsilon")
    assert snapshot(tmp_path) == before

    proc = dptrain("audit", "--resume", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "resuming (from its checkpoint)" in proc.stdout
    assert _canaries(out) == canaries  # the same canaries and coins
    report = json.loads((out / "report.json").read_text())
    privacy = json.loads((out / "run" / "privacy.json").read_text())
    # the ε of the steps taken before the kill is kept: the ledger holds every planned step
    assert privacy["steps"] == privacy["planned_steps"] > steps_done
    assert sum(h[2] for h in privacy["history"]) == privacy["planned_steps"]
    assert 3.5 < privacy["epsilon"] <= 4.0
    assert report["theoretical"] == privacy and report["canaries"]["seed"] == 3
    n = canaries["num_natural"]
    members = json.loads((out / "run" / rundir.MEMBERS).read_text())["member_ids"]
    assert members == list(range(n)) + [n + i for i, c in enumerate(canaries["included"]) if c]

    finished = snapshot(tmp_path)
    refused(dptrain("audit", "--resume", "--out", out), "audit", "finished audit")
    assert snapshot(tmp_path) == finished


def test_audit_killed_before_its_first_checkpoint_restarts_with_the_same_canaries(tmp_path):
    out = tmp_path / "audit"
    # --checkpoint-every beyond the run's steps: no checkpoint is ever written
    kill_when([*AUDIT, "--checkpoint-every", "1000", "--out", out],
              (out / "run" / rundir.CONFIG).exists)
    canaries = _canaries(out)
    proc = dptrain("audit", "--resume", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "restarting (it stopped before its first checkpoint)" in proc.stdout
    assert _canaries(out) == canaries
    assert json.loads((out / "report.json").read_text())["canaries"]["m"] == 20


def test_audit_resume_refuses_what_is_not_a_stopped_audit(tmp_path):
    refused(dptrain("audit", "--resume", "--out", tmp_path / "none"), "audit", "not found")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    refused(dptrain("audit", "--resume", "--out", other), "audit", "no stopped audit")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# dptrain demo
# ---------------------------------------------------------------------------------------------

DEMO = ["demo", "--quick", "--model", "tiny", "--quiet"]


@pytest.mark.parametrize("name", ["report.html", "results.csv", "cells/notes.txt"])
def test_demo_never_overwrites_what_it_did_not_write(tmp_path, name):
    out = tmp_path / "demo"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_text("the user's")
    before = snapshot(tmp_path)
    refused(dptrain(*DEMO, "--out", out), "demo", f"--out {out} already holds "
            f"{name.split('/')[0] + ('/' if '/' in name else '')}", "dptrain demo did not write")
    assert snapshot(tmp_path) == before


def test_demo_with_a_model_the_trainer_refuses_leaves_nothing(tmp_path):
    out = tmp_path / "demo"
    before = snapshot(tmp_path)
    refused(dptrain(*DEMO, "--model", tmp_path / "no-such-model", "--out", out), "demo",
            "no-such-model")
    assert snapshot(tmp_path) == before


def _finished_demo(out: Path, proc: subprocess.CompletedProcess) -> None:
    import csv

    assert proc.returncode == 0, proc.stderr
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["target_epsilon"] for r in rows] == ["inf", "8.0", "1.0"]
    for eps in ("inf", "8", "1"):
        privacy = json.loads((out / "cells" / "default" / "seed0" / f"eps{eps}" / "privacy.json").read_text())
        assert privacy["steps"] == privacy["planned_steps"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["dirs"]) == {"cells", "shadows", "audits", "whitebox"}
    assert {"sweep.json", "results.csv", "report.html", "timing.json"} <= set(manifest["files"])


def test_demo_killed_before_and_after_a_checkpoint_restarts_resumes_and_reports(tmp_path):
    """The main job, quick version (∞ / 8 / 1, every attack and audit, the report, the table),
    run as a user whose machine dies twice: killed before the first cell's first checkpoint,
    the demo restarts that cell; killed after the next cell's checkpoint, it resumes that one
    from it. A cell's line is printed when its job ends."""
    out = tmp_path / "demo"
    cells = out / "cells" / "default" / "seed0"
    kill_when([*DEMO, "--out", out], (cells / "epsinf" / "config.json").exists)
    assert not (cells / "epsinf" / "checkpoint").exists()
    assert not (cells / "epsinf" / "privacy.json").exists()
    log = tmp_path / "restart.log"
    kill_when([*DEMO, "--out", out], (cells / "eps8" / "checkpoint" / "state.json").exists,
              stdout=log)
    assert "train default/seed0/ε=inf: restarted (it stopped before its first checkpoint)" in \
        log.read_text()
    assert (cells / "epsinf" / "privacy.json").exists()
    assert not (cells / "eps8" / "privacy.json").exists()
    proc = dptrain(*DEMO, "--out", out)
    _finished_demo(out, proc)
    assert "train default/seed0/ε=8: resumed (from its checkpoint)" in proc.stdout
    assert "ε=inf: resumed" not in proc.stdout and "ε=inf: restarted" not in proc.stdout

    # what the finished demo holds (this chain is also the suite's one full demo: ~50 s each)
    import csv

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows[1:]:
        spent, target = float(r["epsilon"]), float(r["target_epsilon"])
        assert 0.9 * target < spent <= target
        # no audit or attack may prove more leakage than the claim: that would be a privacy bug
        for key in ("mia_epsilon_lb_cp", "audit_epsilon_lb", "whitebox_epsilon_lb"):
            assert 0.0 <= float(r[key]) <= spent
    assert float(rows[0]["whitebox_epsilon_lb"]) > float(rows[2]["epsilon"])  # ∞: the audit sees it
    for name in ("report.html", "accuracy.png", "attacks.png", "audit.png", "extraction.png",
                 "per_class.png", "timing.json"):
        assert (out / name).stat().st_size > 0
    for word in ("ε target", "MIA TPR@1%", "white-box ε≥", "Where to look", "report.html"):
        assert word in proc.stdout

    # a second demo reuses every run and report: nothing is trained or attacked again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("report.json")}
    again = dptrain(*DEMO, "--out", out)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("report.json")} == stamps
    assert json.loads((out / "timing.json").read_text())["this_invocation"]["train"]["ran"] == 0

    # a report the user edited since is theirs: refused, one line, left as it is
    (out / "report.html").write_text("my notes")
    refused(dptrain(*DEMO, "--out", out), "demo", "report.html")
    assert (out / "report.html").read_text() == "my notes"


def test_demo_refuses_a_run_of_another_recipe(tmp_path):
    from dptrain.demo import demo_config
    from dptrain.errors import ConfigError
    from experiments.sweep import run_plan

    run = tmp_path / "eps_8"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.json").write_text("{}")
    saved = TrainConfig(**{**demo_config("tiny", quick=True).to_dict(), "epsilon": 8.0})
    (run / "config.json").write_text(json.dumps({"config": saved.to_dict()}))
    assert run_plan(run, saved) == "resume"
    # what the trainer chose for the recipe's 'auto' fields is recorded, and matches them
    chosen = {f: "all" for f in ("trainable",) if saved.trainable == "auto"}
    (run / "config.json").write_text(json.dumps({"config": {**saved.to_dict(), **chosen}}))
    assert run_plan(run, saved) == "resume"
    wanted = TrainConfig(**{**demo_config("tiny", quick=False).to_dict(), "epsilon": 8.0})
    with pytest.raises(ConfigError, match="stopped run of another recipe"):
        run_plan(run, wanted)
    (run / "checkpoint" / "state.json").unlink()
    assert run_plan(run, wanted) == "restart"
