"""Secrets as slot values (Parikh et al., ACL 2022): planted as tagged utterances in a joint
intent + slot run, stored apart from the model, scored by the frame the attacker knows (intent +
the value's B-/I- tags), and extracted from a model that memorized them."""

import json

import numpy as np
import pytest
import torch

from dptrain import TrainConfig, train_run
from dptrain.cli import main

TINY = dict(model="tiny", data="synthetic", task="joint", physical_batch_size=64)


def test_slot_secrets_are_planted_as_tagged_utterances_and_stored_apart(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--task", "joint", "--model", "tiny", "--data", "synthetic",
                 "--synthetic-per-intent", "6", "--epochs", "1", "--epsilon", "inf", "--quiet",
                 "--secrets", "repetitions=2,5;length=3;slot=account_pin", "--dp-seed", "3",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    planted = json.loads((run / "private" / "secrets.json").read_text())["secrets"]
    assert [s["repetitions"] for s in planted] == [2, 5]
    assert {s["slot"] for s in planted} == {"account_pin"}
    config = json.loads((run / "config.json").read_text())
    members = json.loads((run / "private" / "members.json").read_text())
    assert members["num_train_rows"] == members["num_members"] + 7
    assert members["member_ids"] == list(range(members["num_members"]))
    assert {"B-account_pin", "I-account_pin"} <= set(config["data"]["tags"])
    meta = json.loads((run / "model" / "dptrain_joint.json").read_text())
    assert meta["tags"] == config["data"]["tags"]  # the tag head knows the secret's slot type
    texts = [" ".join([s["prefix"], *s["tokens"]]) for s in planted]
    for path in [run / "config.json", run / "metrics.json", *sorted((run / "model").rglob("*"))]:
        if path.is_file():
            assert not any(t.encode() in path.read_bytes() for t in texts), path

    from dptrain.secret_canaries import Secret
    secret = Secret.from_dict(planted[0])
    assert secret.words == ("my", "pin", "code", "is", *secret.tokens)
    assert secret.tags == ("O", "O", "O", "O", "B-account_pin", "I-account_pin", "I-account_pin")


def test_bad_slot_names_are_refused_in_one_line(tmp_path, capsys):
    for slot in ("B-pin", "O", "two words"):
        code = main(["train", "--task", "joint", "--model", "tiny", "--data", "synthetic",
                     "--synthetic-per-intent", "4", "--epochs", "1", "--quiet",
                     "--secrets", f"slot={slot}", "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert code == 2 and "slot must be one word naming a slot type" in err, err
        assert err.count("\n") == 1 and not (tmp_path / "r").exists()


def _frame_score_by_hand(model, tokenizer, words, value_at, tag_ids, intent_id):
    """φ(intent) + Σ φ(tag) computed from one plain forward pass of the words, tokenized word by
    word; φ(p) = log p − log(1 − p) from the softmax probabilities."""
    enc = tokenizer([words], is_split_into_words=True, return_tensors="pt")
    first = {}
    for pos, w in enumerate(enc.word_ids(0)):
        if w is not None and w not in first:
            first[w] = pos
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    total = 0.0
    if intent_id is not None:
        p = torch.softmax(out.intent_logits[0].double(), -1)[intent_id]
        total += float(torch.log(p) - torch.log1p(-p))
    for j, tag in zip(range(value_at, len(words)), tag_ids):
        p = torch.softmax(out.tag_logits[0, first[j]].double(), -1)[tag]
        total += float(torch.log(p) - torch.log1p(-p))
    return total


@pytest.mark.parametrize("task", ["joint", "slots"])
def test_the_slot_secret_score_is_the_frame_confidence_and_its_relaxation_agrees(task):
    from attacks.exposure import SlotSecretScorer
    from dptrain.joint_model import JointIntentSlotModel
    from dptrain.slot_trainer import load_encoder

    encoder, tokenizer, _ = load_encoder("tiny")
    torch.manual_seed(0)
    model = JointIntentSlotModel(encoder, 5, 7, task=task).eval()
    prefix, cands = "my pin code is", tuple("0123456789")
    scorer = SlotSecretScorer(model, tokenizer, prefix, cands, 3, 2, [3, 4, 4])
    rng = np.random.default_rng(0)
    picks = rng.integers(0, 10, (6, 3))
    got = scorer.score(picks)
    intent = 2 if task == "joint" else None
    want = [_frame_score_by_hand(model, tokenizer, prefix.split() + [cands[i] for i in row], 4,
                                 [3, 4, 4], intent) for row in picks]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.ptp(got) > 1e-3  # the candidates are told apart
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(picks), 10).double()
    relaxed = scorer.relaxed_log_prob(one_hot).detach().numpy()
    np.testing.assert_allclose(relaxed, got, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_slot_value_secret_repeated_50_times_is_extracted_from_a_memorizing_model(tmp_path):
    """Non-private tiny joint model trained whole: a 3-digit PIN tagged B-pin I-pin I-pin, 50
    copies, ranks near the top of the 1,000 candidates (measured exposure 9.0 bits, rank 2)
    while a control draw stays near chance; the report holds no secret token."""
    from attacks.extraction import run_extraction

    run = tmp_path / "run"
    train_run(TrainConfig(**TINY, synthetic_per_intent=20, epsilon=float("inf"), epochs=20,
                          lr=3e-3, secrets="repetitions=50;per_repetition=2;length=3", dp_seed=1),
              run, progress=False)
    report = run_extraction(run, progress=False, methods=("enumerate",))
    assert "slot type" in report["threat_model"]
    exposures = [s["raw"]["exposure"] for s in report["secrets"]]
    assert min(exposures) >= 5.0, exposures  # top 3% of 1,000 (chance: 1.44 bits)
    stats = report["by_repetitions"]["50"]["raw"]
    assert stats["mean_control_exposure"] < 4.0
    planted = json.loads((run / "private" / "secrets.json").read_text())["secrets"]
    raw = (run / "extraction" / "report.json").read_bytes()
    assert not any(" ".join(s["tokens"]).encode() in raw for s in planted)
