"""``dptrain check``: the replay check passes on a correct engine and catches planted bugs
(clipping switched off; the norm of one layer type left out), each with a figure that says so."""

import pytest
import torch
from torch import nn

from dptrain.check import replay_check
from dptrain.cli import main


def _batch(model_name="tiny", size=6):
    from dptrain.data import collate, encode, load_intent_data
    from dptrain.models import load_model

    data = load_intent_data("synthetic", seed=0, synthetic_per_intent=4)
    model, tokenizer = load_model(model_name, data.num_labels, data.label_names)
    enc = encode(tokenizer, data.train, 24)
    return model, dict(collate(enc, list(range(0, 6 * size, 6)), tokenizer.pad_token_id))


@pytest.mark.parametrize("bound", [1.0, "auto", 1e-3])
def test_a_correct_engine_passes_with_removal_shift_at_most_the_sensitivity(bound):
    model, batch = _batch()
    result = replay_check(model, batch, max_grad_norm=bound)
    assert result.passed, result.lines()
    assert 0.5 < result.max_shift <= 1.0 + 1e-6  # clipped examples move the sum by ~C, never more
    assert result.max_additivity_error < 1e-5 and result.max_reference_error < 1e-5


def test_clipping_switched_off_is_caught(monkeypatch):
    from dptrain.engine import PerSampleClipper

    monkeypatch.setattr(PerSampleClipper, "clip_factors", lambda self, norms: torch.ones_like(norms))
    model, batch = _batch()
    result = replay_check(model, batch, max_grad_norm=1e-2)
    assert not result.passed and result.max_shift > 10  # unclipped gradients are ~100x C here


def test_a_norm_that_leaves_out_the_embeddings_is_caught(monkeypatch):
    """The per-sample norm computed without one layer type underestimates ||G_i||, so clipping
    lets examples contribute more than C."""
    from dptrain.clipping.registry import rule_for

    rule = rule_for(nn.Embedding(2, 2))
    monkeypatch.setattr(type(rule), "norm_sq", lambda self, module, calls, ctx: torch.zeros(
        calls[0].grad.shape[0], dtype=torch.float32))
    model, batch = _batch()
    result = replay_check(model, batch, max_grad_norm=1e-2)
    assert not result.passed
    assert result.max_shift > 1.0 + 1e-3 or result.max_reference_error > 1e-3


def test_cli_exit_codes(capsys, monkeypatch):
    assert main(["check", "--model", "tiny", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS: 4 neighbouring batches") and "must be <= 1" in out
    assert main(["check", "--model", "tiny", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "batch_size must be an integer >= 2" in err and err.count("\n") == 1
    from dptrain.engine import PerSampleClipper

    monkeypatch.setattr(PerSampleClipper, "clip_factors", lambda self, norms: torch.ones_like(norms))
    assert main(["check", "--model", "tiny", "--batch-size", "4", "--max-grad-norm", "0.01"]) == 1
    assert capsys.readouterr().out.startswith("FAIL")


def test_check_covers_lora_adapters(capsys):
    """``--trainable lora``: the adapters (B randomized so that A's gradient is not zero) and the
    head pass the replay check."""
    assert main(["check", "--model", "tiny", "--trainable", "lora", "--batch-size", "4"]) == 0
    assert capsys.readouterr().out.startswith("PASS: 4 neighbouring batches")
