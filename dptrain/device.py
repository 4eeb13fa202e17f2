"""Where training computes, and in what precision.

``device``: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or
``mps``. Batches are collated on the host and moved once (:func:`to_device`); the noise is drawn
on the device (:mod:`dptrain.noise`).

``precision``: ``auto``, ``fp32`` or ``bf16``. In bf16 the forward and backward passes run under
:func:`torch.autocast`; the parameters, their gradients and the optimizer stay fp32, and the
clipping rules (:mod:`dptrain.clipping`) upcast the captured activations and output gradients to
fp32 before computing per-sample norms, clip factors and clipped sums. Each example's clipped
contribution is then exactly the vector whose norm was bounded (tests/test_precision.py).

**Private training computes in fp32; bf16 is refused for it.** The sensitivity argument also
needs each example's gradient to be independent of the other examples in its batch. In bf16 it
is not: the kernels' rounding depends on the batch's shape (rows, padded length), so removing
one example changes the *others'* gradients. Measured on a tiny BERT (CPU): removing one example
moved the others' clipped sum by 0.8% of C at batch 8, 3.6% at 128 and 9.5% at 512 (fp32:
0.00005%, 0.0003%, 0.0009%), so the pre-noise sum moves by up to C(1 + that), and the ε
reported would be too small. With the batch shape fixed, the same CPU gave bit-identical
per-example results, so fixed-shape physical batches are the way to bf16 DP; until then
``auto`` is bf16 only for non-private runs on GPUs that have it, fp32 otherwise. ``fp16`` is
refused: it needs loss scaling, which per-sample clipping would see as S-times larger gradients.
"""

from __future__ import annotations

import contextlib
import re

from .errors import ConfigError

DEVICES = "auto | cpu | cuda | cuda:N | mps"
PRECISIONS = ("auto", "fp32", "bf16")
_SPEC = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_spelling(device: str, precision: str) -> None:
    """Refuse a device or precision that cannot exist anywhere (availability: :func:`resolve`)."""
    if not isinstance(device, str) or not _SPEC.fullmatch(device):
        raise ConfigError(f"device must be one of {DEVICES}, got {device!r}.")
    if precision == "fp16":
        raise ConfigError("precision fp16 is not supported: it needs loss scaling, which "
                          "per-sample clipping would see as larger gradients; use bf16 (same "
                          "speed on GPUs that have it, fp32's range) or fp32.")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")


def check_private(precision: str, private: bool) -> None:
    """Refuse bf16 for private training (see the module docstring)."""
    if private and precision == "bf16":
        raise ConfigError("precision bf16 is refused for private training: bf16 kernels round "
                          "each example differently depending on the rest of its batch, so "
                          "removing one example moves the clipped sum by more than C (measured: "
                          "up to 9.5% more at batch 512); use fp32 (the default), or bf16 "
                          "with --epsilon inf.")


def resolve(device: str = "auto", precision: str = "auto", private: bool = True):
    """(torch.device, "fp32" | "bf16") for this machine; one-line ConfigError when the device
    is not there or cannot compute in bf16, or for bf16 in private training."""
    import torch

    check_spelling(device, precision)
    check_private(precision, private)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device}: no CUDA device is available here (torch "
                              f"{torch.__version__}); use --device cpu.")
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s).")
        resolved = torch.device("cuda", index)
    elif device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("device mps: no Apple GPU is available here; use --device cpu.")
        resolved = torch.device("mps")
    else:
        resolved = torch.device("cpu")
    if precision == "auto":
        precision = ("bf16" if not private and resolved.type == "cuda"
                     and torch.cuda.is_bf16_supported() else "fp32")
    elif precision == "bf16" and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision bf16: {torch.cuda.get_device_name(resolved)} cannot compute "
                          "in bf16; use fp32.")
    return resolved, precision


def autocast(device, precision: str):
    """The context the forward pass (and the loss) runs in: bf16 autocast, or nothing."""
    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: dict, device) -> dict:
    """Every tensor of a collated batch on ``device`` (one copy; pinned + non-blocking on CUDA)."""
    if device.type == "cpu":
        return batch
    cuda = device.type == "cuda"
    return {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device))
            if hasattr(v, "to") else v for k, v in batch.items()}
