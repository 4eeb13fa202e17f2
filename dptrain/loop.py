"""The training loop, as stages with hooks: what every recipe (full fine-tuning, the head on
cached features, K processes, white-box audits; later slot models) runs the same way.

One logical step:

1. **sample** — the Poisson sampler gives this rank's part of the logical batch;
2. **backward** — each physical batch goes forward (``batches.forward``: inputs, device,
   precision) and backward; under DP the clipper sums the clipped per-sample gradients;
3. **release hooks** — ``before_release(grads)`` for each hook, on the summed gradients before
   the optimizer step (non-private runs: white-box canaries, the average over K ranks; private
   runs do theirs inside :class:`~dptrain.optimizer.DPOptimizer`);
4. **step** — the optimizer (DP: noise, scale, account) and the learning-rate schedule;
5. **evaluate** — every ``every`` epochs and at the end: a curve point with the ε spent so far;
6. **checkpoint** — every ``checkpoint_every`` steps (rank 0), with the ledger.

A non-finite loss stops the loop with the privacy spent recorded (:func:`on_divergence`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """Everything one training run works with, decided before anything is written."""

    config: Any  # the TrainConfig with every 'auto' choice made
    out: Path
    data: Any  # IntentData (with any secret canaries)
    enc: dict  # encoded splits
    model: Any
    tokenizer: Any
    batches: Any  # trainer.Batches: model inputs, device, precision
    params: list  # trainable parameters
    optimizer: torch.optim.Optimizer  # the inner optimizer (checkpoints)
    step_optimizer: Any  # what steps: the DPOptimizer, or the optimizer itself
    scheduler: Any
    sampler: Any  # PoissonSampler (this rank's part of each batch)
    dp: Any  # PrivateTraining, or None
    dist: Any  # distributed.Distributed, or None
    device: torch.device
    precision: str
    sample_rate: float
    steps: int
    train_fingerprint: str
    state: dict | None  # the checkpoint resumed from

    @property
    def net(self):
        """What trains: the model, or its head on cached features."""
        return self.batches.net

    @property
    def main(self) -> bool:
        """This process writes files and shows progress (always, unless rank > 0)."""
        return self.dist is None or self.dist.main


class TrainingLoop:
    """Runs the logical steps of a :class:`Run`; see the module docstring for the stages."""

    def __init__(self, run: Run, *, evaluate: Callable, progress_bar=None,
                 on_step: Callable[[int], None] | None = None,
                 on_divergence: Callable[[int, float], None] | None = None,
                 started: float | None = None):
        self.run = run
        self.evaluate = evaluate  # evaluate(net, batches, split) -> {"loss", "accuracy", ...}
        self.bar = progress_bar
        self.on_step = on_step
        self.on_divergence = on_divergence
        self.started = time.monotonic() if started is None else started
        self.before_release: list[Callable[[list[torch.Tensor]], None]] = []
        self.done, self.curves = 0, []
        self.stopped_early = False
        self._loss_sum, self._loss_n = 0.0, 0

    # ---------------------------------------------------------------- stages
    def backward(self, indices) -> None:
        """Forward and backward over the physical batches of this rank's part of the batch."""
        from .sampling import physical_batches

        run = self.run
        # Cached features are small: the head takes a whole logical batch at once (the physical
        # batch size only bounds memory and never changes the result).
        physical = (run.config.physical_batch_size if run.batches.features is None
                    else max(run.config.physical_batch_size, 4096))
        for chunk in physical_batches(indices, physical, run.enc["train"].lengths):
            outputs = run.batches.forward("train", chunk)
            loss = float(outputs.loss.detach())
            if not math.isfinite(loss):
                if self.on_divergence is not None:
                    self.on_divergence(self.done, loss)
                raise FloatingPointError(f"non-finite loss {loss}")
            outputs.loss.backward()
            self._loss_sum += loss * len(chunk)
            self._loss_n += len(chunk)

    def release(self) -> None:
        """Hooks on the summed gradients, then the optimizer step and the schedule."""
        if self.before_release:
            for p in self.run.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in self.run.params]
            for hook in self.before_release:
                hook(grads)
        self.run.step_optimizer.step()
        self.run.step_optimizer.zero_grad()
        self.run.scheduler.step()
        self.done += 1

    def evaluate_if_due(self) -> None:
        """A curve point every ``every`` epochs and at the last step (ε exactly as spent)."""
        run, done = self.run, self.done
        every = max(1, math.ceil(run.config.epochs / 10))  # at most ~10 points: each computes ε
        # An epoch is 1/q steps in expectation: it ends when done·q crosses a whole number.
        end_of_epoch = (math.floor(done * run.sample_rate / every + 1e-9)
                        > math.floor((done - 1) * run.sample_rate / every + 1e-9))
        if not (end_of_epoch or done == run.steps) or not run.main:
            return  # (ranks > 0 hold the same model: rank 0 alone evaluates)
        val = self.evaluate(run.net, run.batches, "validation")
        self.curves.append({
            "step": done, "epoch": done * run.sample_rate,
            "train_loss": self._loss_sum / max(self._loss_n, 1),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "epsilon": run.dp.epsilon() if run.dp is not None else float("inf"),
        })
        self._loss_sum, self._loss_n = 0.0, 0
        from .trainer import stalled

        if stalled(self.curves, run.config.early_stopping):
            log.warning("early stopping after step %d: the validation loss has not improved "
                        "for %d evaluations", done, run.config.early_stopping)
            self.stopped_early = True

    def checkpoint_if_due(self) -> None:
        run = self.run
        every = run.config.checkpoint_every or max(1, round(1 / run.sample_rate))  # once per epoch
        if not (run.main and self.done < run.steps and self.done % every == 0):
            return
        from . import rundir
        from .checkpoint import save_checkpoint

        earlier = float(run.state.get("seconds", 0.0)) if run.state else 0.0
        save_checkpoint(run.out / rundir.CHECKPOINT, model=run.model, optimizer=run.optimizer,
                        scheduler=run.scheduler, dp=run.dp, sampler=run.sampler, step=self.done,
                        curves=self.curves, fingerprint=run.train_fingerprint,
                        seeded=run.config.dp_seed is not None,
                        seconds=time.monotonic() - self.started + earlier)

    # ---------------------------------------------------------------- the loop
    def resume_from(self, state: dict) -> None:
        from .checkpoint import restore

        run = self.run
        self.done, self.curves = restore(state, model=run.model, optimizer=run.optimizer,
                                         scheduler=run.scheduler, dp=run.dp, sampler=run.sampler,
                                         seeded=run.config.dp_seed is not None)

    def __call__(self) -> None:
        run = self.run
        run.step_optimizer.zero_grad()
        run.net.train()
        for indices in run.sampler:
            self.backward(indices)
            self.release()
            self.evaluate_if_due()
            self._show_progress()
            self.checkpoint_if_due()
            if self.on_step is not None:
                self.on_step(self.done)
            if self.stopped_early:
                break
        if self.bar is not None:
            self.bar.close()

    def _show_progress(self) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        curves = self.curves
        # (a private run's training loss is not covered by ε: logs show the validation's)
        key = "val_loss" if self.run.dp is not None else "train_loss"
        post = {key: f"{curves[-1][key]:.3f}" if curves else "…"}
        if curves:
            post["val_acc"] = f"{curves[-1]['val_accuracy']:.3f}"
        if self.run.dp is not None and curves:  # spent at the last evaluation, of the target
            post["ε"] = f"{curves[-1]['epsilon']:.2f} of {self.run.config.epsilon:g}"
        self.bar.set_postfix(post, refresh=False)
