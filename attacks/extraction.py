"""White-box extraction of planted secrets from a text classifier (Parikh et al., ACL 2022).

Threat model: the attacker holds the weights, and knows a secret's prefix ("my pin code is"),
its length n, the candidate set C (digits) and the label it was trained with; it wants the n
secret tokens. Two attacks, both with a raw score s(c) = log p(y | prefix c) − log(1 − p(y | prefix
c)) (see :mod:`attacks.exposure`) and a *calibrated* one, s(c) − s_ref(c) under a reference
model trained without the secrets:

* **enumeration** — score all |C|ⁿ candidates and guess the best. Exact, and the strongest
  attack whenever the space can be enumerated (10⁴ for a 4-digit PIN takes seconds): the guess
  is the true maximizer of the attack's own score, which no search can beat.
* **relaxation** (ModIvA) — for any space: each unknown position j holds logits Z_j over C, its
  input embedding is softmax((Z_j + g)/τ) · E_C (E_C: the candidates' input embeddings, g:
  Gumbel noise), the mixed embeddings go through the model with the real prefix embeddings via
  ``inputs_embeds``, and Adam maximizes the label's confidence while τ and the noise are
  annealed, from several restarts. Each restart's argmax of Z is then polished by coordinate-wise
  exact search (each position in turn takes its best candidate, the others fixed) until no single
  change improves the score, and the best polished guess wins.

:func:`run_extraction` attacks every secret of a run (``dptrain attack extract --run DIR``) and
writes ``report.json`` — per secret and by repetition count R: exact-match rate, per-token
accuracy, the true secret's rank and exposure, seconds — and ``extraction.png``. The report holds
no secret token: only whether and how well each attack recovered it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from attacks.exposure import (CHANCE_EXPOSURE, SecretScorer, SlotSecretScorer, calibrated_score,
                              enumerate_scores, exposure, flat_index, rank_of, sampled_rank,
                              unflatten)
from dptrain.errors import ConfigError

COMMAND = "dptrain attack extract"
REPORT, FIGURE = "report.json", "extraction.png"
METHODS = ("enumerate", "relax")
GUESSES = (1, 3, 10, 100)


def _objective(scorer: SecretScorer, reference: SecretScorer | None, weights: torch.Tensor):
    value = scorer.relaxed_log_prob(weights)
    if reference is not None:
        value = value - reference.relaxed_log_prob(weights)
    return value


def coordinate_polish(scorer: SecretScorer, reference: SecretScorer | None, start: Sequence[int],
                      max_rounds: int = 10) -> tuple[tuple[int, ...], float]:
    """Coordinate-wise exact search from ``start``: each position takes its best candidate with
    the others fixed, in turn, until a whole round changes nothing (a local optimum)."""
    current = np.asarray(start, dtype=np.int64).copy()
    c = len(scorer.candidates)
    best = float(calibrated_score(scorer, reference, current[None])[0])
    for _ in range(max_rounds):
        changed = False
        for j in range(scorer.length):
            trial = np.repeat(current[None], c, axis=0)
            trial[:, j] = np.arange(c)
            values = calibrated_score(scorer, reference, trial)
            k = int(np.argmax(values))
            if values[k] > best and k != current[j]:
                current[j], best, changed = k, float(values[k]), True
        if not changed:
            break
    return tuple(int(v) for v in current), best


def relaxation_attack(scorer: SecretScorer, reference: SecretScorer | None = None, *,
                      steps: int = 100, restarts: int = 16, lr: float = 0.1,
                      temperature: tuple[float, float] = (1.0, 0.05), gumbel: float = 1.0,
                      seed: int = 0) -> tuple[int, ...]:
    """The ModIvA guess (candidate indices), polished by :func:`coordinate_polish`."""
    if steps < 1 or restarts < 1:
        raise ConfigError(f"steps and restarts must be >= 1, got {steps} and {restarts}.")
    gen = torch.Generator().manual_seed(seed)
    c, n = len(scorer.candidates), scorer.length
    z = (0.01 * torch.randn(restarts, n, c, generator=gen)).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    t0, t1 = temperature
    for t in range(steps):
        frac = t / max(1, steps - 1)
        tau = t0 * (t1 / t0) ** frac
        u = torch.rand(z.shape, generator=gen).clamp(1e-9, 1 - 1e-9)
        noise = -torch.log(-torch.log(u)) * gumbel * (1.0 - frac)
        weights = torch.softmax((z + noise) / tau, dim=-1)
        loss = -_objective(scorer, reference, weights).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoded = np.unique(z.detach().argmax(-1).numpy(), axis=0)  # [≤ restarts, n]
    polished = [coordinate_polish(scorer, reference, start) for start in decoded]
    return max(polished, key=lambda found: found[1])[0]


def _match(guess: Sequence[int], truth: Sequence[int]) -> dict[str, Any]:
    guess, truth = np.asarray(guess), np.asarray(truth)
    if guess.shape != truth.shape:
        raise ValueError(f"a guess of shape {guess.shape} for a secret of shape {truth.shape}")
    return {"exact_match": bool(np.array_equal(guess, truth)),
            "token_accuracy": float(np.mean(guess == truth))}


def attack_secret(scorer: SecretScorer, reference: SecretScorer | None, truth: Sequence[int],
                  *, methods: Sequence[str], max_enumerate: int, samples: int, seed: int,
                  relax_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every attack on one secret, raw and (with a reference) calibrated: rank, exposure, and
    each method's success. A control secret (fresh random tokens, never trained) is ranked
    alongside as the run's own chance level."""
    rng = np.random.default_rng(seed)
    c, n, size = len(scorer.candidates), scorer.length, scorer.space_size
    truth = np.asarray(truth, dtype=np.int64)
    control = rng.integers(0, c, n)
    kinds = {"raw": None} if reference is None else {"raw": None, "calibrated": reference}
    result: dict[str, Any] = {}
    enumerable = size <= max_enumerate
    table = {}
    if enumerable and "enumerate" in methods:
        started = time.monotonic()
        raw = enumerate_scores(scorer)
        table["raw"] = raw
        if reference is not None:
            table["calibrated"] = raw - enumerate_scores(reference)
        result["enumeration_seconds"] = time.monotonic() - started
    for kind, ref in kinds.items():
        entry: dict[str, Any] = {}
        if kind in table:
            scores = table[kind]
            best = int(np.argmax(scores))
            rank = rank_of(scores, flat_index(truth, c))
            control_rank = rank_of(scores, flat_index(control, c))
            entry["rank"] = {"rank": rank, "exact": True}
            entry["enumeration"] = _match(unflatten(np.array([best]), c, n)[0], truth)
        else:
            found = sampled_rank(scorer, truth, samples, seed, reference=ref)
            ctrl = sampled_rank(scorer, control, samples, seed + 1, reference=ref)
            rank, control_rank = found["rank"], ctrl["rank"]
            entry["rank"] = {**found, "exact": False}
            entry["rank"]["exposure_interval"] = [exposure(size, found["high"]),
                                                  exposure(size, found["low"])]
        entry["exposure"] = exposure(size, rank)
        entry["control_exposure"] = exposure(size, control_rank)
        if "relax" in methods:
            started = time.monotonic()
            guess = relaxation_attack(scorer, ref, seed=seed, **(relax_options or {}))
            entry["relaxation"] = {**_match(guess, truth), "seconds": time.monotonic() - started}
            if kind in table:  # does the search find what enumeration finds?
                entry["relaxation"]["agrees_with_enumeration"] = bool(
                    flat_index(np.asarray(guess), c) == best)
        result[kind] = entry
    return result


def summarize(secrets: list[dict[str, Any]]) -> dict[str, Any]:
    """Per repetition count R and score kind: mean exposure and each method's success rates."""
    by_r: dict[str, Any] = {}
    for r in sorted({s["repetitions"] for s in secrets}):
        group = [s for s in secrets if s["repetitions"] == r]
        row: dict[str, Any] = {"secrets": len(group)}
        for kind in ("raw", "calibrated"):
            entries = [s[kind] for s in group if kind in s]
            if not entries:
                continue
            ranks = np.array([e["rank"]["rank"] for e in entries])
            stats: dict[str, Any] = {
                "mean_exposure": float(np.mean([e["exposure"] for e in entries])),
                "mean_control_exposure": float(np.mean([e["control_exposure"] for e in entries])),
                "median_rank": float(np.median(ranks)),
                # an attacker allowed k guesses (a card allows 3 PIN tries) succeeds iff rank <= k
                "within_guesses": {str(k): float(np.mean(ranks <= k)) for k in GUESSES},
            }
            for method in ("enumeration", "relaxation"):
                found = [e[method] for e in entries if method in e]
                if found:
                    stats[method] = {
                        "exact_match_rate": float(np.mean([f["exact_match"] for f in found])),
                        "token_accuracy": float(np.mean([f["token_accuracy"] for f in found])),
                    }
            agree = [e["relaxation"]["agrees_with_enumeration"] for e in entries
                     if "agrees_with_enumeration" in e.get("relaxation", {})]
            if agree:  # does the search find the enumeration's top candidate?
                stats["relaxation"]["agreement_with_enumeration"] = float(np.mean(agree))
            row[kind] = stats
        by_r[str(r)] = row
    return by_r


def _check_options(methods: Sequence[str], max_enumerate: int, samples: int, restarts: int,
                   steps: int) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in methods if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ConfigError(f"methods must be a comma-separated subset of {', '.join(METHODS)}, "
                          f"got {','.join(methods) or 'nothing'}.")
    for name, value, minimum in (("max-enumerate", max_enumerate, 1), ("samples", samples, 10),
                                 ("restarts", restarts, 1), ("steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"--{name} must be an integer >= {minimum}, got {value!r}.")
    return methods


def _load_reference(reference: str | Path):
    from dptrain import rundir
    from dptrain.models import load_trained

    path = Path(reference)
    model_dir = path / rundir.MODEL if (path / rundir.MODEL).is_dir() else path
    if not model_dir.is_dir():
        raise ConfigError(f"--reference {reference}: no such run or model directory.")
    if (path / "private" / "secrets.json").exists():
        raise ConfigError(f"--reference {reference} was trained with secrets of its own; the "
                          "reference must not have seen them.")
    from dptrain.slot_trainer import JOINT_FORMAT, load_joint

    if (model_dir / JOINT_FORMAT).is_file():
        model, tokenizer, _ = load_joint(model_dir)
        return model, tokenizer
    return load_trained(model_dir)


def run_extraction(run_dir: str | Path | None, out_dir: str | Path | None = None, *,
                   reference: str | Path | None = None, methods: Sequence[str] = METHODS,
                   max_enumerate: int = 1_000_000, samples: int = 20_000, restarts: int = 16,
                   steps: int = 100, seed: int = 0, progress: bool = True,
                   model_dir: str | Path | None = None, canaries: str | Path | None = None,
                   claimed_epsilon: float | None = None, delta: float | None = None,
                   ) -> dict[str, Any]:
    """Attack every secret planted in a finished run; write ``report.json`` and the figure.

    A model trained elsewhere (``run_dir`` None): ``model_dir`` is its sequence-classifier
    directory and ``canaries`` a JSON file of the secrets that were in its training data (the
    layout of a run's ``private/secrets.json``: ``{"secrets": [{"prefix", "tokens",
    "candidates", "label", "repetitions"}, ...]}``, labels by the model's class names); the
    claimed ε, if any, is ``claimed_epsilon`` at ``delta``.
    """
    from dptrain import rundir
    from dptrain.models import load_trained
    from dptrain.outputs import OutputDir
    from dptrain.secret_canaries import read_secrets_file

    started = time.monotonic()
    methods = _check_options(methods, max_enumerate, samples, restarts, steps)
    if (run_dir is None) == (model_dir is None):
        raise ConfigError("give --run (a dptrain run) or --model (a classifier trained "
                          "elsewhere, with --canaries), not both.")
    if model_dir is not None:
        from attacks.foreign import load_foreign_classifier

        if canaries is None or out_dir is None:
            raise ConfigError("--model needs --canaries and --out.")
        run = Path(model_dir)
        secrets = read_secrets_file(Path(canaries))
        out = Path(out_dir)
    else:
        if canaries is not None or claimed_epsilon is not None:
            raise ConfigError("--canaries and --claimed-epsilon go with --model, not --run (a run "
                              "directory records its secrets and ε).")
        run = Path(run_dir)
        if not (run / rundir.PRIVACY).is_file():
            raise ConfigError(f"--run {run_dir} is not a finished run (no {rundir.PRIVACY}).")
        from attacks.shadows import check_run_dir

        check_run_dir(run, tasks=("intent", "joint", "slots"))
        secrets = read_secrets_file(run / "private" / "secrets.json", run_dir=run)
        task = rundir.read_json(run / rundir.CONFIG)["config"].get("task", "intent")
        out = Path(out_dir) if out_dir is not None else run / rundir.EXTRACTION
    outputs = OutputDir(out, COMMAND, what=None if out_dir is not None else
                        f"the report directory {out} (default --out)")
    earlier = outputs.check(files=(REPORT, FIGURE))
    if model_dir is not None:
        model, tokenizer = load_foreign_classifier(model_dir)
        id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
        labels = [id2label.get(i, str(i)) for i in range(int(model.config.num_labels))]
    elif task != "intent":  # the secret is a slot value (dptrain.secret_canaries: slot)
        from dptrain.slot_trainer import load_joint

        model, tokenizer, meta = load_joint(run / rundir.MODEL)
        labels, tags = list(meta["intents"]), meta["tagset"]
        max_length = int(rundir.read_json(run / rundir.CONFIG)["config"].get("max_length", 512))
    else:
        model, tokenizer = load_trained(run / rundir.MODEL)
        labels = rundir.read_json(run / rundir.CONFIG)["data"]["label_names"]
    ref_model = ref_tokenizer = None
    if reference is not None:
        ref_model, ref_tokenizer = _load_reference(reference)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"--reference {reference} uses another tokenizer than the run.")
        if (getattr(ref_model, "tag_head", None) is None) != (model_dir is not None or task == "intent"):
            raise ConfigError(f"--reference {reference} is not a model of the run's task.")

    def scorer_of(net, tok, secret, label_id):
        if model_dir is not None or task == "intent":
            return SecretScorer(net, tok, secret.prefix, secret.candidates, len(secret.tokens),
                                label_id)
        value_tags = secret.tags[-len(secret.tokens):]
        missing = [t for t in value_tags if t not in tags]
        if missing:
            raise ConfigError(f"secret tag {missing[0]!r} is not a tag of {run}.")
        return SlotSecretScorer(net, tok, secret.prefix, secret.candidates, len(secret.tokens),
                                label_id, [tags.id(t) for t in value_tags], max_length)
    for secret in secrets:
        if secret.label not in labels:
            raise ConfigError(f"secret label {secret.label!r} is not a label of {run}.")
    if earlier:
        print(f"replacing what {COMMAND} wrote earlier in {outputs.path}: {', '.join(earlier)}",
              flush=True)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(secrets), desc="secrets", unit="secret")
    for i, secret in enumerate(secrets):
        t0 = time.monotonic()
        label_id = labels.index(secret.label)
        scorer = scorer_of(model, tokenizer, secret, label_id)
        ref = None if ref_model is None else scorer_of(ref_model, ref_tokenizer, secret, label_id)
        truth = [secret.candidates.index(t) for t in secret.tokens]
        found = attack_secret(scorer, ref, truth, methods=methods, max_enumerate=max_enumerate,
                              samples=samples, seed=seed + 7919 * i,
                              relax_options={"steps": steps, "restarts": restarts})
        rows.append({"secret": i, "repetitions": secret.repetitions, "label": secret.label,
                     "prefix": secret.prefix, "length": len(secret.tokens),
                     "candidates": len(secret.candidates), "space_size": secret.space_size,
                     **found, "seconds": time.monotonic() - t0})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if model_dir is not None:
        privacy = {"epsilon": claimed_epsilon if claimed_epsilon is not None else "inf",
                   "delta": delta}
        learned = None
    else:
        from attacks.membership import model_learned

        from dptrain.release import read_privacy

        privacy = read_privacy(run / rundir.PRIVACY)
        learned = model_learned(run)
    sizes = sorted({r["space_size"] for r in rows})

    report = {
        "run_dir": str(run),
        "trained_by": "dptrain" if model_dir is None else "elsewhere (not a dptrain run)",
        "learned": learned,
        "reference": None if reference is None else str(reference),
        "threat_model": "white-box: the attacker holds the weights and knows each secret's "
                        "prefix, length, candidate set and label" + (
                            "" if model_dir is not None or task == "intent" else
                            ", and the slot type of the value; candidates are scored by the "
                            "logits of the intent and of the value's B-/I- tags"),
        "epsilon": privacy.get("epsilon"), "delta": privacy.get("delta"),
        "methods": list(methods),
        "chance": {"exposure_bits": CHANCE_EXPOSURE,
                   "exact_match": {str(s): 1.0 / s for s in sizes},
                   "token_accuracy": sorted({1.0 / r["candidates"] for r in rows})},
        "by_repetitions": summarize(rows),
        "secrets": rows,
        "seconds": time.monotonic() - started,
    }
    report["summary"] = summary_lines(report)
    outputs.write_bytes(FIGURE, _figure(report))
    outputs.write_json(REPORT, report)
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Plain-language reading of the report, one line per repetition count."""
    eps = report.get("epsilon")
    lines = [f"secret extraction at epsilon = {eps if eps is None else f'{float(eps):.3g}'} "
             f"(chance: exposure ≈ {CHANCE_EXPOSURE:.2f} bits)"]
    if report.get("learned") is False:
        from attacks.report import CHANCE_WARNING

        lines.append(CHANCE_WARNING)
    for r, row in report["by_repetitions"].items():
        for kind in ("raw", "calibrated"):
            if kind not in row:
                continue
            s = row[kind]
            parts = [f"R={r} {kind}: exposure {s['mean_exposure']:.2f} bits "
                     f"(control {s['mean_control_exposure']:.2f}), median rank "
                     f"{s['median_rank']:.0f}, within 10 guesses {s['within_guesses']['10']:.0%}"]
            for method in ("enumeration", "relaxation"):
                if method in s:
                    parts.append(f"{method} recovers {s[method]['exact_match_rate']:.0%} "
                                 f"(tokens {s[method]['token_accuracy']:.0%})")
            lines.append(", ".join(parts))
    return lines


def _figure(report: dict[str, Any]) -> bytes:
    """Exposure and exact-match rate against R, raw and calibrated, with the chance levels."""
    from dptrain.figures import png_bytes, pyplot

    plt = pyplot()
    by_r = report["by_repetitions"]
    rs = [int(r) for r in by_r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("raw", "-o"), ("calibrated", "--s")):
        if not all(kind in by_r[str(r)] for r in rs):
            continue
        left.plot(rs, [by_r[str(r)][kind]["mean_exposure"] for r in rs], style, label=kind)
        for method in ("enumeration", "relaxation"):
            if all(method in by_r[str(r)][kind] for r in rs):
                right.plot(rs, [by_r[str(r)][kind][method]["exact_match_rate"] for r in rs], style,
                           label=f"{method}, {kind}")
    top = max(math.log2(s["space_size"]) for s in report["secrets"])
    left.axhline(CHANCE_EXPOSURE, color="grey", lw=0.8, ls=":", label="chance (1/ln 2)")
    left.axhline(top, color="black", lw=0.8, ls=":", label="maximum (log2 |space|)")
    left.set(xscale="log", xlabel="repetitions R", ylabel="exposure (bits)", title="Exposure")
    right.set(xscale="log", xlabel="repetitions R", ylabel="secrets recovered exactly",
              ylim=(-0.02, 1.02), title="Extraction")
    eps = report.get("epsilon")
    fig.suptitle(f"Secret canaries, epsilon = {eps if eps is None else f'{float(eps):.3g}'}")
    left.legend(fontsize=8)
    if right.lines:
        right.legend(fontsize=8)
    return png_bytes(fig)
