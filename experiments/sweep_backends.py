"""Where a sweep's jobs run: in this process, in a local process pool, or on a Ray cluster.

A job is a small picklable description (:class:`experiments.sweep.Job`); running it reads and
writes only files under the sweep directory, and running it again after it finished does
nothing. So any executor that runs every job of a stage once — in any order, anywhere the sweep
directory is visible — gives the same results:

- ``local`` with ``workers = 1`` (default): one job after the other, in this process, with
  PyTorch's own thread count. On a small machine this is the fastest: one training run already
  keeps every core busy.
- ``local`` with ``workers = N > 1``: a process pool (``spawn``), each worker with
  ``cores // N`` PyTorch threads.
- ``ray``: one Ray task per job, each asking for ``threads_per_job`` CPUs and running with that
  many PyTorch threads. ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` (or
  ``--ray-address``) and starts a local one otherwise. Every node must see the sweep directory
  at the same path (a shared filesystem) and have dptrain installed (``pip install dptrain[ray]``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

from dptrain.errors import ConfigError

BACKENDS = ("local", "ray")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def check(backend: str, workers: int, threads_per_job: int | None) -> None:
    """Refuse (ConfigError, one line) options no executor can follow, before anything runs."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be an integer >= 1, got {workers!r}.")
    if threads_per_job is not None and (isinstance(threads_per_job, bool)
                                        or not isinstance(threads_per_job, int) or threads_per_job < 1):
        raise ConfigError(f"--threads-per-job must be an integer >= 1, got {threads_per_job!r}.")
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("--backend ray needs Ray: pip install 'dptrain[ray]'.")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _call(fn: Callable[[Any], Any], job: Any, threads: int | None) -> Any:
    _set_threads(threads)
    return fn(job)


class Executor:
    """Runs ``fn(job)`` for every job of a stage and reports each as it finishes."""

    def __init__(self, backend: str = "local", workers: int = 1, threads_per_job: int | None = None,
                 ray_address: str | None = None):
        check(backend, workers, threads_per_job)
        self.backend, self.workers, self.ray_address = backend, workers, ray_address
        if backend == "ray":
            self.threads = threads_per_job or 1
        elif workers > 1:
            self.threads = threads_per_job or max(1, cores() // workers)
        else:
            self.threads = threads_per_job  # None: PyTorch's own choice
        self._pool = None
        self._ray = None
        self._started_ray = False

    def describe(self) -> str:
        if self.backend == "ray":
            return f"Ray ({self.threads} CPU{'s' if self.threads > 1 else ''} per job)"
        if self.workers == 1:
            return "this process"
        return f"a local pool of {self.workers} processes ({self.threads} threads each)"

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any],
            done: Callable[[Any, Any], None] | None = None) -> list[Any]:
        """Results in job order; ``done(job, result)`` as each finishes. The first failure is
        raised (after the jobs already running finish: they leave consistent files either way)."""
        jobs = list(jobs)
        if not jobs:
            return []
        if self.backend == "ray":
            return self._map_ray(fn, jobs, done)
        if self.workers == 1:
            results = []
            for job in jobs:
                results.append(_call(fn, job, self.threads))
                if done is not None:
                    done(job, results[-1])
            return results
        return self._map_pool(fn, jobs, done)

    def _map_pool(self, fn, jobs, done) -> list[Any]:
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
        import multiprocessing

        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
        futures = {self._pool.submit(_call, fn, job, self.threads): i for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                i = futures[future]
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    wait(pending)
                    raise future.exception()
                results[i] = future.result()
                if done is not None:
                    done(jobs[i], results[i])
        return results

    def _map_ray(self, fn, jobs, done) -> list[Any]:
        import ray

        if self._ray is None:
            if not ray.is_initialized():
                self._started_ray = True
                ray.init(address=self.ray_address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            self._ray = ray.remote(num_cpus=self.threads, max_retries=0)(_call)
        refs = {self._ray.remote(fn, job, self.threads): i for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        pending = list(refs)
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            for ref in finished:
                i = refs[ref]
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    for other in pending:
                        ray.cancel(other)
                    cause = exc.as_instanceof_cause()
                    raise (cause.cause if getattr(cause, "cause", None) is not None else cause) from None
                if done is not None:
                    done(jobs[i], results[i])
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._started_ray:
            import ray

            ray.shutdown()  # leaves a cluster we joined running; stops the one we started
            self._started_ray, self._ray = False, None

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Iterable[Any]) -> None:
        self.close()
