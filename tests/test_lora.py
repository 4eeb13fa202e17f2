"""LoRA under DP: per-sample clipped sums of adapter models against a per-example loop.

Opacus issue #820: with peft >= 0.14, DP-LoRA trained "normally" and produced unusable models,
because the per-sample gradients of the adapters were not what the hooks assumed. These tests
catch exactly that for the peft version we pin: both our in-place injection
(:func:`dptrain.models.apply_lora`) and peft's own ``get_peft_model`` wrapper (what a
``DPTrainer`` user passes), on tiny BERT, RoBERTa and GPT-2 (peft adapts its Conv1D), with padding.
The adapters are randomized first: at peft's initialization B = 0, so A's true gradient is zero
and a broken A would go unnoticed.
"""

import pytest
import torch

from dptrain import PerSampleClipper
from dptrain.errors import ConfigError, ModelError
from dptrain.models import apply_lora, merge_lora, set_trainable
from oracle import (
    assert_grads_close, clipped_sum, norms_of, padded_batch, per_example_grads, removal_shifts, row,
    tiny_model,
)


def randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def injected(kind, rank=4):
    model = tiny_model(kind)
    apply_lora(model, rank=rank, alpha=8, targets="auto" if kind != "gpt2" else "c_attn")
    set_trainable(model, "lora")
    randomize_adapters(model)
    return model


def wrapped(kind):
    from peft import LoraConfig, TaskType, get_peft_model

    targets = {"bert": ["query", "value"], "roberta": ["query", "value"], "gpt2": ["c_attn"]}[kind]
    model = get_peft_model(tiny_model(kind), LoraConfig(
        task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    randomize_adapters(model)
    return model


def check_exact(model, kind, method="auto"):
    batch = padded_batch(kind)
    n = len(batch["labels"])
    ref = per_example_grads(model, lambda i: model(**row(batch, i)).loss, n)
    assert any("lora_A" in name for name in ref[0]) and all(
        "lora_" in name or "classifier" in name or "score" in name or "pooler" in name
        for name in ref[0])
    assert all(float(g.abs().max()) > 0 for name, g in ref[0].items() if "lora_A" in name)
    ref_norms = norms_of(ref)
    bound = float(ref_norms.median())
    clipper = PerSampleClipper(model, max_grad_norm=bound, keep_norms=True, norm_method=method)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    torch.testing.assert_close(clipper.last_norms, ref_norms, rtol=1e-5, atol=0)
    assert (ref_norms > bound).sum() >= 2
    assert_grads_close(model, clipped_sum(ref, bound), rtol=1e-5)
    clipper.detach()


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_injected_lora_clipped_sum_matches_per_example_loop(kind, method):
    check_exact(injected(kind), kind, method)


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_peft_wrapped_model_clipped_sum_matches_per_example_loop(kind):
    """The model a Hugging Face user builds with ``get_peft_model`` (adapters + a trained copy of
    the head in peft's ModulesToSaveWrapper)."""
    check_exact(wrapped(kind), kind)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_removing_one_example_moves_the_clipped_sum_by_at_most_C(kind):
    model = injected(kind)
    batch = padded_batch(kind, batch_size=8)
    bound = 0.05  # below every per-sample norm: each sample contributes a vector of norm exactly C
    clipper = PerSampleClipper(model, max_grad_norm=bound)
    for moved in removal_shifts(model, batch, 8):
        assert moved <= bound * (1 + 1e-6)
        assert moved > 0.99 * bound  # the example does contribute: the bound is tight, not vacuous
    clipper.detach()


def test_merged_model_is_a_plain_classifier_with_the_same_function(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = injected("bert")
    keys_before = set(tiny_model("bert").state_dict())
    batch = padded_batch("bert")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        merge_lora(model)
        after = model(**batch).logits
    assert set(model.state_dict()) == keys_before
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, before, rtol=1e-9, atol=1e-9)


def test_lora_options_are_checked():
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="rank"):
        apply_lora(model, rank=0)
    with pytest.raises(ConfigError, match="not linear modules"):
        apply_lora(model, targets="query,nonexistent")
    with pytest.raises(ModelError, match="apply_lora"):
        set_trainable(model, "lora")
    apply_lora(model, rank=2)
    with pytest.raises(ConfigError, match="use 'lora'"):
        set_trainable(model, "all")
    n = set_trainable(model, "lora")
    # 2 layers × (query, value) × (A: 2×32 + B: 32×2) + the head (32×5 + 5 + pooler 32×32 + 32)
    assert n == 2 * 2 * (64 + 64) + (32 * 5 + 5) + (32 * 32 + 32)


def test_cli_lora_run_ships_a_merged_classifier_and_resumes_exactly(tmp_path):
    """``dptrain train --trainable lora``: only adapters and head train (the rest of the encoder
    is bit-identical to its initialization), the shipped model is a plain classifier with the
    adapters folded in, and a crashed run resumes to the very same model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from dptrain import TrainConfig, train_run

    config = TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=12, epochs=2,
                         batch_size=32, physical_batch_size=16, epsilon=4.0, delta=1e-4, dp_seed=3,
                         trainable="lora", lora_rank=4, lora_alpha=8, lr=1e-2, checkpoint_every=4)
    whole = train_run(config, tmp_path / "whole", progress=False)
    assert whole.config.trainable == "lora"

    class Crash(Exception):
        pass

    def crash(done):
        if done == 10:
            raise Crash

    with pytest.raises(Crash):
        train_run(config, tmp_path / "stopped", progress=False, on_step=crash)
    train_run(config, tmp_path / "stopped", resume=True, progress=False)

    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "model" / "model.safetensors")
    assert not any("lora" in k for k in a) and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    from dptrain.models import load_model

    torch.manual_seed(config.seed)
    init, _ = load_model("tiny", 30)
    init_state = init.state_dict()
    changed = {k for k in a if not torch.equal(a[k], init_state[k].to(a[k].dtype))}
    # the adapted projections (W + (α/r)·B·A) and the head changed; nothing else did
    assert changed and all(k.endswith(("query.weight", "value.weight")) or "classifier" in k
                           or "pooler" in k for k in changed)
    assert any(k.endswith("query.weight") for k in changed)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "whole" / "model")
    assert model.config.num_labels == 30

