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
        steps=privacy["steps"], delta=privacy["delta"], prior=privacy["prior"]), rel=1e-9)
    assert privacy["epsilon"] <= 8.0 and privacy["prior"] == [[20.0, 1.0, 1]]  # the size count
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


def _count_encoder_calls(monkeypatch, model):
    calls = []
    original = model.encoder.forward
    monkeypatch.setattr(model.encoder, "forward",
                        lambda *a, **k: calls.append(len(k["input_ids"])) or original(*a, **k))
    return calls


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_the_feature_store_gives_rows_and_clipped_sums_identical_to_fresh_encoding(
        encoder_dir, tmp_path, monkeypatch, method):
    """Rows read back from disk (another process: memory forgotten) are the encoded rows bit for
    bit, encode nothing, and give the same per-sample clipped sums; files are private."""
    import os
    import stat

    from dptrain import features

    features.forget()
    data = load_intent_data("synthetic", synthetic_per_intent=4, seed=0)
    model, tokenizer = head_model(encoder_dir, data)
    enc = encode(tokenizer, data.train, 32)
    store = tmp_path / "store"
    with features.feature_store(store):
        fresh = pooled_features(model, enc, tokenizer.pad_token_id, batch_size=7)
        features.forget()  # what a later process starts with
        calls = _count_encoder_calls(monkeypatch, model)
        stored = pooled_features(model, enc, tokenizer.pad_token_id)
    assert calls == [] and torch.equal(fresh, stored)
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    files = list(store.rglob("*.safetensors"))
    assert files and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    assert all(stat.S_IMODE(os.stat(d).st_mode) == 0o700 for d in store.iterdir() if d.is_dir())

    idx = torch.arange(10)
    labels = torch.from_numpy(enc.labels[:10].copy())
    sums = []
    for x in (fresh, stored):
        head = feature_head(model)
        model.zero_grad(set_to_none=True)
        clipper = PerSampleClipper(head, max_grad_norm=0.05, norm_method=method)
        head(features=x[idx], labels=labels).loss.backward()
        sums.append({n: p.grad.clone() for n, p in head.named_parameters()})
        clipper.detach()
    assert all(torch.equal(sums[0][n], sums[1][n]) for n in sums[0])
    features.forget()


def test_the_feature_store_reencodes_exactly_what_changed(encoder_dir, tmp_path, monkeypatch, caplog):
    """Another utterance: that one row is encoded; another encoder: every row, in a folder of
    its own; a deleted store or an unreadable file: encoded again, with the same values."""
    import logging

    from dptrain import features
    from dptrain.data import Split

    features.forget()
    data = load_intent_data("synthetic", synthetic_per_intent=4, seed=0)
    model, tokenizer = head_model(encoder_dir, data)
    enc = encode(tokenizer, data.train, 32)
    store = tmp_path / "store"
    calls = _count_encoder_calls(monkeypatch, model)
    with features.feature_store(store):
        first = pooled_features(model, enc, tokenizer.pad_token_id)
        assert sum(calls) == len(enc)
        texts = list(data.train.texts)
        texts[3] = texts[3] + " please"
        changed = encode(tokenizer, Split(tuple(texts), data.train.labels), 32)
        features.forget()
        calls.clear()
        again = pooled_features(model, changed, tokenizer.pad_token_id)
        assert calls == [1]
        keep = torch.arange(len(enc)) != 3
        assert torch.equal(again[keep], first[keep]) and not torch.equal(again[3], first[3])

        with torch.no_grad():
            model.encoder.encoder.layer[0].output.dense.bias[0] += 0.5  # another encoder
        features.forget()
        calls.clear()
        other = pooled_features(model, enc, tokenizer.pad_token_id)
        assert sum(calls) == len(enc) and not torch.allclose(other, first)
        assert len([d for d in store.iterdir() if d.is_dir()]) == 2
        with torch.no_grad():
            model.encoder.encoder.layer[0].output.dense.bias[0] -= 0.5

        import shutil

        shutil.rmtree(store)  # deleting the store is safe
        features.forget()
        calls.clear()
        assert torch.equal(pooled_features(model, enc, tokenizer.pad_token_id), first)
        assert sum(calls) == len(enc)
        for f in store.rglob("*.safetensors"):
            f.write_bytes(b"not a safetensors file")
        features.forget()
        calls.clear()
        with caplog.at_level(logging.WARNING, logger="dptrain.features"):
            assert torch.equal(pooled_features(model, enc, tokenizer.pad_token_id), first)
        assert sum(calls) == len(enc)
        assert any("skipping unreadable feature file" in r.message for r in caplog.records)
    features.forget()


def test_token_states_come_back_from_the_store_exactly(encoder_dir, tmp_path, monkeypatch):
    from dptrain import features
    from dptrain.features import token_states
    from dptrain.models import _load_encoder

    features.forget()
    encoder = _load_encoder(encoder_dir).double()
    ids = [[2, 7, 9, 3], [2, 11, 3], [2, 5, 6, 8, 10, 3]]
    with features.feature_store(tmp_path / "store"):
        for layers in (1, 2):
            fresh = token_states(encoder, ids, [len(i) for i in ids], 0, tag_layers=layers)
            features.forget()
            monkeypatch.setattr(encoder, "forward", lambda *a, **k: pytest.fail("encoded again"))
            stored = token_states(encoder, ids, [len(i) for i in ids], 0, tag_layers=layers)
            monkeypatch.undo()
            for (a, b), (c, d) in zip(fresh, stored):
                assert torch.equal(a, c) and torch.equal(b, d)
            assert layers == 1 or not torch.equal(fresh[0][0], fresh[0][1])
    features.forget()


def test_a_run_keeps_its_features_and_a_later_command_reuses_them(encoder_dir, tmp_path, monkeypatch):
    """``train`` stores the encoder outputs in its run directory's private/features; a second
    process (memory forgotten) that opens that store encodes nothing."""
    from transformers.models.bert import modeling_bert

    from dptrain import TrainConfig, features, train_run
    from dptrain.cli import main

    features.forget()
    config = TrainConfig(model=str(encoder_dir), trainable="head", data="synthetic",
                         synthetic_per_intent=8, epochs=1, batch_size=16, dp_seed=0)
    train_run(config, tmp_path / "a", progress=False)
    assert list((tmp_path / "a" / "private" / "features").rglob("*.safetensors"))
    features.forget()
    calls = []
    original = modeling_bert.BertModel.forward
    monkeypatch.setattr(modeling_bert.BertModel, "forward",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert main(["train", "--model", str(encoder_dir), "--trainable", "head", "--data", "synthetic",
                 "--synthetic-per-intent", "8", "--epochs", "1", "--batch-size", "16", "--quiet",
                 "--feature-cache", str(tmp_path / "a" / "private" / "features"),
                 "--out", str(tmp_path / "b")]) == 0
    assert calls == []
    assert not (tmp_path / "b" / "private" / "features").exists()  # the named store served it
    features.forget()


def test_a_feature_cache_that_cannot_be_a_directory_is_one_line(tmp_path, capsys):
    from dptrain.cli import main

    (tmp_path / "file").write_text("x")
    code = main(["train", "--model", "tiny", "--feature-cache", str(tmp_path / "file"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "feature store" in err[0]
    assert not (tmp_path / "run").exists()
