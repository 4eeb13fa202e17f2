"""Normalization layers that act on each sample alone: ``nn.LayerNorm`` and ``nn.RMSNorm``.

With x̂ the normalized input (LayerNorm: (a − mean)/√(var + eps); RMSNorm: a/√(mean(a²) + eps),
over the normalized dims) and g the output gradient, sample i's gradients are

    G_i(weight) = Σ_t g_{it} ⊙ x̂_{it},        G_i(bias) = Σ_t g_{it},

only as large as the layer's parameters, so they are built directly ([B, d]); norms and clipped
sums follow. (BatchNorm mixes samples and is refused by the engine.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .linear import grad_buffer
from .registry import ClipRule, batch_first, register_rule


def _normalized(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """x̂ by the same kernel as the forward pass, without the affine part."""
    a = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(a, module.normalized_shape, eps=module.eps)
    return F.rms_norm(a, module.normalized_shape, eps=module.eps)


@register_rule(nn.LayerNorm, nn.RMSNorm)
class NormRule(ClipRule):
    def per_sample(self, module, calls, ctx) -> dict[str, torch.Tensor]:
        """Per-sample gradients {param name: [B, *normalized_shape]}, summed over calls."""
        cached = ctx.scratch.get(module)
        if cached is not None:
            return cached
        k = len(module.normalized_shape)
        grads: dict[str, torch.Tensor] = {}
        for call in calls:
            a = batch_first(call.inputs, ctx.batch_size, f"the input of {type(module).__name__}")
            g = batch_first(call.grad, ctx.batch_size, f"the output gradient of {type(module).__name__}")
            g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
            reduce_dims = tuple(range(1, g.dim() - k))  # () for a [B, d] input: nothing to sum

            def over_positions(x: torch.Tensor) -> torch.Tensor:
                return x.sum(dim=reduce_dims) if reduce_dims else x  # sum(dim=()) sums everything

            parts = {}
            if ctx.trains(module, "weight"):
                parts["weight"] = over_positions(g * _normalized(module, a))
            if getattr(module, "bias", None) is not None and ctx.trains(module, "bias"):
                parts["bias"] = over_positions(g)
            for name, value in parts.items():
                grads[name] = value if name not in grads else grads[name] + value
        ctx.scratch[module] = grads
        return grads

    def norm_sq(self, module, calls, ctx):
        grads = self.per_sample(module, calls, ctx)
        return sum(v.reshape(ctx.batch_size, -1).pow(2).sum(dim=1) for v in grads.values())

    def accumulate(self, module, calls, coef, ctx):
        grads = self.per_sample(module, calls, ctx)
        ctx.scratch.pop(module, None)
        for name, per_sample in grads.items():
            param = getattr(module, name)
            summed = torch.tensordot(coef.to(per_sample.dtype), per_sample, dims=1)
            grad_buffer(param).add_(summed.to(param.dtype))
