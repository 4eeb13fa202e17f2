"""Model resolution: local HF checkpoints, mean pooling for sentence encoders, trainable choices."""


import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertModel

from dptrain import ConfigError, ModelError, PerSampleClipper
from dptrain.models import MeanPoolingClassifier, load_model, load_trained, set_trainable
from oracle import assert_grads_close, clipped_sum, norms_of, per_example_grads


def test_auto_pooling_is_mean_for_sentence_encoders_and_cls_otherwise(encoder_dir):
    model, _ = load_model(str(encoder_dir), 3, ["a", "b", "c"])
    assert isinstance(model, MeanPoolingClassifier)
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert not any("pooler" in n for n, _ in model.named_parameters())  # unused: not trained
    (encoder_dir / "1_Pooling" / "config.json").unlink()
    model, _ = load_model(str(encoder_dir), 3)
    assert type(model).__name__ == "BertForSequenceClassification"
    model, _ = load_model(str(encoder_dir), 3, pooling="mean")
    assert isinstance(model, MeanPoolingClassifier)
    with pytest.raises(ConfigError, match="pooling must be one of"):
        load_model(str(encoder_dir), 3, pooling="max")


def test_mean_pooling_ignores_padding(encoder_dir, tiny_tokenizer):
    model, tok = load_model(str(encoder_dir), 3)
    model.eval()
    short = tok(["check my balance"], return_tensors="pt")
    padded = tok(["check my balance", "what time is it in paris right now please"], padding=True,
                 return_tensors="pt")
    with torch.no_grad():
        alone = model(**short).logits[0]
        in_batch = model(**padded).logits[0]
    torch.testing.assert_close(alone, in_batch, rtol=1e-5, atol=1e-6)


def test_saved_mean_pooling_classifier_round_trips_and_refuses_plain_hf_loading(encoder_dir, tmp_path):
    model, tok = load_model(str(encoder_dir), 3, ["a", "b", "c"])
    model.eval()
    out = tmp_path / "saved"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    back, tok2 = load_trained(out)
    batch = tok2(["check my balance", "play music"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model(**batch).logits)
    with pytest.raises((OSError, ValueError)):  # no config.json on top: HF refuses, no random head
        AutoModelForSequenceClassification.from_pretrained(out)
    with pytest.raises(ModelError, match="holds no trained classifier"):
        load_trained(tmp_path / "nothing")


def test_per_sample_clipping_is_exact_through_mean_pooling_with_padding(encoder_dir, tiny_tokenizer):
    model, tok = load_model(str(encoder_dir), 3)
    model = model.double()
    model.dropout.p = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    texts = ["check my balance", "play some music now", "hi", "what time is it in paris tonight"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1, 2, 1])
    ref = per_example_grads(model, lambda i: model(**{k: v[i:i + 1] for k, v in batch.items()}).loss, 4)
    c = float(norms_of(ref).median())
    expected = clipped_sum(ref, c)
    clipper = PerSampleClipper(model, max_grad_norm=c, keep_norms=True)
    model(**batch).loss.backward()
    torch.testing.assert_close(clipper.last_norms, norms_of(ref), rtol=1e-8, atol=0)
    assert_grads_close(model, expected)
    clipper.detach()


@pytest.mark.parametrize("spec, trains, frozen", [
    ("head", ["classifier.weight"], ["encoder.embeddings.word_embeddings.weight", "encoder.encoder.layer.1.output.dense.weight"]),
    ("last-1", ["classifier.weight", "encoder.encoder.layer.1.output.dense.weight"], ["encoder.encoder.layer.0.output.dense.weight", "encoder.embeddings.word_embeddings.weight"]),
    ("bias", ["classifier.weight", "encoder.encoder.layer.0.output.dense.bias"], ["encoder.encoder.layer.0.output.dense.weight"]),
    ("all", ["encoder.embeddings.word_embeddings.weight", "classifier.bias"], []),
])
def test_trainable_selection(encoder_dir, spec, trains, frozen):
    model, _ = load_model(str(encoder_dir), 3)
    count = set_trainable(model, spec)
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in trains)
    assert not any(params[n].requires_grad for n in frozen)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="last-K needs K in"):
        set_trainable(model, "last-9")
    with pytest.raises(ConfigError, match="trainable must be one of"):
        set_trainable(model, "some")


def test_head_only_classifier_refers_to_its_frozen_encoder_by_hash(encoder_dir, tmp_path):
    model, tok = load_model(str(encoder_dir), 3, ["a", "b", "c"])
    model.eval()
    out = tmp_path / "saved"
    model.save_pretrained(out, encoder_reference=True)
    tok.save_pretrained(out)
    assert not (out / "encoder").exists()  # no copy of the encoder
    back, tok2 = load_trained(out)
    batch = tok2(["check my balance", "play music"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model(**batch).logits)
    changed = BertModel.from_pretrained(encoder_dir)
    with torch.no_grad():
        changed.embeddings.word_embeddings.weight[0, 0] += 1.0
    changed.save_pretrained(encoder_dir)
    with pytest.raises(ModelError, match="not the one this classifier was trained on"):
        load_trained(out)


def test_label_names_read_as_words():
    from dptrain.models import has_word_labels, label_text

    assert [label_text(n) for n in ("AddToPlaylist", "book_flight", "meaning-of-life", "HTTPError")] \
        == ["add to playlist", "book flight", "meaning of life", "http error"]
    assert has_word_labels(["alarm", "book_flight"]) and not has_word_labels(["0", "1", "x2"][:2])


def test_a_label_start_puts_each_names_unit_embedding_times_the_scale_in_the_head(encoder_dir):
    """Row c = scale × f(name_c)/‖f(name_c)‖, f the frozen encoder's mean-pooled state of the
    label's name read as words; bias 0."""
    import numpy as np

    from dptrain.data import Split, collate, encode
    from dptrain.models import init_head_from_labels, load_model

    names = ("book_flight", "AddToPlaylist", "alarm")
    model, tokenizer = load_model(str(encoder_dir), 3, names)
    model.double().eval()
    init_head_from_labels(model, tokenizer, names, scale=2.5)
    enc = encode(tokenizer, Split(("book flight", "add to playlist", "alarm"), np.arange(3)), 32)
    batch = collate(enc, np.arange(3), tokenizer.pad_token_id)
    with torch.no_grad():
        states = model.encoder(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).double()
        pooled = (states * mask).sum(1) / mask.sum(1)
    expected = 2.5 * pooled / pooled.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(model.classifier.weight, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(model.classifier.bias, torch.zeros(3, dtype=torch.float64))
    assert float(model.classifier.weight.detach().norm(dim=-1).sub(2.5).abs().max()) < 1e-9


def test_head_init_is_recorded_resolved_and_refused_where_it_cannot_apply(encoder_dir, tmp_path):
    from dptrain import ConfigError, TrainConfig, train_run
    from dptrain.trainer import recipe

    config = TrainConfig(model=str(encoder_dir), data="synthetic", synthetic_per_intent=6,
                         epochs=1, batch_size=16, dp_seed=0, head_init="labels")
    summary = train_run(config, tmp_path / "run", progress=False)
    import json

    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["head_init"] == "labels" and summary.privacy["epsilon"] <= 8
    base = TrainConfig(model="x")
    assert recipe(base, "head", 800, True, word_labels=False).head_init == "random"
    assert recipe(base, "all", 800, True, word_labels=True).head_init == "random"
    assert TrainConfig.saved({"model": "minilm"}).head_init == "random"  # runs before the field
    with pytest.raises(ConfigError, match="head_init must be one of"):
        TrainConfig(head_init="zero")
    with pytest.raises(ConfigError, match="joint and slot models start theirs at random"):
        train_run(TrainConfig(model=str(encoder_dir), data="synthetic", task="joint",
                              head_init="labels"), tmp_path / "joint", progress=False)
    assert not (tmp_path / "joint").exists()
