"""Planted bugs: does the white-box audit catch a DP-SGD engine that breaks its guarantee?

Each bug below is a small, realistic mistake planted into a working engine (the real
:func:`~dptrain.private_training.make_private` setup, one method replaced):

=================  ==========================================================================
half_sigma         the noise is drawn with σ/2 while the accountant is told σ
no_clipping        per-sample clipping is skipped (clip factors all 1)
one_layer_norm     the per-sample norm is computed on the first layer only
two_ranks          two ranks each add noise of std σC/2 (total variance σ²C²/2, not σ²C²)
realized_divisor   the noisy sum is divided by the realized batch size, not q·N
shuffled_batches   fixed-size shuffled batches instead of Poisson sampling
=================  ==========================================================================

:func:`audit_engine` runs one white-box audit (m Dirac canaries, all iterates observed) of the
engine with one bug (or none) at a claimed ε and returns the f-DP and (ε, δ) one-run bounds.
Run ``python -m experiments.planted_bugs --out runs/planted_bugs.json`` for the README table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from attacks.whitebox_audit import bound_scores, plan_guesses
from dptrain.gradient_canaries import DiracCanaries
from dptrain.private_training import make_private

BUGS = ("half_sigma", "no_clipping", "one_layer_norm", "two_ranks", "realized_divisor",
        "shuffled_batches")


class ShuffledSampler:
    """The bug behind many DP libraries' ε: a fresh permutation per epoch, cut into fixed-size
    batches of ⌊qN⌋ (every example exactly once per epoch)."""

    def __init__(self, n: int, sample_rate: float, steps: int, seed: int):
        self.n, self.size, self.steps = n, max(1, int(sample_rate * n)), steps
        self.rng = np.random.default_rng(seed)
        self.last_batch_size = None

    def __iter__(self):
        per_epoch = max(1, self.n // self.size)
        for step in range(self.steps):
            if step % per_epoch == 0:
                perm = self.rng.permutation(self.n)
            k = step % per_epoch
            batch = np.sort(perm[k * self.size:(k + 1) * self.size])
            self.last_batch_size = int(batch.size)
            yield batch


def plant(bug: str | None, dp, canaries: DiracCanaries, seed: int) -> None:
    """Replace one piece of a working DP-SGD setup ``dp`` (after the canaries are attached)."""
    opt, clipper = dp.optimizer, dp.clipper
    sigma, sens = opt.noise_multiplier, clipper.sensitivity
    if bug is None:
        return
    if bug == "half_sigma":
        def noisy_sum():
            grads = clipper.grads()
            opt.noise.add_(grads, 0.5 * sigma * sens)
            return grads
        opt.noisy_sum = noisy_sum
    elif bug == "two_ranks":
        def noisy_sum():
            grads = clipper.grads()
            opt.noise.add_(grads, 0.5 * sigma * sens)  # rank 0
            opt.noise.add_(grads, 0.5 * sigma * sens)  # rank 1: variances add to σ²C²/2
            return grads
        opt.noisy_sum = noisy_sum
    elif bug == "no_clipping":
        clipper.clip_factors = lambda norms: torch.ones_like(norms)
    elif bug == "one_layer_norm":
        clipper.total_norm_sq = lambda parts: next(iter(parts.values()))
    elif bug == "realized_divisor":
        def scale(grads):
            realized = max(1, dp.sampler.last_batch_size + canaries.last_added)
            for g in grads:
                g.div_(realized)
        opt.scale = scale
    elif bug == "shuffled_batches":
        dp.sampler = ShuffledSampler(dp.sampler.num_examples, dp.sample_rate, dp.steps, seed)
        canaries.sampler = ShuffledSampler(canaries.m, dp.sample_rate, dp.steps, seed + 1)
        canaries._batches = iter(canaries.sampler)
        opt.expected_rows = lambda: dp.sampler.last_batch_size
    else:
        raise ValueError(f"unknown bug {bug!r}; choose from {', '.join(BUGS)}.")


def audit_engine(bug: str | None, epsilon: float, *, m: int = 10**6, seed: int = 0,
                 sample_rate: float = 1.0, steps: int = 1, n: int = 64, delta: float = 1e-5,
                 hidden: int = 1000, mechanism: bool = False) -> dict:
    """One white-box audit of the engine (with ``bug`` planted, or none) at a claimed ε.

    The model is a two-layer MLP with (20 + 1 + hidden + 1)·hidden parameters trained on random
    data; canaries go to the quietest coordinates, the auditor sees every release. q = 1 and one
    step is the setting where one run comes closest to the claim (each canary is then one
    Gaussian observation); other (q, steps) show how the bound degrades with subsampling.
    """
    torch.manual_seed(seed)
    x = torch.randn(n, 20)
    y = torch.randint(0, 3, (n,))
    model = torch.nn.Sequential(torch.nn.Linear(20, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    started = time.monotonic()
    dp = make_private(model, opt, num_examples=n, batch_size=sample_rate * n, steps=steps,
                      target_epsilon=epsilon, delta=delta, max_grad_norm=1.0, seed=seed)
    canaries = DiracCanaries(m, seed=seed + 10_000)
    dp.attach_canaries(canaries)
    plant(bug, dp, canaries, seed)
    for indices in dp.sampler:
        if indices.size:
            out = model(x[indices])[:, :3]
            torch.nn.functional.cross_entropy(out, y[indices]).backward()
        dp.optimizer.step()
        dp.optimizer.zero_grad()
    dp.detach()
    train_s = time.monotonic() - started
    # the auditor plans its guesses from the claim (σ as accounted, not as a bug may draw it)
    fractions = plan_guesses(m, noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=steps)
    row = {"bug": bug or "none", "claimed_epsilon": epsilon, "delta": delta, "m": m,
           "sample_rate": sample_rate, "steps": steps, "seed": seed,
           "noise_multiplier": dp.noise_multiplier, "train_seconds": round(train_s, 2),
           **bounds(canaries.all_iterates, canaries.included, delta, fractions)}
    if mechanism:
        from attacks.whitebox_audit import mechanism_bound

        row["epsilon_lb_mechanism"] = mechanism_bound(
            canaries.all_iterates, canaries.included, sample_rate=sample_rate, steps=steps,
            delta=delta, fractions=fractions)["epsilon_lb"]
    return row


def bounds(scores: np.ndarray, included: np.ndarray, delta: float, fractions) -> dict:
    """The Gaussian-curve and (ε, δ) one-run bounds, as the white-box audit computes them."""
    b = bound_scores(scores, included, delta=delta, fractions=fractions)
    return {"epsilon_lb_fdp": b["f_dp"]["epsilon_lb"], "mu_lb": b["f_dp"]["mu_lb"],
            "epsilon_lb_eps_delta": b["eps_delta"]["epsilon_lb"], "guesses": b["f_dp"]["r"],
            "right": b["f_dp"]["v"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--m", type=int, default=10**6, help="gradient canaries per audit")
    parser.add_argument("--seeds", type=int, default=20, help="repeated audits of the correct engine")
    parser.add_argument("--bug-seeds", type=int, default=5, help="repeated audits of each bug")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose another --out (results are never overwritten).")
    rows = []
    for eps in (1.0, 2.0):
        for bug in BUGS:
            kw = {"sample_rate": 0.1, "steps": 10} if bug in ("shuffled_batches", "realized_divisor") else {}
            for seed in range(args.bug_seeds):
                rows.append(audit_engine(bug, eps, m=args.m, mechanism=bool(kw), seed=seed, **kw))
                print(json.dumps(rows[-1]), flush=True)
        for seed in range(args.seeds):
            rows.append(audit_engine(None, eps, m=args.m, seed=seed))
            print(json.dumps(rows[-1]), flush=True)
        for seed in range(3):
            rows.append(audit_engine(None, eps, m=args.m, seed=seed, sample_rate=0.1, steps=10,
                                     mechanism=True))
            print(json.dumps(rows[-1]), flush=True)
    for eps in (1.0, 2.0):
        rows.append(replay_steps(None, epsilon=eps))
        for bug in BUGS:
            rows.append(replay_steps(bug, epsilon=eps))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))



# --------------------------------------------------------------------------------------------
# Grey-box replay of whole steps (Cebere et al. 2026's record-and-replay idea)
# --------------------------------------------------------------------------------------------


class _KeyedPoisson:
    """Poisson sampling whose coin for (step, example) is fixed by the example's identity, so the
    run on D' = D minus one example draws the very same coins for everyone else."""

    def __init__(self, ids: np.ndarray, uniforms: np.ndarray, sample_rate: float):
        self.ids, self.uniforms, self.q = ids, uniforms, sample_rate
        self.last_batch_size = None
        self.num_examples = ids.size

    def __iter__(self):
        for u in self.uniforms:
            batch = np.flatnonzero(u[self.ids] < self.q)  # positions in this run's data
            self.last_batch_size = int(batch.size)
            yield batch


class _KeyedShuffle(_KeyedPoisson):
    """The shuffled_batches bug, replayed: per-epoch priorities fixed per example; each epoch
    sorts this run's examples by them and cuts fixed-size batches."""

    def __iter__(self):
        size = max(1, int(self.q * self.ids.size))
        per_epoch = max(1, self.ids.size // size)
        for t, u in enumerate(self.uniforms):
            order = np.argsort(self.uniforms[t - t % per_epoch][self.ids], kind="stable")
            k = t % per_epoch
            batch = np.sort(order[k * size:(k + 1) * size])
            self.last_batch_size = int(batch.size)
            yield batch


def replay_steps(bug: str | None, *, n: int = 40, sample_rate: float = 0.5, steps: int = 4,
                 epsilon: float = 2.0, seed: int = 0, hidden: int = 256,
                 max_grad_norm: float = 0.01) -> dict:
    """Run ``steps`` DP-SGD steps on D and on D' = D minus one sampled example, with identical
    randomness (per-example coins, noise streams, initial weights; learning rate 0 so that both
    runs stay at the same weights), and check what a correct engine guarantees:

    * batches: every other example is in the same batches in both runs;
    * noise: the same draws (number, shapes) in both, and the noise actually added (released
      update x q·N minus the pre-noise sum) has standard deviation σ·C (± 3%);
    * sensitivity: q·N·ĝ(D) − q·(N−1)·ĝ(D') has norm ≤ C at every step (C = 0.01 by default, so
      that every example is clipped and a clipping bug cannot hide below the bound).
    """
    gen = np.random.default_rng(seed)
    x_all = torch.from_numpy(gen.standard_normal((n, 20))).float()
    y_all = torch.from_numpy(gen.integers(0, 3, n))
    uniforms = gen.random((steps, n))
    first = np.flatnonzero(uniforms[0] < sample_rate)
    removed = int(first[0]) if first.size else 0
    record = {}
    for name, ids in (("D", np.arange(n)), ("D'", np.delete(np.arange(n), removed))):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(20, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        dp = make_private(model, opt, num_examples=ids.size, batch_size=sample_rate * ids.size,
                          steps=steps, noise_multiplier=_sigma(epsilon, sample_rate, steps),
                          delta=1e-5, max_grad_norm=max_grad_norm, seed=seed)
        keyed = (_KeyedShuffle if bug == "shuffled_batches" else _KeyedPoisson)(ids, uniforms, sample_rate)
        dp.sampler = keyed
        dp.optimizer.expected_rows = lambda k=keyed: k.last_batch_size
        canaries = DiracCanaries(1, seed=seed)  # realized_divisor counts canaries: none here
        canaries.last_added = 0
        if bug != "shuffled_batches":
            plant(bug, dp, canaries, seed)
        rec = {"batches": [], "draws": [], "pre": [], "released": [], "divisor": dp.optimizer.expected_batch_size}
        inner_noise, inner_sum = dp.optimizer.noise.add_, dp.optimizer.noisy_sum

        def add_(tensors, std, inner=inner_noise, rec=rec):
            rec["draws"][-1].append((round(float(std), 12), [tuple(t.shape) for t in tensors]))
            return inner(tensors, std)

        def noisy_sum(inner=inner_sum, rec=rec, dp=dp):
            rec["pre"].append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).clone()
                                         for p in dp.clipper.parameters]))
            rec["draws"].append([])
            return inner()

        dp.optimizer.noise.add_ = add_
        dp.optimizer.noisy_sum = noisy_sum
        inner_step = dp.optimizer.original_optimizer.step

        def step(*a, inner=inner_step, rec=rec, dp=dp, **k):
            rec["released"].append(torch.cat([p.grad.detach().reshape(-1).clone() for p in dp.clipper.parameters]))
            return inner(*a, **k)

        dp.optimizer.original_optimizer.step = step
        for batch in dp.sampler:
            rec["batches"].append(set(ids[batch].tolist()))
            if batch.size:
                loss = torch.nn.functional.cross_entropy(model(x_all[ids[batch]]), y_all[ids[batch]])
                loss.backward()
            dp.optimizer.step()
            dp.optimizer.zero_grad()
        dp.detach()
        rec["sigma_c"] = dp.noise_multiplier * dp.clipper.sensitivity
        record[name] = rec
    d, d2 = record["D"], record["D'"]
    same_batches = all(a - {removed} == b for a, b in zip(d["batches"], d2["batches"]))
    same_draws = d["draws"] == d2["draws"]
    noise = torch.cat([r * d["divisor"] - p for r, p in zip(d["released"], d["pre"])])
    noise_ratio = float(noise.std() / d["sigma_c"])
    shift = max(float((a * d["divisor"] - b * d2["divisor"]).norm())
                for a, b in zip(d["released"], d2["released"]))
    sensitivity = max_grad_norm
    return {
        "kind": "replay", "claimed_epsilon": epsilon, "bug": bug or "none", "removed": removed,
        "same_batches": same_batches, "same_noise_draws": same_draws,
        "noise_std_over_sigma_c": noise_ratio, "max_shift_over_c": shift / sensitivity,
        "passed": bool(same_batches and same_draws and abs(noise_ratio - 1) <= 0.03
                       and shift <= sensitivity * (1 + 1e-4)),
    }


def _sigma(epsilon: float, sample_rate: float, steps: int) -> float:
    from dptrain.accounting import calibrate_noise_multiplier

    return calibrate_noise_multiplier(target_epsilon=epsilon, delta=1e-5, sample_rate=sample_rate,
                                      steps=steps, accountant="prv")


if __name__ == "__main__":
    main()
