"""Intent data in every format a user has, checked once, split reproducibly, tokenized and batched.

:func:`load_intent_data` reads

- ``"synthetic"``: the built-in dataset of :mod:`dptrain.synthetic`;
- ``.csv`` and ``.tsv`` files with a header row (``.tsv`` files are read without quoting, as
  GLUE-style files are written, so quote characters in texts are kept as they are);
- ``.jsonl`` files, one JSON object per line;
- ``.json`` files in the CLINC150 layout, ``{"train": [[text, label], ...], "val": [...],
  "test": [...]}``, or a list of objects like the lines of a ``.jsonl`` file;
- directories written by Hugging Face ``datasets``' ``save_to_disk`` (a ``DatasetDict`` or a
  single ``Dataset``).

Rows in CSV, TSV, JSON Lines and lists of objects may carry a ``split`` column whose values are
``train``, ``validation`` (or ``val``, ``valid``, ``dev``) and ``test``. Splits a source lacks are
made from its training rows by :func:`stratified_holdout`, reproducibly by seed.

Labels may be strings or integers; the result always names them: ``label_names[i]`` is the name of
label id ``i``. Every problem with the data raises :class:`~dptrain.errors.DataError` with a
one-line message that says what is wrong, what is allowed and what came in.

Then :func:`encode` tokenizes a split once (truncated, with special tokens, unpadded) and
:func:`collate` pads any subset of it to its longest member, for Poisson-sampled batches of any
size, the empty one included.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import numbers
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from dptrain.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
"""The source name of the built-in synthetic dataset."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The canonical split names, in order."""

SPLIT_COLUMN = "split"
"""The optional column of CSV, TSV and JSON Lines rows that assigns each row to a split."""

_SPLIT_ALIASES: Mapping[str, str] = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "validate": "validation",  # SNIPS' name
    "test": "test",
}
_ALLOWED_SPLITS = "train, validation (or val, valid, dev, validate), test"
_ALLOWED_SOURCES = (
    "a .csv, .tsv, .jsonl or .json file, a directory written by datasets' save_to_disk, "
    f"or {SYNTHETIC!r}"
)
_CLINC_OUT_OF_SCOPE = "oos"
_INT_LABEL = re.compile(r"[+-]?\d+")


# ---------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------
def _frozen_int64(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0:
        array = array.astype(np.int64).reshape(0)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"{what} must be a 1-D array of integers, got shape {array.shape} of {array.dtype}."
        )
    array = array.astype(np.int64, copy=True)
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class Split:
    """One split: texts and their integer label ids, aligned; ``labels`` is read-only int64."""

    texts: tuple[str, ...]
    labels: np.ndarray

    def __post_init__(self) -> None:
        texts = tuple(self.texts)
        if not all(isinstance(text, str) for text in texts):
            raise DataError("texts of a Split must all be strings, got another type.")
        labels = _frozen_int64(self.labels, "labels of a Split")
        if len(labels) != len(texts):
            raise DataError(
                f"a Split needs one label per text, got {len(texts)} texts and "
                f"{len(labels)} labels."
            )
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.texts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        return self.texts == other.texts and np.array_equal(self.labels, other.labels)

    def __hash__(self) -> int:
        return hash((self.texts, self.labels.tobytes()))


@dataclass(frozen=True)
class IntentData:
    """Three splits and the label names: ``label_names[i]`` names label id ``i``."""

    train: Split
    validation: Split
    test: Split
    label_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        names = tuple(self.label_names)
        if len(set(names)) != len(names):
            raise DataError(f"label_names must be distinct, got {list(names)}.")
        object.__setattr__(self, "label_names", names)
        for name, split in self.splits.items():
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(names)):
                raise DataError(
                    f"label ids of the {name} split must be in [0, {len(names)}), got "
                    f"{int(split.labels.min())} to {int(split.labels.max())}."
                )

    @property
    def splits(self) -> dict[str, Split]:
        """The splits by canonical name, in the order train, validation, test."""
        return {"train": self.train, "validation": self.validation, "test": self.test}

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class EncodedSplit:
    """A tokenized split: unpadded token ids (with special tokens), label ids and lengths."""

    input_ids: tuple[list[int], ...]
    labels: np.ndarray
    lengths: np.ndarray = field(default=None)  # type: ignore[assignment]  # computed when omitted

    def __post_init__(self) -> None:
        input_ids = tuple(self.input_ids)
        labels = _frozen_int64(self.labels, "labels of an EncodedSplit")
        lengths = [len(ids) for ids in input_ids] if self.lengths is None else self.lengths
        lengths = _frozen_int64(lengths, "lengths of an EncodedSplit")
        if not len(input_ids) == len(labels) == len(lengths):
            raise DataError(
                f"an EncodedSplit needs one label and one length per sequence, got "
                f"{len(input_ids)} sequences, {len(labels)} labels and {len(lengths)} lengths."
            )
        if any(len(ids) != n for ids, n in zip(input_ids, lengths.tolist(), strict=True)):
            raise DataError("lengths of an EncodedSplit must be the lengths of its input_ids.")
        object.__setattr__(self, "input_ids", input_ids)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "lengths", lengths)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncodedSplit):
            return NotImplemented
        return self.input_ids == other.input_ids and np.array_equal(self.labels, other.labels)

    def __hash__(self) -> int:
        return hash((tuple(map(tuple, self.input_ids)), self.labels.tobytes()))


# ---------------------------------------------------------------------------------------------
# Row checks shared by the readers
# ---------------------------------------------------------------------------------------------
def _show(value: object, limit: int = 40) -> str:
    """A short one-line rendering of a value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_text(text: object, where: str) -> str:
    if not isinstance(text, str):
        raise DataError(
            f"text in {where} must be a string, got {type(text).__name__} {_show(text)}."
        )
    if not text.strip():
        raise DataError(f"text in {where} must not be empty, got {_show(text)}.")
    return text


def _check_label(label: object, where: str) -> str:
    """Return the label as a string; integers become their decimal form."""
    if not (isinstance(label, str) or _is_int(label)):
        raise DataError(
            f"label in {where} must be a string or an integer, got "
            f"{type(label).__name__} {_show(label)}."
        )
    if isinstance(label, str):
        if not label.strip():
            raise DataError(f"label in {where} must not be empty, got {_show(label)}.")
        return label
    return str(int(label))


def _canonical_split(value: object, where: str) -> str:
    name = _SPLIT_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if name is None:
        raise DataError(f"split in {where} must be one of {_ALLOWED_SPLITS}, got {_show(value)}.")
    return name


@dataclass
class _Raw:
    """What a reader found: (text, label-as-str) rows per canonical split, before any checking
    across splits. ``label_order`` is the dataset's own label order when it has one (ClassLabel)."""

    splits: dict[str, list[tuple[str, str]]]
    label_order: tuple[str, ...] | None = None


class _RowCollector:
    """Collects rows that may each name a split; all rows name one, or none does."""

    def __init__(self, shown: str) -> None:
        self.shown = shown
        self.rows: dict[str | None, list[tuple[str, str]]] = {}
        self.first_without: str | None = None
        self.first_with: str | None = None

    def add(self, text: object, label: object, split: object, where: str) -> None:
        text = _check_text(text, where)
        label = _check_label(label, where)
        if split is None:
            self.first_without = self.first_without or where
            name = None
        else:
            self.first_with = self.first_with or where
            name = _canonical_split(split, where)
        self.rows.setdefault(name, []).append((text, label))

    def finish(self) -> _Raw:
        if self.first_with and self.first_without:
            raise DataError(
                f"{self.first_without} has no {SPLIT_COLUMN!r} but {self.first_with} has one; "
                f"give every row of {self.shown} a split, or none."
            )
        if not self.rows:
            raise DataError(f"{self.shown} must hold at least one example, got none.")
        if None in self.rows:
            return _Raw({"train": self.rows[None]})
        return _Raw({name: rows for name, rows in self.rows.items() if name is not None})


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def _open_text(path: Path, shown: str) -> TextIO:
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DataError(f"{shown} cannot be read: {_one_line(exc.strerror or exc)}.") from exc


def _unicode_error(path: Path, shown: str, exc: UnicodeDecodeError) -> DataError:
    """Where the file stops being UTF-8: the decoder's offset is relative to its buffer, so
    find the first bad byte in the file itself (only on this error path)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
        start = exc.start  # pragma: no cover - the decoder found a bad byte, so the file has one
    except UnicodeDecodeError as whole:
        start = whole.start
    line = data.count(b"\n", 0, start) + 1
    return DataError(f"{shown} must be UTF-8 text, got byte {data[start]:#04x} at byte offset "
                     f"{start} (line {line}).")


def _read_delimited(path: Path, shown: str, text_column: str, label_column: str, tsv: bool) -> _Raw:
    if tsv:
        dialect: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None}
    else:
        dialect = {"delimiter": ",", "strict": True}
    kind = "TSV" if tsv else "CSV"
    collector = _RowCollector(shown)
    with _open_text(path, shown) as handle:
        reader = csv.reader(handle, **dialect)
        try:
            header = next((row for row in reader if row), None)
            if header is None:
                raise DataError(
                    f"{shown} must start with a header row naming the columns "
                    f"{text_column}, {label_column}, got an empty file."
                )
            header = [name.strip() for name in header]
            for column in (text_column, label_column):
                if column not in header:
                    raise DataError(
                        f"column {column!r} not found in {shown}; columns are: {', '.join(header)}."
                    )
            text_at, label_at = header.index(text_column), header.index(label_column)
            split_at = header.index(SPLIT_COLUMN) if SPLIT_COLUMN in header else None
            for row in reader:
                if not row:
                    continue
                where = f"line {reader.line_num} of {shown}"
                if len(row) != len(header):
                    raise DataError(
                        f"{where} must have {len(header)} fields like the header, got {len(row)}."
                    )
                split = None if split_at is None else row[split_at]
                collector.add(row[text_at], row[label_at], split, where)
        except csv.Error as exc:
            raise DataError(
                f"line {reader.line_num} of {shown} must be valid {kind}, got: {_one_line(exc)}."
            ) from exc
        except UnicodeDecodeError as exc:
            raise _unicode_error(path, shown, exc) from exc
    return collector.finish()


def _add_object(
    collector: _RowCollector, obj: object, where: str, text_column: str, label_column: str
) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where} must be a JSON object, got {type(obj).__name__} {_show(obj)}.")
    for column in (text_column, label_column):
        if column not in obj:
            raise DataError(
                f"column {column!r} not found in {where}; columns are: {', '.join(map(str, obj))}."
            )
    collector.add(obj[text_column], obj[label_column], obj.get(SPLIT_COLUMN), where)


def _read_jsonl(path: Path, shown: str, text_column: str, label_column: str) -> _Raw:
    collector = _RowCollector(shown)
    with _open_text(path, shown) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"line {number} of {shown}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{where} must be valid JSON, got an error at column {exc.colno}: "
                        f"{exc.msg}."
                    ) from exc
                _add_object(collector, obj, where, text_column, label_column)
        except UnicodeDecodeError as exc:
            raise _unicode_error(path, shown, exc) from exc
    return collector.finish()


def _read_json(path: Path, shown: str, text_column: str, label_column: str) -> _Raw:
    with _open_text(path, shown) as handle:
        try:
            content = handle.read()
        except UnicodeDecodeError as exc:
            raise _unicode_error(path, shown, exc) from exc
    try:
        document = json.loads(content)
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data":
            with contextlib.suppress(json.JSONDecodeError):
                if isinstance(json.loads(content.splitlines()[0]), dict):
                    hint = "; it looks like JSON Lines: name it .jsonl"
        raise DataError(
            f"{shown} must be valid JSON, got an error at line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}{hint}."
        ) from exc
    if isinstance(document, list):
        collector = _RowCollector(shown)
        for number, obj in enumerate(document):
            _add_object(collector, obj, f"item {number} of {shown}", text_column, label_column)
        return collector.finish()
    if not isinstance(document, dict):
        raise DataError(
            f"{shown} must hold an object with keys train, val, test (CLINC layout) or a list of "
            f"objects, got {type(document).__name__}."
        )
    splits: dict[str, list[tuple[str, str]]] = {}
    dropped = 0
    for key, items in document.items():
        if key.startswith("oos_"):
            dropped += len(items) if isinstance(items, list) else 0
            continue
        name = _SPLIT_ALIASES.get(key.lower())
        if name is None:
            raise DataError(
                f"key {key!r} in {shown} must be a split, one of {_ALLOWED_SPLITS}, or oos_*; "
                f"keys are: {', '.join(document)}."
            )
        if name in splits:
            raise DataError(f"{shown} must name each split once, got two keys for {name}.")
        if not isinstance(items, list):
            raise DataError(
                f"{key!r} in {shown} must be a list of [text, label] pairs, got "
                f"{type(items).__name__}."
            )
        rows: list[tuple[str, str]] = []
        for number, item in enumerate(items):
            where = f"item {number} of {key!r} in {shown}"
            if isinstance(item, dict):
                for column in (text_column, label_column):
                    if column not in item:
                        raise DataError(
                            f"column {column!r} not found in {where}; columns are: "
                            f"{', '.join(map(str, item))}."
                        )
                text, label = item[text_column], item[label_column]
            elif isinstance(item, list) and len(item) == 2:
                text, label = item
            else:
                raise DataError(f"{where} must be a [text, label] pair, got {_show(item)}.")
            text, label = _check_text(text, where), _check_label(label, where)
            if label == _CLINC_OUT_OF_SCOPE:
                dropped += 1
                continue
            rows.append((text, label))
        splits[name] = rows
    if "train" not in splits:
        keys = ", ".join(document) or "none"
        raise DataError(f"{shown} must have a 'train' key; keys are: {keys}.")
    if dropped:
        logger.info(
            "dropped %d out-of-scope (%r) examples of %s", dropped, _CLINC_OUT_OF_SCOPE, shown
        )
    return _Raw(splits)


def _read_hf(path: Path, shown: str, text_column: str, label_column: str) -> _Raw:
    import datasets  # heavy: only when a directory is loaded

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(
            f"{shown} must be a directory written by datasets' save_to_disk, got a directory "
            f"without a Dataset or DatasetDict in it."
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        parts: dict[str, Any] = {}
        for key, dataset in loaded.items():
            name = _SPLIT_ALIASES.get(key.lower())
            if name is None:
                logger.warning(
                    "ignoring split %r of %s: the splits used are %s", key, shown, _ALLOWED_SPLITS
                )
                continue
            if name in parts:
                raise DataError(f"{shown} must name each split once, got two splits for {name}.")
            parts[name] = dataset
        if "train" not in parts:
            found = ", ".join(loaded) or "none"
            raise DataError(f"{shown} must have a train split; splits are: {found}.")
    else:
        parts = {"train": loaded}

    raw = _Raw({})
    for name, dataset in parts.items():
        in_split = f"the {name} split of {shown}"
        for column in (text_column, label_column):
            if column not in dataset.column_names:
                raise DataError(
                    f"column {column!r} not found in {in_split}; columns are: "
                    f"{', '.join(dataset.column_names)}."
                )
        feature = dataset.features[label_column]
        names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        if names is not None and name == "train":
            raw.label_order = names
        rows: list[tuple[str, str]] = []
        for number, (text, label) in enumerate(
            zip(dataset[text_column], dataset[label_column], strict=True)
        ):
            where = f"row {number} of {in_split}"
            text = _check_text(text, where)
            if names is not None:
                if not _is_int(label) or not 0 <= label < len(names):
                    raise DataError(
                        f"label in {where} must be a class of its ClassLabel, 0 to "
                        f"{len(names) - 1}, got {_show(label)}."
                    )
                label = names[label]
            rows.append((text, _check_label(label, where)))
        raw.splits[name] = rows
    return raw


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------
def stratified_holdout(
    labels: Sequence[object], fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Split positions ``0 .. len(labels)-1`` into ``"train"`` and one holdout per fraction.

    Each holdout ``name`` gets ``max(1, round(fraction * n))`` positions, shared among the classes
    in proportion to their sizes (largest remainders first, ties broken by ``seed``), and every
    class keeps at least one position in train. So the holdouts are stratified whenever every
    class has enough examples, and a rare class stays in train rather than leaving it. Fewer
    positions are given when the classes cannot spare them (possibly none: the caller decides
    whether that is an error). Returns sorted index arrays, disjoint and covering all positions,
    the same for the same seed.

    >>> parts = stratified_holdout(["a"] * 8 + ["b"] * 2, {"test": 0.5}, seed=0)
    >>> len(parts["test"]), len(parts["train"])
    (5, 5)
    """
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse)
    n = len(inverse)
    room = counts - 1  # every class keeps one example in train
    takes: dict[str, np.ndarray] = {}
    for name, fraction in fractions.items():
        target = fraction * counts
        total = min(max(1, int(np.floor(fraction * n + 0.5))), int(room.sum()))
        take = np.minimum(np.floor(target).astype(np.int64), room)
        order = np.lexsort((rng.random(len(counts)), -(target - np.floor(target))))
        while take.sum() < total:
            for c in order:
                if take.sum() == total:
                    break
                if take[c] < room[c]:
                    take[c] += 1
        room = room - take
        takes[name] = take
    members: dict[str, list[np.ndarray]] = {name: [] for name in (*fractions, "train")}
    for c in range(len(counts)):
        positions = rng.permutation(np.flatnonzero(inverse == c))
        start = 0
        for name, take in takes.items():
            members[name].append(positions[start : start + take[c]])
            start += take[c]
        members["train"].append(positions[start:])
    return {
        name: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
        for name, parts in members.items()
    }


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ConfigError(f"{name} must be in (0, 1), got {value!r}.")
    return float(value)


def _label_names(train_labels: Iterable[str], order: tuple[str, ...] | None) -> tuple[str, ...]:
    present = set(train_labels)
    if order is not None:
        return tuple(name for name in order if name in present)
    if all(_INT_LABEL.fullmatch(label) for label in present):
        return tuple(sorted(present, key=lambda label: (int(label), label)))
    return tuple(sorted(present))


def _warn_near_duplicate_labels(names, shown: str) -> None:
    """Labels that differ only in case or surrounding spaces (``refund``, `` REFUND ``) are
    different classes, as written; almost always a typo, so say so (once, naming them)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(" ".join(str(name).split()).casefold(), []).append(str(name))
    clashes = [g for g in groups.values() if len(g) > 1]
    if clashes:
        shown_clashes = "; ".join(" / ".join(repr(n) for n in g) for g in clashes[:3])
        logger.warning("%s: labels that differ only in case or spaces are separate classes: %s%s",
                       shown, shown_clashes, " ..." if len(clashes) > 3 else "")


def _assemble(
    raw: _Raw, shown: str, seed: int, validation_fraction: float, test_fraction: float
) -> IntentData:
    splits = dict(raw.splits)
    if "train" not in splits:
        raise DataError(
            f"{shown} must have a train split, got only: {', '.join(splits) or 'no rows'}."
        )
    for name, rows in splits.items():
        if not rows:
            raise DataError(
                f"the {name} split of {shown} must hold at least one example, got none."
            )
    fractions = {
        name: fraction
        for name, fraction in (("validation", validation_fraction), ("test", test_fraction))
        if name not in splits
    }
    if fractions:
        train_rows = splits["train"]
        parts = stratified_holdout([label for _, label in train_rows], fractions, seed)
        for name in fractions:
            if len(parts[name]) == 0:
                raise DataError(
                    f"the {name} split cannot be made from the {len(train_rows)} training "
                    f"examples of {shown}: every class must have 2 or more, got one each."
                )
        splits.update({name: [train_rows[i] for i in index] for name, index in parts.items()})

    names = _label_names((label for _, label in splits["train"]), raw.label_order)
    _warn_near_duplicate_labels(names, shown)
    if len(names) < 2:
        raise DataError(
            f"{shown} must have at least 2 classes in train, got {len(names)}: "
            f"{_show(list(names), 80)}."
        )
    ids = {name: i for i, name in enumerate(names)}
    for split in ("validation", "test"):
        unknown = list(dict.fromkeys(label for _, label in splits[split] if label not in ids))
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise DataError(
                f"label {_show(unknown[0])}{more} appears in {split} but not in train in {shown}; "
                f"every label must have training examples."
            )
    built = {
        name: Split(
            tuple(text for text, _ in splits[name]),
            np.array([ids[label] for _, label in splits[name]], dtype=np.int64),
        )
        for name in SPLITS
    }
    return IntentData(**built, label_names=names, source=shown)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_intent_data(
    source: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    synthetic_per_intent: int = 120,
) -> IntentData:
    """Load intent data from ``source`` into three splits with named labels.

    ``source`` is ``"synthetic"`` (the built-in dataset, ``synthetic_per_intent`` utterances per
    intent, generated with ``seed``), a ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` file, or a
    directory written by ``datasets``' ``save_to_disk``:

    - CSV/TSV: a header row naming ``text_column`` and ``label_column`` (and optionally ``split``).
    - JSON Lines: one object per line with those keys (and optionally ``split``).
    - JSON: the CLINC150 layout ``{"train": [[text, label], ...], "val": [...], "test": [...]}``
      (items may also be objects with the two columns), or a list of objects. Keys ``oos_*`` and
      rows labelled ``oos`` (CLINC's out-of-scope class) are dropped, so ``data_full.json`` of
      CLINC150 gives its 150 in-scope intents.
    - A ``datasets`` directory: a ``DatasetDict`` with ``train`` and optionally ``validation``
      (or ``val``, ``valid``, ``dev``) and ``test`` (other splits are ignored with a warning), or a
      single ``Dataset`` taken as train. Integer labels of a ``ClassLabel`` become its names.

    A split the source lacks is made from its training rows with :func:`stratified_holdout`
    (``validation_fraction`` and ``test_fraction`` of them), the same for the same ``seed``.

    Labels may be strings or integers (integers become their decimal strings). ``label_names`` are
    the labels present in train: in ``ClassLabel`` order when the source has one, in numeric order
    when every label is an integer (so ids equal the labels when they are ``0 .. K-1``), and in
    sorted order otherwise. Label ``i`` of a split names ``label_names[i]``.

    Raises :class:`DataError` for a missing or unknown source, a malformed file, a missing column,
    an empty text or split, a label of validation or test missing from train, or fewer than two
    classes; :class:`ConfigError` for fractions outside (0, 1) or summing to 1 or more.
    """
    validation_fraction = _check_fraction("validation_fraction", validation_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if validation_fraction + test_fraction >= 1:
        raise ConfigError(
            f"validation_fraction + test_fraction must be < 1, got "
            f"{validation_fraction} + {test_fraction}."
        )
    if text_column == label_column:
        raise ConfigError(
            f"text_column and label_column must differ, got {text_column!r} for both."
        )

    if isinstance(source, str) and source == SYNTHETIC:
        from dptrain.synthetic import generate_intents

        rows = generate_intents(n_per_intent=synthetic_per_intent, seed=seed)
        return _assemble(_Raw({"train": rows}), SYNTHETIC, seed, validation_fraction, test_fraction)

    shown = os.fspath(source)
    raw = _read_source(Path(shown), shown, text_column, label_column)
    return _assemble(raw, shown, seed, validation_fraction, test_fraction)


def read_rows(source: str | os.PathLike[str], *, text_column: str = "text",
              label_column: str = "label") -> list[tuple[str, str]]:
    """Every (text, label) row of a data file in the order it holds them (its splits, if it has
    any, one after the other as written), labels as strings; each row checked as in
    :func:`load_intent_data`. For attacks on models trained elsewhere, whose members are named
    by row number."""
    if text_column == label_column:
        raise ConfigError(f"text_column and label_column must differ, got {text_column!r} for both.")
    shown = os.fspath(source)
    raw = _read_source(Path(shown), shown, text_column, label_column)
    return [row for rows in raw.splits.values() for row in rows]


def require_source(source: str | os.PathLike[str]) -> None:
    """Refuse a data source that does not exist (the first check of a run: before any model is
    looked for or file written)."""
    shown = os.fspath(source)
    if shown != SYNTHETIC and not Path(shown).exists():
        raise DataError(f"data source {shown!r} not found; give {_ALLOWED_SOURCES}.")


def _read_source(path: Path, shown: str, text_column: str, label_column: str) -> _Raw:
    require_source(shown)
    if path.is_dir():
        raw = _read_hf(path, shown, text_column, label_column)
    else:
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            raw = _read_delimited(path, shown, text_column, label_column, tsv=suffix == ".tsv")
        elif suffix == ".jsonl":
            raw = _read_jsonl(path, shown, text_column, label_column)
        elif suffix == ".json":
            raw = _read_json(path, shown, text_column, label_column)
        else:
            raise DataError(
                f"format of {shown} must be {_ALLOWED_SOURCES}, got suffix {suffix or 'none'!r}."
            )
    return raw


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching
# ---------------------------------------------------------------------------------------------
def encode(tokenizer: PreTrainedTokenizerBase, split: Split, max_length: int) -> EncodedSplit:
    """Tokenize every text of ``split`` once: special tokens added, truncated to ``max_length``
    tokens, not padded (:func:`collate` pads each batch to its own longest member)."""
    if not _is_int(max_length) or max_length < 1:
        raise ConfigError(f"max_length must be an integer >= 1, got {max_length!r}.")
    input_ids: list[list[int]] = []
    chunk = 4096
    for start in range(0, len(split.texts), chunk):
        batch = tokenizer(
            list(split.texts[start : start + chunk]),
            add_special_tokens=True,
            truncation=True,
            max_length=int(max_length),
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        input_ids.extend(list(ids) for ids in batch["input_ids"])
    return EncodedSplit(tuple(input_ids), split.labels)


def collate(
    encoded: EncodedSplit, indices: Sequence[int], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Batch the examples at ``indices``: ``input_ids`` and ``attention_mask`` of shape
    ``[B, T]`` (int64, right-padded with ``pad_token_id`` to the longest of them, T >= 1) and
    ``labels`` of shape ``[B]``. No indices give a batch of 0 rows, shapes ``[0, 1]`` and ``[0]``.
    """
    import torch

    if not _is_int(pad_token_id):
        raise ConfigError(
            f"pad_token_id must be an integer, got {pad_token_id!r}; give the tokenizer a pad "
            f"token."
        )
    index = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(index) and (index.min() < 0 or index.max() >= len(encoded)):
        raise IndexError(
            f"indices must be in [0, {len(encoded)}), got {int(index.min())} to {int(index.max())}."
        )
    width = max(1, int(encoded.lengths[index].max())) if len(index) else 1
    input_ids = np.full((len(index), width), int(pad_token_id), dtype=np.int64)
    attention_mask = np.zeros((len(index), width), dtype=np.int64)
    for row, i in enumerate(index.tolist()):
        ids = encoded.input_ids[i]
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(encoded.labels[index].copy()),
    }


# ---------------------------------------------------------------------------------------------
# Writers (atomic)
# ---------------------------------------------------------------------------------------------
_Pairs = Sequence[tuple[str, str | int]]
Rows = IntentData | Mapping[str, _Pairs] | _Pairs
"""What the writers take: an :class:`IntentData` (its three splits, with label names), a mapping
from split name to ``(text, label)`` pairs, or ``(text, label)`` pairs without splits."""


def _flatten(data: Rows) -> tuple[list[tuple[str | None, str, str | int]], bool]:
    """``(split, text, label)`` rows and whether splits are given."""
    if isinstance(data, IntentData):
        return [
            (name, text, data.label_names[label])
            for name, split in data.splits.items()
            for text, label in zip(split.texts, split.labels.tolist(), strict=True)
        ], True
    if isinstance(data, Mapping):
        rows = []
        for name, pairs in data.items():
            canonical = _canonical_split(name, "the rows to write")
            rows.extend((canonical, text, label) for text, label in pairs)
        return rows, True
    return [(None, text, label) for text, label in data], False


def _atomic_write(
    path: str | os.PathLike[str], write: Callable[[TextIO], None], newline: str | None
) -> Path:
    """Write through ``write`` to a temporary file beside ``path``, then rename it over ``path``:
    readers see the old file or the new one, never a part."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline=newline) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return target


def write_csv(
    path: str | os.PathLike[str],
    data: Rows,
    *,
    text_column: str = "text",
    label_column: str = "label",
) -> Path:
    """Write rows to a ``.csv`` file, or to a ``.tsv`` file (tab-separated, no quoting, so texts
    must not hold tabs or line breaks), with a ``split`` column when ``data`` has splits."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".tsv"):
        raise DataError(f"write_csv writes .csv or .tsv files, got {os.fspath(path)!r}.")
    rows, with_split = _flatten(data)
    header = [text_column, label_column] + ([SPLIT_COLUMN] if with_split else [])
    records = [[text, str(label)] + ([split] if with_split else []) for split, text, label in rows]
    if suffix == ".tsv":
        for record in records:
            for value in record:
                if any(character in value for character in "\t\r\n"):
                    raise DataError(
                        f"fields of a .tsv file must not hold tabs or line breaks, got "
                        f"{_show(value)}; write a .csv file instead."
                    )
        dialect: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None}
    else:
        dialect = {"delimiter": ","}

    def write(handle: TextIO) -> None:
        writer = csv.writer(handle, lineterminator="\n", **dialect)
        writer.writerow(header)
        writer.writerows(records)

    return _atomic_write(path, write, newline="")


def write_jsonl(
    path: str | os.PathLike[str],
    data: Rows,
    *,
    text_column: str = "text",
    label_column: str = "label",
) -> Path:
    """Write rows to a JSON Lines file, one object per row, with ``split`` when ``data`` has splits.
    Integer labels stay integers."""
    rows, with_split = _flatten(data)

    def write(handle: TextIO) -> None:
        for split, text, label in rows:
            obj: dict[str, Any] = {text_column: text, label_column: label}
            if with_split:
                obj[SPLIT_COLUMN] = split
            handle.write(json.dumps(obj, ensure_ascii=False) + "\n")

    return _atomic_write(path, write, newline="\n")


def write_clinc_json(path: str | os.PathLike[str], data: Rows) -> Path:
    """Write rows in the CLINC150 layout, ``{"train": [[text, label], ...], "val": [...],
    "test": [...]}``; rows without splits all go to ``"train"``."""
    rows, _ = _flatten(data)
    clinc_key = {"train": "train", "validation": "val", "test": "test", None: "train"}
    document: dict[str, list[list[str | int]]] = {}
    for split, text, label in rows:
        document.setdefault(clinc_key[split], []).append([text, label])

    def write(handle: TextIO) -> None:
        json.dump(document, handle, ensure_ascii=False, indent=1)
        handle.write("\n")

    return _atomic_write(path, write, newline="\n")
