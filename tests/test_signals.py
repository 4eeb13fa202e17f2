"""Attack signals against direct formulas, including where p_y rounds to 1."""

import numpy as np
import pytest
import torch

from attacks.signals import Signals, compute_signals, signals_from_logits


def test_signals_match_the_definitions():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 7)) * 3
    y = rng.integers(0, 7, size=50)
    s = signals_from_logits(z, y)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    py = p[np.arange(50), y]
    np.testing.assert_allclose(s.loss, -np.log(py), rtol=1e-10)
    np.testing.assert_allclose(s.phi, np.log(py) - np.log(1 - py), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.label_prob, py, rtol=1e-10)
    np.testing.assert_allclose(s.probs, p, rtol=1e-6)
    # same as torch's cross-entropy
    ce = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(y), reduction="none").numpy()
    np.testing.assert_allclose(s.loss, ce, rtol=1e-10)


def test_phi_stays_finite_and_exact_when_the_model_is_certain():
    z = np.array([[60.0, 0.0, 0.0], [0.0, -60.0, 0.0]])  # p_y = 1 - 2e-26: 1 - p_y underflows
    s = signals_from_logits(z, np.array([0, 1]))
    assert np.isfinite(s.phi).all()
    assert s.phi[0] == pytest.approx(60.0 - np.log(2.0), rel=1e-12)
    assert s.phi[1] == pytest.approx(-60.0 - np.log(2.0), rel=1e-12)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="logits must be"):
        signals_from_logits(np.zeros((3, 4)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="at least 2 classes"):
        signals_from_logits(np.zeros((3, 1)), np.zeros(3, dtype=int))


def test_compute_signals_on_a_model_matches_its_logits_in_any_order(tiny_tokenizer, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=4)).eval()
    texts = ["check my balance", "play some music please now", "hi", "what time is it in paris"]
    labels = np.array([0, 1, 2, 3])
    s = compute_signals(model, tiny_tokenizer, texts, labels, batch_size=2)
    with torch.no_grad():
        for i, text in enumerate(texts):
            logits = model(**tiny_tokenizer(text, return_tensors="pt")).logits.double().numpy()
            one = signals_from_logits(logits, labels[i : i + 1])
            assert s.phi[i] == pytest.approx(one.phi[0], rel=1e-5, abs=1e-6)
    s.save(tmp_path / "s.npz")
    back = Signals.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.phi, s.phi)
