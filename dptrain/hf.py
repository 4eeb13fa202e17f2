"""DP-SGD inside a Hugging Face ``Trainer`` script: change the import, add :class:`DPArguments`.

::

    from dptrain.hf import DPArguments, DPTrainer

    trainer = DPTrainer(model=model, args=TrainingArguments(...), train_dataset=train,
                        dp_args=DPArguments(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0), ...)
    trainer.train()                          # or train(resume_from_checkpoint=True)
    print(trainer.epsilon())

What changes against the ordinary ``Trainer`` (tested with transformers 5.24; the floor in
``pyproject.toml`` is 5.0):

* **Batches are Poisson-sampled**, as the accountant assumes (each example joins each logical
  step with probability q = L/N). The expected logical batch L is ``DPArguments.
  logical_batch_size`` or, by default, your ``per_device_train_batch_size ×
  gradient_accumulation_steps``; ``per_device_train_batch_size`` becomes the physical batch (a
  logical batch is cut into as many as it needs, so gradient accumulation is derived, not set).
  Training lasts ``max_steps`` steps if set, else round(``num_train_epochs`` / q).
* **Per-sample clipping and noise** through dptrain's engine (:func:`dptrain.make_private`):
  σ is calibrated so that ε after the planned steps is at most ``target_epsilon``. The model is
  not wrapped: its class, state-dict keys, ``save_model`` files and ``from_pretrained`` round
  trip stay those of your model (``peft`` LoRA models included, tested exact).
* **ε is logged** with the other metrics and written, with the privacy ledger, to
  ``privacy.json`` beside every saved model and checkpoint; ``train(resume_from_checkpoint=…)``
  restores the ledger, so a resumed run keeps the ε it spent and stops at the planned total.
* **What would leak is not logged**: the training loss and the gradient norm are functions of
  the private batch that the noise does not cover, so they are dropped from the logs (opt in to
  the loss with ``DPArguments.log_train_loss``, knowing it is outside the guarantee). Evaluation
  metrics are computed on ``eval_dataset``, which DP does not protect either.
* **Options that would break the guarantee are refused** with one line (:class:`~dptrain.errors.
  ConfigError`), never silently changed: DataParallel/DDP/DeepSpeed/FSDP (for K processes use
  ``dptrain train --nproc K`` or :mod:`dptrain.distributed` in your own loop), fp16/bf16 (mixed
  precision couples the examples of a batch, README "Scale"), gradient checkpointing (the engine
  needs each layer's forward once), ``auto_find_batch_size`` (it reruns steps already spent),
  a sequential sampler, NEFTune, ``model_init``, a custom loss (``compute_loss_func`` or a
  ``compute_loss`` override: dptrain cannot check that it is a per-example loss averaged over
  the batch — class weights in a mean, for instance, couple the examples), token counting and an
  iterable dataset (Poisson sampling needs N and random access). Label smoothing is
  per-example for one label per example and is allowed then only.
* ``TrainingArguments.max_grad_norm`` (clipping of the *summed* gradient, default 1.0) is turned
  off with a warning: per-sample clipping at ``DPArguments.max_grad_norm`` replaces it. (It would
  not break the guarantee, projection onto a ball being 1-Lipschitz, but it would shrink a sum of
  ~L clipped gradients to norm 1 while the noise stays σC: the signal would drown.)
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import logging

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from . import rundir
from .errors import ConfigError

log = logging.getLogger(__name__)

PRIVACY_FILE = "privacy.json"


@dataclasses.dataclass
class DPArguments:
    """The privacy settings that sit beside ``TrainingArguments``.

    Args:
        target_epsilon: ε after the planned steps; σ is calibrated for it.
        delta: δ of the guarantee; default min(1e-5, 1/(10 N)); must be < 1/N.
        max_grad_norm: per-sample clipping bound C, or ``"auto"`` (automatic clipping,
            Bu et al. 2023: sensitivity 1, the learning rate absorbs C).
        logical_batch_size: the *expected* examples per noisy step (q = L/N); default
            ``per_device_train_batch_size × gradient_accumulation_steps``.
        accountant: ``"prv"`` (tight, default) or ``"rdp"``.
        dp_seed: seeds sampling and noise (experiments only: a known seed voids the guarantee).
        log_train_loss: also log the training loss (not covered by ε).
        dataset_size: the training set size M declared public: q = L/M, the steps, σ, δ and
            the divisor come from it and not from len(train_dataset). Default: len(train_dataset),
            which ``privacy.json`` then states is treated as public (``dptrain train`` counts it
            privately instead; see README "What a run releases").
    """

    target_epsilon: float = 8.0
    delta: float | None = None
    max_grad_norm: float | str = 1.0
    logical_batch_size: int | None = None
    accountant: str = "prv"
    dp_seed: int | None = None
    log_train_loss: bool = False
    dataset_size: int | None = None


class LogicalBatch(list):
    """One Poisson-sampled logical batch as its physical batches (collated dicts). A list, so the
    Trainer's per-batch bookkeeping (token counts, FLOPs: functions of who was sampled) finds no
    ``input_ids`` in it and records nothing."""


class PoissonBatches:
    """The training "dataloader": the steps of one epoch, each a :class:`LogicalBatch` drawn by
    the run's :class:`~dptrain.sampling.PoissonSampler` (so its state is the checkpointed one)."""

    def __init__(self, trainer: "DPTrainer", dataset, collate, steps_per_epoch: int,
                 physical: int, lengths: np.ndarray | None):
        self.trainer, self.dataset, self.collate = trainer, dataset, collate
        self.steps_per_epoch, self.physical, self.lengths = steps_per_epoch, physical, lengths

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        from .sampling import physical_batches

        sampler = self.trainer.dp.sampler
        for _ in range(self.steps_per_epoch):
            if sampler.step >= sampler.steps:
                return
            indices = next(iter(sampler))
            yield LogicalBatch(
                self.collate([self.dataset[int(i)] for i in chunk])
                for chunk in physical_batches(indices, self.physical, self.lengths))


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD; see the module docstring."""

    def __init__(self, model=None, args: TrainingArguments | None = None, *,
                 dp_args: DPArguments | None = None, train_dataset=None, **kwargs):
        if args is None:
            raise ConfigError("DPTrainer needs TrainingArguments (output_dir at least).")
        if model is None:
            raise ConfigError("DPTrainer needs a model: model_init re-creates the model on "
                              "every train() and is refused.")
        self.dp_args = dp_args if dp_args is not None else DPArguments()
        args = copy.copy(args)  # the caller's object is not changed
        _refuse_unsafe(args, kwargs, type(self), train_dataset)
        rows = len(train_dataset)
        n = self.dp_args.dataset_size if self.dp_args.dataset_size is not None else rows
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"DPArguments.dataset_size must be an integer >= 1, got {n!r}.")
        logical = self.dp_args.logical_batch_size or (
            args.per_device_train_batch_size * args.gradient_accumulation_steps)
        if isinstance(logical, bool) or not isinstance(logical, int) or not 1 <= logical <= min(n, rows):
            raise ConfigError(f"the logical batch size must be an integer in [1, N={min(n, rows)}], "
                              f"got {logical!r}.")
        q = logical / n
        steps = args.max_steps if args.max_steps > 0 else max(1, round(args.num_train_epochs / q))
        args.max_steps = steps
        if args.max_grad_norm:
            # TrainingArguments' own default (1.0) is switched off quietly; a value set on purpose
            # is worth a warning
            report = log.info if args.max_grad_norm == 1.0 else log.warning
            report("TrainingArguments.max_grad_norm=%s (clipping of the summed gradient) is "
                        "off under DPTrainer: per-sample clipping at DPArguments.max_grad_norm=%s "
                        "replaces it.", args.max_grad_norm, self.dp_args.max_grad_norm)
            args.max_grad_norm = 0.0
        args.gradient_accumulation_steps = 1  # one Trainer step = one logical batch
        args.ignore_data_skip = True  # the sampler resumes from its checkpointed state instead
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self._num_examples, self._rows, self._logical = n, rows, logical
        self._steps_per_epoch = max(1, round(1 / q))
        self.create_optimizer()  # attaches DP now, so that a bad budget fails before training

    # ---- DP setup
    def create_optimizer(self, model=None):
        if getattr(self, "dp", None) is not None:
            return self.optimizer
        from .private_training import make_private

        inner = self.optimizer if self.optimizer is not None else super().create_optimizer()
        self._inner_optimizer = inner
        self.dp = make_private(
            self.model, inner, num_examples=self._rows, public_size=self._num_examples,
            batch_size=self._logical,
            steps=self.args.max_steps, target_epsilon=self.dp_args.target_epsilon,
            delta=self.dp_args.delta, max_grad_norm=self.dp_args.max_grad_norm,
            accountant=self.dp_args.accountant, seed=self.dp_args.dp_seed)
        self.optimizer = self.dp.optimizer
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # the schedule drives the wrapped optimizer's learning rate (DPOptimizer is not a
        # torch.optim.Optimizer, which LR schedulers require)
        return super().create_scheduler(num_training_steps, optimizer=self._inner_optimizer)

    def epsilon(self) -> float:
        """ε spent so far at δ = ``self.dp.delta``."""
        return self.dp.epsilon()

    # ---- batches and steps
    def get_train_dataloader(self):
        dataset, collate = self.train_dataset, self.data_collator
        try:
            import datasets

            hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:  # pragma: no cover - datasets is a dependency
            hf_dataset = False
        if hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        lengths = None
        if self.args.train_sampling_strategy == "group_by_length":
            lengths = np.asarray([len(dataset[i]["input_ids"]) for i in range(len(dataset))])
        return PoissonBatches(self, dataset, collate, self._steps_per_epoch,
                              self.args.per_device_train_batch_size, lengths)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One logical batch: forward and backward per physical batch (the engine sums the
        clipped per-sample gradients); the Trainer then calls the DP optimizer's step."""
        model.train()
        total = torch.zeros((), device=self.args.device)
        rows = 0
        for chunk in inputs:
            chunk = self._prepare_inputs(chunk)
            labels = chunk.get("labels")
            if self.args.label_smoothing_factor > 0 and labels is not None and labels.dim() != 1:
                raise ConfigError("label smoothing averages over the labelled tokens of the whole "
                                  "batch, which couples examples; set label_smoothing_factor=0.")
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, chunk)
            loss.backward()
            size = len(next(iter(chunk.values())))
            total += loss.detach() * size
            rows += size
        if not self.dp_args.log_train_loss:
            return torch.zeros((), device=self.args.device)
        return total / max(rows, 1)

    # ---- what is logged and saved
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = dict(logs)
        logs.pop("grad_norm", None)  # the norm of the clipped sum before noise: not private
        if not self.dp_args.log_train_loss:
            logs.pop("loss", None)
            logs.pop("train_loss", None)
        if getattr(self, "dp", None) is not None:
            logs["epsilon"] = self.epsilon() if self.dp.ledger.steps else 0.0
        super().log(logs, start_time)

    def privacy_record(self) -> dict[str, Any]:
        dp = self.dp
        return {
            "epsilon": dp.epsilon() if dp.ledger.steps else 0.0,
            "target_epsilon": self.dp_args.target_epsilon, "delta": dp.delta,
            "noise_multiplier": dp.noise_multiplier, "sample_rate": dp.sample_rate,
            "steps": dp.ledger.steps, "planned_steps": dp.steps,
            "num_examples": self._num_examples, "logical_batch_size": self._logical,
            "semantics": {
                "unit": "one training example", "adjacency": "add/remove one training example",
                "dataset_size": {"value": self._num_examples, "how": (
                    "declared public (DPArguments.dataset_size)" if self.dp_args.dataset_size
                    is not None else "len(train_dataset), treated as public: q, steps, sigma "
                    "and delta depend on it; declare a public DPArguments.dataset_size if the "
                    "size must stay private")}},
            "accountant": self.dp_args.accountant,
            "max_grad_norm": dp.clipper.max_grad_norm if dp.clipper.max_grad_norm != "auto" else "auto",
            "sampler_step": dp.sampler.step,
            "ledger": dp.ledger.state_dict(),
            "seeded": self.dp_args.dp_seed is not None,
            **({"sampler": dp.sampler.state_dict(), "noise": {"generators": [
                g.tolist() for g in dp.optimizer.noise.state_dict()["generators"]]}}
               if self.dp_args.dp_seed is not None else {}),
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and getattr(self, "dp", None) is not None:
            out = Path(output_dir if output_dir is not None else self.args.output_dir)
            rundir.write_json(out / PRIVACY_FILE, self.privacy_record())

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None,
              ignore_keys_for_eval=None, **kwargs):
        if trial is not None:
            raise ConfigError("hyperparameter search trains many models on the private data; "
                              "its privacy cost is not accounted: refused.")
        if resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            path = resume_from_checkpoint
            if path is True:
                path = get_last_checkpoint(self.args.output_dir)
                if path is None:
                    raise ConfigError(f"no checkpoint to resume in {self.args.output_dir}.")
            self._restore_privacy(Path(path))
            resume_from_checkpoint = str(path)
        return super().train(resume_from_checkpoint=resume_from_checkpoint,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _restore_privacy(self, checkpoint: Path) -> None:
        """Ledger (and, for seeded runs, sampler and noise streams) from ``checkpoint``; it must
        be a checkpoint of this very plan."""
        path = checkpoint / PRIVACY_FILE
        if not path.is_file():
            raise ConfigError(f"{checkpoint} has no {PRIVACY_FILE}: it was not written by DPTrainer "
                              "(or only partly); the ε it spent is unknown, so it cannot be resumed.")
        saved = rundir.read_json(path)
        dp = self.dp
        for key, mine in (("noise_multiplier", dp.noise_multiplier), ("sample_rate", dp.sample_rate),
                          ("planned_steps", dp.steps), ("num_examples", self._num_examples)):
            if saved.get(key) != mine:
                raise ConfigError(f"{checkpoint} was trained with {key} = {saved.get(key)}, this "
                                  f"trainer plans {mine}: resume needs the same data and DPArguments.")
        dp.ledger.load_state_dict(saved["ledger"])
        if saved.get("seeded") and self.dp_args.dp_seed is not None:
            dp.sampler.load_state_dict(saved["sampler"])
            dp.optimizer.noise.load_state_dict({"generators": [
                torch.tensor(g, dtype=torch.uint8) for g in saved["noise"]["generators"]]})
        else:
            dp.sampler.step = int(saved["sampler_step"])
        state = rundir.read_json(checkpoint / "trainer_state.json")
        if not dp.ledger.steps == dp.sampler.step == state["global_step"]:
            raise ConfigError(f"{checkpoint} is inconsistent: {dp.ledger.steps} noisy steps in its "
                              f"ledger, {state['global_step']} in its trainer state.")


def _refuse_unsafe(args: TrainingArguments, kwargs: dict, cls: type, train_dataset) -> None:
    def refuse(why: str) -> None:
        raise ConfigError(f"DPTrainer: {why}")

    if train_dataset is None:
        refuse("a train_dataset is needed.")
    if isinstance(train_dataset, torch.utils.data.IterableDataset) or not hasattr(train_dataset, "__len__"):
        refuse("Poisson sampling needs a dataset with a length and random access, not an iterable one.")
    if kwargs.get("model_init") is not None:
        refuse("model_init re-creates the model on every train(); pass the model.")
    if kwargs.get("compute_loss_func") is not None or cls.compute_loss is not Trainer.compute_loss:
        refuse("a custom loss is refused: the engine needs the mean over the batch of per-example "
               "losses and cannot check that a custom one is (put a per-example loss in the model).")
    if args.fp16 or args.bf16:
        refuse("fp16/bf16 training couples the examples of a batch through its shape (README "
               "'Scale'); train in fp32.")
    if args.activation_checkpointing or getattr(args, "gradient_checkpointing", False):
        refuse("gradient checkpointing reruns layers in the backward pass, which per-sample "
               "clipping does not support.")
    if args.auto_find_batch_size:
        refuse("auto_find_batch_size reruns steps after an out-of-memory error, spending them twice.")
    if args.world_size > 1 or args.n_gpu > 1 or args.deepspeed or args.fsdp:
        refuse("one process on one device only; for K processes use 'dptrain train --nproc K' or "
               "dptrain.distributed in your own loop.")
    if args.train_sampling_strategy not in ("random", "group_by_length"):
        refuse(f"train_sampling_strategy={args.train_sampling_strategy!r}: batches are "
               "Poisson-sampled, as the accountant assumes.")
    if args.neftune_noise_alpha is not None:
        refuse("NEFTune is not verified with per-sample clipping.")
    if args.include_num_input_tokens_seen not in (False, "no", None):
        refuse("counting input tokens releases a function of who was sampled.")
    if args.use_liger_kernel or args.torch_compile:
        refuse("fused kernels and torch.compile are not verified with per-sample clipping.")

