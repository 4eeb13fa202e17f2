"""DP fine-tuning against ordinary fine-tuning on one GPU: seconds per step and peak GPU memory.

BERT-base-sized and RoBERTa-base-sized models built from their configs (random weights: speed
does not depend on them, and nothing downloads), every parameter trainable, random token ids of
exactly T = 128 tokens, batches B ∈ {32, 128} (one physical batch per optimizer step), AdamW,
fp32 (private training refuses bf16: dptrain.device). Modes:

* ``nondp``         ordinary training;
* ``dptrain``       this library (book-keeping per-sample clipping, noise on the device);
* ``opacus_ghost``  Opacus 1.x fast gradient clipping (``grad_sample_mode="ghost"``).

Anchors: book-keeping (Bu et al. 2023) reports 0.70× non-DP throughput on RoBERTa-large on an
A100; Opacus ghost clipping 1.19× time on BERT (last 3 layers) on a P100.

    python -m experiments.bench_gpu --out bench_gpu.json      # about 3 minutes on one H100/H200
    python -m experiments.bench_speed --device cuda ...        # the same (bench_speed delegates)

``--device cpu --sizes tiny --steps 2`` runs the same code on a CPU in seconds (the test does).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

SIZES = {
    "bert-base": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, vocab_size=30522, max_position_embeddings=512)),
    "roberta-base": ("roberta", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, vocab_size=50265,
                                     max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)),
    "tiny": ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=37, vocab_size=100, max_position_embeddings=160)),
    "tiny-roberta": ("roberta", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=100, max_position_embeddings=160,
                                     type_vocab_size=1, pad_token_id=1)),
}
MODES = ("nondp", "dptrain", "opacus_ghost")


def _model(size: str, device):
    import torch
    import transformers

    kind, fields = SIZES[size]
    config_cls = transformers.BertConfig if kind == "bert" else transformers.RobertaConfig
    torch.manual_seed(0)
    config = config_cls(num_labels=150, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                        **fields)
    model_cls = (transformers.BertForSequenceClassification if kind == "bert"
                 else transformers.RobertaForSequenceClassification)
    return model_cls(config).to(device).train(), config


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(size: str, batch: int, seq_len: int, mode: str, steps: int, warmup: int, device) -> dict:
    """Time ``steps`` optimizer steps of one (model, batch, mode) after ``warmup``."""
    import torch
    from torch import nn

    model, config = _model(size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    low = 2 if config.model_type == "roberta" else 1  # RoBERTa's padding id is 1
    ids = torch.randint(low + 1, config.vocab_size, (batch, seq_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, config.num_labels, (batch,), generator=gen).to(device)

    if mode == "nondp":
        def step():
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif mode == "dptrain":
        from dptrain import DPOptimizer, PerSampleClipper

        clipper = PerSampleClipper(model, max_grad_norm=1.0)
        dp = DPOptimizer(optimizer, clipper, noise_multiplier=1.0, expected_batch_size=batch)

        def step():
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            dp.step()
            dp.zero_grad()
    elif mode == "opacus_ghost":
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        engine = PrivacyEngine(accountant="prv")
        loader = DataLoader(TensorDataset(torch.zeros(batch, 1)), batch_size=batch)
        model, optimizer, criterion, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="ghost",
            criterion=nn.CrossEntropyLoss())
        # Opacus' embedding rule cannot take HF's broadcast [1, T] buffers: give it [B, T] ones
        # (RoBERTa's positions start after its padding index)
        start = config.pad_token_id + 1 if config.model_type == "roberta" else 0
        explicit = {"position_ids": torch.arange(start, start + seq_len, device=device).repeat(batch, 1),
                    "token_type_ids": torch.zeros_like(ids)}

        def step():
            logits = model(input_ids=ids, attention_mask=mask, **explicit).logits
            criterion(logits, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}; modes are {', '.join(MODES)}")

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"size": size, "batch": batch, "seq_len": seq_len, "mode": mode,
            "s_per_step": statistics.median(times), "examples_per_s": batch / statistics.median(times),
            "peak_gpu_mb": peak}


def main(argv: list[str] | None = None) -> int:
    import torch

    from dptrain.device import resolve

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="bert-base,roberta-base")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    device, _ = resolve(args.device, "fp32")
    rows = []
    for size in args.sizes.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            for mode in args.modes.split(","):
                try:
                    row = run_one(size, batch, args.seq_len, mode, args.steps, args.warmup, device)
                except Exception as exc:  # an OOM or an Opacus refusal is a result too
                    row = {"size": size, "batch": batch, "mode": mode,
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                base = next((r for r in rows if r["size"] == size and r["batch"] == batch
                             and r["mode"] == "nondp" and "s_per_step" in r), None)
                if base and "s_per_step" in row:
                    row["time_vs_nondp"] = row["s_per_step"] / base["s_per_step"]
                print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
