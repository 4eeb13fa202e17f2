"""The sampler is the one the accountant assumes: independent Poisson inclusion with probability q."""

import numpy as np
import pytest
from scipy import stats

from dptrain import ConfigError, PoissonSampler, physical_batches


def test_batch_sizes_follow_binomial_n_q():
    n, q, steps = 500, 0.04, 4000
    sizes = np.array([len(b) for b in PoissonSampler(n, q, steps, seed=1)])
    # chi-square goodness of fit on bins of the Binomial(500, 0.04) pmf (mean 20, sd 4.4)
    edges = np.array([0, 13, 16, 18, 20, 22, 24, 27, n + 1])
    observed = np.histogram(sizes, bins=edges)[0]
    cdf = stats.binom.cdf(edges - 1, n, q)
    expected = np.diff(cdf) * steps
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / steps)


def test_every_example_is_included_independently_with_probability_q():
    n, q, steps = 200, 0.1, 3000
    hits = np.zeros((steps, n), dtype=bool)
    for t, batch in enumerate(PoissonSampler(n, q, steps, seed=2)):
        hits[t, batch] = True
    per_example = hits.sum(axis=0)  # each ~ Binomial(steps, q)
    z = (per_example - steps * q) / np.sqrt(steps * q * (1 - q))
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # pairs of examples: joint inclusion at rate q², not more (no coupling as in shuffling)
    joint = (hits[:, 0] & hits[:, 1]).mean()
    assert abs(joint - q * q) < 4 * np.sqrt(q * q / steps)
    # consecutive steps are independent: batch sizes uncorrelated
    sizes = hits.sum(axis=1)
    assert abs(np.corrcoef(sizes[:-1], sizes[1:])[0, 1]) < 4 / np.sqrt(steps)


def test_empty_batches_happen_and_are_yielded():
    batches = list(PoissonSampler(20, 0.02, 200, seed=3))
    assert len(batches) == 200
    empty = sum(len(b) == 0 for b in batches)
    assert empty > 100  # P(empty) = 0.98^20 ≈ 0.67
    assert all(b.dtype.kind == "i" for b in batches)


def test_sampler_resumes_where_it_stopped():
    full = [b.tolist() for b in PoissonSampler(50, 0.2, 10, seed=4)]
    first = PoissonSampler(50, 0.2, 10, seed=4)
    it = iter(first)
    head = [next(it).tolist() for _ in range(4)]
    state = first.state_dict()
    second = PoissonSampler(50, 0.2, 10, seed=999)
    second.load_state_dict(state)
    assert head + [b.tolist() for b in second] == full
    assert len(second) == 0


def test_unseeded_samplers_differ():
    a = [b.tolist() for b in PoissonSampler(100, 0.3, 5)]
    b = [b.tolist() for b in PoissonSampler(100, 0.3, 5)]
    assert a != b


def test_physical_batches_cover_the_logical_batch_with_bounded_size_and_sorted_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=300)
    logical = np.sort(rng.choice(300, size=77, replace=False))
    chunks = physical_batches(logical, 16, lengths)
    assert len(chunks) == 5 and max(len(c) for c in chunks) <= 16
    assert sorted(np.concatenate(chunks).tolist()) == logical.tolist()
    flat = np.concatenate(chunks)
    assert np.all(np.diff(lengths[flat]) >= 0)
    assert physical_batches(np.array([], dtype=int), 8) == []


@pytest.mark.parametrize("args", [(0, 0.1, 5), (10, 0.0, 5), (10, 1.5, 5), (10, 0.1, -1)])
def test_bad_sampler_arguments(args):
    with pytest.raises(ConfigError):
        PoissonSampler(*args)
