"""Secret canaries: the spec, its refusals (one line, exit 2, nothing written), where the
secrets are stored, and the extract command end to end on a tiny model."""

import json

import numpy as np
import pytest

from dptrain.cli import main
from dptrain.errors import ConfigError
from dptrain.secret_canaries import parse_spec


def test_inline_and_file_specs_give_the_same_families(tmp_path):
    inline = parse_spec("prefix=call me at;length=3;repetitions=2,7;per_repetition=2")
    path = tmp_path / "spec.yaml"
    path.write_text("secrets:\n  - prefix: call me at\n    length: 3\n    repetitions: [2, 7]\n"
                    "    per_repetition: 2\n")
    assert parse_spec(str(path)) == inline
    (family,) = inline
    assert family["candidates"] == tuple("0123456789") and family["label"] is None
    words = tmp_path / "spec.json"
    words.write_text(json.dumps({"candidates": ["red", "blue", "green"], "repetitions": 5}))
    assert parse_spec(str(words))[0]["candidates"] == ("red", "blue", "green")
    assert parse_spec(str(words))[0]["repetitions"] == [5]


@pytest.mark.parametrize("spec, message", [
    ("repetitions=0", "repetition count must be an integer >= 1"),
    ("candidates=", "the candidate set is empty"),
    ("candidates=a b,c", "each candidate must be one word"),
    ("candidates=7", "at least 2 words"),
    ("length=0", "length must be an integer >= 1"),
    ("colour=red", "unknown keys colour"),
    ("repetitions", "expected key=value"),
    ("missing.yaml", "does not exist"),
])
def test_bad_specs_are_refused_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


def _train(tmp_path, capsys, secrets, **flags):
    argv = ["train", "--model", "tiny", "--data", "synthetic", "--synthetic-per-intent", "4",
            "--epochs", "1", "--quiet", "--out", str(tmp_path / "run"), "--secrets", secrets]
    for key, value in flags.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("secrets, flags, message", [
    ("label=no_such_intent", {}, "secret label 'no_such_intent' is not an intent"),
    ("candidates=zqxv,0", {}, "'zqxv' is not one token"),
    ("candidates=☃,0", {}, "'☃' is unknown to this tokenizer"),
    ("prefix=my pin code is my pin code is;length=9", {"max_length": 12}, "more than max_length 12"),
    ("repetitions=0", {}, "must be an integer >= 1"),
])
def test_train_refuses_bad_secrets_before_writing(tmp_path, capsys, secrets, flags, message):
    code, err = _train(tmp_path, capsys, secrets, **flags)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_candidate_that_splits_into_several_tokens_is_refused():
    from dptrain.models import load_model
    from dptrain.secret_canaries import candidate_ids

    _, tokenizer = load_model("tiny", 3, ["a", "b", "c"])
    prefix_ids, ids = candidate_ids(tokenizer, "my pin code is", tuple("0123456789"))
    assert len(ids) == 10 and len(set(ids)) == 10
    with pytest.raises(ConfigError, match=r"'12' is not one token .* becomes \['1', '##2'\]"):
        candidate_ids(tokenizer, "my pin code is", ("1", "12"))


def test_secrets_are_stored_apart_and_extract_reports_without_them(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, "repetitions=3,6;length=2", dp_seed=5)
    assert code == 0, err
    run = tmp_path / "run"
    planted = json.loads((run / "private" / "secrets.json").read_text())["secrets"]
    assert [s["repetitions"] for s in planted] == [3, 6]
    texts = [" ".join([s["prefix"], *s["tokens"]]) for s in planted]
    config = json.loads((run / "config.json").read_text())
    members = json.loads((run / "private" / "members.json").read_text())
    natural = members["num_members"]
    assert members["num_train_rows"] == natural + 9  # 3 + 6 copies were trained on
    assert members["member_ids"] == list(range(natural))  # members lists natural examples only
    for path in [run / "config.json", run / "metrics.json", *sorted((run / "model").rglob("*"))]:
        if path.is_file():
            data = path.read_bytes()
            assert not any(t.encode() in data for t in texts), path

    # the same dp_seed draws the same secrets
    code, err = main(["train", "--model", "tiny", "--data", "synthetic", "--synthetic-per-intent",
                      "4", "--epochs", "1", "--quiet", "--out", str(tmp_path / "again"),
                      "--secrets", "repetitions=3,6;length=2", "--dp-seed", "5"]), None
    assert json.loads((tmp_path / "again" / "private" / "secrets.json").read_text())["secrets"] == planted

    capsys.readouterr()
    assert main(["attack", "extract", "--run", str(run), "--quiet", "--steps", "5",
                 "--restarts", "1", "--reference", str(tmp_path / "again")]) == 2
    assert "trained with secrets of its own" in capsys.readouterr().err
    assert main(["attack", "extract", "--run", str(run), "--quiet", "--steps", "5",
                 "--restarts", "1"]) == 0
    out = capsys.readouterr().out
    assert "R=3 raw: exposure" in out and "R=6 raw: exposure" in out
    learned = json.loads((run / "metrics.json").read_text())["chance_level"]["learned"]
    assert ("at chance level" in out) == (not learned)  # one epoch on 4 examples per intent
    report = json.loads((run / "extraction" / "report.json").read_text())
    assert (run / "extraction" / "extraction.png").stat().st_size > 10_000
    for row in report["secrets"]:
        assert row["space_size"] == 100 and row["raw"]["rank"]["exact"]
        assert 0 <= row["raw"]["exposure"] <= np.log2(100) + 1e-9
    raw_report = (run / "extraction" / "report.json").read_bytes()
    assert not any(t.encode() in raw_report for t in texts)


def test_extract_refuses_a_run_without_secrets_and_bad_options(tmp_path, capsys):
    run = tmp_path / "plain"
    assert main(["train", "--model", "tiny", "--data", "synthetic", "--synthetic-per-intent", "4",
                 "--epochs", "1", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["attack", "extract", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "trained without secrets" in err and err.count("\n") == 1
    assert not (run / "extraction").exists()
    assert main(["attack", "extract", "--run", str(run), "--methods", "guess"]) == 2
    assert "methods must be a comma-separated subset" in capsys.readouterr().err


def test_mean_pooling_scores_share_the_frozen_encoder_and_match_the_full_forward(encoder_dir):
    """The scorer's shortcut for mean-pooling classifiers (encode once per frozen encoder, apply
    each head) gives the full model's log-probabilities, for two heads on one encoder."""
    import torch

    from attacks import exposure
    from dptrain.models import load_model

    torch.manual_seed(1)
    rng = np.random.default_rng(0)
    first, tokenizer = load_model(str(encoder_dir), 4, ["a", "b", "c", "d"])
    second, _ = load_model(str(encoder_dir), 4, ["a", "b", "c", "d"])
    torch.nn.init.normal_(second.classifier.weight)
    exposure._POOLED.clear()
    picks = rng.integers(0, 10, (16, 3))
    for model in (first, second):
        scorer = exposure.SecretScorer(model, tokenizer, "my pin code is", tuple("0123456789"), 3, 2)
        fast = scorer.score(picks)
        with torch.no_grad():
            texts = ["my pin code is " + " ".join(str(d) for d in row) for row in picks]
            enc = tokenizer(texts, return_tensors="pt")
            p = torch.softmax(model(**enc).logits.double(), -1)[:, 2]
            slow = (torch.log(p) - torch.log1p(-p)).numpy()
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-5)
        one_hot = torch.nn.functional.one_hot(torch.as_tensor(picks), 10).double()
        relaxed = scorer.relaxed_log_prob(one_hot).detach().numpy()
        np.testing.assert_allclose(relaxed, slow, rtol=0, atol=1e-5)
    assert len(exposure._POOLED) == len({tuple(r) for r in picks.tolist()})  # encoded once for both


@pytest.mark.slow
def test_a_secret_repeated_100_times_is_memorized_and_ranked_near_the_top(tmp_path):
    """Non-private tiny model, four 3-digit secrets (1,000 candidates) each trained 100 times:
    every one ranks in the top 3% (exposure >= 5 of 9.97 bits; measured 6.5-9.0), half of them
    within 10 guesses (measured ranks 2-11), while never-trained controls stay near chance
    (1/ln 2 = 1.44 bits); the relaxation attack finds the enumeration's best candidate for most. Exact recovery of the whole string is rarer: a classifier learns which
    digits point at the label more than their order (README, "Secrets")."""
    from attacks.extraction import run_extraction
    from dptrain import TrainConfig, train_run

    run = tmp_path / "run"
    summary = train_run(TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=30,
                                    epsilon=float("inf"), epochs=20, lr=3e-3, batch_size=64,
                                    secrets="repetitions=100;per_repetition=4;length=3", dp_seed=1),
                        run, progress=False)
    assert summary.metrics["accuracy"] > 0.8  # it learned the intents too, not only the secrets
    report = run_extraction(run, progress=False)
    exposures = [s["raw"]["exposure"] for s in report["secrets"]]
    assert min(exposures) >= 5.0, exposures
    stats = report["by_repetitions"]["100"]["raw"]
    assert stats["within_guesses"]["10"] >= 0.5 and stats["median_rank"] <= 10
    assert stats["mean_control_exposure"] < 3.0
    # the relaxation (no enumeration inside) finds the enumeration's top candidate most times
    assert stats["relaxation"]["agreement_with_enumeration"] >= 0.5


def test_a_resumed_run_trains_on_the_secrets_it_planted_never_new_ones(tmp_path, monkeypatch):
    """Secrets come from OS entropy: a resume must read them back, not draw others."""
    from dptrain import TrainConfig, train_run

    class Crash(Exception):
        pass

    def crash(done):
        if done == 6:
            raise Crash

    config = TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=12, epochs=2,
                         batch_size=32, epsilon=2.0, delta=1e-4, checkpoint_every=4,
                         secrets="repetitions=2,3;length=2")
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train_run(config, run, progress=False, on_step=crash)
    planted = (run / "private" / "secrets.json").read_bytes()

    def no_new_secrets(*args, **kwargs):
        raise AssertionError("a resume drew new secrets")

    monkeypatch.setattr("dptrain.secret_canaries.plant_secrets", no_new_secrets)
    resumed = train_run(config, run, resume=True, progress=False)
    assert (run / "private" / "secrets.json").read_bytes() == planted
    assert resumed.privacy["epsilon"] <= 2.0


def test_a_space_too_large_to_enumerate_gets_a_sampled_rank_with_its_interval(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, "repetitions=4;length=3", dp_seed=2)
    assert code == 0, err
    from attacks.extraction import run_extraction

    report = run_extraction(tmp_path / "run", max_enumerate=100, samples=400, steps=5,
                            restarts=2, progress=False)
    (row,) = report["secrets"]
    rank = row["raw"]["rank"]
    assert not rank["exact"] and rank["samples"] == 400
    assert rank["low"] <= rank["rank"] <= rank["high"] and 1 <= rank["low"] and rank["high"] <= 1000
    low_bits, high_bits = rank["exposure_interval"]
    assert low_bits <= row["raw"]["exposure"] <= high_bits
    assert "enumeration" not in row["raw"] and "relaxation" in row["raw"]
