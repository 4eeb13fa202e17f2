"""What a new user and a crash can do to `dptrain train`: one line and exit 2 on bad input with
nothing written, a privacy record that is right at every step, and a finished run that stays
final. Crashes are real SIGKILLs of a real process at the named point."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dptrain.accounting import epsilon_after

TINY = ["--model", "tiny", "--data", "synthetic", "--synthetic-per-intent", "12", "--epochs", "2",
        "--batch-size", "32", "--physical-batch-size", "16", "--quiet"]


def dptrain(*args, cwd=None, prelude=""):
    """Run the real command in a fresh interpreter; ``prelude`` is Python run before main()
    (used to SIGKILL the process at a named point)."""
    code = f"import sys\n{prelude}\nfrom dptrain.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def tree(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


KILL_AT = """
import os, signal
import {module} as _target
_original = _target.{name}
_calls = []
def _killer(*args, **kwargs):
    _calls.append(1)
    if len(_calls) == {nth}:
        {before}
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(*args, **kwargs)
_target.{name} = _killer
"""


@pytest.mark.parametrize("flags, expected", [
    (["--delta", "0.5"], "delta must be < 1/N"),
    (["--epsilon", "1e-9"], "epsilon"),
    (["--dp-seed", "-1"], "dp_seed must be an integer in [0, 2^32)"),
    (["--seed", "-1"], "seed must be an integer in [0, 2^32)"),
    (["--max-length", "1000"], "max_length must be <= 128"),
], ids=["delta", "unreachable-eps", "dp-seed", "seed", "max-length"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, flags, expected):
    out = tmp_path / "run"
    line = one_line_error(dptrain("train", *TINY, *flags, "--out", out))
    assert expected in line
    assert not out.exists()


def test_unwritable_out_is_one_line(tmp_path):
    line = one_line_error(dptrain("train", *TINY, "--out", "/proc/dptrain-cannot-be-here"))
    assert "--out /proc/dptrain-cannot-be-here is not writable" in line


def test_pickled_model_directory_is_refused_without_unpickling(tmp_path):
    import torch
    from transformers import BertConfig

    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=37).save_pretrained(model_dir)
    marker = tmp_path / "unpickled"

    class Bomb:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"bomb": Bomb()}, model_dir / "pytorch_model.bin")
    out = tmp_path / "run"
    line = one_line_error(dptrain("train", "--model", model_dir, "--data", "synthetic",
                                  "--synthetic-per-intent", "12", "--quiet", "--out", out))
    assert "holds only pickled weights (pytorch_model.bin)" in line
    assert not marker.exists() and not out.exists()


def test_divergence_stops_with_one_line_and_records_the_spent_epsilon(tmp_path):
    out = tmp_path / "run"
    line = one_line_error(dptrain("train", *TINY, "--max-grad-norm", "1", "--lr", "1e30",
                                  "--dp-seed", "3", "--out", out))
    assert "training diverged at step" in line and "lower --lr" in line
    record = json.loads((out / "diverged.json").read_text())
    assert record["epsilon_spent"] > 0 and not (out / "privacy.json").exists()


def test_non_numeric_epsilon_in_a_saved_config_is_one_line(tmp_path):
    out = tmp_path / "run"
    killed = dptrain("train", *TINY, "--epochs", "3", "--checkpoint-every", "2", "--out", out,
                     prelude=KILL_AT.format(module="dptrain.checkpoint", name="save_checkpoint",
                                            nth=2, before="pass"))
    assert killed.returncode == -signal.SIGKILL
    saved = json.loads((out / "config.json").read_text())
    saved["config"]["epsilon"] = "eight"
    (out / "config.json").write_text(json.dumps(saved))
    before = tree(out)
    line = one_line_error(dptrain("train", "--resume", "--out", out))
    assert "epsilon must be a number or 'inf', got 'eight'" in line
    assert tree(out) == before


def test_every_curve_point_is_the_epsilon_spent_at_that_step(tmp_path):
    out = tmp_path / "run"
    result = dptrain("train", *TINY, "--epochs", "3", "--batch-size", "50", "--dp-seed", "1",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    privacy = json.loads((out / "privacy.json").read_text())
    curves = json.loads((out / "curves.json").read_text())
    q, sigma = privacy["sample_rate"], privacy["noise_multiplier"]
    for point in curves:
        exact = epsilon_after(noise_multiplier=sigma, sample_rate=q, steps=point["step"],
                              delta=privacy["delta"], prior=privacy["prior"])
        assert point["epsilon"] == pytest.approx(exact, rel=1e-9)
        assert point["epoch"] == pytest.approx(point["step"] * q)
    assert curves[-1]["step"] == privacy["steps"]
    assert curves[-1]["epoch"] == pytest.approx(3.0, abs=q)  # the axis ends where training ended
    assert curves[-1]["epsilon"] == pytest.approx(privacy["epsilon"], rel=1e-9)


def test_crash_after_the_commit_point_never_retrains(tmp_path):
    """Killed after privacy.json (the commit point) but before the checkpoint is removed:
    attacks may already read the model, so --resume only finishes the bookkeeping."""
    out = tmp_path / "run"
    killed = dptrain("train", *TINY, "--out", out,
                     prelude=KILL_AT.format(module="dptrain.trainer", name="finish_bookkeeping",
                                            nth=1, before="pass"))
    assert killed.returncode == -signal.SIGKILL
    assert (out / "privacy.json").exists() and (out / "checkpoint").exists()
    model_before = tree(out / "model")
    result = dptrain("train", "--resume", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "finished run" in result.stderr
    assert tree(out / "model") == model_before
    assert not (out / "checkpoint").exists()


KILL_IN_SECOND_CHECKPOINT = """
import os, signal
import dptrain.rundir as _rundir
_original, _seen = _rundir.replace_dir, []
def _replace_dir(target, fill):
    if target.name == "checkpoint":
        _seen.append(1)
        if len(_seen) == 2:  # the second checkpoint dies half-written
            def fill_then_die(tmp):
                fill(tmp)
                os.kill(os.getpid(), signal.SIGKILL)
            return _original(target, fill_then_die)
    return _original(target, fill)
_rundir.replace_dir = _replace_dir
"""


def test_interrupted_checkpoint_write_leaves_nothing_after_resume(tmp_path):
    """A kill half-way through writing the second checkpoint leaves a temporary behind; the
    resume removes it and finishes. The run is seeded and stopped on 2 threads and resumes on 1:
    the noise streams do not depend on the thread count (it used to fail: 'noise state must
    hold 1 generator states, got 2')."""
    out = tmp_path / "run"
    killed = dptrain("train", *TINY, "--epochs", "3", "--checkpoint-every", "1", "--dp-seed", "5",
                     "--out", out, prelude="import torch; torch.set_num_threads(2)\n"
                     + KILL_IN_SECOND_CHECKPOINT)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers, "the kill was meant to leave a checkpoint-sized temporary behind"
    result = dptrain("train", "--resume", "--out", out, prelude="import torch; torch.set_num_threads(1)")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["steps"] == privacy["planned_steps"]


def test_relative_data_path_works_from_another_directory(tmp_path):
    data = tmp_path / "work" / "intents.csv"
    data.parent.mkdir()
    rows = [f"please {verb} item {i},{label}" for i in range(24)
            for verb, label in (("open", "open"), ("close", "close"))]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    # (a declared public size: a counted one of 38 rows, ±20, can fall below the batch)
    result = dptrain("train", "--model", "tiny", "--data", "intents.csv", "--epochs", "1",
                     "--batch-size", "16", "--dataset-size", "48", "--quiet", "--out", out,
                     cwd=data.parent)
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "config.json").read_text())["config"]["data"]
    assert Path(saved) == data.resolve()


def test_every_train_flag_states_its_default_once():
    from dptrain.cli import build_parser

    from dataclasses import fields

    from dptrain.trainer import TrainConfig

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    config_flags = {f.name for f in fields(TrainConfig)}
    checked = [a for a in train._actions if a.dest in config_flags]
    assert len(checked) == len(config_flags)
    for action in checked:
        assert action.help.count("default") == 1, (action.dest, action.help)
    delta = next(a for a in train._actions if a.dest == "delta")
    assert "OS entropy" not in delta.help and "min(1e-5, 1/(10 N))" in delta.help


def test_run_directory_files_have_one_mode(tmp_path):
    out = tmp_path / "run"
    result = dptrain("train", *TINY, "--epochs", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    modes = {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    mask = os.umask(0)
    os.umask(mask)
    assert modes == {oct(0o666 & ~mask)}


def test_a_model_that_learned_nothing_is_flagged_everywhere(tmp_path, capsys):
    """The random tiny model after two steps is at chance level: the CLI summary, metrics.json
    and the attack report all say so (a model that learned nothing proves nothing)."""
    from dptrain.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--data", "synthetic", "--synthetic-per-intent", "12",
                 "--epochs", "0.2", "--batch-size", "64", "--quiet", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "is at chance level" in out and "learned nothing" in out
    chance = json.loads((run / "metrics.json").read_text())["chance_level"]
    assert chance["learned"] is False and chance["p_value"] > 0.01
    assert main(["attack", "mia", "--run", str(run), "--attacks", "loss", "--quiet"]) == 0
    report = json.loads((run / "attacks" / "report.json").read_text())
    assert report["target"]["learned"] is False
    assert any("at chance level" in line for line in report["summary"])


def test_chance_level_is_a_one_sided_binomial_test_against_the_majority_class():
    import numpy as np

    from dptrain.trainer import chance_level

    labels = np.array([0] * 60 + [1] * 20 + [2] * 20)
    lucky = chance_level(labels, np.zeros(100, dtype=int))  # always the majority: 0.60
    assert lucky["majority_class_accuracy"] == 0.6 and not lucky["learned"]
    good = chance_level(labels, labels)  # 100 of 100 against p = 0.6: p-value 0.6^100
    assert good["learned"] and good["p_value"] == pytest.approx(0.6 ** 100)


def test_stalled_needs_patience_evaluations_without_a_new_best():
    from dptrain.trainer import stalled

    curve = lambda *losses: [{"val_loss": v} for v in losses]  # noqa: E731
    assert not stalled(curve(3, 2, 2.5), 0)
    assert stalled(curve(3, 2, 2.5), 1) and not stalled(curve(3, 2, 1.9), 1)
    assert not stalled(curve(3, 2, 2.5), 2)  # 3 is beaten by 2 inside the window
    assert stalled(curve(1, 2, 2.5), 2)
    assert not stalled(curve(1, 2), 2)  # fewer evaluations than patience + 1


def test_early_stopping_ends_the_run_and_records_the_steps_it_took(tmp_path, monkeypatch):
    """A validation loss that only rises stops a DP run after patience + 1 evaluations; ε is
    what those steps spent (less than the target), and the plan is recorded beside it."""
    import dptrain.trainer as trainer
    from dptrain import TrainConfig, train_run

    real = trainer.evaluate
    calls = []

    def rising(net, batches, split, **kw):
        result = real(net, batches, split, **kw)
        if split == "validation":
            calls.append(1)
            result["loss"] = float(len(calls))
        return result

    monkeypatch.setattr(trainer, "evaluate", rising)
    config = TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=12, epochs=10,
                         batch_size=32, epsilon=4.0, delta=1e-4, early_stopping=2, dp_seed=0)
    summary = train_run(config, tmp_path / "run", progress=False)
    curves = json.loads((tmp_path / "run" / "curves.json").read_text())
    assert len(curves) == 3  # one evaluation per epoch: the loss rose twice after the first
    privacy = summary.privacy
    assert curves[-1]["step"] == privacy["steps"] < privacy["planned_steps"]
    assert 3.0 <= curves[-1]["epoch"] < 3.0 + privacy["sample_rate"] + 1e-9
    assert privacy["epsilon"] == pytest.approx(curves[-1]["epsilon"]) and privacy["epsilon"] < 4.0
