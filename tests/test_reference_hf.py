"""Independent reference checks of ``dptrain.hf.DPTrainer`` against DP-SGD (Abadi et al. 2016).

Everything expected here is computed from the mathematics of DP-SGD with Poisson sampling,
using only the trainer's public surface (``trainer.dp.noise_multiplier``, ``.sample_rate``,
``.steps``, ``.delta``, ``.sampler.last_batch_size``, ``trainer.epsilon()`` and the log history):

* each step draws a logical batch in which each of the N examples appears independently with
  probability q = L / N (so sizes are Binomial(N, q), possibly 0);
* each example's own gradient g_i (of the model's ``.loss`` on that example alone) is clipped
  jointly over all trainable parameters: g_i * min(1, C / (||g_i|| + 1e-6));
* the direction handed to the wrapped optimizer is (sum_i clipped g_i + N(0, sigma^2 C^2 I)) / (q N),
  with fresh noise once per step; with plain SGD (constant lr, no momentum, no weight decay) the
  update is theta <- theta - lr * direction;
* the reported epsilon is Opacus' PRV accountant for [(sigma, q, steps)] at delta, <= the target;
* neither the training loss nor the gradient norm reaches the logs unless log_train_loss=True.

TrainingArguments.max_grad_norm is left at the Trainer's default (1.0) throughout: the updates
checked below are far larger than that, so they also show that the Trainer's clipping of the
summed gradient is not applied on top of DP-SGD.

How the update is checked: the logical batch of every step is recovered from the inputs handed
to ``training_step`` (every example has a unique feature row), the parameters are captured
before every step, and the clipped sum S_t is recomputed with a plain per-example loop in
float64.  Under the claim the residual r_t = (theta_before - theta_after) / lr - S_t / (q N) is
pure i.i.d. N(0, s^2) with s = sigma C / (q N), so (a) its pooled std is s, (b) its mean is 0,
(c) its projection on ANY unit vector fixed before the noise is drawn is N(0, s^2) -- we project
on the clipped sum itself, on the unclipped sum, on the per-layer-clipped sum's deviation and on
each example's clipped gradient, which makes the check sharp against the usual mistakes
(dividing by the realised batch size, clipping per layer, not clipping, mean instead of sum),
and (d) residuals of different steps are uncorrelated.  Thresholds are 5-5.5 standard errors.

Run with ``-s`` to see a RESULT line per check.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from dptrain.hf import DPArguments, DPTrainer  # noqa: E402

STAB = 1e-6  # the "+ 1e-6" of the clip factor
Z_PROJ = 5.5  # |N(0,1)| > 5.5 has probability 4e-8: safe with ~100 projections per test
Z_MEAN = 5.0
Z_STD = 5.0


# --------------------------------------------------------------------------- #
# models and data of our own making
# --------------------------------------------------------------------------- #
class TinyMLP(nn.Module):
    """x -> Linear -> tanh -> Linear -> logits; loss = mean cross-entropy over the batch."""

    def __init__(self, d: int, h: int, k: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d, h)
        self.l2 = nn.Linear(h, k)
        self.double()

    def forward(self, x, labels=None):
        logits = self.l2(torch.tanh(self.l1(x)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class FeatureData(torch.utils.data.Dataset):
    """N examples with unique random float64 feature rows (the row identifies the example)."""

    def __init__(self, n: int, d: int, k: int, seed: int, spread: float = 1.0,
                 shared: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        # per-example scales log-uniform in [1/spread, spread]: per-example gradient norms then
        # differ a lot, so clipping matters (and clipping mistakes show)
        log_scale = torch.empty(n, 1, dtype=torch.float64).uniform_(-1, 1, generator=g)
        # a component common to all examples, labels mostly class 0: per-example gradients
        # then partly agree, so the clipped sum is large next to the noise
        common = shared * torch.randn(1, d, generator=g, dtype=torch.float64)
        self.x = torch.exp(log_scale * math.log(spread)) * (
            common + torch.randn(n, d, generator=g, dtype=torch.float64))
        self.y = torch.randint(0, k, (n,), generator=g)
        if shared:
            self.y[torch.rand(n, generator=g) < 0.75] = 0
        self.key_to_index = {self.key(self.x[i]): i for i in range(n)}
        assert len(self.key_to_index) == n

    @staticmethod
    def key(row: torch.Tensor):
        return tuple(row.tolist())

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}

    def example(self, i):
        return {"x": self.x[i : i + 1], "labels": self.y[i : i + 1]}

    def members(self, physical_batches):
        return [self.key_to_index[self.key(row)] for b in physical_batches for row in b["x"]]


class TokenData(torch.utils.data.Dataset):
    """N unique padded token sequences (fixed length, varying real length) for a tiny BERT."""

    def __init__(self, n: int, vocab: int, length: int, k: int, seed: int):
        rng = np.random.default_rng(seed)
        seen, rows = set(), []
        while len(rows) < n:
            real = int(rng.integers(3, length + 1))
            ids = [2] + [int(t) for t in rng.integers(5, vocab, real - 1)]
            ids = ids + [0] * (length - real)
            if tuple(ids) not in seen:
                seen.add(tuple(ids))
                rows.append((ids, [1] * real + [0] * (length - real)))
        self.ids = torch.tensor([r[0] for r in rows])
        self.mask = torch.tensor([r[1] for r in rows])
        self.y = torch.as_tensor(rng.integers(0, k, n))
        self.key_to_index = {tuple(self.ids[i].tolist()): i for i in range(n)}

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}

    def example(self, i):
        return {
            "input_ids": self.ids[i : i + 1],
            "attention_mask": self.mask[i : i + 1],
            "labels": self.y[i : i + 1],
        }

    def members(self, physical_batches):
        return [
            self.key_to_index[tuple(row.tolist())] for b in physical_batches for row in b["input_ids"]
        ]


def tiny_bert(seed: int, vocab: int, k: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=k,
        initializer_range=0.2,  # larger than BERT's 0.02: per-example norms then differ 5-fold
    )
    model = BertForSequenceClassification(config).double()
    model.train()
    # A frozen parameter: it must neither move nor count in the per-example norm.
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- #
# recording trainer
# --------------------------------------------------------------------------- #
class RecordingTrainer(DPTrainer):
    """Captures, at the start of every step, the parameters and the logical batch."""

    record_params = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        batches = list(inputs)
        rec = {
            "members": self.train_dataset.members(batches),
            "physical": len(batches),
            "last_batch_size": int(self.dp.sampler.last_batch_size),
        }
        if self.record_params:
            rec["params"] = snapshot(self.model)
        self.records.append(rec)
        return super().training_step(model, inputs, num_items_in_batch)


def make_trainer(tmp_path, model, data, *, lr, logical, physical, epochs, eps, clip,
                 dp_seed, seed=0, record_params=True, max_steps=-1, logging_steps=500,
                 log_train_loss=False, delta=1e-5):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=physical,
        gradient_accumulation_steps=1,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=lr,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=logging_steps,
        disable_tqdm=True,
        seed=seed,
    )  # max_grad_norm left at the Trainer default (1.0) on purpose: DP must not be altered by it
    dp_args = DPArguments(
        target_epsilon=eps,
        delta=delta,
        max_grad_norm=clip,
        logical_batch_size=logical,
        dp_seed=dp_seed,
        log_train_loss=log_train_loss,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RecordingTrainer(model=model, args=args, dp_args=dp_args, train_dataset=data)
    trainer.records = []
    trainer.record_params = record_params
    return trainer


# --------------------------------------------------------------------------- #
# reference maths
# --------------------------------------------------------------------------- #
def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def snapshot(model):
    return {n: p.detach().clone().to(torch.float64) for n, p in model.named_parameters()}


def flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def per_example_grads(model, params, data, members):
    """Per-example gradients (dict name -> tensor) at ``params``, from a batch-of-one loop."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    names = [n for n, _ in trainable(model)]
    out = []
    for i in members:
        model.zero_grad(set_to_none=True)
        loss = model(**data.example(i)).loss
        grads = torch.autograd.grad(loss, [p for _, p in trainable(model)], allow_unused=True)
        out.append(
            {n: (torch.zeros_like(p) if g is None else g.detach().to(torch.float64))
             for (n, p), g in zip(trainable(model), grads)}
        )
    return names, out


def joint_clip(g, names, C):
    norm = float(torch.sqrt(sum((g[n] ** 2).sum() for n in names)))
    return min(1.0, C / (norm + STAB)), norm


def reference_directions(names, grads, C):
    """Clipped sum S and a set of test directions fixed before the noise is drawn."""
    D = sum(grads[0][n].numel() for n in names) if grads else None
    if not grads:
        return None, {}
    clipped, unclipped, per_layer = [], [], []
    for g in grads:
        c, _ = joint_clip(g, names, C)
        clipped.append(flat({n: c * g[n] for n in names}, names))
        unclipped.append(flat(g, names))
        per_layer.append(
            flat({n: g[n] * min(1.0, C / (float(g[n].norm()) + STAB)) for n in names}, names)
        )
    S = torch.stack(clipped).sum(0)
    dirs = {"clipped_sum": S, "unclipped_sum": torch.stack(unclipped).sum(0),
            "per_layer_minus_joint": torch.stack(per_layer).sum(0) - S}
    for j, v in enumerate(clipped[:12]):
        dirs[f"example_{j}"] = v
    assert S.numel() == D
    return S, dirs


def residuals(trainer, model_copy, data, final_params, lr, C):
    """Per step: residual r_t (flat), clipped sum S_t, test directions, members."""
    q, N = trainer.dp.sample_rate, len(data)
    names = [n for n, _ in trainable(model_copy)]
    befores = [r["params"] for r in trainer.records] + [final_params]
    out = []
    for t, rec in enumerate(trainer.records):
        before, after = befores[t], befores[t + 1]
        _, grads = per_example_grads(model_copy, before, data, rec["members"])
        S, dirs = reference_directions(names, grads, C)
        step = (flat(before, names) - flat(after, names)) / lr
        r = step if S is None else step - S / (q * N)
        out.append({"r": r, "S": S, "dirs": dirs, "members": rec["members"], "step": step})
    return names, out


def check_residuals(label, trainer, steps, sigma, C, q, N, *, std_tol_floor=0.0):
    """Assertions (a)-(d) of the module docstring."""
    s = sigma * C / (q * N)
    z = torch.cat([st["r"] for st in steps]) / s
    n = z.numel()
    mean, std = float(z.mean()), float(z.std())
    std_tol = Z_STD / math.sqrt(2 * n) + std_tol_floor
    print(f"RESULT {label}: {len(steps)} steps, {n} residuals, std/(sigma C/(qN)) = {std:.4f} "
          f"(tol {std_tol:.4f}), mean/s = {mean:.4f} (tol {Z_MEAN / math.sqrt(n):.4f}), "
          f"sigma={sigma:.4f} C={C:.4f} qN={q * N:.2f}")
    worst = (0.0, "")
    for t, st in enumerate(steps):
        for name, u in st["dirs"].items():
            nu = float(u.norm())
            if nu < 1e-12:
                continue
            proj = float(st["r"] @ u) / nu / s
            if abs(proj) > abs(worst[0]):
                worst = (proj, f"step {t} direction {name}")
        if st["S"] is not None and len(steps) <= 4:
            B = len(st["members"])
            # what the step would have looked like under the alternatives, for the record
            beta = float(st["step"] @ st["S"]) / float(st["S"] @ st["S"])
            print(f"RESULT {label} step {t}: B={B} qN={q * N:.2f} fitted scale of S = "
                  f"{beta:.6f} (claim 1/(qN) = {1 / (q * N):.6f}, realised 1/B = {1 / B:.6f}), "
                  f"projection on S = {float(st['r'] @ st['S']) / float(st['S'].norm()) / s:+.2f} s")
    print(f"RESULT {label}: largest |projection| = {abs(worst[0]):.2f} s at {worst[1]} "
          f"(tol {Z_PROJ})")
    corrs = []
    for a, b in zip(steps[:-1], steps[1:]):
        ra, rb = a["r"] - a["r"].mean(), b["r"] - b["r"].mean()
        corrs.append(float(ra @ rb / (ra.norm() * rb.norm())))
    d = steps[0]["r"].numel()
    if corrs:
        print(f"RESULT {label}: max |corr| of consecutive steps' residuals = "
              f"{max(map(abs, corrs)):.4f} (tol {Z_PROJ / math.sqrt(d):.4f})")
    assert abs(mean) < Z_MEAN / math.sqrt(n), f"{label}: residual mean {mean} s"
    assert abs(std - 1.0) < std_tol, (
        f"{label}: residual std is {std:.4f} x sigma C / (qN), expected 1 +- {std_tol:.4f}")
    assert abs(worst[0]) < Z_PROJ, f"{label}: residual has {worst[0]:.2f} s along {worst[1]}"
    for c in corrs:
        assert abs(c) < Z_PROJ / math.sqrt(d), f"{label}: noise correlated across steps ({c})"


def prv_epsilon(sigma, q, steps, delta):
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta=delta))


def assert_no_loss_logged(trainer):
    for entry in trainer.state.log_history:
        for key in ("loss", "grad_norm", "train_loss"):
            assert key not in entry, f"{key} logged: {entry}"


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #
MLP_SETUP = dict(N=64, L=16, P=4, d=16, h=64, k=6, lr=0.1, spread=10.0, shared=2.0,
                 clip_quantile=0.3)


def mlp_setup():
    c = MLP_SETUP
    data = FeatureData(c["N"], c["d"], c["k"], seed=1, spread=c["spread"], shared=c["shared"])
    model = TinyMLP(c["d"], c["h"], c["k"], seed=2)
    ref = TinyMLP(c["d"], c["h"], c["k"], seed=2)
    # C between per-example norms at initialisation: most examples are clipped, some are not.
    names, g0 = per_example_grads(ref, snapshot(model), data, range(c["N"]))
    norms = sorted(joint_clip(g, names, 1.0)[1] for g in g0)
    C = float(np.quantile(norms, c["clip_quantile"]))
    return data, model, ref, names, g0, C


def test_mlp_steps_are_clipped_sum_plus_sigma_c_noise_over_expected_batch(tmp_path):
    """Four DP-SGD steps of an MLP, recomputed exactly; noise small (target eps 50)."""
    N, L, P, lr = (MLP_SETUP[key] for key in ("N", "L", "P", "lr"))
    data, model, ref, names, g0, C = mlp_setup()
    assert abs(math.log(C)) > math.log(1.5), f"C={C} too close to 1 to tell sigma*C from sigma"

    trainer = make_trainer(tmp_path, model, data, lr=lr, logical=L, physical=P, epochs=1.0,
                           eps=50.0, clip=C, dp_seed=11)
    q, sigma = trainer.dp.sample_rate, trainer.dp.noise_multiplier
    assert q == pytest.approx(L / N, rel=1e-12)
    assert trainer.dp.steps == round(1.0 / q) == 4
    trainer.train()
    assert trainer.state.global_step == 4 == len(trainer.records)

    _, steps = residuals(trainer, ref, data, snapshot(model), lr, C)
    n_clipped = 0
    for rec, st in zip(trainer.records, steps):
        assert len(set(rec["members"])) == len(rec["members"]), "an example drawn twice"
        assert rec["last_batch_size"] == len(rec["members"])
        assert rec["physical"] >= math.ceil(len(rec["members"]) / P)
    for g in g0:
        n_clipped += joint_clip(g, names, C)[1] > C
    print(f"RESULT mlp: batch sizes {[len(r['members']) for r in trainer.records]}, "
          f"physical batches {[r['physical'] for r in trainer.records]}, "
          f"{n_clipped}/{N} examples above C at init")
    check_residuals("mlp", trainer, steps, sigma, C, q, N)
    assert_no_loss_logged(trainer)


def test_tiny_bert_clips_jointly_over_all_trainable_parameters(tmp_path):
    """Same check on a float64 2-layer BERT with a frozen parameter, max_steps=2."""
    N, L, P, vocab, k, lr = 32, 8, 3, 40, 3, 0.05
    data = TokenData(N, vocab, length=8, k=k, seed=3)
    model = tiny_bert(4, vocab, k)
    ref = tiny_bert(4, vocab, k)
    names, g0 = per_example_grads(ref, snapshot(model), data, range(N))
    assert "bert.embeddings.position_embeddings.weight" not in names
    norms = sorted(joint_clip(g, names, 1.0)[1] for g in g0)
    C = float(np.quantile(norms, 0.3))
    assert norms[-1] > 2 * C, "want examples clipped hard"
    # per-layer clipping would differ from joint clipping on these examples
    assert any(float(g[n].norm()) > 0.3 * C for g in g0 for n in names)

    trainer = make_trainer(tmp_path, model, data, lr=lr, logical=L, physical=P, epochs=1.0,
                           eps=50.0, clip=C, dp_seed=12, max_steps=2)
    q, sigma = trainer.dp.sample_rate, trainer.dp.noise_multiplier
    assert q == pytest.approx(L / N, rel=1e-12)
    assert trainer.dp.steps == 2, "max_steps > 0 must set the planned steps"
    frozen_before = model.bert.embeddings.position_embeddings.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 2 == len(trainer.records)
    assert torch.equal(model.bert.embeddings.position_embeddings.weight, frozen_before)

    _, steps = residuals(trainer, ref, data, snapshot(model), lr, C)
    print(f"RESULT bert: {len(names)} trainable tensors, batch sizes "
          f"{[len(r['members']) for r in trainer.records]}, C={C:.4f}, "
          f"{sum(x > C for x in norms)}/{N} above C at init")
    check_residuals("bert", trainer, steps, sigma, C, q, N)
    eps = trainer.epsilon()
    expected = prv_epsilon(sigma, q, 2, trainer.dp.delta)
    print(f"RESULT bert epsilon: trainer {eps:.6f} PRV {expected:.6f}")
    assert eps == pytest.approx(expected, rel=1e-3)
    assert eps <= 50.0 + 1e-9


def test_poisson_sampling_and_epsilon_over_many_steps(tmp_path):
    """250 steps at q = 0.1: batch sizes ~ Binomial(N, q), inclusions independent; eps = PRV."""
    N, L, P, d, k = 100, 10, 8, 3, 2
    epochs = 25.0
    data = FeatureData(N, d, k, seed=5)
    model = TinyMLP(d, 2, k, seed=6)
    trainer = make_trainer(tmp_path, model, data, lr=0.01, logical=L, physical=P, epochs=epochs,
                           eps=8.0, clip=1.0, dp_seed=13, record_params=False,
                           logging_steps=50)
    q, sigma, delta = trainer.dp.sample_rate, trainer.dp.noise_multiplier, trainer.dp.delta
    assert q == pytest.approx(0.1, rel=1e-12)
    assert delta == 1e-5
    assert trainer.dp.steps == round(epochs / q) == 250
    assert trainer.epsilon() == pytest.approx(0.0, abs=1e-9), "nothing spent before training"
    trainer.train()
    T = trainer.state.global_step
    assert T == 250 == len(trainer.records)

    sizes = np.array([len(r["members"]) for r in trainer.records])
    for r in trainer.records:
        assert r["last_batch_size"] == len(r["members"])
        assert len(set(r["members"])) == len(r["members"])
    mean, var = sizes.mean(), sizes.var(ddof=1)
    exp_mean, exp_var = N * q, N * q * (1 - q)
    se_mean = math.sqrt(exp_var / T)
    counts = np.zeros(N)
    for r in trainer.records:
        counts[r["members"]] += 1
    cvar, exp_cvar = counts.var(ddof=1), T * q * (1 - q)
    # co-membership of consecutive ids: under independence P(both) = q^2
    pairs = np.mean([np.isin(np.arange(0, N, 2), r["members"])
                     & np.isin(np.arange(1, N, 2), r["members"]) for r in trainer.records])
    print(f"RESULT poisson: T={T} mean size {mean:.3f} (exp {exp_mean}, se {se_mean:.3f}), "
          f"var {var:.3f} (exp {exp_var:.3f}), min {sizes.min()} max {sizes.max()}, "
          f"inclusion-count var {cvar:.2f} (exp {exp_cvar:.2f}), pair rate {pairs:.4f} "
          f"(exp {q * q:.4f})")
    assert abs(mean - exp_mean) < 5 * se_mean
    # sample variance of T=250 draws: relative s.e. ~ sqrt(2/T) = 9%
    assert 0.55 < var / exp_var < 1.5, "batch sizes do not vary like Binomial(N, q)"
    assert len(set(sizes.tolist())) >= 5
    # per-example inclusion counts ~ Binomial(T, q): relative s.e. of their variance ~ 15%
    # (fixed-size shuffled epochs would give variance 0)
    assert 0.4 < cvar / exp_cvar < 1.7
    assert abs(pairs - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (T * N / 2))

    eps = trainer.epsilon()
    expected = prv_epsilon(sigma, q, T, delta)
    print(f"RESULT poisson epsilon: trainer {eps:.6f} PRV {expected:.6f} target 8.0")
    assert eps == pytest.approx(expected, rel=1e-3)
    assert eps <= 8.0 + 1e-9
    assert_no_loss_logged(trainer)
    assert any("epoch" in e for e in trainer.state.log_history)


def test_empty_batches_still_take_a_noisy_step_over_expected_batch_size(tmp_path):
    """q N = 1: a third of the steps are empty; every step is (S + N(0, sigma^2 C^2)) / 1."""
    N, L, P, d, h, k, lr = 10, 1, 4, 16, 64, 4, 0.1
    data = FeatureData(N, d, k, seed=7, spread=3.0)
    model = TinyMLP(d, h, k, seed=8)
    ref = TinyMLP(d, h, k, seed=8)
    C = 0.25
    trainer = make_trainer(tmp_path, model, data, lr=lr, logical=L, physical=P, epochs=3.0,
                           eps=8.0, clip=C, dp_seed=14, logging_steps=5)
    q, sigma = trainer.dp.sample_rate, trainer.dp.noise_multiplier
    assert q == pytest.approx(0.1, rel=1e-12) and trainer.dp.steps == 30
    trainer.train()
    assert trainer.state.global_step == 30 == len(trainer.records)
    _, steps = residuals(trainer, ref, data, snapshot(model), lr, C)
    empty = [st for st in steps if not st["members"]]
    full = [st for st in steps if st["members"]]
    print(f"RESULT empty: {len(empty)} empty steps of {len(steps)}")
    assert len(empty) >= 3, "Binomial(10, 0.1) is 0 with probability 0.35; expected empty steps"
    for st in empty:
        assert float(st["step"].abs().max()) > 0, "an empty step added no noise"
    check_residuals("empty-steps", trainer, empty, sigma, C, q, N)
    check_residuals("nonempty-steps", trainer, full, sigma, C, q, N)
    eps = trainer.epsilon()
    expected = prv_epsilon(sigma, q, 30, trainer.dp.delta)
    print(f"RESULT empty epsilon: trainer {eps:.6f} PRV {expected:.6f}")
    assert eps == pytest.approx(expected, rel=1e-3) and eps <= 8.0 + 1e-9
    assert_no_loss_logged(trainer)
    assert len(trainer.state.log_history) >= 6


def test_training_loss_is_logged_only_when_asked(tmp_path):
    data = FeatureData(20, 3, 2, seed=9)
    trainer = make_trainer(tmp_path, TinyMLP(3, 4, 2, seed=10), data, lr=0.01, logical=5,
                           physical=5, epochs=1.0, eps=8.0, clip=1.0, dp_seed=None,
                           record_params=False, logging_steps=1, log_train_loss=True)
    trainer.train()
    keys = set().union(*[set(e) for e in trainer.state.log_history])
    print(f"RESULT logging with log_train_loss=True: keys {sorted(keys)}")
    assert "loss" in keys or "train_loss" in keys
    assert trainer.state.global_step == trainer.dp.steps == 4
