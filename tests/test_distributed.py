"""DP-SGD on K processes (gloo on CPU, processes started by the tests), checked from the maths:

* the union of the ranks' batches is the Poisson batch (same draws; Binomial(N, q) sizes);
* with the noise off, the all-reduced clipped sum equals the single-process sum;
* with the noise on, the released noise has variance σ²S² — one draw per step, not K — and
  after scaling σ²S²/(qN)²; every rank releases the same tensor;
* ``dptrain train --nproc 2`` spends the same σ, steps and ε as one process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from dptrain.distributed import Distributed
from dptrain.sampling import PoissonSampler

pytestmark = pytest.mark.filterwarnings("ignore")


def test_the_union_of_the_ranks_batches_is_the_poisson_batch():
    n, q, steps, world = 300, 0.05, 3000, 3
    whole = PoissonSampler(n, q, steps, seed=11)
    ranks = [PoissonSampler(n, q, steps, seed=11, shard=Distributed(r, world)) for r in range(world)]
    sizes = []
    for batch, *parts in zip(whole, *ranks):
        assert sorted(np.concatenate(parts).tolist()) == batch.tolist()
        assert all((p % world == r).all() for r, p in enumerate(parts))  # disjoint by residue
        assert all(s.last_global_batch_size == batch.size for s in ranks)
        sizes.append(batch.size)
    # the union's sizes follow Binomial(N, q): chi-square over bins of the pmf
    sizes = np.asarray(sizes)
    edges = [0, 10, 12, 14, 15, 16, 18, 20, 22, n + 1]
    observed = np.histogram(sizes, bins=edges)[0]
    cdf = stats.binom.cdf(np.asarray(edges) - 1, n, q)
    expected = np.diff(cdf) * steps
    p = stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue
    assert p > 1e-3, (observed, expected)


class Net(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(8, width), nn.Linear(width, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)


BATCH = np.array([0, 3, 4, 7, 10, 11, 12, 19, 22, 25, 30, 31, 38])


def released(dist, sigma: float, width: int = 64, backward: bool = True, scale: bool = False):
    """One DP step's released tensor (before the optimizer) on this rank."""
    from dptrain.engine import PerSampleClipper
    from dptrain.noise import GaussianNoise
    from dptrain.optimizer import DPOptimizer

    model = Net(width)
    clipper = PerSampleClipper(model, max_grad_norm=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    dp = DPOptimizer(optimizer, clipper, noise_multiplier=sigma, expected_batch_size=8.0,
                     noise=GaussianNoise(seed=None), distributed=dist)
    x, y = _data()
    local = BATCH if dist is None else dist.shard(BATCH)
    if backward and local.size:
        nn.functional.cross_entropy(model(x[local]), y[local]).backward()
    grads = dp.noisy_sum()
    if scale:
        dp.scale(grads)
    out = torch.cat([g.reshape(-1) for g in grads]).double()
    clipper.detach()
    return out


def _rank(rank: int, world: int, store: str, out: str, sigma: float, width: int, backward: bool,
          scale: bool) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        value = released(Distributed(rank, world), sigma, width, backward, scale)
        torch.save(value, f"{out}.{rank}")
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()


def on_ranks(tmp_path, world: int, sigma: float, width: int = 64, backward: bool = True,
             scale: bool = False) -> list[torch.Tensor]:
    import torch.multiprocessing as mp

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = str(tmp_path / "released")
    mp.spawn(_rank, args=(world, str(tmp_path / "store"), out, sigma, width, backward, scale),
             nprocs=world, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


def test_without_noise_the_global_clipped_sum_equals_one_process(tmp_path):
    single = released(None, 0.0)
    parts = on_ranks(tmp_path, 2, 0.0)
    assert float(single.norm()) > 0
    for part in parts:  # every rank holds the whole sum
        assert torch.allclose(part, single, rtol=1e-5, atol=1e-7)


def test_the_noise_is_drawn_once_per_global_step(tmp_path):
    """No example anywhere: what is released is the noise alone. Its variance is σ²S² (one
    draw), not K·σ²S² (a draw per rank), and every rank releases the same values."""
    sigma, C, width = 1.3, 0.5, 4000  # 4000·8 + ... ≈ 44k coordinates: variance to ±1.5%
    ranks = on_ranks(tmp_path, 2, sigma, width=width, backward=False)
    assert torch.equal(ranks[0], ranks[1])
    var = float(ranks[0].var())
    assert var == pytest.approx((sigma * C) ** 2, rel=0.05)  # K draws would give twice that
    scaled = on_ranks(tmp_path / "s", 2, sigma, width=width, backward=False, scale=True)[0]
    assert float(scaled.var()) == pytest.approx((sigma * C / 8.0) ** 2, rel=0.05)


def _train(tmp_path, name: str, nproc: int) -> dict:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "dptrain", "train", "--model", "tiny", "--synthetic-per-intent", "30",
           "--epochs", "4", "--batch-size", "48", "--lr", "3e-3", "--epsilon", "4", "--dp-seed", "3",
           "--out", str(out), "--quiet", "--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"privacy": json.loads((out / "privacy.json").read_text()),
            "metrics": json.loads((out / "metrics.json").read_text()), "stdout": proc.stdout}


def test_train_on_two_processes_spends_the_same_privacy_as_one(tmp_path):
    one, two = _train(tmp_path, "one", 1), _train(tmp_path, "two", 2)
    for key in ("noise_multiplier", "sample_rate", "steps", "planned_steps", "epsilon", "delta"):
        assert one["privacy"][key] == two["privacy"][key], key
    assert "(2 processes)" in two["stdout"]
    # the same recipe, batches and noise (dp_seed): the same model up to summation order
    assert abs(one["metrics"]["accuracy"] - two["metrics"]["accuracy"]) <= 0.1
    assert not math.isnan(two["metrics"]["loss"])


def _descendant_with_rank(root: int, rank: int) -> int | None:
    """The pid of a process under ``root`` whose environment says RANK=<rank> (a torchrun worker)."""
    from pathlib import Path

    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            env = []
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
        todo += children.get(pid, [])
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker through /proc")
@pytest.mark.parametrize("resume_on", [2])  # (a change of world on resume: test_distributed_resume_on_one)
def test_a_killed_rank_stops_the_job_and_resume_keeps_the_epsilon(tmp_path, resume_on):
    import signal
    import time

    out = tmp_path / "run"
    args = ["--model", "tiny", "--synthetic-per-intent", "30", "--epochs", "6", "--batch-size",
            "32", "--lr", "3e-3", "--epsilon", "4", "--checkpoint-every", "3", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "dptrain", "train", *args, "--out", str(out),
                             "--nproc", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (out / "checkpoint" / "state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the end"
        time.sleep(0.01)
    worker = _descendant_with_rank(proc.pid, 1)
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0  # the whole job stopped, not just one rank
    # one line, not every rank's traceback: who died, and how to go on
    assert "Traceback" not in err and err.strip().count("\n") == 0, err[-3000:]
    assert "rank 1 was killed (SIGKILL)" in err and f"--resume --out {out}" in err, err
    assert not (out / "privacy.json").exists()
    stopped = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert stopped >= 3

    resumed = subprocess.run([sys.executable, "-m", "dptrain", "train", "--resume", "--out", str(out),
                              "--quiet", "--nproc", str(resume_on)], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    privacy = json.loads((out / "privacy.json").read_text())
    # the steps before the kill are counted once: the run ends at its planned steps and ε
    assert privacy["steps"] == privacy["planned_steps"]
    assert 0.9 * 4 < privacy["epsilon"] <= 4.0
