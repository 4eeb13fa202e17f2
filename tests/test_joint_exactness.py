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
