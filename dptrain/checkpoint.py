"""Resumable training state: written atomically, read without unpickling anything.

A checkpoint directory holds

* ``weights.safetensors``: the model's weights, and the random-generator states as uint8 tensors
  (dropout always; Poisson sampling and noise only for runs with a ``dp_seed``: an unseeded run
  must not leave its noise replayable on disk, so it resumes with fresh OS entropy);
* ``optimizer.pt``: the optimizer's state dict, loaded with ``torch.load(weights_only=True)``;
* ``state.json``: step, privacy ledger, scheduler, training curves, the data fingerprint.

The privacy ledger travels with it, so a resumed run keeps the ε it already spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import rundir
from .errors import ConfigError

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
_RNG_PREFIX = "__rng__."


def save_checkpoint(path: Path, *, model, optimizer, scheduler, dp, sampler, step: int,
                    curves: list, fingerprint: str, seeded: bool, seconds: float = 0.0) -> None:
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        tensors = {k: v.detach().contiguous() for k, v in trained_state(model).items()}
        tensors[_RNG_PREFIX + "torch"] = torch.get_rng_state()
        if seeded and dp is not None:
            for i, s in enumerate(dp.optimizer.noise.state_dict()["generators"]):
                tensors[f"{_RNG_PREFIX}noise.{i}"] = s
        save_file(_unshare(tensors), tmp / WEIGHTS)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        rundir.write_json(tmp / STATE, {
            "step": step,
            "fingerprint": fingerprint,
            "ledger": dp.ledger.state_dict() if dp is not None else None,
            "sampler": sampler.state_dict() if seeded else {"step": sampler.step},
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "curves": curves,
            "seconds": seconds,
        })

    rundir.replace_dir(Path(path), fill)


def trained_state(model) -> dict[str, torch.Tensor]:
    """What training changes: the trainable parameters. Frozen weights (a head-only run's whole
    encoder) are reloaded from the model's source on resume, so a checkpoint stays small."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights): store copies."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


def load_state(path: Path) -> dict[str, Any]:
    """Read a checkpoint directory (no pickle: safetensors, weights-only torch.load, JSON)."""
    from safetensors.torch import load_file

    path = Path(path)
    state = rundir.read_json(path / STATE)
    for key in ("step", "fingerprint", "sampler", "scheduler", "curves"):
        if key not in state:
            raise ConfigError(f"checkpoint {path} is incomplete: {STATE} has no '{key}'.")
    try:
        state["tensors"] = load_file(path / WEIGHTS)
        # on the host: a checkpoint written on a GPU resumes anywhere (the optimizer moves its
        # state to the parameters' device when it loads it)
        state["optimizer"] = torch.load(path / OPTIMIZER, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - OSError, RuntimeError, safetensors' own error, ...
        first = " ".join(str(exc).split())[:200]
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {first}); "
                          "it is damaged: start a new run.") from None
    check_step_records(state, path)
    return state


def check_step_records(state: dict[str, Any], where: Path | str) -> None:
    """Refuse a checkpoint unless every record of its step count agrees: ``step``, the privacy
    ledger's steps, the sampler's and the scheduler's counts, the optimizer's per-parameter
    counts and the curves' last step. A checkpoint whose records disagree was edited or
    corrupted: resuming it could train more steps than its ledger pays for, so it is refused."""
    try:
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step {step!r}")
        records = {"step": step, "sampler step": state["sampler"].get("step", step)}
        if "last_epoch" in state["scheduler"]:
            records["scheduler step"] = state["scheduler"]["last_epoch"]
        if state.get("ledger") is not None:
            records["ledger steps"] = sum(int(n) for _, _, n in state["ledger"].get("history", []))
        counts = [int(s["step"]) for s in state.get("optimizer", {}).get("state", {}).values()
                  if isinstance(s, dict) and "step" in s]
        if counts:
            records["optimizer steps"] = max(counts)
        curve_steps = [int(c["step"]) for c in state["curves"]]
        if curve_steps and max(curve_steps) > step:
            records["last curve point"] = max(curve_steps)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"checkpoint {where} is damaged ({exc}); it cannot be resumed.") from None
    if len(set(records.values())) != 1:
        shown = ", ".join(f"{k} {v}" for k, v in records.items())
        raise ConfigError(f"checkpoint {where} disagrees with itself about how many steps were "
                          f"trained ({shown}): it was edited or corrupted, and resuming it could "
                          "spend more ε than it records; refused (start a new run).")


def restore(state: dict[str, Any], *, model, optimizer, scheduler, dp, sampler, seeded: bool):
    """Put a loaded checkpoint back into live objects; returns (step, curves)."""
    tensors = dict(state["tensors"])
    rng = {k[len(_RNG_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(_RNG_PREFIX)}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(trained_state(model)) - set(tensors):
        raise ConfigError(
            f"checkpoint does not match the model (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]})."
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    step = int(state["step"])
    if dp is not None:
        if state.get("ledger") is None:
            raise ConfigError("checkpoint of a private run has no privacy ledger.")
        dp.ledger.load_state_dict(state["ledger"])
        if dp.ledger.steps != step:
            raise ConfigError(f"checkpoint ledger has {dp.ledger.steps} steps but the run is at step {step}.")
        remaining = sampler.steps - step
        if remaining > 0:
            dp.ledger.reserve(dp.noise_multiplier, dp.sample_rate, remaining)  # still within target
        if seeded:
            gens = [rng[k] for k in sorted(k for k in rng if k.startswith("noise."))]
            if gens:
                try:
                    dp.optimizer.noise.load_state_dict({"generators": gens})
                except ValueError as exc:  # e.g. a checkpoint of an older dptrain
                    raise ConfigError(f"checkpoint's noise state cannot be restored: {exc}") from None
    if seeded and "rng" in state["sampler"]:
        sampler.load_state_dict(state["sampler"])
    else:
        sampler.step = step
    return step, list(state["curves"])
