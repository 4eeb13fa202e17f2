"""Independent reference checks for the joint intent + slot model under DP-SGD.

Derived from the mathematics of the stated contract alone (not from the implementation):

* Utterance i's loss is
      l_i = CE(intent_logits_i, intent_i) + (1/W_i) * sum_{t tagged} CE(tag_logits_it, tag_it)
  (task "slots": no intent term), W_i = number of tagged positions of utterance i, and the
  batch ``.loss`` is mean_i l_i.
* With ``PerSampleClipper(model, max_grad_norm=C)`` attached, one forward/backward of the
  batch loss leaves   S = sum_i g_i * min(1, C / (||g_i|| + 1e-6))   in ``.grad``, where g_i is
  the gradient of l_i for utterance i run ALONE (cut to its true length) and ||.|| is the L2
  norm over all trainable parameters together ("auto": g_i / (||g_i|| + 0.01)).

Every reference is computed by an explicit per-utterance loop with plain autograd, the loss
rebuilt from the returned logits, in float64. Every check prints a ``RESULT`` line (``-s``).
Where a check is meant to catch a specific wrong implementation (token mean over the batch,
per-layer clipping, intent head left out of the norm), the test also verifies that this
wrong answer is far outside the tolerance, so the assertion can actually fail.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from dptrain import PerSampleClipper  # noqa: E402
from dptrain.joint_model import IGNORE, JointIntentSlotModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

Grads = Dict[str, torch.Tensor]

STAB = 1e-6      # the "+ 1e-6" of the clip factor
AUTO_STAB = 0.01  # the "+ 0.01" of automatic clipping
REL_TOL = 1e-6
NUM_INTENTS = 3
NUM_TAGS = 7
VOCAB = 40
HIDDEN = 32


# --------------------------------------------------------------------------- #
# models and data
# --------------------------------------------------------------------------- #
def make_encoder(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(max_position_embeddings=64, **common))
    if kind == "roberta":
        return transformers.RobertaModel(transformers.RobertaConfig(
            max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common))
    raise ValueError(kind)


def make_model(kind: str, task: str, pooling: str, seed: int = 0) -> JointIntentSlotModel:
    torch.manual_seed(seed)
    model = JointIntentSlotModel(make_encoder(kind), NUM_INTENTS, NUM_TAGS, task=task,
                                 pooling=pooling, dropout=0.0)
    model.double()
    model.train()  # as in real training; every dropout is 0, so this is deterministic
    return model


SPECIAL = {"bert": dict(cls=2, sep=3, pad=0, lo=5), "roberta": dict(cls=0, sep=2, pad=1, lo=4)}


def make_batch(kind: str, tag_patterns: List[List[int]], seed: int = 1) -> dict:
    """Right-padded batch. ``tag_patterns[i]`` lists, for each inner token (between CLS and SEP),
    1 if it is a tagged position (first sub-token of a word) and 0 if not (a continuation
    sub-token). CLS, SEP and padding are always IGNORE."""
    sp = SPECIAL[kind]
    g = torch.Generator().manual_seed(seed)
    lengths = [len(p) + 2 for p in tag_patterns]
    B, T = len(tag_patterns), max(lengths)
    ids = torch.full((B, T), sp["pad"], dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    tags = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (pattern, L) in enumerate(zip(tag_patterns, lengths)):
        assert sum(pattern) >= 1
        ids[i, 0] = sp["cls"]
        ids[i, 1:L - 1] = torch.randint(sp["lo"], VOCAB, (L - 2,), generator=g)
        ids[i, L - 1] = sp["sep"]
        mask[i, :L] = 1
        for t, tagged in enumerate(pattern, start=1):
            if tagged:
                tags[i, t] = int(torch.randint(0, NUM_TAGS, (1,), generator=g))
    intents = torch.randint(0, NUM_INTENTS, (B,), generator=g)
    return dict(input_ids=ids, attention_mask=mask, tag_labels=tags, labels=intents,
                lengths=torch.tensor(lengths))


# six utterances: lengths 3..14, 1..12 tags, some continuation sub-tokens
PATTERNS = [
    [1, 0, 1, 1, 0, 1, 1],                       # 9 tokens, 5 tags
    [1, 1],                                      # 4 tokens, 2 tags
    [1] * 12,                                    # 14 tokens, 12 tags (the long one)
    [1, 0, 0, 1],                                # 6 tokens, 2 tags
    [1],                                         # 3 tokens, 1 tag
    [1, 1, 0, 1, 0, 0, 1, 1, 0],                 # 11 tokens, 5 tags
]


def model_inputs(batch: dict, task: str, rows=None, cut: int | None = None) -> dict:
    idx = torch.arange(batch["input_ids"].shape[0]) if rows is None else torch.as_tensor(rows)
    T = batch["input_ids"].shape[1] if cut is None else cut
    out = dict(input_ids=batch["input_ids"][idx, :T], attention_mask=batch["attention_mask"][idx, :T],
               tag_labels=batch["tag_labels"][idx, :T])
    if task == "joint":
        out["labels"] = batch["labels"][idx]
    return out


def alone(batch: dict, task: str, i: int) -> dict:
    """Utterance i by itself, cut to its true length (no padding at all)."""
    return model_inputs(batch, task, rows=[i], cut=int(batch["lengths"][i]))


def subset(batch: dict, task: str, rows: List[int]) -> dict:
    """Rows of the batch, still padded to the original width (extra padding is fine)."""
    return model_inputs(batch, task, rows=rows)


# --------------------------------------------------------------------------- #
# the claimed loss, rebuilt from logits
# --------------------------------------------------------------------------- #
def per_utterance_losses(out, inputs: dict, task: str) -> torch.Tensor:
    tag_logits, tags = out.tag_logits, inputs["tag_labels"]
    losses = []
    for i in range(tags.shape[0]):
        keep = tags[i] != IGNORE
        li = F.cross_entropy(tag_logits[i][keep], tags[i][keep], reduction="sum") / keep.sum()
        if task == "joint":
            li = li + F.cross_entropy(out.intent_logits[i:i + 1], inputs["labels"][i:i + 1])
        losses.append(li)
    return torch.stack(losses)


def token_mean_loss(out, inputs: dict, task: str) -> torch.Tensor:
    """The WRONG alternative: tag loss averaged over all tagged tokens of the whole batch."""
    tag_loss = F.cross_entropy(out.tag_logits.reshape(-1, NUM_TAGS), inputs["tag_labels"].reshape(-1),
                               ignore_index=IGNORE)
    if task == "joint":
        tag_loss = tag_loss + F.cross_entropy(out.intent_logits, inputs["labels"])
    return tag_loss


# --------------------------------------------------------------------------- #
# gradients
# --------------------------------------------------------------------------- #
def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def read_grads(model) -> Grads:
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()).double()
            for n, p in trainable(model)}


def gnorm(g: Grads) -> float:
    return float(torch.sqrt(sum((v ** 2).sum() for v in g.values())))


def gsub(a: Grads, b: Grads) -> Grads:
    return {n: a[n] - b[n] for n in a}


def gaxpy(acc: Grads, c: float, g: Grads) -> None:
    for n in acc:
        acc[n] += c * g[n]


def zeros_like_grads(model) -> Grads:
    return {n: torch.zeros_like(p, dtype=torch.float64) for n, p in trainable(model)}


def per_utterance_grads(model, batch: dict, task: str) -> List[Grads]:
    """g_i: gradient of l_i (own loss from logits), utterance alone, unpadded, no hooks."""
    out_grads = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        inputs = alone(batch, task, i)
        out = model(**inputs)
        per_utterance_losses(out, inputs, task)[0].backward()
        out_grads.append(read_grads(model))
    model.zero_grad(set_to_none=True)
    return out_grads


def reference_sum(gs: List[Grads], C, model) -> Grads:
    total = zeros_like_grads(model)
    for g in gs:
        n = gnorm(g)
        c = 1.0 / (n + AUTO_STAB) if C == "auto" else min(1.0, C / (n + STAB))
        gaxpy(total, c, g)
    return total


def per_layer_clipped_sum(gs: List[Grads], C: float, model) -> Grads:
    """WRONG alternative: each parameter tensor clipped to C/sqrt(#tensors) separately."""
    total = zeros_like_grads(model)
    Cl = C / len(total) ** 0.5
    for g in gs:
        for n in total:
            total[n] += g[n] * min(1.0, Cl / (float(g[n].norm()) + STAB))
    return total


def engine_sum(model, inputs: dict) -> Grads:
    """One forward/backward of the batch .loss with the clipper attached."""
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    g = read_grads(model)
    model.zero_grad(set_to_none=True)
    return g


def rel_err(lib: Grads, ref: Grads) -> float:
    """||lib - ref|| / ||ref|| over all trainable parameters together."""
    assert set(lib) == set(ref), sorted(set(lib) ^ set(ref))
    return gnorm(gsub(lib, ref)) / gnorm(ref)


def per_tensor_rel_err(lib: Grads, ref: Grads) -> tuple:
    """max_p ||lib_p - ref_p|| / ||ref_p||, so small tensors (a head's bias) are not swamped."""
    total = gnorm(ref)
    worst, where = 0.0, ""
    for n in ref:
        e = float((lib[n] - ref[n]).norm()) / max(float(ref[n].norm()), 1e-6 * total)
        if e > worst:
            worst, where = e, n
    return worst, where


def intent_head_names(model) -> List[str]:
    enc = {id(p) for p in model.encoder.parameters()} if hasattr(model, "encoder") else set()
    return [n for n, p in trainable(model) if id(p) not in enc and p.shape[0] == NUM_INTENTS]


def pick_C(norms: List[float]) -> float:
    """A bound with half the utterances clipped and half not, well away from every norm."""
    s = sorted(norms)
    k = len(s) // 2
    C = (s[k - 1] * s[k]) ** 0.5
    assert min(abs(n - C) / C for n in norms) > 1e-3, (norms, C)
    return C


# --------------------------------------------------------------------------- #
# (1) clipped sum against a per-utterance loop
# --------------------------------------------------------------------------- #
CASES = [
    ("bert", "joint", "cls", "auto"),
    ("bert", "joint", "mean", "ghost"),
    ("bert", "slots", "cls", "instantiate"),
    ("roberta", "joint", "cls", "instantiate"),
    ("roberta", "joint", "mean", "auto"),
    ("roberta", "slots", "mean", "ghost"),
]


@pytest.mark.parametrize("kind,task,pooling,method", CASES)
def test_clipped_sum_matches_per_utterance_loop(kind, task, pooling, method):
    model = make_model(kind, task, pooling)
    batch = make_batch(kind, PATTERNS)
    gs = per_utterance_grads(model, batch, task)
    norms = [gnorm(g) for g in gs]
    C = pick_C(norms)
    ref = reference_sum(gs, C, model)
    tag = f"{kind}/{task}/{pooling}/{method}"

    # the assertion below can fail for the wrong implementations we care about
    wrong = {"per-layer": per_layer_clipped_sum(gs, C, model)}
    if task == "joint":
        names = intent_head_names(model)
        assert names, "could not locate the intent head's parameters"
        wrong_norm = [gnorm({n: v for n, v in g.items() if n not in names}) for g in gs]
        no_head = zeros_like_grads(model)
        for g, n_ in zip(gs, wrong_norm):
            gaxpy(no_head, min(1.0, C / (n_ + STAB)), g)
        wrong["norm-without-intent-head"] = no_head
    for what, w in wrong.items():
        assert rel_err(w, ref) > 100 * REL_TOL, f"{what} indistinguishable from the reference"

    clipper = PerSampleClipper(model, max_grad_norm=C, norm_method=method)
    try:
        lib = engine_sum(model, model_inputs(batch, task))
    finally:
        clipper.detach()
    err = rel_err(lib, ref)
    pt, where = per_tensor_rel_err(lib, ref)
    clipped = sum(n > C for n in norms)
    print(f"RESULT (1) {tag}: norms={[round(n, 4) for n in norms]} C={C:.4f} clipped={clipped}/6 "
          f"rel_err={err:.2e} per_tensor={pt:.2e} ({where}) "
          + " ".join(f"{k}_err={rel_err(w, ref):.2e}" for k, w in wrong.items()))
    assert 0 < clipped < len(norms)
    assert err <= REL_TOL, f"{tag}: clipped sum off by {err:.3e} (relative)"
    assert pt <= 10 * REL_TOL, f"{tag}: tensor {where} off by {pt:.3e} (relative)"


@pytest.mark.parametrize("kind,task,pooling", [("bert", "joint", "mean"), ("roberta", "slots", "cls")])
def test_automatic_clipping_matches_per_utterance_loop(kind, task, pooling):
    model = make_model(kind, task, pooling, seed=3)
    batch = make_batch(kind, PATTERNS, seed=4)
    gs = per_utterance_grads(model, batch, task)
    ref = reference_sum(gs, "auto", model)
    clipper = PerSampleClipper(model, max_grad_norm="auto")
    try:
        lib = engine_sum(model, model_inputs(batch, task))
    finally:
        clipper.detach()
    err = rel_err(lib, ref)
    pt, where = per_tensor_rel_err(lib, ref)
    print(f"RESULT (1-auto) {kind}/{task}/{pooling}: rel_err={err:.2e} per_tensor={pt:.2e} ({where})")
    assert err <= REL_TOL and pt <= 10 * REL_TOL, (err, pt, where)


# --------------------------------------------------------------------------- #
# (2) sensitivity and (3) independence from the other utterances
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind,task,pooling", [("bert", "joint", "cls"), ("roberta", "slots", "mean")])
def test_remove_one_utterance(kind, task, pooling):
    model = make_model(kind, task, pooling, seed=5)
    batch = make_batch(kind, PATTERNS, seed=6)
    B = batch["input_ids"].shape[0]
    gs = per_utterance_grads(model, batch, task)
    norms = [gnorm(g) for g in gs]

    for label, C in (("mid", pick_C(norms)), ("small", 0.5 * min(norms))):
        clipper = PerSampleClipper(model, max_grad_norm=C)
        try:
            full = engine_sum(model, model_inputs(batch, task))
            shifts, indep = [], []
            for j in range(B):
                rest = [i for i in range(B) if i != j]
                delta = gsub(full, engine_sum(model, subset(batch, task, rest)))
                own = engine_sum(model, subset(batch, task, [j]))        # {j}, padded
                own_unpadded = engine_sum(model, alone(batch, task, j))  # {j}, unpadded
                expected_shift = min(norms[j], C * norms[j] / (norms[j] + STAB))
                shifts.append((gnorm(delta), expected_shift))
                indep.append(max(rel_err(delta, own), rel_err(own_unpadded, own)))
        finally:
            clipper.detach()
        print(f"RESULT (2/3) {kind}/{task} C={label}:{C:.4f} shift/C="
              f"{[round(s / C, 8) for s, _ in shifts]} indep_rel_err_max={max(indep):.2e}")
        for j, (s, e) in enumerate(shifts):
            # (2) sensitivity: removing one utterance moves the sum by at most C ...
            assert s <= C * (1 + 1e-9), f"utterance {j}: shift {s:.6g} > C={C:.6g}"
            # ... and by exactly its own clipped norm (== C when clipped)
            assert abs(s - e) <= 1e-6 * e, f"utterance {j}: shift {s:.10g}, expected {e:.10g}"
            if label == "small":
                assert abs(s - C) <= 1e-5 * C, f"utterance {j}: shift {s:.10g} != C {C:.10g}"
        # (3) S(D) - S(D\{j}) == S({j}): the contribution does not depend on the others
        assert max(indep) <= 1e-8, f"contribution depends on the rest of the batch: {max(indep):.3e}"


# --------------------------------------------------------------------------- #
# (4) the batch loss is the mean of per-utterance losses
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind,task,pooling", [("bert", "joint", "cls"), ("bert", "slots", "mean"),
                                               ("roberta", "joint", "mean")])
def test_batch_loss_is_mean_of_utterance_losses(kind, task, pooling):
    model = make_model(kind, task, pooling, seed=7)
    batch = make_batch(kind, PATTERNS, seed=8)
    B = batch["input_ids"].shape[0]
    with torch.no_grad():
        inputs = model_inputs(batch, task)
        out = model(**inputs)
        assert out.tag_logits.shape == (B, inputs["input_ids"].shape[1], NUM_TAGS)
        if task == "joint":
            assert out.intent_logits.shape == (B, NUM_INTENTS)
        else:
            assert out.intent_logits is None
        from_batch_logits = per_utterance_losses(out, inputs, task)
        alone_losses, alone_model_losses = [], []
        for i in range(B):
            a = alone(batch, task, i)
            o = model(**a)
            alone_losses.append(float(per_utterance_losses(o, a, task)[0]))
            alone_model_losses.append(float(o.loss))
        alone_losses = torch.tensor(alone_losses, dtype=torch.float64)
        token_mean = float(token_mean_loss(out, inputs, task))
    loss = float(out.loss)
    claimed = float(alone_losses.mean())
    print(f"RESULT (4) {kind}/{task}/{pooling}: loss={loss:.12f} mean_alone={claimed:.12f} "
          f"from_batch_logits={float(from_batch_logits.mean()):.12f} token_mean={token_mean:.12f}")
    # the utterances' own losses do not depend on padding or the batch
    assert torch.allclose(from_batch_logits, alone_losses, rtol=1e-10, atol=0)
    # a batch of one: .loss is that utterance's loss
    assert torch.allclose(torch.tensor(alone_model_losses, dtype=torch.float64), alone_losses,
                          rtol=1e-10, atol=0)
    assert abs(token_mean - claimed) > 1e-4, "batch too uniform to tell the two losses apart"
    assert loss == pytest.approx(claimed, rel=1e-10, abs=0)


# --------------------------------------------------------------------------- #
# (5) one utterance with many more tags: per-utterance mean, not batch token mean
# --------------------------------------------------------------------------- #
SKEWED = [[1] * 24, [1], [1, 0], [1], [0, 1, 0]]


@pytest.mark.parametrize("kind,task,pooling", [("bert", "joint", "cls"), ("roberta", "slots", "mean")])
def test_skewed_tag_counts_use_per_utterance_mean(kind, task, pooling):
    model = make_model(kind, task, pooling, seed=9)
    batch = make_batch(kind, SKEWED, seed=10)
    inputs = model_inputs(batch, task)
    with torch.no_grad():
        out = model(**inputs)
        claimed = float(per_utterance_losses(out, inputs, task).mean())
        token_mean = float(token_mean_loss(out, inputs, task))
    print(f"RESULT (5-loss) {kind}/{task}: loss={float(out.loss):.10f} claimed={claimed:.10f} "
          f"batch_token_mean={token_mean:.10f}")
    assert abs(claimed - token_mean) > 1e-3 * abs(claimed)
    assert float(out.loss) == pytest.approx(claimed, rel=1e-10, abs=0)

    # gradients: with a huge C nothing is clipped, so the engine must return sum_i grad l_i ...
    gs = per_utterance_grads(model, batch, task)
    ref = reference_sum(gs, 1e6, model)
    # ... which differs from B * grad(batch token mean), the gradient a token-mean loss gives
    model.zero_grad(set_to_none=True)
    (len(SKEWED) * token_mean_loss(model(**inputs), inputs, task)).backward()
    wrong = read_grads(model)
    model.zero_grad(set_to_none=True)
    assert rel_err(wrong, ref) > 1e-2
    clipper = PerSampleClipper(model, max_grad_norm=1e6)
    try:
        lib = engine_sum(model, inputs)
    finally:
        clipper.detach()
    err = rel_err(lib, ref)
    print(f"RESULT (5-grad) {kind}/{task}: rel_err={err:.2e} token_mean_alt_err={rel_err(wrong, ref):.2e}")
    assert err <= REL_TOL, f"unclipped sum off by {err:.3e}"
