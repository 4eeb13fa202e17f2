"""The DP-SGD step: noise of the right scale, once per logical batch, divided by q·N."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from dptrain import ConfigError, DPOptimizer, ModelError, PerSampleClipper, PrivacyBudgetExceeded, make_private
from dptrain.noise import GaussianNoise
from oracle import clipped_sum, per_example_grads


def linear_model():
    torch.manual_seed(0)
    return nn.Linear(50, 40).double()


def linear_setup(max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0, noise=None, model=None):
    model = model if model is not None else linear_model()
    clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm, loss_reduction="sum")
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = DPOptimizer(sgd, clipper, noise_multiplier=noise_multiplier,
                      expected_batch_size=expected_batch_size, noise=noise or GaussianNoise(seed=0))
    return model, opt


def test_noise_has_standard_deviation_sigma_times_c():
    """With no data, the update is pure noise / (qN): its std must be σC/(qN) (chi-square CI)."""
    sigma, C, qn = 1.7, 0.6, 5.0
    model, opt = linear_setup(max_grad_norm=C, noise_multiplier=sigma, expected_batch_size=qn)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # empty logical batch
    update = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())]).numpy()
    noise = update * qn  # undo the division by the expected batch size
    n = noise.size  # 2040 values
    assert abs(noise.mean()) < 4 * sigma * C / np.sqrt(n)
    var = noise.var(ddof=1)
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], n - 1) / (n - 1)
    assert lo * (sigma * C) ** 2 < var < hi * (sigma * C) ** 2
    assert stats.kstest(noise / (sigma * C), "norm").pvalue > 1e-3  # Gaussian, not just right variance


def test_parallel_noise_is_gaussian_with_requested_std_on_large_tensors():
    gen = GaussianNoise(seed=3, workers=2)
    t = [torch.zeros(3_000_000), torch.zeros(10)]
    gen.add_(t, std=2.5)
    values = torch.cat([x.reshape(-1) for x in t]).double()
    n = values.numel()
    assert abs(values.mean().item()) < 4 * 2.5 / np.sqrt(n)
    assert abs(values.std().item() / 2.5 - 1) < 4 / np.sqrt(2 * n)
    # chunks filled by different generators are independent of each other
    first, second = t[0][: 1 << 20], t[0][1 << 20 : 2 << 20]
    assert abs(np.corrcoef(first.numpy(), second.numpy())[0, 1]) < 4 / np.sqrt(1 << 20)


def test_seeded_noise_is_reproducible_and_unseeded_is_not():
    a, b = torch.zeros(1000), torch.zeros(1000)
    GaussianNoise(seed=5).add_([a], 1.0)
    GaussianNoise(seed=5).add_([b], 1.0)
    assert torch.equal(a, b)
    c, d = torch.zeros(1000), torch.zeros(1000)
    GaussianNoise().add_([c], 1.0)
    GaussianNoise().add_([d], 1.0)
    assert not torch.equal(c, d)


def test_step_is_clipped_sum_plus_noise_over_expected_batch_size():
    """Stage by stage: update = −lr · (Σ c_i g_i + z) / (qN), z from the same seeded generator."""
    sigma, C, qn = 0.8, 0.05, 3.0
    model = linear_model()
    x = torch.randn(3, 50, dtype=torch.float64)
    ref = per_example_grads(model, lambda i: model(x[i : i + 1]).pow(2).sum(), 3)  # before attaching
    expected_sum = clipped_sum(ref, C)
    model, opt = linear_setup(max_grad_norm=C, noise_multiplier=sigma, expected_batch_size=qn,
                              noise=GaussianNoise(seed=11), model=model)
    z = [torch.zeros_like(p) for p in opt.clipper.parameters]
    GaussianNoise(seed=11).add_(z, sigma * C)
    expected_noise = dict(zip(["bias", "weight"], z))  # clipper.parameters is sorted by name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x).pow(2).sum().backward()
    opt.step()
    for n, p in model.named_parameters():
        want = before[n] - (expected_sum[n] + expected_noise[n]) / qn
        torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-12)
        assert p.grad is None  # the step consumed the clipped sum


def test_noise_is_added_once_per_logical_batch_not_per_physical_batch():
    sigma, qn = 2.0, 4.0
    model, opt = linear_setup(noise_multiplier=sigma, expected_batch_size=qn)
    x = torch.zeros(2, 50, dtype=torch.float64)  # zero inputs: zero weight gradients
    before = model.weight.detach().clone()
    for _ in range(4):  # four physical batches of one logical batch
        model(x).sum().backward()
    opt.step()
    noise = (before - model.weight.detach()) * qn
    assert abs(noise.std().item() / sigma - 1) < 0.1  # one draw of σC, not √4 draws


def test_make_private_calibrates_steps_and_refuses_to_overspend():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), num_examples=100,
                      batch_size=10, steps=3, target_epsilon=2.0, delta=1e-3, seed=0)
    data = torch.randn(100, 6)
    labels = torch.randint(0, 3, (100,))
    chunk_sizes = []
    for logical in dp.batches(physical_batch_size=4):
        chunk_sizes += [len(c) for c in logical]
        for idx in logical:
            nn.functional.cross_entropy(model(data[idx]), labels[idx]).backward()
        dp.optimizer.step()
    assert dp.ledger.steps == 3
    assert 0 < dp.epsilon() <= 2.0
    assert chunk_sizes and max(chunk_sizes) <= 4
    with pytest.raises(PrivacyBudgetExceeded, match="past the target 2"):
        dp.optimizer.step()  # a fourth step would spend more than ε = 2
    assert dp.ledger.steps == 3


def test_step_refuses_batches_that_are_not_the_samplers():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), num_examples=100,
                      batch_size=10, steps=2, target_epsilon=2.0, delta=1e-3, seed=0)
    with pytest.raises(ModelError, match="before any batch"):
        dp.optimizer.step()
    logical = next(iter(dp.batches(physical_batch_size=64)))
    model(torch.randn(len(logical[0]) + 1, 6)).sum().backward()  # one extra, unsampled row
    with pytest.raises(ModelError, match="Poisson-sampled"):
        dp.optimizer.step()


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_epsilon=-1.0), "epsilon must be a finite number > 0"),
    (dict(target_epsilon=float("inf")), "epsilon must be a finite number > 0"),
    (dict(target_epsilon=1.0, delta=0.5), "delta must be < 1/N"),
    (dict(target_epsilon=1.0, delta=0.0), "delta must be in"),
    (dict(target_epsilon=1.0, noise_multiplier=1.0), "exactly one of target_epsilon"),
    (dict(target_epsilon=1e-9), "cannot be reached"),
])
def test_make_private_rejects_impossible_budgets(kwargs, message):
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=message):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), num_examples=100,
                     batch_size=10, epochs=1, **kwargs)


def test_seeded_noise_does_not_depend_on_the_thread_count():
    """A seeded run resumed on a machine with another core count must draw the same noise."""
    draws = []
    for workers in (1, 2, 3, 8):
        tensors = [torch.zeros(3 * (1 << 20) + 5), torch.zeros(17)]
        gen = GaussianNoise(seed=21, workers=workers)
        gen.add_(tensors, 1.0)
        state = gen.state_dict()
        resumed = GaussianNoise(seed=0, workers=9 - workers)
        resumed.load_state_dict(state)
        again = [torch.zeros(5)]
        resumed.add_(again, 1.0)
        draws.append((torch.cat(tensors), again[0]))
    for first, second in draws[1:]:
        assert torch.equal(first, draws[0][0]) and torch.equal(second, draws[0][1])


def test_a_backward_over_no_rows_adds_nothing():
    """An empty physical batch (a rank's empty part of a Poisson batch, in a user's loop) adds a
    zero clipped sum instead of failing inside a clipping rule."""
    import torch
    from torch import nn

    from dptrain.engine import PerSampleClipper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    try:
        x, y = torch.randn(0, 6), torch.zeros(0, dtype=torch.long)
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        assert clipper.rows_clipped == 0
        assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.parameters())
        # and the next, real batch is clipped as usual
        nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
        assert clipper.rows_clipped == 4
        assert 0 < float(torch.cat([p.grad.reshape(-1) for p in clipper.parameters]).norm()) <= 4.0 + 1e-5
    finally:
        clipper.detach()
