"""Independent references for the privacy-relevant maths: a per-example loop and tiny HF models.

Nothing here uses dptrain: per-sample gradients come from one ordinary backward pass per example.
"""

from __future__ import annotations

import torch
from torch import nn


def per_example_grads(model: nn.Module, loss_of, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``loss_of(i)`` is sample i's loss on its own; returns its gradient per trainable parameter."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for i in range(batch_size):
        model.zero_grad(set_to_none=True)
        loss_of(i).backward()
        out.append({
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in params
        })
    model.zero_grad(set_to_none=True)
    return out


def norms_of(grads: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in d.values())) for d in grads])


def clipped_sum(grads, max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Σ_i min(1, C/(||g_i|| + 1e-6)) g_i, the DP-SGD clipped sum."""
    coef = (max_grad_norm / (norms_of(grads) + 1e-6)).clamp(max=1.0)
    return {n: sum(c * g[n] for c, g in zip(coef, grads)) for n in grads[0]}


def assert_grads_close(model: nn.Module, expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Every trainable ``p.grad`` equals the reference to ``rtol`` relative to the tensor's scale.

    The tolerance is relative to each tensor's largest entry: attention key biases have a true
    gradient of zero (softmax ignores a constant shift), so their entries are pure rounding.
    """
    scale = max(float(v.abs().max()) for v in expected.values())
    for name, p in model.named_parameters():
        if name not in expected:
            continue
        ref = expected[name]
        assert p.grad is not None, f"{name} has no gradient"
        atol = rtol * max(float(ref.abs().max()), 1e-3 * scale)
        torch.testing.assert_close(p.grad, ref, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def tiny_model(kind: str, num_labels: int = 5, dtype=torch.float64) -> nn.Module:
    """A 2-layer, hidden-32 random classifier of one HF family, dropout off (for exact references)."""
    from transformers import (
        BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
        MPNetConfig, MPNetForSequenceClassification, RobertaConfig, RobertaForSequenceClassification,
    )
    torch.manual_seed(0)
    common = dict(vocab_size=100, num_labels=num_labels)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            **common))
    elif kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pad_token_id=1, **common))
    elif kind == "mpnet":  # all-mpnet-base-v2's family: relative position buckets in attention
        model = MPNetForSequenceClassification(MPNetConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pad_token_id=1, **common))
    elif kind == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=2, **common))
    else:
        raise ValueError(kind)
    return model.to(dtype).train()


def padded_batch(kind: str, batch_size: int = 6, seq_len: int = 12, seed: int = 0):
    """Random ids with per-row lengths, right-padded with the family's pad id, and labels."""
    gen = torch.Generator().manual_seed(seed)
    pad = 1 if kind in ("roberta", "mpnet") else 0
    ids = torch.randint(3, 100, (batch_size, seq_len), generator=gen)
    ids[:, 3] = ids[:, 1]  # a repeated id inside each sample (embedding rows shared within a sample)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    lengths = torch.randint(4, seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    for i, n in enumerate(lengths):
        ids[i, n:] = pad
        mask[i, n:] = 0
    labels = torch.randint(0, 5, (batch_size,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def row(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in batch.items()}


def removal_shifts(model: nn.Module, batch: dict[str, torch.Tensor], size: int) -> list[float]:
    """‖S(D) − S(D∖{i})‖ for every i: S is whatever ``.grad`` holds after one backward pass of
    ``model(**rows).loss`` over the rows kept (the engine's pre-noise clipped sum when a clipper
    is attached), over all trainable parameters."""
    def summed(keep: list[int]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model(**{k: v[keep] for k, v in batch.items()}).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    full = summed(list(range(size)))
    return [float((full - summed([j for j in range(size) if j != i])).norm()) for i in range(size)]
