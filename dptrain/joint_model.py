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
    """``tag_logits``: what the model predicts (with an intent-tag bias, given its own predicted
    intent); ``utterance_loss``: ℓ_i of each utterance [B] and ``loss`` their mean, when the
    labels are given (with an intent-tag bias, given the gold intent)."""
    loss: torch.Tensor | None
    intent_logits: torch.Tensor | None
    tag_logits: torch.Tensor
    utterance_loss: torch.Tensor | None = None


class JointIntentSlotModel(nn.Module):
    """Encoder + intent head (pooled) + tag head (per token); see the module docstring.

    ``tag_layers`` = k: the tag head reads the mean of the encoder's last k hidden states (the
    intent head always pools the last one). ``intent_tag_bias`` (task joint): a learned bias
    b[intent, tag class] added to every word's tag logits, with the gold intent in the loss and
    the predicted one when the model predicts (slot gating, Goo et al. 2018: which slot types an
    intent takes). Each is a function of the utterance alone, so ℓ_i stays per utterance.
    """

    def __init__(self, encoder: nn.Module, num_intents: int, num_tags: int, *, task: str = "joint",
                 pooling: str = "cls", dropout: float = 0.1, tag_layers: int = 1,
                 intent_tag_bias: bool = False):
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling must be cls or mean, got {pooling!r}.")
        states = encoder.config.num_hidden_layers + 1  # the embeddings' output and every layer's
        if isinstance(tag_layers, bool) or not isinstance(tag_layers, int) \
                or not 1 <= tag_layers <= states:
            raise ConfigError(f"tag_layers must be an integer in [1, {states}] (this encoder has "
                              f"{states} hidden states), got {tag_layers!r}.")
        if intent_tag_bias and task != "joint":
            raise ConfigError("an intent-tag bias needs an intent head: task joint.")
        self.encoder, self.task, self.pooling, self.tag_layers = encoder, task, pooling, tag_layers
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused: the intent head reads the [CLS] state itself
        hidden = encoder.config.hidden_size
        self.config = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.intent_head = nn.Linear(hidden, num_intents) if task == "joint" else None
        self.tag_head = nn.Linear(hidden, num_tags)
        self.intent_tag_bias = None
        if intent_tag_bias:
            self.intent_tag_bias = nn.Embedding(num_intents, num_tags)
            nn.init.zeros_(self.intent_tag_bias.weight)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def forward(self, input_ids=None, attention_mask=None, labels=None, tag_labels=None,
                **kwargs) -> JointOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=self.tag_layers > 1, **kwargs)
        states = out.last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.tag_layers > 1:
            states = torch.stack(out.hidden_states[-self.tag_layers:]).mean(0)
        return joint_heads(self, pooled, states, labels, tag_labels)


def joint_heads(heads: nn.Module, pooled: torch.Tensor, tag_states: torch.Tensor, labels=None,
                tag_labels=None) -> JointOutput:
    """The heads of a :class:`JointIntentSlotModel` (or of the
    :class:`~dptrain.features.JointFeatureHead` that shares them) on the pooled states [B, d]
    and the states the tag head reads [B, T, d]."""
    intent_logits = (heads.intent_head(heads.dropout(pooled)) if heads.intent_head is not None
                     else None)
    tag_logits = heads.tag_head(heads.dropout(tag_states))
    bias = heads.intent_tag_bias
    utterance_loss = None
    if tag_labels is not None:
        scored = tag_logits
        if bias is not None:
            if labels is None:
                raise ConfigError("a joint model needs intent labels with its tag labels.")
            scored = tag_logits + bias(labels).unsqueeze(1)
        utterance_loss = per_utterance_loss(intent_logits, scored, labels, tag_labels)
    if bias is not None:  # the prediction: given the predicted intent (no gradient: not trained)
        tag_logits = tag_logits + bias.weight.detach()[intent_logits.argmax(-1)].unsqueeze(1)
    return JointOutput(loss=None if utterance_loss is None else utterance_loss.mean(),
                       intent_logits=intent_logits, tag_logits=tag_logits,
                       utterance_loss=utterance_loss)


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
