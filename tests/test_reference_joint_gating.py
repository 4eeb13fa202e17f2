"""Independent reference for the joint model's ``tag_layers`` (layer mean for the tag states) and
``intent_tag_bias`` (a learned intent x tag bias table), under DP-SGD.

Written from the mathematics alone, not from the implementation:

* Encoder E with L layers; ``output_hidden_states`` gives h^0 (embeddings) .. h^L, computed here
  one utterance at a time, unpadded, in float64 (``torch.func.functional_call`` on the encoder's
  own parameters, so that the encoder's parameters are autograd leaves of the reference).
* pooled p_i = h^L_i[0] ("cls") or the mean of the T_i rows of h^L_i ("mean"), whatever k is.
* tag states s_i = (1/k) sum_{j=L-k+1..L} h^j_i (the LAST k hidden states).
* z_i = W_int p_i + b_int; y_{i,w} = W_tag s_i[first(w)] + b_tag (first sub-token of word w,
  from the fast tokenizer's ``word_ids()``).
* with the bias table B (num_intents x num_tags): the LOSS uses y_{i,w} + B[gold intent_i]; the
  PREDICTION (``tag_logits``) is y + B[argmax z_i], with no gradient into B through that path.
* l_i = CE(z_i, intent_i) + (1/W_i) sum_w CE(., tag_{i,w}); batch loss = mean_i l_i.
* g_i = d l_i / d theta (all trainable parameters), S = sum_i g_i min(1, C/(||g_i|| + 1e-6)).

S is compared with what ``PerSampleClipper`` leaves in ``.grad`` after one backward of the batch
loss, (a) on the full model with the encoder training, (b) on the frozen encoder's cached heads
net (``SlotBatches(..., cache_features=True).net``). Each check prints a ``RESULT`` line
(``pytest -s``). WRONG references (tag states from h^L only, mean of the FIRST k states, pooling
from the layer mean, bias indexed by the predicted intent in the loss, bias ignored in the loss,
per-tensor clipping) are computed too and asserted far outside the tolerance.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from torch.func import functional_call  # noqa: E402

from dptrain import PerSampleClipper  # noqa: E402
from dptrain.errors import ConfigError  # noqa: E402
from dptrain.joint_model import JointIntentSlotModel  # noqa: E402
from dptrain.models import set_trainable  # noqa: E402
from dptrain.slot_data import Utterance, load_slot_data  # noqa: E402
from dptrain.slot_trainer import SlotBatches, encode_slots, load_encoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

Grads = Dict[str, torch.Tensor]

MAX_LENGTH = 24
HIDDEN = 32
LAYERS = 2
IGNORE = -100
STAB = 1e-6  # the library's stabiliser in C / (||g|| + 1e-6)
# float64 throughout: batched/padded vs one-at-a-time encoder passes agree to ~1e-14 relative.
RTOL = 1e-9
HEAD_NAMES = ("intent_head.weight", "intent_head.bias", "tag_head.weight", "tag_head.bias")
BIAS_NAME = "intent_tag_bias.weight"


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    data = load_slot_data("synthetic", synthetic_per_intent=3, seed=0)
    _, tokenizer, _ = load_encoder("tiny")
    assert tokenizer.is_fast
    utts = _pick(data)
    toks = [Tokenized(tokenizer, u, data) for u in utts]
    enc = encode_slots(tokenizer, utts, data.intents, data.tags, MAX_LENGTH)
    # the library's encoding agrees with the one built here (ids, first-sub-token labels, intents)
    for r, tk in enumerate(toks):
        assert list(enc.ids[r]) == tk.ids.tolist()
        assert list(enc.tags[r]) == tk.token_labels.tolist(), (r, list(enc.tags[r]))
        assert int(enc.intents[r]) == tk.intent
    return dict(data=data, tokenizer=tokenizer, utts=utts, toks=toks, enc=enc)


def _pick(data) -> List[Utterance]:
    """Six utterances of different lengths and intents, several with words split into more
    than one sub-token, plus one with a long rare word (spelt letter by letter)."""
    picked: List[Utterance] = [min(data.train, key=lambda u: len(u.tokens))]
    for wanted in ("5:45", "$300", "what's", "o'clock"):
        for u in data.train:
            if wanted in u.tokens and u not in picked:
                picked.append(u)
                break
    picked.append(max((u for u in data.train if u not in picked), key=lambda u: len(u.tokens)))
    picked.append(Utterance(tokens=("wake", "me", "quizzically", "at", "7", "tomorrow"),
                            tags=("O", "O", "O", "O", "B-time", "B-date"), intent="set_alarm"))
    return picked


class Tokenized:
    def __init__(self, tokenizer, utt: Utterance, data):
        enc = tokenizer(list(utt.tokens), is_split_into_words=True, truncation=True,
                        max_length=MAX_LENGTH)
        self.ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        seen = set()
        self.first: List[int] = []
        self.n_split = 0
        counts: Dict[int, int] = {}
        labels = [IGNORE] * len(self.ids)
        for p, w in enumerate(enc.word_ids()):
            if w is None:
                continue
            counts[w] = counts.get(w, 0) + 1
            if w not in seen:
                seen.add(w)
                self.first.append(p)
                labels[p] = data.tags.index(utt.tags[w])
        self.n_split = sum(1 for c in counts.values() if c > 1)
        self.token_labels = torch.tensor(labels)
        self.tags = self.token_labels[self.first]
        self.intent = data.intents.index(utt.intent)


def padded_batch(toks: Sequence["Tokenized"], idx: Sequence[int], pad: int, task: str) -> dict:
    T = max(len(toks[i].ids) for i in idx)
    n = len(idx)
    ids = torch.full((n, T), pad, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    labels = torch.full((n, T), IGNORE, dtype=torch.long)
    for r, i in enumerate(idx):
        L = len(toks[i].ids)
        ids[r, :L] = toks[i].ids
        mask[r, :L] = 1
        labels[r, :L] = toks[i].token_labels
    out = dict(input_ids=ids, attention_mask=mask, tag_labels=labels)
    if task == "joint":
        out["labels"] = torch.tensor([toks[i].intent for i in idx])
    return out


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def make_encoder(kind: str, vocab: int, pad: int):
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**common), add_pooling_layer=False)
    # RoBERTa: positions counted from padding_idx + 1 over non-pad ids; pad id = the tokenizer's
    return transformers.RobertaModel(
        transformers.RobertaConfig(pad_token_id=pad, bos_token_id=2, eos_token_id=3,
                                   type_vocab_size=1, **common),
        add_pooling_layer=False,
    )


class Setup:
    """One model configuration: its reference per-utterance gradients and library sums."""

    def __init__(self, world, kind: str, k: int, bias: bool, pooling: str, task: str = "joint"):
        self.w = world
        self.kind, self.k, self.bias, self.pooling, self.task = kind, k, bias, pooling, task
        self.toks: List[Tokenized] = world["toks"]
        self.pad = world["tokenizer"].pad_token_id
        seed = 1000 * (kind == "roberta") + 100 * k + 10 * bias + (pooling == "mean")
        torch.manual_seed(seed)
        data = world["data"]
        encoder = make_encoder(kind, len(world["tokenizer"]), self.pad)
        self.model = JointIntentSlotModel(encoder, len(data.intents), len(data.tags), task=task,
                                          pooling=pooling, dropout=0.0, tag_layers=k,
                                          intent_tag_bias=bias)
        self.bias_initially_zero = None
        if bias:
            table = self.model.intent_tag_bias
            assert isinstance(table, torch.nn.Embedding)
            self.bias_initially_zero = bool((table.weight == 0).all())
            with torch.no_grad():  # make it matter
                table.weight.normal_(0.0, 1.0)
        with torch.no_grad():  # larger head weights: logits of order 1, distinct intents
            params = dict(self.model.named_parameters())
            for n in ("intent_head.weight", "tag_head.weight"):
                if n in params:
                    params[n].normal_(0.0, 0.5)
        self.model.double()
        self.model.train()  # every dropout is 0: deterministic
        set_trainable(self.model, "all")
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        expected_heads = {"tag_head.weight", "tag_head.bias"}
        if task == "joint":
            expected_heads |= {"intent_head.weight", "intent_head.bias"}
        if bias:
            expected_heads.add(BIAS_NAME)
        self.head_names = [n for n in self.names if not n.startswith("encoder.")]
        assert set(self.head_names) == expected_heads, self.head_names
        self.P = {n: p.detach().clone().to(torch.float64)
                  for n, p in self.model.named_parameters()}
        self.encoder = self.model.encoder
        self._batches = None
        self._ref: Dict[str, List[Grads]] = {}

    # ---- reference --------------------------------------------------------------------------
    def forward_ref(self, P: Grads, i: int, variant: str = "right"):
        """(l_i, z_i, prediction tag logits over all T_i tokens) from the formulas."""
        tk = self.toks[i]
        enc_params = {n[len("encoder."):]: v for n, v in P.items() if n.startswith("encoder.")}
        out = functional_call(
            self.encoder, enc_params, args=(),
            kwargs=dict(input_ids=tk.ids[None], attention_mask=torch.ones_like(tk.ids)[None],
                        output_hidden_states=True),
        )
        hs = [h[0].to(torch.float64) for h in out.hidden_states]
        assert len(hs) == LAYERS + 1
        last = hs[-1]
        k = self.k
        if variant == "tag-last-only":
            s = last
        elif variant == "tag-first-k":
            s = torch.stack(hs[:k]).mean(0)
        else:
            s = torch.stack(hs[-k:]).mean(0)
        pool_src = s if variant == "pool-layer-mean" else last
        y = s @ P["tag_head.weight"].T + P["tag_head.bias"]  # [T_i, num_tags]
        if self.task == "slots":
            return F.cross_entropy(y[tk.first], tk.tags), None, y
        pooled = pool_src[0] if self.pooling == "cls" else pool_src.mean(0)
        z = pooled @ P["intent_head.weight"].T + P["intent_head.bias"]
        pred = int(z.argmax())
        y_loss = y[tk.first]
        if self.bias:
            B = P[BIAS_NAME]
            if variant == "bias-predicted":
                y_loss = y_loss + B[pred]
            elif variant != "bias-ignored":
                y_loss = y_loss + B[tk.intent]
            y_pred = y + B[pred].detach()
        else:
            y_pred = y
        loss = F.cross_entropy(z[None], torch.tensor([tk.intent])) + F.cross_entropy(y_loss, tk.tags)
        return loss, z, y_pred

    def ref_grads(self, variant: str = "right") -> List[Grads]:
        if variant not in self._ref:
            res = []
            for i in range(len(self.toks)):
                leaves = {n: self.P[n].clone().requires_grad_(True) for n in self.names}
                P = dict(self.P)
                P.update(leaves)
                loss, _, _ = self.forward_ref(P, i, variant)
                gs = torch.autograd.grad(loss, [leaves[n] for n in self.names], allow_unused=True)
                res.append({n: (torch.zeros_like(leaves[n]) if g is None else g.detach())
                            for n, g in zip(self.names, gs)})
            self._ref[variant] = res
        return self._ref[variant]

    def ref_head_grads(self, variant: str = "right") -> List[Grads]:
        """Frozen encoder: the head components of the same per-utterance gradients."""
        return [{n: g[n] for n in self.head_names} for g in self.ref_grads(variant)]

    # ---- library ----------------------------------------------------------------------------
    @property
    def batches(self) -> SlotBatches:
        if self._batches is None:
            set_trainable(self.model, "head")
            self._batches = SlotBatches(self.model, {"train": self.w["enc"]}, self.pad,
                                        torch.device("cpu"), cache_features=True)
        return self._batches

    def library_sum(self, path: str, idx: Sequence[int], C: float, norm_method: str) -> Grads:
        if path == "full":
            set_trainable(self.model, "all")
            net, inputs, names = self.model, padded_batch(self.toks, idx, self.pad, self.task), self.names
        else:
            batches = self.batches
            set_trainable(self.model, "head")
            net, inputs, names = batches.net, batches.batch("train", list(idx)), self.head_names
        params = dict(self.model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        assert trainable == set(names), sorted(trainable ^ set(names))
        for p in params.values():
            p.grad = None
        clipper = PerSampleClipper(net, max_grad_norm=C, norm_method=norm_method)
        try:
            out = net(**inputs)
            out.loss.backward()
        finally:
            clipper.detach()
        res = {}
        for n in names:
            g = params[n].grad
            res[n] = torch.zeros_like(self.P[n]) if g is None else g.detach().clone().double()
        for p in params.values():
            p.grad = None
        return res


@pytest.fixture(scope="module")
def setups(world):
    cache: Dict[tuple, Setup] = {}

    def get(*key):
        if key not in cache:
            cache[key] = Setup(world, *key)
        return cache[key]

    return get


# --------------------------------------------------------------------------------------------
# clipping maths
# --------------------------------------------------------------------------------------------


def _norm(g: Grads) -> float:
    return math.sqrt(sum(float((v * v).sum()) for v in g.values()))


def _clipped_sum(per_sample: List[Grads], C: float, *, eps: float = STAB,
                 per_tensor: bool = False) -> Grads:
    out = {n: torch.zeros_like(v) for n, v in per_sample[0].items()}
    for g in per_sample:
        if per_tensor:  # WRONG reference
            for n, v in g.items():
                out[n] += v * min(1.0, C / (float(v.norm()) + eps))
        else:
            f = min(1.0, C / (_norm(g) + eps))
            for n, v in g.items():
                out[n] += v * f
    return out


def _diff(a: Grads, b: Grads) -> float:
    return math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in b))


def _rel(a: Grads, ref: Grads) -> float:
    return _diff(a, ref) / _norm(ref)


def _worst_tensor_rel(a: Grads, ref: Grads, names: Sequence[str]) -> float:
    return max(float((a[n] - ref[n]).norm() / ref[n].norm()) for n in names)


def _pure_tolerance(per_sample: List[Grads], C: float) -> float:
    """What eps <= 1e-6 in C/(||g|| + eps) can move S by, relative, plus RTOL."""
    S = _clipped_sum(per_sample, C, eps=0.0)
    extra = sum(C * STAB / _norm(g) for g in per_sample if _norm(g) > C)
    return RTOL + extra / _norm(S)


def _mixed_C(per_sample: List[Grads]) -> float:
    norms = sorted(_norm(g) for g in per_sample)
    m = len(norms) // 2
    return 0.5 * (norms[m - 1] + norms[m])


# --------------------------------------------------------------------------------------------
# 1. clipped sums
# --------------------------------------------------------------------------------------------

CONFIGS = [(kind, k, bias, pooling)
           for kind in ("bert", "roberta")
           for k in (1, 2, 3)
           for bias in (False, True)
           for pooling in ("cls", "mean")]


def test_batch_is_interesting(world):
    toks = world["toks"]
    lengths = [len(t.ids) for t in toks]
    splits = [t.n_split for t in toks]
    intents = [t.intent for t in toks]
    print(f"\nRESULT batch: token lengths {lengths}, split words {splits}, gold intents {intents}")
    assert len(set(lengths)) >= 4
    assert sum(1 for s in splits if s) >= 3
    assert len(set(intents)) >= 3


@pytest.mark.parametrize("kind,k,bias,pooling", CONFIGS)
def test_clipped_sum_matches_reference(setups, kind, k, bias, pooling):
    s = setups(kind, k, bias, pooling)
    idx = list(range(len(s.toks)))
    lines = []
    worst = 0.0
    for path, per_sample in (("full", s.ref_grads()), ("cached", s.ref_head_grads())):
        norms = sorted(_norm(g) for g in per_sample)
        C = _mixed_C(per_sample)
        n_clipped = sum(1 for x in norms if x > C)
        assert 0 < n_clipped < len(norms)
        ref = _clipped_sum(per_sample, C)
        pure_tol = _pure_tolerance(per_sample, C)
        pure = _clipped_sum(per_sample, C, eps=0.0)
        check = list(s.head_names)
        for method in ("ghost", "instantiate"):
            lib = s.library_sum(path, idx, C, method)
            assert set(lib) == set(ref)
            err = _rel(lib, ref)
            err_heads = _worst_tensor_rel(lib, ref, check)
            err_pure = _rel(lib, pure)
            worst = max(worst, err, err_heads)
            lines.append(f"{path}/{method} rel {err:.1e} heads {err_heads:.1e} (pure {err_pure:.1e}"
                         f" <= {pure_tol:.1e})")
            assert err <= RTOL, (path, method, err)
            assert err_heads <= RTOL, (path, method, err_heads)
            assert err_pure <= pure_tol, (path, method, err_pure)
        lines.append(f"{path}: norms [{norms[0]:.3g}..{norms[-1]:.3g}] C={C:.3g} "
                     f"clipped {n_clipped}/{len(norms)}")
    print(f"\nRESULT clipped sum {kind} k={k} bias={bias} {pooling}: worst {worst:.2e}; "
          + "; ".join(lines))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_clipped_sum_slots_task(setups, kind):
    """task "slots" (no intent term, no bias) with a layer mean."""
    s = setups(kind, 2, False, "cls", "slots")
    assert set(s.head_names) == {"tag_head.weight", "tag_head.bias"}
    idx = list(range(len(s.toks)))
    lines = []
    for path, per_sample in (("full", s.ref_grads()), ("cached", s.ref_head_grads())):
        C = _mixed_C(per_sample)
        ref = _clipped_sum(per_sample, C)
        for method in ("ghost", "instantiate"):
            err = _rel(s.library_sum(path, idx, C, method), ref)
            lines.append(f"{path}/{method} {err:.1e}")
            assert err <= RTOL
    print(f"\nRESULT clipped sum slots {kind} k=2: " + "; ".join(lines))


# --------------------------------------------------------------------------------------------
# 2. sensitivity
# --------------------------------------------------------------------------------------------

SENS = [("bert", 2, True, "mean"), ("roberta", 3, True, "cls"), ("bert", 1, True, "cls"),
        ("roberta", 2, False, "mean")]


@pytest.mark.parametrize("kind,k,bias,pooling", SENS)
def test_sensitivity_remove_one(setups, kind, k, bias, pooling):
    s = setups(kind, k, bias, pooling)
    idx = list(range(len(s.toks)))
    lines = []
    for path, per_sample in (("full", s.ref_grads()), ("cached", s.ref_head_grads())):
        norms = [_norm(g) for g in per_sample]
        C = _mixed_C(per_sample)
        for method in ("ghost", "instantiate"):
            full = s.library_sum(path, idx, C, method)
            moves = []
            for j in idx:
                rest = [i for i in idx if i != j]
                moves.append(_diff(full, s.library_sum(path, rest, C, method)) / C)
            for j, m in zip(idx, moves):
                assert m <= 1 + 1e-9, (path, method, j, m)
                # exactly ||g_j|| * min(1, C/(||g_j|| + eps)) / C
                expected = norms[j] * min(1.0, C / (norms[j] + STAB)) / C
                assert abs(m - expected) <= 1e-8, (path, method, j, m, expected)
            lines.append(f"{path}/{method} max move/C {max(moves):.12f}")
    print(f"\nRESULT sensitivity {kind} k={k} bias={bias} {pooling}: " + "; ".join(lines))


# --------------------------------------------------------------------------------------------
# 3. losses, predictions, no gradient into B through the prediction
# --------------------------------------------------------------------------------------------

PRED = [(kind, k, True, pooling) for kind in ("bert", "roberta") for k in (1, 2, 3)
        for pooling in ("cls", "mean")] + [("bert", 3, False, "mean"), ("roberta", 2, False, "cls")]


@pytest.mark.parametrize("kind,k,bias,pooling", PRED)
def test_losses_and_predictions(setups, kind, k, bias, pooling):
    s = setups(kind, k, bias, pooling)
    if bias:
        assert s.bias_initially_zero, "the intent-tag bias table is not initialised to zeros"
    idx = list(range(len(s.toks)))
    set_trainable(s.model, "all")
    with torch.no_grad():
        out = s.model(**padded_batch(s.toks, idx, s.pad, "joint"))
        refs = [s.forward_ref(s.P, i) for i in idx]
    ref_l = torch.stack([r[0] for r in refs])
    err_l = float((out.utterance_loss.double() - ref_l).abs().max() / ref_l.abs().max())
    err_mean = abs(float(out.loss) - float(ref_l.mean())) / float(ref_l.mean())
    err_z = err_y = scale_y = 0.0
    differ = 0
    gap_gold = 0.0
    for r, i in enumerate(idx):
        _, z, y_pred = refs[r]
        T = len(s.toks[i].ids)
        err_z = max(err_z, float((out.intent_logits[r].double() - z).abs().max()))
        err_y = max(err_y, float((out.tag_logits[r, :T].double() - y_pred).abs().max()))
        scale_y = max(scale_y, float(y_pred.abs().max()))
        if bias and int(z.argmax()) != s.toks[i].intent:
            differ += 1
            B = s.P[BIAS_NAME]
            # how far predictions with B[gold] would be (the wrong prediction rule)
            gap_gold = max(gap_gold, float((B[s.toks[i].intent] - B[int(z.argmax())]).abs().max()))
    err_z /= float(max(r[1].abs().max() for r in refs))
    err_y /= scale_y

    # cached heads net: the same per-utterance losses and logits
    cached = None
    with torch.no_grad():
        cached = s.batches.net(**s.batches.batch("train", idx))
    err_cl = float((cached.utterance_loss.double() - ref_l).abs().max() / ref_l.abs().max())
    err_cz = float(max((cached.intent_logits[r].double() - refs[r][1]).abs().max() for r in idx)
                   / max(r[1].abs().max() for r in refs))
    err_cy = 0.0
    per_token = cached.tag_logits.shape[1] == max(len(s.toks[j].ids) for j in idx)
    for r, i in enumerate(idx):
        first = s.toks[i].first
        ct = cached.tag_logits[r].double()
        ct = ct[first] if per_token else ct[: len(first)]
        err_cy = max(err_cy, float((ct - refs[r][2][first]).abs().max()) / scale_y)

    line = (f"utterance_loss {err_l:.1e}, loss {err_mean:.1e}, intent logits {err_z:.1e}, "
            f"tag_logits {err_y:.1e}; cached: utterance_loss {err_cl:.1e}, intent {err_cz:.1e}, "
            f"tags {err_cy:.1e}")
    for e in (err_l, err_mean, err_z, err_y, err_cl, err_cz, err_cy):
        assert e <= RTOL, line
    if bias:
        assert differ >= 2, "too few utterances whose predicted intent differs from the gold one"
        line += f"; predicted != gold for {differ}/{len(idx)} (B row gap {gap_gold:.2f})"
        assert gap_gold > 0.1
    print(f"\nRESULT predictions {kind} k={k} bias={bias} {pooling}: " + line)


@pytest.mark.parametrize("kind,k,pooling", [("bert", 2, "cls"), ("roberta", 3, "mean"),
                                            ("roberta", 1, "cls")])
def test_bias_gradient_is_gold_only(setups, kind, k, pooling):
    s = setups(kind, k, True, pooling)
    idx = list(range(len(s.toks)))
    n = len(idx)
    params = dict(s.model.named_parameters())
    B = params[BIAS_NAME]
    lines = []
    for path in ("full", "cached"):
        if path == "full":
            set_trainable(s.model, "all")
            net, inputs = s.model, padded_batch(s.toks, idx, s.pad, "joint")
        else:
            batches = s.batches
            set_trainable(s.model, "head")
            net, inputs = batches.net, batches.batch("train", idx)
        # (i) the plain (unclipped) batch-loss gradient of B = mean of the gold-intent gradients
        for p in params.values():
            p.grad = None
        net(**inputs).loss.backward()
        got = B.grad.detach().clone().double()
        want = sum(g[BIAS_NAME] for g in s.ref_grads()) / n
        wrong = sum(g[BIAS_NAME] for g in s.ref_grads("bias-predicted")) / n
        both = want + wrong  # gradient through the gold AND the prediction path
        err = float((got - want).norm() / want.norm())
        d_wrong = float((got - wrong).norm() / want.norm())
        d_both = float((got - both).norm() / want.norm())
        # rows of intents no utterance has as gold get no gradient at all
        gold = {s.toks[i].intent for i in idx}
        other_rows = [r for r in range(B.shape[0]) if r not in gold]
        stray = float(got[other_rows].abs().max()) if other_rows else 0.0
        # (ii) a backward through the prediction alone leaves B without gradient
        for p in params.values():
            p.grad = None
        out = net(**inputs)
        (out.tag_logits.double() ** 2).sum().backward()
        pred_grad = 0.0 if B.grad is None else float(B.grad.abs().max())
        tag_w_grad = params["tag_head.weight"].grad
        for p in params.values():
            p.grad = None
        lines.append(f"{path}: B.grad rel err {err:.1e} (pred-intent ref {d_wrong:.2f}, "
                     f"gold+pred {d_both:.2f}), non-gold rows max {stray:.1e}, "
                     f"B.grad from tag_logits {pred_grad:.1e}")
        assert err <= RTOL, lines[-1]
        assert d_wrong > 1e-3 and d_both > 1e-3
        assert stray == 0.0
        assert tag_w_grad is not None and float(tag_w_grad.abs().max()) > 0  # the path is live
        assert pred_grad == 0.0, lines[-1]
    print(f"\nRESULT bias gradient {kind} k={k} {pooling}: " + "; ".join(lines))


# --------------------------------------------------------------------------------------------
# 4. wrong references are detected
# --------------------------------------------------------------------------------------------

WRONG = [("bert", 1, True, "cls"), ("bert", 2, True, "mean"), ("bert", 3, True, "cls"),
         ("roberta", 1, True, "mean"), ("roberta", 2, True, "cls"), ("roberta", 3, True, "mean")]


@pytest.mark.parametrize("kind,k,bias,pooling", WRONG)
def test_wrong_references_are_distinguishable(setups, kind, k, bias, pooling):
    s = setups(kind, k, bias, pooling)
    idx = list(range(len(s.toks)))
    variants = ["bias-predicted", "bias-ignored"]
    if k > 1:
        variants += ["tag-last-only", "pool-layer-mean"]
    if k <= LAYERS:  # with k = L + 1 the first k states ARE the last k
        variants.append("tag-first-k")
    lines = []
    for path in ("full", "cached"):
        get = s.ref_grads if path == "full" else s.ref_head_grads
        right = get()
        C = _mixed_C(right)
        tol = max(RTOL, _pure_tolerance(right, C))
        lib = s.library_sum(path, idx, C, "ghost")
        e = _rel(lib, _clipped_sum(right, C))
        assert e <= RTOL
        parts = [f"right {e:.1e}"]
        for v in variants:
            d = _rel(lib, _clipped_sum(get(v), C))
            parts.append(f"{v} {d:.2e}")
            assert d > 1e3 * tol, (path, v, d, tol)
        d = _rel(lib, _clipped_sum(right, C, per_tensor=True))
        parts.append(f"per-tensor clipping {d:.2e}")
        assert d > 1e3 * tol
        lines.append(f"{path} (tol {tol:.1e}): " + ", ".join(parts))
    print(f"\nRESULT wrong refs {kind} k={k} bias={bias} {pooling}: " + "; ".join(lines))


# --------------------------------------------------------------------------------------------
# 5. invalid constructions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_invalid_constructions(world, kind):
    enc = make_encoder(kind, len(world["tokenizer"]), world["tokenizer"].pad_token_id)
    errors = []
    for kw in (dict(tag_layers=0), dict(tag_layers=LAYERS + 2),
               dict(task="slots", intent_tag_bias=True)):
        with pytest.raises(ConfigError) as info:
            JointIntentSlotModel(enc, 3, 5, **kw)
        errors.append(f"{kw}: {str(info.value)[:60]!r}")
    # the limits themselves are accepted
    for k in (1, LAYERS + 1):
        JointIntentSlotModel(enc, 3, 5, tag_layers=k, intent_tag_bias=True)
    print(f"\nRESULT config errors {kind}: " + "; ".join(errors))
