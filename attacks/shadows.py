"""Reference ("shadow") models trained with a target run's own recipe, cached and never trained twice.

The population is everything the target's data source gives — train ∪ validation ∪ test, rebuilt
with :func:`dptrain.data.load_intent_data` from the target's ``config.json`` and checked against the
fingerprint the run recorded. Population ids: train example i → i, validation example j →
N_train + j, test example k → N_train + N_val + k; the target's members are the ids in its
``members.json``.

Each shadow model trains on one half of the population with the target's recipe (model, ε, δ,
epochs, batch size, learning rate, trainable parameters, clipping, accountant, ...) through
:func:`dptrain.trainer.train_run` — the same code path as the target — with its own
initialization seed and operating-system DP randomness. Assignment is balanced as LiRA needs it
(Carlini et al. 2022, §VI): shadows come in pairs, and pair j splits a seeded random permutation
of the population into complementary halves, so every example is IN for exactly K/2 of K shadows
and every shadow holds ⌈n/2⌉ or ⌊n/2⌋ examples. Pair j depends on (seed, j, n) only, so the first
K shadows of a larger set are the K shadows of a smaller one: asking for 16 after 8 trains 8 more.

Cache: ``<root>/<key>/`` with ``root`` = ``<target_run_dir>/../.dptrain-shadows`` unless given.
``key`` hashes what determines the shadows — the recipe (the TrainConfig fields in
:data:`RECIPE_FIELDS`), the population (its size and a fingerprint of every text and label in
population order, plus the label names) and the assignment seed. Left out, on purpose:

* ``seed`` and ``dp_seed`` of the target: shadows draw their own initialization seeds from the
  assignment seed and run with fresh DP randomness; the target's ``seed`` otherwise only chose
  its data split, which the population fingerprint covers;
* ``data``, ``text_column``, ``label_column``, ``synthetic_per_intent``: where the data came from
  does not matter once the population fingerprint says what they are;
* ``physical_batch_size``, ``checkpoint_every``: memory and crash-safety only;
* the number of shadows K (see above: sets are prefixes of each other).

So a second target trained with the same recipe on the same data — a different seed of a sweep,
say — reuses the same shadows. In the cache directory::

    cache.json                what the key was computed from (checked on every reuse)
    shadow-000/               a run directory (model/, config.json, members.json, privacy.json)
    shadow-000/signals.npz    its signals on the whole population (attacks.signals.Signals, no pickle)

A shadow whose directory holds a finished run (privacy.json) is reused, a stopped one (a
checkpoint) resumed, and one that stopped before its first checkpoint restarted. Two processes
filling the same cache at once are not coordinated: run one at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from attacks.signals import Signals
from dptrain import rundir
from dptrain.errors import ConfigError, DataError
from dptrain.outputs import check_writable

log = logging.getLogger(__name__)

SHADOW_ROOT = ".dptrain-shadows"
CACHE_VERSION = 1
SIGNALS_FILE = "signals.npz"
CACHE_FILE = "cache.json"

RECIPE_FIELDS = (
    "model", "epsilon", "delta", "epochs", "batch_size", "lr", "weight_decay", "max_grad_norm",
    "trainable", "pooling", "dropout", "head_dropout", "early_stopping", "max_length", "accountant",
)
"""The TrainConfig fields that define how a shadow model is trained (and so enter the cache key)."""


# --------------------------------------------------------------------------------------------
# The target and its population
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TargetRun:
    """A finished run and the population its members were drawn from.

    Attributes:
      run_dir: the run directory.
      config: its TrainConfig (from config.json).
      privacy: privacy.json as written (non-finite numbers as strings, e.g. "inf").
      data: the three splits, rebuilt from the run's data source and checked.
      population: train ∪ validation ∪ test as one Split, in population-id order.
      member_ids: sorted population ids of the target's training examples.
      population_fingerprint: sha256 over the population's (text, label) pairs, in order.
      utterances: for a ``--task joint|slots`` run, the population's tagged utterances (the
        population's texts are their words joined by spaces, its labels their intents).
    """

    run_dir: Path
    config: Any
    privacy: dict
    data: Any
    population: Any
    member_ids: np.ndarray
    population_fingerprint: str
    utterances: tuple | None = None

    @property
    def task(self) -> str:
        return getattr(self.config, "task", "intent")

    @property
    def n_population(self) -> int:
        return len(self.population)

    @property
    def is_member(self) -> np.ndarray:
        """[n_population] booleans: True for the target's members."""
        mask = np.zeros(self.n_population, dtype=bool)
        mask[self.member_ids] = True
        return mask

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.data.splits.items()}


TASKS = ("intent", "joint", "slots")
"""The run tasks membership inference attacks (sequence classifiers; intent + slot models)."""


def check_run_dir(run_dir: str | Path, tasks: Sequence[str] = ("intent",)) -> Path:
    """Fail closed, cheaply (no data is loaded), unless ``run_dir`` holds a finished run of one
    of ``tasks``.

    An unfinished run is told to resume only when it has a checkpoint to resume from.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run directory {run} not found.")
    if not (run / rundir.CONFIG).exists():
        raise ConfigError(f"{run} is not a run directory (no {rundir.CONFIG}).")
    if not (run / rundir.PRIVACY).exists():
        # a checkpoint, or the old copy a crash inside rundir.replace_dir left (train recovers it)
        stored = (run / rundir.CHECKPOINT, run / f".{rundir.CHECKPOINT}.old")
        if any((path / "state.json").exists() for path in stored):
            how = f"finish it first with dptrain train --resume --out {run}"
        else:
            how = ("it stopped before its first checkpoint, so there is nothing to resume: "
                   "train it again into a new directory")
        raise ConfigError(f"{run} holds an unfinished run (no {rundir.PRIVACY}); {how}.")
    saved = rundir.read_json(run / rundir.CONFIG)
    task = saved.get("config", {}).get("task", "intent") if isinstance(saved, dict) else "intent"
    if task not in tasks:
        raise ConfigError(f"{run} is a --task {task} run: this attack needs a --task "
                          f"{' or '.join(tasks)} run.")
    return run


def load_target(run_dir: str | Path, tasks: Sequence[str] = TASKS) -> TargetRun:
    """Read a finished run directory and rebuild its population; fail closed on any mismatch.

    Raises ConfigError for a missing, foreign or unfinished run directory, DataError when the data
    source no longer gives what the run was trained on.
    """
    from dptrain.data import Split, load_intent_data
    from dptrain.trainer import TrainConfig, fingerprint

    run = check_run_dir(run_dir, tasks)
    saved = rundir.read_json(run / rundir.CONFIG)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ConfigError(f"{run / rundir.CONFIG} holds no training configuration (key 'config').")
    config = TrainConfig.saved(saved["config"])
    recorded = saved["data"] if isinstance(saved.get("data"), dict) else {}
    utterances = None
    if config.task != "intent":  # tagged utterances: texts are their words, labels their intents
        from dptrain.slot_data import as_intent_data, load_slot_data

        data = load_slot_data(config.data, seed=config.seed,
                              synthetic_per_intent=config.synthetic_per_intent)
        utterances = data.train + data.validation + data.test
        as_split = as_intent_data(data).splits
    else:
        data = load_intent_data(
            config.data, text_column=config.text_column, label_column=config.label_column,
            seed=config.seed, synthetic_per_intent=config.synthetic_per_intent)
        as_split = data.splits
    train_print = fingerprint(as_split["train"].texts, as_split["train"].labels)
    members_file = run / rundir.MEMBERS  # (runs before the private size kept it in config.json)
    kept = rundir.read_json(members_file) if members_file.exists() else {}
    recorded_print = kept.get("train_fingerprint") if isinstance(kept, dict) else None
    if (recorded_print or recorded.get("train_fingerprint")) != train_print:
        raise DataError(
            f"the data of {run} changed since training: {config.data!r} no longer gives the "
            "training set the run saw (fingerprint mismatch); attacks need the very same data."
        )
    if list(recorded.get("label_names", data.label_names)) != list(data.label_names):
        raise DataError(
            f"the label names of {config.data!r} changed since {run} was trained "
            f"(was {recorded.get('label_names')}, now {list(data.label_names)})."
        )
    parts = [as_split[name] for name in ("train", "validation", "test")]
    population = Split(sum((p.texts for p in parts), ()), np.concatenate([p.labels for p in parts]))

    members = rundir.read_json(run / rundir.MEMBERS)
    ids = np.asarray(members.get("member_ids", []) if isinstance(members, dict) else [])
    n = len(population)
    if ids.ndim != 1 or ids.size != len(data.train) or not np.issubdtype(ids.dtype, np.integer) \
            or np.unique(ids).size != ids.size or (ids.size and (ids.min() < 0 or ids.max() >= n)):
        raise DataError(
            f"member_ids of {run / rundir.MEMBERS} must be {len(data.train)} distinct population "
            f"ids in [0, {n}), got {ids.size} value(s)."
        )
    picked = fingerprint([population.texts[i] for i in ids], population.labels[ids])
    if picked != train_print:
        raise DataError(
            f"member_ids of {run / rundir.MEMBERS} do not point at the run's training examples "
            "in the population (train i → i, validation j → N_train + j, test k → N_train + "
            "N_val + k)."
        )
    from dptrain.release import read_privacy

    privacy = read_privacy(run / rundir.PRIVACY)  # ε as its own history spends it, never less
    return TargetRun(
        run_dir=run,
        config=config,
        privacy=privacy,
        data=data,
        population=population,
        member_ids=np.sort(ids.astype(np.int64)),
        population_fingerprint=fingerprint(population.texts, population.labels),
        utterances=utterances,
    )


# --------------------------------------------------------------------------------------------
# Assignment and cache key
# --------------------------------------------------------------------------------------------


def check_n_shadows(n_shadows: Any) -> int:
    if isinstance(n_shadows, bool) or not isinstance(n_shadows, (int, np.integer)):
        raise ConfigError(f"n_shadows must be an even integer >= 2, got {n_shadows!r}.")
    if n_shadows < 2:
        raise ConfigError(f"n_shadows must be >= 2, got {n_shadows}.")
    if n_shadows % 2:
        raise ConfigError(
            f"n_shadows must be even (every example is IN for exactly half of them), got "
            f"{n_shadows}."
        )
    return int(n_shadows)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}.")
    return int(seed)


def balanced_assignment(n_examples: int, n_shadows: int, seed: int = 0) -> np.ndarray:
    """IN/OUT matrix [n_shadows, n_examples]: each example IN for exactly half of the shadows.

    Shadows 2j and 2j+1 split a permutation drawn from ``SeedSequence([seed, j])`` into the first
    ⌈n/2⌉ and the last ⌊n/2⌋ examples, so the matrix for K shadows is the first K rows of the one
    for any larger even K.

    >>> m = balanced_assignment(5, 4, seed=0)
    >>> m.sum(axis=0).tolist(), m.sum(axis=1).tolist()
    ([2, 2, 2, 2, 2], [3, 2, 3, 2])
    """
    k = check_n_shadows(n_shadows)
    seed = _check_seed(seed)
    if isinstance(n_examples, bool) or not isinstance(n_examples, (int, np.integer)) \
            or n_examples < 2:
        raise ConfigError(f"n_examples must be an integer >= 2, got {n_examples!r}.")
    mask = np.zeros((k, n_examples), dtype=bool)
    half = (n_examples + 1) // 2
    for j in range(k // 2):
        order = np.random.default_rng(np.random.SeedSequence([seed, j])).permutation(n_examples)
        mask[2 * j, order[:half]] = True
        mask[2 * j + 1, order[half:]] = True
    return mask


def shadow_seed(seed: int, index: int) -> int:
    """The initialization/dropout seed of shadow ``index`` (independent of the assignment draws)."""
    return int(np.random.SeedSequence([seed, index, 1]).generate_state(1)[0] & 0x7FFFFFFF)


def cache_inputs(target: TargetRun, seed: int = 0) -> dict[str, Any]:
    """What the cache key is computed from (also written to cache.json)."""
    config = target.config.to_dict()
    recipe = {name: config[name] for name in RECIPE_FIELDS}
    if config.get("head_init", "random") != "random":  # (random-start caches keep their keys)
        recipe["head_init"], recipe["head_init_scale"] = config["head_init"], config["head_init_scale"]
    if target.task != "intent":  # (intent caches keep the keys they had before slot models)
        recipe["task"] = target.task
        from dptrain.trainer import SLOT_FIELDS_BEFORE

        for name in SLOT_FIELDS_BEFORE:  # TrainConfig.saved() filled what older runs lack
            recipe[name] = config[name]
    return {
        "version": CACHE_VERSION,
        "recipe": recipe,
        "population_fingerprint": target.population_fingerprint,
        "n_population": target.n_population,
        "label_names": list(target.data.label_names),
        "assignment_seed": _check_seed(seed),
    }


def cache_key(target: TargetRun, seed: int = 0) -> str:
    """16 hex digits of sha256 over :func:`cache_inputs` (canonical JSON)."""
    text = json.dumps(rundir._jsonable(cache_inputs(target, seed)), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default_root(run_dir: str | Path) -> Path:
    """``<run_dir>/../.dptrain-shadows``: beside the run, shared by its sibling runs."""
    return Path(run_dir).resolve().parent / SHADOW_ROOT


# --------------------------------------------------------------------------------------------
# Training and reuse
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShadowSet:
    """K trained reference models: their IN/OUT matrix and their signals on the population."""

    cache_dir: Path
    key: str
    seed: int
    in_mask: np.ndarray  # [K, n_population] bool
    signals: tuple[Signals, ...]
    reused: tuple[int, ...]
    resumed: tuple[int, ...]
    trained: tuple[int, ...]
    seconds: float

    @property
    def n_shadows(self) -> int:
        return len(self.signals)

    def stack(self, name: str) -> np.ndarray:
        """One signal of every shadow as a [K, n_population] array, e.g. ``stack("phi")``."""
        return np.stack([getattr(s, name) for s in self.signals])

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_shadows": self.n_shadows,
            "cache_dir": str(self.cache_dir),
            "key": self.key,
            "assignment": "balanced: each population example IN for exactly half of the "
                          "shadows, in complementary pairs (seeded)",
            "assignment_seed": self.seed,
            "reused": len(self.reused),
            "resumed": len(self.resumed),
            "trained": len(self.trained),
            "seconds": self.seconds,
        }


def _shadow_dir(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"shadow-{index:03d}"


def ensure_shadows(
    target: TargetRun,
    n_shadows: int = 8,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
) -> ShadowSet:
    """Train the missing shadows of ``target``'s cache, reuse the rest; return all K.

    ``root`` is the directory under which ``<key>/`` lives (default :func:`default_root`).
    """
    k = check_n_shadows(n_shadows)
    seed = _check_seed(seed)
    started = time.monotonic()
    cache, key, in_mask = _prepare_cache(target, k, root, seed)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=k, desc="shadow models", unit="model", dynamic_ncols=True, leave=True)
    reused, resumed, trained, signals = [], [], [], []
    try:
        for index in range(k):
            out = _shadow_dir(cache, index)
            if bar is not None:
                bar.set_description(f"shadow {index}: {_DOING[_shadow_state(out, np.flatnonzero(in_mask[index]))]}")
            state = _train_missing(target, cache, key, in_mask, index, seed, device)
            {"finished": reused, "stopped": resumed}.get(state, trained).append(index)
            signals.append(_shadow_signals(out, target, device))
            if bar is not None:
                bar.set_postfix_str(f"reused {len(reused)}, trained {len(trained) + len(resumed)}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if progress:
        print(f"shadow models in {cache}: reused {_ranges(reused)}; resumed {_ranges(resumed)}; "
              f"trained {_ranges(trained)}")
    return ShadowSet(
        cache_dir=cache, key=key, seed=seed, in_mask=in_mask, signals=tuple(signals),
        reused=tuple(reused), resumed=tuple(resumed), trained=tuple(trained),
        seconds=time.monotonic() - started)


def train_shadow(target: TargetRun, n_shadows: int, index: int, *, root: str | Path | None = None,
                 seed: int = 0, device: str = "auto") -> str:
    """Make shadow ``index`` of ``target``'s cache finished, as :func:`ensure_shadows` would, and
    say what that took ("finished": nothing; "new", "stopped", "stale": trained, resumed,
    restarted). Touches only that shadow's directory (and writes the same cache.json), so the
    shadows of one cache can train in parallel processes or on other machines."""
    k = check_n_shadows(n_shadows)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < k:
        raise ConfigError(f"shadow index must be an integer in [0, {k}), got {index!r}.")
    seed = _check_seed(seed)
    cache, key, in_mask = _prepare_cache(target, k, root, seed)
    return _train_missing(target, cache, key, in_mask, index, seed, device)


def _prepare_cache(target: TargetRun, k: int, root, seed: int):
    """The cache directory, its key and the K x N assignment; refuses a recipe shadows cannot
    follow; writes (or checks) cache.json."""
    inputs = cache_inputs(target, seed)
    key = cache_key(target, seed)
    cache = Path(root) if root is not None else default_root(target.run_dir)
    check_writable(cache, f"the shadow cache {cache}")
    cache = cache / key
    n = target.n_population
    in_mask = balanced_assignment(n, k, seed)
    smallest = int(in_mask.sum(axis=1).min())
    if target.config.batch_size is not None and target.config.batch_size > smallest:
        raise ConfigError(
            f"the target's batch_size {target.config.batch_size} exceeds a shadow model's "
            f"training set ({smallest} examples, half the population of {n}); shadow models "
            "cannot follow this recipe."
        )
    _check_or_write_cache_file(cache, inputs)
    return cache, key, in_mask


def _train_missing(target: TargetRun, cache: Path, key: str, in_mask: np.ndarray, index: int,
                   seed: int, device: str = "auto") -> str:
    """Train, resume or restart shadow ``index`` unless it is finished; return its prior state."""
    from dptrain.data import IntentData, Split
    from dptrain.trainer import train_run

    out = _shadow_dir(cache, index)
    ids = np.flatnonzero(in_mask[index])
    state = _shadow_state(out, ids)
    if state == "finished":
        return state
    pop = target.population
    source = f"{target.data.source} (shadow {index}: half of the population)"
    if target.utterances is not None:  # the target's intents and tags: every model scores all
        data = dataclasses.replace(target.data, train=tuple(target.utterances[i] for i in ids),
                                   source=source)
    else:
        split = Split(tuple(pop.texts[i] for i in ids), pop.labels[ids])
        data = IntentData(train=split, validation=target.data.validation, test=target.data.test,
                          label_names=target.data.label_names, source=source)
    # reference models see the population only: never the target's secret canaries
    config = dataclasses.replace(target.config, seed=shadow_seed(seed, index),
                                 dp_seed=None, secrets=None, device=device)
    extra = {"shadow": {"index": index, "cache_key": key, "assignment_seed": seed,
                        "population_fingerprint": target.population_fingerprint,
                        "note": "validation/test are the target's splits and overlap "
                                "this model's training half: not held-out figures"}}
    if state == "stale":
        shutil.rmtree(out)
    train_run(config, out, resume=state == "stopped", data=data, member_ids=ids,
              progress=False, extra_info=extra)
    return state


_DOING = {"new": "training", "stopped": "resuming", "stale": "restarting", "finished": "reused"}


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] → '4 (shadows 0-2, 5)'; [] → 'none'."""
    if not indices:
        return "none"
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs]
    return f"{len(indices)} (shadow{'s' if len(indices) > 1 else ''} {', '.join(parts)})"


def _check_or_write_cache_file(cache: Path, inputs: dict[str, Any]) -> None:
    path = cache / CACHE_FILE
    expected = rundir._jsonable(inputs)
    if path.exists():
        found = rundir.read_json(path)
        if not isinstance(found, dict) or found.get("key_inputs") != expected:
            raise ConfigError(
                f"shadow cache {cache} was made for another recipe or population "
                f"({path} differs); delete it or choose another --shadow-dir."
            )
        return
    rundir.write_json(path, {
        "description": "reference (shadow) models for membership inference; see attacks/shadows.py",
        "key_inputs": expected,
    })


def _shadow_state(out: Path, ids: np.ndarray) -> str:
    """'finished', 'stopped' (resumable), 'stale' (stopped before any checkpoint) or 'new'."""
    if not out.exists():
        return "new"
    rundir.recover_dir(out / rundir.CHECKPOINT)
    if (out / rundir.PRIVACY).exists():
        recorded = np.asarray(rundir.read_json(out / rundir.MEMBERS).get("member_ids", []))
        if not np.array_equal(recorded, ids):
            raise ConfigError(
                f"shadow cache {out.parent} is inconsistent: {out.name} was trained on other "
                "examples than its assignment; delete the directory."
            )
        return "finished"
    if (out / rundir.CHECKPOINT / "state.json").exists():
        return "stopped"
    return "stale" if any(out.iterdir()) else "new"


def _shadow_signals(out: Path, target: TargetRun, device: str = "auto") -> Signals:
    """The shadow's signals on the population, from signals.npz or computed once and saved."""
    path = out / SIGNALS_FILE
    if path.exists():
        signals = Signals.load(path)
        if len(signals) == target.n_population:
            return signals
        log.warning("%s holds signals of %d examples, not %d: recomputing", path, len(signals),
                    target.n_population)
    signals = population_signals(out, target, device)
    signals.save(path)
    return signals


def population_signals(run_dir: str | Path, target: TargetRun, device: str = "auto") -> Signals:
    """The signals of the model of ``run_dir`` (the target or a shadow) on ``target``'s whole
    population: per example for a classifier, per utterance for a joint/slot model."""
    from attacks.signals import compute_signals, joint_signals
    from dptrain.device import resolve

    torch_device = resolve(device, "fp32")[0]
    if target.utterances is not None:
        from dptrain.slot_trainer import load_joint

        model, tokenizer, meta = load_joint(Path(run_dir) / rundir.MODEL)
        return joint_signals(model, tokenizer, target.utterances, meta["intents"], meta["tagset"],
                             max_length=target.config.max_length, device=torch_device)
    model, tokenizer = load_quietly(run_dir)
    return compute_signals(model, tokenizer, target.population.texts, target.population.labels,
                           max_length=target.config.max_length, device=torch_device)


def load_quietly(run_dir: str | Path):
    """:func:`attacks.signals.load_classifier` without transformers' per-load progress bar."""
    from transformers.utils import logging as hf_logging

    from attacks.signals import load_classifier

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_classifier(run_dir)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
