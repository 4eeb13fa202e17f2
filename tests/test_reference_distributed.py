"""Independent reference checks for multi-process DP-SGD, derived from the mathematics alone.

DP-SGD step (Abadi et al. 2016) with Poisson sampling, N examples, rate q, bound C, multiplier s:

* example i joins the logical batch B independently with probability q;
* G_i = gradient of example i's own loss, c_i = min(1, C / (||G_i|| + 1e-6)) (global L2 norm
  over all trainable parameters);
* released  g = (sum_{i in B} c_i G_i + N(0, s^2 C^2 I)) / (q N).

Claimed multi-process contract (K ranks): every rank draws the same global Poisson mask and keeps
the indices i with i mod K == rank; each rank clips and sums its part; the parts are all-reduced;
the Gaussian noise is drawn ONCE per step in total (rank 0); every rank divides by the global qN;
every rank releases the same tensor.

Only the public API is used (``Distributed``, ``PerSampleClipper``, ``DPOptimizer``,
``GaussianNoise``, ``PoissonSampler``).  The reference below is a plain per-example loop with
``torch.autograd.grad`` on a batch of one, in float64, with the clipping done by hand.  Every
check prints a ``RESULT`` line with the measured numbers (run with ``-s`` to see them).

One ``torch.multiprocessing.spawn`` per world size K in {2, 3} (a module-scoped fixture) runs all
the collective steps; the ranks write what they released to files that the tests then read.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

STAB = 1e-6          # the "+ 1e-6" in the clip factor
N_EX = 24            # examples in the toy datasets of checks 1-3
Q = 0.25             # sampling rate used for the global qN
QN = Q * N_EX        # = 6, the expected logical batch size every rank must divide by
SIGMA = 1.5          # noise multiplier of check 3
C_NOISE = 0.5        # clipping bound of check 3 (far from 1, so "s" vs "s*C" is told apart)
REL_TOL = 1e-5       # check 1: relative error of the released clipped sum
SENS_TOL = 1.0 + 1e-5  # check 2: max shift / C
VAR_TOL = 0.05       # check 3: |var / expected - 1|; the estimate's sd is sqrt(2/40602) = 0.007
P_MIN = 1e-3         # goodness-of-fit p-values must exceed this
MLP_IN, MLP_HIDDEN, MLP_OUT = 200, 200, 2   # 200*200 + 200 + 200*2 + 2 = 40602 coordinates
VOCAB, DIM, CLASSES, SEQ = 50, 16, 4, 6
KINDS = ("mlp", "emb")
WORLDS = (2, 3)


# --------------------------------------------------------------------------- #
# models and data (built identically in the test process and in every rank)
# --------------------------------------------------------------------------- #
class EmbMean(nn.Module):
    """Tiny embedding + mean-pooling + linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(dim=1))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(MLP_IN, MLP_HIDDEN), nn.Tanh(), nn.Linear(MLP_HIDDEN, MLP_OUT)
        )
    if kind == "emb":
        return EmbMean()
    raise ValueError(kind)


def make_data(kind: str):
    g = torch.Generator().manual_seed(99)
    if kind == "mlp":
        x = torch.randn(N_EX, MLP_IN, generator=g)
        y = torch.randint(0, MLP_OUT, (N_EX,), generator=g)
    else:
        x = torch.randint(0, VOCAB, (N_EX, SEQ), generator=g)
        y = torch.randint(0, CLASSES, (N_EX,), generator=g)
    return x, y


def scenarios(world: int) -> dict:
    """Global batches for check 1 (fixed, chosen by hand; all indices < N_EX)."""
    return {
        # mixed: every rank gets a part
        "mixed": [0, 1, 2, 5, 7, 8, 11, 13, 14, 17, 19, 22],
        # only multiples of K: every rank but rank 0 has an EMPTY part
        "only_rank0": [i for i in range(N_EX) if i % world == 0][:7],
        # only i = 1 mod K: rank 0 (the one that adds noise) has an EMPTY part
        "rank0_empty": [i for i in range(N_EX) if i % world == 1][:6],
        # a single example
        "single": [N_EX - 1],
        # the whole dataset
        "all": list(range(N_EX)),
    }


SENS_BATCH = "mixed"  # the global batch whose leave-one-out neighbours check 2 uses


# --------------------------------------------------------------------------- #
# the independent reference
# --------------------------------------------------------------------------- #
def reference_per_example(kind: str) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    """(names, shapes, G) with G[i] the flattened float64 gradient of example i's own loss."""
    model = make_model(kind).double()
    x, y = make_data(kind)
    if x.is_floating_point():
        x = x.double()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    rows = []
    for i in range(N_EX):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return names, [p.shape for p in params], torch.stack(rows)


def reference_clipped_sum(G: torch.Tensor, C: float, batch) -> torch.Tensor:
    norms = G.norm(dim=1)
    c = torch.clamp(C / (norms + STAB), max=1.0)
    idx = torch.as_tensor(list(batch), dtype=torch.long)
    if len(idx) == 0:
        return torch.zeros(G.shape[1], dtype=G.dtype)
    return (c[idx, None] * G[idx]).sum(dim=0)


def flat(named: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([named[n].reshape(-1).double() for n in names])


# --------------------------------------------------------------------------- #
# what every rank does
# --------------------------------------------------------------------------- #
def _one_step(model, x, y, opt, clipper, d, names_of, global_batch):
    """One logical step on this rank: shard, backward the MEAN loss, noisy_sum, scale."""
    part = d.shard(np.asarray(global_batch, dtype=np.int64))
    part = np.asarray(part, dtype=np.int64)
    opt.zero_grad()
    if part.size:
        # an empty part has no chunks: no forward/backward at all (the documented protocol of
        # ``make_private(...).batches``: "A logical batch may be empty (no chunks)")
        idx = torch.as_tensor(part, dtype=torch.long)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
    grads = opt.noisy_sum()
    pre = {names_of[id(p)]: g.detach().clone().double() for p, g in zip(clipper.parameters, grads)}
    opt.scale(grads)
    post = {names_of[id(p)]: g.detach().clone().double() for p, g in zip(clipper.parameters, grads)}
    return part, pre, post


def _worker(rank: int, world: int, init_file: str, out_dir: str, cfg: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        from dptrain.distributed import Distributed
        from dptrain.engine import PerSampleClipper
        from dptrain.noise import GaussianNoise
        from dptrain.optimizer import DPOptimizer

        d = Distributed(rank, world)
        out: dict = {"rank": rank}
        # checks 1 and 2: sigma = 0, released tensor must be the exact clipped sum
        for kind in KINDS:
            C = cfg[kind]
            model = make_model(kind)
            x, y = make_data(kind)
            names_of = {id(p): n for n, p in model.named_parameters()}
            clipper = PerSampleClipper(model, max_grad_norm=C)
            opt = DPOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.0), clipper,
                noise_multiplier=0.0, expected_batch_size=QN,
                noise=GaussianNoise(seed=None), distributed=d,
            )
            res: dict = {"scen": {}, "loo": {}}
            for name, batch in scenarios(world).items():
                res["scen"][name] = _one_step(model, x, y, opt, clipper, d, names_of, batch)
            base = scenarios(world)[SENS_BATCH]
            for j in base:
                nb = [i for i in base if i != j]
                res["loo"][j] = _one_step(model, x, y, opt, clipper, d, names_of, nb)[1]
            clipper.detach()
            out[kind] = res
        # check 3: empty logical batch on every rank, sigma > 0, two consecutive steps
        model = make_model("mlp")
        x, y = make_data("mlp")
        names_of = {id(p): n for n, p in model.named_parameters()}
        clipper = PerSampleClipper(model, max_grad_norm=C_NOISE)
        opt = DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), clipper,
            noise_multiplier=SIGMA, expected_batch_size=QN,
            noise=GaussianNoise(seed=None), distributed=d,
        )
        out["noise"] = [
            _one_step(model, x, y, opt, clipper, d, names_of, []) for _ in range(2)
        ]
        clipper.detach()
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def reference():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ref = {}
    for kind in KINDS:
        names, shapes, G = reference_per_example(kind)
        norms = G.norm(dim=1)
        # C = median per-example norm: about half the examples are clipped, half are not
        C = float(norms.median())
        ref[kind] = {"names": names, "G": G, "C": C, "norms": norms}
    torch.set_num_threads(before)
    return ref


@pytest.fixture(scope="module", params=WORLDS, ids=lambda k: f"K{k}")
def run(request, reference, tmp_path_factory):
    import torch.multiprocessing as mp

    world = request.param
    root = tmp_path_factory.mktemp(f"dist_K{world}")
    init_file = root / "pg_init"          # fresh file, in an existing directory
    out_dir = root / "out"
    out_dir.mkdir()
    cfg = {kind: reference[kind]["C"] for kind in KINDS}
    mp.spawn(_worker, args=(world, str(init_file), str(out_dir), cfg), nprocs=world, join=True)
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return world, ranks


# --------------------------------------------------------------------------- #
# check 1: sigma = 0 -> every rank releases exactly sum_{i in B} c_i G_i (and / qN after scale)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", KINDS)
def test_clipped_sum_matches_reference(run, reference, kind):
    # A wrong implementation is far outside REL_TOL = 1e-5:
    #  * no all-reduce (each rank releases its own part) -> rel. error ~ ||other parts||/||S|| >= 0.2
    #    (and the ranks disagree);  an empty rank would release 0 -> rel. error 1;
    #  * a part counted twice / a rank summed twice        -> rel. error >= ||part||/||S|| ~ 0.3;
    #  * no clipping, or a per-batch instead of per-example clip (C = median norm, so half the
    #    examples are clipped)                             -> rel. error of order 0.1 .. 1;
    #  * scale by the local batch size or by qN / K instead of the global qN -> factor K or more.
    world, ranks = run
    names, G, C = reference[kind]["names"], reference[kind]["G"], reference[kind]["C"]
    worst = 0.0
    worst_scaled = 0.0
    for name, batch in scenarios(world).items():
        ref = reference_clipped_sum(G, C, batch)
        parts = [set(r[kind]["scen"][name][0].tolist()) for r in ranks]
        # the shards really partition B (otherwise the check below would not mean much)
        assert set().union(*parts) == set(batch), (name, parts)
        assert sum(len(p) for p in parts) == len(batch), (name, parts)
        if name == "only_rank0":
            assert all(len(p) == 0 for p in parts[1:]), parts
        if name == "rank0_empty":
            assert len(parts[0]) == 0, parts
        released0 = flat(ranks[0][kind]["scen"][name][1], names)
        for r, out in enumerate(ranks):
            _, pre, post = out[kind]["scen"][name]
            released = flat(pre, names)
            scaled = flat(post, names)
            # every rank releases bit-identical tensors
            assert torch.equal(released, released0), (name, r)
            rel = float((released - ref).norm() / ref.norm())
            rel_scaled = float((scaled - ref / QN).norm() / (ref / QN).norm())
            worst = max(worst, rel)
            worst_scaled = max(worst_scaled, rel_scaled)
            assert rel <= REL_TOL, (kind, name, r, rel)
            assert rel_scaled <= REL_TOL, (kind, name, r, rel_scaled)
    n_clipped = int((reference[kind]["norms"] > C).sum())
    print(
        f"RESULT check1 K={world} {kind}: C={C:.4g} ({n_clipped}/{N_EX} clipped) "
        f"max rel err pre-noise={worst:.3g} after scale={worst_scaled:.3g}"
    )


# --------------------------------------------------------------------------- #
# check 2: sensitivity of the all-reduced pre-noise sum is at most C
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", KINDS)
def test_sensitivity_of_all_reduced_sum(run, reference, kind):
    # A wrong implementation fails: an example that lands on two ranks moves the sum by 2 c_j||G_j||
    # (up to 2C); no clipping moves it by ||G_j||, which is > C for half the examples here.
    world, ranks = run
    names, G, C = reference[kind]["names"], reference[kind]["G"], reference[kind]["C"]
    norms = reference[kind]["norms"]
    base = scenarios(world)[SENS_BATCH]
    assert any(float(norms[j]) > C * 1.01 for j in base)  # the bound is exercised (tight cases)
    worst = 0.0
    for out in ranks:
        full = flat(out[kind]["scen"][SENS_BATCH][1], names)
        for j in base:
            shift = float((full - flat(out[kind]["loo"][j], names)).norm())
            worst = max(worst, shift / C)
            assert shift <= C * SENS_TOL, (kind, j, shift, C)
            # and the shift is exactly this example's clipped contribution c_j ||G_j||
            nj = float(norms[j])
            expected = nj * min(1.0, C / (nj + STAB))
            assert abs(shift - expected) <= 1e-4 * C, (kind, j, shift, expected)
    print(f"RESULT check2 K={world} {kind}: max shift / C = {worst:.7f} over {len(base)} removals")


# --------------------------------------------------------------------------- #
# check 3: the noise is ONE draw of N(0, s^2 C^2) per step, shared by all ranks
# --------------------------------------------------------------------------- #
def test_noise_is_one_gaussian_draw(run, reference):
    # Wrong implementations and what they would give (expected variance v = s^2 C^2 = 0.5625):
    #  * noise added on every rank, independent draws, then all-reduced -> var = K v (ratio 2 or 3);
    #  * noise on every rank with the same seed, then all-reduced       -> var = K^2 v (ratio 4, 9);
    #  * noise on every rank but NOT all-reduced                        -> ranks disagree;
    #  * std s instead of s C                                            -> ratio 1/C^2 = 4;
    #  * no noise                                                        -> ratio 0;
    #  * the same noise at both steps (seed reused)                      -> correlation 1;
    #  * scale by qN/K or the local batch size                          -> scaled ratio K^2 or inf.
    # The variance estimate over n = 40602 coordinates has sd sqrt(2/n) = 0.007 in ratio; the
    # tolerance 0.05 (7 sd) separates ratio 1 from every one of these.
    world, ranks = run
    names = reference["mlp"]["names"]
    v = (SIGMA * C_NOISE) ** 2
    steps0 = ranks[0]["noise"]
    for r, out in enumerate(ranks):
        for t in range(2):
            part, pre, post = out["noise"][t]
            assert len(part) == 0
            assert torch.equal(flat(pre, names), flat(steps0[t][1], names)), (r, t)
            assert torch.equal(flat(post, names), flat(steps0[t][2], names)), (r, t)
    z = [flat(steps0[t][1], names).numpy() for t in range(2)]
    zs = [flat(steps0[t][2], names).numpy() for t in range(2)]
    n = z[0].size
    assert n >= 40_000
    lines = []
    for t in range(2):
        mean = float(z[t].mean())
        var = float(z[t].var())
        ks = stats.kstest(z[t], "norm", args=(0.0, math.sqrt(v)))
        var_s = float(zs[t].var())
        ratio, ratio_s = var / v, var_s / (v / QN**2)
        lines.append(
            f"step{t}: mean={mean:.2e} var={var:.5f} (ratio {ratio:.4f}) KS p={ks.pvalue:.3g} "
            f"scaled var={var_s:.3e} (ratio {ratio_s:.4f})"
        )
        assert abs(mean) <= 6 * math.sqrt(v / n), (t, mean)
        assert abs(ratio - 1) <= VAR_TOL, (t, var, v)
        assert ks.pvalue > P_MIN, (t, ks.pvalue)
        assert abs(ratio_s - 1) <= VAR_TOL, (t, var_s, v / QN**2)
        # scale is exactly the division by the global qN
        assert np.allclose(zs[t], z[t] / QN, rtol=1e-6, atol=0), t
    corr = float(np.corrcoef(z[0], z[1])[0, 1])
    lines.append(f"corr(step0, step1)={corr:.2e} (|.| <= {6 / math.sqrt(n):.3f})")
    assert abs(corr) <= 6 / math.sqrt(n), corr
    print(f"RESULT check3 K={world}: n={n} expected var={v} " + "; ".join(lines))


# --------------------------------------------------------------------------- #
# check 4: sharded Poisson sampling
# --------------------------------------------------------------------------- #
def _binomial_gof(sizes: np.ndarray, n: int, q: float) -> tuple[float, float]:
    """Chi-square goodness of fit of observed sizes to Binomial(n, q), bins with >= 5 expected."""
    T = sizes.size
    pmf = stats.binom.pmf(np.arange(n + 1), n, q)
    counts = np.bincount(sizes, minlength=n + 1)[: n + 1]
    # merge bins from both tails until every bin has an expected count >= 5
    edges = []
    acc_e, acc_o = 0.0, 0
    exp_bins, obs_bins = [], []
    for k in range(n + 1):
        acc_e += pmf[k] * T
        acc_o += counts[k]
        if acc_e >= 5:
            exp_bins.append(acc_e)
            obs_bins.append(acc_o)
            edges.append(k)
            acc_e, acc_o = 0.0, 0
    exp_bins[-1] += acc_e
    obs_bins[-1] += acc_o
    exp_bins, obs_bins = np.array(exp_bins), np.array(obs_bins)
    chi2 = float(((obs_bins - exp_bins) ** 2 / exp_bins).sum())
    return chi2, float(stats.chi2.sf(chi2, len(exp_bins) - 1))


@pytest.mark.parametrize("world", WORLDS, ids=lambda k: f"K{k}")
def test_sharded_poisson_sampling(world):
    # A wrong implementation fails: ranks drawing their own masks -> the union differs from the
    # unsharded batch; fixed-size or shuffled-epoch batches -> sizes far from Binomial (chi2 p ~ 0);
    # a wrong rate -> inclusion frequencies off by many standard errors.
    from dptrain.distributed import Distributed
    from dptrain.sampling import PoissonSampler

    n, q, steps, seed = 100, 0.05, 3000, 7
    plain = PoissonSampler(n, q, steps, seed=seed)
    shards = [PoissonSampler(n, q, steps, seed=seed, shard=Distributed(r, world)) for r in range(world)]
    sizes = []
    inclusion = np.zeros(n, dtype=np.int64)
    n_steps = 0
    for batch, *parts in zip(plain, *shards):
        batch = np.asarray(batch, dtype=np.int64)
        parts = [np.asarray(p, dtype=np.int64) for p in parts]
        assert len(np.unique(batch)) == len(batch)
        assert batch.size == 0 or (batch.min() >= 0 and batch.max() < n)
        union = np.concatenate(parts)
        assert len(np.unique(union)) == len(union), "shards overlap"
        assert set(union.tolist()) == set(batch.tolist()), n_steps
        for r, p in enumerate(parts):
            # the claimed rule: rank r keeps the indices i with i mod K == r
            assert set(p.tolist()) == {i for i in batch.tolist() if i % world == r}, (n_steps, r)
        for s in shards:
            assert s.last_global_batch_size == len(batch), n_steps
        sizes.append(len(batch))
        inclusion[batch] += 1
        n_steps += 1
    assert n_steps == steps
    sizes = np.asarray(sizes)
    chi2, p_sizes = _binomial_gof(sizes, n, q)
    # each example's count ~ Binomial(steps, q): sum of squared z-scores ~ chi2 with n dof
    zc = (inclusion - steps * q) / math.sqrt(steps * q * (1 - q))
    chi2_inc = float((zc**2).sum())
    p_inc = float(stats.chi2.sf(chi2_inc, n))
    zmax = float(np.abs(zc).max())
    z_bonf = float(stats.norm.isf(P_MIN / (2 * n)))
    print(
        f"RESULT check4 K={world}: steps={steps} mean size={sizes.mean():.3f} (nq={n*q}) "
        f"var={sizes.var():.3f} (nq(1-q)={n*q*(1-q):.3f}) size GoF chi2={chi2:.2f} p={p_sizes:.3g}; "
        f"inclusion freq range [{inclusion.min()/steps:.4f}, {inclusion.max()/steps:.4f}] "
        f"chi2={chi2_inc:.1f} (dof {n}) p={p_inc:.3g} max|z|={zmax:.2f} (< {z_bonf:.2f})"
    )
    assert p_sizes > P_MIN
    assert p_inc > P_MIN
    assert zmax < z_bonf
