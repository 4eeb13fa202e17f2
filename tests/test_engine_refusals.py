"""Fail closed: whatever would break per-sample independence or clipping coverage raises."""

import pytest
import torch
from torch import nn

from dptrain import DPOptimizer, ModelError, PerSampleClipper
from dptrain.clipping import ClipRule, register_rule, rule_for
from oracle import padded_batch, tiny_model


def test_batchnorm_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ModelError, match="BatchNorm1d mixes samples"):
        PerSampleClipper(model)


def test_tied_trainable_weights_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(ModelError, match="weight tying"):
        PerSampleClipper(Tied())


def test_parameter_used_outside_its_module_raises_during_backward():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) @ self.lin.weight  # second, unclipped use of the weight

    model = Leaky()
    PerSampleClipper(model)
    with pytest.raises(ModelError, match="lin.weight received a gradient from autograd"):
        model(torch.randn(3, 4)).sum().backward()


def test_two_forwards_then_one_backward_raises():
    model = tiny_model("bert")
    PerSampleClipper(model)
    batch = padded_batch("bert")
    first = model(**batch).loss
    second = model(**batch).loss
    with pytest.raises(ModelError, match="newer forward pass"):
        (first + second).backward()


def test_backward_twice_through_one_forward_raises():
    model = nn.Sequential(nn.Linear(3, 2))
    PerSampleClipper(model)
    loss = model(torch.randn(4, 3)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(ModelError, match="second gradient"):
        loss.backward()


def test_forward_without_backward_is_forgotten():
    """A grad-enabled forward used only for logging must not leak into the next clipped sum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    clipper = PerSampleClipper(model, max_grad_norm=1e9, loss_reduction="sum")
    model(torch.randn(9, 3, dtype=torch.float64)).sum()  # never backpropagated
    model(x).sum().backward()
    assert clipper.rows_clipped == 4
    clipped = [p.grad.clone() for p in model.parameters()]
    clipper.detach()
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()  # the plain gradient: nothing clipped at C = 1e9
    for got, p in zip(clipped, model.parameters()):
        torch.testing.assert_close(got, p.grad)


def test_layer_with_randomness_is_refused_by_the_fallback():
    class NoisyScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return nn.functional.dropout(x * self.w, 0.5, training=True)

    model = nn.Sequential(NoisyScale())
    PerSampleClipper(model)
    with pytest.raises(ModelError, match="random operations"):
        model(torch.randn(4, 3)).sum().backward()


def test_gradient_checkpointing_is_refused():
    model = tiny_model("bert")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    with pytest.raises(ModelError, match="checkpointing"):
        PerSampleClipper(model)


def test_optimizer_with_foreign_trainable_parameters_is_refused():
    model = nn.Linear(3, 2)
    extra = nn.Parameter(torch.zeros(2))
    clipper = PerSampleClipper(model)
    with pytest.raises(ModelError, match="not part of the privately trained model"):
        DPOptimizer(torch.optim.SGD([*model.parameters(), extra], lr=0.1), clipper,
                    noise_multiplier=1.0, expected_batch_size=4)


def test_all_frozen_model_is_refused():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters"):
        PerSampleClipper(model)


def test_registry_refuses_a_second_rule_for_a_type_unless_replacing():
    class MyLayer(nn.Module):
        pass

    @register_rule(MyLayer)
    class First(ClipRule):
        pass

    with pytest.raises(ValueError, match="already registered"):
        @register_rule(MyLayer)
        class Second(ClipRule):
            pass

    @register_rule(MyLayer, replace=True)
    class Third(ClipRule):
        pass

    assert type(rule_for(MyLayer())) is Third


def test_parameter_unfrozen_outside_the_model_is_refused_at_step():
    """A tensor the optimizer holds but the model does not (frozen when wrapped, unfrozen
    later) gets a raw gradient; stepping would release it unclipped and un-noised."""
    model = nn.Linear(3, 2)
    extra = nn.Parameter(torch.zeros(2), requires_grad=False)
    optimizer = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    dp = DPOptimizer(optimizer, clipper, noise_multiplier=1.0, expected_batch_size=4)
    extra.requires_grad_(True)
    (model(torch.randn(4, 3)) + extra).sum().backward()
    with pytest.raises(ModelError, match="gradients that per-sample clipping did not produce"):
        dp.step()
    assert torch.equal(extra.detach(), torch.zeros(2))


def test_parameter_frozen_after_attaching_is_refused_at_forward():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    PerSampleClipper(model)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ModelError, match=r"0\.weight was frozen after"):
        model(torch.randn(4, 3))


def test_sequence_first_linear_layers_are_refused_even_when_T_equals_B():
    """ids [B, T] → [T, B, d] inside: with T == B every shape looks batch-first, so only the
    structural check (sub-batches must stack on axis 0) can tell positions from samples."""

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, ids):
            h = self.emb(ids).transpose(0, 1)  # [T, B, d]
            h = torch.tanh(self.mix(h)).cumsum(0)  # positions mix along axis 0
            return self.head(h.transpose(0, 1).mean(1))

    model = SeqFirst()
    PerSampleClipper(model)
    with pytest.raises(ModelError, match="mix .*does not split by sample along axis 0"):
        model(torch.randint(0, 10, (5, 5)))


def test_in_place_write_to_a_layer_input_after_the_layer_is_refused():
    class Overwrites(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = x * 1.0
            out = self.lin(h)
            h.mul_(2.0)  # the captured input of lin no longer holds what lin saw
            return out.sum(1) + h.detach().sum(1)

    model = Overwrites()
    PerSampleClipper(model)
    with pytest.raises(ModelError, match="modified in place afterwards"):
        model(torch.randn(3, 4)).sum().backward()


def test_fallback_refuses_a_non_sample_input_whose_size_equals_the_batch():
    """A custom layer (torch.func fallback) that takes a [T, T] matrix: with T == B, vmap would
    hand row i of the matrix to sample i. The per-sample gradients then do not add up to the
    batch gradient, which the fallback checks."""

    class Mixer(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d, d) / d)

        def forward(self, x, mix):  # x [B, T, d], mix [T, T]: the same for every sample
            return mix @ torch.tanh(x @ self.w)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = Mixer(3)

        def forward(self, x):
            t = x.shape[1]
            mix = torch.tril(torch.ones(t, t, dtype=x.dtype)) / t
            return self.mixer(x, mix).pow(2).sum(dim=(1, 2))

    torch.manual_seed(0)
    model = Model().double()
    PerSampleClipper(model, loss_reduction="sum")
    with pytest.raises(ModelError, match="has leading dimension 4 but the batch has 5"):
        model(torch.randn(5, 4, 3, dtype=torch.float64)).sum().backward()  # T != B: by shape
    with pytest.raises(ModelError, match="do not add up to its batch gradient"):
        model(torch.randn(4, 4, 3, dtype=torch.float64)).sum().backward()
