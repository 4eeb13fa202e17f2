"""What an attacker observes of a trained classifier, per example: loss, confidence, softmax.

For logits z and the example's label y:

* ``loss`` = −log p_y (cross-entropy), the signal of the loss attack (Yeom et al. 2018);
* ``phi`` = log p_y − log Σ_{j≠y} p_j = z_y − logsumexp_{j≠y} z_j, the logit-scaled confidence of
  LiRA (Carlini et al. 2022, §IV-B), computed from the logits so that it stays finite when p_y
  rounds to 1;
* ``label_prob`` = p_y, the likelihood Pr(x | θ) of RMIA (Zarifzadeh et al. 2024);
* ``probs``: the full softmax, for attacks that need it.

Batched, without gradients, shortest texts first. The model is read from a run directory's
``model/`` like any Hugging Face checkpoint; nothing of the training engine is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Signals:
    """Per-example signals of one model on one list of labelled texts (aligned arrays)."""

    loss: np.ndarray
    phi: np.ndarray
    label_prob: np.ndarray
    probs: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)

    def save(self, path: Path) -> None:
        """Write as .npz (plain float arrays, readable with ``allow_pickle=False``)."""
        from dptrain.rundir import write_bytes_atomic
        import io

        buf = io.BytesIO()
        np.savez(buf, loss=self.loss, phi=self.phi, label_prob=self.label_prob, probs=self.probs)
        write_bytes_atomic(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "Signals":
        with np.load(Path(path), allow_pickle=False) as f:
            return cls(loss=f["loss"], phi=f["phi"], label_prob=f["label_prob"], probs=f["probs"])


def signals_from_logits(logits: np.ndarray, labels: np.ndarray) -> Signals:
    """Loss, φ, p_y and softmax from logits [n, K] and labels [n], in float64, stably."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"logits must be [n, K] and labels [n], got {z.shape} and {y.shape}.")
    if z.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes, got {z.shape[1]}.")
    rows = np.arange(len(y))
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    z_y = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    o_top = others.max(axis=1, keepdims=True)
    log_others = o_top[:, 0] + np.log(np.exp(others - o_top).sum(axis=1))
    log_p = z - log_norm[:, None]
    return Signals(
        loss=log_norm - z_y,
        phi=z_y - log_others,
        label_prob=np.exp(z_y - log_norm),
        probs=np.exp(log_p).astype(np.float32),
    )


def load_classifier(run_dir: str | Path):
    """(model, tokenizer) of a run directory, in eval mode."""
    from dptrain.models import load_trained

    return load_trained(Path(run_dir) / "model")


def compute_signals(model, tokenizer, texts: Sequence[str], labels: Sequence[int], *,
                    max_length: int = 64, batch_size: int = 128, device=None) -> Signals:
    """Signals of ``model`` on labelled texts (labels are class ids of the model's head), computed
    on ``device`` (a torch.device; default: where the model is)."""
    import torch

    from dptrain.data import Split, collate, encode
    from dptrain.device import to_device

    if device is not None:
        model.to(device)
    device = next(model.parameters()).device

    labels = np.asarray(labels, dtype=np.int64)
    encoded = encode(tokenizer, Split(tuple(texts), labels), max_length)
    from dptrain.models import MeanPoolingClassifier

    if isinstance(model, MeanPoolingClassifier):  # encoder outputs shared with training and
        from dptrain.features import pooled_features  # other shadows: only the head runs here

        model.eval()
        with torch.no_grad():
            features = pooled_features(model, encoded, tokenizer.pad_token_id, device=device)
            weight = model.classifier.weight
            logits = model.classifier(features.to(device=device, dtype=weight.dtype)).double().cpu().numpy()
        return signals_from_logits(logits, labels)
    order = np.argsort(encoded.lengths, kind="stable")
    logits = np.empty((len(labels), model.config.num_labels), dtype=np.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate(encoded, idx, tokenizer.pad_token_id)
            batch.pop("labels", None)
            logits[idx] = model(**to_device(batch, device)).logits.double().cpu().numpy()
    model.train(was_training)
    return signals_from_logits(logits, labels)


def joint_signals(model, tokenizer, utterances, intents: Sequence[str], tags, *,
                  max_length: int = 64, batch_size: int = 256, device=None) -> Signals:
    """Per-utterance signals of a joint intent + slot model (or slots-only model) on tagged
    utterances: ``loss`` is the utterance's training loss ℓ_i (intent cross-entropy + the mean
    of its words' tag cross-entropies, :func:`dptrain.joint_model.per_utterance_loss`), the
    membership signal of the whole utterance; ``label_prob`` = exp(−ℓ_i), the model's
    (geometric-mean) likelihood of the utterance's frame, RMIA's Pr(x | θ); ``phi`` its logit
    log p − log(1 − p), LiRA's statistic; ``probs`` the intent softmax (slots only: [p, 1 − p]).
    ``tags``: the model's :class:`~dptrain.joint_model.TagSet` (a list of tags: BIO classes).

    A frozen encoder runs once per utterance and is shared with training and other models of
    the same encoder (:mod:`dptrain.features`)."""
    import torch

    from dptrain.features import cacheable
    from dptrain.slot_trainer import SlotBatches, encode_slots

    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    enc = encode_slots(tokenizer, utterances, intents, tags, max_length)
    was_training = model.training
    model.eval()
    batches = SlotBatches(model, {"population": enc}, tokenizer.pad_token_id, device,
                          cache_features=cacheable(model))
    n = len(enc)
    loss = np.empty(n, dtype=np.float64)
    intent_probs = None
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            b = batches.batch("population", idx)
            out = batches.net(**b)
            loss[start:start + len(idx)] = out.utterance_loss.double().cpu().numpy()
            if out.intent_logits is not None:
                if intent_probs is None:
                    intent_probs = np.empty((n, out.intent_logits.shape[-1]), dtype=np.float32)
                intent_probs[start:start + len(idx)] = torch.softmax(
                    out.intent_logits.double(), -1).float().cpu().numpy()
    model.train(was_training)
    ell = np.maximum(loss, 1e-12)  # ℓ = 0 would make φ infinite
    label_prob = np.exp(-ell)
    phi = -ell - np.log(-np.expm1(-ell))
    probs = (intent_probs if intent_probs is not None
             else np.stack([label_prob, 1.0 - label_prob], axis=1).astype(np.float32))
    return Signals(loss=loss, phi=phi, label_prob=label_prob, probs=probs)

