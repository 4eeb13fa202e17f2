"""Slot data (formats, checks, synthetic annotations), sub-word alignment and slot metrics."""

import json

import pytest

from dptrain.errors import DataError
from dptrain.slot_data import (
    Utterance, generate_slot_utterances, load_slot_data, spans, write_jsonl,
)
from dptrain.slot_metrics import slot_report


def test_synthetic_slots_are_the_filled_values_and_valid_bio():
    from dptrain.synthetic import _FILLERS

    data = generate_slot_utterances(20, seed=3)
    assert data == generate_slot_utterances(20, seed=3) and data != generate_slot_utterances(20, seed=4)
    assert len(data) == 20 * 30 and len({u.tokens for u in data}) == len(data)
    n_slots = 0
    for u in data:
        for kind, start, end in spans(u.tags):
            value = " ".join(u.tokens[start:end]).lower()
            fillers = {" ".join(f.lower().replace("?", " ?").split()) for f in _FILLERS[kind]}
            assert value in fillers, (kind, value)
            n_slots += 1
        for i, tag in enumerate(u.tags):  # every I- continues its own type
            assert not tag.startswith("I-") or u.tags[i - 1][2:] == tag[2:]
    assert n_slots > len(data)  # most utterances have a slot, many two


def test_formats_round_trip_and_split_checks(tmp_path):
    utts = generate_slot_utterances(6, seed=0)
    write_jsonl(tmp_path / "d.jsonl", utts)
    data = load_slot_data(tmp_path / "d.jsonl", seed=1)
    assert len(data.train) + len(data.validation) + len(data.test) == len(utts)
    assert data.tags[0] == "O" and len(data.intents) == 30
    assert {u.intent for u in data.test} <= set(data.intents)

    # CoNLL with intent and split comments
    lines = []
    for split, u in zip(["train", "train", "test"], utts[:3]):
        lines += [f"# intent = {u.intent}", f"# split = {split}"]
        lines += [f"{w}\t{t}" for w, t in zip(u.tokens, u.tags)] + [""]
    conll = tmp_path / "d.conll"
    conll.write_text("\n".join(lines))
    with pytest.raises(DataError, match="never occurs in train"):  # the test utterance's intent
        load_slot_data(conll)
    lines[lines.index("# split = test")] = "# split = train"
    conll.write_text("\n".join(lines))
    data = load_slot_data(conll)
    assert [u.tokens for u in data.splits["train"] + data.validation + data.test] != []
    assert set(data.train) | set(data.validation) | set(data.test) == set(utts[:3])

    # a datasets directory with ClassLabel tags
    import datasets

    names = sorted({t for u in utts for t in u.tags})
    intents = sorted({u.intent for u in utts})
    ds = datasets.Dataset.from_dict(
        {"tokens": [list(u.tokens) for u in utts], "tags": [[names.index(t) for t in u.tags] for u in utts],
         "intent": [intents.index(u.intent) for u in utts]},
        features=datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                    "tags": datasets.Sequence(datasets.ClassLabel(names=names)),
                                    "intent": datasets.ClassLabel(names=intents)}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    data = load_slot_data(tmp_path / "hf")
    assert set(data.train) | set(data.validation) | set(data.test) == set(utts)


@pytest.mark.parametrize("row, message", [
    ({"tokens": ["wake", "me", "at", "7"], "tags": ["O", "O", "O"], "intent": "alarm"}, "3 tags for 4 words"),
    ({"tokens": ["wake", "me", "at", "7"], "tags": ["O", "O", "O", "I-time"], "intent": "alarm"},
     "continues no time slot"),
    ({"tokens": ["at", "7", "am"], "tags": ["O", "B-time", "I-date"], "intent": "alarm"}, "continues no date slot"),
    ({"tokens": ["at", "7"], "tags": ["O", "X-time"], "intent": "alarm"}, "is not O, B-type or I-type"),
    ({"tokens": [], "tags": [], "intent": "alarm"}, "no words"),
    ({"tokens": ["hi"], "tags": ["O"]}, "needs the keys"),
])
def test_bad_rows_are_named_with_their_line(tmp_path, row, message):
    good = {"tokens": ["wake", "me", "at", "7"], "tags": ["O", "O", "O", "B-time"], "intent": "alarm"}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as info:
        load_slot_data(tmp_path / "d.jsonl")
    assert "line 2" in str(info.value)


def test_a_tag_only_in_test_is_refused(tmp_path):
    rows = [{"tokens": ["at", "7"], "tags": ["O", "B-time"], "intent": "alarm", "split": "train"},
            {"tokens": ["on", "monday"], "tags": ["O", "B-date"], "intent": "alarm", "split": "test"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match="tag B-date of test utterance 0 never occurs in train"):
        load_slot_data(tmp_path / "d.jsonl")


def test_snips_layout_including_a_file_that_is_not_utf8(tmp_path, caplog):
    def snips(intent, utterances):
        return {intent: [{"data": chunks} for chunks in utterances]}

    (tmp_path / "train_PlayMusic_full.json").write_bytes(json.dumps(snips("PlayMusic", [
        [{"text": "play "}, {"text": "Canción Bonita", "entity": "track"}, {"text": " now"}],
        [{"text": "play some "}, {"text": "jazz", "entity": "genre"}],
    ]), ensure_ascii=False).encode("cp1252"))
    (tmp_path / "train_GetWeather_full.json").write_text(json.dumps(snips("GetWeather", [
        [{"text": "weather in "}, {"text": "new york", "entity": "city"}],
        [{"text": "is it cold in "}, {"text": "oslo", "entity": "city"}],
    ])))
    (tmp_path / "validate_GetWeather.json").write_text(json.dumps(snips("GetWeather", [
        [{"text": "rain in "}, {"text": "paris", "entity": "city"}]])))
    data = load_slot_data(tmp_path, seed=0, test_fraction=0.01)
    assert "is not UTF-8" in caplog.text
    utts = set(data.train) | set(data.test)
    assert Utterance(("play", "Canción", "Bonita", "now"), ("O", "B-track", "I-track", "O"), "PlayMusic") in utts
    assert data.validation == (Utterance(("rain", "in", "paris"), ("O", "O", "B-city"), "GetWeather"),)


def test_alignment_labels_first_subtokens_only():
    from dptrain.joint_model import IGNORE, align
    from dptrain.models import tiny_tokenizer

    tok = tiny_tokenizer()
    words = [["send", "qzx", "to", "mom"], ["hi"]]
    ids, labels = align(tok, words, [[0, 3, 0, 5], [0]], max_length=32)
    pieces = tok.convert_ids_to_tokens(ids[0])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    firsts = [i for i, p in enumerate(pieces) if p not in ("[CLS]", "[SEP]") and not p.startswith("##")]
    assert [labels[0][i] for i in firsts] == [0, 3, 0, 5]
    assert sum(1 for v in labels[0] if v != IGNORE) == 4  # "qzx" has several pieces, one label
    assert len(pieces) > 6 and labels[1] == [IGNORE, 0, IGNORE]


def test_entity_metrics_on_hand_counted_examples():
    gold = [["B-time", "I-time", "O", "B-date"], ["O", "B-city", "I-city"], ["O", "O"]]
    pred = [["B-time", "I-time", "O", "O"], ["O", "B-city", "O"], ["B-city", "O"]]
    r = slot_report(gold, pred, ["alarm", "weather", "hi"], ["alarm", "weather", "bye"])
    # gold spans: time(0,2) date(3,4) city(1,3); predicted: time(0,2) city(1,2) city(0,1)
    assert r["precision"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(1 / 3)
    assert r["per_type"]["time"]["f1"] == 1.0 and r["per_type"]["date"]["recall"] == 0.0
    assert r["per_type"]["city"]["precision"] == 0.0 and r["per_type"]["city"]["support"] == 1
    assert r["intent_accuracy"] == pytest.approx(2 / 3)
    assert r["frame_accuracy"] == 0.0  # utterance 3 has its slots (none) right but not its intent
    assert slot_report(gold, gold)["f1"] == 1.0 and slot_report(gold, gold)["frame_accuracy"] == 1.0
    assert spans(["I-time", "I-time", "B-time"]) == [("time", 0, 2), ("time", 2, 3)]


def test_io_tag_set_merges_b_and_i_and_rebuilds_bio_spans():
    from dptrain.joint_model import TagSet

    tags = ("O", "B-city", "B-time", "I-city", "I-time", "B-pin", "I-pin")
    io, bio = TagSet(tags), TagSet(tags, "bio")
    assert io.classes == ("O", "city", "time", "pin") and bio.classes == tags
    assert io.id("B-city") == io.id("I-city") == 1 and io.id("O") == 0
    gold = ["O", "B-city", "I-city", "O", "B-time", "B-pin", "I-pin", "I-pin"]
    assert io.decode([io.id(t) for t in gold]) == gold  # valid BIO without touching same-type values
    assert bio.decode([bio.id(t) for t in gold]) == gold
    # two values of one type that touch merge into one: the scheme's one loss
    assert io.decode([io.id(t) for t in ["B-city", "B-city"]]) == ["B-city", "I-city"]
    with pytest.raises(Exception, match="tag_scheme must be"):
        TagSet(tags, "bilou")


def test_a_joint_run_saves_its_tag_scheme_and_reloads_with_the_same_predictions(tmp_path):
    import json

    import torch

    from dptrain import TrainConfig, train_run
    from dptrain.slot_trainer import SlotBatches, encode_slots, evaluate_slots, load_joint
    from dptrain.slot_data import load_slot_data

    for scheme, layers, bias in (("io", 1, "off"), ("bio", 1, "off"), ("io", 2, "on")):
        run = tmp_path / f"{scheme}{layers}{bias}"
        summary = train_run(TrainConfig(model="tiny", data="synthetic", task="joint",
                                        synthetic_per_intent=6, epochs=1, epsilon=float("inf"),
                                        tag_scheme=scheme, tag_layers=layers,
                                        intent_tag_bias=bias), run, progress=False)
        meta = json.loads((run / "model" / "dptrain_joint.json").read_text())
        assert meta["tag_scheme"] == scheme and meta["tags"][0] == "O"
        assert meta["tag_layers"] == layers and meta["intent_tag_bias"] == (bias == "on")
        n_types = len({t[2:] for t in meta["tags"] if t != "O"})
        assert len(meta["tag_head_classes"]) == (n_types + 1 if scheme == "io" else len(meta["tags"]))
        model, tokenizer, loaded = load_joint(run / "model")
        assert model.tag_head.out_features == len(meta["tag_head_classes"])
        assert model.tag_layers == layers and (model.intent_tag_bias is not None) == (bias == "on")
        if bias == "on":  # trained (it starts at zero) and saved
            assert float(model.intent_tag_bias.weight.detach().abs().sum()) > 0
        data = load_slot_data("synthetic", synthetic_per_intent=6, seed=0)
        enc = {"test": encode_slots(tokenizer, data.test, data.intents, loaded["tagset"], 64)}
        again = evaluate_slots(model, SlotBatches(model, enc, tokenizer.pad_token_id,
                                                  torch.device("cpu")),
                               "test", loaded["tagset"], data.intents, data.test)
        assert again["f1"] == pytest.approx(summary.metrics["slot_f1"], abs=1e-12)
