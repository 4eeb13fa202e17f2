"""Loading intent data in every format, making splits, the errors, and tokenizing/batching."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dptrain.data import (
    EncodedSplit,
    IntentData,
    Split,
    collate,
    encode,
    load_intent_data,
    stratified_holdout,
    write_clinc_json,
    write_csv,
    write_jsonl,
)
from dptrain.errors import ConfigError, DataError
from dptrain.synthetic import INTENTS


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------
def data_error(call, *parts: str) -> str:
    """Run ``call``, expect a DataError whose one-line message contains every part."""
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def synthetic() -> IntentData:
    return load_intent_data("synthetic", synthetic_per_intent=12, seed=0)


@pytest.fixture(scope="module")
def tricky() -> IntentData:
    """Texts with quotes, commas, non-ASCII characters and leading spaces; no tabs or newlines."""
    train = (
        'he said "hi", then left',
        "naïve café ☕ order",
        "  leading spaces kept",
        "a, b, c",
        "'single quotes'",
        "plain text",
    )
    return IntentData(
        train=Split(train, np.array([0, 1, 2, 0, 1, 2])),
        validation=Split(("valid one", '"quoted"'), np.array([2, 0])),
        test=Split(("test one", "test, two"), np.array([1, 1])),
        label_names=("alpha", "beta", "gamma, with comma"),
        source="test",
    )


def assert_same(loaded: IntentData, expected: IntentData) -> None:
    assert loaded.label_names == expected.label_names
    for name in ("train", "validation", "test"):
        assert loaded.splits[name].texts == expected.splits[name].texts, name
        np.testing.assert_array_equal(loaded.splits[name].labels, expected.splits[name].labels)
    assert loaded.splits == expected.splits


# ---------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------
def test_split_is_frozen_and_checked():
    split = Split(["a", "b"], [1, 0])
    assert split.texts == ("a", "b") and split.labels.dtype == np.int64
    with pytest.raises(ValueError):
        split.labels[0] = 3  # read-only
    assert split == Split(("a", "b"), np.array([1, 0]))
    assert hash(split) == hash(Split(("a", "b"), np.array([1, 0])))
    assert Split((), []).labels.shape == (0,)
    data_error(lambda: Split(("a",), [0, 1]), "one label per text", "1 texts and 2 labels")
    data_error(lambda: Split(("a",), [0.5]), "must be a 1-D array of integers")
    data_error(
        lambda: IntentData(
            Split(("a",), [2]), Split(("b",), [0]), Split(("c",), [1]), ("x", "y"), "s"
        ),
        "label ids of the train split must be in [0, 2)",
    )


# ---------------------------------------------------------------------------------------------
# Round trips through every format
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("writer", "name"),
    [
        (write_csv, "d.csv"),
        (write_csv, "d.tsv"),
        (write_jsonl, "d.jsonl"),
        (write_clinc_json, "d.json"),
    ],
)
def test_round_trip(tmp_path, writer, name, synthetic, tricky):
    for data in (synthetic, tricky):
        path = writer(tmp_path / name, data)
        assert path == tmp_path / name
        assert_same(load_intent_data(path), data)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary files left behind


def test_round_trip_line_breaks_and_custom_columns(tmp_path):
    rows = {
        "train": [("first line\nsecond line", "x"), ("tab\there", "y"), ("ok", "x")],
        "val": [("crlf\r\ntext", "y")],
        "test": [("t", "x")],
    }
    for writer, name in ((write_csv, "d.csv"), (write_jsonl, "d.jsonl")):
        path = writer(tmp_path / name, rows, text_column="utterance", label_column="intent")
        loaded = load_intent_data(path, text_column="utterance", label_column="intent")
        assert loaded.train.texts == ("first line\nsecond line", "tab\there", "ok")
        assert loaded.validation.texts == ("crlf\r\ntext",)
        assert loaded.label_names == ("x", "y")
    loaded = load_intent_data(write_clinc_json(tmp_path / "d.json", rows))
    assert loaded.validation.texts == ("crlf\r\ntext",)
    data_error(lambda: write_csv(tmp_path / "d.tsv", rows), "must not hold tabs or line breaks")


def test_integer_labels_keep_their_ids(tmp_path):
    rows = [(f"utterance number {i}", i % 12) for i in range(240)]
    for writer, name in (
        (write_jsonl, "d.jsonl"),
        (write_csv, "d.csv"),
        (write_clinc_json, "d.json"),
    ):
        loaded = load_intent_data(writer(tmp_path / name, rows))
        assert loaded.label_names == tuple(
            str(i) for i in range(12)
        )  # numeric order, not "10" < "2"
        for split in loaded.splits.values():
            expected = [int(text.split()[-1]) % 12 for text in split.texts]
            np.testing.assert_array_equal(split.labels, expected)


def test_clinc_drops_out_of_scope(tmp_path):
    document = {
        "train": [["book a table", "reservation"], ["what's up", "oos"], ["play jazz", "music"]],
        "val": [["reserve a spot", "reservation"], ["play rock", "music"]],
        "test": [["reserve for two", "reservation"], ["any songs", "music"], ["hm", "oos"]],
        "oos_train": [["who won", "oos"]],
        "oos_val": [["why", "oos"]],
        "oos_test": [["how tall", "oos"]],
    }
    path = write_text(tmp_path / "clinc.json", json.dumps(document))
    loaded = load_intent_data(path)
    assert loaded.label_names == ("music", "reservation")
    assert loaded.train.texts == ("book a table", "play jazz")
    assert loaded.validation.texts == ("reserve a spot", "play rock")
    assert loaded.test.texts == ("reserve for two", "any songs")


def test_json_list_of_objects(tmp_path):
    rows = [
        {"text": f"t{i}", "label": "ab"[i % 2], "split": ["train", "dev", "test"][i % 3]}
        for i in range(12)
    ]
    loaded = load_intent_data(write_text(tmp_path / "rows.json", json.dumps(rows)))
    assert loaded.train.texts == ("t0", "t3", "t6", "t9")
    assert loaded.validation.texts == ("t1", "t4", "t7", "t10")


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets on disk
# ---------------------------------------------------------------------------------------------
def test_hf_datasetdict_with_and_without_classlabel(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    names = ["weather", "alarm", "music"]  # not sorted: ids must follow the ClassLabel
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    splits = {
        "train": (["rain today", "wake me", "play jazz", "sunny", "alarm at 7"], [0, 1, 2, 0, 1]),
        "validation": (["cold?", "play rock"], [0, 2]),
        "test": (["snow", "wake up"], [0, 1]),
    }
    with_classlabel = DatasetDict(
        {
            k: Dataset.from_dict({"text": t, "label": y}, features=features)
            for k, (t, y) in splits.items()
        }
    )
    with_classlabel.save_to_disk(str(tmp_path / "with"))
    loaded = load_intent_data(tmp_path / "with")
    assert loaded.label_names == tuple(names)
    for name, (texts, labels) in splits.items():
        assert loaded.splits[name].texts == tuple(texts)
        np.testing.assert_array_equal(loaded.splits[name].labels, labels)

    # String labels, "val" for validation: sorted names.
    as_strings = DatasetDict(
        {
            ("val" if k == "validation" else k): Dataset.from_dict(
                {"text": t, "label": [names[i] for i in y]}
            )
            for k, (t, y) in splits.items()
        }
    )
    as_strings.save_to_disk(str(tmp_path / "without"))
    loaded = load_intent_data(tmp_path / "without")
    assert loaded.label_names == ("alarm", "music", "weather")
    assert loaded.validation.texts == ("cold?", "play rock")
    np.testing.assert_array_equal(loaded.validation.labels, [2, 1])


def test_hf_single_dataset_gets_splits(tmp_path, synthetic):
    from datasets import Dataset

    texts = list(synthetic.train.texts)
    labels = [synthetic.label_names[i] for i in synthetic.train.labels]
    Dataset.from_dict({"sentence": texts, "intent": labels}).save_to_disk(str(tmp_path / "single"))
    loaded = load_intent_data(
        tmp_path / "single", text_column="sentence", label_column="intent", seed=3
    )
    assert sum(len(s) for s in loaded.splits.values()) == len(texts)
    assert set().union(*(s.texts for s in loaded.splits.values())) == set(texts)
    data_error(
        lambda: load_intent_data(tmp_path / "single"),
        "column 'text' not found in the train split of",
        "columns are: sentence, intent.",
    )


def test_hf_errors(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    (tmp_path / "empty_dir").mkdir()
    data_error(
        lambda: load_intent_data(tmp_path / "empty_dir"), "written by datasets' save_to_disk"
    )
    DatasetDict({"test": Dataset.from_dict({"text": ["a"], "label": ["x"]})}).save_to_disk(
        str(tmp_path / "no_train")
    )
    data_error(
        lambda: load_intent_data(tmp_path / "no_train"),
        "must have a train split; splits are: test.",
    )
    features = Features({"text": Value("string"), "label": ClassLabel(names=["x", "y"])})
    Dataset.from_dict({"text": ["a", "b"], "label": [0, -1]}, features=features).save_to_disk(
        str(tmp_path / "neg")
    )
    data_error(
        lambda: load_intent_data(tmp_path / "neg"),
        "row 1 of the train split",
        "ClassLabel",
        "got -1",
    )
    Dataset.from_dict({"text": ["a", None], "label": ["x", "y"]}).save_to_disk(
        str(tmp_path / "none")
    )
    data_error(
        lambda: load_intent_data(tmp_path / "none"),
        "text in row 1 of the train split",
        "must be a string, got NoneType",
    )


# ---------------------------------------------------------------------------------------------
# Splits made when missing
# ---------------------------------------------------------------------------------------------
def test_missing_splits_are_reproducible_disjoint_covering_and_stratified(tmp_path):
    rows = [
        (f"example {i} of {intent}", intent)
        for intent in INTENTS[:6]
        for i in range(20 + 10 * INTENTS.index(intent))
    ]
    path = write_csv(tmp_path / "nosplit.csv", rows)
    first = load_intent_data(path, seed=4)
    assert_same(load_intent_data(path, seed=4), first)
    assert load_intent_data(path, seed=5).test.texts != first.test.texts

    parts = [set(split.texts) for split in first.splits.values()]
    assert sum(map(len, parts)) == len(rows) == len(set().union(*parts))
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(first.validation) == round(0.1 * len(rows)) == len(first.test)

    totals = Counter(label for _, label in rows)
    for split in (first.validation, first.test):
        counts = Counter(first.label_names[i] for i in split.labels)
        for label, total in totals.items():
            assert abs(counts[label] - 0.1 * total) < 1, (label, counts[label], total)
    # Source order is kept inside each split.
    order = {text: i for i, (text, _) in enumerate(rows)}
    assert all(np.all(np.diff([order[t] for t in s.texts]) > 0) for s in first.splits.values())


def test_only_the_missing_split_is_made(tmp_path):
    rows = {"train": [(f"t{i}", "ab"[i % 2]) for i in range(40)], "test": [("x", "a"), ("y", "b")]}
    loaded = load_intent_data(write_jsonl(tmp_path / "d.jsonl", rows), validation_fraction=0.25)
    assert loaded.test.texts == ("x", "y")
    assert len(loaded.validation) == 10 and len(loaded.train) == 30


def test_stratified_holdout_keeps_rare_classes_in_train():
    labels = ["common"] * 50 + ["rare"] + ["pair"] * 2
    parts = stratified_holdout(labels, {"validation": 0.1, "test": 0.1}, seed=0)
    assert len(parts["validation"]) == 5 and len(parts["test"]) == 5
    assert 50 in parts["train"]  # the single "rare" example stays in train
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(labels)))
    again = stratified_holdout(labels, {"validation": 0.1, "test": 0.1}, seed=0)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_synthetic_source(synthetic):
    assert synthetic.source == "synthetic"
    assert synthetic.label_names == tuple(sorted(INTENTS))
    assert sum(len(s) for s in synthetic.splits.values()) == 12 * len(INTENTS)
    assert set(np.unique(synthetic.validation.labels)) == set(range(len(INTENTS)))


# ---------------------------------------------------------------------------------------------
# Errors: one line each, naming the problem
# ---------------------------------------------------------------------------------------------
def test_missing_source_and_unknown_format(tmp_path):
    data_error(
        lambda: load_intent_data(tmp_path / "nope.csv"), "nope.csv", "not found", "synthetic"
    )
    path = write_text(tmp_path / "data.txt", "text,label\n")
    data_error(
        lambda: load_intent_data(path),
        "data.txt",
        "got suffix '.txt'",
        ".csv, .tsv, .jsonl or .json",
    )


def test_csv_errors(tmp_path):
    csv_file = tmp_path / "data.csv"
    write_text(csv_file, "text,intent\nhello,a\n")
    message = data_error(lambda: load_intent_data(csv_file), "column 'label' not found in")
    assert message.endswith("data.csv; columns are: text, intent.")
    write_text(csv_file, "text,label\nhello,a\nbye,b,extra\n")
    data_error(
        lambda: load_intent_data(csv_file),
        "line 3 of",
        "must have 2 fields like the header, got 3.",
    )
    write_text(csv_file, "text,label\nhello,a\n,b\n")
    data_error(lambda: load_intent_data(csv_file), "text in line 3 of", "must not be empty")
    write_text(csv_file, "text,label\nhello,\n")
    data_error(lambda: load_intent_data(csv_file), "label in line 2 of", "must not be empty")
    write_text(csv_file, "")
    data_error(
        lambda: load_intent_data(csv_file), "must start with a header row", "got an empty file"
    )
    write_text(csv_file, "text,label,split\nhello,a,train\nbye,b,training\n")
    data_error(lambda: load_intent_data(csv_file), "split in line 3 of", "got 'training'")
    write_text(csv_file, 'text,label\n"unclosed "quote,a\n')
    data_error(lambda: load_intent_data(csv_file), "must be valid CSV")
    csv_file.write_bytes(b"text,label\n\xff\xfe,a\n")
    data_error(lambda: load_intent_data(csv_file), "must be UTF-8 text")
    # far past the decoder's first buffer: the offset must be the file's, not the buffer's
    good = "".join(f"please check balance number {i},a\n" for i in range(4000)).encode()
    csv_file.write_bytes(b"text,label\n" + good + b"bad \xe9 byte,a\n")
    offset = len(b"text,label\n" + good) + 4
    data_error(lambda: load_intent_data(csv_file), f"got byte 0xe9 at byte offset {offset} (line 4002)")


def test_jsonl_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    write_text(path, '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    data_error(lambda: load_intent_data(path), "line 2 of", "must be valid JSON")
    write_text(path, '{"text": "a", "label": "x"}\n\n[1, 2]\n')
    data_error(lambda: load_intent_data(path), "line 3 of", "must be a JSON object, got list")
    write_text(path, '{"text": 5, "label": "x"}\n')
    data_error(lambda: load_intent_data(path), "text in line 1 of", "must be a string, got int 5.")
    write_text(path, '{"text": "a", "label": 1.5}\n')
    data_error(
        lambda: load_intent_data(path), "label in line 1 of", "string or an integer, got float 1.5."
    )
    write_text(path, '{"text": "a", "label": "x"}\n{"utterance": "b", "label": "y"}\n')
    data_error(
        lambda: load_intent_data(path),
        "column 'text' not found in line 2 of",
        "columns are: utterance, label.",
    )
    write_text(path, '{"text": "a", "label": "x", "split": "train"}\n{"text": "b", "label": "y"}\n')
    data_error(
        lambda: load_intent_data(path), "line 2 of", "has no 'split' but line 1", "a split, or none"
    )
    write_text(path, "\n\n")
    data_error(lambda: load_intent_data(path), "must hold at least one example")


def test_json_errors(tmp_path):
    path = tmp_path / "data.json"
    write_text(path, '{"train": [["a", "x"],\n  ["b" "y"]]}')
    data_error(lambda: load_intent_data(path), "must be valid JSON", "line 2, column")
    write_text(path, '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    data_error(lambda: load_intent_data(path), "it looks like JSON Lines: name it .jsonl")
    write_text(path, json.dumps({"train": [["a", "x"], ["b"]]}))
    data_error(
        lambda: load_intent_data(path),
        "item 1 of 'train' in",
        "must be a [text, label] pair, got ['b']",
    )
    write_text(path, json.dumps({"training": [["a", "x"]]}))
    data_error(lambda: load_intent_data(path), "key 'training' in", "must be a split")
    write_text(path, json.dumps({"val": [["a", "x"]], "test": [["b", "y"]]}))
    data_error(lambda: load_intent_data(path), "must have a 'train' key; keys are: val, test.")
    write_text(
        path, json.dumps({"train": [["a", "x"], ["b", "y"]], "val": [], "test": [["c", "x"]]})
    )
    data_error(
        lambda: load_intent_data(path), "the validation split of", "must hold at least one example"
    )
    write_text(
        path,
        json.dumps(
            {"train": [["a", "x"], ["b", "y"]], "val": [["q", "oos"]], "test": [["c", "x"]]}
        ),
    )
    data_error(
        lambda: load_intent_data(path), "the validation split of", "must hold at least one example"
    )
    write_text(path, '"just a string"')
    data_error(
        lambda: load_intent_data(path), "must hold an object with keys train, val, test", "got str"
    )


def test_label_checks_across_splits(tmp_path):
    rows = {
        "train": [("a", "x"), ("b", "y")],
        "validation": [("c", "x")],
        "test": [("d", "z"), ("e", "w")],
    }
    path = write_csv(tmp_path / "data.csv", rows)
    data_error(
        lambda: load_intent_data(path), "label 'z' (and 1 more) appears in test but not in train"
    )
    rows = {"train": [("a", "x"), ("b", "x")], "validation": [("c", "x")], "test": [("d", "x")]}
    data_error(
        lambda: load_intent_data(write_csv(path, rows)),
        "must have at least 2 classes in train, got 1: ['x']",
    )
    rows = [("a", "x"), ("b", "y"), ("c", "z")]
    data_error(
        lambda: load_intent_data(write_csv(path, rows)),
        "the validation split cannot be made from the 3 training examples",
    )


def test_bad_options():
    with pytest.raises(ConfigError, match=r"validation_fraction must be in \(0, 1\), got 0"):
        load_intent_data("synthetic", validation_fraction=0)
    with pytest.raises(ConfigError, match="must be < 1"):
        load_intent_data("synthetic", validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError, match="must differ"):
        load_intent_data("synthetic", text_column="x", label_column="x")


# ---------------------------------------------------------------------------------------------
# Writers are atomic
# ---------------------------------------------------------------------------------------------
def test_failed_write_leaves_old_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [("a", "x"), ("b", "y")])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl(path, [("a", "x"), ("b", {1, 2})])  # a set cannot be written as JSON
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]
    data_error(lambda: write_csv(tmp_path / "d.txt", [("a", "x")]), "writes .csv or .tsv files")


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching
# ---------------------------------------------------------------------------------------------
def test_encode(tiny_tokenizer):
    split = Split(
        ("turn on the lights", "what's my savings balance please", "skip"), np.array([2, 0, 1])
    )
    encoded = encode(tiny_tokenizer, split, max_length=64)
    assert len(encoded) == 3
    np.testing.assert_array_equal(encoded.lengths, [len(ids) for ids in encoded.input_ids])
    np.testing.assert_array_equal(encoded.labels, [2, 0, 1])
    cls, sep, unk = (
        tiny_tokenizer.cls_token_id,
        tiny_tokenizer.sep_token_id,
        tiny_tokenizer.unk_token_id,
    )
    assert all(ids[0] == cls and ids[-1] == sep for ids in encoded.input_ids)
    assert encoded.lengths.tolist() == [6, 9, 3]  # what ' s my savings balance please
    assert unk not in encoded.input_ids[0]

    truncated = encode(tiny_tokenizer, split, max_length=4)
    assert truncated.lengths.tolist() == [4, 4, 3]
    assert truncated.input_ids[1] == [cls, *encoded.input_ids[1][1:3], sep]

    empty = encode(tiny_tokenizer, Split((), []), max_length=8)
    assert len(empty) == 0 and empty.lengths.shape == (0,)
    with pytest.raises(ConfigError, match="max_length must be an integer >= 1, got 0"):
        encode(tiny_tokenizer, split, max_length=0)


def test_collate_pads_to_longest_of_batch():
    encoded = EncodedSplit(
        ([2, 10, 11, 3], [2, 12, 3], [2, 13, 14, 15, 16, 3]), np.array([1, 0, 2])
    )
    batch = collate(encoded, [1, 0], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[2, 12, 3, 0], [2, 10, 11, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]
    assert all(t.dtype == torch.long for t in batch.values())

    batch = collate(encoded, np.array([2, 1, 2]), pad_token_id=99)
    assert batch["input_ids"].shape == (3, 6)
    assert batch["input_ids"][1].tolist() == [2, 12, 3, 99, 99, 99]
    assert batch["attention_mask"].sum(1).tolist() == [6, 3, 6]
    assert collate(encoded, torch.tensor([2]), pad_token_id=0)["input_ids"].shape == (1, 6)


def test_collate_empty_batch(tiny_tokenizer, synthetic):
    encoded = encode(tiny_tokenizer, synthetic.validation, max_length=32)
    for empty in ([], np.array([], dtype=np.int64), range(0)):
        batch = collate(encoded, empty, pad_token_id=tiny_tokenizer.pad_token_id)
        assert batch["input_ids"].shape == (0, 1) and batch["attention_mask"].shape == (0, 1)
        assert batch["labels"].shape == (0,)
        assert all(t.dtype == torch.long for t in batch.values())
    batch = collate(encode(tiny_tokenizer, Split((), []), 8), [], pad_token_id=0)
    assert batch["input_ids"].shape == (0, 1)


def test_collate_checks(tiny_tokenizer, synthetic):
    encoded = encode(tiny_tokenizer, synthetic.test, max_length=32)
    batch = collate(encoded, range(len(encoded)), pad_token_id=tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (len(encoded), int(encoded.lengths.max()))
    np.testing.assert_array_equal(batch["attention_mask"].sum(1).numpy(), encoded.lengths)
    with pytest.raises(ConfigError, match="pad_token_id must be an integer, got None"):
        collate(encoded, [0], pad_token_id=None)
    with pytest.raises(IndexError, match="indices must be in"):
        collate(encoded, [len(encoded)], pad_token_id=0)
    with pytest.raises(IndexError):
        collate(encoded, [-1], pad_token_id=0)
