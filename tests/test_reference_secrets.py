"""Independent reference tests for secret canaries: planting, scoring, exposure and extraction.

Every expected value here comes from the definitions, computed with naive per-candidate loops,
never from the implementation under test.

Setting (Carlini et al. 2019, "The Secret Sharer"; Parikh et al. 2022, canary extraction from NLU
models). A secret is ``prefix + " " + " ".join(t_1 .. t_n)`` with every ``t_j`` drawn from a
candidate list ``c_0 .. c_{C-1}`` (digits by default), planted ``repetitions`` times in the training
set with label ``y``. For a classifier f the score of a candidate tuple ``i = (i_1 .. i_n)`` is

    s(i) = phi(f(tokenize(prefix + " " + " ".join(c_{i_j}))), y)      (eval mode),

with phi(z, y) = log p_y - log(1 - p_y) for p = softmax(z): the logit of the label's probability
(monotone in log p_y, so every ranking is the probability's).

Flat order: ``flat(i) = sum_j i_j * C**(n - j)`` (first secret token most significant), so the
S = C**n candidates are enumerated as the base-C numbers 0 .. S-1.

Rank with mid-rank ties: ``rank(i) = 1 + #{k: s(k) > s(i)} + 1/2 #{k != i: s(k) = s(i)}``, and the
exposure ``exposure(i) = log2 S - log2 rank(i)`` in bits: log2 S when the secret is the most likely
candidate, 0 when it is the least likely.

Chance level. For a candidate that was never trained on, its rank is uniform on 1..S (no ties), so
``E[exposure] = log2 S - log2(S!)/S -> 1/ln 2 ~= 1.443`` bits, and ``-log2 U`` for U uniform on (0,1)
is exponential with rate ln 2, so the standard deviation is also ``~1/ln 2``; the mean of n such
exposures has standard deviation ``~1.443/sqrt(n)``.

Sampled rank: with m uniform random candidates of which k score strictly above the secret,
``rank ~= 1 + (k/m) (S - 1)``, and a binomial confidence interval for k/m gives [low, high].

Relaxation (Parikh et al.): the one-hot choice at each secret position is relaxed to mixing weights
``w[r, j, :]`` (a probability vector over candidates); the embedding fed at secret position j is
``w[r, j, :] @ E[ids(c_0 .. c_{C-1})]`` with E the input word-embedding matrix, so one-hot weights
reproduce the discrete text exactly.

Models are the project's ``tiny`` random BERT (2 layers, hidden 64) and its fixed tokenizer, in
which "my", "pin", "code", "is" and every digit are single tokens. Two tiny training runs
(a few seconds each on one thread) check the run directory and memorization end to end.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from dptrain.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "my pin code is"
DIGITS = tuple("0123456789")
LENGTH = 3
SPACE = len(DIGITS) ** LENGTH  # 1000
LABELS = ("alpha", "beta", "gamma", "delta", "epsilon")
LABEL_ID = 2
INV_LN2 = 1.0 / math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Reference helpers (no dptrain code)
# ------------------------------------------------------------------------------------------------
def text_of(prefix: str, candidates, indices) -> str:
    return prefix + " " + " ".join(candidates[int(i)] for i in indices)


def phi(logits: torch.Tensor, label_id: int) -> torch.Tensor:
    """log p_y - log(1 - p_y) per row, from the probabilities themselves (float64)."""
    p = torch.softmax(logits.double(), dim=-1)[:, label_id]
    return torch.log(p) - torch.log1p(-p)


def reference_score(model, tokenizer, text: str, label_id: int) -> float:
    """phi(f(text), label), one text at a time, special tokens added, eval mode, float64."""
    model.eval()
    with torch.no_grad():
        enc = tokenizer(text, return_tensors="pt")
        logits = model(**enc).logits
    return float(phi(logits, label_id)[0])


def reference_scores_batched(model, tokenizer, texts, label_id: int) -> np.ndarray:
    """The same for many texts of one token length (so no padding enters the batch)."""
    model.eval()
    with torch.no_grad():
        enc = tokenizer(list(texts), return_tensors="pt")
        assert int(enc["attention_mask"].min()) == 1, "texts of different lengths: padding"
        logits = model(**enc).logits
    return phi(logits, label_id).numpy()


def all_tuples(n_candidates: int, length: int) -> list[tuple[int, ...]]:
    """Every candidate tuple in flat order: itertools.product varies the last position fastest."""
    return list(itertools.product(range(n_candidates), repeat=length))


def decode_flat(flat: int, n_candidates: int, length: int) -> tuple[int, ...]:
    digits = []
    for _ in range(length):
        flat, d = divmod(flat, n_candidates)
        digits.append(d)
    return tuple(reversed(digits))


def midranks(scores: np.ndarray) -> np.ndarray:
    """Ranks by a descending sort; a group of tied scores at sorted positions i..j (0-based)
    shares the rank 1 + (i + j)/2 = 1 + #greater + #other-equal/2."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[i]:
            j += 1
        ranks[order[i : j + 1]] = 1.0 + (i + j) / 2.0
        i = j + 1
    return ranks


def candidate_ids(tokenizer, candidates) -> list[int]:
    ids = []
    for c in candidates:
        pieces = tokenizer(c, add_special_tokens=False)["input_ids"]
        assert len(pieces) == 1, (c, pieces)
        ids.append(pieces[0])
    return ids


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """The project's random ``tiny`` classifier (5 labels) and tokenizer, in eval mode.

    Every weight matrix (embeddings included) is redrawn from N(0, 0.2^2) instead of BERT's
    N(0, 0.02^2): at 0.02 the 1000 triples' scores span 4e-4 nats with neighbours 1e-11 apart,
    below float32 rounding; at 0.2 they span ~1.3 nats, the smallest gap is ~2.5e-6, and ranks
    are well defined.
    """
    from dptrain.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", len(LABELS), LABELS)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def scorer(tiny):
    from attacks.exposure import SecretScorer

    model, tokenizer = tiny
    return SecretScorer(model, tokenizer, PREFIX, DIGITS, LENGTH, LABEL_ID)


@pytest.fixture(scope="module")
def reference_all(tiny) -> np.ndarray:
    """My scores of all 1000 digit triples, in flat order."""
    model, tokenizer = tiny
    texts = [text_of(PREFIX, DIGITS, t) for t in all_tuples(len(DIGITS), LENGTH)]
    return reference_scores_batched(model, tokenizer, texts, LABEL_ID)


@pytest.fixture(scope="module")
def library_all(scorer) -> np.ndarray:
    from attacks.exposure import enumerate_scores

    return enumerate_scores(scorer, batch_size=128)


@pytest.fixture(scope="module")
def synthetic_labels() -> tuple[str, ...]:
    from dptrain.data import load_intent_data

    return load_intent_data("synthetic", seed=0, synthetic_per_intent=10).label_names


# ------------------------------------------------------------------------------------------------
# dptrain.secret_canaries
# ------------------------------------------------------------------------------------------------
def _plant(spec, labels, seed=0, max_length=64):
    from dptrain.models import tiny_tokenizer
    from dptrain.secret_canaries import parse_spec, plant_secrets

    return plant_secrets(parse_spec(spec), labels, tiny_tokenizer(), max_length, seed)


def test_defaults_one_secret_per_repetition_entry(synthetic_labels):
    """length=4 alone: prefix 'my pin code is', digit candidates, repetitions 1, 5, 20, 100."""
    from dptrain.secret_canaries import parse_spec

    families = parse_spec("length=4")
    assert isinstance(families, list) and all(isinstance(f, dict) for f in families)
    secrets = _plant("length=4", synthetic_labels)
    assert sorted(s.repetitions for s in secrets) == [1, 5, 20, 100]
    for s in secrets:
        assert s.prefix == PREFIX
        assert tuple(s.candidates) == DIGITS
        assert isinstance(s.tokens, tuple) and len(s.tokens) == 4
        assert all(t in DIGITS for t in s.tokens)
        assert s.label in synthetic_labels
        assert s.text == s.prefix + " " + " ".join(s.tokens)
    # the default length is 4 as well
    assert all(len(s.tokens) == 4 for s in _plant("repetitions=3", synthetic_labels))


def test_inline_spec_fields(synthetic_labels):
    spec = "prefix=my secret is;length=2;candidates=a,b,c;repetitions=2,7;per_repetition=3;label=book_flight"
    secrets = _plant(spec, synthetic_labels, seed=5)
    assert sorted(s.repetitions for s in secrets) == [2, 2, 2, 7, 7, 7]
    for s in secrets:
        assert s.prefix == "my secret is"
        assert tuple(s.candidates) == ("a", "b", "c")
        assert len(s.tokens) == 2 and set(s.tokens) <= {"a", "b", "c"}
        assert s.label == "book_flight"
        assert s.text == "my secret is " + " ".join(s.tokens)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_spec_files(tmp_path, synthetic_labels, suffix):
    values = {"prefix": "my pin code is", "length": 3, "candidates": ["1", "2", "3"],
              "repetitions": [4], "label": "check_balance"}
    path = tmp_path / f"spec{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    secrets = _plant(str(path), synthetic_labels)
    assert len(secrets) == 1
    (s,) = secrets
    assert (s.prefix, tuple(s.candidates), s.repetitions, s.label) == (
        PREFIX, ("1", "2", "3"), 4, "check_balance")
    assert len(s.tokens) == 3 and set(s.tokens) <= {"1", "2", "3"}


@pytest.mark.parametrize("spec", ["colour=blue", "repetitions=0", "repetitions=5,0", "candidates=",
                                  "length=3;bogus=1"])
def test_parse_spec_rejects(spec):
    from dptrain.secret_canaries import parse_spec

    with pytest.raises(ConfigError):
        parse_spec(spec)


def test_parse_spec_rejects_empty_candidate_list_in_file(tmp_path):
    from dptrain.secret_canaries import parse_spec

    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"length": 3, "candidates": []}))
    with pytest.raises(ConfigError):
        parse_spec(str(path))


def test_plant_is_deterministic_per_seed(synthetic_labels):
    a = _plant("length=4;repetitions=1,5,20,100", synthetic_labels, seed=3)
    b = _plant("length=4;repetitions=1,5,20,100", synthetic_labels, seed=3)
    c = _plant("length=4;repetitions=1,5,20,100", synthetic_labels, seed=4)
    key = lambda ss: [(s.tokens, s.label, s.repetitions) for s in ss]  # noqa: E731
    assert key(a) == key(b)
    # four 4-digit secrets and labels drawn again: equal by chance with probability < 1e-16
    assert key(a) != key(c)


@pytest.mark.parametrize("spec, max_length", [
    ("label=no_such_intent", 64),          # unknown label
    ("candidates=1,12,3", 64),             # '12' is two WordPiece tokens: 1 ##2
    ("candidates=1,zzzz", 64),             # an out-of-vocabulary word: several pieces
    ("length=4", 6),                       # 4 prefix + 4 secret tokens > 6 however counted
    ("length=4", 9),                       # 10 tokens with [CLS]/[SEP]: encode() would cut a digit
])
def test_plant_rejects(synthetic_labels, spec, max_length):
    with pytest.raises(ConfigError):
        _plant(spec, synthetic_labels, max_length=max_length)


def test_plant_accepts_exact_fit(synthetic_labels):
    """[CLS] my pin code is d d d d [SEP] is 10 tokens: max_length 10 keeps every digit."""
    assert len(_plant("length=4", synthetic_labels, max_length=10)) == 4


def test_insert_secrets_appends_repetitions():
    from dptrain.data import load_intent_data
    from dptrain.secret_canaries import insert_secrets

    data = load_intent_data("synthetic", seed=0, synthetic_per_intent=10)
    secrets = _plant("length=4;repetitions=1,3,6;label=play_music", data.label_names, seed=1)
    out = insert_secrets(data, secrets)
    n = len(data.train)
    total = sum(s.repetitions for s in secrets)
    assert len(out.train) == n + total
    assert out.train.texts[:n] == data.train.texts
    assert np.array_equal(out.train.labels[:n], data.train.labels)
    assert out.validation == data.validation and out.test == data.test
    assert out.label_names == data.label_names
    tail = list(zip(out.train.texts[n:], out.train.labels[n:].tolist()))
    expected = [(s.text, data.label_names.index(s.label)) for s in secrets for _ in range(s.repetitions)]
    assert sorted(tail) == sorted(expected)
    for s in secrets:
        assert out.train.texts.count(s.text) == s.repetitions


# ------------------------------------------------------------------------------------------------
# attacks.exposure: scores
# ------------------------------------------------------------------------------------------------
def test_score_matches_per_text_loop(tiny):
    """20 random triples scored with the model handed over in train mode (dropout on): the scorer
    must score in eval mode, so it must equal my eval-mode loop to 1e-5."""
    from attacks.exposure import SecretScorer

    model, tokenizer = tiny
    rng = np.random.default_rng(1)
    indices = rng.integers(0, len(DIGITS), size=(20, LENGTH))
    model.train()
    try:
        got = SecretScorer(model, tokenizer, PREFIX, DIGITS, LENGTH, LABEL_ID).score(indices)
    finally:
        model.eval()
    expected = np.array([reference_score(model, tokenizer, text_of(PREFIX, DIGITS, row), LABEL_ID)
                         for row in indices])
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (20,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_relaxed_one_hot_equals_score_and_has_gradient(scorer):
    rng = np.random.default_rng(2)
    indices = rng.integers(0, len(DIGITS), size=(8, LENGTH))
    weights = torch.nn.functional.one_hot(torch.as_tensor(indices), len(DIGITS)).float()
    weights.requires_grad_(True)
    relaxed = scorer.relaxed_log_prob(weights)
    assert isinstance(relaxed, torch.Tensor) and relaxed.shape == (8,)
    np.testing.assert_allclose(relaxed.detach().double().numpy(), scorer.score(indices),
                               rtol=0, atol=1e-6)
    relaxed.sum().backward()
    assert weights.grad is not None and weights.grad.shape == weights.shape
    assert torch.isfinite(weights.grad).all() and weights.grad.abs().sum() > 0


def test_relaxed_mixture_matches_own_inputs_embeds(tiny, scorer):
    """Non-one-hot weights: my own forward pass with E[prefix ids] and w @ E[candidate ids]."""
    model, tokenizer = tiny
    torch.manual_seed(3)
    weights = torch.distributions.Dirichlet(torch.ones(len(DIGITS))).sample((4, LENGTH))
    got = scorer.relaxed_log_prob(weights).detach().double().numpy()

    enc = tokenizer(text_of(PREFIX, DIGITS, (0,) * LENGTH), return_tensors="pt")
    n_prefix = len(tokenizer(PREFIX, add_special_tokens=False)["input_ids"])
    positions = list(range(1 + n_prefix, 1 + n_prefix + LENGTH))  # after [CLS] and the prefix
    assert enc["input_ids"][0, positions].tolist() == candidate_ids(tokenizer, ["0"] * LENGTH)
    table = model.get_input_embeddings().weight.detach()
    mixed = weights @ table[candidate_ids(tokenizer, DIGITS)]  # [R, LENGTH, hidden]
    embeds = table[enc["input_ids"][0]].unsqueeze(0).repeat(len(weights), 1, 1)
    embeds[:, positions] = mixed
    with torch.no_grad():
        logits = model(inputs_embeds=embeds,
                       attention_mask=enc["attention_mask"].repeat(len(weights), 1),
                       token_type_ids=torch.zeros_like(enc["attention_mask"]).repeat(len(weights), 1)
                       ).logits
    expected = phi(logits, LABEL_ID).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_flat_index():
    from attacks.exposure import flat_index

    one = flat_index((4, 0, 7, 2), 10)  # one tuple: one index (a scalar, not a 1-element array)
    assert np.ndim(one) == 0 and one == 4072, repr(one)
    assert np.ndim(flat_index(np.array([1, 2]), 3)) == 0 and flat_index(np.array([1, 2]), 3) == 5
    flats = [0, 1, 9, 10, 123, 999]
    rows = np.array([decode_flat(f, 10, 3) for f in flats])  # [M, length] → [M]
    np.testing.assert_array_equal(np.asarray(flat_index(rows, 10)).reshape(-1), flats)


def test_enumerate_scores_flat_order(tiny, scorer, reference_all, library_all):
    """All 1000 scores equal my batched scores in flat order, 50 random entries and both ends
    equal my one-text-at-a-time loop, and the batch size does not change the result."""
    from attacks.exposure import enumerate_scores

    model, tokenizer = tiny
    assert library_all.shape == (SPACE,) and library_all.dtype == np.float64
    np.testing.assert_allclose(library_all, reference_all, rtol=0, atol=1e-5)
    rng = np.random.default_rng(4)
    for flat in [0, SPACE - 1, *rng.choice(SPACE, size=50, replace=False).tolist()]:
        text = text_of(PREFIX, DIGITS, decode_flat(flat, len(DIGITS), LENGTH))
        assert library_all[flat] == pytest.approx(reference_score(model, tokenizer, text, LABEL_ID),
                                                  abs=1e-5)
    np.testing.assert_allclose(enumerate_scores(scorer, batch_size=7), library_all, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# attacks.exposure: rank and exposure
# ------------------------------------------------------------------------------------------------
def test_rank_of_and_exposure_definitions():
    from attacks.exposure import exposure, rank_of

    scores = np.array([3.0, 1.0, 3.0, 2.0, 3.0, -5.0])
    assert rank_of(scores, 0) == pytest.approx(2.0)   # 1 + 0 greater + 2 ties / 2
    assert rank_of(scores, 4) == pytest.approx(2.0)
    assert rank_of(scores, 3) == pytest.approx(4.0)   # 1 + 3 greater
    assert rank_of(scores, 1) == pytest.approx(5.0)
    assert rank_of(scores, 5) == pytest.approx(6.0)
    assert exposure(1000, 1) == pytest.approx(math.log2(1000))
    assert exposure(1000, 1000) == pytest.approx(0.0, abs=1e-12)
    assert exposure(1024, 2) == pytest.approx(9.0)
    assert exposure(1000, 2.5) == pytest.approx(math.log2(1000) - math.log2(2.5))


def test_rank_and_exposure_match_brute_force_sort(library_all):
    from attacks.exposure import exposure, rank_of

    mine = midranks(library_all)
    theirs = np.array([rank_of(library_all, f) for f in range(SPACE)])
    np.testing.assert_array_equal(theirs, mine)
    np.testing.assert_allclose([exposure(SPACE, r) for r in theirs],
                               math.log2(SPACE) - np.log2(mine), rtol=0, atol=1e-12)


def test_never_trained_candidates_average_about_one_over_ln2_bits(library_all):
    """Over all S candidates the mean exposure is exactly log2 S - log2(S!)/S (1.4364 for S =
    1000, no ties); 400 uniform random candidates average 1/ln 2 within 4 sd of the mean
    (sd of one exposure ~1/ln 2, so 4 * 1.443 / sqrt(400) = 0.29 bits)."""
    from attacks.exposure import exposure, rank_of

    assert len(np.unique(library_all)) == SPACE  # the exact identity below assumes no ties
    every = np.array([exposure(SPACE, rank_of(library_all, f)) for f in range(SPACE)])
    exact_mean = math.log2(SPACE) - math.lgamma(SPACE + 1) / math.log(2) / SPACE
    assert every.mean() == pytest.approx(exact_mean, abs=1e-9)
    assert abs(exact_mean - INV_LN2) < 0.01

    n = 400
    picks = np.random.default_rng(5).integers(0, SPACE, size=n)
    sampled = every[picks]
    assert abs(sampled.mean() - INV_LN2) <= 4 * INV_LN2 / math.sqrt(n)
    assert abs(sampled.std() - INV_LN2) <= 0.3  # the spread of chance is ~1/ln 2 too


def test_sampled_rank_intervals_cover_exact_rank(scorer, library_all):
    from attacks.exposure import sampled_rank

    exact = midranks(library_all)
    samples = 200
    rng = np.random.default_rng(6)
    covered = 0
    for trial, flat in enumerate(rng.choice(SPACE, size=10, replace=False).tolist()):
        result = sampled_rank(scorer, decode_flat(flat, len(DIGITS), LENGTH), samples=samples,
                              seed=trial, confidence=0.95)
        low, rank, high = result["low"], result["rank"], result["high"]
        assert 1 <= low <= rank <= high <= SPACE
        k = (rank - 1) * samples / (SPACE - 1)  # sampled candidates scoring strictly above
        assert 0 <= k <= samples and abs(k - round(k)) < 1e-6, result
        covered += low <= exact[flat] <= high
    assert covered >= 8, f"the 95% interval held the exact rank {covered} of 10 times"

    best = int(np.argmax(library_all))  # nothing can score above the best candidate: k = 0
    top = sampled_rank(scorer, decode_flat(best, len(DIGITS), LENGTH), samples=samples, seed=0)
    assert top["rank"] == pytest.approx(1.0) and top["low"] <= 1.0 <= top["high"]
    worst = int(np.argmin(library_all))  # every sample but copies of the secret scores above
    bottom = sampled_rank(scorer, decode_flat(worst, len(DIGITS), LENGTH), samples=samples, seed=0)
    assert bottom["rank"] >= 1 + (samples - 3) / samples * (SPACE - 1)
    assert bottom["low"] <= SPACE <= bottom["high"] + 1e-9


# ------------------------------------------------------------------------------------------------
# attacks.extraction
# ------------------------------------------------------------------------------------------------
def test_relaxation_attack_returns_coordinatewise_local_optimum(tiny):
    """No single position changed to any other candidate scores higher (all n (C - 1) = 36
    neighbours of a 4-digit guess, scored by my own loop; 1e-6 allows float32 batch noise)."""
    from attacks.exposure import SecretScorer
    from attacks.extraction import relaxation_attack

    model, tokenizer = tiny
    length = 4
    scorer4 = SecretScorer(model, tokenizer, PREFIX, DIGITS, length, LABEL_ID)
    guess = relaxation_attack(scorer4, reference=None, steps=40, restarts=2, seed=0)
    assert isinstance(guess, tuple) and len(guess) == length
    assert all(isinstance(g, (int, np.integer)) and 0 <= g < len(DIGITS) for g in guess)
    best = reference_score(model, tokenizer, text_of(PREFIX, DIGITS, guess), LABEL_ID)
    for position in range(length):
        for candidate in range(len(DIGITS)):
            if candidate == guess[position]:
                continue
            neighbour = list(guess)
            neighbour[position] = candidate
            score = reference_score(model, tokenizer, text_of(PREFIX, DIGITS, neighbour), LABEL_ID)
            assert score <= best + 1e-6, (guess, position, candidate, score, best)


# ------------------------------------------------------------------------------------------------
# Training runs: storage privacy and memorization end to end
# ------------------------------------------------------------------------------------------------
def _natural_train_size(per_intent: int, seed: int) -> int:
    from dptrain.data import load_intent_data

    return len(load_intent_data("synthetic", seed=seed, synthetic_per_intent=per_intent).train)


def test_run_keeps_secrets_private_but_trains_on_them(tmp_path):
    """A private (ε = 8) run with two 4-digit secrets planted 1 and 5 times."""
    from dptrain.trainer import TrainConfig, train_run

    config = TrainConfig(model="tiny", data="synthetic", epsilon=8.0, secrets="repetitions=1,5;length=4",
                         dp_seed=1, seed=0, synthetic_per_intent=10, epochs=1.0, batch_size=32,
                         physical_batch_size=64)
    run = tmp_path / "run"
    train_run(config, run, progress=False)

    stored = json.loads((run / "private" / "secrets.json").read_text())
    secrets = stored["secrets"]
    assert sorted(s["repetitions"] for s in secrets) == [1, 5]
    label_names = json.loads((run / "config.json").read_text())["data"]["label_names"]
    for s in secrets:
        assert {"prefix", "tokens", "candidates", "label", "repetitions"} <= set(s)
        assert s["prefix"] == PREFIX and list(s["candidates"]) == list(DIGITS)
        assert len(s["tokens"]) == 4 and set(s["tokens"]) <= set(DIGITS)
        assert s["label"] in label_names

    natural = _natural_train_size(10, 0)
    members = json.loads((run / "private" / "members.json").read_text())
    assert members["num_train_rows"] == natural + 1 + 5  # (the training size is private)
    assert members["num_members"] == natural

    texts = [(s["prefix"] + " " + " ".join(s["tokens"])).encode() for s in secrets]
    digits = [" ".join(s["tokens"]).encode() for s in secrets]
    checked = [run / "private" / "members.json", run / "config.json", run / "metrics.json"]
    checked += [p for p in run.rglob("*") if p.is_file() and "private" not in p.relative_to(run).parts]
    assert any(p.relative_to(run).parts[0] == "model" for p in checked)  # the saved model too
    for path in checked:
        content = path.read_bytes()
        for text, secret_digits in zip(texts, digits):
            assert text not in content and text.upper() not in content, f"secret text in {path}"
            assert secret_digits not in content, f"secret digits in {path}"


def test_non_private_training_memorizes_the_planted_secret(tmp_path):
    """A non-private run where the secret (100 copies in 820 examples) is memorized: its exposure,
    ranked by my own brute-force scores of all 1000 triples on the saved model, is >= 5 of the
    9.97 possible bits, while 20 fresh triples (same prefix and label, differing from the secret
    at every position) average at most chance + 3 sd = 1.44 + 3 * 1.44 / sqrt(20) ~= 2.4 bits.

    The library's scorer, enumeration and rank agree with the brute force on the same model.

    The recipe (5 epochs at lr 1e-3, ~2 s) stops while the secret dominates what the tiny model
    has learned: over seeds 0-5 the secret's exposure was 7.97-9.97 bits (fresh triples: 0.8-1.1).
    With the tiny model, training on until the intents are learned (test accuracy >= 0.85: e.g.
    40 epochs at lr 3e-3) saturates p(label | prefix) for every triple, and the secret's exposure
    then varies from 3.8 to 7.4 bits with the seed: not a reliable memorization check.
    """
    from attacks.exposure import SecretScorer, enumerate_scores, exposure, rank_of
    from dptrain.models import load_trained
    from dptrain.trainer import TrainConfig, train_run

    config = TrainConfig(model="tiny", data="synthetic", epsilon=float("inf"),
                         secrets="repetitions=100;length=3", dp_seed=0, seed=0,
                         synthetic_per_intent=30, epochs=5.0, lr=1e-3, batch_size=64,
                         physical_batch_size=256)
    run = tmp_path / "run"
    train_run(config, run, progress=False)
    (secret,) = json.loads((run / "private" / "secrets.json").read_text())["secrets"]
    label_names = json.loads((run / "config.json").read_text())["data"]["label_names"]
    assert json.loads((run / "private" / "members.json").read_text())["num_train_rows"] == (
        _natural_train_size(30, 0) + 100)
    label_id = label_names.index(secret["label"])
    candidates = tuple(secret["candidates"])
    assert candidates == DIGITS and secret["prefix"] == PREFIX

    model, tokenizer = load_trained(run / "model")
    tuples = all_tuples(len(candidates), LENGTH)
    mine = reference_scores_batched(model, tokenizer, [text_of(PREFIX, candidates, t) for t in tuples],
                                    label_id)
    ranks = midranks(mine)
    bits = math.log2(SPACE) - np.log2(ranks)
    true = tuple(candidates.index(t) for t in secret["tokens"])
    true_flat = tuples.index(true)
    assert bits[true_flat] >= 5.0, (
        f"planted secret {secret['tokens']}: rank {ranks[true_flat]} of {SPACE}, "
        f"exposure {bits[true_flat]:.2f} bits")

    rng = np.random.default_rng(7)
    fresh = []
    while len(fresh) < 20:
        t = tuple(int(x) for x in rng.integers(0, len(candidates), size=LENGTH))
        if all(a != b for a, b in zip(t, true)) and t not in fresh:
            fresh.append(t)
    fresh_bits = np.array([bits[tuples.index(t)] for t in fresh])
    assert fresh_bits.mean() <= INV_LN2 + 3 * INV_LN2 / math.sqrt(len(fresh)), fresh_bits

    lib_scorer = SecretScorer(model, tokenizer, PREFIX, candidates, LENGTH, label_id)
    theirs = enumerate_scores(lib_scorer, batch_size=256)
    np.testing.assert_allclose(theirs, mine, rtol=0, atol=1e-5)
    their_rank = rank_of(theirs, true_flat)
    assert their_rank == midranks(theirs)[true_flat]
    assert exposure(SPACE, their_rank) >= 5.0
