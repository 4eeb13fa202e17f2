"""Audit canaries: make them, flip a fair coin for each, and add the winners to the training set.

The one-run audit (Steinke, Nasr, Jagielski 2023) needs m examples whose membership is decided by
independent fair coins that the auditor knows and the mechanism does not: canary i is in the
training set with probability ½, independently of every other canary and of the training run.

Canaries come from :func:`dptrain.synthetic.audit_canaries`: random sequences of 6 to 10 words
from :data:`~dptrain.synthetic.CANARY_WORDS` with uniformly random labels, so that a model gets a
canary's label "right" more often than chance only by memorizing that canary. Their texts are
public and deterministic (``text_seed``); only the coins are secret. A canary that coincides with
a text of the data (any split, compared case- and space-insensitively, as an uncased tokenizer
sees it) is skipped and replaced by the next one the generator makes.

The coins come from their own generator: OS entropy by default, or ``seed`` for reproducible
experiments. A seeded generator is built from ``SeedSequence(seed, spawn_key=...)`` with a key
of its own, so the same integer passed as ``--dp-seed`` (batch sampling, noise) or as the
audit's tie-break seed draws unrelated numbers: coins that replayed the batch sampler's draws
would correlate membership with which batches a canary joins.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import numpy as np

from dptrain.data import IntentData, Split
from dptrain.errors import ConfigError

_COIN_TAG = 0x636F696E  # "coin": a spawn key that neither SeedSequence.spawn nor attacks.audit use


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True)
class CanarySet:
    """The m audit canaries of one audit and the coins that decided their membership.

    Attributes:
      texts: the m canary texts, in canary order (canary i is ``texts[i]``).
      labels: their label ids (indices into the data's ``label_names``), read-only int64.
      included: read-only boolean vector; ``included[i]`` is True iff canary i was added to the
        training set.
      num_natural: N, the size of the natural training split the canaries were added to.
      seed: the seed of the coins, or None when they came from OS entropy.
      text_seed: the seed of :func:`~dptrain.synthetic.audit_canaries` (texts and labels).
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    included: np.ndarray
    num_natural: int
    seed: int | None
    text_seed: int

    def __post_init__(self) -> None:
        texts = tuple(self.texts)
        labels = np.asarray(self.labels, dtype=np.int64)
        included = np.asarray(self.included)
        if included.dtype != bool:
            raise ConfigError(f"included must be a boolean vector, got dtype {included.dtype}.")
        if not (len(texts) == labels.shape[0] == included.shape[0]) or labels.ndim != 1:
            raise ConfigError(
                f"a CanarySet needs one label and one coin per text, got {len(texts)} texts, "
                f"{labels.shape} labels and {included.shape} coins."
            )
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", _frozen(labels))
        object.__setattr__(self, "included", _frozen(included))

    @property
    def m(self) -> int:
        """Number of canaries, included or not."""
        return len(self.texts)

    @property
    def num_included(self) -> int:
        return int(np.count_nonzero(self.included))

    @property
    def member_ids(self) -> np.ndarray:
        """Population ids of the augmented training set, in its order, for ``train_run``.

        Natural training examples are 0..N−1 and canary i is N + i; the augmented training split
        is the natural one followed by the included canaries in canary order, so the ids are
        ``[0, …, N−1] + [N + i for each included i]``.
        """
        natural = np.arange(self.num_natural, dtype=np.int64)
        return np.concatenate([natural, self.num_natural + np.flatnonzero(self.included)])

    @property
    def seed_policy(self) -> str:
        """How the coins were drawn, in words (for reports)."""
        if self.seed is None:
            return "operating-system entropy (not reproducible, as it should be for a real audit)"
        return f"seeded with {self.seed} (reproducible experiments only)"

    def to_dict(self) -> dict[str, Any]:
        """Everything about the canaries, JSON-ready: texts, labels, coins, seeds."""
        return {
            "m": self.m,
            "num_included": self.num_included,
            "num_natural": self.num_natural,
            "texts": list(self.texts),
            "labels": self.labels.tolist(),
            "included": self.included.tolist(),
            "seed": self.seed,
            "text_seed": self.text_seed,
        }


def inclusion_coins(m: int, seed: int | None) -> np.ndarray:
    """m independent fair coins (True = include), from OS entropy or a dedicated seeded stream.

    >>> inclusion_coins(8, 3).tolist() == inclusion_coins(8, 3).tolist()
    True
    """
    entropy = secrets.randbits(128) if seed is None else int(seed)
    rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(_COIN_TAG,)))
    return rng.random(m) < 0.5


def make_canaries(
    data: IntentData, m: int, text_seed: int = 0
) -> tuple[tuple[str, ...], np.ndarray]:
    """m canary texts and label ids that collide with no text of ``data`` (any split)."""
    from dptrain.synthetic import audit_canaries

    taken = {_normalize(t) for split in data.splits.values() for t in split.texts}
    label_id = {name: i for i, name in enumerate(data.label_names)}
    texts: list[str] = []
    labels: list[int] = []
    want = m
    while len(texts) < m:
        # audit_canaries(want) extends audit_canaries(want − k): ask for more until m survive.
        texts, labels, seen = [], [], set()
        for text, label in audit_canaries(want, data.label_names, text_seed):
            key = _normalize(text)
            if key in taken or key in seen:
                continue
            seen.add(key)
            texts.append(text)
            labels.append(label_id[label])
            if len(texts) == m:
                break
        want += m - len(texts)
    return tuple(texts), np.asarray(labels, dtype=np.int64)


def insert_canaries(
    data: IntentData, m: int, seed: int | None = None, *, text_seed: int = 0
) -> tuple[IntentData, CanarySet]:
    """Make m audit canaries, include each with probability ½, and append the included ones.

    Args:
      data: the natural data; only its training split changes.
      m: number of canaries, an integer >= 2.
      seed: seed of the inclusion coins; None (the default) draws them from OS entropy. Either
        way they are independent of training's randomness (see the module docstring).
      text_seed: seed of the canary texts and labels (public; default 0).

    Returns:
      (the data with the included canaries appended to its training split in canary order, the
      :class:`CanarySet`). Pass ``canaries.member_ids`` to ``train_run`` so that members.json
      records which canaries were in.
    """
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2:
        raise ConfigError(f"the number of canaries must be an integer >= 2, got {m!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ConfigError(f"the canary seed must be an integer or None, got {seed!r}.")
    m = int(m)
    texts, labels = make_canaries(data, m, text_seed)
    included = inclusion_coins(m, seed)
    idx = np.flatnonzero(included)
    train = Split(
        data.train.texts + tuple(texts[i] for i in idx),
        np.concatenate([data.train.labels, labels[idx]]),
    )
    augmented = dataclasses.replace(
        data, train=train, source=f"{data.source} + {idx.size} of {m} audit canaries"
    )
    canaries = CanarySet(
        texts=texts, labels=labels, included=included, num_natural=len(data.train),
        seed=None if seed is None else int(seed), text_seed=int(text_seed),
    )
    return augmented, canaries


_TAGS_TAG = 0x74616773  # "tags": the canary tags' own stream, apart from the coins and texts


def canary_utterances(canaries: CanarySet, intents, slot_types) -> tuple:
    """The m canaries as tagged utterances for joint/slot models: the canary's words, its intent
    (``intents[label]``) and on every word ``B-`` of a uniformly random slot type of the data,
    so that a model predicts a canary's tags, like its intent, better than chance only by
    memorizing that canary. Public and deterministic (``text_seed``), like the texts."""
    from dptrain.slot_data import Utterance

    if not slot_types:
        raise ConfigError("audit canaries for a slot model need the data to have slot types.")
    rng = np.random.default_rng(np.random.SeedSequence(int(canaries.text_seed),
                                                       spawn_key=(_TAGS_TAG,)))
    out = []
    for text, label in zip(canaries.texts, canaries.labels):
        words = tuple(text.split())
        picks = rng.integers(0, len(slot_types), len(words))
        out.append(Utterance(words, tuple(f"B-{slot_types[int(k)]}" for k in picks),
                             str(intents[int(label)])))
    return tuple(out)
