"""Slot-annotated utterances: what a voice assistant's NLU model learns ("set an alarm for
[7 am]time [tomorrow]date" → intent set_alarm, slots time and date).

An utterance is a list of words, one BIO tag per word (``O``; ``B-type`` opens a slot value,
``I-type`` continues it; Ramshaw & Marcus 1995) and an intent. Formats read by
:func:`load_slot_data`:

* ``synthetic``: the built-in intents with their slot fillers annotated
  (:func:`generate_slot_utterances`), so tests and the demo need nothing external;
* JSON Lines: ``{"tokens": [...], "tags": [...], "intent": "...", "split": "train"}`` (split
  optional);
* CoNLL-style columns (``.conll``/``.bio``/``.txt``): one word per line, its tag in the last
  column, a blank line between utterances; ``# intent = X`` (and optionally ``# split = test``)
  on comment lines before each utterance;
* a directory written by ``datasets``' ``save_to_disk`` with ``tokens``, ``tags`` (strings or a
  ``ClassLabel`` sequence) and ``intent`` columns (a ``DatasetDict`` gives the splits);
* the SNIPS NLU benchmark layout (a directory of ``train_<Intent>_full.json`` /
  ``validate_<Intent>.json``, or one such file): chunks of text, those with an ``entity`` being
  slot values. A file that is not UTF-8 is read as Windows-1252 with a warning (one SNIPS file is).

Checks, each one clear line (:class:`~dptrain.errors.DataError`): a tag count that differs from
the word count, a malformed tag, an ``I-`` tag that continues no slot of its type, an empty
utterance, a tag or intent in validation/test that train never has. Missing validation/test
splits are held out reproducibly, stratified by intent; a held-out utterance with a tag that
train would lack goes back to train.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .data import _SPLIT_ALIASES, _canonical_split
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_TAG = re.compile(r"O|[BI]-\S+")


@dataclass(frozen=True)
class Utterance:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    intent: str


@dataclass(frozen=True)
class SlotData:
    """Three splits of utterances with the intent and tag vocabularies of train (sorted; ``O``
    first among tags)."""

    train: tuple[Utterance, ...]
    validation: tuple[Utterance, ...]
    test: tuple[Utterance, ...]
    intents: tuple[str, ...]
    tags: tuple[str, ...]
    source: str

    @property
    def splits(self) -> dict[str, tuple[Utterance, ...]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}

    @property
    def label_names(self) -> tuple[str, ...]:
        """The intents (the class names of the intent head)."""
        return self.intents

    @property
    def slot_types(self) -> tuple[str, ...]:
        return tuple(sorted({t[2:] for t in self.tags if t != "O"}))


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The slot values of a valid BIO sequence as (type, start, end) word spans, end exclusive.

    >>> spans(["O", "B-time", "I-time", "B-date", "O"])
    [('time', 1, 3), ('date', 3, 4)]
    """
    out, open_ = [], None
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and open_ is not None and open_[0] == tag[2:]:
            continue
        if open_ is not None:
            out.append((open_[0], open_[1], i))
            open_ = None
        if tag.startswith(("B-", "I-")):  # an I- here only in model predictions: it opens a span
            open_ = (tag[2:], i)
    if open_ is not None:
        out.append((open_[0], open_[1], len(tags)))
    return out


def check_utterance(tokens: Sequence, tags: Sequence, intent, where: str) -> Utterance:
    """One utterance, checked: words and tags as strings, equally many, valid BIO."""
    if not isinstance(tokens, (list, tuple)) or not tokens:
        raise DataError(f"{where}: the utterance has no words.")
    if not isinstance(tags, (list, tuple)):
        raise DataError(f"{where}: tags must be a list, got {type(tags).__name__}.")
    if len(tags) != len(tokens):
        raise DataError(f"{where}: {len(tags)} tags for {len(tokens)} words.")
    if not all(isinstance(t, str) and t.strip() and not any(c.isspace() for c in t) for t in tokens):
        raise DataError(f"{where}: every word must be a non-empty string without spaces.")
    if not isinstance(intent, str) or not intent.strip():
        raise DataError(f"{where}: the utterance has no intent.")
    previous = "O"
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise DataError(f"{where}: tag {tag!r} of word {i} is not O, B-type or I-type.")
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            raise DataError(f"{where}: tag {tag} of word {i} ({tokens[i]!r}) continues no "
                            f"{tag[2:]} slot (the word before is tagged {previous}).")
        previous = tag
    return Utterance(tuple(tokens), tuple(tags), intent.strip())


# ---------------------------------------------------------------------------------------------
# The synthetic intents, with their slots annotated
# ---------------------------------------------------------------------------------------------
def generate_slot_utterances(n_per_intent: int = 120, seed: int = 0) -> list[Utterance]:
    """The synthetic intents (:mod:`dptrain.synthetic`) as annotated utterances: every filled
    ``{slot}`` becomes a B-/I- span of its type, everything else is ``O``; punctuation is a word
    of its own. Distinct utterances, shuffled, the same for the same seed."""
    from . import synthetic as syn

    if isinstance(n_per_intent, bool) or not isinstance(n_per_intent, int) or n_per_intent < 1:
        raise ConfigError(f"n_per_intent must be an integer >= 1, got {n_per_intent!r}.")
    rng = random.Random(f"dptrain.slot_data.synthetic:{seed}")
    seen: set[tuple[str, ...]] = set()
    out: list[Utterance] = []
    for intent in syn.INTENTS:
        made = 0
        for _ in range(50 * n_per_intent):
            if made == n_per_intent:
                break
            tokens, tags = _fill_tagged(rng.choice(syn._INTENT_TEMPLATES[intent]), rng)
            tokens, tags = _noise_tagged(tokens, tags, rng)
            if tuple(tokens) in seen:
                continue
            seen.add(tuple(tokens))
            out.append(Utterance(tuple(tokens), tuple(tags), intent))
            made += 1
    rng.shuffle(out)
    return out


def _words(text: str) -> list[str]:
    """Words with sentence punctuation split off: "paris?" → ["paris", "?"]."""
    return re.findall(r"[^\s?!.,]+(?:[.,][^\s?!.,]+)*|[?!.,]", text)


def _fill_tagged(template: str, rng: random.Random) -> tuple[list[str], list[str]]:
    from .synthetic import _FILLERS, _SLOT

    tokens, tags, at = [], [], 0
    for match in _SLOT.finditer(template):
        literal = _words(template[at:match.start()])
        tokens += literal
        tags += ["O"] * len(literal)
        value = _words(rng.choice(_FILLERS[match.group(1)]))
        tokens += value
        tags += [f"B-{match.group(1)}"] + [f"I-{match.group(1)}"] * (len(value) - 1)
        at = match.end()
    literal = _words(template[at:])
    return tokens + literal, tags + ["O"] * len(literal)


def _noise_tagged(tokens: list[str], tags: list[str], rng: random.Random):
    from .synthetic import _PREFIXES, _SUFFIXES

    if rng.random() < 0.3:
        prefix = _words(rng.choice(_PREFIXES))
        tokens, tags = prefix + tokens, ["O"] * len(prefix) + tags
    if rng.random() < 0.2:
        suffix = _words(rng.choice(_SUFFIXES))
        tokens, tags = tokens + suffix, tags + ["O"] * len(suffix)
    if rng.random() < 0.15:
        tokens, tags = tokens + ["?" if rng.random() < 0.7 else "."], tags + ["O"]
    casing = rng.random()
    if casing < 0.2:
        tokens = [tokens[0][:1].upper() + tokens[0][1:]] + tokens[1:]
    elif casing < 0.25:
        tokens = [t[:1].upper() + t[1:] for t in tokens]
    elif casing < 0.27:
        tokens = [t.upper() for t in tokens]
    return tokens, tags


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        log.warning("%s is not UTF-8 (byte %d); reading it as Windows-1252", path, exc.start)
        return data.decode("cp1252", errors="replace")


def _read_jsonl(path: Path) -> dict[str | None, list[Utterance]]:
    out: dict[str | None, list[Utterance]] = {}
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg}).") from None
        if not isinstance(row, dict) or not {"tokens", "tags", "intent"} <= set(row):
            raise DataError(f"{where}: needs the keys tokens, tags and intent.")
        split = _canonical_split(row["split"], where) if "split" in row else None
        out.setdefault(split, []).append(check_utterance(row["tokens"], row["tags"], row["intent"], where))
    return out


def _read_conll(path: Path) -> dict[str | None, list[Utterance]]:
    out: dict[str | None, list[Utterance]] = {}
    tokens, tags, meta = [], [], {}

    def flush(number: int) -> None:
        nonlocal tokens, tags, meta
        if tokens:
            where = f"{path}, utterance ending at line {number}"
            split = _canonical_split(meta["split"], where) if "split" in meta else None
            out.setdefault(split, []).append(
                check_utterance(tokens, tags, meta.get("intent"), where))
        elif meta:
            raise DataError(f"{path}, line {number}: comment lines with no utterance after them.")
        tokens, tags, meta = [], [], {}

    lines = _read_text(path).splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            flush(number)
            continue
        if line.startswith("#"):
            if tokens:
                flush(number)
            key, sep, value = line[1:].partition("=") if "=" in line else line[1:].partition(":")
            if sep and key.strip() in ("intent", "split"):
                meta[key.strip()] = value.strip()
            continue
        columns = line.split()
        if len(columns) < 2:
            raise DataError(f"{path}, line {number}: a word and its tag are needed, got {line!r}.")
        tokens.append(columns[0])
        tags.append(columns[-1])
    flush(len(lines) + 1)
    return out


def _read_snips_file(path: Path) -> list[Utterance]:
    try:
        raw = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON ({exc.msg}).") from None
    if not isinstance(raw, dict) or len(raw) != 1:
        raise DataError(f"{path}: a SNIPS file holds one intent as {{\"Intent\": [...]}}.")
    (intent, items), = raw.items()
    out = []
    for n, item in enumerate(items):
        where = f"{path}, utterance {n}"
        tokens, tags = [], []
        for chunk in item.get("data", []) if isinstance(item, dict) else []:
            words = str(chunk.get("text", "")).split()
            entity = chunk.get("entity")
            tokens += words
            tags += ["O"] * len(words) if not entity else (
                [f"B-{entity}"] + [f"I-{entity}"] * (len(words) - 1))[:len(words)]
        out.append(check_utterance(tokens, tags, intent, where))
    return out


def _read_snips(path: Path) -> dict[str | None, list[Utterance]]:
    files = [path] if path.is_file() else sorted(path.glob("*.json"))
    out: dict[str | None, list[Utterance]] = {}
    for f in files:
        split = "validation" if f.name.startswith("validate_") else (
            "test" if f.name.startswith("test_") else "train")
        out.setdefault(split, []).extend(_read_snips_file(f))
    if not out:
        raise DataError(f"{path} holds no SNIPS files (train_<Intent>_full.json, validate_<Intent>.json).")
    return out


def _read_hf(path: Path) -> dict[str | None, list[Utterance]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path} is not a dataset saved with save_to_disk: {exc}") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    out: dict[str | None, list[Utterance]] = {}
    for name, ds in parts:
        missing = {"tokens", "tags", "intent"} - set(ds.column_names)
        if missing:
            raise DataError(f"{path}: columns {sorted(missing)} are missing (has {ds.column_names}).")
        tag_feature = ds.features["tags"]
        tag_names = getattr(getattr(tag_feature, "feature", None), "names", None)
        intent_names = getattr(ds.features["intent"], "names", None)
        split = _SPLIT_ALIASES.get(name) if name is not None else None
        if name is not None and split is None:
            log.warning("%s: split %r ignored (not train, validation or test)", path, name)
            continue
        for i, row in enumerate(ds):
            tags = [tag_names[t] for t in row["tags"]] if tag_names else row["tags"]
            intent = intent_names[row["intent"]] if intent_names else row["intent"]
            out.setdefault(split, []).append(
                check_utterance(row["tokens"], tags, intent, f"{path}, {name or 'dataset'} row {i}"))
    return out


def load_slot_data(source: str | Path, *, seed: int = 0, synthetic_per_intent: int = 120,
                   validation_fraction: float = 0.1, test_fraction: float = 0.1) -> SlotData:
    """Read ``source`` (see the module docstring) into three checked splits."""
    if str(source) == "synthetic":
        raw = {None: generate_slot_utterances(synthetic_per_intent, seed)}
        shown = "synthetic"
    else:
        path, shown = Path(source), str(source)
        if not path.exists():
            raise DataError(f"slot data {shown!r} not found.")
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
                raw = _read_hf(path)
            else:
                raw = _read_snips(path)
        elif path.suffix.lower() == ".jsonl":
            raw = _read_jsonl(path)
        elif path.suffix.lower() in (".conll", ".bio", ".txt"):
            raw = _read_conll(path)
        elif path.suffix.lower() == ".json":
            raw = _read_snips(path)
        else:
            raise DataError(f"format of {shown} must be .jsonl, .conll/.bio/.txt, a SNIPS .json or "
                            "directory, or a save_to_disk directory.")
    if None in raw and len(raw) > 1:
        raise DataError(f"{shown}: some utterances name a split and others do not; all or none.")
    splits = _assemble_splits(raw, seed, validation_fraction, test_fraction)
    train = splits["train"]
    if not train:
        raise DataError(f"{shown}: the training split is empty.")
    intents = tuple(sorted({u.intent for u in train}))
    tags = ("O",) + tuple(sorted({t for u in train for t in u.tags} - {"O"}))
    for name in ("validation", "test"):
        for i, u in enumerate(splits[name]):
            if u.intent not in intents:
                raise DataError(f"{shown}: intent {u.intent!r} of {name} utterance {i} never "
                                "occurs in train.")
            unknown = [t for t in u.tags if t not in tags]
            if unknown:
                raise DataError(f"{shown}: tag {unknown[0]} of {name} utterance {i} never occurs "
                                "in train.")
    return SlotData(train=tuple(train), validation=tuple(splits["validation"]),
                    test=tuple(splits["test"]), intents=intents, tags=tags, source=shown)


def _assemble_splits(raw, seed: int, validation_fraction: float, test_fraction: float):
    if None in raw:
        pool, given = list(raw[None]), {}
    else:
        pool, given = list(raw.get("train", [])), raw
    splits = {"train": pool, "validation": list(given.get("validation", [])),
              "test": list(given.get("test", []))}
    missing = [name for name in ("validation", "test") if not splits[name]]
    if missing:
        rng = random.Random(f"dptrain.slot_data.holdout:{seed}")
        by_intent: dict[str, list[Utterance]] = {}
        for u in pool:
            by_intent.setdefault(u.intent, []).append(u)
        keep = []
        fractions = {"validation": validation_fraction, "test": test_fraction}
        for intent in sorted(by_intent):
            group = by_intent[intent]
            rng.shuffle(group)
            at = 0
            for name in missing:
                k = int(round(fractions[name] * len(group)))
                if len(group) - at - k < 1:
                    k = 0
                splits[name] += group[at:at + k]
                at += k
            keep += group[at:]
        # a held-out utterance with a tag train never has goes back to train (rare slot values)
        seen = {t for u in keep for t in u.tags}
        for name in missing:
            back = [u for u in splits[name] if not set(u.tags) <= seen]
            while back:
                keep += back
                seen |= {t for u in back for t in u.tags}
                splits[name] = [u for u in splits[name] if u not in back]
                back = [u for u in splits[name] if not set(u.tags) <= seen]
        splits["train"] = keep
    return splits


def write_jsonl(path: Path, utterances: Iterable[Utterance], split: str | None = None) -> None:
    """Utterances as JSON Lines in the format :func:`load_slot_data` reads."""
    with open(path, "w", encoding="utf-8") as f:
        for u in utterances:
            row = {"tokens": list(u.tokens), "tags": list(u.tags), "intent": u.intent}
            if split is not None:
                row["split"] = split
            f.write(json.dumps(row) + "\n")


def as_intent_data(data: SlotData):
    """The same utterances as texts (words joined by spaces) labelled by their intents: the view
    that fingerprints, audit canaries and attack populations read (tags left out)."""
    import numpy as np

    from .data import IntentData, Split

    ids = {name: i for i, name in enumerate(data.intents)}
    splits = {name: Split(tuple(" ".join(u.tokens) for u in part),
                          np.asarray([ids[u.intent] for u in part], dtype=np.int64))
              for name, part in data.splits.items()}
    return IntentData(**splits, label_names=tuple(data.intents), source=data.source)
