"""Fallback for any other layer with trainable parameters: per-sample gradients by ``torch.func``.

For a module f(θ; a) called on inputs a with output gradient g, sample i's gradient is the
vector-Jacobian product ∂⟨f(θ; a_i), g_i⟩/∂θ, computed for all samples at once with
``vmap(grad(...))`` over the captured inputs (the approach of Opacus' functorch fallback).
It re-runs the module's forward once per flush, so it costs more than a registered rule and
keeps [B, *θ.shape] per-sample gradients; register a rule for layers that matter.

The forward must be deterministic (no dropout inside the module): ``vmap`` runs with
``randomness="error"``, so a random op fails loudly instead of giving wrong gradients. Only the
module's own parameters are differentiated; its children have their own rules.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ModelError
from .linear import grad_buffer
from .registry import ClipRule


class FunctorchRule(ClipRule):
    """Used for every module that owns trainable parameters and has no registered rule."""

    eager_norm = False  # torch.func transforms run after the backward pass, not inside it

    def capture(self, module, args, kwargs):
        flat, spec = tree_flatten((args, kwargs))
        flat = [v.detach() if isinstance(v, torch.Tensor) else v for v in flat]
        return flat, spec

    def _per_sample_one(self, module, call, ctx) -> dict[str, torch.Tensor]:
        flat, spec = call.inputs
        name = type(module).__name__
        batch = ctx.batch_size
        positions, tensors, dims = [], [], []
        for pos, value in enumerate(flat):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape[0] == batch:
                    dims.append(0)
                elif value.shape[0] == 1:
                    dims.append(None)
                else:
                    raise ModelError(
                        f"an input of {name} has leading dimension {value.shape[0]} but the batch "
                        f"has {batch} samples; per-sample clipping needs the batch on axis 0."
                    )
                positions.append(pos)
                tensors.append(value)
        if not isinstance(call.grad, torch.Tensor) or call.grad.shape[0] != batch:
            raise ModelError(f"{name} must return one tensor with the batch on axis 0.")
        trainable = {
            n: p.detach() for n, p in module.named_parameters(recurse=False) if ctx.trains(module, n)
        }

        def inner(params, sample_tensors, sample_grad):
            values = list(flat)
            for pos, tensor, dim in zip(positions, sample_tensors, dims):
                values[pos] = tensor.unsqueeze(0) if dim == 0 else tensor
            args, kwargs = tree_unflatten(values, spec)
            out = functional_call(module, params, args, kwargs)
            return (out * sample_grad.unsqueeze(0)).sum()

        try:
            per_sample = vmap(grad(inner), in_dims=(None, tuple(dims), 0), randomness="error")(
                trainable, tuple(tensors), call.grad
            )
        except RuntimeError as exc:
            if "randomness" in str(exc):
                raise ModelError(
                    f"{name} uses random operations (e.g. dropout) inside its forward; the torch.func "
                    "fallback needs a deterministic layer: register a clipping rule for it."
                ) from exc
            raise
        _check_sums_to_batch_gradient(module, call, trainable, per_sample, name)
        return per_sample

    def per_sample(self, module, calls, ctx) -> dict[str, torch.Tensor]:
        cached = ctx.scratch.get(module)
        if cached is None:
            cached = {}
            for call in calls:
                for n, value in self._per_sample_one(module, call, ctx).items():
                    cached[n] = value if n not in cached else cached[n] + value
            ctx.scratch[module] = cached
        return cached

    def norm_sq(self, module, calls, ctx):
        grads = self.per_sample(module, calls, ctx)
        return sum(v.reshape(ctx.batch_size, -1).pow(2).sum(dim=1) for v in grads.values())

    def accumulate(self, module, calls, coef, ctx):
        grads = self.per_sample(module, calls, ctx)
        ctx.scratch.pop(module, None)
        for n, per_sample in grads.items():
            param = getattr(module, n)
            if per_sample.dtype in (torch.float16, torch.bfloat16):
                per_sample = per_sample.float()  # the sum in at least fp32, like the norms
            summed = torch.tensordot(coef.to(per_sample.dtype), per_sample, dims=1)
            grad_buffer(param).add_(summed.to(param.dtype))


def _check_sums_to_batch_gradient(module, call, trainable, per_sample, name) -> None:
    """Σ_i G_i must be the whole batch's gradient. An input that is not per-sample but whose
    leading size happens to equal the batch (a [T, T] mask with T == B) would be split across
    samples by ``vmap``, and the per-sample gradients would no longer add up: refuse that."""
    flat, spec = call.inputs

    def whole(params):
        args, kwargs = tree_unflatten(list(flat), spec)
        return (functional_call(module, params, args, kwargs) * call.grad).sum()

    expected = grad(whole)(trainable)
    for n, g in expected.items():
        summed = per_sample[n].sum(dim=0)
        low = g.dtype in (torch.float16, torch.bfloat16)
        tol = (1e-2 if low else 1e-4) * max(float(g.abs().max()), float(summed.abs().max()), 1e-12)
        if not bool(((summed - g).abs() <= tol).all()):
            raise ModelError(
                f"the per-sample gradients of {name}.{n} do not add up to its batch gradient: an "
                "input of the layer that is not per-sample has the batch size as its leading "
                "dimension, so the batch axis is ambiguous; register a clipping rule for the layer "
                "or choose a physical batch size that differs from that dimension."
            )


FALLBACK = FunctorchRule()


def refusal(module: nn.Module) -> str | None:
    """Why a module breaks per-sample independence, or None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            f"{type(module).__name__} mixes samples through batch statistics, which breaks "
            "per-sample clipping; replace it with GroupNorm or LayerNorm"
        )
    return None
