"""Resolve a model name into a sequence classifier and its tokenizer, and choose what trains.

Names:

* ``minilm`` and ``mpnet``: all-MiniLM-L6-v2 and all-mpnet-base-v2, installed offline from the
  package registry and checked against pinned digests (:mod:`dptrain.encoders`);
* ``tiny``: a 2-layer, hidden-64 random BERT with a WordPiece tokenizer whose vocabulary is fixed
  in this file (the synthetic templates' words, letters and digits as fallback pieces). It is
  never fitted to the training data: a vocabulary learned from private text would leak which
  rare words it contains;
* anything else: a local directory or a Hugging Face hub name, through the real
  ``AutoModelForSequenceClassification.from_pretrained``. Hub names resolve from the local
  Hugging Face cache only (``local_files_only``): nothing is downloaded at run time.

Pooling: the checkpoint's own classification head ([CLS] + pooler for BERT), or — for
sentence-transformers checkpoints such as all-MiniLM-L6-v2, automatically — the mean of the token
states they were trained to produce (:class:`MeanPoolingClassifier`).

Trainable-parameter selection (``trainable``): ``all``; ``head`` (classifier and pooler);
``last-K`` (the top K transformer blocks plus the head); ``bias`` (BitFit: every bias plus the
head; Ben Zaken et al. 2022); ``lora`` (low-rank adapters ΔW = (α/r)·B·A beside the frozen
attention projections, plus the head; Hu et al. 2022, injected with ``peft``, see
:func:`apply_lora`). Under DP, training fewer parameters means less noise in total.
"""

from __future__ import annotations

import json
import logging
import re
import string
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .encoders import MINILM, MPNET, PACKAGED, packaged_path
from .errors import ConfigError, ModelError
from .rundir import read_json as _read_json

TINY = "tiny"
TRAINABLE_HELP = "all | head | last-K (top K blocks + head) | bias (BitFit) | lora"
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_LAST_K = re.compile(r"last-(\d+)")


def tiny_vocabulary() -> list[str]:
    """A fixed vocabulary: specials, characters and ## pieces, then the synthetic data's words."""
    from .synthetic import CANARY_WORDS, vocabulary_words

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = sorted((set(vocabulary_words()) | set(CANARY_WORDS)) - set(chars))
    return list(dict.fromkeys([*_SPECIAL, *chars, *("##" + c for c in chars), *words]))


def tiny_tokenizer():
    """A lower-casing BERT WordPiece tokenizer over :func:`tiny_vocabulary`."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tiny_vocabulary())}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
    )


def tiny_model(num_labels: int, vocab_size: int, label_names: Sequence[str] | None = None):
    """The 2-layer, hidden-64 random BERT classifier of the ``tiny`` alias."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128, num_labels=num_labels,
        **_label_maps(label_names),
    )
    return BertForSequenceClassification(config)


def _label_maps(label_names: Sequence[str] | None) -> dict:
    if not label_names:
        return {}
    return {
        "id2label": {i: str(name) for i, name in enumerate(label_names)},
        "label2id": {str(name): i for i, name in enumerate(label_names)},
    }


POOLINGS = ("auto", "cls", "mean")
_POOLED_FORMAT = "dptrain_classifier.json"


class MeanPoolingClassifier(nn.Module):
    """Encoder → mean of the non-padding token states → dropout → linear head.

    Sentence-transformer checkpoints such as all-MiniLM-L6-v2 were trained to be read this way
    (Reimers & Gurevych 2019): a linear probe on their mean-pooled states classifies CLINC150 at
    0.92 where the [CLS] state gives 0.83 (20 examples per class). Under DP, where the encoder can
    move only a little, starting from the better representation is most of the accuracy.

    It behaves like an HF sequence classifier (``config``, ``base_model``, ``(loss, logits)``
    outputs). Saved as ``encoder/`` (HF ``save_pretrained``), ``head.safetensors`` and
    ``dptrain_classifier.json``; :func:`load_trained` reads it back. There is deliberately no
    ``config.json`` at the top, so a plain ``AutoModelForSequenceClassification`` refuses the
    directory instead of loading a random head. When only the head was trained, the encoder is
    the unchanged pretrained one: ``save_pretrained(..., encoder_reference=True)`` stores where
    it came from and the sha256 of its weights instead of a copy (90 MB for MiniLM), and loading
    checks that hash.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1,
                 source: str | None = None):
        super().__init__()
        self.encoder = encoder
        self.source = source  # where the pretrained encoder was loaded from ('minilm', 'mpnet' or a path)
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
            device = (input_ids if input_ids is not None else inputs_embeds).device
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              inputs_embeds=inputs_embeds, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, path, safe_serialization: bool = True, encoder_reference: bool = False,
                        **kwargs) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "dptrain mean-pooling classifier, version 1",
            "pooling": "mean", "num_labels": self.config.num_labels,
            "dropout": self.dropout.p,
            "id2label": {str(k): v for k, v in (self.config.id2label or {}).items()},
        }
        if encoder_reference:
            if self.source is None:
                raise ModelError("the encoder's source is unknown; it cannot be stored by reference.")
            meta["encoder_reference"] = {"source": self.source, "sha256": weights_sha256(self.encoder)}
        else:
            self.encoder.save_pretrained(path / "encoder", safe_serialization=True)
        save_file({k: v.detach().contiguous() for k, v in self.classifier.state_dict().items()},
                  path / "head.safetensors")
        (path / _POOLED_FORMAT).write_text(json.dumps(meta, indent=2) + "\n")


def _sentence_transformer_pooling(path: Path) -> str | None:
    """'mean' or 'cls' when the checkpoint is a sentence-transformers model, else None."""
    config = path / "1_Pooling" / "config.json"
    if not config.exists():
        return None
    try:
        modes = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    return None


def _unreadable() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


UNREADABLE = _unreadable()
"""What loading a damaged or foreign model directory raises (truncated safetensors included):
callers turn it into one line."""


class _QuietHF:
    """HF logging at error level and no progress bars, for loads whose warnings are expected."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._hf = hf_logging
        self._verbosity = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        self._hf.set_verbosity(self._verbosity)
        if self._bars:
            self._hf.enable_progress_bar()
        return False


def load_model(name: str, num_labels: int, label_names: Sequence[str] | None = None,
               pooling: str = "auto"):
    """(model, tokenizer) for a name, a local path or a cached hub name; see the module docstring.

    ``pooling``: ``cls`` is the checkpoint's own HF classification head ([CLS] or last token);
    ``mean`` is :class:`MeanPoolingClassifier`; ``auto`` takes ``mean`` for sentence-transformers
    checkpoints that were trained with mean pooling, else ``cls``. The head is new (randomly
    initialized) unless the checkpoint already has one with ``num_labels`` outputs.
    """
    if num_labels < 2:
        raise ConfigError(f"num_labels must be >= 2, got {num_labels}.")
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}.")
    if name == TINY:
        if pooling == "mean":
            raise ConfigError("pooling 'mean' is for pretrained encoders; the tiny model uses 'cls'.")
        tokenizer = tiny_tokenizer()
        return tiny_model(num_labels, len(tokenizer), label_names), tokenizer
    path = packaged_path(name) if name in PACKAGED else name
    local = Path(path).exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelError(f"model '{name}' not found: no such directory.")
    if pooling == "auto":
        pooling = (_sentence_transformer_pooling(Path(path)) if local else None) or "cls"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if local:
        refuse_pickled_weights(Path(path))
    try:
        with _QuietHF():  # the "newly initialized head" report is expected here
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            if pooling == "mean":
                encoder = _load_encoder(path)
                encoder.config.update(_label_maps(label_names))
                source = name if name in PACKAGED else str(Path(path).resolve()) if local else name
                model = MeanPoolingClassifier(encoder, num_labels, source=source)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True,
                    use_safetensors=True, **_label_maps(label_names),
                )
    except UNREADABLE as exc:
        where = "in that directory" if local else "locally (hub names load from the local cache only)"
        reason = " ".join(str(exc).split()) or type(exc).__name__  # whole, on one line
        raise ModelError(
            f"cannot load model '{name}' as a sequence classifier {where}: {reason}"
        ) from exc
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers: pad with end-of-sequence
        if tokenizer.eos_token is None:
            raise ModelError(f"model '{name}' has a tokenizer with neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    logging.getLogger(__name__).info("loaded %s with %s pooling (%d parameters)", name, pooling,
                                     sum(p.numel() for p in model.parameters()))
    return model, tokenizer


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_pickled_weights(directory: Path) -> None:
    """A model directory must hold safetensors weights: pickled ones (``pytorch_model.bin``) can
    run code when loaded, so they are refused, never unpickled."""
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in directory.glob(pattern))
    if pickled:
        raise ModelError(
            f"model directory {directory} holds only pickled weights ({', '.join(pickled[:3])}); "
            "dptrain loads safetensors only, since unpickling can run code: convert them with "
            "model.save_pretrained(dir, safe_serialization=True) where you trust the file."
        )


def load_trained(model_dir: str | Path):
    """(model, tokenizer) of a classifier saved by a run (either layout), in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    pooled = model_dir / _POOLED_FORMAT
    if not pooled.exists() and not (model_dir / "config.json").exists():
        raise ModelError(f"{model_dir} holds no trained classifier.")
    meta = _read_json(pooled) if pooled.exists() else None
    reference = (meta or {}).get("encoder_reference")
    if reference is None:
        refuse_pickled_weights(model_dir / "encoder" if pooled.exists() else model_dir)
    try:
        with _QuietHF():
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            if meta is not None:
                encoder = (_referenced_encoder(reference) if reference is not None else
                           AutoModel.from_pretrained(model_dir / "encoder", local_files_only=True,
                                                     use_safetensors=True))
                model = MeanPoolingClassifier(encoder, int(meta["num_labels"]), float(meta["dropout"]),
                                              source=(reference or {}).get("source"))
                model.classifier.load_state_dict(load_file(model_dir / "head.safetensors"))
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    model_dir, local_files_only=True, use_safetensors=True)
    except UNREADABLE as exc:
        raise ModelError(f"cannot load the classifier in {model_dir}: {' '.join(str(exc).split())}") from exc
    return model.eval(), tokenizer


def _load_encoder(path) -> nn.Module:
    """The bare encoder of a checkpoint, without the pooler mean pooling never uses."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False,
                                         use_safetensors=True)
    except TypeError:  # architectures without a pooler
        return AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), in key order."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _referenced_encoder(reference: dict) -> nn.Module:
    """The frozen pretrained encoder a head-only run refers to, checked against its hash."""
    source = str(reference.get("source"))
    path = packaged_path(source) if source in PACKAGED else source
    if not Path(path).exists():
        raise ModelError(f"this classifier's frozen encoder is stored by reference to {source}, "
                         "which is not on this machine; install or copy it there.")
    refuse_pickled_weights(Path(path))
    with _QuietHF():
        encoder = _load_encoder(path)
    if weights_sha256(encoder) != reference.get("sha256"):
        raise ModelError(f"the encoder at {source} is not the one this classifier was trained on "
                         "(sha256 of its weights differs).")
    return encoder


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of blocks: the longest ModuleList inside the base model."""
    base = getattr(model, "base_model", model)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ModelError(f"cannot find the transformer blocks of {type(model).__name__}.")
    return max(lists, key=len)


def set_trainable(model: nn.Module, spec: str) -> int:
    """Freeze all but the parameters ``spec`` selects; returns how many values train."""
    base = getattr(model, "base_model", model)
    base_ids = {id(p) for p in base.parameters()}
    if spec != "lora" and any(".lora_" in n for n, _ in base.named_parameters()):
        raise ConfigError(f"this model has LoRA adapters; trainable {spec!r} would train them "
                          "or leave them random: use 'lora'.")
    pooler = getattr(base, "pooler", None)
    head_ids = {id(p) for p in model.parameters() if id(p) not in base_ids}
    if pooler is not None:
        head_ids |= {id(p) for p in pooler.parameters()}
    match = _LAST_K.fullmatch(spec)
    if spec == "all":
        chosen = {id(p) for p in model.parameters()}
    elif spec == "head":
        chosen = head_ids
    elif spec == "bias":
        chosen = head_ids | {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    elif spec == "lora":
        lora = {id(p) for n, p in base.named_parameters() if ".lora_" in n}
        if not lora:
            raise ModelError("trainable 'lora' needs adapters: call apply_lora(model, ...) first.")
        chosen = head_ids | lora
    elif match:
        blocks = transformer_blocks(model)
        k = int(match.group(1))
        if not 1 <= k <= len(blocks):
            raise ConfigError(f"trainable last-K needs K in [1, {len(blocks)}] for this model, got {k}.")
        chosen = head_ids | {id(p) for block in blocks[len(blocks) - k:] for p in block.parameters()}
    else:
        raise ConfigError(f"trainable must be one of {TRAINABLE_HELP}, got {spec!r}.")
    if not head_ids:
        raise ModelError(f"cannot find the classification head of {type(model).__name__}.")
    total = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
        total += p.numel() if id(p) in chosen else 0
    return total


def lora_targets(model: nn.Module, targets: str = "auto") -> list[str]:
    """The module names LoRA adapts: ``auto`` is peft's choice for the architecture (the query
    and value projections of BERT and RoBERTa), else a comma-separated list of names."""
    if targets != "auto":
        names = [t.strip() for t in targets.split(",") if t.strip()]
        if not names:
            raise ConfigError(f"lora targets must name modules, got {targets!r}.")
        return names
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULTS:
        raise ConfigError(f"no default LoRA target modules for model type {model_type!r}; "
                          "name them with --lora-targets (e.g. query,value).")
    return list(DEFAULTS[model_type])


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: str = "auto") -> int:
    """Inject LoRA adapters (Hu et al. 2022) into the encoder of ``model``, in place.

    Each targeted linear map W x becomes W x + (α/r)·B(A x) with A ∈ R^{r×d} random and B = 0,
    so training starts from the pretrained function. Only the encoder is adapted (the head
    trains whole); the model keeps its class and its forward. Uses ``peft.inject_adapter_in_model``
    (no ``PeftModel`` wrapper, so state-dict keys outside the adapters do not change); adapters
    are plain ``nn.Linear`` modules, which per-sample clipping handles exactly (tested against a
    per-example loop for the pinned peft). Returns the number of adapter values.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora rank must be an integer >= 1, got {rank!r}.")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ConfigError(f"lora alpha must be > 0, got {alpha!r}.")
    base = getattr(model, "base_model", model)
    names = lora_targets(base, targets)
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

    present = {name.rsplit(".", 1)[-1] for name, m in base.named_modules()
               if isinstance(m, (nn.Linear, Conv1D))}
    missing = [t for t in names if t not in present]
    if missing:
        raise ConfigError(f"lora targets {missing} are not linear modules of this model "
                          f"(it has {sorted(present)}).")
    transposed = any(isinstance(m, Conv1D) for name, m in base.named_modules()
                     if name.rsplit(".", 1)[-1] in names)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none",
                        fan_in_fan_out=transposed)
    with _QuietHF():
        inject_adapter_in_model(config, base)
    return sum(p.numel() for n, p in base.named_parameters() if ".lora_" in n)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + (α/r)·B·A, peft's ``merge``) and put the
    plain layer back, so the saved model is an ordinary classifier with the original keys."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def label_text(name: str) -> str:
    """A label name as words: ``book_flight`` → ``book flight``, ``AddToPlaylist`` → ``add to
    playlist`` (what a sentence encoder reads best)."""
    return " ".join(_CAMEL.sub(" ", str(name)).replace("_", " ").replace("-", " ").split()).lower()


def has_word_labels(label_names: Sequence[str]) -> bool:
    """Whether label names say something an encoder can read: every name holds a letter (not
    ids such as ``0``, ``1``, ``2``)."""
    return all(any(c.isalpha() for c in str(n)) for n in label_names)


@torch.no_grad()
def init_head_from_labels(model: nn.Module, tokenizer, label_names: Sequence[str], scale: float,
                          max_length: int = 32) -> None:
    """Start a mean-pooling classifier's head at ``scale`` × the unit-norm encoder embedding of
    each label's name (bias 0): a zero-shot prior that DP-SGD then refines.

    Uses only the label names (the model's public output schema, released in its config) and
    the public encoder: no training example is read, so the start costs no privacy.
    """
    from .data import Split, encode
    from .features import pooled_features

    if not isinstance(model, MeanPoolingClassifier):
        raise ConfigError("head_init 'labels' needs a mean-pooling classifier (a sentence encoder).")
    texts = tuple(label_text(n) for n in label_names)
    import numpy as np

    enc = encode(tokenizer, Split(texts, np.arange(len(texts))), max_length)
    emb = pooled_features(model, enc, tokenizer.pad_token_id)
    weight = model.classifier.weight
    weight.copy_(scale * nn.functional.normalize(emb.to(weight.dtype), dim=-1).to(weight.device))
    model.classifier.bias.zero_()
