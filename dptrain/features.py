"""Frozen encoder ⇒ compute it once: DP-train the head on cached sentence features.

When only the head of a :class:`~dptrain.models.MeanPoolingClassifier` trains, the encoder is a
fixed function f of each example, so the per-sample gradient of example i,

    G_i = ∂ℓ(W·dropout(f(x_i)) + b, y_i)/∂(W, b),

depends on x_i only through f(x_i). Computing f(x_i) once (eval mode: the frozen encoder's own
dropout is off) and training on the cached features is the same mechanism — the same Poisson
batches, per-sample clipping, noise and accountant — at the cost of the head alone per epoch.

The features are derived from private data: they live in this process's memory only, never on
disk or in a shared cache. Within one process they are remembered per encoder (by the sha256 of
its weights) and token sequence, so the shadow models of ``attack mia`` and the runs of an audit,
which see the same population, encode each example once. A model whose encoder has any
trainable parameter is refused here (the cache would skip it).

Joint intent + slot models (:mod:`dptrain.joint_model`) cache more: each utterance's token
states (:func:`token_states`), from which :class:`JointFeatureHead` reads the pooled state for
the intent head and the states of each word's first sub-token for the tag head. The
per-utterance loss, and so the clipped gradient of each utterance, is that of the full model
with a frozen encoder in eval mode.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import ModelError


class FeatureHead(nn.Module):
    """The trainable suffix of a mean-pooling classifier, applied to cached pooled features.

    Shares its parameters with the classifier it came from: training it trains that model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.dropout = model.dropout
        self.classifier = model.classifier

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.dropout(features))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class JointFeatureHead(nn.Module):
    """The heads of a :class:`~dptrain.joint_model.JointIntentSlotModel`, applied to cached
    states: ``pooled`` [B, d] and ``word_states`` [B, W, d] (each word's first sub-token, of the
    states the tag head reads; padded with tag label -100). Shares its parameters with the
    model: training it trains that model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.dropout, self.intent_head, self.tag_head = model.dropout, model.intent_head, model.tag_head
        self.intent_tag_bias = model.intent_tag_bias

    def forward(self, pooled: torch.Tensor, word_states: torch.Tensor, labels=None, tag_labels=None):
        from .joint_model import joint_heads

        return joint_heads(self, pooled, word_states, labels, tag_labels)


def cacheable(model: nn.Module) -> bool:
    """Whether the model is a mean-pooling classifier or a joint intent + slot model whose
    encoder is entirely frozen."""
    from .joint_model import JointIntentSlotModel
    from .models import MeanPoolingClassifier

    if not isinstance(model, (MeanPoolingClassifier, JointIntentSlotModel)):
        return False
    return not any(p.requires_grad for p in model.encoder.parameters())


def _check_frozen(model: nn.Module, kind: type, what: str) -> None:
    """Refuse a model the cache would get wrong: not a ``kind``, or an encoder that trains."""
    if not isinstance(model, kind):
        raise ModelError(f"cached {what} need a {kind.__name__}, got {type(model).__name__}.")
    trainable = [n for n, p in model.encoder.named_parameters() if p.requires_grad]
    if trainable:
        raise ModelError(
            f"cannot cache the encoder's {what}: {len(trainable)} encoder parameter(s) train "
            f"(e.g. encoder.{trainable[0]}), and the cache would skip their gradients."
        )


def joint_feature_head(model: nn.Module) -> JointFeatureHead:
    """The heads to train on cached token states; refuses a model the cache would get wrong."""
    from .joint_model import JointIntentSlotModel

    _check_frozen(model, JointIntentSlotModel, "states")
    return JointFeatureHead(model)


def feature_head(model: nn.Module) -> FeatureHead:
    """The head to train on cached features; refuses a model the cache would get wrong."""
    from .models import MeanPoolingClassifier

    _check_frozen(model, MeanPoolingClassifier, "features")
    return FeatureHead(model)


_MEMORY: dict[tuple, dict[tuple[int, ...], torch.Tensor]] = {}  # one encoder at a time


def _memory(key: tuple) -> dict[tuple[int, ...], torch.Tensor]:
    if key not in _MEMORY:
        _MEMORY.clear()
        _MEMORY[key] = {}
    return _MEMORY[key]


def forget() -> None:
    """Drop every remembered feature."""
    _MEMORY.clear()


@torch.no_grad()
def pooled_features(model: nn.Module, encoded, pad_token_id: int, batch_size: int = 256,
                    progress=None, encoder_sha256: str | None = None, device=None,
                    precision: str = "fp32") -> torch.Tensor:
    """Mean-pooled encoder states [N, d] of every example of an encoded split (eval mode).

    Examples are batched by length (little padding); each row depends on its own example only,
    which is what lets a row computed in one call be reused in another. ``encoder_sha256``:
    :func:`~dptrain.models.weights_sha256` of the encoder, when the caller already has it.
    """
    from .data import collate
    from .device import autocast, to_device
    from .models import weights_sha256

    device = device if device is not None else next(model.encoder.parameters()).device

    dtype = next(model.classifier.parameters()).dtype  # what the head computes in
    memory = _memory(("pooled", encoder_sha256 or weights_sha256(model.encoder), dtype,
                      int(pad_token_id), precision))
    out = torch.empty(len(encoded), model.config.hidden_size, dtype=dtype)
    todo = []
    for i, ids in enumerate(encoded.input_ids):
        known = memory.get(tuple(ids))
        if known is None:
            todo.append(i)
        else:
            out[i] = known
    if progress is not None and len(encoded) > len(todo):
        progress(len(encoded) - len(todo))
    todo = np.asarray(todo, dtype=np.int64)
    order = todo[np.argsort(encoded.lengths[todo], kind="stable")]
    was_training = model.encoder.training
    model.encoder.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = to_device(collate(encoded, idx, pad_token_id), device)
            with autocast(device, precision):
                states = model.encoder(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).last_hidden_state
            if states.dtype in (torch.float16, torch.bfloat16):
                states = states.float()  # pool in fp32 (the features the head trains on)
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = ((states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).to(dtype).cpu()
            out[torch.from_numpy(idx)] = pooled
            for row, i in zip(pooled, idx.tolist()):
                memory[tuple(encoded.input_ids[i])] = row.clone()
            if progress is not None:
                progress(len(idx))
    finally:
        model.encoder.train(was_training)
    return out


@torch.no_grad()
def token_states(encoder: nn.Module, ids, lengths, pad_token_id: int, batch_size: int = 256,
                 progress=None, encoder_sha256: str | None = None, device=None,
                 precision: str = "fp32", tag_layers: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per token sequence in ``ids``: its last hidden states [T_i, d] and the mean of its last
    ``tag_layers`` hidden states [T_i, d] (the same tensor when ``tag_layers`` is 1): what a
    :class:`~dptrain.joint_model.JointIntentSlotModel` pools and what its tag head reads.
    On the CPU (fp16/bf16 upcast to fp32), encoded in eval mode, batched by length and
    remembered per sequence like :func:`pooled_features` (each row depends on its own sequence
    only)."""
    from .device import autocast
    from .models import weights_sha256

    device = device if device is not None else next(encoder.parameters()).device
    memory = _memory(("tokens", encoder_sha256 or weights_sha256(encoder), int(pad_token_id),
                      precision, int(tag_layers)))
    out: list = [memory.get(tuple(r)) for r in ids]
    todo = np.asarray([i for i, known in enumerate(out) if known is None], dtype=np.int64)
    if progress is not None and len(ids) > len(todo):
        progress(len(ids) - len(todo))
    order = todo[np.argsort(np.asarray(lengths)[todo], kind="stable")]
    was_training = encoder.training
    encoder.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), int(pad_token_id), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, :len(ids[i])] = torch.as_tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            with autocast(device, precision):
                encoded = encoder(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                  output_hidden_states=tag_layers > 1)
            states = [_upcast(encoded.last_hidden_state)]
            if tag_layers > 1:
                states.append(_upcast(torch.stack(encoded.hidden_states[-tag_layers:])).mean(0))
            states = [s.cpu() for s in states]
            for row, i in enumerate(idx):
                last = states[0][row, :len(ids[i])].clone()
                tags = last if tag_layers == 1 else states[1][row, :len(ids[i])].clone()
                out[i] = memory[tuple(ids[i])] = (last, tags)
            if progress is not None:
                progress(len(idx))
    finally:
        encoder.train(was_training)
    return out


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 states as fp32 (what the heads compute in); other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
