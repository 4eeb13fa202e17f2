"""Reference checks for per-sample clipping, derived from the mathematics alone.

Contract under test (public API only):

* After one forward/backward of the MEAN loss over B samples with a
  ``PerSampleClipper`` attached, every trainable parameter holds
  ``sum_i c_i G_i`` with ``G_i`` the gradient of sample i's own loss,
  ``c_i = min(1, C / (||G_i|| + 1e-6))`` and the norm taken over all trainable
  parameters together.
* Consequently, removing one sample moves the clipped sum by at most C.
* Models the library cannot handle must be refused with ``dptrain.ModelError``.

The references below are computed with a plain per-example loop (batch of one,
no hooks attached) in float64 unless stated otherwise.  Every check prints a
``RESULT`` line with the measured numbers (run with ``-s`` to see them).
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dptrain
from dptrain import ModelError, PerSampleClipper, make_private

transformers = pytest.importorskip("transformers")

Batch = Tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Grads = Dict[str, torch.Tensor]

STAB = 1e-6  # the "+ 1e-6" in the clip factor
TINY_C = 1e-3
HUGE_C = 1e6
REL_TOL = 1e-6
SENS_TOL = 1.0 + 1e-9


# --------------------------------------------------------------------------- #
# generic helpers
# --------------------------------------------------------------------------- #
def take(batch: Batch, idx) -> Batch:
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    return tuple(t[idx] for t in batch)


def size_of(batch: Batch) -> int:
    return int(batch[0].shape[0])


def trainable(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def read_grads(model: nn.Module) -> Grads:
    """float64 copies of the grads of the trainable parameters (None -> 0)."""
    out = {}
    for n, p in trainable(model):
        g = torch.zeros_like(p) if p.grad is None else p.grad
        out[n] = g.detach().to(torch.float64).clone()
    return out


def frozen_grads_touched(model: nn.Module) -> list:
    return [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]


def global_norm(grads: Grads) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def diff(a: Grads, b: Grads) -> Grads:
    return {n: a[n] - b[n] for n in a}


def reference_clipped_sum(model: nn.Module, batch: Batch, loss_fn: LossFn, C: float) -> Grads:
    """sum_i min(1, C/(||G_i||+1e-6)) G_i by an explicit per-example loop."""
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in trainable(model)}
    for i in range(size_of(batch)):
        zero_grads(model)
        loss_fn(model, take(batch, [i])).backward()
        g = read_grads(model)
        c = min(1.0, C / (global_norm(g) + STAB))
        for n in total:
            total[n] += c * g[n]
    zero_grads(model)
    return total


def plain_summed_gradient(model: nn.Module, batch: Batch, loss_fn: LossFn) -> Grads:
    """Gradient of the SUM of per-sample losses with no clipper attached."""
    zero_grads(model)
    (loss_fn(model, batch) * size_of(batch)).backward()
    g = read_grads(model)
    zero_grads(model)
    return g


def library_sum(model: nn.Module, batch: Batch, loss_fn: LossFn) -> Grads:
    """One forward/backward of the mean loss with the clipper already attached."""
    zero_grads(model)
    loss_fn(model, batch).backward()
    touched = frozen_grads_touched(model)
    assert not touched, f"frozen parameters received gradients: {touched}"
    g = read_grads(model)
    zero_grads(model)
    return g


def max_rel_err(lib: Grads, ref: Grads, floor_frac: float = 1e-6) -> Tuple[float, str]:
    """max over params of max|lib-ref| / max(max|ref_p|, floor_frac * max_q max|ref_q|)."""
    assert set(lib) == set(ref), (sorted(set(lib) ^ set(ref)))
    gmax = max(float(r.abs().max()) for r in ref.values())
    worst, worst_name = 0.0, ""
    for n in ref:
        denom = max(float(ref[n].abs().max()), floor_frac * gmax, 1e-300)
        e = float((lib[n] - ref[n]).abs().max()) / denom
        if e > worst:
            worst, worst_name = e, n
    return worst, worst_name


def run_clipped(model, batch, loss_fn, C, method, with_sensitivity=True):
    """Library clipped sum on the full batch and the shift caused by removing each sample.

    Returns (S(D), max_j ||S(D) - S(D \\ j)||).  One clipper stays attached for all
    runs, as in real training (grads are zeroed between batches).
    """
    clipper = PerSampleClipper(model, max_grad_norm=C, loss_reduction="mean", norm_method=method)
    try:
        full = library_sum(model, batch, loss_fn)
        shift = 0.0
        if with_sensitivity:
            B = size_of(batch)
            for j in range(B):
                rest = [i for i in range(B) if i != j]
                shift = max(shift, global_norm(diff(full, library_sum(model, take(batch, rest), loss_fn))))
    finally:
        clipper.detach()
    return full, shift


def check_exact_and_sensitive(tag, model, batch, loss_fn, C, method, floor_frac=1e-6):
    ref = reference_clipped_sum(model, batch, loss_fn, C)
    # The full batch first, on its own: a refusal that only comes on a smaller batch of the
    # sensitivity runs must not hide a wrong sum on this one.
    lib, _ = run_clipped(model, batch, loss_fn, C, method, with_sensitivity=False)
    err, where = max_rel_err(lib, ref, floor_frac)
    print(f"RESULT {tag} C={C:g} method={method}: rel_err={err:.3e} (worst {where})")
    assert err <= REL_TOL, f"clipped sum wrong: rel err {err:.3e} at {where}"
    _, shift = run_clipped(model, batch, loss_fn, C, method)
    print(f"RESULT {tag} C={C:g} method={method}: max_shift/C={shift / C:.6f}")
    assert shift <= C * SENS_TOL, f"sensitivity violated: max shift / C = {shift / C:.6f}"
    return lib, ref


def check_exact_or_refused(tag, model, batch, loss_fn, C, method, floor_frac=1e-6):
    """Refusal must be a ModelError; anything else must be exact and C-sensitive."""
    try:
        check_exact_and_sensitive(tag, model, batch, loss_fn, C, method, floor_frac)
    except ModelError as e:
        print(f"RESULT {tag} C={C:g} method={method}: REFUSED ModelError: {e}")


# --------------------------------------------------------------------------- #
# loss functions
# --------------------------------------------------------------------------- #
def ce_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def hf_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    ids, mask, y = batch
    return model(input_ids=ids, attention_mask=mask, labels=y).loss


def hf_batch(B: int, T: int, vocab: int = 50, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(B):  # varied padding on the right: lengths T, T-1, T-2, ...
        L = max(2, T - i)
        mask[i, L:] = 0
        ids[i, L:] = 0
    y = torch.randint(0, 3, (B,), generator=g)
    return ids, mask, y


# --------------------------------------------------------------------------- #
# 1. shared-layer toy
# --------------------------------------------------------------------------- #
class TwoShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: [B, T, 8]
        h = torch.tanh(self.a(torch.tanh(self.a(x))))
        h = torch.tanh(self.b(torch.tanh(self.b(h))))
        return self.head(h.mean(dim=1))


def two_shared_case():
    torch.manual_seed(0)
    model = TwoShared().double()
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    return model, (x, y)


@pytest.mark.parametrize("method", ["ghost", "instantiate", "auto"])
@pytest.mark.parametrize("C", [TINY_C, HUGE_C])
def test_shared_layer_toy(method, C):
    model, batch = two_shared_case()
    lib, ref = check_exact_and_sensitive("shared_toy", model, batch, ce_loss, C, method)
    if C == HUGE_C:  # nothing clipped: must equal the plain gradient of the summed loss
        plain = plain_summed_gradient(model, batch, ce_loss)
        err, where = max_rel_err(lib, plain)
        print(f"RESULT shared_toy vs plain summed grad method={method}: rel_err={err:.3e}")
        assert err <= REL_TOL, f"unclipped sum != plain summed gradient ({err:.3e} at {where})"


# --------------------------------------------------------------------------- #
# 2. ALBERT (one layer group shared across depth)
# --------------------------------------------------------------------------- #
def tiny_albert():
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(
        vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=2,
        num_hidden_groups=1, inner_group_num=1, num_attention_heads=2, intermediate_size=37,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
        max_position_embeddings=16, num_labels=3)
    return transformers.AlbertForSequenceClassification(cfg).double().train()


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("C", [TINY_C, HUGE_C])
def test_albert_shared_layers(method, C):
    model = tiny_albert()
    check_exact_and_sensitive("albert", model, hf_batch(5, 7), hf_loss, C, method)


# --------------------------------------------------------------------------- #
# 3. low precision BERT: no stale state between norm methods
# --------------------------------------------------------------------------- #
def tiny_bert_fp32():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).float().train()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_bert_methods_agree(dtype):
    low = tiny_bert_fp32().to(dtype)
    ref_model = copy.deepcopy(low).float()  # fp32 model with exactly the same (rounded) weights
    batch = hf_batch(5, 7)
    C = HUGE_C

    ref = reference_clipped_sum(ref_model, batch, hf_loss, C)
    ghost, _ = run_clipped(low, batch, hf_loss, C, "ghost", with_sensitivity=False)
    inst, _ = run_clipped(low, batch, hf_loss, C, "instantiate", with_sensitivity=False)

    gmax = max(float(r.abs().max()) for r in ref.values())
    gi_abs = max(float((ghost[n] - inst[n]).abs().max()) for n in ref)
    gi_rel = gi_abs / gmax
    gi_where = max(ref, key=lambda n: float((ghost[n] - inst[n]).abs().max()))
    ref_norm = global_norm(ref)
    ghost_vs_ref = global_norm(diff(ghost, ref)) / ref_norm
    inst_vs_ref = global_norm(diff(inst, ref)) / ref_norm
    print(f"RESULT bert {dtype}: ghost-vs-instantiate max_abs={gi_abs:.3e} rel={gi_rel:.3e} "
          f"(worst {gi_where}); ghost vs fp32 ref (global norm rel)={ghost_vs_ref:.3e}; "
          f"instantiate vs fp32 ref={inst_vs_ref:.3e}")
    assert gi_abs == 0.0 or gi_rel <= 1e-7, (
        f"ghost and instantiate differ with clip factor 1 (stale state?): rel {gi_rel:.3e} at {gi_where}")
    assert ghost_vs_ref <= 3e-2, f"ghost far from fp32 reference: {ghost_vs_ref:.3e}"
    assert inst_vs_ref <= 3e-2, f"instantiate far from fp32 reference: {inst_vs_ref:.3e}"


# --------------------------------------------------------------------------- #
# 4. sizes that coincide: sequence-first layout with T == B
# --------------------------------------------------------------------------- #
class TokenEncoder(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(20, 16)
        self.enc = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32,
                                              dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):  # ids: [B, T]
        h = self.emb(ids)
        if not self.batch_first:
            h = h.transpose(0, 1)  # [T, B, d]
        h = self.enc(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(dim=1))


class TokenMLP(nn.Module):
    """Batch-first MLP over tokens where hidden size == B == T."""

    def __init__(self, d: int):
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.l1 = nn.Linear(d, d)
        self.l2 = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.l2(torch.tanh(self.l1(self.emb(ids))))
        return self.head(torch.tanh(h).mean(dim=1))


def token_batch(B: int, T: int):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 20, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)


def token_encoder(batch_first: bool, attn: str) -> TokenEncoder:
    """attn="frozen" freezes nn.MultiheadAttention so only the size question is tested."""
    torch.manual_seed(0)
    model = TokenEncoder(batch_first=batch_first).double().train()
    if attn == "frozen":
        model.enc.self_attn.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("attn", ["trainable", "frozen"], ids=["attn_trainable", "attn_frozen"])
def test_sequence_first_T_equals_B_refused_or_exact(attn, method):
    model = token_encoder(batch_first=False, attn=attn)
    check_exact_or_refused(f"seq_first_T=B[{attn}]", model, token_batch(4, 4), ce_loss, TINY_C, method)


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_batch_first_T_equals_B_accepted_and_exact(method):
    model = token_encoder(batch_first=True, attn="frozen")
    check_exact_and_sensitive("batch_first_T=B[attn_frozen]", model, token_batch(4, 4), ce_loss,
                              TINY_C, method)


def outcome(model, batch, method):
    """'exact' or the ModelError message, for a batch-first model on one batch."""
    try:
        check_exact_and_sensitive("outcome", model, batch, ce_loss, TINY_C, method)
        return "exact"
    except ModelError as e:
        return str(e)


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_batch_first_trainable_attention_same_outcome_whatever_the_sizes(method):
    """A coincidence of sizes (T == B) must change nothing: a batch-first model is handled the
    same as with T != B (nn.MultiheadAttention's own parameters are not supported by the
    library, and are refused loudly either way)."""
    coincident = outcome(token_encoder(batch_first=True, attn="trainable"), token_batch(4, 4), method)
    distinct = outcome(token_encoder(batch_first=True, attn="trainable"), token_batch(4, 5), method)
    print(f"RESULT batch_first attn_trainable T=B: {coincident!r}; T!=B: {distinct!r}")
    assert coincident == distinct


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_token_mlp_hidden_equals_B_equals_T_accepted_and_exact(method):
    torch.manual_seed(0)
    model = TokenMLP(d=4).double()
    check_exact_and_sensitive("token_mlp_d=B=T", model, token_batch(4, 4), ce_loss, TINY_C, method)


# --------------------------------------------------------------------------- #
# 5. a parameter unfrozen after make_private must not be trained raw
# --------------------------------------------------------------------------- #
class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def flat_indices(logical_batch) -> np.ndarray:
    parts = [np.asarray(i).reshape(-1) for i in logical_batch]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def dp_accumulate(model, logical_batch, X, Y):
    for idx in logical_batch:
        idx = np.asarray(idx).reshape(-1)
        if idx.size:
            F.cross_entropy(model(X[idx]), Y[idx]).backward()


@pytest.mark.parametrize("frozen", ["first_layer", "first_bias_only"])
def test_unfreezing_after_make_private_is_refused(frozen):
    torch.manual_seed(0)
    model = TwoLinear().double()
    N = 32
    X = torch.randn(N, 6, dtype=torch.float64)
    Y = torch.randint(0, 3, (N,))
    late = [model.first.weight, model.first.bias] if frozen == "first_layer" else [model.first.bias]
    for p in late:
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the frozen params ARE in the optimizer
    dp = make_private(model, opt, num_examples=N, batch_size=8, epochs=1, noise_multiplier=1.0,
                      delta=1e-5, max_grad_norm=1.0, seed=0)
    batches = iter(dp.batches(physical_batch_size=8))

    # step 1: normal DP step; the frozen parameters must not move
    before = [p.detach().clone() for p in late]
    second_before = model.second.weight.detach().clone()
    dp_accumulate(model, next(batches), X, Y)
    dp.optimizer.step()
    dp.optimizer.zero_grad()
    assert all(torch.equal(b, p) for b, p in zip(before, late)), "frozen parameter moved in step 1"
    assert not torch.equal(second_before, model.second.weight), "trainable parameter did not move"

    # step 2: unfreeze, then train on a non-empty sampled batch
    for p in late:
        p.requires_grad_(True)
    logical = next(batches)
    while flat_indices(logical).size == 0:
        logical = next(batches)
    before = [p.detach().clone() for p in late]
    stage = "forward/backward"
    try:
        dp_accumulate(model, logical, X, Y)
        raw = [None if p.grad is None else p.grad.detach().clone() for p in late]
        stage = "step"
        dp.optimizer.step()
        stage = "none"
    except ModelError as e:
        print(f"RESULT unfreeze[{frozen}]: REFUSED at {stage}: ModelError: {e}")
    moved = max(float((b - p.detach()).abs().max()) for b, p in zip(before, late))
    if stage == "none":
        # diagnose what the step applied: was it exactly -lr * (raw grad accumulated)?
        raw_step = [None if g is None else -0.1 * g for g in raw]
        matches_raw = all(g is not None and torch.allclose(p.detach() - b, g, rtol=1e-9, atol=1e-12)
                          for b, p, g in zip(before, late, raw_step))
        print(f"RESULT unfreeze[{frozen}]: NOT refused; unfrozen param moved by max {moved:.3e}; "
              f"equals -lr*raw_grad: {matches_raw}")
    assert stage != "none", "step with a parameter unfrozen after make_private was not refused"
    assert moved == 0.0, f"unfrozen parameter changed by {moved:.3e} despite refusal"


# --------------------------------------------------------------------------- #
# 6. normalisation layers applied to a 2-D [B, d] tensor
# --------------------------------------------------------------------------- #
class PooledNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.tok = nn.Linear(8, 8)
        self.norm = norm
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, T, 8]
        h = torch.tanh(self.tok(x)).mean(dim=1)  # [B, 8]
        return self.head(self.norm(h))


NORMS = ["layernorm"] + (["rmsnorm"] if hasattr(nn, "RMSNorm") else [])


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("norm", NORMS)
def test_norm_on_2d_input(norm, method):
    torch.manual_seed(0)
    layer = nn.LayerNorm(8) if norm == "layernorm" else nn.RMSNorm(8)
    model = PooledNorm(layer).double()
    with torch.no_grad():  # non-trivial affine parameters
        model.norm.weight.add_(0.3 * torch.randn(8, dtype=torch.float64))
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    check_exact_and_sensitive(f"{norm}_2d", model, (x, y), ce_loss, TINY_C, method)


# --------------------------------------------------------------------------- #
# 7. DeBERTa-v2 with relative attention
# --------------------------------------------------------------------------- #
def tiny_deberta(share_att_key: bool):
    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pooler_dropout=0.0, max_position_embeddings=16, relative_attention=True,
        pos_att_type=["p2c", "c2p"], position_buckets=4, max_relative_positions=8,
        share_att_key=share_att_key, position_biased_input=False, norm_rel_ebd="layer_norm",
        num_labels=3)
    return transformers.DebertaV2ForSequenceClassification(cfg).double().train()


def is_relative_position_param(name: str, share_att_key: bool) -> bool:
    """Parameters that touch the (batch-less) relative position embeddings."""
    if "pos_" in name or "rel_embeddings" in name or name.startswith("deberta.encoder.LayerNorm."):
        return True
    return share_att_key and ".attention." in name


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("share", [False, True], ids=["share_att_key=False", "share_att_key=True"])
def test_deberta_all_trainable_exact_or_refused(share, method):
    model = tiny_deberta(share)
    check_exact_or_refused(f"deberta_all[share={share}]", model, hf_batch(5, 7), hf_loss,
                           TINY_C, method, floor_frac=1e-6)


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("share", [False, True], ids=["share_att_key=False", "share_att_key=True"])
def test_deberta_position_params_frozen_accepted_and_exact(share, method):
    model = tiny_deberta(share)
    for n, p in model.named_parameters():
        if is_relative_position_param(n, share):
            p.requires_grad_(False)
    check_exact_and_sensitive(f"deberta_posfrozen[share={share}]", model, hf_batch(5, 7),
                              hf_loss, TINY_C, method)


# --------------------------------------------------------------------------- #
# 8. in-place modification around a hooked layer
# --------------------------------------------------------------------------- #
class InputModifiedAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, inp):
        x = inp * 1.0  # not a leaf
        h = self.lin(x)
        x.mul_(2.0)  # the layer's input changes after the layer ran
        return self.head(torch.tanh(h) + x.mean(dim=-1, keepdim=True))


class OutputModifiedAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, inp):
        h = self.lin(inp)
        h.mul_(2.0)  # the layer's output changes in place (autograd handles this fine)
        return self.head(torch.tanh(h))


def inplace_case(cls):
    torch.manual_seed(0)
    model = cls().double()
    return model, (torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,)))


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_layer_input_modified_in_place_refused_or_exact(method):
    model, batch = inplace_case(InputModifiedAfter)
    # Plain PyTorch: is the per-example gradient even defined?
    try:
        reference_clipped_sum(model, batch, ce_loss, TINY_C)
        defined = True
    except RuntimeError as e:
        defined = False
        print(f"RESULT inplace_input: plain PyTorch raises RuntimeError: {str(e)[:90]}...")
    if defined:
        check_exact_or_refused("inplace_input", model, batch, ce_loss, TINY_C, method)
        return
    # Undefined gradient: the library must refuse with ModelError (not a raw RuntimeError).
    try:
        run_clipped(model, batch, ce_loss, TINY_C, method)
    except ModelError as e:
        print(f"RESULT inplace_input method={method}: REFUSED ModelError: {e}")
        return
    except RuntimeError as e:
        pytest.fail(f"raw {type(e).__name__} instead of ModelError: {str(e)[:200]}")
    pytest.fail("library produced a sum for a model whose gradient is undefined")


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_layer_output_modified_in_place_refused_or_exact(method):
    model, batch = inplace_case(OutputModifiedAfter)
    try:
        check_exact_or_refused("inplace_output", model, batch, ce_loss, TINY_C, method)
    except RuntimeError as e:
        if isinstance(e, ModelError):
            raise
        pytest.fail(f"raw RuntimeError instead of ModelError: {str(e)[:200]}")
