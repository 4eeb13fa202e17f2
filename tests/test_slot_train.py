"""``dptrain train --task joint|slots`` end to end on the tiny model: it learns without noise,
writes the run directory with the utterance as the privacy unit, resumes to the same model,
and its saved model reloads with the same predictions."""

import json

import pytest
import torch

from dptrain import TrainConfig, train_run
from dptrain.cli import main

FAST = dict(model="tiny", data="synthetic", synthetic_per_intent=12, physical_batch_size=32)


@pytest.mark.slow
def test_non_private_joint_model_learns_intents_and_slots(tmp_path):
    summary = train_run(TrainConfig(task="joint", epsilon=float("inf"), epochs=10, lr=3e-3,
                                    batch_size=32, **{**FAST, "synthetic_per_intent": 40}),
                        tmp_path / "run", progress=False)
    m = summary.metrics
    # measured 0.958 intent accuracy, 0.879 slot F1, 0.825 frame accuracy (chance: 1/30, ~0, ~0)
    assert m["intent_accuracy"] > 0.8 and m["slot_f1"] > 0.7 and m["frame_accuracy"] > 0.6
    assert set(m["per_type"]) >= {"city", "amount", "contact"}


class Crash(Exception):
    pass


def stop_at_step_6(config, out):
    """Train into ``out`` and crash after step 6 (the checkpoint of step 4 survives)."""
    def crash(done):
        if done == 6:
            raise Crash

    with pytest.raises(Crash):
        train_run(config, out, progress=False, on_step=crash)


def test_private_joint_run_files_resume_and_reload(tmp_path):
    from dptrain.slot_trainer import load_joint

    config = TrainConfig(task="joint", epsilon=4.0, delta=1e-4, epochs=2, batch_size=48, dp_seed=5,
                         checkpoint_every=4, **FAST)
    whole = train_run(config, tmp_path / "whole", progress=False)
    privacy = json.loads((tmp_path / "whole" / "privacy.json").read_text())
    assert privacy["unit"].startswith("one utterance") and 3.9 < privacy["epsilon"] <= 4.0
    assert privacy["steps"] == privacy["planned_steps"] == whole.privacy["steps"]
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["config"]["task"] == "joint" and saved["data"]["tags"][0] == "O"

    stop_at_step_6(config, tmp_path / "stopped")
    state = json.loads((tmp_path / "stopped" / "checkpoint" / "state.json").read_text())
    assert state["ledger"]["history"][0][2] == 4  # the ε of the 4 checkpointed steps is kept
    resumed = train_run(config, tmp_path / "stopped", resume=True, progress=False)
    assert resumed.privacy["epsilon"] == pytest.approx(whole.privacy["epsilon"], rel=1e-12)
    a, _, _ = load_joint(tmp_path / "whole" / "model")
    b, _, meta = load_joint(tmp_path / "stopped" / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert meta["task"] == "joint" and meta["intents"] == saved["data"]["intents"]
    assert resumed.metrics["slot_f1"] == whole.metrics["slot_f1"]


def test_a_joint_run_recorded_before_tag_schemes_resumes_with_its_bio_head(tmp_path):
    """Runs written before --tag-scheme existed trained BIO heads: resuming one (config.json
    without the field) must keep BIO, not switch to the new default and break the checkpoint."""
    from dptrain.slot_trainer import load_joint

    config = TrainConfig(task="joint", epsilon=4.0, delta=1e-4, epochs=2, batch_size=48, dp_seed=5,
                         checkpoint_every=4, tag_scheme="bio", **FAST)
    whole = train_run(config, tmp_path / "whole", progress=False)

    stop_at_step_6(config, tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    saved = json.loads(path.read_text())
    for name in ("tag_scheme", "tag_layers", "intent_tag_bias"):
        del saved["config"][name]  # as such a run wrote it
    path.write_text(json.dumps(saved))
    resumed = train_run(TrainConfig(task="joint", **FAST), tmp_path / "old", resume=True,
                        progress=False)
    assert resumed.metrics["slot_f1"] == whole.metrics["slot_f1"]
    _, _, meta = load_joint(tmp_path / "old" / "model")
    assert meta["tag_scheme"] == "bio" and meta["tag_head_classes"] == meta["tags"]
    fields = TrainConfig(task="joint").to_dict()
    for name in ("tag_scheme", "tag_layers", "intent_tag_bias"):
        del fields[name]
    old = TrainConfig.saved(fields)  # an older joint run with the heads recipe: no gating
    assert (old.tag_scheme, old.tag_layers, old.intent_tag_bias) == ("bio", 1, "off")


def test_slots_only_task_and_bad_input(tmp_path, capsys):
    assert main(["train", "--task", "slots", "--model", "tiny", "--data", "synthetic",
                 "--synthetic-per-intent", "8", "--epsilon", "inf", "--epochs", "1",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["task"] == "slots" and "intent_accuracy" not in metrics
    assert "slot F1" in capsys.readouterr().out

    (tmp_path / "d.jsonl").write_text('{"tokens": ["at", "7"], "tags": ["O"], "intent": "alarm"}\n')
    assert main(["train", "--task", "joint", "--model", "tiny", "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "1 tags for 2 words" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
    assert main(["train", "--task", "tagging", "--out", str(tmp_path / "bad")]) == 2
    capsys.readouterr()
    for flags, message in ((["--task", "joint", "--tag-layers", "4"], "tag_layers must be an integer in [1, 3]"),
                           (["--task", "slots", "--intent-tag-bias", "on"], "needs an intent head"),
                           (["--task", "joint", "--intent-tag-bias", "yes"], "intent_tag_bias must"),
                           (["--task", "joint", "--tag-layers", "0"], "tag_layers must be")):
        assert main(["train", *flags, "--model", "tiny", "--synthetic-per-intent", "8",
                     "--out", str(tmp_path / "bad"), "--quiet"]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()


def test_attacks_on_slot_runs_refuse_what_they_cannot_do_in_one_line(tmp_path, capsys):
    assert main(["train", "--task", "slots", "--model", "tiny", "--data", "synthetic",
                 "--synthetic-per-intent", "8", "--epsilon", "inf", "--epochs", "1",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 0
    capsys.readouterr()
    for argv, message in (
            (["attack", "extract", "--run", str(tmp_path / "s")], "trained without secrets"),
            (["attack", "mia", "--run", str(tmp_path / "s"), "--attacks", "lira_online",
              "--shadows", "3"], "even")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_dropout_reaches_the_joint_encoder(tmp_path, monkeypatch):
    """--dropout used to be recorded in config.json but ignored by --task joint."""
    import dptrain.trainer as trainer

    seen = []
    original = trainer.set_encoder_dropout

    def spy(model, p):
        original(model, p)
        seen.append(sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}))
    monkeypatch.setattr(trainer, "set_encoder_dropout", spy)
    train_run(TrainConfig(task="joint", epsilon=float("inf"), epochs=1, dropout=0.3, **FAST),
              tmp_path / "run", progress=False)
    assert seen == [[0.3]]
