"""Choose the head-only recipe on public data: DP-SGD on cached MiniLM features, validation split.

The default recipe of ``dptrain train`` must be chosen without touching a user's private data
(tuning on it spends privacy ε does not count). This sweep runs on public data only — CLINC150
and the built-in synthetic intents — and scores each setting on the *validation* split; the test
split is reported for the winners only. The encoder runs once per example (the features are the
same for every setting), so each DP-SGD setting costs seconds.

Each setting is a full DP-SGD run through the library's own ``make_private`` (Poisson batches,
per-sample clipping, calibrated noise, PRV accountant), with the same head, optimizer and
schedule as the trainer. Writes ``--out`` (JSON) with every setting's validation accuracy.

    python -m experiments.tune_head --out runs/tune_head.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dptrain.data import encode, load_intent_data
from dptrain.features import feature_head, feature_store, pooled_features
from dptrain.models import label_text, load_model, set_trainable
from dptrain.private_training import make_private
from dptrain.sampling import physical_batches

CLINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"


def features_of(data_source: str, max_length: int = 48, per_intent: int = 80, model_name: str = "minilm"):
    from dptrain.data import Split

    if Path(data_source).is_dir() and any(Path(data_source).glob("train_*_full.json")):
        from dptrain.slot_data import as_intent_data, load_slot_data  # SNIPS: its intents alone

        data = as_intent_data(load_slot_data(data_source, seed=0))
    else:
        data = load_intent_data(data_source, seed=0, synthetic_per_intent=per_intent)
    model, tokenizer = load_model(model_name, data.num_labels, data.label_names)
    set_trainable(model, "head")
    feats = {}
    for name, split in data.splits.items():
        enc = encode(tokenizer, split, max_length)
        feats[name] = (pooled_features(model, enc, tokenizer.pad_token_id), torch.from_numpy(enc.labels.copy()))
    names = [label_text(n) for n in data.label_names]  # public schema, not data: as the trainer reads it
    label_split = Split(tuple(names), np.arange(len(names)))
    label_enc = encode(tokenizer, label_split, max_length)
    feats["label_names"] = (pooled_features(model, label_enc, tokenizer.pad_token_id), None)
    return model, data, feats


@functools.lru_cache(maxsize=None)
def noise_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """σ for the target ε (PRV, as the trainer calibrates it); settings that differ only in the
    learning rate share it."""
    from dptrain.accounting import calibrate_noise_multiplier

    return calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="prv")


def train_head(model, feats, *, epsilon, batch_size, epochs, lr, seed=0, delta=1e-5,
               normalize=False, label_init=0.0, dropout=0.0):
    """One DP-SGD run of the head on cached features; returns (val acc, test acc, seconds).

    ``normalize``: L2-normalize each feature vector (a per-example map: no data statistics).
    ``dropout``: on the features before the head (the trainer's head recipe uses 0).
    ``label_init``: if > 0, start the head at label_init × the normalized embedding of each
    label's name (public schema knowledge: a zero-shot prior that DP-SGD then refines).
    """
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.classifier.weight, std=0.02)
    torch.nn.init.zeros_(model.classifier.bias)
    if normalize:
        feats = {k: (torch.nn.functional.normalize(v[0], dim=-1), v[1]) for k, v in feats.items()}
    if label_init > 0:
        with torch.no_grad():
            model.classifier.weight.copy_(label_init * torch.nn.functional.normalize(feats["label_names"][0], dim=-1))
    model.dropout.p = dropout
    head = feature_head(model)
    x, y = feats["train"]
    n = len(y)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    started = time.monotonic()
    if math.isinf(epsilon):
        from dptrain.sampling import PoissonSampler

        sampler, dp, steps = None, None, max(1, round(epochs * n / batch_size))
        sampler = PoissonSampler(n, batch_size / n, steps, seed=seed)
        step = optimizer
        batches = ([idx] for idx in sampler)
    else:
        sigma = noise_for(epsilon, delta, batch_size / n, max(1, round(epochs * n / batch_size)))
        dp = make_private(head, optimizer, num_examples=n, batch_size=batch_size, epochs=epochs,
                          noise_multiplier=sigma, delta=delta, max_grad_norm="auto", seed=seed)
        assert dp.epsilon() == 0 and dp.ledger.target_epsilon is None
        steps, step = dp.steps, dp.optimizer
        batches = dp.batches(physical_batch_size=4096)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps))
    head.train()
    for logical in batches:
        for idx in logical:
            idx = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            if len(idx):
                head(features=x[idx], labels=y[idx]).loss.backward()
        step.step()
        step.zero_grad()
        schedule.step()
    if dp is not None:
        dp.detach()
    head.eval()
    with torch.no_grad():
        acc = {s: float((head(features=feats[s][0]).logits.argmax(-1) == feats[s][1]).float().mean())
               for s in ("validation", "test")}
    return acc["validation"], acc["test"], time.monotonic() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=str(CLINC), help="CLINC150 JSON, the SNIPS directory (its intents) or 'synthetic'")
    parser.add_argument("--model", default="minilm", help="encoder: minilm | mpnet | a local path")
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="a feature store to reuse the encoder's outputs across invocations")
    parser.add_argument("--seeds", default="0", help="noise seeds; each setting's accuracies are averaged")
    parser.add_argument("--epsilons", default="8,1")
    parser.add_argument("--batch-sizes", default="256,512,1024,2048")
    parser.add_argument("--epochs", default="5,10,20")
    parser.add_argument("--lrs", default="0.02,0.05,0.1,0.2")
    parser.add_argument("--dropouts", default="0", help="head dropout values to try")
    parser.add_argument("--variants", default="plain",
                        help="comma-separated: plain, norm (L2-normalized features), "
                        "labelinit:S (normalized features, head = S × label-name embeddings), "
                        "labelraw:S (the same start, features as they are)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.monotonic()
    with feature_store(args.feature_cache):
        model, data, feats = features_of(args.data, model_name=args.model)
    print(f"features of {len(feats['train'][1])} train examples in {time.monotonic() - t0:.0f} s", flush=True)
    rows = []
    grid = itertools.product(args.variants.split(","),
                             [float(e) for e in args.epsilons.split(",")],
                             [int(b) for b in args.batch_sizes.split(",")],
                             [float(e) for e in args.epochs.split(",")],
                             [float(v) for v in args.lrs.split(",")],
                             [float(v) for v in args.dropouts.split(",")])
    for variant, eps, batch, epochs, lr, dropout in grid:
        if batch > len(feats["train"][1]):
            continue
        kind, _, scale = variant.partition(":")
        options = {"plain": {}, "norm": {"normalize": True},
                   "labelinit": {"normalize": True, "label_init": float(scale or 0)},
                   "labelraw": {"label_init": float(scale or 0)}}[kind]
        runs = [train_head(model, feats, epsilon=eps, batch_size=batch, epochs=epochs, lr=lr,
                           dropout=dropout, seed=int(seed), **options) for seed in args.seeds.split(",")]
        val, test, secs = (float(np.mean([r[k] for r in runs])) for k in range(3))
        rows.append({"model": args.model, "variant": variant, "epsilon": eps, "batch_size": batch, "epochs": epochs,
                     "lr": lr, "head_dropout": dropout, "validation_accuracy": val, "test_accuracy": test, "seconds": secs})
        print(json.dumps(rows[-1]), flush=True)
    best = {}
    for key in sorted({(r["variant"], r["epsilon"], r["head_dropout"]) for r in rows}):
        best[f"{key[0]} eps={key[1]:g} dropout={key[2]:g}"] = max(
            (r for r in rows if (r["variant"], r["epsilon"], r["head_dropout"]) == key),
            key=lambda r: r["validation_accuracy"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": args.data, "num_train": len(feats["train"][1]),
                                    "best_by_validation": best, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
