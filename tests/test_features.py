"""Head-only training on cached encoder features is the same mechanism as running the frozen
encoder every step: same per-sample clipped sums, same ε; a trainable encoder is refused."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from dptrain import ModelError, PerSampleClipper
from dptrain.data import collate, encode, load_intent_data
from dptrain.features import cacheable, feature_head, pooled_features
from dptrain.models import load_model, set_trainable
from oracle import clipped_sum, per_example_grads


def head_model(encoder_dir, data):
    model, tokenizer = load_model(str(encoder_dir), data.num_labels, data.label_names)
    set_trainable(model, "head")
    model.dropout.p = 0.0  # dropout off: both paths must then be exactly the same function
    return model.double(), tokenizer


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_cached_features_give_the_same_clipped_sums_as_the_encoder(encoder_dir, method):
    data = load_intent_data("synthetic", synthetic_per_intent=4, seed=0)
    model, tokenizer = head_model(encoder_dir, data)
    enc = encode(tokenizer, data.train, 32)
    idx = np.arange(12)
    C = 0.05  # small enough that every sample is clipped
    batch = collate(enc, idx, tokenizer.pad_token_id)

    model.encoder.eval()  # the frozen encoder's dropout off, as the cache computes it
    reference = clipped_sum(per_example_grads(model, lambda i: model(
        **collate(enc, idx[i:i + 1], tokenizer.pad_token_id)).loss, len(idx)), C)

    clipper = PerSampleClipper(model, max_grad_norm=C, norm_method=method)
    model(**batch).loss.backward()
    through_encoder = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    clipper.detach()
    model.zero_grad(set_to_none=True)

    features = pooled_features(model, enc, tokenizer.pad_token_id, batch_size=5)
    head = feature_head(model)
    clipper = PerSampleClipper(head, max_grad_norm=C, norm_method=method)
    head(features=features[torch.from_numpy(idx)], labels=batch["labels"]).loss.backward()
    cached = {f"classifier.{n}": p.grad.clone() for n, p in head.classifier.named_parameters()}
    clipper.detach()

    assert set(cached) == set(through_encoder) == set(reference)
    for name in reference:
        scale = reference[name].abs().max()
        assert (cached[name] - through_encoder[name]).abs().max() <= 1e-5 * scale
        assert (cached[name] - reference[name]).abs().max() <= 1e-5 * scale


def test_a_trainable_encoder_parameter_is_refused_by_the_cache(encoder_dir):
    data = load_intent_data("synthetic", synthetic_per_intent=4, seed=0)
    model, _ = load_model(str(encoder_dir), data.num_labels, data.label_names)
    set_trainable(model, "last-1")  # a block below the head trains: the cache would skip it
    assert not cacheable(model)
    with pytest.raises(ModelError, match="cache would skip their gradients"):
        feature_head(model)


def test_head_only_run_trains_on_cached_features_with_the_planned_epsilon(encoder_dir, tmp_path):
    from dptrain import TrainConfig, train_run
    from dptrain.accounting import epsilon_after

    config = TrainConfig(model=str(encoder_dir), trainable="head", data="synthetic",
                         synthetic_per_intent=12, epochs=2, batch_size=32, lr=5e-2, dp_seed=0)
    summary = train_run(config, tmp_path / "run", progress=False)
    privacy = summary.privacy
    assert privacy["epsilon"] == pytest.approx(epsilon_after(
        noise_multiplier=privacy["noise_multiplier"], sample_rate=privacy["sample_rate"],
        steps=privacy["steps"], delta=privacy["delta"]), rel=1e-9)
    assert privacy["epsilon"] <= 8.0
    assert not (tmp_path / "run" / "model" / "encoder").exists()  # the head, by reference


def test_features_are_remembered_per_encoder_and_reused_exactly(encoder_dir, monkeypatch):
    """A second call (a shadow model on the same population) encodes nothing again and returns
    the same rows; another encoder (other weights) never sees them."""
    from dptrain import features

    features.forget()
    data = load_intent_data("synthetic", synthetic_per_intent=4, seed=0)
    model, tokenizer = head_model(encoder_dir, data)
    enc = encode(tokenizer, data.train, 32)
    first = pooled_features(model, enc, tokenizer.pad_token_id, batch_size=7)
    calls = []
    original = model.encoder.forward
    monkeypatch.setattr(model.encoder, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = pooled_features(model, enc, tokenizer.pad_token_id)
    assert calls == [] and torch.equal(first, again)
    with torch.no_grad():
        w = model.encoder.embeddings.word_embeddings.weight
        w.add_(0.5 * torch.randn_like(w))  # another encoder (a constant shift LayerNorm would undo)
    other = pooled_features(model, enc, tokenizer.pad_token_id)
    assert calls and not torch.allclose(other, first)
    features.forget()


def test_attack_signals_of_a_mean_pooling_classifier_match_the_full_model(encoder_dir):
    """Attacks score a head-only model through the shared features: the logits must be the
    full model's (encoder, pooling, head) in eval mode."""
    from attacks.signals import compute_signals, signals_from_logits

    data = load_intent_data("synthetic", synthetic_per_intent=4, seed=0)
    model, tokenizer = head_model(encoder_dir, data)
    model.dropout.p = 0.1  # eval mode must switch it off in both paths
    texts, labels = data.test.texts, data.test.labels
    fast = compute_signals(model, tokenizer, texts, labels, max_length=32)
    enc = encode(tokenizer, data.test, 32)
    model.eval()
    with torch.no_grad():
        logits = model(**collate(enc, np.arange(len(enc)), tokenizer.pad_token_id)).logits
    full = signals_from_logits(logits.double().numpy(), np.asarray(labels))
    np.testing.assert_allclose(fast.loss, full.loss, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fast.phi, full.phi, rtol=1e-9, atol=1e-12)


def test_head_recipe_turns_feature_dropout_off_and_an_explicit_value_wins(encoder_dir, tmp_path):
    """Dropout on cached features only adds noise under DP (-2 points at eps 1 on CLINC150): the
    head recipe uses 0, records it, and the saved model carries it; an explicit value is kept."""
    from dptrain import TrainConfig, train_run
    from dptrain.trainer import recipe

    base = TrainConfig(model=str(encoder_dir), data="synthetic", synthetic_per_intent=12,
                       epochs=1, batch_size=32, lr=5e-2, dp_seed=0)
    assert recipe(base, "head", 1000).head_dropout == 0.0
    assert recipe(base, "all", 1000).head_dropout == 0.1
    assert recipe(base, "all", 1000, mean_pooling=False).head_dropout is None
    for given, expected in ((None, 0.0), (0.25, 0.25)):
        out = tmp_path / f"run{given}"
        train_run(dataclasses.replace(base, head_dropout=given), out, progress=False)
        assert json.loads((out / "config.json").read_text())["config"]["head_dropout"] == expected
        assert json.loads((out / "model" / "dptrain_classifier.json").read_text())["dropout"] == expected


def test_head_dropout_is_refused_where_it_cannot_apply(tmp_path):
    from dptrain import TrainConfig, train_run
    from dptrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"head_dropout must be in \[0, 1\)"):
        TrainConfig(head_dropout=1.0)
    config = TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=4, head_dropout=0.2)
    with pytest.raises(ConfigError, match="applies to mean-pooling models"):
        train_run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_encoder_dropout_reaches_every_dropout_layer_and_switches_it_off(encoder_dir):
    """--dropout P sets the hidden and attention dropout of the encoder (the defence measured
    against memorization); with P = 0 a train-mode forward is deterministic."""
    from dptrain.trainer import set_encoder_dropout

    model, tokenizer = load_model(str(encoder_dir), 3, ["a", "b", "c"])
    set_encoder_dropout(model, 0.3)
    layers = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(layers) >= 5 and all(m.p == 0.3 for m in layers)
    assert model.dropout.p == 0.1  # the head's own is --head-dropout
    enc = tokenizer(["my pin code is 4 0 7 2", "book a flight"], return_tensors="pt", padding=True)
    model.train()
    torch.manual_seed(0)
    a = model(**enc).logits
    assert not torch.equal(a, model(**enc).logits)
    set_encoder_dropout(model, 0.0)
    model.dropout.p = 0.0
    assert torch.equal(model(**enc).logits, model(**enc).logits)
