"""What a second command, an edited or damaged file, or an absurd number can do to a run (issue
28): real processes, real exit codes; one line on stderr, no traceback; the directory unchanged
where nothing should change; and no command ever reports an ε below what the run spent."""

import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from test_train_reliability import KILL_AT, TINY, dptrain, one_line_error, tree

from dptrain.accounting import epsilon_of


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A stopped private run (killed right after its first checkpoint) and a finished one."""
    root = tmp_path_factory.mktemp("runs")
    stopped = root / "stopped"
    killed = dptrain("train", *TINY, "--epsilon", "8", "--out", stopped,
                     prelude=KILL_AT.format(module="dptrain.checkpoint", name="save_checkpoint",
                                            nth=1, before="_original(*args, **kwargs)"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = root / "finished"
    done = dptrain("train", *TINY, "--epsilon", "8", "--out", finished)
    assert done.returncode == 0, done.stderr
    return {"stopped": stopped, "finished": finished}


def copy_of(runs, name, tmp_path):
    target = tmp_path / name
    shutil.copytree(runs[name], target)
    return target


def edit_json(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def refused_unchanged(result, directory, before, *expected):
    line = one_line_error(result)
    for text in expected:
        assert text in line, line
    assert tree(directory) == before
    return line


# ------------------------------------------------------------------ one directory, one writer

HOLD = """
import sys, time
from pathlib import Path
from dptrain.rundir import exclusive
with exclusive(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_directory_being_written_is_refused_to_a_second_command_and_freed_by_a_kill(tmp_path):
    """Two `train` into one --out used to both exit 0, the last overwriting the other."""
    out = tmp_path / "X"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "notes.txt").write_text("the first command's")
        before = tree(out)
        line = refused_unchanged(dptrain("train", *TINY, "--out", out), out, before, "in use")
        assert line.startswith("dptrain train: error: --out")
        # an attack writing its default directory inside a run is locked the same way
        (out / "attacks").mkdir()
        holder2 = subprocess.Popen([sys.executable, "-c", HOLD, str(out / "attacks")],
                                   stdout=subprocess.PIPE, text=True)
        assert holder2.stdout.readline().strip() == "held"
        holder2.kill()
        holder2.wait()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the lock goes with the process
        holder.wait()
    from dptrain.rundir import exclusive

    with exclusive(out):  # free again
        pass
    assert tree(out) == before


def test_a_refused_command_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "a" / "b"
    one_line_error(dptrain("train", *TINY, "--epsilon", "1e400", "--out", out))
    one_line_error(dptrain("train", *TINY, "--lr", "-1", "--out", out))
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------ numbers a user types

@pytest.mark.parametrize("flags, expected", [
    (["--epsilon", "1e400"], "too large"),
    (["--epsilon", "nan"], "expected a number"),
    (["--epochs", "1e9"], "cannot be planned"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "-1"], "--nproc must be >= 1"),
    (["--synthetic-per-intent", "100000000"], "at most 10,000"),
], ids=["eps-overflow", "eps-nan", "epochs-1e9", "nproc-0", "nproc-neg", "synthetic-1e8"])
def test_numbers_that_cannot_mean_what_they_say_are_refused(tmp_path, flags, expected):
    """`--epsilon 1e400` used to overflow to inf and train without privacy, silently."""
    out = tmp_path / "o"
    assert expected in one_line_error(dptrain("train", *TINY, *flags, "--out", out))
    assert not out.exists()


# ------------------------------------------------------------------ ε read back, never lowered

def test_an_edited_checkpoint_step_count_is_refused(runs, tmp_path):
    """Step 0 and an empty ledger in state.json used to resume with the spent ε forgotten."""
    run = copy_of(runs, "stopped", tmp_path)

    def forget(state):
        assert state["step"] > 0 and state["ledger"]["history"]
        state["step"] = 0
        state["ledger"]["history"] = []
    edit_json(run / "checkpoint" / "state.json", forget)
    before = tree(run)
    refused_unchanged(dptrain("train", "--resume", "--out", run), run, before,
                      "disagrees with itself", "sampler step")


@pytest.mark.parametrize("damage", ["truncated-weights", "bad-json"])
def test_a_damaged_checkpoint_is_one_line(runs, tmp_path, damage):
    run = copy_of(runs, "stopped", tmp_path)
    if damage == "truncated-weights":
        weights = run / "checkpoint" / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (run / "checkpoint" / "state.json").write_text("{not json")
    before = tree(run)
    refused_unchanged(dptrain("train", "--resume", "--out", run), run, before, "checkpoint")


def test_a_lowered_epsilon_in_privacy_json_is_refused_everywhere(runs, tmp_path):
    """privacy.json's ε set to 0.1 used to be printed by --resume and claimed by attack mia."""
    run = copy_of(runs, "finished", tmp_path)
    record = json.loads((run / "privacy.json").read_text())
    spent = epsilon_of(record["prior"] + record["history"], record["delta"], record["accountant"])
    assert record["epsilon"] == pytest.approx(spent, rel=1e-9)
    edit_json(run / "privacy.json", lambda r: r.update(epsilon=0.1))
    before = tree(run)
    for command in (["train", "--resume", "--out", run],
                    ["attack", "mia", "--run", run, "--shadows", "2", "--quiet"]):
        refused_unchanged(dptrain(*command), run, before, f"spend {spent:.4g}", "edited or corrupted")


def test_epsilon_read_back_is_never_below_its_own_history():
    from dptrain.release import read_privacy

    record = {"private": True, "epsilon": 3.0, "target_epsilon": 3.0, "delta": 1e-5,
              "accountant": "rdp", "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 500,
              "history": [[1.0, 0.01, 500]], "prior": [[20.0, 1.0, 1]]}
    spent = epsilon_of(record["prior"] + record["history"], 1e-5, "rdp")
    assert 1.0 < spent < 3.0
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "privacy.json"
        path.write_text(json.dumps(record))
        assert read_privacy(path)["epsilon"] == 3.0  # a larger record stands (conservative)
        for change, expected in (({"epsilon": spent * 0.99}, "edited or corrupted"),
                                 ({"steps": 400}, "history has 500"),
                                 ({"private": False}, "without privacy but claims"),
                                 ({"history": [[1.0, 0.01, 0]]}, "segments")):
            path.write_text(json.dumps({**record, **change}))
            with pytest.raises(Exception, match=expected):
                read_privacy(path)
        # records written before the history was kept: (σ, q, steps) is the one segment
        old = {k: v for k, v in record.items() if k not in ("history", "prior")}
        path.write_text(json.dumps({**old, "epsilon": 0.5}))
        with pytest.raises(Exception, match="edited or corrupted"):
            read_privacy(path)
        path.write_text(json.dumps({"private": False, "epsilon": "inf"}))
        assert math.isinf(read_privacy(path)["epsilon"])


def test_a_stray_privacy_json_in_a_stopped_run_deletes_nothing(runs, tmp_path):
    """It used to make --resume delete checkpoint/ and then fail: the run was lost."""
    run = copy_of(runs, "stopped", tmp_path)
    shutil.copy(runs["finished"] / "privacy.json", run / "privacy.json")
    before = tree(run)
    refused_unchanged(dptrain("train", "--resume", "--out", run), run, before,
                      "not a finished run", "metrics.json")
    (run / "privacy.json").unlink()  # the way out it names: resume from the checkpoint
    result = dptrain("train", "--resume", "--out", run)
    assert result.returncode == 0, result.stderr
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["steps"] == privacy["planned_steps"]


# ------------------------------------------------------------------ damaged model files

def test_a_damaged_model_is_one_line_for_every_reader(runs, tmp_path):
    run = copy_of(runs, "finished", tmp_path)
    weights = next((run / "model").rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:64])
    before = tree(run)
    for command, name in ((["check", "--model", run / "model"], "check"),
                          (["attack", "mia", "--run", run, "--shadows", "2", "--quiet"], "attack mia"),
                          (["train", *TINY, "--model", run / "model", "--out", tmp_path / "o"], "train")):
        line = refused_unchanged(dptrain(*command), run, before)
        assert line.startswith(f"dptrain {name}: error:"), line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ sweep configs

def test_sweep_config_paths_resolve_once_and_lists_are_lists(tmp_path, monkeypatch):
    """A relative `data:` used to make a sweep impossible to continue (the runs record the
    absolute path); `epsilons: 8` used to be a TypeError."""
    from experiments.sweep import load_config

    (tmp_path / "tickets.csv").write_text("text,label\n")
    monkeypatch.chdir(tmp_path)
    relative = load_config({"data": "tickets.csv", "epsilons": [8], "seeds": [0]})
    absolute = load_config({"data": str(tmp_path / "tickets.csv"), "epsilons": [8], "seeds": [0]})
    assert relative.to_dict() == absolute.to_dict()
    assert relative.data == str((tmp_path / "tickets.csv").resolve())
    for raw, expected in (({"epsilons": 8}, "epsilons must be a list"),
                          ({"seeds": 0}, "seeds must be a list"),
                          ({"epsilons": [1000]}, "is not a number in (0, 100]"),
                          ({"attacks": {"mia": {"shadows": 3}}}, "must be even")):
        with pytest.raises(Exception, match=expected.replace("(", r"\(").replace("]", r"\]")):
            load_config({"data": "synthetic", "epsilons": [8], "seeds": [0], **raw})


def test_sweep_problems_that_need_the_data_are_refused_before_writing(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent("""\
        data: synthetic
        model: tiny
        epsilons: [8]
        seeds: [0]
        recipe: {synthetic_per_intent: 12, epochs: 1, delta: 0.5}
    """))
    out = tmp_path / "sweep"
    line = one_line_error(dptrain("sweep", "--config", config, "--out", out, "--quiet"))
    assert "delta must be < 1/N" in line
    assert not out.exists()


# ------------------------------------------------------------------ a killed white-box audit

def test_a_killed_white_box_audit_says_why_and_starts_over_in_place(tmp_path):
    """`audit --resume` used to say 'no audit.json and canaries.json' beside its audit.json,
    and a fresh white-box audit into that directory was refused."""
    out = tmp_path / "wb"
    command = ["audit", "--white-box", "--model", "tiny", "--data", "synthetic",
               "--synthetic-per-intent", "12", "--epochs", "2", "--batch-size", "32",
               "--canaries", "200", "--epsilon", "4", "--quiet", "--out", out]
    killed = dptrain(*command, prelude=KILL_AT.format(
        module="dptrain.checkpoint", name="save_checkpoint", nth=1,
        before="_original(*args, **kwargs)"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "audit.json").exists() and (out / "run" / "checkpoint").exists()
    before = tree(out)
    refused_unchanged(dptrain("audit", "--resume", "--out", out), out, before,
                      "white-box audit that stopped", "run the same dptrain audit --white-box")
    again = dptrain(*command)
    assert again.returncode == 0, again.stderr
    assert (out / "report.json").exists() and (out / "run" / "privacy.json").exists()
