"""End to end through the command line on a tiny model: files, numbers, resume, bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant

from dptrain import TrainConfig, train_run
from dptrain.cli import main

TINY_RUN = ["--model", "tiny", "--data", "synthetic", "--synthetic-per-intent", "12",
            "--epochs", "2", "--batch-size", "32", "--physical-batch-size", "16", "--quiet"]


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(run: Path, name: str):
    return json.loads((run / name).read_text())


def test_private_run_writes_every_file_with_consistent_numbers(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(["train", *TINY_RUN, "--epsilon", "3", "--delta", "1e-4",
                              "--dp-seed", "7", "--out", str(run)], capsys)
    assert code == 0, err
    for name in ("config.json", "privacy.json", "metrics.json", "private/members.json", "curves.json",
                 "curves.png", "README.txt", "model/model.safetensors", "model/config.json",
                 "model/tokenizer.json"):
        assert (run / name).exists(), name
    assert not (run / "checkpoint").exists()  # removed once the run finished

    privacy, config, members = read(run, "privacy.json"), read(run, "config.json"), read(run, "private/members.json")
    n_train = members["num_train_rows"]
    assert members["num_members"] == n_train == len(members["member_ids"]) == 288
    assert "train" not in config["data"]["sizes"] and "train_fingerprint" not in config["data"]
    # q, steps and the recipe come from the released Gaussian count of N, not from N
    size = privacy["dataset_size"]
    assert size == config["config"]["dataset_size"] != n_train and abs(size - n_train) < 5 * 20
    assert privacy["semantics"]["dataset_size"]["value"] == size
    assert privacy["sample_rate"] == pytest.approx(32 / size)
    assert privacy["steps"] == privacy["planned_steps"] == round(2 / privacy["sample_rate"])
    assert 2.9 < privacy["epsilon"] <= 3.0 and privacy["target_epsilon"] == 3.0
    assert privacy["delta"] == 1e-4 and privacy["accountant"] == "prv"
    assert privacy["prior"] == [[20.0, 1.0, 1]] and "num_examples" not in privacy
    # the reported ε is what Opacus' accountant says for the count composed with (σ, q, steps)
    acc = PRVAccountant()
    acc.history = [(20.0, 1.0, 1), (privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"])]
    assert acc.get_epsilon(delta=1e-4) == pytest.approx(privacy["epsilon"], rel=1e-6)
    assert "train_loss" not in read(run, "curves.json")[0]
    assert [c["step"] for c in read(run, "private/train_curves.json")] == [c["step"] for c in read(run, "curves.json")]

    metrics = read(run, "metrics.json")
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    assert len(metrics["per_class"]) == 30
    support = sum(c["support"] for c in metrics["per_class"].values())
    assert support == metrics["num_test"] == config["data"]["sizes"]["test"]
    curves = read(run, "curves.json")
    assert [round(c["epoch"]) for c in curves] == [1, 2]
    assert curves[-1]["epsilon"] == pytest.approx(privacy["epsilon"])
    assert "ε spent" in out and "run written to" in out

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.num_labels == 30 and model.config.id2label[0] == config["data"]["label_names"][0]
    assert tok("check my balance")["input_ids"][0] == tok.cls_token_id


def test_non_private_baseline_uses_the_same_recipe(tmp_path, capsys):
    run = tmp_path / "base"
    code, _, err = run_cli(["train", *TINY_RUN, "--epsilon", "inf", "--synthetic-per-intent", "30",
                            "--epochs", "8", "--lr", "5e-3", "--dp-seed", "0", "--out", str(run)], capsys)
    assert code == 0, err
    privacy = read(run, "privacy.json")
    assert privacy["private"] is False and privacy["epsilon"] == "inf"
    assert privacy["noise_multiplier"] == 0.0
    # the tiny model learns the synthetic intents far above chance (1/30) without noise
    assert read(run, "metrics.json")["accuracy"] > 0.5


class Crash(Exception):
    pass


def crash_at(step):
    def hook(done):
        if done == step:
            raise Crash(f"simulated crash after step {done}")
    return hook


def test_resume_after_crash_matches_an_uninterrupted_run(tmp_path):
    config = TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=12, epochs=2,
                         batch_size=32, physical_batch_size=16, epsilon=2.0, delta=1e-4,
                         dp_seed=3, checkpoint_every=4)
    whole = train_run(config, tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        train_run(config, tmp_path / "stopped", progress=False, on_step=crash_at(10))
    stopped = tmp_path / "stopped"
    state = json.loads((stopped / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8 and state["ledger"]["history"][0][2] == 8  # ε of 8 steps kept
    assert not (stopped / "privacy.json").exists()
    resumed = train_run(config, stopped, resume=True, progress=False)
    assert resumed.privacy["steps"] == whole.privacy["steps"]
    assert resumed.privacy["epsilon"] == pytest.approx(whole.privacy["epsilon"], rel=1e-12)
    # seeded sampling, noise and dropout are restored too: the very same model comes out
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(stopped / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed.metrics["accuracy"] == whole.metrics["accuracy"]


def test_resume_that_would_pass_the_target_stops_with_a_clear_message(tmp_path, capsys):
    config = TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=12, epochs=2,
                         batch_size=32, epsilon=2.0, delta=1e-4, dp_seed=3, checkpoint_every=4)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train_run(config, run, progress=False, on_step=crash_at(9))
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["epochs"] = 6  # someone edits the plan: 3x the steps at a new, smaller σ
    (run / "config.json").write_text(json.dumps(saved))
    code, _, err = run_cli(["train", "--resume", "--out", str(run), "--quiet"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "past the target 2" in err
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 8  # untouched


def tree_digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_rejects_new_flags_and_never_retrains_a_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *TINY_RUN, "--epochs", "1", "--out", str(run)], capsys)[0] == 0
    before = tree_digest(run)
    code, out, _ = run_cli(["train", "--resume", "--out", str(run)], capsys)
    assert code == 0 and "eps" in out.lower()  # the finished run's summary, nothing trained
    assert tree_digest(run) == before
    code, _, err = run_cli(["train", "--resume", "--epochs", "3", "--out", str(run)], capsys)
    assert code == 2 and "drop --epochs" in err


def write_bad_csv(path: Path, rows):
    path.write_text("text,label,split\n" + "".join(f"{t},{l},{s}\n" for t, l, s in rows))


@pytest.fixture
def good_rows():
    rows = []
    for i in range(12):
        rows.append((f"check balance number {i}", "balance", "train"))
        rows.append((f"send money to person {i}", "transfer", "train"))
    rows += [("balance please", "balance", "validation"), ("send it", "transfer", "validation"),
             ("my balance", "balance", "test"), ("send cash", "transfer", "test")]
    return rows


@pytest.mark.parametrize("case", ["missing_file", "unknown_column", "empty_split", "label_only_in_test",
                                  "epsilon_zero", "epsilon_negative", "unknown_model", "unknown_hub_model", "not_a_number",
                                  "out_not_empty", "batch_larger_than_data"])
def test_bad_input_gives_one_line_and_exit_2_and_keeps_existing_files(case, tmp_path, capsys, good_rows):
    data = tmp_path / "data.csv"
    write_bad_csv(data, good_rows)
    out = tmp_path / "out"
    args = ["train", "--model", "tiny", "--data", str(data), "--epochs", "1", "--batch-size", "4",
            "--quiet", "--out", str(out)]
    expected = {
        "missing_file": "not found",
        "unknown_column": "column 'intent' not found",
        "empty_split": "validation",
        "label_only_in_test": "appears in test but not in train",
        "epsilon_zero": "epsilon must be > 0",
        "epsilon_negative": "epsilon must be > 0",
        "unknown_model": "not found: no such directory",
        "unknown_hub_model": "cannot load model 'no-such-org/no-such-model'",
        "not_a_number": "expected a number",
        "out_not_empty": "is not empty",
        "batch_larger_than_data": "batch_size must be <=",
    }[case]
    if case == "missing_file":
        args[args.index(str(data))] = str(tmp_path / "nope.csv")
    elif case == "unknown_column":
        args += ["--label-column", "intent"]
    elif case == "empty_split":
        clinc = tmp_path / "clinc.json"
        clinc.write_text(json.dumps({"train": [[t, l] for t, l, s in good_rows if s == "train"],
                                     "val": [], "test": [[t, l] for t, l, s in good_rows if s == "test"]}))
        args[args.index(str(data))] = str(clinc)
    elif case == "label_only_in_test":
        write_bad_csv(data, good_rows + [("cancel my card", "card_lost", "test")])
    elif case == "epsilon_zero":
        args += ["--epsilon", "0"]
    elif case == "epsilon_negative":
        args += ["--epsilon", "-2"]
    elif case == "unknown_model":
        args[args.index("tiny")] = str(tmp_path / "no-such-model")
    elif case == "unknown_hub_model":
        args[args.index("tiny")] = "no-such-org/no-such-model"
    elif case == "not_a_number":
        args += ["--epsilon", "lots"]
    elif case == "batch_larger_than_data":
        args[args.index("4")] = "500"
    if case == "out_not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    code, stdout, err = run_cli(args, capsys)
    assert code == 2, (case, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
        assert (out / "notes.txt").read_text() == "precious"
    else:
        assert not out.exists()  # refused before anything was written


def test_real_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dptrain", "train", "--data", str(tmp_path / "missing.csv"),
         "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "missing.csv" in proc.stderr
