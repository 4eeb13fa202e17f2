"""DP-SGD on K processes (GPUs or machines) with PyTorch's own ``torch.distributed``.

One logical step on K ranks releases exactly what one process would (Abadi et al. 2016):

    ĝ = (Σ_{i ∈ B} c_i G_i  +  N(0, σ²S²I)) / (q N)

* **Sampling**: every rank draws the same global Poisson mask (one sampler, its seed drawn by
  rank 0 from the OS and broadcast, or ``dp_seed``) and keeps the examples with
  ``index mod K = rank``. The union over ranks is exactly the Poisson batch B the accountant
  assumes, whatever K is, so a run resumes with another K.
* **Sum**: each rank clips and sums its part; the sums are all-reduced (``SUM``).
* **Noise**: drawn **once per global step, on rank 0 only**, added to rank 0's part before the
  all-reduce; the other ranks add none. (Independent shares on every rank, each of variance
  σ²S²/K, would sum to the same distribution; one draw is simpler to check and to replay.)
* **Scale**: every rank divides by the global q N; the ledgers are identical (same σ, q, steps),
  the updates identical, so the replicas stay equal without broadcasting weights.

Rank 0 writes the run directory and the checkpoints. ``dptrain train --nproc K`` starts K local
processes through ``torch.distributed.run``; ``torchrun --nproc-per-node K -m dptrain train …``
(with ``--nnodes``/``--rdzv-endpoint`` for many machines) does the same by hand. The backend is
NCCL on CUDA and gloo on CPUs.
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Sequence

import numpy as np
import torch

from .errors import ConfigError


class Distributed:
    """This process's place in a group of ``world`` ranks training one model."""

    def __init__(self, rank: int, world: int):
        if not 0 <= rank < world:
            raise ConfigError(f"rank must be in [0, {world}), got {rank}.")
        self.rank, self.world = int(rank), int(world)

    @property
    def main(self) -> bool:
        """Rank 0: draws the noise, writes files, evaluates."""
        return self.rank == 0

    adds_noise = main

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's part of a global logical batch: the indices ≡ rank (mod world)."""
        indices = np.asarray(indices, dtype=np.int64)
        return indices[indices % self.world == self.rank]

    def shared_seed(self, seed: int | None) -> int:
        """``seed``, or a seed rank 0 draws from the OS, the same on every rank."""
        import torch.distributed as dist

        value = [seed if seed is not None else (secrets.randbits(62) if self.main else None)]
        dist.broadcast_object_list(value, src=0)
        return int(value[0])

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """``t ← Σ_ranks t`` for every tensor, in place, as one flat all-reduce."""
        import torch.distributed as dist

        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Non-private training: the average gradient over ranks (what DDP does)."""
        self.sum_(tensors)
        for t in tensors:
            t.div_(self.world)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def current() -> Distributed | None:
    """The process group this process belongs to (``None`` when it trains alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Distributed(dist.get_rank(), dist.get_world_size())


def init_from_env() -> Distributed | None:
    """Join the group ``torchrun`` describes in the environment (WORLD_SIZE > 1); else None."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return current()


_FAILURE_STARTS = re.compile(
    rb"^(\[rank\d+\]:\s*)?(Traceback \(most recent call last\)|E\d{4} |W\d{4} .*signal)",
    re.MULTILINE)


def launch(nproc: int, argv: Sequence[str], *, command: str = "dptrain train",
           resume_hint: str = "continue with --resume", verbose: bool = False) -> int:
    """``dptrain <argv>`` on ``nproc`` local processes (torch.distributed.run, standalone
    rendezvous); returns its exit code. A rank that fails stops the others.

    The ranks' output passes through (progress bar included) until a failure report begins
    (a Python traceback, torchrun's error log); then, instead of the walls of tracebacks every
    rank and the launcher print, one line: a rank's own ``dptrain ...: error:`` line if it
    printed one (exit 2), else which rank died and how (exit 1). ``verbose`` passes all."""
    import subprocess
    import sys

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be an integer >= 1, got {nproc!r}.")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "dptrain", *argv]
    # each rank's threads: the cores shared out (torchrun would set 1, and warn about it)
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
    if verbose:
        return subprocess.run(cmd, env=env).returncode
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    held, failing, own_error = b"", False, f"{command}: error: ".encode()
    said = False  # a rank printed its own one-line error
    sink = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    while chunk := os.read(proc.stderr.fileno(), 65536):
        if failing:
            held += chunk
            continue
        found = _FAILURE_STARTS.search(chunk)
        passed, rest = (chunk, b"") if found is None else (chunk[:found.start()], chunk[found.start():])
        # (a rank's one-line error passes as it is; the report after it is held back)
        said = said or own_error in passed
        if passed and sink is not None:
            sink.write(passed)
            sink.flush()
        elif passed:
            sys.stderr.write(passed.decode("utf-8", "replace"))
        if found is not None:
            failing, held = True, rest
    code = proc.wait()
    if code == 0 or not failing:
        if held:
            sys.stderr.write(held.decode("utf-8", "replace"))
        return code
    text = held.decode("utf-8", "replace")
    if said:
        return 2
    own = re.search(rf"^(?:\[rank\d+\]:\s*)?({re.escape(command)}: error: .*)$", text, re.MULTILINE)
    if own:
        print(own.group(1), file=sys.stderr)
        return 2
    text = text[text.find("Root Cause"):] if "Root Cause" in text else text  # torchrun's verdict
    rank = re.search(r"rank\s*:\s*(\d+)", text)
    signal = re.search(r"Signal (\d+) \((\w+)\)", text)
    exitcode = re.search(r"exitcode\s*:\s*(-?\d+)", text)
    how = (f"was killed ({signal.group(2)})" if signal else
           f"exited with code {exitcode.group(1)}" if exitcode else "failed")
    who = f"rank {rank.group(1)}" if rank else "a rank"
    print(f"{command}: error: {who} {how}, so every rank stopped; {resume_hint} (run with -v "
          "to see the ranks' own reports).", file=sys.stderr)
    return 1
