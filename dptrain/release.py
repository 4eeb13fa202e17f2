"""What a run releases, and why each number is covered: the unit, the adjacency, the public size.

**The guarantee.** ε is for *add/remove* neighbours of the training split: two training sets
that differ by one example (one utterance with its label), of sizes N and N + 1. The held-out
validation and test splits are not part of it (they are not trained on; statistics computed on
them describe them, and are marked so below).

**The dataset size is not public by default.** Everything DP-SGD releases besides the weights —
the sampling rate q, the number of steps, the noise multiplier σ, δ and the divisor of the noisy
sum — is a function of a *public* size M, never of the private N:

* ``--dataset-size M``: the user declares M public (e.g. the size a product page states); or
* by default, M is a Gaussian count, M = round(N + Z), Z ~ N(0, σ_c²), σ_c = ``size_noise``
  (20): a Gaussian mechanism of sensitivity 1 (one example moves N by 1), composed into the same
  accountant as DP-SGD (a ledger segment (σ_c, q = 1, 1 step), :class:`~dptrain.accounting.
  PrivacyLedger` ``prior``) and calibrated with it: at ε = 1 it raises σ by about 2%.

Then q = B/M for the recipe's expected batch B (itself a function of M), steps = round(epochs/q),
δ = min(1e-5, 1/(10 M)), σ is calibrated for (q, steps, δ) after the count, and the noisy sum is
divided by B. The Poisson sampler draws each of the N real rows with probability q, which needs
no N. This is the fix for the flaw Opacus leaves open (its issues #571, #819): a divisor or rate
computed from N lets anyone who knows all but one example read membership off ``privacy.json``.

:func:`inventory` lists every field of every file a run writes, as public (a function of
declared inputs and public knowledge), accounted (covered by ε), held-out (statistics of the
validation/test splits, not covered by ε) or private (kept in ``private/``).
"""

from __future__ import annotations

import math
import secrets as _os_random

import numpy as np

from .errors import ConfigError

SIZE_NOISE = 20.0
"""Default σ_c of the Gaussian count of the training set size."""

UNIT = "one training example (an utterance with its label, or with its tags)"
ADJACENCY = ("add/remove: two training sets that differ by one example (sizes N and N + 1); "
             "the validation and test splits are held out and not covered")


def noisy_size(n: int, size_noise: float, seed: int | None = None) -> int:
    """M = max(2, round(N + Z)), Z ~ N(0, size_noise²): the Gaussian count (sensitivity 1) that
    fixes every released size. ``seed``: the run's ``dp_seed`` (experiments only), else the
    operating system's randomness."""
    if not size_noise > 0 or not math.isfinite(size_noise):
        raise ConfigError(f"size_noise must be a finite number > 0, got {size_noise!r}.")
    rng = np.random.default_rng(_os_random.randbits(64) if seed is None
                                else np.random.SeedSequence([int(seed), 0x517E]))
    return max(2, int(round(n + size_noise * rng.standard_normal())))


def count_segment(size_noise: float) -> tuple[float, float, int]:
    """The count as a ledger segment: a Gaussian mechanism of sensitivity 1 is one step of the
    subsampled Gaussian with q = 1 and noise multiplier σ_c."""
    return (float(size_noise), 1.0, 1)


def semantics(prior, dataset_size: int) -> dict:
    """The ``semantics`` block of ``privacy.json``; ``prior``: the ledger's segments spent before
    training (the count, when there was one)."""
    how = (f"a Gaussian count of the training set, sigma {prior[0][0]:g}, sensitivity 1, "
           "composed into epsilon (privacy.json prior)" if prior else
           f"declared public by the user (--dataset-size {dataset_size})")
    return {
        "unit": UNIT,
        "adjacency": ADJACENCY,
        "dataset_size": {"value": int(dataset_size), "how": how},
        "public": ["the recipe (config.json's config; derived from dataset_size)",
                   "sample_rate, steps, noise_multiplier, delta, expected_batch_size (functions "
                   "of dataset_size and the recipe)", "the label names (the model's output schema)",
                   "the pretrained encoder"],
        "accounted": ["model weights", "dataset_size (when counted)", "curves' epsilon"],
        "held_out": ["metrics.json and the curves' validation loss/accuracy: statistics of the "
                     "validation and test splits, not covered by epsilon"],
        "private": ["private/ (members, training curves, training-set size and fingerprint, "
                    "cached features): never share"],
    }


INVENTORY: dict[str, dict[str, str]] = {
    "privacy.json": {
        "private, epsilon, target_epsilon, delta, noise_multiplier, sample_rate, steps, "
        "planned_steps, expected_batch_size, accountant, max_grad_norm, clipping, sensitivity, "
        "sampling, unit, semantics, dp_randomness, history, prior": "public",
        "dataset_size": "accounted (Gaussian count) or public (declared)",
    },
    "config.json": {
        "config": "public (the resolved recipe: a function of dataset_size and the flags)",
        "data.source, data.label_names": "public (the path given, the output schema)",
        "data.sizes (validation, test)": "held-out",
        "model": "public (class and parameter counts of the public architecture)",
    },
    "curves.json / curves.png": {
        "step, epoch, epsilon": "public",
        "val_loss, val_accuracy": "held-out",
    },
    "metrics.json": {"*": "held-out (test and validation statistics, timing, device)"},
    "model/": {"weights": "accounted", "config, tokenizer, label names": "public"},
    "private/": {"members.json, train_curves.json, features/": "private"},
}


def inventory() -> dict[str, dict[str, str]]:
    """Every file a run writes that a user may share, field by field: public, accounted,
    held-out or private (see the module docstring)."""
    return {k: dict(v) for k, v in INVENTORY.items()}


EPSILON_AGREEMENT = 1e-3
"""How far (relative) a recorded ε may fall below the one its own history gives before the record
is refused: the same accountant on the same segments agrees to ~1e-12; a newer accountant
release may move the last digits."""


def read_privacy(path) -> dict:
    """A run's ``privacy.json``, checked against itself before anything reports it.

    ε is recomputed from the recorded segments (``prior`` and ``history``, or the single segment
    (σ, q, steps) of records written before the history was kept) with the recorded accountant
    and δ; the reported ε is the larger of the two, so no reader ever shows less than was spent.
    A record whose ε is below its own history's, whose step counts disagree, or that is not
    private but claims a finite ε, was edited or corrupted: refused (ConfigError).
    """
    from pathlib import Path

    from . import rundir
    from .accounting import ACCOUNTANTS, checked_segments, epsilon_of

    path = Path(path)
    record = rundir.read_json(path)
    bad = f"{path} is not a privacy record dptrain can trust"
    if not isinstance(record, dict) or "epsilon" not in record:
        raise ConfigError(f"{bad} (no 'epsilon'): it was edited or corrupted.")
    try:
        stored = float(record["epsilon"])
        record["target_epsilon"] = float(record.get("target_epsilon", stored))
    except (TypeError, ValueError):
        raise ConfigError(f"{bad} (epsilon {record['epsilon']!r} is not a number).") from None
    if not record.get("private", math.isfinite(stored)):
        if math.isfinite(stored):
            raise ConfigError(f"{bad}: it says the model was trained without privacy but claims "
                              f"epsilon {stored:g}.")
        record["epsilon"] = math.inf
        return record
    try:
        accountant, delta = record["accountant"], float(record["delta"])
        if accountant not in ACCOUNTANTS or not 0 < delta < 1:
            raise ValueError(f"accountant {accountant!r}, delta {delta!r}")
        history = record.get("history")
        if history is None:  # records written before the history was kept: one segment
            history = [[record["noise_multiplier"], record["sample_rate"], record["steps"]]]
        segments = checked_segments(history, "recorded segments")
        prior = checked_segments(record.get("prior", []), "recorded segments")
        if sum(n for _, _, n in segments) != int(record["steps"]):
            raise ValueError(f"'steps' is {record['steps']} but the history has "
                             f"{sum(n for _, _, n in segments)}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{bad} ({exc}): it was edited or corrupted.") from None
    spent = epsilon_of(prior + segments, delta, accountant)
    if not stored >= spent * (1 - EPSILON_AGREEMENT):
        raise ConfigError(f"{bad}: it claims epsilon {stored:.4g}, but its own noise multiplier, "
                          f"sample rate and steps spend {spent:.4g}; it was edited or corrupted.")
    record["epsilon"] = max(stored, spent)
    record["delta"] = delta
    return record
