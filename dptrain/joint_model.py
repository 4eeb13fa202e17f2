"""Joint intent classification and slot tagging on one encoder (IC-NER), and slot-only tagging.

The model: any Hugging Face encoder; an intent head on the pooled utterance ([CLS] state or the
mean of the token states) and a tag head on every token state. Slot tags are predicted on the
*first sub-token of each word* (the usual alignment: "Cita Romántica" → ``Ci ##ta Rom ##án
##tica``, labels on ``Ci`` and ``Rom``); other sub-tokens, special tokens and padding carry the
label -100 and are ignored.

The privacy unit is the utterance. Its loss is

    ℓ_i = CE(intent_i) + (1/W_i) Σ_{w ∈ words of i} CE(tag_{i,w})      (task "joint")
    ℓ_i = (1/W_i) Σ_w CE(tag_{i,w})                                    (task "slots")

(the tag term averaged over the utterance's own W_i words), and the batch loss is the mean of
ℓ_i over the batch, so that per-sample clipping clips one gradient per utterance, over all its
tokens and both heads. Averaging the tag losses over all the *batch's* tokens instead (what a
token-classification head does by default) would weigh each utterance by its share of the
batch's words, which depends on the other utterances: examples would be coupled and the
sensitivity analysis would not hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError

TASKS = ("joint", "slots")
TAG_SCHEMES = ("io", "bio")
IGNORE = -100


class TagSet:
    """What the tag head predicts for BIO-tagged data.

    ``bio``: the tags themselves (``O``, ``B-time``, ``I-time``, …). ``io`` (the default): ``O``
    and one class per slot type, B- and I- sharing it; the BIO tags of a prediction are rebuilt
    by reading a run of words of one type as one value (so two values of one type that touch
    merge: 2 of SNIPS' 14,484 utterances have such a pair). Under DP each type's class then
    gets the signal of all its words: on the synthetic slots at ε = 8, slot F1 0.896 against
    BIO's 0.881 (3 noise seeds), 53 classes down to 27.
    """

    def __init__(self, tags: Sequence[str], scheme: str = "io"):
        if scheme not in TAG_SCHEMES:
            raise ConfigError(f"tag_scheme must be one of {', '.join(TAG_SCHEMES)}, got {scheme!r}.")
        self.tags, self.scheme = tuple(tags), scheme
        if scheme == "bio":
            self.classes = self.tags
        else:  # types in the order the tags name them first
            self.classes = ("O",) + tuple(dict.fromkeys(t[2:] for t in self.tags if t != "O"))
        self._id = {c: i for i, c in enumerate(self.classes)}

    def __contains__(self, tag: str) -> bool:
        return tag in self.tags

    def id(self, tag: str) -> int:
        """The class id of a BIO tag."""
        return self._id[tag if self.scheme == "bio" or tag == "O" else tag[2:]]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """BIO tags of one utterance's predicted class ids."""
        if self.scheme == "bio":
            return [self.classes[i] for i in ids]
        out, previous = [], "O"
        for i in ids:
            c = self.classes[i]
            out.append("O" if c == "O" else ("I-" if c == previous else "B-") + c)
            previous = c
        return out


def tag_set(tags) -> "TagSet":
    """``tags`` as a :class:`TagSet` (a plain list of tags is read as ``bio``)."""
    return tags if isinstance(tags, TagSet) else TagSet(tags, "bio")


@dataclass
class JointOutput:
    loss: torch.Tensor | None
    intent_logits: torch.Tensor | None
    tag_logits: torch.Tensor


class JointIntentSlotModel(nn.Module):
    """Encoder + intent head (pooled) + tag head (per token); see the module docstring."""

    def __init__(self, encoder: nn.Module, num_intents: int, num_tags: int, *, task: str = "joint",
                 pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling must be cls or mean, got {pooling!r}.")
        self.encoder, self.task, self.pooling = encoder, task, pooling
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused: the intent head reads the [CLS] state itself
        hidden = encoder.config.hidden_size
        self.config = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.intent_head = nn.Linear(hidden, num_intents) if task == "joint" else None
        self.tag_head = nn.Linear(hidden, num_tags)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def forward(self, input_ids=None, attention_mask=None, labels=None, tag_labels=None,
                **kwargs) -> JointOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **kwargs).last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        intent_logits = self.intent_head(self.dropout(pooled)) if self.intent_head is not None else None
        tag_logits = self.tag_head(self.dropout(states))
        loss = None
        if tag_labels is not None:
            loss = per_utterance_loss(intent_logits, tag_logits, labels, tag_labels).mean()
        return JointOutput(loss=loss, intent_logits=intent_logits, tag_logits=tag_logits)


def per_utterance_loss(intent_logits, tag_logits, labels, tag_labels) -> torch.Tensor:
    """ℓ_i for every utterance of the batch (module docstring): [B]."""
    per_token = nn.functional.cross_entropy(
        tag_logits.transpose(1, 2), tag_labels.clamp(min=0), reduction="none")  # [B, T]
    labelled = (tag_labels != IGNORE).to(per_token.dtype)
    words = labelled.sum(1).clamp(min=1.0)
    loss = (per_token * labelled).sum(1) / words
    if intent_logits is not None:
        if labels is None:
            raise ConfigError("a joint model needs intent labels with its tag labels.")
        loss = loss + nn.functional.cross_entropy(intent_logits, labels, reduction="none")
    return loss


def align(tokenizer, words: Sequence[Sequence[str]], tags: Sequence[Sequence[int]] | None,
          max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each utterance's words (``is_split_into_words``) and the tag id of each
    word on its first sub-token, -100 elsewhere. Words cut off by ``max_length`` lose their tags
    (the metrics then count their slots as missed). Needs a fast tokenizer (``word_ids``);
    RoBERTa-style tokenizers need ``add_prefix_space=True``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("slot alignment needs a fast tokenizer (one with word_ids()).")
    enc = tokenizer([list(w) for w in words], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    ids, labels = [], []
    for i in range(len(words)):
        word_ids = enc.word_ids(i)
        row, previous = [], None
        for w in word_ids:
            if w is None or w == previous:
                row.append(IGNORE)
            else:
                row.append(int(tags[i][w]) if tags is not None else 0)
            previous = w
        ids.append(list(enc["input_ids"][i]))
        labels.append(row)
    return ids, labels


def collate(ids: Sequence[Sequence[int]], tag_labels: Sequence[Sequence[int]],
            intents: Sequence[int] | None, pad: int, index: Sequence[int]) -> dict[str, torch.Tensor]:
    """Right-padded tensors of the utterances ``index``."""
    rows = [ids[i] for i in index]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tags = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for j, i in enumerate(index):
        n = len(ids[i])
        input_ids[j, :n] = torch.as_tensor(ids[i])
        mask[j, :n] = 1
        tags[j, :n] = torch.as_tensor(tag_labels[i])
    batch = {"input_ids": input_ids, "attention_mask": mask, "tag_labels": tags}
    if intents is not None:
        batch["labels"] = torch.as_tensor([intents[i] for i in index], dtype=torch.long)
    return batch


def word_predictions(tag_logits: torch.Tensor, tag_labels: torch.Tensor) -> list[list[int]]:
    """Per utterance, the predicted tag id of each word that kept its first sub-token."""
    best = tag_logits.argmax(-1)
    return [best[i][tag_labels[i] != IGNORE].tolist() for i in range(best.shape[0])]
