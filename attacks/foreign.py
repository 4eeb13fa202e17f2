"""Membership inference against a classifier dptrain did not train (``dptrain attack mia --model``).

A privacy reviewer often receives a model, the data it could have seen, and the list of what it
did see. Inputs:

* ``--model DIR``: a Hugging Face sequence-classification directory (``config.json`` and
  safetensors weights; pickled weights are refused) or a dptrain ``model/`` directory;
* ``--data FILE``: the population, in any format ``dptrain train --data`` reads, rows in file
  order (a file with splits: its splits one after the other as written);
* ``--members FILE``: which rows were members, as 0-based row numbers: a JSON list, a JSON object
  with ``member_ids`` (dptrain's ``private/members.json``), or one number per line.

Every other row is a non-member. Labels are mapped to the model's classes by name (its
``id2label``) or, for integer labels, by id. Without a reference recipe only the loss attack runs
(it needs no reference model). With ``--reference-recipe FILE`` (a dptrain ``config.json`` or a
JSON/YAML object of ``dptrain train`` options, e.g. ``{"model": "minilm", "epsilon": 8}``), K
reference models are trained with that recipe on balanced halves of the population, as for a
dptrain run (:mod:`attacks.shadows`), and LiRA and RMIA run too. The report is the one
``attack mia --run`` writes (:func:`attacks.membership.score_and_report`); the claimed ε, if
any, comes from ``--claimed-epsilon`` and ``--delta``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dptrain.errors import ConfigError, DataError, ModelError


def read_member_ids(path: str | Path, n_rows: int) -> np.ndarray:
    """Sorted distinct row numbers in [0, n_rows) from ``path``; at least one member and one
    non-member."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"members file {path} not found.")
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, (list, dict)):  # one row number per line (a single one is JSON too)
        value = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(value, dict):
        value = value.get("member_ids")
    if not isinstance(value, list):
        raise DataError(f"{path} must hold a list of row numbers (JSON list, "
                        '{"member_ids": [...]} or one per line).')
    ids = []
    for item in value:
        try:
            number = int(item) if not isinstance(item, (bool, float)) else None
        except (TypeError, ValueError):
            number = None
        if number is None or str(item).strip() != str(number):
            raise DataError(f"{path}: member {item!r} is not a row number.")
        ids.append(number)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        raise DataError(f"{path} names no member.")
    if np.unique(ids).size != ids.size:
        raise DataError(f"{path} names a row twice.")
    if ids.min() < 0 or ids.max() >= n_rows:
        bad = int(ids[(ids < 0) | (ids >= n_rows)][0])
        raise DataError(f"{path}: member row {bad} is not in the data ({n_rows} rows, numbered 0 "
                        f"to {n_rows - 1}).")
    if ids.size == n_rows:
        raise DataError(f"{path} names every row a member: membership inference needs non-members.")
    return np.sort(ids)


def load_foreign_classifier(model_dir: str | Path):
    """(model, tokenizer) of a sequence classifier in ``model_dir``, or one line why not: a bare
    encoder or a model of another task would be given a random head by ``from_pretrained``."""
    from dptrain.models import load_trained

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} not found.")
    config_path = model_dir / "config.json"
    if config_path.exists():
        from dptrain import rundir

        config = rundir.read_json(config_path)
        architectures = config.get("architectures") or []
        if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
            raise ModelError(f"{model_dir} is not a sequence classifier (architectures "
                             f"{architectures or 'not recorded'}); membership inference needs "
                             "the model's class probabilities.")
    model, tokenizer = load_trained(model_dir)
    return model, tokenizer


def label_ids(labels: Sequence[str], model) -> np.ndarray:
    """The model's class id of each data label: by name (``id2label``), else as an integer id."""
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    by_name = {v: k for k, v in id2label.items()}
    n = int(model.config.num_labels)
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        if label in by_name:
            out[i] = by_name[label]
        elif label.lstrip("-").isdigit() and 0 <= int(label) < n:
            out[i] = int(label)
        else:
            raise DataError(f"row {i}: label {label!r} is not a class of the model (its classes: "
                            f"{', '.join(id2label[k] for k in sorted(id2label)[:8])}"
                            f"{', ...' if n > 8 else ''}).")
    return out


def read_recipe(path: str | Path):
    """A TrainConfig from a dptrain config.json (key ``config``) or a JSON/YAML object of options."""
    import yaml

    from dptrain.trainer import TrainConfig

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference recipe {path} not found.")
    try:
        value = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"reference recipe {path} is not JSON/YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(value, dict) and isinstance(value.get("config"), dict):
        value = value["config"]
    if not isinstance(value, dict):
        raise ConfigError(f"reference recipe {path} must be an object of dptrain train options.")
    value = {k.replace("-", "_"): v for k, v in value.items()}
    if isinstance(value.get("epsilon"), str):
        value["epsilon"] = float(value["epsilon"])
    return TrainConfig.from_dict(value)


def run_foreign_membership_inference(
    model_dir: str | Path, data: str | Path, members: str | Path, out_dir: str | Path, *,
    text_column: str = "text", label_column: str = "label", reference_recipe: str | Path | None = None,
    n_shadows: int = 8, attacks: Sequence[str] | None = None, shadow_dir: str | Path | None = None,
    claimed_epsilon: float | None = None, delta: float | None = None, confidence: float = 0.95,
    max_eval: int | None = None, max_length: int = 64, seed: int = 0, progress: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Attack the classifier in ``model_dir`` (see the module docstring); write report.json,
    roc.png and scores.npz to ``out_dir``. Everything is checked before a model is trained."""
    import dataclasses

    from attacks.membership import (
        ATTACKS, NONPRIVATE_DELTA, _check_attacks, _check_options, score_and_report,
    )
    from attacks.report import COMMAND, FILES
    from attacks.shadows import TargetRun, check_n_shadows, ensure_shadows
    from attacks.signals import compute_signals
    from dptrain.data import IntentData, Split, read_rows
    from dptrain.device import resolve
    from dptrain.outputs import OutputDir, check_writable
    from dptrain.trainer import fingerprint

    started = time.monotonic()
    torch_device = resolve(device, "fp32")[0]
    if attacks is None:
        attacks = ("loss", "lira_online", "lira_offline", "rmia") if reference_recipe else ("loss",)
    names = _check_attacks(attacks)
    _check_options(confidence, max_eval, seed)
    need_reference = any(ATTACKS[a].needs_reference for a in names)
    if need_reference and reference_recipe is None:
        raise ConfigError(f"attacks {[a for a in names if ATTACKS[a].needs_reference]} need "
                          "reference models: name their recipe with --reference-recipe, or run "
                          "--attacks loss.")
    if claimed_epsilon is not None and not (claimed_epsilon > 0):
        raise ConfigError(f"claimed epsilon must be > 0 (or inf), got {claimed_epsilon}.")
    if delta is not None and not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}.")
    recipe = read_recipe(reference_recipe) if reference_recipe is not None else None
    if need_reference:
        check_n_shadows(n_shadows)
    rows = read_rows(data, text_column=text_column, label_column=label_column)
    ids = read_member_ids(members, len(rows))
    model, tokenizer = load_foreign_classifier(model_dir)
    labels = label_ids([label for _, label in rows], model)
    texts = tuple(text for text, _ in rows)
    outputs = OutputDir(out_dir, COMMAND)
    earlier = outputs.check(files=FILES)
    root = Path(shadow_dir) if shadow_dir is not None else Path(out_dir).resolve().parent / ".dptrain-shadows"
    if need_reference:
        check_writable(root, f"the shadow cache {root}")
    if earlier:
        print(f"replacing what {COMMAND} wrote earlier in {outputs.path}: {', '.join(earlier)}",
              flush=True)

    target_signals = compute_signals(model, tokenizer, texts, labels, max_length=max_length,
                                     device=torch_device)
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    label_names = tuple(id2label.get(i, str(i)) for i in range(int(model.config.num_labels)))
    del model

    population = Split(texts, labels)
    is_member = np.zeros(len(rows), dtype=bool)
    is_member[ids] = True
    shadows = None
    if need_reference:
        others = np.flatnonzero(~is_member)
        holdout = Split(tuple(texts[i] for i in others), labels[others])
        target = TargetRun(
            run_dir=Path(out_dir),
            config=dataclasses.replace(recipe, data=str(data), max_length=max_length,
                                       text_column=text_column, label_column=label_column),
            privacy={}, data=IntentData(
                train=Split(tuple(texts[i] for i in ids), labels[ids]), validation=holdout,
                test=holdout, label_names=label_names, source=str(data)),
            population=population, member_ids=ids,
            population_fingerprint=fingerprint(population.texts, population.labels))
        shadows = ensure_shadows(target, n_shadows, root=root, seed=seed, progress=progress,
                                 device=device)

    claimed = math.inf if claimed_epsilon is None else float(claimed_epsilon)
    audit_delta = delta if delta is not None else NONPRIVATE_DELTA
    theoretical = {"epsilon": "inf" if math.isinf(claimed) else claimed,
                   "delta": delta, "source": "--claimed-epsilon" if claimed_epsilon is not None
                   else "none stated (the model was trained elsewhere)"}
    target_info = {"run_dir": str(model_dir), "model": str(model_dir), "data": str(data),
                   "members_file": str(members), "trained_by": "elsewhere (not a dptrain run)",
                   "reference_recipe": None if recipe is None else str(reference_recipe)}
    info = {"n_population": len(rows), "ids": f"row numbers of {data} in file order",
            "members": f"the rows named in {members}", "nonmembers": "every other row",
            "fingerprint": fingerprint(population.texts, population.labels)}
    return score_and_report(
        outputs, names=names, target_signals=target_signals, shadows=shadows, is_member=is_member,
        delta=audit_delta, theoretical=theoretical, target_info=target_info, population=info,
        confidence=confidence, max_eval=max_eval, seed=seed, started=started)
