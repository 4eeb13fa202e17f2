"""Shadow models: balanced assignment, the population, the cache key, reuse, resume, refusals.

The target is a tiny non-private run on 90 synthetic utterances; each shadow trains on 45 of
them for one epoch (about a second).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

import dptrain.trainer
from attacks.shadows import (
    RECIPE_FIELDS,
    balanced_assignment,
    cache_key,
    ensure_shadows,
    load_target,
)
from dptrain import TrainConfig, train_run
from dptrain.errors import ConfigError, DataError

RECIPE = dict(model="tiny", data="synthetic", synthetic_per_intent=3, epochs=1, batch_size=8,
              physical_batch_size=8, lr=1e-2, epsilon=float("inf"), dp_seed=0, checkpoint_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shadows") / "runs" / "target"
    train_run(TrainConfig(**RECIPE), out, progress=False)
    return out


class Crash(Exception):
    pass


class TrainCounter:
    """Wraps train_run and records every call (and can crash one after a few steps)."""

    def __init__(self, monkeypatch, crash_after: int | None = None):
        self.calls: list[dict] = []
        self.crash_after = crash_after
        real = dptrain.trainer.train_run

        def counted(config, out_dir, **kwargs):
            self.calls.append({"out": out_dir, "resume": kwargs.get("resume", False),
                               "config": config})
            if self.crash_after is not None:
                limit, self.crash_after = self.crash_after, None

                def crash(step):
                    if step == limit:
                        raise Crash(f"simulated crash after step {step}")
                kwargs["on_step"] = crash
            return real(config, out_dir, **kwargs)

        monkeypatch.setattr(dptrain.trainer, "train_run", counted)


# ---------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(10, 2), (11, 4), (90, 8), (7, 16)])
def test_each_example_is_in_for_exactly_half_of_the_shadows(n, k):
    m = balanced_assignment(n, k, seed=3)
    assert m.shape == (k, n) and m.dtype == bool
    assert (m.sum(axis=0) == k // 2).all()
    assert set(m.sum(axis=1).tolist()) <= {n // 2, (n + 1) // 2}
    assert (m[0::2] ^ m[1::2]).all()  # pairs are complementary halves
    np.testing.assert_array_equal(m, balanced_assignment(n, k, seed=3))  # seeded
    assert not np.array_equal(m, balanced_assignment(n, k, seed=4))
    np.testing.assert_array_equal(balanced_assignment(n, 2 * k, seed=3)[:k], m)  # prefixes


def test_assignment_refuses_odd_or_too_few_shadows():
    with pytest.raises(ConfigError, match=r"^n_shadows must be >= 2, got 1\.$"):
        balanced_assignment(10, 1)
    with pytest.raises(ConfigError, match="n_shadows must be even"):
        balanced_assignment(10, 3)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        balanced_assignment(10, 2, seed=-1)


# ---------------------------------------------------------------------------------------------
# The target's population
# ---------------------------------------------------------------------------------------------


def test_population_is_train_then_validation_then_test(target_dir):
    target = load_target(target_dir)
    d = target.data
    assert target.split_sizes == {"train": 72, "validation": 9, "test": 9}
    assert target.population.texts == d.train.texts + d.validation.texts + d.test.texts
    np.testing.assert_array_equal(target.member_ids, np.arange(72))
    assert target.is_member.sum() == 72 and not target.is_member[72:].any()


def test_changed_data_and_unfinished_runs_are_refused(target_dir, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(target_dir, changed)
    members = json.loads((changed / "private" / "members.json").read_text())
    members["train_fingerprint"] = "0" * 64
    (changed / "private" / "members.json").write_text(json.dumps(members))
    with pytest.raises(DataError, match="changed since training"):
        load_target(changed)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(target_dir, unfinished)
    (unfinished / "privacy.json").unlink()
    with pytest.raises(ConfigError, match="unfinished run"):
        load_target(unfinished)
    with pytest.raises(ConfigError, match="not found"):
        load_target(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# Cache key
# ---------------------------------------------------------------------------------------------


def test_cache_key_follows_the_recipe_not_the_seeds(target_dir):
    target = load_target(target_dir)
    key = cache_key(target)

    def with_config(**changes):
        return dataclasses.replace(target, config=dataclasses.replace(target.config, **changes))

    for change in ({"lr": 2e-2}, {"epsilon": 8.0}, {"epochs": 2}, {"trainable": "head"},
                   {"max_grad_norm": "1.0"}, {"batch_size": 4}):
        assert cache_key(with_config(**change)) != key, change
    for change in ({"dp_seed": 5}, {"seed": 9}, {"physical_batch_size": 4},
                   {"checkpoint_every": 0}, {"data": "/elsewhere/same.csv"}):
        assert cache_key(with_config(**change)) == key, change
    assert cache_key(target, seed=1) != key
    other = dataclasses.replace(target, population_fingerprint="f" * 64)
    assert cache_key(other) != key
    assert set(RECIPE_FIELDS) <= {f.name for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------------------------------------
# Training, reuse, resume
# ---------------------------------------------------------------------------------------------


def test_shadows_are_trained_once_and_reused_by_a_second_target(target_dir, tmp_path,
                                                                monkeypatch):
    root = tmp_path / "cache"
    counter = TrainCounter(monkeypatch)
    target = load_target(target_dir)
    first = ensure_shadows(target, 2, root=root, progress=False)
    assert len(counter.calls) == 2 and first.trained == (0, 1) and first.reused == ()
    assert first.cache_dir == root / cache_key(target)
    for index, call in enumerate(counter.calls):
        assert call["config"].dp_seed is None  # fresh DP randomness for every shadow
        for name in RECIPE_FIELDS:
            assert getattr(call["config"], name) == getattr(target.config, name)
        members = json.loads((first.cache_dir / f"shadow-{index:03d}" / "private" / "members.json").read_text())
        np.testing.assert_array_equal(members["member_ids"], np.flatnonzero(first.in_mask[index]))
    assert counter.calls[0]["config"].seed != counter.calls[1]["config"].seed
    assert len(first.signals) == 2 and all(len(s) == target.n_population for s in first.signals)
    assert first.stack("phi").shape == (2, target.n_population)

    again = ensure_shadows(target, 2, root=root, progress=False)
    assert len(counter.calls) == 2 and again.reused == (0, 1) and again.trained == ()
    np.testing.assert_array_equal(again.stack("phi"), first.stack("phi"))  # from signals.npz

    # a second target: same recipe and data, other DP seed → the same shadows
    second_dir = target_dir.parent / "second"
    train_run(TrainConfig(**{**RECIPE, "dp_seed": 1}), second_dir, progress=False)
    second = ensure_shadows(load_target(second_dir), 2, root=root, progress=False)
    assert second.cache_dir == first.cache_dir and second.reused == (0, 1)
    assert len(counter.calls) == 2

    # more shadows later: the first two are reused, two more trained
    more = ensure_shadows(target, 4, root=root, progress=False)
    assert more.reused == (0, 1) and more.trained == (2, 3) and len(counter.calls) == 4
    np.testing.assert_array_equal(more.in_mask[:2], first.in_mask)


def test_default_cache_sits_beside_the_run(target_dir, monkeypatch):
    target = load_target(target_dir)
    counter = TrainCounter(monkeypatch)
    shadows = ensure_shadows(target, 2, progress=False)
    assert shadows.cache_dir == target_dir.parent.resolve() / ".dptrain-shadows" / cache_key(target)
    assert (shadows.cache_dir / "cache.json").exists()
    assert len(counter.calls) + len(shadows.reused) == 2


def test_a_stopped_shadow_is_resumed_and_a_stale_one_restarted(target_dir, tmp_path,
                                                              monkeypatch):
    root = tmp_path / "cache"
    target = load_target(target_dir)
    counter = TrainCounter(monkeypatch, crash_after=2)
    with pytest.raises(Crash):
        ensure_shadows(target, 2, root=root, progress=False)
    cache = root / cache_key(target)
    assert (cache / "shadow-000" / "checkpoint" / "state.json").exists()
    assert not (cache / "shadow-000" / "privacy.json").exists()
    (cache / "shadow-001").mkdir()
    (cache / "shadow-001" / "leftover.tmp").write_text("crashed before its first checkpoint")

    shadows = ensure_shadows(target, 2, root=root, progress=False)
    assert shadows.resumed == (0,) and shadows.trained == (1,)
    assert [c["resume"] for c in counter.calls] == [False, True, False]
    assert not (cache / "shadow-001" / "leftover.tmp").exists()
    privacy = json.loads((cache / "shadow-000" / "privacy.json").read_text())
    assert privacy["steps"] == privacy["planned_steps"]


def test_a_cache_made_for_something_else_is_refused(target_dir, tmp_path):
    target = load_target(target_dir)
    cache = tmp_path / "cache" / cache_key(target)
    cache.mkdir(parents=True)
    (cache / "cache.json").write_text(json.dumps({"key_inputs": {"recipe": "another"}}))
    with pytest.raises(ConfigError, match="made for another recipe"):
        ensure_shadows(target, 2, root=tmp_path / "cache", progress=False)


def test_a_batch_larger_than_half_the_population_is_refused(target_dir, tmp_path):
    target = load_target(target_dir)
    big = dataclasses.replace(target, config=dataclasses.replace(target.config, batch_size=60))
    with pytest.raises(ConfigError, match="exceeds a shadow model's training set"):
        ensure_shadows(big, 2, root=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything was written
