"""Secret canaries: plant secrets in the training set, so that attacks can measure memorization.

A secret is a public *prefix* ("my pin code is"), ``length`` secret tokens drawn uniformly and
independently from a public *candidate* set (the ten digits by default) and a *label* (an intent
of the data); its text ("my pin code is 4 0 7 2") is added ``R`` times to the training split
(Carlini et al. 2019, "The Secret Sharer"; Parikh, Dupuy, Gupta 2022, "Canary extraction in
natural language understanding models"). The attacks of :mod:`attacks.extraction` later know
everything but the secret tokens and try to rank or recover them.

The spec — a JSON or YAML file, or the inline form ``key=value;key=value`` — holds one secret
family or a list of them (under ``secrets:`` in a file). Keys, with their defaults:

* ``prefix``: ``my pin code is``;
* ``length``: 4 secret tokens;
* ``candidates``: ``digits`` (0–9), or a list of words (inline: ``a,b,c``);
* ``repetitions``: ``1,5,20,100`` — one secret per entry, added that many times;
* ``per_repetition``: secrets per repetition count (default 1);
* ``label``: an intent of the data; default: a different random intent for each secret, so
  that secrets sharing the prefix do not pull the same label toward each other's tokens;
* ``slot``: for ``--task joint|slots``, the slot type of the secret value (default ``pin``): the
  planted utterance is tagged ``O`` on the prefix and ``B-pin I-pin …`` on the secret tokens,
  the setting of Parikh et al. (the secret is a slot value; the attacker knows the carrier
  phrase and the slot type). Sequence classifiers have no slots and ignore it.

Each candidate must be exactly one token of the model's tokenizer after the prefix (checked;
a candidate that splits into several is refused with the pieces it became), so the attacker's
search space is exactly ``|candidates| ** length``.

Privacy. A secret repeated R times is R training examples: DP protects it as a group, with a
guarantee that weakens about R-fold (group privacy). That is the point of the experiment.

Storage. The drawn tokens are secret: they are written to ``private/secrets.json`` of the run
directory only — never to ``config.json`` (which holds the spec), ``members.json`` or a report a
model consumer sees. They are drawn from OS entropy, or from the run's ``dp_seed`` (with a
spawn key of their own) for reproducible experiments.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, DataError

DIGITS = tuple("0123456789")
DEFAULTS = {"prefix": "my pin code is", "length": 4, "candidates": "digits",
            "repetitions": [1, 5, 20, 100], "per_repetition": 1, "label": None, "slot": None}
DEFAULT_SLOT = "pin"
_SECRET_TAG = 0x73656372  # "secr": a spawn key that the sampler, the noise and the audit do not use
SECRETS_FILE = "private/secrets.json"


@dataclasses.dataclass(frozen=True)
class Secret:
    """One planted secret: ``text`` = prefix + the secret tokens, trained ``repetitions`` times."""

    prefix: str
    tokens: tuple[str, ...]
    candidates: tuple[str, ...]
    label: str
    repetitions: int
    slot: str | None = None  # the slot type of the value (joint/slot models)

    @property
    def text(self) -> str:
        return " ".join((self.prefix, *self.tokens))

    @property
    def words(self) -> tuple[str, ...]:
        return (*self.prefix.split(), *self.tokens)

    @property
    def tags(self) -> tuple[str, ...]:
        """BIO tags of :attr:`words`: ``O`` on the prefix, the slot on the secret tokens."""
        slot = self.slot or DEFAULT_SLOT
        return (*["O"] * len(self.prefix.split()), f"B-{slot}", *[f"I-{slot}"] * (len(self.tokens) - 1))

    @property
    def space_size(self) -> int:
        return len(self.candidates) ** len(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "tokens": list(self.tokens),
                "candidates": list(self.candidates), "label": self.label,
                "repetitions": self.repetitions, **({"slot": self.slot} if self.slot else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Secret":
        slot = d.get("slot")
        return cls(str(d["prefix"]), tuple(d["tokens"]), tuple(d["candidates"]), str(d["label"]),
                   int(d["repetitions"]), None if slot is None else str(slot))


def parse_spec(spec: str) -> list[dict[str, Any]]:
    """The secret families of a spec (a JSON/YAML file path, or ``key=value;…``), checked.

    Every problem raises :class:`ConfigError` with one line; unknown keys are refused.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("secrets spec must be a file or key=value pairs, got an empty value.")
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"secrets spec file {spec} does not exist.")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix.lower() == ".json":
                raw = json.loads(text)
            else:
                import yaml

                raw = yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # yaml errors are ValueErrors too
            raise ConfigError(f"cannot read secrets spec {spec}: {' '.join(str(exc).split())}") from None
        except Exception as exc:  # yaml.YAMLError
            raise ConfigError(f"cannot parse secrets spec {spec}: {' '.join(str(exc).split())}") from None
        if isinstance(raw, dict) and "secrets" in raw:
            extra = sorted(set(raw) - {"secrets"})
            if extra:
                raise ConfigError(f"secrets spec {spec}: unknown top-level keys {', '.join(extra)}.")
            raw = raw["secrets"]
        families = raw if isinstance(raw, list) else [raw]
        where = f"secrets spec {spec}"
    else:
        families = [_inline(spec)]
        where = "secrets spec"
    if not families:
        raise ConfigError(f"{where} names no secrets.")
    return [_check_family(f, f"{where}, entry {i + 1}" if len(families) > 1 else where)
            for i, f in enumerate(families)]


def _inline(spec: str) -> dict[str, Any]:
    family: dict[str, Any] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"secrets spec: expected key=value, got {part.strip()!r} "
                              "(or give a .json/.yaml file).")
        key, value = key.strip(), value.strip()
        if key in ("repetitions", "candidates") and value != "digits":
            family[key] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            family[key] = value
    return family


def _integer(value: Any, what: str, minimum: int) -> int:
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value)
    if number is None or number < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return number


def _check_family(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(map(str, unknown))} "
                          f"(known: {', '.join(DEFAULTS)}).")
    family = {**DEFAULTS, **raw}
    prefix = family["prefix"]
    if not isinstance(prefix, str) or not prefix.strip():
        raise ConfigError(f"{where}: prefix must be a non-empty string, got {prefix!r}.")
    family["prefix"] = " ".join(prefix.split())
    family["length"] = _integer(family["length"], f"{where}: length", 1)
    candidates = family["candidates"]
    if candidates == "digits":
        candidates = DIGITS
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)):
        raise ConfigError(f"{where}: candidates must be 'digits' or a list of words, got {candidates!r}.")
    candidates = tuple(str(c).strip() for c in candidates)
    if not candidates:
        raise ConfigError(f"{where}: the candidate set is empty.")
    if len(candidates) < 2:
        raise ConfigError(f"{where}: candidates must hold at least 2 words, got {len(candidates)}.")
    bad = [c for c in candidates if not c or len(c.split()) != 1]
    if bad:
        raise ConfigError(f"{where}: each candidate must be one word, got {bad[0]!r}.")
    if len(set(candidates)) != len(candidates):
        raise ConfigError(f"{where}: candidates must be distinct.")
    family["candidates"] = candidates
    reps = family["repetitions"]
    if not isinstance(reps, (list, tuple)):
        reps = [reps]
    if not reps:
        raise ConfigError(f"{where}: repetitions must list at least one count.")
    family["repetitions"] = [_integer(r, f"{where}: each repetition count", 1) for r in reps]
    family["per_repetition"] = _integer(family["per_repetition"], f"{where}: per_repetition", 1)
    if family["label"] is not None and not isinstance(family["label"], (str, int)):
        raise ConfigError(f"{where}: label must be an intent name, got {family['label']!r}.")
    slot = family["slot"]
    if slot is not None and (not isinstance(slot, str) or not slot.strip()
                             or len(slot.split()) != 1 or slot.startswith(("B-", "I-")) or slot == "O"):
        raise ConfigError(f"{where}: slot must be one word naming a slot type (e.g. pin), got {slot!r}.")
    return family


def secret_rng(seed: int | None) -> np.random.Generator:
    """OS entropy, or a generator of the given seed that no other part of a run draws from."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_SECRET_TAG,)))


def candidate_ids(tokenizer, prefix: str, candidates: Sequence[str]) -> tuple[list[int], list[int]]:
    """(prefix token ids, one token id per candidate) — refusing a candidate that is not exactly
    one token after the prefix, or two candidates that become the same token."""
    prefix_ids = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    ids = []
    for c in candidates:
        full = list(tokenizer(f"{prefix} {c}", add_special_tokens=False)["input_ids"])
        if full[: len(prefix_ids)] != prefix_ids or len(full) != len(prefix_ids) + 1:
            pieces = tokenizer.convert_ids_to_tokens(full[len(prefix_ids):])
            raise ConfigError(
                f"secret candidate {c!r} is not one token of this model's tokenizer after "
                f"{prefix!r} (it becomes {pieces}); use candidates that are single tokens.")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"secret candidates {list(candidates)} are not distinct tokens for this "
                          "tokenizer (e.g. an uncased tokenizer merges upper and lower case).")
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is not None and unknown in ids:
        c = candidates[ids.index(unknown)]
        raise ConfigError(f"secret candidate {c!r} is unknown to this tokenizer (it becomes "
                          f"{tokenizer.unk_token}).")
    return prefix_ids, ids


def plant_secrets(families: list[dict[str, Any]], label_names: Sequence[str], tokenizer,
                  max_length: int, seed: int | None) -> list[Secret]:
    """Draw the secrets of checked spec families; refuses what the model could not train on."""
    rng = secret_rng(seed)
    names = list(label_names)
    secrets: list[Secret] = []
    free = list(rng.permutation(len(names)))  # distinct random intents until they run out
    for family in families:
        label = family["label"]
        if label is not None and str(label) not in names:
            raise ConfigError(f"secret label {label!r} is not an intent of the data "
                              f"(e.g. {', '.join(names[:3])}).")
        prefix_ids, _ = candidate_ids(tokenizer, family["prefix"], family["candidates"])
        needed = len(prefix_ids) + family["length"] + tokenizer.num_special_tokens_to_add()
        if needed > max_length:
            raise ConfigError(f"a secret after {family['prefix']!r} is {needed} tokens, more than "
                              f"max_length {max_length}: it would be truncated.")
        for r in family["repetitions"]:
            for _ in range(family["per_repetition"]):
                if label is None:
                    if not free:
                        free = list(rng.permutation(len(names)))
                    chosen = names[int(free.pop())]
                else:
                    chosen = str(label)
                cands = family["candidates"]
                tokens = tuple(cands[int(i)] for i in rng.integers(0, len(cands), family["length"]))
                secrets.append(Secret(family["prefix"], tokens, tuple(cands), chosen, int(r),
                                      family["slot"]))
    return secrets


def insert_secrets(data, secrets: Sequence[Secret]):
    """The data with each secret's text appended ``repetitions`` times to its training split."""
    from .data import Split

    index = {name: i for i, name in enumerate(data.label_names)}
    texts = [s.text for s in secrets for _ in range(s.repetitions)]
    labels = [index[s.label] for s in secrets for _ in range(s.repetitions)]
    train = Split(data.train.texts + tuple(texts),
                  np.concatenate([data.train.labels, np.asarray(labels, dtype=np.int64)]))
    return dataclasses.replace(data, train=train)


def insert_slot_secrets(data, secrets: Sequence[Secret]):
    """Slot data with each secret appended ``repetitions`` times to its training split as a
    tagged utterance (:attr:`Secret.words`, :attr:`Secret.tags`); a new slot type joins the tag
    vocabulary."""
    from .slot_data import Utterance

    planted = tuple(Utterance(s.words, s.tags, s.label) for s in secrets for _ in range(s.repetitions))
    new = sorted({t for s in secrets for t in s.tags} - set(data.tags))
    return dataclasses.replace(data, train=data.train + planted,
                               tags=tuple(data.tags) + tuple(new))


def write_secrets(run_dir: Path, secrets: Sequence[Secret], spec: str) -> None:
    from . import rundir

    rundir.write_json(Path(run_dir) / SECRETS_FILE, {
        "description": "secret canaries planted in the training set (for attacks only: never "
                       "ship this file)",
        "spec": spec, "secrets": [s.to_dict() for s in secrets],
    })


def read_secrets(run_dir: str | Path) -> list[Secret]:
    """The secrets planted in a run; refuses a run trained without any."""
    return read_secrets_file(Path(run_dir) / SECRETS_FILE, run_dir=run_dir)


def read_secrets_file(path: Path, run_dir: str | Path | None = None) -> list[Secret]:
    """Secrets from a JSON file laid out like a run's ``private/secrets.json``."""
    if not path.is_file():
        if run_dir is not None:
            raise ConfigError(f"{run_dir} was trained without secrets (no {SECRETS_FILE}); train "
                              "with --secrets to plant some.")
        raise DataError(f"canaries file {path} not found.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        secrets = [Secret.from_dict(d) for d in raw["secrets"]]
        for secret in secrets:
            if not secret.tokens or any(t not in secret.candidates for t in secret.tokens):
                raise ValueError(f"a secret's tokens must be among its candidates, got "
                                 f"{len(secret.tokens)} token(s) outside or none")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    if not secrets:
        raise DataError(f"{path} lists no secrets.")
    return secrets
