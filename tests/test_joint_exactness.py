"""Per-utterance clipping of joint intent + slot models against a per-example loop.

The privacy unit is the utterance: one gradient for all its tokens and both heads, clipped once.
Tiny random BERT and RoBERTa encoders, right padding, and sub-word alignment (tags only on the
first sub-token of each word, -100 elsewhere): the engine's per-utterance norms and clipped sum
must equal one ordinary backward pass per utterance, and removing any utterance moves the
pre-noise sum by at most C.
"""

import pytest
import torch

from dptrain import PerSampleClipper
from dptrain.joint_model import IGNORE, JointIntentSlotModel, per_utterance_loss
from oracle import assert_grads_close, clipped_sum, norms_of, per_example_grads, removal_shifts


def encoder(kind):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    if kind == "bert":
        return BertModel(BertConfig(**common))
    return RobertaModel(RobertaConfig(pad_token_id=1, **common))


def batch(kind, size=6, width=12, seed=0):
    """Random utterances of different lengths; words of 1-3 sub-tokens; tags on first sub-tokens."""
    gen = torch.Generator().manual_seed(seed)
    pad = 1 if kind == "roberta" else 0
    ids = torch.randint(3, 100, (size, width), generator=gen)
    mask = torch.zeros(size, width, dtype=torch.long)
    tags = torch.full((size, width), IGNORE, dtype=torch.long)
    lengths = torch.randint(5, width + 1, (size,), generator=gen)
    lengths[0] = width
    for i, n in enumerate(lengths.tolist()):
        mask[i, :n] = 1
        ids[i, n:] = pad
        pos = 1  # position 0 is the [CLS]/<s> token, n-1 the [SEP]
        while pos < n - 1:
            tags[i, pos] = int(torch.randint(0, 7, (1,), generator=gen))
            pos += int(torch.randint(1, 4, (1,), generator=gen))  # 1-3 sub-tokens per word
    intents = torch.randint(0, 4, (size,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": intents, "tag_labels": tags}


def rows(b, i):
    n = int(b["attention_mask"][i].sum())  # each utterance alone, unpadded
    return {k: (v[i:i + 1, :n] if v.dim() == 2 else v[i:i + 1]) for k, v in b.items()}


def model_for(kind, task):
    return JointIntentSlotModel(encoder(kind), num_intents=4, num_tags=7, task=task,
                                dropout=0.0).double().train()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("task", ["joint", "slots"])
@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_per_utterance_clipping_matches_a_per_example_loop(kind, task, method):
    model = model_for(kind, task)
    b = batch(kind)
    if task == "slots":
        b.pop("labels")
    ref = per_example_grads(model, lambda i: model(**rows(b, i)).loss, 6)
    ref_norms = norms_of(ref)
    bound = float(ref_norms.median())
    clipper = PerSampleClipper(model, max_grad_norm=bound, keep_norms=True, norm_method=method)
    model.zero_grad(set_to_none=True)
    model(**b).loss.backward()
    torch.testing.assert_close(clipper.last_norms, ref_norms, rtol=1e-5, atol=0)
    assert (ref_norms > bound).sum() >= 2
    assert_grads_close(model, clipped_sum(ref, bound), rtol=1e-5)
    clipper.detach()
    heads = {n for n in ref[0] if "head" in n}
    assert heads == ({"tag_head.weight", "tag_head.bias"} | (
        {"intent_head.weight", "intent_head.bias"} if task == "joint" else set()))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_removing_one_utterance_moves_the_clipped_sum_by_at_most_C(kind):
    model = model_for(kind, "joint")
    b = batch(kind, size=8, seed=1)
    bound = 1e-3  # below every norm: each utterance contributes exactly C
    clipper = PerSampleClipper(model, max_grad_norm=bound)
    for moved in removal_shifts(model, b, 8):
        assert 0.99 * bound < moved <= bound * (1 + 1e-6)
    clipper.detach()


def test_the_tag_loss_is_averaged_within_each_utterance_not_over_the_batch():
    """ℓ_i depends on utterance i alone: the loss of a batch is the mean of the utterances'
    losses computed alone (a batch-wide token mean would weigh them by the others' lengths)."""
    model = model_for("bert", "joint").eval()
    b = batch("bert")
    with torch.no_grad():
        together = model(**b).loss
        alone = torch.stack([model(**rows(b, i)).loss for i in range(6)])
        out = model(**b)
        per = per_utterance_loss(out.intent_logits, out.tag_logits, b["labels"], b["tag_labels"])
    torch.testing.assert_close(together, alone.mean())
    torch.testing.assert_close(per, alone)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_cached_token_states_give_the_same_clipped_sums_as_the_frozen_encoder(pooling, method):
    """The heads recipe trains on cached token states (dptrain.features.JointFeatureHead): real
    tokenizer alignment, every utterance clipped, must equal the per-example loop of the full
    model with its encoder frozen in eval mode; removing an utterance moves the sum by ≤ C."""
    from dptrain.models import set_trainable
    from dptrain.slot_data import load_slot_data
    from dptrain.slot_trainer import SlotBatches, encode_slots, load_encoder

    data = load_slot_data("synthetic", synthetic_per_intent=3, seed=0)
    enc_model, tokenizer, _ = load_encoder("tiny")
    torch.manual_seed(0)
    model = JointIntentSlotModel(enc_model, len(data.intents), len(data.tags), pooling=pooling,
                                 dropout=0.0).double()
    set_trainable(model, "head")
    enc = {"train": encode_slots(tokenizer, data.train, data.intents, data.tags, 32)}
    idx = list(range(10))
    assert len({len(enc["train"].ids[i]) for i in idx}) > 2  # padding matters
    full = SlotBatches(model, enc, tokenizer.pad_token_id, torch.device("cpu"))
    model.encoder.eval()
    ref = per_example_grads(model, lambda i: model(**full.batch("train", [idx[i]])).loss, len(idx))
    C = 0.5 * float(norms_of(ref).min())  # every utterance clipped
    cached = SlotBatches(model, enc, tokenizer.pad_token_id, torch.device("cpu"), cache_features=True)
    assert cached.net is not model and cached.features is not None
    clipper = PerSampleClipper(cached.net, max_grad_norm=C, norm_method=method)
    cached.net.zero_grad(set_to_none=True)
    cached.forward("train", idx).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    want = clipped_sum(ref, C)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9 * C)
    shifts = removal_shifts(cached.net, cached.batch("train", idx), len(idx))
    assert all(0.99 * C < s <= C * (1 + 1e-6) for s in shifts)
    clipper.detach()
    # and the predictions of the cached heads are the full model's
    with torch.no_grad():
        fa, fb = full.batch("train", idx), cached.batch("train", idx)
        a, b = model(**fa), cached.net(**fb)
    torch.testing.assert_close(a.intent_logits, b.intent_logits)
    torch.testing.assert_close(a.tag_logits[fa["tag_labels"] != IGNORE],
                               b.tag_logits[fb["tag_labels"] != IGNORE])
