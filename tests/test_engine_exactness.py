"""Per-sample norms and clipped sums of the engine against a per-example loop (the oracle).

Tiny random BERT, RoBERTa, MPNet and GPT-2 classifiers with padding and attention masks, every norm
method, float32 and float64: the engine's per-sample norms and its clipped sum (noise off) must
equal one ordinary backward pass per example to 1e-5 relative.
"""

import pytest
import torch
from torch import nn

from dptrain import PerSampleClipper
from oracle import (
    assert_grads_close, clipped_sum, norms_of, padded_batch, per_example_grads, row, tiny_model,
)


def engine_result(model, batch, max_grad_norm, **kwargs):
    clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm, keep_norms=True, **kwargs)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    norms = clipper.last_norms
    clipper.detach()
    return norms


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2", "mpnet"])
@pytest.mark.parametrize("method", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norms_and_clipped_sum_match_per_example_loop(kind, method, dtype):
    model = tiny_model(kind, dtype=dtype)
    if kind == "mpnet":  # its relative-position table is refused (next test); the rest is exact
        model.mpnet.encoder.relative_attention_bias.weight.requires_grad_(False)
    batch = padded_batch(kind)
    ref = per_example_grads(model, lambda i: model(**row(batch, i)).loss, len(batch["labels"]))
    ref_norms = norms_of(ref)
    max_grad_norm = float(ref_norms.median())  # about half the samples are clipped
    expected = clipped_sum(ref, max_grad_norm)

    norms = engine_result(model, batch, max_grad_norm, norm_method=method)

    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    assert (ref_norms > max_grad_norm).sum() >= 2  # clipping is exercised, not bypassed
    assert_grads_close(model, expected, rtol=1e-5)


def test_mpnets_shared_relative_position_table_is_refused_not_clipped_wrongly():
    """MPNet looks its relative-position biases up once per batch ([T, T] buckets) and expands
    them over the samples: no per-sample input to clip by. Training it is refused in one line;
    heads, last-K blocks, BitFit and LoRA never train it."""
    from dptrain import ModelError

    model = tiny_model("mpnet")
    batch = padded_batch("mpnet")
    with pytest.raises(ModelError, match="relative_attention_bias .* does not split by sample"):
        engine_result(model, batch, 1.0)


def test_padding_does_not_change_a_samples_gradient():
    """A sample padded to a longer batch has the gradient it has alone, unpadded."""
    model = tiny_model("bert")
    batch = padded_batch("bert", batch_size=4, seq_len=12)
    n = int(batch["attention_mask"][1].sum())
    alone = {k: v[1:2, :n] if v.dim() == 2 else v[1:2] for k, v in batch.items()}
    ref = per_example_grads(model, lambda i: model(**alone).loss, 1)
    engine_result(model, batch, max_grad_norm=1e9, loss_reduction="mean")  # no clipping
    grads_batch = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    others = {k: v[[0, 2, 3]] for k, v in batch.items()}
    engine_result(model, others, max_grad_norm=1e9)
    # gradient of the sum over 4 samples minus that over the other 3 = sample 1's gradient;
    # "mean" reduction was undone by the engine, so these are sums of per-sample gradients.
    for name, p in model.named_parameters():
        diff = grads_batch[name] - p.grad
        torch.testing.assert_close(diff, ref[0][name], rtol=1e-6, atol=1e-9 * (1 + ref[0][name].abs().max()))


def test_loss_reduction_sum_and_mean_agree():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    ref = per_example_grads(model, lambda i: model(**row(batch, i)).loss, 6)
    expected = clipped_sum(ref, 0.5)
    clipper = PerSampleClipper(model, max_grad_norm=0.5, loss_reduction="sum")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").backward()
    assert_grads_close(model, expected)
    clipper.detach()


def test_frozen_layers_are_ignored_and_cost_nothing():
    """Last-k fine-tuning: only the top layer and head train; frozen layers get no hooks."""
    model = tiny_model("bert")
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("bert.encoder.layer.1.", "classifier."))
    batch = padded_batch("bert")
    ref = per_example_grads(model, lambda i: model(**row(batch, i)).loss, 6)
    max_grad_norm = float(norms_of(ref).median())
    expected = clipped_sum(ref, max_grad_norm)
    clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm)
    hooked = {clipper._names[m] for m in clipper._rules}
    assert all(h.startswith(("bert.encoder.layer.1.", "classifier")) for h in hooked)
    model(**batch).loss.backward()
    assert_grads_close(model, expected)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    clipper.detach()


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update B A (Hu et al. 2021)."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


def test_lora_adapters_only():
    model = tiny_model("bert")
    model.requires_grad_(False)
    for layer in model.bert.encoder.layer:
        attn = layer.attention.self
        attn.query = LoRALinear(attn.query)
        attn.value = LoRALinear(attn.value)
    model.to(torch.float64)
    batch = padded_batch("bert")
    ref = per_example_grads(model, lambda i: model(**row(batch, i)).loss, 6)
    assert set(ref[0]) == {n for n, p in model.named_parameters() if "lora_" in n}
    max_grad_norm = float(norms_of(ref).median())
    expected = clipped_sum(ref, max_grad_norm)
    clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm)
    assert len(clipper._rules) == 8  # 2 layers x 2 projections x (A, B)
    model(**batch).loss.backward()
    assert_grads_close(model, expected)
    clipper.detach()


class SharedBlockNet(nn.Module):
    """Embedding → the same Linear twice (ALBERT-style sharing) → LayerNorm → mean → classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.shared = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.head(self.norm(h).mean(dim=1))


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_layer_called_twice_sums_its_calls(method):
    model = SharedBlockNet().double()
    ids = torch.tensor([[1, 2, 2, 0], [3, 4, 5, 6], [7, 7, 7, 7], [0, 0, 0, 9]])
    labels = torch.tensor([0, 1, 2, 1])

    def loss(i):
        return nn.functional.cross_entropy(model(ids[i : i + 1]), labels[i : i + 1])

    ref = per_example_grads(model, loss, 4)
    expected = clipped_sum(ref, float(norms_of(ref).median()))
    clipper = PerSampleClipper(model, max_grad_norm=float(norms_of(ref).median()),
                               norm_method=method, keep_norms=True)
    nn.functional.cross_entropy(model(ids), labels).backward()
    torch.testing.assert_close(clipper.last_norms, norms_of(ref), rtol=1e-10, atol=0)
    assert_grads_close(model, expected)
    clipper.detach()


class ScaleShift(nn.Module):
    """A layer no rule knows: y = x ⊙ w + b, with its own parameters (torch.func fallback)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w + self.b


def test_unknown_layer_uses_torch_func_fallback():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), ScaleShift(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (7,))
    ref = per_example_grads(model, lambda i: nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), 7)
    expected = clipped_sum(ref, float(norms_of(ref).median()))
    clipper = PerSampleClipper(model, max_grad_norm=float(norms_of(ref).median()), keep_norms=True)
    nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(clipper.last_norms, norms_of(ref), rtol=1e-10, atol=0)
    assert_grads_close(model, expected)
    clipper.detach()


def test_batch_of_one_and_two_dimensional_inputs():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([1])
    ref = per_example_grads(model, lambda i: nn.functional.cross_entropy(model(x), y), 1)
    expected = clipped_sum(ref, 0.1)
    clipper = PerSampleClipper(model, max_grad_norm=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    assert_grads_close(model, expected)
    clipper.detach()


def test_automatic_clipping_normalizes_each_sample():
    """AUTO-S (Bu et al. 2023): Σ_i g_i / (||g_i|| + 0.01)."""
    model = tiny_model("bert")
    batch = padded_batch("bert")
    ref = per_example_grads(model, lambda i: model(**row(batch, i)).loss, 6)
    coef = 1.0 / (norms_of(ref) + 0.01)
    expected = {n: sum(c * g[n] for c, g in zip(coef, ref)) for n in ref[0]}
    clipper = PerSampleClipper(model, max_grad_norm="auto")
    assert clipper.sensitivity == 1.0
    model(**batch).loss.backward()
    assert_grads_close(model, expected)
    clipper.detach()


def test_clipped_sums_accumulate_over_physical_batches():
    model = tiny_model("bert")
    batch = padded_batch("bert", batch_size=6)
    ref = per_example_grads(model, lambda i: model(**row(batch, i)).loss, 6)
    expected = clipped_sum(ref, 0.3)
    clipper = PerSampleClipper(model, max_grad_norm=0.3)
    for part in ([0, 1, 2, 3], [4], [5]):
        model(**{k: v[part] for k, v in batch.items()}).loss.backward()
    assert clipper.rows_clipped == 6
    assert_grads_close(model, expected)
    clipper.detach()


def test_detach_restores_an_ordinary_model():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    PerSampleClipper(model, max_grad_norm=1.0).detach()
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n])
        assert p.requires_grad
