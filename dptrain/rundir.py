"""The run directory: what a training run leaves behind, written so that nothing is ever half-written.

```
DIR/config.json      the run's configuration (TrainConfig) and the data it saw
DIR/privacy.json     epsilon spent, target_epsilon, delta, noise_multiplier, sample_rate, steps,
                     accountant, max_grad_norm
DIR/metrics.json     test accuracy, macro-F1, per-class precision/recall/F1
DIR/members.json     which examples were trained on (indices into the population), for attacks
DIR/curves.json      training curves; DIR/curves.png the same as a figure
DIR/model/           the fine-tuned classifier and its tokenizer (HF save_pretrained, safetensors)
DIR/checkpoint/      while training: weights, optimizer and ledger state for --resume
```

Files are written to a temporary name in the same directory, flushed, then renamed over the old
one (``os.replace`` is atomic on POSIX), so a crash leaves either the old or the new file. The
checkpoint is a directory: a new one is written beside the old, then swapped in.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG = "config.json"
PRIVACY = "privacy.json"
METRICS = "metrics.json"
MEMBERS = "members.json"
CURVES = "curves.json"
CURVES_PNG = "curves.png"
MODEL = "model"
CHECKPOINT = "checkpoint"


def _jsonable(value: Any) -> Any:
    """JSON has no Infinity: write non-finite floats as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)
    write_bytes_atomic(Path(path), (text + "\n").encode("utf-8"))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}.") from None


def replace_dir(target: Path, fill) -> None:
    """Build a directory with ``fill(tmp_dir)`` beside ``target`` and swap it in.

    The old directory (if any) is renamed away first and deleted only after the new one is in
    place, so at every moment one complete version exists.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """After a crash between the two renames of :func:`replace_dir`, bring the old copy back."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():
        os.replace(old, target)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).exists()
