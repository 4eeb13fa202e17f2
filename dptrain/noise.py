"""Gaussian noise for the summed clipped gradient, drawn in parallel.

DP-SGD adds z ~ N(0, σ²C²·I) to Σ_i c_i G_i once per logical batch (Abadi et al. 2016). On a CPU
``Tensor.normal_`` fills on one thread (a few ns per value: ~0.1 s for a 22.7M-parameter model),
so the gradients are cut into fixed chunks, chunk c is filled from generator c mod ``STREAMS``,
and ``workers`` threads fill the streams in parallel. The streams, not the threads, fix the
values: a seeded run gives the same noise on any number of threads (and resumes on another
machine). By default the seeds come from the operating system (``secrets``), so the noise is not
predictable from anything in the run directory.

Limits: PyTorch's generators are not cryptographically secure and floating-point Gaussian
sampling is not exact (Mironov 2012); like Opacus without ``secure_mode``, this guards against
the attacks that learn from models, not against an adversary who can observe the generator.
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

CHUNK = 1 << 20  # values per chunk: large enough to amortize dispatch, small enough to balance
STREAMS = 8  # independent generators; threads share them out, so the thread count changes nothing


def _add_serial(out: torch.Tensor, other: torch.Tensor) -> None:
    """``out += other`` on the calling thread only.

    torch's ``add_`` would start an OpenMP team from this worker thread; a second team beside the
    main thread's leaves the main team's threads asleep for the rest of the step (measured: the
    next forward pass ran on 1.6 of 2 cores). numpy adds without OpenMP, releasing the GIL.
    """
    if out.dtype in (torch.float32, torch.float64):
        a = out.numpy()
        np.add(a, other.numpy(), out=a)
    else:
        out.add_(other)


class GaussianNoise:
    """Adds N(0, std²) to every element of a list of tensors, in place, with parallel generators."""

    def __init__(self, seed: int | None = None, workers: int | None = None):
        self.workers = min(STREAMS, max(1, workers if workers is not None else torch.get_num_threads()))
        base = secrets.randbits(62) if seed is None else int(seed)
        self._base = base
        self._generators = [torch.Generator().manual_seed(base + 7919 * k) for k in range(STREAMS)]
        self._accelerator_generators: dict[torch.device, torch.Generator] = {}
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        self._buffers: list[torch.Tensor | None] = [None] * self.workers

    def add_(self, tensors: Sequence[torch.Tensor], std: float) -> None:
        """``t += N(0, std²)`` elementwise for each tensor (each must be contiguous)."""
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}.")
        if std == 0:
            return
        on_cpu = [t for t in tensors if t.device.type == "cpu"]
        on_device = [t for t in tensors if t.device.type != "cpu"]
        if on_device:  # accelerators fill fast on their own: one generator per device, reseeded
            # at every draw from CPU stream 0, whose state the checkpoints keep, so a resumed
            # seeded run continues the sequence instead of repeating it
            for device in dict.fromkeys(t.device for t in on_device):  # a fresh seed per device
                seed = int(torch.randint(0, 2**62, (1,), generator=self._generators[0]))
                self._device_generator(device).manual_seed(seed)
            for t in on_device:
                t.add_(torch.randn(t.shape, dtype=t.dtype, device=t.device,
                                   generator=self._device_generator(t.device)), alpha=std)
        chunks = [c for t in on_cpu for c in t.view(-1).split(CHUNK)]

        def fill(worker: int) -> None:
            for stream in range(worker, STREAMS, self.workers):
                gen = self._generators[stream]
                for chunk in chunks[stream::STREAMS]:
                    buf = self._buffer(worker, chunk)
                    buf.normal_(0.0, std, generator=gen)  # serial kernel: no OpenMP
                    _add_serial(chunk, buf)

        if self._pool is None:
            fill(0)
        else:
            list(self._pool.map(fill, range(self.workers)))

    def _device_generator(self, device: torch.device) -> torch.Generator:
        gen = self._accelerator_generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._accelerator_generators[device] = gen
        return gen

    def _buffer(self, worker: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers[worker]
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(CHUNK, dtype=like.dtype, device=like.device)
            self._buffers[worker] = buf
        return buf[: like.numel()]

    def state_dict(self) -> dict:
        return {"generators": [g.get_state() for g in self._generators]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("generators")
        if not isinstance(states, list) or len(states) != STREAMS:
            raise ValueError(
                f"noise state must hold {STREAMS} generator states, got "
                f"{len(states) if isinstance(states, list) else type(states).__name__}."
            )
        for gen, s in zip(self._generators, states):
            gen.set_state(s)
