"""Linear layers: ``nn.Linear`` (y = a Wᵀ + b) and HF's ``Conv1D`` (y = a W + b, W transposed).

For input activations a ∈ R^{B×T×d} and output gradients g ∈ R^{B×T×p}, sample i's weight
gradient is G_i = Σ_t g_{it} a_{it}ᵀ (p×d). Its squared norm without building G_i (ghost norm;
Goodfellow 2015, Li et al. 2022 "Large language models can be strong differentially private
learners"):

    ||G_i||² = Σ_{t,s} (a_{it}·a_{is}) (g_{it}·g_{is})          cost O(T²(d+p))

or by building G_i (cost O(T·p·d)). The cheaper one is chosen per layer, ghost when 2T² ≤ p·d
(mixed ghost norm, Bu et al. 2022 "Scalable and efficient training of large convolutional neural
networks with differential privacy"). The bias gradient is Σ_t g_{it}.

The clipped sum Σ_i c_i G_i = (c ⊙ g)ᵀ a is one matrix product, the cost of the ordinary weight
gradient that autograd was told not to compute (book-keeping, Bu et al. 2023).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import Call, ClipRule, FlushContext, batch_first, register_rule


def _as_btd(x: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """[B, ..., d] → [B, T, d] (T = 1 for 2-D inputs), expanding a broadcast batch of 1."""
    x = batch_first(x, batch_size, what)
    if x.dim() == 1:
        raise ValueError(f"{what} must have a batch axis, got shape {tuple(x.shape)}.")
    return x.reshape(x.shape[0], -1, x.shape[-1])


def sources(calls: list[Call]) -> tuple[torch.Tensor, ...]:
    """The captured inputs the activations of :func:`stacked` are built from (the cache key)."""
    return tuple(c.inputs for c in calls)


def stacked(calls: list[Call], batch_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations and output grads of all calls, concatenated along the sequence axis.

    A sample's gradient over several calls is the sum over calls of Σ_t g aᵀ, which is the same
    sum over the concatenated sequence: ghost norms and clipped sums then need no special case.
    The activations are a function of :func:`sources` alone, which is what caches key on.
    """
    acts = [_as_btd(c.inputs, batch_size, f"the input of {name}") for c in calls]
    grads = [_as_btd(c.grad, batch_size, f"the output gradient of {name}") for c in calls]
    if len(calls) == 1:
        return acts[0], grads[0]
    return torch.cat(acts, dim=1), torch.cat(grads, dim=1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def use_ghost(seq_len: int, d_in: int, d_out: int, method: str) -> bool:
    """Ghost norm iff 2T² ≤ p·d (Bu et al. 2022), unless the method is forced."""
    if method == "ghost":
        return True
    if method == "instantiate":
        return False
    return 2 * seq_len * seq_len <= d_in * d_out


def grad_buffer(p: nn.Parameter) -> torch.Tensor:
    """``p.grad``, created as zeros on first use: the clipped sums accumulate into it."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def weight_norm_sq(
    a: torch.Tensor, g: torch.Tensor, ctx: FlushContext, keys: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Per-sample ||Σ_t g_t a_tᵀ||² for a [B, T, d], g [B, T, p], ghost or instantiated.

    ``keys``: the captured tensors ``a`` was built from, under which its Gram matrix is cached.
    """
    g = _upcast(g)
    if use_ghost(a.shape[1], a.shape[2], g.shape[2], ctx.norm_method):
        batch = a.shape[0]
        gram_g = torch.bmm(g, g.transpose(1, 2))
        # Σ_{t,s} (a aᵀ)_{ts} (g gᵀ)_{ts} as one batched dot product: no [B, T, T] temporary
        return torch.bmm(ctx.gram(keys, a).reshape(batch, 1, -1), gram_g.reshape(batch, -1, 1)).reshape(batch)
    per_sample = torch.bmm(g.transpose(1, 2), _upcast(a))  # [B, p, d]
    return per_sample.pow(2).sum(dim=(1, 2))


def bias_norm_sq(g: torch.Tensor) -> torch.Tensor:
    return _upcast(g).sum(dim=1).pow(2).sum(dim=1)


@register_rule(nn.Linear)
class LinearRule(ClipRule):
    transposed = False  # nn.Linear stores W as [out, in]

    def norm_sq(self, module, calls, ctx):
        a, g = stacked(calls, ctx.batch_size, type(module).__name__)
        parts = []
        if ctx.trains(module, "weight"):
            parts.append(weight_norm_sq(a, g, ctx, sources(calls)))
        if module.bias is not None and ctx.trains(module, "bias"):
            parts.append(bias_norm_sq(g))
        return sum(parts)

    def accumulate(self, module, calls, coef, ctx):
        a, g = stacked(calls, ctx.batch_size, type(module).__name__)
        if ctx.trains(module, "weight"):
            # Σ_i c_i g_iᵀ a_i: scale whichever side is narrower, then one matrix product.
            # (an attention block's q, k and v projections share one scaled input)
            if a.shape[-1] <= g.shape[-1]:
                a, g_w = ctx.scaled(sources(calls), a, coef), g
            else:  # in at least fp32, like the norms (see dptrain.device)
                g_w = _upcast(g) * coef.to(_upcast(g).dtype).view(-1, 1, 1)
            flat_g = g_w.reshape(-1, g_w.shape[-1])
            flat_a = a.reshape(-1, a.shape[-1])
            lhs, rhs = (flat_a.t(), flat_g) if self.transposed else (flat_g.t(), flat_a)
            add_grad(module.weight, lhs, rhs)
        if module.bias is not None and ctx.trains(module, "bias"):
            summed = torch.mv(_upcast(g).sum(dim=1).t(), coef.to(_upcast(g).dtype))
            if module.bias.grad is None:
                module.bias.grad = summed.to(module.bias.dtype)
            else:
                module.bias.grad.add_(summed.to(module.bias.dtype))


def add_grad(param: nn.Parameter, lhs: torch.Tensor, rhs: torch.Tensor) -> None:
    """``param.grad += lhs @ rhs``, writing the product directly when there is no grad yet."""
    lhs, rhs = lhs.to(param.dtype), rhs.to(param.dtype)
    if param.grad is None:
        param.grad = torch.mm(lhs, rhs)
    else:
        param.grad.addmm_(lhs, rhs)


try:  # HF's GPT-2-style Conv1D: a linear layer whose weight is stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

if Conv1D is not None:

    @register_rule(Conv1D)
    class Conv1DRule(LinearRule):
        transposed = True
