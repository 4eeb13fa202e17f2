"""Embedding tables (``nn.Embedding``).

Sample i with ids x_{i1..iT} and output gradients g_{it} ∈ R^d has the gradient
G_i[v] = Σ_{t: x_{it} = v} g_{it}, non-zero only in the rows it used, so

    ||G_i||² = Σ_v ||Σ_{t: x_{it}=v} g_{it}||²  =  Σ_{t,s} [x_{it} = x_{is}] g_{it}·g_{is}.

The right-hand form is the ghost norm (O(T²d) per sample); we use the left-hand one, summing the
gradients of equal (sample, id) pairs with one sort and one ``index_add`` — O(T·d) per sample and
exact. Positions holding ``padding_idx`` get no gradient, as in ``torch.nn.functional.embedding``.
The clipped sum is one ``index_add`` of c_i g_{it} into the rows x_{it}.

HF encoders pass ``position_ids``/``token_type_ids`` as a [1, T] buffer broadcast over the batch;
those are expanded so that every sample sees the same ids.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import grad_buffer
from .registry import Call, ClipRule, FlushContext, batch_first, register_rule


def _ids_and_grads(
    module: nn.Embedding, calls: list[Call], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample index, id, grad) of every non-padding position of every call, flattened."""
    samples, ids, grads = [], [], []
    for call in calls:
        x = batch_first(call.inputs, batch_size, "the ids of Embedding")
        g = batch_first(call.grad, batch_size, "the output gradient of Embedding")
        x = x.reshape(batch_size, -1)
        g = g.reshape(batch_size, -1, g.shape[-1])
        sample = torch.arange(batch_size, device=x.device).unsqueeze(1).expand_as(x)
        samples.append(sample.reshape(-1))
        ids.append(x.reshape(-1))
        grads.append(g.reshape(-1, g.shape[-1]))
    sample, ident, grad = torch.cat(samples), torch.cat(ids), torch.cat(grads)
    if module.padding_idx is not None:
        keep = ident != module.padding_idx
        sample, ident, grad = sample[keep], ident[keep], grad[keep]
    return sample, ident, grad


@register_rule(nn.Embedding)
class EmbeddingRule(ClipRule):
    def check(self, module):
        if module.max_norm is not None:
            return "Embedding(max_norm=...) renormalizes its weights during the forward pass"
        if module.scale_grad_by_freq:
            return "Embedding(scale_grad_by_freq=True) couples samples through batch frequencies"
        if module.sparse:
            return "Embedding(sparse=True) produces sparse gradients; use sparse=False"
        return None

    def norm_sq(self, module, calls, ctx):
        sample, ident, grad = _ids_and_grads(module, calls, ctx.batch_size)
        ctx.scratch[module] = (sample, ident, grad)
        grad = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        key = sample * module.num_embeddings + ident
        unique_keys, inverse = torch.unique(key, return_inverse=True)
        summed = grad.new_zeros(len(unique_keys), grad.shape[1]).index_add_(0, inverse, grad)
        per_pair = summed.pow(2).sum(dim=1)
        out = per_pair.new_zeros(ctx.batch_size)
        return out.index_add_(0, unique_keys // module.num_embeddings, per_pair)

    def accumulate(self, module, calls, coef, ctx):
        cached = ctx.scratch.pop(module, None)
        sample, ident, grad = cached if cached is not None else _ids_and_grads(
            module, calls, ctx.batch_size
        )
        grad = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        scaled = grad * coef.to(grad.dtype)[sample].unsqueeze(1)
        buf = grad_buffer(module.weight)
        buf.index_add_(0, ident, scaled.to(buf.dtype))
