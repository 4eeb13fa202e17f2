"""Replay check: does the engine bound each example's influence on *this* model? (``dptrain check``)

DP-SGD's guarantee rests on one property of the pre-noise sum S(D) = Σ_i clip(G_i): removing any
one example moves it by at most the sensitivity C (1 under automatic clipping). A per-sample
clipping bug — a layer whose rule gets the batch axis wrong, a module that mixes samples, a
parameter the hooks miss — breaks exactly that, silently. Following the grey-box replay idea
(Cebere et al. 2026), the check runs the engine on a batch D and on every neighbour D∖{i} with
everything else identical (same weights, eval mode so that no dropout mask depends on the
batch), and measures, for each i:

* the **shift** ‖S(D) − S(D∖{i})‖, which must be ≤ C;
* the **additivity** error ‖S(D) − S(D∖{i}) − S({i})‖: example i's contribution must not depend
  on who else is in the batch;
* the **reference** error ‖S({i}) − clip(g_i)‖ against a plain per-example backward pass with
  the engine detached (g_i: the ordinary gradient of example i's loss alone).

All three relative to C. A user runs it on their own model class (``dptrain check --model DIR``)
before any private data is involved: the batch is built from the built-in synthetic intents.
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import ConfigError

TOLERANCE = 1e-4
"""Largest accepted relative error: float32 round-off on real models is ~1e-6."""


@dataclasses.dataclass
class CheckResult:
    """What :func:`replay_check` measured; ``passed`` iff every figure is within tolerance."""

    sensitivity: float
    examples: int
    parameters: int
    max_shift: float  # max_i ‖S(D) − S(D∖{i})‖ / C
    max_additivity_error: float  # max_i ‖S(D) − S(D∖{i}) − S({i})‖ / C
    max_reference_error: float  # max_i ‖S({i}) − clip(g_i)‖ / C
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return (self.max_shift <= 1.0 + self.tolerance and self.max_additivity_error <= self.tolerance
                and self.max_reference_error <= self.tolerance)

    def lines(self) -> list[str]:
        verdict = "PASS" if self.passed else "FAIL"
        return [
            f"{verdict}: {self.examples} neighbouring batches, {self.parameters} trainable "
            f"parameters, sensitivity {self.sensitivity:g}",
            f"  largest shift of the pre-noise sum from removing one example: "
            f"{self.max_shift:.6f} x sensitivity (must be <= 1)",
            f"  largest dependence of an example's contribution on the others: "
            f"{self.max_additivity_error:.2e} x sensitivity (must be <= {self.tolerance:g})",
            f"  largest error against a per-example backward pass: "
            f"{self.max_reference_error:.2e} x sensitivity (must be <= {self.tolerance:g})",
        ]


def _rows(batch: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    index = torch.tensor(keep, dtype=torch.long)
    return {k: v[index] for k, v in batch.items()}


def _flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                      for p in params])


def replay_check(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                 max_grad_norm: float | str = 1.0, tolerance: float = TOLERANCE) -> CheckResult:
    """Run the engine on ``batch`` and on each of its one-example-removed neighbours.

    ``model(**batch).loss`` must be the mean loss over the batch (HF convention), with the batch
    on axis 0 of every tensor of ``batch``. The model is put in eval mode and left attached to
    nothing afterwards.
    """
    from .engine import AUTO_CLIP_GAMMA, PerSampleClipper

    size = len(next(iter(batch.values())))
    if size < 2:
        raise ConfigError(f"the check needs a batch of at least 2 examples, got {size}.")
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter to check.")
    try:
        # the reference first, with no engine attached: plain autograd, one example at a time
        reference = []
        for i in range(size):
            model.zero_grad(set_to_none=True)
            model(**_rows(batch, [i])).loss.backward()
            g = _flat(params)
            c = 1.0 / (float(g.norm()) + AUTO_CLIP_GAMMA) if max_grad_norm == "auto" else \
                min(1.0, float(max_grad_norm) / (float(g.norm()) + 1e-6))
            reference.append(g * c)
        clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm, loss_reduction="mean")
        try:
            def clipped_sum(keep: list[int]) -> torch.Tensor:
                model.zero_grad(set_to_none=True)
                model(**_rows(batch, keep)).loss.backward()
                clipper.flush()
                return _flat(params)  # the clipped sum Σ_i clip(G_i) (the optimizer divides later)

            whole = clipped_sum(list(range(size)))
            shift = additivity = error = 0.0
            for i in range(size):
                without = clipped_sum([j for j in range(size) if j != i])
                alone = clipped_sum([i])
                shift = max(shift, float((whole - without).norm()))
                additivity = max(additivity, float((whole - without - alone).norm()))
                error = max(error, float((alone - reference[i]).norm()))
        finally:
            clipper.detach()
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    c = clipper.sensitivity
    return CheckResult(sensitivity=c, examples=size, parameters=sum(p.numel() for p in params),
                       max_shift=shift / c, max_additivity_error=additivity / c,
                       max_reference_error=error / c, tolerance=tolerance)


def check_model(model_name: str, *, trainable: str = "all", pooling: str = "auto",
                max_grad_norm: float | str = 1.0, batch_size: int = 8, max_length: int = 32,
                seed: int = 0) -> CheckResult:
    """:func:`replay_check` on a model as ``dptrain train`` would load it, with a batch of the
    built-in synthetic intents (no private data involved)."""
    from .data import collate, encode, load_intent_data
    from .models import load_model, set_trainable

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ConfigError(f"batch_size must be an integer >= 2, got {batch_size!r}.")
    data = load_intent_data("synthetic", seed=seed, synthetic_per_intent=4)
    model, tokenizer = load_model(model_name, data.num_labels, data.label_names, pooling)
    torch.manual_seed(seed)
    if trainable == "lora":
        from .models import apply_lora

        apply_lora(model)
        with torch.no_grad():  # B = 0 at initialization would make A's gradient vanish: check both
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0.0, 0.02)
    set_trainable(model, trainable)
    enc = encode(tokenizer, data.train, max_length)
    picks = torch.randperm(len(data.train))[:batch_size].tolist()
    batch = collate(enc, picks, tokenizer.pad_token_id)  # padded to the longest: padding is checked too
    return replay_check(model, dict(batch), max_grad_norm=max_grad_norm)
