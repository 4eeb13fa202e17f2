"""Membership inference and one-run audits on joint intent + slot models: the per-utterance
signal is the utterance's training loss (intent CE + the mean of its words' tag CEs), computed
here against a loop that scores each utterance alone from the softmax; shadows train on halves
of the population with the target's intents and tags; the loss attack finds the members of a
model that memorized them; audit canaries are tagged utterances and the audit finds them."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from dptrain import TrainConfig, train_run


def _loss_alone(model, tokenizer, utterance, intents, tags):
    """−log p(intent) − (1/W) Σ_w log p(tag_w) from one forward pass of this utterance alone,
    tags read on each word's first sub-token."""
    enc = tokenizer([list(utterance.tokens)], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    logits = out.tag_logits
    if model.intent_tag_bias is not None:  # trained on the gold intent's bias, not the predicted
        table = model.intent_tag_bias.weight
        logits = logits - table[out.intent_logits.argmax(-1)] + table[intents.index(utterance.intent)]
    seen, word_terms = set(), []
    for pos, w in enumerate(enc.word_ids(0)):
        if w is None or w in seen:
            continue
        seen.add(w)
        p = torch.softmax(logits[0, pos].double(), -1)[tags.index(utterance.tags[w])]
        word_terms.append(-math.log(float(p)))
    loss = sum(word_terms) / len(word_terms)
    if out.intent_logits is not None:
        p = torch.softmax(out.intent_logits[0].double(), -1)[intents.index(utterance.intent)]
        loss += -math.log(float(p))
    return loss


@pytest.mark.parametrize("task, trainable, gated", [
    ("joint", "all", False), ("joint", "head", False), ("slots", "all", False), ("joint", "head", True)])
def test_joint_signals_are_each_utterances_own_loss(task, trainable, gated):
    """gated: the heads recipe's model (tags on the mean of the last 2 states, an intent-tag
    bias): the signal is the training loss, given the gold intent."""
    from attacks.signals import joint_signals
    from dptrain.features import forget
    from dptrain.joint_model import JointIntentSlotModel
    from dptrain.models import set_trainable
    from dptrain.slot_data import load_slot_data
    from dptrain.slot_trainer import load_encoder

    data = load_slot_data("synthetic", synthetic_per_intent=2, seed=0)
    encoder, tokenizer, _ = load_encoder("tiny")
    torch.manual_seed(1)
    model = JointIntentSlotModel(encoder, len(data.intents), len(data.tags), task=task,
                                 tag_layers=2 if gated else 1, intent_tag_bias=gated)
    if gated:
        torch.nn.init.normal_(model.intent_tag_bias.weight, std=2.0)
    set_trainable(model, trainable)  # head: the frozen encoder's states come from the cache
    utts = data.train[:12]
    forget()
    s = joint_signals(model, tokenizer, utts, data.intents, data.tags, batch_size=5)
    want = [_loss_alone(model.eval(), tokenizer, u, list(data.intents), list(data.tags)) for u in utts]
    np.testing.assert_allclose(s.loss, want, rtol=1e-5)
    np.testing.assert_allclose(s.label_prob, np.exp(-s.loss), rtol=1e-12)
    np.testing.assert_allclose(s.phi, np.log(s.label_prob) - np.log1p(-s.label_prob), rtol=1e-9)
    assert s.probs.shape == ((12, len(data.intents)) if task == "joint" else (12, 2))


@pytest.mark.slow
def test_membership_inference_on_a_memorizing_joint_model(tmp_path):
    """Tiny joint model trained whole without noise on 192 utterances: the loss attack
    separates members from non-members (measured AUC 0.88; RMIA 0.94); two shadows trained on halves of
    the population, with the target's tag set, feed LiRA and RMIA."""
    from attacks.membership import run_membership_inference

    run = tmp_path / "runs" / "target"
    train_run(TrainConfig(model="tiny", data="synthetic", task="joint", synthetic_per_intent=8,
                          epsilon=float("inf"), epochs=25, lr=3e-3, batch_size=32,
                          physical_batch_size=64), run, progress=False)
    report = run_membership_inference(run, n_shadows=2, attacks=("loss", "lira_offline", "rmia"),
                                      progress=False)
    by_name = report["attacks"]
    assert by_name["loss"]["auc"] > 0.6, by_name["loss"]["auc"]
    assert set(by_name) == {"loss", "lira_offline", "rmia"}
    assert report["target"]["task"] == "joint" and report["population"]["unit"].startswith("one utterance")
    cache = next((tmp_path / "runs" / ".dptrain-shadows").iterdir())
    target_tags = json.loads((run / "model" / "dptrain_joint.json").read_text())["tags"]
    for shadow in sorted(cache.glob("shadow-*")):
        assert json.loads((shadow / "model" / "dptrain_joint.json").read_text())["tags"] == target_tags
        members = json.loads((shadow / "private" / "members.json").read_text())["member_ids"]
        assert len(members) == report["population"]["n_population"] // 2


def test_audit_canaries_of_slot_models_are_tagged_utterances_drawn_from_public_seeds():
    from attacks.canaries import canary_utterances, insert_canaries
    from dptrain.slot_data import as_intent_data, load_slot_data

    slots = load_slot_data("synthetic", synthetic_per_intent=4, seed=0)
    view = as_intent_data(slots)
    assert view.train.texts[0] == " ".join(slots.train[0].tokens)
    _, canaries = insert_canaries(view, 50, seed=1, text_seed=3)
    a = canary_utterances(canaries, slots.intents, slots.slot_types)
    assert a == canary_utterances(canaries, slots.intents, slots.slot_types)  # deterministic
    assert all(" ".join(u.tokens) == t for u, t in zip(a, canaries.texts))
    assert all(u.intent == slots.intents[k] for u, k in zip(a, canaries.labels))
    tags = [t for u in a for t in u.tags]
    assert set(tags) <= {f"B-{x}" for x in slots.slot_types}
    assert len(set(tags)) > len(slots.slot_types) // 2  # spread over the types, not one
    _, other = insert_canaries(view, 50, seed=1, text_seed=4)
    assert canary_utterances(other, slots.intents, slots.slot_types) != a


@pytest.mark.slow
def test_one_run_audit_of_a_joint_model_finds_memorized_canaries_and_respects_a_claim(tmp_path):
    """Non-private, trained whole for 30 epochs: every guess right (measured 140 of 140, ε ≥
    3.17 with 200 canaries); private at ε = 2: the bound stays below the claim."""
    from attacks.audit_run import AuditRunOptions, run_audit

    base = TrainConfig(model="tiny", data="synthetic", task="joint", synthetic_per_intent=10,
                       epochs=30, lr=3e-3, physical_batch_size=64)
    leaky = run_audit(dataclasses.replace(base, epsilon=float("inf")), tmp_path / "leaky",
                      AuditRunOptions(canaries=200, canary_seed=0), progress=False)
    assert leaky.report["one_run"]["v"] >= 0.9 * leaky.report["one_run"]["r"]  # right of guesses
    assert leaky.epsilon_lb > 2.0
    members = json.loads((tmp_path / "leaky" / "run" / "private" / "members.json").read_text())
    assert len(members["member_ids"]) == 240 + leaky.report["canaries"]["included"]
    private = run_audit(dataclasses.replace(base, epsilon=2.0, epochs=2), tmp_path / "private",
                        AuditRunOptions(canaries=200, canary_seed=0), progress=False)
    assert private.report["verdict"] == "consistent"
    assert private.epsilon_lb <= private.report["theoretical"]["epsilon"]


def test_white_box_audit_of_a_joint_model(tmp_path, capsys):
    """``dptrain audit --white-box --task joint``: in a non-private joint run the raw canary
    spikes are found (ε ≥ 5 from 20 000 canaries), and the shipped run holds no canary file.
    Private joint runs: tests/test_reference_joint_whitebox.py (the canary scores follow the
    claimed Gaussian mechanism, as for the classifier, and the bound stays below the claim)."""
    from dptrain.cli import main

    out = tmp_path / "inf"
    assert main(["audit", "--white-box", "--task", "joint", "--data", "synthetic", "--model", "tiny",
                 "--synthetic-per-intent", "10", "--epochs", "2", "--batch-size", "16",
                 "--epsilon", "inf", "--canaries", "20000", "--canary-seed", "1", "--quiet",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "no claim"
    assert report["views"]["all_iterates"]["f_dp"]["epsilon_lb"] >= 5
    assert json.loads((out / "run" / "config.json").read_text())["config"]["task"] == "joint"
    assert not any("canar" in p.name for p in (out / "run").rglob("*"))
