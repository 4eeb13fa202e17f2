"""``dptrain attack mia`` end to end on tiny models: an overfit model leaks, the report says so.

The target is a non-private tiny BERT trained for 30 epochs on 144 synthetic utterances (180
generated, six per intent, 36 held out), far past the point where it memorizes: train loss ≈ 1,
held-out loss ≈ 3. Two shadow models are trained once for the module and reused by every later
attack, the CLI included.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from attacks.membership import run_membership_inference
from dptrain import TrainConfig, train_run
from dptrain.cli import main

OVERFIT = TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=6, epochs=30,
                      batch_size=16, physical_batch_size=16, lr=5e-3, epsilon=float("inf"),
                      dp_seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("mia")
    train_run(OVERFIT, root / "target", progress=False)
    return root


@pytest.fixture(scope="module")
def report(workspace):
    return run_membership_inference(workspace / "target", workspace / "report", n_shadows=2,
                                    shadow_dir=workspace / "shadows", progress=False)


def test_an_overfit_model_leaks_membership_to_the_loss_attack(report):
    loss = report["attacks"]["loss"]
    assert loss["auc"] > 0.65
    assert loss["advantage"] > 0.2
    assert loss["n_members"] == loss["n_nonmembers"] == 36  # balanced: 36 held out


def test_report_json_has_the_documented_schema(workspace, report):
    on_disk = json.loads((workspace / "report" / "report.json").read_text())
    assert set(on_disk) >= {"target", "theoretical", "population", "shadows", "attacks",
                            "empirical_epsilon", "summary"}
    assert on_disk["target"]["run_dir"] == str(workspace / "target")
    assert on_disk["target"]["model"] == "tiny" and on_disk["target"]["data"] == "synthetic"
    assert on_disk["theoretical"]["epsilon"] == "inf"  # privacy.json as written
    assert on_disk["verdict"] == "no claim"
    pop = on_disk["population"]
    assert pop["n_population"] == 180 and pop["n_members"] == 144 and pop["n_nonmembers"] == 36
    assert pop["evaluated"]["n_members"] == pop["evaluated"]["n_nonmembers"] == 36
    assert "subsampled" in pop["evaluated"]["how"]
    shadows = on_disk["shadows"]
    assert shadows["n_shadows"] == 2 and shadows["trained"] == 2 and shadows["reused"] == 0
    assert shadows["cache_dir"].startswith(str(workspace / "shadows"))
    assert list(on_disk["attacks"]) == ["loss", "lira_online", "lira_offline", "rmia"]
    for name, attack in on_disk["attacks"].items():
        assert 0 <= attack["auc"] <= 1, name
        assert set(attack["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
        assert set(attack["false_positives_at_fpr"]) == {"0.001", "0.01", "0.1"}
        assert set(attack["epsilon_lb"]) == {"clopper_pearson", "gdp"}
        assert attack["epsilon_lb"]["clopper_pearson"] >= 0 and attack["epsilon_lb"]["gdp"] >= 0
        assert attack["confidence"] == 0.95 and attack["delta"] == 1e-5  # non-private: 1e-5
        assert attack["correction"].startswith("bonferroni")
    assert "fixed (global) variance" in on_disk["attacks"]["lira_online"]["description"]
    summary = " ".join(on_disk["summary"])
    assert "highest TPR at FPR 1%" in summary and "not private" in summary
    assert on_disk["empirical_epsilon"]["confidence_per_attack"] == pytest.approx(1 - 0.05 / 4)

    png = (workspace / "report" / "roc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with np.load(workspace / "report" / "scores.npz", allow_pickle=False) as f:
        assert f["scores_loss"].shape == (180,)
        assert f["member_ids"].size == f["nonmember_ids"].size == 36
        assert f["is_member"][f["member_ids"]].all() and not f["is_member"][f["nonmember_ids"]].any()


def test_cli_prints_a_table_and_reuses_the_shadows(workspace, report, capsys):
    out = workspace / "cli"
    code = main(["attack", "mia", "--run", str(workspace / "target"), "--shadows", "2",
                 "--shadow-dir", str(workspace / "shadows"), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].split()[:2] == ["attack", "AUC"] and "eps_lb" in lines[0]
    assert [line.split()[0] for line in lines[2:6]] == ["loss", "lira_online", "lira_offline",
                                                        "rmia"]
    assert any("highest TPR at FPR 1%" in line for line in lines)
    again = json.loads((out / "report.json").read_text())
    assert again["shadows"]["reused"] == 2 and again["shadows"]["trained"] == 0
    # the same seed, the same shadows and the same target: the same numbers
    for name in again["attacks"]:
        assert again["attacks"][name]["auc"] == pytest.approx(report["attacks"][name]["auc"])


def test_a_private_run_is_judged_against_its_claim(workspace):
    run = workspace / "private"
    train_run(TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=3, epochs=1,
                          batch_size=16, epsilon=8.0, dp_seed=0), run, progress=False)
    report = run_membership_inference(run, attacks=["loss"], progress=False)
    assert report["shadows"] is None  # the loss attack needs no reference model
    assert (run / "attacks" / "roc.png").exists()
    claimed = report["theoretical"]["epsilon"]
    assert 7.5 < claimed <= 8.0
    assert report["empirical_epsilon"]["clopper_pearson"] < claimed
    assert report["verdict"] == "consistent"
    assert any(f"claimed ε = {claimed:.2f}" in line and "no evidence against the claim" in line
               for line in report["summary"])


def _fail(args, capsys) -> str:
    code = main(["attack", "mia", *args, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_input_exits_2_with_one_line(workspace, tmp_path, capsys):
    target = str(workspace / "target")
    assert "not found" in _fail(["--run", str(tmp_path / "missing")], capsys)
    assert "unknown 'lira_onlin'" in _fail(["--run", target, "--attacks", "loss,lira_onlin"],
                                           capsys)
    assert "n_shadows must be >= 2, got 1." in _fail(["--run", target, "--shadows", "1"], capsys)
    assert "confidence must be in (0.5, 1)" in _fail(["--run", target, "--confidence", "2"],
                                                     capsys)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(workspace / "target", unfinished)
    (unfinished / "privacy.json").unlink()
    assert "unfinished run" in _fail(["--run", str(unfinished)], capsys)

    changed = tmp_path / "changed"
    shutil.copytree(workspace / "target", changed)
    config = json.loads((changed / "config.json").read_text())
    config["config"]["synthetic_per_intent"] = 7  # the data source no longer gives the same data
    (changed / "config.json").write_text(json.dumps(config))
    assert "changed since training" in _fail(["--run", str(changed)], capsys)
    assert not (changed / "attacks").exists()  # nothing written
