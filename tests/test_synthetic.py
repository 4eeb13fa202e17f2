"""The built-in synthetic intent dataset and its canaries."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from dptrain.errors import ConfigError, DataError
from dptrain.synthetic import (
    CANARY_WORDS,
    DOMAINS,
    INTENTS,
    audit_canaries,
    generate_intents,
    secret_canary,
)


@pytest.fixture(scope="module")
def default_data() -> list[tuple[str, str]]:
    return generate_intents()


def test_default_size_and_intents(default_data):
    assert len(INTENTS) >= 24
    assert len(set(INTENTS)) == len(INTENTS)
    assert len(DOMAINS) >= 5
    assert len(default_data) >= 2000
    counts = Counter(intent for _, intent in default_data)
    assert set(counts) == set(INTENTS)
    assert set(counts.values()) == {120}


def test_no_duplicate_texts(default_data):
    texts = [text for text, _ in default_data]
    assert len(set(texts)) == len(texts)
    assert all(text.strip() == text and text for text in texts)


def test_deterministic_by_seed(default_data):
    assert generate_intents() == default_data
    other = generate_intents(seed=1)
    assert other != default_data
    assert {text for text, _ in other} != {text for text, _ in default_data}


def test_order_is_shuffled(default_data):
    # Not grouped by intent: the first 100 rows already span most intents.
    assert len({intent for _, intent in default_data[:100]}) >= len(INTENTS) // 2


def test_small_generation_and_noise():
    data = generate_intents(n_per_intent=5, seed=3)
    assert len(data) == 5 * len(INTENTS)
    texts = [text for text, _ in generate_intents(n_per_intent=40, seed=0)]
    assert any(text != text.lower() for text in texts)  # casing variants
    assert any(text.endswith("?") for text in texts)


def test_no_single_word_separates_intents(default_data):
    # Every intent shares at least one content word with another intent.
    words = {intent: set() for intent in INTENTS}
    for text, intent in default_data:
        words[intent].update(re.findall(r"[a-z]+", text.lower()))
    for intent in INTENTS:
        others = set().union(*(words[o] for o in INTENTS if o != intent))
        assert len(words[intent] & others) >= 3, intent


def test_no_single_word_identifies_an_intent(default_data):
    # For each intent, the rule "the text contains word w" has an F1 below 0.97 for every w.
    vocabulary = sorted(
        {w for text, _ in default_data for w in re.findall(r"[a-z']+", text.lower())}
    )
    column = {w: j for j, w in enumerate(vocabulary)}
    contains = np.zeros((len(default_data), len(vocabulary)), dtype=bool)
    for i, (text, _) in enumerate(default_data):
        contains[i, [column[w] for w in re.findall(r"[a-z']+", text.lower())]] = True
    intents = np.array([intent for _, intent in default_data])
    for intent in INTENTS:
        positive = intents == intent
        true_pos = contains[positive].sum(0)
        f1 = 2 * true_pos / (positive.sum() + contains.sum(0))
        assert f1.max() < 0.97, (intent, vocabulary[int(f1.argmax())], float(f1.max()))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_generate_rejects_bad_count(bad):
    with pytest.raises(ConfigError, match="n_per_intent must be an integer >= 1"):
        generate_intents(n_per_intent=bad)


def test_audit_canaries_unique_random_labels_and_disjoint(default_data):
    labels = ["a", "b", "c", "d"]
    canaries = audit_canaries(400, labels, seed=0)
    assert len(canaries) == 400
    texts = [text for text, _ in canaries]
    assert len(set(texts)) == 400
    assert not set(texts) & {text for text, _ in default_data}
    counts = Counter(label for _, label in canaries)
    assert set(counts) == set(labels)
    assert all(60 <= count <= 140 for count in counts.values())  # uniform: 100 expected each
    for text in texts:
        words = text.split()
        assert 6 <= len(words) <= 10
        assert set(words) <= set(CANARY_WORDS)


def test_canary_words_never_in_natural_data(default_data):
    natural = {word for text, _ in default_data for word in re.findall(r"[a-z]+", text.lower())}
    assert not natural & set(CANARY_WORDS)


def test_audit_canaries_deterministic():
    assert audit_canaries(20, INTENTS, seed=5) == audit_canaries(20, INTENTS, seed=5)
    assert audit_canaries(20, INTENTS, seed=5) != audit_canaries(20, INTENTS, seed=6)
    assert audit_canaries(0, INTENTS, seed=5) == []
    # A longer list starts with the shorter one: m only decides where to stop.
    assert audit_canaries(30, INTENTS, seed=5)[:20] == audit_canaries(20, INTENTS, seed=5)


def test_audit_canaries_rejects_bad_input():
    with pytest.raises(ConfigError, match="m must be an integer >= 0, got -1"):
        audit_canaries(-1, ["a", "b"], seed=0)
    with pytest.raises(DataError, match="label_names must name at least one label"):
        audit_canaries(3, [], seed=0)


def test_secret_canary():
    text, secret = secret_canary(seed=7)
    assert re.fullmatch(r"my pin code is \d \d \d \d", text)
    assert text == f"my pin code is {secret}"
    assert secret_canary(seed=7) == (text, secret)
    assert len({secret_canary(seed=s)[1] for s in range(30)}) > 20
    text, secret = secret_canary(prefix="my account number is", n_digits=6, seed=1)
    assert text.startswith("my account number is ") and len(secret.split()) == 6
    with pytest.raises(ConfigError, match="n_digits must be an integer >= 1, got 0"):
        secret_canary(n_digits=0)
    with pytest.raises(ConfigError, match="prefix must be a non-empty string"):
        secret_canary(prefix=" ")
