"""Independent reference checks for cached-feature (head-only) DP training.

Claim under test: for a mean-pooling classifier with a frozen encoder, running
the encoder once per example (eval mode) and DP-training the head on the cached
pooled features is the same DP mechanism as running the full model every step.

Everything here is written from the maths (per-example gradients of the full
model, clipped and summed) and the public API only.
"""

import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from dptrain import ModelError, PerSampleClipper, make_private
from dptrain.data import encode, load_intent_data
from dptrain.features import feature_head, pooled_features
from dptrain.models import load_model, set_trainable

torch.set_num_threads(1)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_LEN = 32


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


def _build_encoder_dir(path, texts):
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + words) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(vocab))
    torch.manual_seed(1234)
    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True})
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = load_intent_data("synthetic", synthetic_per_intent=4, seed=0)
    path = tmp_path_factory.mktemp("tiny_bert")
    all_texts = tuple(data.train.texts) + tuple(data.validation.texts) + tuple(data.test.texts)
    _build_encoder_dir(path, all_texts)
    model, tok = load_model(str(path), data.num_labels, data.label_names)
    model.double()
    model.dropout.p = 0.0
    set_trainable(model, "head")
    model.eval()
    # Make the head weights non-trivial (so gradients differ across examples),
    # deterministically.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.classifier.weight.copy_(
            torch.randn(model.classifier.weight.shape, generator=g, dtype=torch.float64) * 0.5
        )
        model.classifier.bias.copy_(
            torch.randn(model.classifier.bias.shape, generator=g, dtype=torch.float64) * 0.5
        )
    enc = encode(tok, data.train, MAX_LEN)
    N = len(enc.input_ids)
    lengths = [len(x) for x in enc.input_ids]
    assert len(set(lengths)) > 1, "need examples of different lengths to exercise padding"

    # ---- own reference: FULL model per example, alone, no padding ----------
    W, b = model.classifier.weight, model.classifier.bias
    ref_pooled = []
    ref_grads = []
    for i in range(N):
        ids = torch.tensor(enc.input_ids[i], dtype=torch.long)[None]
        mask = torch.ones_like(ids)
        W.grad = None
        b.grad = None
        h = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        logits = model.classifier(model.dropout(pooled))
        y = torch.tensor([int(enc.labels[i])])
        loss = F.cross_entropy(logits, y)
        loss.backward()
        ref_pooled.append(pooled.detach()[0].clone())
        ref_grads.append(torch.cat([W.grad.reshape(-1), b.grad.reshape(-1)]).clone())
    W.grad = None
    b.grad = None
    ref_pooled = torch.stack(ref_pooled)
    ref_grads = torch.stack(ref_grads)  # [N, P]
    norms = ref_grads.norm(dim=1)
    # C at the 25th percentile of per-example norms: ~75 % of examples clipped.
    C = float(torch.quantile(norms, 0.25))
    frac_clipped = float((norms > C).double().mean())
    assert frac_clipped >= 0.5 and frac_clipped < 1.0
    return dict(
        model=model,
        tok=tok,
        data=data,
        enc=enc,
        N=N,
        ref_pooled=ref_pooled,
        ref_grads=ref_grads,
        norms=norms,
        C=C,
        frac_clipped=frac_clipped,
    )


def _ref_clipped_sum(s, idx):
    G = s["ref_grads"][idx]
    n = G.norm(dim=1)
    factor = torch.clamp(s["C"] / (n + 1e-6), max=1.0)
    return (factor[:, None] * G).sum(0)


def _cached_clipped_sum(head, params, feats, labels, idx, C, method):
    clipper = PerSampleClipper(head, max_grad_norm=C, norm_method=method)
    try:
        for p in params:
            p.grad = None
        out = head(features=feats[idx], labels=labels[idx])
        out.loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).detach().clone()
        for p in params:
            p.grad = None
        return g
    finally:
        clipper.detach()


def _head_and_params(model):
    head = feature_head(model)
    W, b = model.classifier.weight, model.classifier.bias
    return head, [W, b]


# --------------------------------------------------------------------------
# 3. pooled_features == own mean pooling of encoder outputs, example-by-example
# --------------------------------------------------------------------------


def test_pooled_features_match_own_mean_pooling(setup):
    s = setup
    model, enc, tok = s["model"], s["enc"], s["tok"]
    pad = tok.pad_token_id
    assert model.classifier.weight.dtype == torch.float64
    worst = 0.0
    first = None
    for bs in (256, 7, 1):
        Fx = pooled_features(model, enc, pad, batch_size=bs)
        assert Fx.shape == s["ref_pooled"].shape
        assert Fx.dtype == torch.float64
        err = float((Fx - s["ref_pooled"]).abs().max())
        worst = max(worst, err)
        assert err <= 1e-10, f"batch_size={bs}: max abs err {err:.3e}"
        if first is None:
            first = Fx
            again = pooled_features(model, enc, pad, batch_size=bs)
            assert torch.equal(first, again), "second call returned different rows"
    print(f"\n[check3] pooled_features max abs err vs own per-example mean pooling: {worst:.3e}")


def test_pooled_features_use_eval_mode(setup):
    """The encoder must run in eval mode even if the model is left in train mode."""
    s = setup
    model, enc, tok = s["model"], s["enc"], s["tok"]
    model.train()
    try:
        torch.manual_seed(0)
        Fx = pooled_features(model, enc, tok.pad_token_id)
    finally:
        model.eval()
    err = float((Fx - s["ref_pooled"]).abs().max())
    print(f"\n[check3b] pooled_features (model in train mode) max abs err vs eval reference: {err:.3e}")
    assert err <= 1e-10


# --------------------------------------------------------------------------
# 1. cached path == own full-model per-example clipped sum
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_cached_clipped_sum_matches_full_model_reference(setup, method):
    s = setup
    model, enc, tok, N, C = s["model"], s["enc"], s["tok"], s["N"], s["C"]
    head, params = _head_and_params(model)
    # the head shares W, b with model.classifier
    head_ptrs = {p.data_ptr() for p in head.parameters() if p.requires_grad}
    assert head_ptrs == {p.data_ptr() for p in params}
    labels = torch.tensor(np.array(enc.labels), dtype=torch.long)

    # head loss is mean cross-entropy and logits = W x + b
    Fx = pooled_features(model, enc, tok.pad_token_id)
    with torch.no_grad():
        out = head(features=Fx[:10], labels=labels[:10])
        exp_logits = Fx[:10] @ params[0].T + params[1]
        assert torch.allclose(out.logits, exp_logits, rtol=1e-12, atol=1e-12)
        assert torch.allclose(out.loss, F.cross_entropy(exp_logits, labels[:10]), rtol=1e-12, atol=0)

    rng = np.random.default_rng(3)
    batches = [
        np.arange(N),
        rng.choice(N, 16, replace=False),
        rng.choice(N, 5, replace=False),
        np.array([int(rng.integers(N))]),
        rng.choice(N, 33, replace=False),
    ]
    worst = 0.0
    # features computed with different padding layouts
    for bs in (256, 7):
        feats = pooled_features(model, enc, tok.pad_token_id, batch_size=bs)
        for idx in batches:
            got = _cached_clipped_sum(head, params, feats, labels, idx, C, method)
            ref = _ref_clipped_sum(s, idx)
            rel = float((got - ref).abs().max() / ref.abs().max())
            worst = max(worst, rel)
            assert rel <= 1e-9, f"{method}, feat bs={bs}, |B|={len(idx)}: rel err {rel:.3e}"
    print(
        f"\n[check1:{method}] C={C:.4f}, clipped fraction={s['frac_clipped']:.2f}, "
        f"max rel err={worst:.3e}"
    )


# --------------------------------------------------------------------------
# 2. sensitivity of the cached clipped sum
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_cached_sensitivity_at_most_C(setup, method):
    s = setup
    model, enc, tok, N, C = s["model"], s["enc"], s["tok"], s["N"], s["C"]
    head, params = _head_and_params(model)
    labels = torch.tensor(np.array(enc.labels), dtype=torch.long)
    feats = pooled_features(model, enc, tok.pad_token_id)
    full = np.arange(N)
    S = _cached_clipped_sum(head, params, feats, labels, full, C, method)
    ratios = []
    for i in range(N):
        S_i = _cached_clipped_sum(head, params, feats, labels, np.delete(full, i), C, method)
        ratios.append(float((S - S_i).norm()) / C)
    ratios = np.array(ratios)
    print(f"\n[check2:{method}] max shift / C = {ratios.max():.12f} (min {ratios.min():.4f})")
    assert ratios.max() <= 1 + 1e-9
    # clipped examples must move the sum by (almost exactly) C: clipping is at C
    assert ratios.max() >= 0.999


# --------------------------------------------------------------------------
# 4. noise calibration through make_private
# --------------------------------------------------------------------------


def test_noise_std_on_zero_feature_weights(setup):
    s = setup
    model = copy.deepcopy(s["model"])
    model.dropout.p = 0.0
    set_trainable(model, "head")
    model.eval()
    enc, N = s["enc"], s["N"]
    d = model.classifier.in_features
    head = feature_head(model)
    W = model.classifier.weight
    labels = torch.tensor(np.array(enc.labels), dtype=torch.long)
    zeros = torch.zeros(N, d, dtype=torch.float64)
    sigma, C, L, target_steps = 2.0, 1.0, 8, 200
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0, momentum=0.0)
    dp = make_private(
        head,
        opt,
        num_examples=N,
        batch_size=L,
        epochs=target_steps * L / N,
        noise_multiplier=sigma,
        delta=1e-5,
        max_grad_norm=C,
        seed=11,
    )
    deltas = []
    n_empty = 0
    for logical in dp.batches(physical_batch_size=4):
        W0 = W.detach().clone()
        nonempty = [idx for idx in logical if len(idx) > 0]
        if not nonempty:
            n_empty += 1
        for idx in nonempty:
            idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
            out = head(features=zeros[idx_t], labels=labels[idx_t])
            out.loss.backward()
        dp.optimizer.step()
        dp.optimizer.zero_grad()
        deltas.append((W.detach() - W0).reshape(-1))
    deltas = torch.stack(deltas)
    steps = deltas.shape[0]
    zero_steps = int((deltas.abs().sum(1) == 0).sum())
    expected = sigma * C / L
    std = float(deltas.std())
    mean = float(deltas.mean())
    n = deltas.numel()
    print(
        f"\n[check4] steps={steps} (empty logical batches={n_empty}, steps with no W change={zero_steps}), "
        f"std={std:.5f}, expected sigma*C/L={expected:.5f}, ratio={std / expected:.4f}, "
        f"mean={mean:.2e} (4 s.e. = {4 * expected / n ** 0.5:.2e}), eps={dp.epsilon():.3f}"
    )
    assert steps >= 150
    assert zero_steps == 0, "some steps added no noise to W"
    assert abs(std / expected - 1) <= 0.03
    assert abs(mean) <= 4 * expected / n ** 0.5


# --------------------------------------------------------------------------
# 5. refusal when any encoder parameter trains
# --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["last-1", "all", "bias"])
def test_feature_head_refuses_trainable_encoder(setup, spec):
    model = copy.deepcopy(setup["model"])
    set_trainable(model, spec)
    assert any(p.requires_grad for p in model.encoder.parameters())
    with pytest.raises(ModelError):
        feature_head(model)
    set_trainable(model, "head")
    assert not any(p.requires_grad for p in model.encoder.parameters())
    feature_head(model)  # accepted again once the encoder is frozen
