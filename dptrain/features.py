"""Frozen encoder ⇒ compute it once: DP-train the head on cached sentence features.

When only the head of a :class:`~dptrain.models.MeanPoolingClassifier` trains, the encoder is a
fixed function f of each example, so the per-sample gradient of example i,

    G_i = ∂ℓ(W·dropout(f(x_i)) + b, y_i)/∂(W, b),

depends on x_i only through f(x_i). Computing f(x_i) once (eval mode: the frozen encoder's own
dropout is off) and training on the cached features is the same mechanism — the same Poisson
batches, per-sample clipping, noise and accountant — at the cost of the head alone per epoch.

Within one process, features are remembered per encoder (by the sha256 of its weights) and token
sequence, so the shadow models of ``attack mia`` and the runs of an audit, which see the same
population, encode each example once. Across processes they persist in a *feature store*
(:func:`feature_store`): a private directory (mode 0700, files 0600) that a command opens —
``private/features/`` of its run or sweep directory, or one the user names — never a global
shared cache, since the features are functions of private data. The store keeps one folder per
encoder digest and encoding setting, and in it files of rows keyed by the sha256 of each token
sequence: a row is reused only for the same sequence under the same encoder weights, so any
change of encoder or data re-encodes exactly what changed. Rows are stored bit for bit
(safetensors, float32), so a stored row gives the same clipped sums as a fresh one. Deleting the
store is always safe (the rows are encoded again); an unreadable file is skipped with a warning.
A model whose encoder has any trainable parameter is refused here (the cache would skip it).

Joint intent + slot models (:mod:`dptrain.joint_model`) cache more: each utterance's token
states (:func:`token_states`), from which :class:`JointFeatureHead` reads the pooled state for
the intent head and the states of each word's first sub-token for the tag head. The
per-utterance loss, and so the clipped gradient of each utterance, is that of the full model
with a frozen encoder in eval mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

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


log = logging.getLogger(__name__)

_MEMORY: dict[tuple, dict[bytes, object]] = {}  # one encoder at a time: sequence digest → row(s)
_LOADED: set[tuple] = set()  # (key, store) pairs whose stored rows are in memory
STORE_ENV = "DPTRAIN_FEATURE_CACHE"  # the open store; child processes (sweep workers) inherit it


def sequence_key(ids) -> bytes:
    """The sha256 of a token sequence (int64 bytes): how a remembered or stored row is found."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()


def _key_folder(key: tuple) -> str:
    return hashlib.sha256(json.dumps([str(k) for k in key]).encode()).hexdigest()[:32]


def open_store() -> Path | None:
    """The feature store rows persist in now, if any."""
    value = os.environ.get(STORE_ENV)
    return Path(value) if value else None


def _memory(key: tuple) -> dict[bytes, object]:
    if key not in _MEMORY:
        _MEMORY.clear()
        _LOADED.clear()
        _MEMORY[key] = {}
    store = open_store()
    if store is not None and (key, store) not in _LOADED:
        for digest, row in _load_store(store, key).items():
            _MEMORY[key].setdefault(digest, row)
        _LOADED.add((key, store))
    return _MEMORY[key]


def forget() -> None:
    """Drop every remembered feature (the store on disk stays)."""
    _MEMORY.clear()
    _LOADED.clear()


@contextlib.contextmanager
def feature_store(directory: str | Path | None, reuse_open: bool = False) -> Iterator[Path | None]:
    """Persist encoded rows in ``directory`` (created 0700 when a row is first written) while
    the block runs; ``None`` keeps
    them in memory only. ``reuse_open``: keep a store that is already open instead (a sweep's
    or an attack's store serves every run inside it). The open store is exported in
    ``$DPTRAIN_FEATURE_CACHE``, so the processes a command starts use it too."""
    if directory is None or (reuse_open and open_store() is not None):
        yield open_store()
        return
    directory = Path(directory).absolute()  # created when the first row is written
    from .outputs import check_writable

    check_writable(directory, f"the feature store {directory}")  # one line now, not after encoding
    before = os.environ.get(STORE_ENV)
    os.environ[STORE_ENV] = str(directory)
    try:
        yield directory
    finally:
        if before is None:
            os.environ.pop(STORE_ENV, None)
        else:
            os.environ[STORE_ENV] = before


STORE_README = """\
dptrain feature store: encoder outputs of training and evaluation examples, one folder per encoder
and setting, rows keyed by the sha256 of each token sequence. Derived from private data: never
share it. Deleting it is safe (the rows are encoded again when needed).
"""


def stored_in(argument: str):
    """Decorate a command function so that it runs inside the feature store
    (``rundir.FEATURES``) of the directory its ``argument`` names, unless a store is already
    open (a sweep's, or the one ``--feature-cache`` names)."""
    import functools
    import inspect

    from .rundir import FEATURES

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            where = signature.bind(*args, **kwargs).arguments.get(argument)
            with feature_store(None if where is None else Path(where) / FEATURES, reuse_open=True):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def _load_store(store: Path, key: tuple) -> dict[bytes, object]:
    """Every row ``store`` holds for ``key``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    rows: dict[bytes, object] = {}
    folder = store / _key_folder(key)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            t = load_file(path)
            digests = t["sequences"].numpy()
            if key[0] == "pooled":
                for d, row in zip(digests, t["rows"]):
                    rows[d.tobytes()] = row.clone()
            else:
                ends = np.cumsum(t["lengths"].numpy()).tolist()
                starts = [0, *ends[:-1]]
                tags = t.get("tags", t["last"])
                for d, a, b in zip(digests, starts, ends):
                    last = t["last"][a:b].clone()
                    rows[d.tobytes()] = (last, last if "tags" not in t else tags[a:b].clone())
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
            log.warning("skipping unreadable feature file %s: %s", path, exc)
    if rows:
        log.info("reusing %d encoded rows from %s", len(rows), folder)
    return rows


def _save_store(key: tuple, new: dict[bytes, object]) -> None:
    """Write newly encoded rows to the open store: one new file, written then renamed (0600)."""
    from safetensors.torch import save_file

    store = open_store()
    if store is None or not new:
        return
    folder = store / _key_folder(key)
    _private_dir(store)
    _private_dir(folder)
    if not (store / "README.txt").exists():
        (store / "README.txt").write_text(STORE_README)
    digests = list(new)
    tensors = {"sequences": torch.from_numpy(np.frombuffer(b"".join(digests), dtype=np.uint8)
                                             .reshape(len(digests), 32).copy())}
    if key[0] == "pooled":
        tensors["rows"] = torch.stack([new[d] for d in digests]).contiguous()
    else:
        tensors["lengths"] = torch.tensor([new[d][0].shape[0] for d in digests], dtype=torch.int64)
        tensors["last"] = torch.cat([new[d][0] for d in digests]).contiguous()
        if any(new[d][1] is not new[d][0] for d in digests):
            tensors["tags"] = torch.cat([new[d][1] for d in digests]).contiguous()
    name = hashlib.sha256(b"".join(digests)).hexdigest()[:32]
    tmp = folder / f".{name}.{os.getpid()}.partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    save_file(tensors, str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, folder / f"{name}.safetensors")


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
    key = ("pooled", encoder_sha256 or weights_sha256(model.encoder), dtype, int(pad_token_id),
           precision)
    memory = _memory(key)
    out = torch.empty(len(encoded), model.config.hidden_size, dtype=dtype)
    todo, keys, new = [], [sequence_key(ids) for ids in encoded.input_ids], {}
    for i, k in enumerate(keys):
        known = memory.get(k)
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
                memory[keys[i]] = new[keys[i]] = row.clone()
            if progress is not None:
                progress(len(idx))
    finally:
        model.encoder.train(was_training)
        _save_store(key, new)
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
    key = ("tokens", encoder_sha256 or weights_sha256(encoder), int(pad_token_id), precision,
           int(tag_layers))
    memory = _memory(key)
    keys, new = [sequence_key(r) for r in ids], {}
    out: list = [memory.get(k) for k in keys]
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
                out[i] = memory[keys[i]] = new[keys[i]] = (last, tags)
            if progress is not None:
                progress(len(idx))
    finally:
        encoder.train(was_training)
        _save_store(key, new)
    return out


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 states as fp32 (what the heads compute in); other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
