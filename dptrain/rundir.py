"""The run directory: what a training run leaves behind, written so that nothing is ever half-written.

```
DIR/config.json      the run's configuration (TrainConfig) and the data it saw
DIR/privacy.json     epsilon spent, target_epsilon, delta, noise_multiplier, sample_rate, steps,
                     accountant, max_grad_norm
DIR/metrics.json     test accuracy, macro-F1, per-class precision/recall/F1
DIR/private/members.json  which examples were trained on (indices into the population), for
                     attacks only: never share it (it names exactly what DP protects)
DIR/private/features/  the frozen encoder's outputs (dptrain.features), so that later commands
                     on the same data do not encode it again; never share it, deleting it is safe
DIR/curves.json      curves by step: epoch (step·q), ε spent, validation loss and accuracy;
                     DIR/curves.png the same as a figure
DIR/private/train_curves.json  the training loss (computed on private batches without noise:
                     not covered by ε)
DIR/model/           the fine-tuned classifier and its tokenizer (HF save_pretrained, safetensors)
DIR/checkpoint/      while training: weights, optimizer and ledger state for --resume
DIR/README.txt       these lines, for whoever finds the directory
```

What a user ships is ``model/`` alone (with ``privacy.json`` to state its guarantee); what only
attacks need lives under ``private/``.

Files are written to a temporary name in the same directory, flushed, then renamed over the old
one (``os.replace`` is atomic on POSIX), so a crash leaves either the old or the new file. The
checkpoint is a directory: a new one is written beside the old, then swapped in; temporaries a
crash left behind are removed when the run is resumed (:func:`clean_temporaries`).

``privacy.json`` is written last and is the single commit point: a directory holding it is a
finished run, whatever else a crash left beside it, and it is never trained again.

File modes: every file and directory gets the mode an ordinary ``open``/``mkdir`` gives under
the process umask (0644/0755 under the usual 022). A run directory holds private information
(``members.json`` names the training examples): protect it like the training data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError, OutputError

CONFIG = "config.json"
PRIVACY = "privacy.json"
METRICS = "metrics.json"
MEMBERS = "private/members.json"
README = "README.txt"
README_TEXT = """\
A dptrain run directory.
model/          the trained classifier: this is what you ship (with privacy.json, its guarantee)
privacy.json    epsilon spent, delta, noise multiplier, sampling rate, steps, accountant
metrics.json    test accuracy, macro-F1, per-class precision/recall/F1
config.json     the recipe and the data it saw
curves.json/png validation loss and accuracy, epsilon spent, by step
private/        for attacks only: members.json names the training examples, features/ holds
                the encoder's outputs for reuse (deleting it is safe). Never share it.
checkpoint/     only while training: what --resume needs
"""
CURVES = "curves.json"
TRAIN_CURVES = "private/train_curves.json"
FEATURES = "private/features"  # the feature store (dptrain.features) of a run, sweep or audit
CURVES_PNG = "curves.png"
MODEL = "model"
CHECKPOINT = "checkpoint"
ATTACKS = "attacks"  # where `attack mia` writes inside a run by default
EXTRACTION = "extraction"  # where `attack extract` writes inside a run by default
TMP_SUFFIX = ".partial"  # directories being built by replace_dir


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cannot_write(path: Path, exc: BaseException) -> OutputError:
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())
    return OutputError(f"cannot write {path}: {reason}.")


def make_dir(path: Path) -> None:
    """``mkdir -p`` that fails with one clear line (read-only file system, no permission)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(Path(path), exc) from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the ordinary mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _cannot_write(path, exc) from None
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
    make_dir(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    try:
        fill(tmp)
        _normalize_modes(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_error(exc):
            raise _cannot_write(target, exc) from None
        raise
    try:
        _swap_in(tmp, target)
    except OSError as exc:
        raise _cannot_write(target, exc) from None


def _is_write_error(exc: BaseException) -> bool:
    """A failed write, however the writer reports it: OSError (a full disk, a quota), or the
    I/O errors safetensors and torch.save wrap in their own exception types."""
    if isinstance(exc, OSError):
        return True
    text = str(exc).lower()
    return (type(exc).__name__ == "SafetensorError" and "i/o error" in text) or (
        isinstance(exc, RuntimeError) and ("write failed" in text or "failed writing" in text))


def _swap_in(tmp: Path, target: Path) -> None:
    """The old directory (if any) renamed away, the new one renamed in, the old one deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _normalize_modes(root: Path) -> None:
    """One mode for everything a run writes, whatever the writer (HF saves some files 0600)."""
    mask = _umask()
    for path in Path(root).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def clean_temporaries(directory: Path) -> list[str]:
    """Remove what interrupted writes left in ``directory`` (temporary files and directories of
    :func:`write_bytes_atomic` and :func:`replace_dir`); returns their names."""
    removed = []
    for entry in Path(directory).glob(".*"):
        if entry.name.endswith((".tmp", TMP_SUFFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def recover_dir(target: Path) -> None:
    """After a crash between the two renames of :func:`replace_dir`, bring the old copy back."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():
        os.replace(old, target)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).exists()


LOCK_HELD = "DPTRAIN_LOCK_HELD"
"""Set by a command for the processes it starts (``--nproc``): the directory whose lock it holds."""


@contextlib.contextmanager
def exclusive(path: Path, what: str = "--out", create: bool = True):
    """Hold an exclusive lock on directory ``path`` while a command writes into it, so that two
    commands never write one directory: the second is refused in one line.

    ``flock`` on the directory itself (nothing is added to it), so a crashed or killed command
    releases it. ``path`` is created (``create``: with its parents) to be locked; if the command
    fails and leaves what was created empty, it is removed again, so a refused command leaves
    nothing behind. Where the directory cannot be opened (no permission, a file in the way), the
    lock is skipped and the command's own check refuses it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    resolved = str(path.resolve())
    if os.environ.get(LOCK_HELD) == resolved or int(os.environ.get("RANK", "0") or 0) > 0:
        yield  # a process started under the lock of its launcher, or a rank > 0
        return
    created = []
    for directory in reversed([path, *path.parents]):
        if not directory.exists():
            if not create and directory != path:
                break
            try:
                directory.mkdir()
                created.append(directory)
            except OSError:
                break
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{what} {path} is in use: another dptrain command is writing "
                                  "there now; wait for it to finish, or choose another "
                                  "directory.") from None
        outer = os.environ.get(LOCK_HELD)
        os.environ[LOCK_HELD] = resolved  # for the processes this one starts
        try:
            yield
        finally:
            if outer is None:
                os.environ.pop(LOCK_HELD, None)
            else:
                os.environ[LOCK_HELD] = outer
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
        for directory in reversed(created):
            try:
                directory.rmdir()  # only if the command left it empty
            except OSError:
                break
