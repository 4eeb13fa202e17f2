"""Independent reference for DP-SGD on a joint intent + slot model trained through the
frozen-encoder token-state cache (``SlotBatches(..., cache_features=True)``).

Written from the mathematics alone, not from the implementation:

* Encoder E (frozen, eval mode). Utterance i with token ids x_i (special tokens included,
  truncated at ``max_length``) gives H_i = E(x_i) in R^{T_i x d}, computed here one utterance
  at a time, with no padding.
* Intent head: z_i = W_int . pool(H_i) + b_int, pool = H_i[0] ("cls") or the mean of the T_i
  rows ("mean").
* Tag head: for each word w whose FIRST sub-token survives truncation (found with the fast
  tokenizer's ``word_ids()``), y_{i,w} = W_tag . H_i[first(w)] + b_tag.
* l_i = CE(z_i, intent_i) + (1/W_i) sum_w CE(y_{i,w}, tag_{i,w})   (task "slots": no intent
  term), W_i = number of such words.
* g_i = d l_i / d(head parameters), by autograd, one utterance at a time, in float64;
  S = sum_i g_i * min(1, C / ||g_i||), ||.|| the L2 norm over all head parameters together.

Measured (test_exact_clip_formula): the library's clip factor is min(1, C/(||g|| + 1e-6)), a
conventional stabiliser; S is compared both with the pure formula (tolerance widened by exactly
what eps <= 1e-6 can move it) and with the stabilised one (float64 round-off, RTOL).

The library's S is what ``PerSampleClipper`` leaves in ``.grad`` after one backward of the
batch-mean ``.loss`` of ``batches.net``. Every check prints a ``RESULT`` line (``pytest -s``).
Each test also computes WRONG references (token mean over the batch, encoder in train mode,
every sub-token labelled, last sub-token, pads in the mean, truncated words counted, mean
instead of sum, per-tensor clipping) and asserts they are far outside the tolerance, so the
comparison can actually fail.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from dptrain import PerSampleClipper  # noqa: E402
from dptrain.joint_model import JointIntentSlotModel  # noqa: E402
from dptrain.models import set_trainable  # noqa: E402
from dptrain.slot_data import Utterance, load_slot_data  # noqa: E402
from dptrain.slot_trainer import SlotBatches, encode_slots, load_encoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LENGTH = 20
# float64: every quantity here is a few hundred flops deep from float64 states; batched padded
# vs. unpadded encoder passes agree to ~1e-15 relative. 1e-10 leaves 5 orders of margin and is
# still >= 1e3 times below the smallest bug signal measured below.
RTOL = 1e-10
# The clip factor min(1, C/||g||) may carry a numerical stabiliser (C/(||g|| + eps)); the
# largest eps that we accept silently is the conventional 1e-6 -- see _clip_tolerance.
MAX_STAB = 1e-6

Grads = Dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _batch_utterances(data) -> List[Utterance]:
    """Utterances of different lengths: some from the synthetic data whose words split into
    several sub-tokens (digits, apostrophes, '$'), some short ones, and constructed ones with
    long rare words (the tiny WordPiece vocabulary spells them letter by letter), one of which
    is cut by truncation in the middle of a word."""
    by_tokens = {u.tokens: u for u in data.train}
    picked: List[Utterance] = []
    # short, unsplit
    picked.append(min(data.train, key=lambda u: len(u.tokens)))
    # from the synthetic data: words that split ("5:45", "$300", "what's", "o'clock", ...)
    for wanted in ("5:45", "$300", "what's", "o'clock", "10:15"):
        for u in data.train:
            if wanted in u.tokens and u not in picked:
                picked.append(u)
                break
    # a long unsplit one
    picked.append(max((u for u in data.train if u not in picked), key=lambda u: len(u.tokens)))
    assert len(by_tokens) == len(data.train)
    assert "set_alarm" in data.intents and "set_reminder" in data.intents
    picked.append(
        Utterance(
            tokens=("wake", "me", "quizzically", "at", "7", "tomorrow"),
            tags=("O", "O", "O", "O", "B-time", "B-date"),
            intent="set_alarm",
        )
    )
    # truncated: "supercalifragilistic" is ~20 sub-tokens; max_length cuts inside it.
    picked.append(
        Utterance(
            tokens=("remind", "me", "to", "call", "supercalifragilistic", "about", "tomorrow"),
            tags=("O", "O", "O", "B-task", "I-task", "I-task", "B-date"),
            intent="set_reminder",
        )
    )
    return picked


class Tokenized:
    def __init__(self, tokenizer, utt: Utterance, data, max_length: int):
        enc = tokenizer(
            list(utt.tokens), is_split_into_words=True, truncation=True, max_length=max_length
        )
        self.ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        word_ids = enc.word_ids()
        seen = set()
        self.first: List[int] = []  # position of the first sub-token of each surviving word
        self.last: List[int] = []   # position of the last sub-token (for a wrong reference)
        self.words: List[int] = []  # the word index of each entry of self.first
        self.every_pos: List[int] = []  # every sub-token position (for a wrong reference)
        self.every_word: List[int] = []
        for p, w in enumerate(word_ids):
            if w is None:
                continue
            self.every_pos.append(p)
            self.every_word.append(w)
            if w not in seen:
                seen.add(w)
                self.first.append(p)
                self.words.append(w)
                self.last.append(p)
            else:
                self.last[-1] = p
        self.n_words_total = len(utt.tokens)
        self.intent = data.intents.index(utt.intent)
        self.tag_of_word = [data.tags.index(t) for t in utt.tags]
        self.tags = torch.tensor([self.tag_of_word[w] for w in self.words])
        self.n_split = sum(1 for w in set(self.every_word) if self.every_word.count(w) > 1)
        self.truncated = len(self.words) < self.n_words_total


# --------------------------------------------------------------------------------------------
# reference maths
# --------------------------------------------------------------------------------------------


def _states(encoder, ids: torch.Tensor, train_mode: bool = False, seed: int = 0) -> torch.Tensor:
    """H_i = E(x_i): one utterance, no padding, plain HF call."""
    was = encoder.training
    encoder.train(train_mode)
    torch.manual_seed(seed)
    with torch.no_grad():
        h = encoder(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
    encoder.train(was)
    return h.last_hidden_state[0].to(torch.float64)


def _head_params(model) -> Grads:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {n: p.detach().clone().to(torch.float64) for n, p in params.items()}


def _per_sample_loss(
    P: Grads,
    H: torch.Tensor,
    tk: Tokenized,
    task: str,
    pooling: str,
    *,
    tag_scale: float | None = None,
    positions: Sequence[int] | None = None,
    tags: torch.Tensor | None = None,
    pool_rows: int | None = None,
    n_words: int | None = None,
) -> torch.Tensor:
    """l_i from the formula. The keyword arguments exist only to build WRONG references."""
    pos = tk.first if positions is None else list(positions)
    tg = tk.tags if tags is None else tags
    word_logits = H[pos] @ P["tag_head.weight"].T + P["tag_head.bias"]
    tag_sum = F.cross_entropy(word_logits, tg, reduction="sum")
    denominator = len(pos) if n_words is None else n_words
    tag_term = tag_sum / denominator if tag_scale is None else tag_sum * tag_scale
    if task == "slots":
        return tag_term
    if pooling == "cls":
        pooled = H[0]
    else:
        rows = H.shape[0] if pool_rows is None else pool_rows
        pooled = H.sum(0) / rows  # pool_rows > T_i: pads (zero rows) counted in the mean
    z = pooled @ P["intent_head.weight"].T + P["intent_head.bias"]
    return tag_term + F.cross_entropy(z[None], torch.tensor([tk.intent]))


def _grad(P: Grads, loss_fn) -> Grads:
    leaves = {n: p.clone().requires_grad_(True) for n, p in P.items()}
    loss = loss_fn(leaves)
    names = list(leaves)
    gs = torch.autograd.grad(loss, [leaves[n] for n in names])
    return dict(zip(names, gs))


def _norm(g: Grads) -> float:
    return math.sqrt(sum(float((v * v).sum()) for v in g.values()))


def _clipped_sum(
    per_sample: List[Grads], C: float, *, per_tensor: bool = False, eps: float = 0.0
) -> Grads:
    out = {n: torch.zeros_like(v) for n, v in per_sample[0].items()}
    for g in per_sample:
        if per_tensor:  # WRONG reference: each tensor clipped on its own
            for n, v in g.items():
                out[n] += v * min(1.0, C / float(v.norm()))
        else:
            factor = min(1.0, C / (_norm(g) + eps))
            for n, v in g.items():
                out[n] += v * factor
    return out


def _diff(a: Grads, b: Grads) -> float:
    return math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in a))


def _rel(a: Grads, ref: Grads) -> float:
    return _diff(a, ref) / _norm(ref)


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------


class Setup:
    def __init__(self, task: str, pooling: str, seed: int = 0):
        torch.manual_seed(seed)
        self.task, self.pooling = task, pooling
        self.data = load_slot_data("synthetic", synthetic_per_intent=3, seed=0)
        self.encoder, self.tokenizer, _ = load_encoder("tiny")
        assert self.tokenizer.is_fast
        # the tiny encoder has dropout: the cache must be built in eval mode regardless
        assert self.encoder.config.hidden_dropout_prob > 0
        self.model = JointIntentSlotModel(
            self.encoder,
            len(self.data.intents),
            len(self.data.tags),
            task=task,
            pooling=pooling,
            dropout=0.0,
        )
        set_trainable(self.model, "head")
        self.model.double()
        self.model.train()  # deliberately: the library must switch the encoder to eval itself
        self.utts = _batch_utterances(self.data)
        self.toks = [Tokenized(self.tokenizer, u, self.data, MAX_LENGTH) for u in self.utts]
        enc = encode_slots(
            self.tokenizer, self.utts, self.data.intents, self.data.tags, MAX_LENGTH
        )
        self.encoder_calls = 0
        hook = self.encoder.register_forward_hook(self._count)
        self.batches = SlotBatches(
            self.model,
            {"train": enc},
            self.tokenizer.pad_token_id,
            torch.device("cpu"),
            cache_features=True,
        )
        self.calls_while_caching = self.encoder_calls
        self._hook = hook  # kept: counts encoder calls made while the cached net trains
        self.training_encoder_calls = 0
        self.net = self.batches.net
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        expected = {"tag_head.weight", "tag_head.bias"}
        if task == "joint":
            expected |= {"intent_head.weight", "intent_head.bias"}
        assert set(self.trainable) == expected, sorted(self.trainable)
        # the cached module trains THE SAME tensors as the model
        net_params = {id(p) for p in self.net.parameters() if p.requires_grad}
        assert net_params == {id(p) for p in self.trainable.values()}
        self.P = _head_params(self.model)
        self.H = [_states(self.encoder, tk.ids) for tk in self.toks]  # counted, but not in
        # training_encoder_calls (only library_sum adds to that)

    def _count(self, *_):
        self.encoder_calls += 1

    # reference ---------------------------------------------------------------------------
    def ref_grads(self, idx: Sequence[int], **kw) -> List[Grads]:
        return [
            _grad(
                self.P,
                lambda P, i=i: _per_sample_loss(P, self.H[i], self.toks[i], self.task, self.pooling, **kw),
            )
            for i in idx
        ]

    # library -----------------------------------------------------------------------------
    def library_sum(self, idx: Sequence[int], C: float, norm_method: str) -> Grads:
        for p in self.trainable.values():
            p.grad = None
        clipper = PerSampleClipper(self.net, max_grad_norm=C, norm_method=norm_method)
        before = self.encoder_calls
        try:
            out = self.net(**self.batches.batch("train", list(idx)))
            out.loss.backward()
        finally:
            clipper.detach()
        self.training_encoder_calls += self.encoder_calls - before
        res = {}
        for n, p in self.trainable.items():
            assert p.grad is not None, n
            res[n] = p.grad.detach().clone().to(torch.float64)
            p.grad = None
        return res


CASES = [
    (task, pooling, method)
    for task in ("joint", "slots")
    for pooling in ("cls", "mean")
    for method in ("ghost", "instantiate")
]


@pytest.fixture(scope="module")
def setups():
    cache: Dict[tuple, Setup] = {}

    def get(task, pooling):
        if (task, pooling) not in cache:
            cache[(task, pooling)] = Setup(task, pooling)
        return cache[(task, pooling)]

    return get


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_batch_has_padding_split_words_and_truncation(setups):
    s = setups("joint", "cls")
    lengths = [len(tk.ids) for tk in s.toks]
    split_in_synthetic = sum(
        1
        for u in s.data.train
        if Tokenized(s.tokenizer, u, s.data, 512).n_split > 0
    )
    split_in_batch = [tk.n_split for tk in s.toks]
    truncated = [tk.truncated for tk in s.toks]
    print(
        f"\nRESULT batch: {len(s.toks)} utterances, token lengths {lengths}, words split into "
        f">1 sub-token per utterance {split_in_batch}; synthetic train utterances with a split "
        f"word: {split_in_synthetic}/{len(s.data.train)}; truncated at {MAX_LENGTH}: {truncated}; "
        f"encoder calls while caching {s.calls_while_caching}"
    )
    assert len(set(lengths)) >= 4  # padding matters
    assert sum(1 for n in split_in_batch if n > 0) >= 4  # several utterances with split words
    assert split_in_synthetic > 0
    assert any(truncated)
    # the truncated one is cut INSIDE a word: the word still counts (its first sub-token is in)
    tk = s.toks[truncated.index(True)]
    assert tk.ids[-1] == s.tokenizer.sep_token_id
    untruncated = Tokenized(s.tokenizer, s.utts[truncated.index(True)], s.data, 512)
    last = tk.words[-1]
    assert tk.every_word.count(last) < untruncated.every_word.count(last)


@pytest.mark.parametrize("task,pooling,norm_method", CASES)
def test_clipped_sum_matches_reference(setups, task, pooling, norm_method):
    s = setups(task, pooling)
    idx = list(range(len(s.toks)))
    per_sample = s.ref_grads(idx)
    norms = sorted(_norm(g) for g in per_sample)
    report = []
    worst = 0.0
    # none clipped / about half clipped / all clipped
    for label, C in (
        ("none", 2 * norms[-1]),
        ("mixed", 0.5 * (norms[len(norms) // 2 - 1] + norms[len(norms) // 2])),
        ("all", 0.5 * norms[0]),
    ):
        ref = _clipped_sum(per_sample, C)
        lib = s.library_sum(idx, C, norm_method)
        err = _rel(lib, ref)
        # the same maths with the stabilised factor min(1, C/(||g|| + 1e-6)) (measured in
        # test_exact_clip_formula): with it the agreement is at float64 round-off
        err_stab = _rel(lib, _clipped_sum(per_sample, C, eps=MAX_STAB))
        # S is the SUM of clipped per-sample gradients, not the mean
        mean_err = _rel(lib, {n: v / len(idx) for n, v in ref.items()})
        report.append(
            f"{label}(C={C:.4g}): rel err {err:.2e} (eps=1e-6 factor: {err_stab:.2e}), "
            f"vs mean {mean_err:.2e}"
        )
        worst = max(worst, err_stab)
        assert err <= _clip_tolerance(per_sample, C), (label, err)
        assert err_stab <= RTOL, (label, err_stab)
        assert mean_err > 0.5
    assert s.training_encoder_calls == 0, "the cached path ran the encoder during training"
    print(
        f"\nRESULT {task}/{pooling}/{norm_method}: per-utterance norms "
        f"[{norms[0]:.4g}..{norms[-1]:.4g}]; " + "; ".join(report) + f"; worst(eps) {worst:.2e}"
    )


def _clip_tolerance(per_sample: List[Grads], C: float) -> float:
    """RTOL, plus what a stabiliser eps <= MAX_STAB in C/(||g|| + eps) can move S by,
    relative: sum over clipped samples of C * eps/||g||, over ||S||. Zero when nothing is
    clipped."""
    S = _clipped_sum(per_sample, C)
    extra = sum(C * MAX_STAB / _norm(g) for g in per_sample if _norm(g) > C)
    return RTOL + extra / _norm(S)


@pytest.mark.parametrize("task,pooling,norm_method", CASES)
def test_exact_clip_formula(setups, task, pooling, norm_method):
    """Which clip factor: exactly min(1, C/||g||) or min(1, C/(||g|| + eps))? Measured on a
    single utterance far above C, where S = g * factor exactly."""
    s = setups(task, pooling)
    i = max(range(len(s.toks)), key=lambda j: len(s.toks[j].ids))
    (g,) = s.ref_grads([i])
    n = _norm(g)
    C = 1e-3 * n
    lib = s.library_sum([i], C, norm_method)
    # fit factor by projection on g
    dot = sum(float((lib[k] * g[k]).sum()) for k in g)
    factor = dot / n**2
    implied_eps = C / factor - n
    resid = _diff(lib, {k: v * factor for k, v in g.items()}) / _norm(lib)
    print(
        f"\nRESULT clip factor {task}/{pooling}/{norm_method}: ||g||={n:.6g}, C={C:.4g}, "
        f"factor*||g||/C = {factor * n / C:.12f}, implied eps = {implied_eps:.3e}, "
        f"direction residual {resid:.1e}"
    )
    assert resid < RTOL
    assert abs(implied_eps) <= MAX_STAB * (1 + 1e-3) + 1e-9 * n


@pytest.mark.parametrize("task,pooling,norm_method", CASES)
def test_wrong_references_are_distinguishable(setups, task, pooling, norm_method):
    """The tolerance above is tight enough to catch plausible bugs."""
    s = setups(task, pooling)
    idx = list(range(len(s.toks)))
    per_sample = s.ref_grads(idx)
    norms = sorted(_norm(g) for g in per_sample)
    C = 0.5 * (norms[len(norms) // 2 - 1] + norms[len(norms) // 2])  # mixed regime
    lib = s.library_sum(idx, C, norm_method)
    right = _rel(lib, _clipped_sum(per_sample, C))
    tol = _clip_tolerance(per_sample, C)  # the looser of the two tolerances used above
    assert right <= tol

    total_words = sum(len(tk.first) for tk in s.toks)
    B = len(idx)
    wrong: Dict[str, List[Grads]] = {}
    # tag losses averaged over all the batch's words instead of per utterance
    wrong["token-mean over batch"] = s.ref_grads(idx, tag_scale=B / total_words)
    # encoder in train mode (dropout on) when the cache is built
    H_train = [_states(s.encoder, tk.ids, train_mode=True, seed=7) for tk in s.toks]
    wrong["encoder in train mode"] = [
        _grad(s.P, lambda P, i=i: _per_sample_loss(P, H_train[i], s.toks[i], task, pooling))
        for i in idx
    ]
    # every sub-token labelled with its word's tag
    wrong["every sub-token labelled"] = [
        _grad(
            s.P,
            lambda P, i=i: _per_sample_loss(
                P,
                s.H[i],
                s.toks[i],
                task,
                pooling,
                positions=s.toks[i].every_pos,
                tags=torch.tensor([s.toks[i].tag_of_word[w] for w in s.toks[i].every_word]),
            ),
        )
        for i in idx
    ]
    # last sub-token of each word instead of the first
    wrong["last sub-token"] = [
        _grad(
            s.P,
            lambda P, i=i: _per_sample_loss(P, s.H[i], s.toks[i], task, pooling, positions=s.toks[i].last),
        )
        for i in idx
    ]
    # W_i counting the words lost to truncation too
    wrong["truncated words counted in W_i"] = [
        _grad(
            s.P,
            lambda P, i=i: _per_sample_loss(
                P, s.H[i], s.toks[i], task, pooling, n_words=s.toks[i].n_words_total
            ),
        )
        for i in idx
    ]
    if task == "joint" and pooling == "mean":
        T = max(len(tk.ids) for tk in s.toks)
        # mean pooling over the padded length (pads as zero rows, or any pad state, counted)
        wrong["pads in the mean"] = [
            _grad(
                s.P,
                lambda P, i=i: _per_sample_loss(P, s.H[i], s.toks[i], task, pooling, pool_rows=T),
            )
            for i in idx
        ]
    if task == "joint":
        other = "mean" if pooling == "cls" else "cls"
        wrong[f"{other} pooling"] = [
            _grad(s.P, lambda P, i=i: _per_sample_loss(P, s.H[i], s.toks[i], task, other))
            for i in idx
        ]

    lines = [f"right {right:.2e} (tol {tol:.1e})"]
    for name, grads in wrong.items():
        d = _rel(lib, _clipped_sum(grads, C))
        lines.append(f"{name} {d:.2e}")
        assert d > 1e3 * tol, (name, d)
    d = _rel(lib, _clipped_sum(per_sample, C, per_tensor=True))
    lines.append(f"per-tensor clipping {d:.2e}")
    assert d > 1e3 * tol
    d = _rel(lib, {n: v.clone() for n, v in _sum(per_sample).items()})
    lines.append(f"no clipping {d:.2e}")
    assert d > 1e3 * tol
    print(f"\nRESULT wrong refs {task}/{pooling}/{norm_method}: " + "; ".join(lines))


def _sum(per_sample: List[Grads]) -> Grads:
    out = {n: torch.zeros_like(v) for n, v in per_sample[0].items()}
    for g in per_sample:
        for n, v in g.items():
            out[n] += v
    return out


@pytest.mark.parametrize("task,pooling,norm_method", CASES)
def test_sensitivity_remove_one(setups, task, pooling, norm_method):
    s = setups(task, pooling)
    idx = list(range(len(s.toks)))
    norms = [_norm(g) for g in s.ref_grads(idx)]
    lines = []
    for label, C in (("mixed", sorted(norms)[len(norms) // 2]), ("below all", 0.5 * min(norms))):
        full = s.library_sum(idx, C, norm_method)
        moves = []
        for j in idx:
            rest = [i for i in idx if i != j]
            moves.append(_diff(full, s.library_sum(rest, C, norm_method)) / C)
        lines.append(f"{label}: max ||S - S_-j||/C = {max(moves):.12f}, min {min(moves):.12f}")
        assert max(moves) <= 1 + 1e-9
        if label == "below all":
            # exactly C up to a stabiliser eps: C*||g||/(||g||+eps)
            for j, m in zip(idx, moves):
                assert abs(m - 1) <= MAX_STAB / norms[j] + 1e-9, (j, m)
        else:
            # unclipped ones move S by exactly their own norm
            for j, m in zip(idx, moves):
                expected = min(1.0, C / norms[j]) * norms[j] / C
                assert abs(m - expected) <= MAX_STAB / norms[j] + 1e-9, (j, m, expected)
    print(f"\nRESULT sensitivity {task}/{pooling}/{norm_method}: " + "; ".join(lines))


@pytest.mark.parametrize("task,pooling", [(t, p) for t in ("joint", "slots") for p in ("cls", "mean")])
def test_cached_predictions_equal_full_model(setups, task, pooling):
    s = setups(task, pooling)
    idx = list(range(len(s.toks)))
    T = max(len(tk.ids) for tk in s.toks)
    pad = s.tokenizer.pad_token_id
    ids = torch.full((len(idx), T), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), T), dtype=torch.long)
    for r, tk in enumerate(s.toks):
        ids[r, : len(tk.ids)] = tk.ids
        mask[r, : len(tk.ids)] = 1
    was = s.model.training
    s.model.eval()
    try:
        with torch.no_grad():
            full = s.model(input_ids=ids, attention_mask=mask)
            cached = s.net(**s.batches.batch("train", idx))
    finally:
        s.model.train(was)
    # reference logits from the unpadded one-at-a-time states
    P = s.P
    err_full_cache_int = err_full_ref_int = 0.0
    err_full_cache_tag = err_full_ref_tag = 0.0
    scale = 0.0
    for r, tk in enumerate(s.toks):
        H = s.H[r]
        ref_tag = H[tk.first] @ P["tag_head.weight"].T + P["tag_head.bias"]
        full_tag = full.tag_logits[r].to(torch.float64)
        # the full model's tag logits per token (or per word): take the words' first sub-tokens
        if full_tag.shape[0] == T:
            full_tag = full_tag[tk.first]
        else:
            full_tag = full_tag[: len(tk.first)]
        cached_tag = cached.tag_logits[r].to(torch.float64)
        assert cached_tag.shape[0] >= len(tk.first)
        cached_tag = cached_tag[: len(tk.first)]
        err_full_cache_tag = max(err_full_cache_tag, float((full_tag - cached_tag).abs().max()))
        err_full_ref_tag = max(err_full_ref_tag, float((full_tag - ref_tag).abs().max()))
        scale = max(scale, float(ref_tag.abs().max()))
        if task == "joint":
            pooled = H[0] if pooling == "cls" else H.mean(0)
            ref_int = pooled @ P["intent_head.weight"].T + P["intent_head.bias"]
            f_int = full.intent_logits[r].to(torch.float64)
            c_int = cached.intent_logits[r].to(torch.float64)
            err_full_cache_int = max(err_full_cache_int, float((f_int - c_int).abs().max()))
            err_full_ref_int = max(err_full_ref_int, float((f_int - ref_int).abs().max()))
            scale = max(scale, float(ref_int.abs().max()))
    # the train-mode (dropout) encoder would give visibly different logits
    H_train = _states(s.encoder, s.toks[0].ids, train_mode=True, seed=3)
    dropout_gap = float(
        (
            H_train[s.toks[0].first] @ P["tag_head.weight"].T
            - s.H[0][s.toks[0].first] @ P["tag_head.weight"].T
        ).abs().max()
    )
    print(
        f"\nRESULT predictions {task}/{pooling}: max |full - cached| intent {err_full_cache_int:.2e} "
        f"tag {err_full_cache_tag:.2e}; max |full - reference| intent {err_full_ref_int:.2e} "
        f"tag {err_full_ref_tag:.2e}; logit scale {scale:.3g}; dropout gap {dropout_gap:.2e}"
    )
    if task == "slots":
        assert full.intent_logits is None and cached.intent_logits is None
    tol = RTOL * max(scale, 1.0)
    for e in (err_full_cache_int, err_full_cache_tag, err_full_ref_int, err_full_ref_tag):
        assert e <= tol
    assert dropout_gap > 1e3 * tol
