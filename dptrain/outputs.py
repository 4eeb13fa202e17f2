"""Where commands write: one policy for every output directory.

**A command never overwrites what it did not write.** Each directory a command writes into holds
a manifest, ``.dptrain-manifest.json``, listing the files that command wrote there with their
sha256, and the sub-directories it created::

    {"files": {"report.json": {"by": "dptrain attack mia", "sha256": "…"}, …},
     "dirs": {"eps_inf": {"by": "dptrain demo"}, …}}

Before it computes anything, a command calls :meth:`OutputDir.check` with the names it is about
to write:

* the directory must be a directory (or not exist yet) and be writable: a probe file is created
  and removed in it, or in its nearest existing ancestor, so that a refused command leaves no
  empty directory behind;
* each of those names that already exists must be the command's own: listed in the manifest,
  written by the same command, and (for a file) still holding the bytes it wrote. Then it is
  reused or replaced, and the command says which. Anything else — a file the user put there, one
  of ours edited since, one another command wrote — is refused with one line
  (:class:`~dptrain.errors.ConfigError`, exit 2), and nothing is written.

Files are written through :meth:`OutputDir.write_bytes` / :meth:`OutputDir.write_json`: the
manifest records the new file's sha256 *before* the file is replaced (atomically, by
:func:`dptrain.rundir.write_bytes_atomic`), keeping the old one's until the write is done, so a
crash at any moment leaves every file the command wrote recognisable as its own and a rerun
carries on. Leftover temporary files of a killed write are removed by the next :meth:`check`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from . import rundir
from .errors import ConfigError, OutputError

MANIFEST = ".dptrain-manifest.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_bytes(obj: Any) -> bytes:
    """``obj`` as :func:`dptrain.rundir.write_json` writes it (indented; infinities as strings)."""
    text = json.dumps(rundir._jsonable(obj), indent=2, sort_keys=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def check_writable(directory: str | Path, what: str) -> None:
    """Fail with one line unless files can be created in ``directory`` (existing or not).

    A probe file is created and removed in the directory, or, when it does not exist yet, in its
    nearest existing ancestor (where the directory would be created): nothing is left behind.
    ``what`` names the directory in the message, e.g. ``"--out runs/a"``.
    """
    target = Path(directory)
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        if existing == target:
            raise ConfigError(f"{what} exists and is not a directory.")
        raise ConfigError(f"{what} cannot be created: {existing} is not a directory.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dptrain-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if existing == target else f" (cannot create files in {existing})"
        raise OutputError(f"{what} is not writable: {exc.strerror or exc}{where}.") from None


class OutputDir:
    """The files one command writes into one directory, under the policy of this module.

    Args:
      path: the directory.
      command: who writes, e.g. ``"dptrain attack mia"``; only files this command wrote are ever
        replaced or reused.
      what: how messages name the directory (default ``"--out PATH"``).
    """

    def __init__(self, path: str | Path, command: str, what: str | None = None) -> None:
        self.path = Path(path)
        self.command = command
        self.what = what or f"--out {self.path}"
        # the outermost directory this command would create: removed again if left empty
        self._new_root = None
        missing = self.path
        while not os.path.lexists(missing) and missing.parent != missing:
            self._new_root, missing = missing, missing.parent

    # -- reading the manifest ------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def _manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"files": {}, "dirs": {}}
        found = rundir.read_json(self.manifest_path)
        if not (isinstance(found, dict) and isinstance(found.get("files", {}), dict)
                and isinstance(found.get("dirs", {}), dict)):
            raise ConfigError(f"{self.manifest_path} is not a dptrain manifest; delete it or "
                              "choose another directory.")
        found.setdefault("files", {})
        found.setdefault("dirs", {})
        return found

    def owns(self, name: str) -> bool:
        """True iff ``name`` exists and holds bytes this command wrote (per the manifest)."""
        path = self.path / name
        if not path.is_file():
            return False
        entry = self._manifest()["files"].get(name)
        if not isinstance(entry, dict) or entry.get("by") != self.command:
            return False
        return sha256(path.read_bytes()) in (entry.get("sha256"), entry.get("replacing"))

    def owns_dir(self, name: str) -> bool:
        """True iff the sub-directory ``name`` was created by this command (per the manifest)."""
        entry = self._manifest()["dirs"].get(name)
        return isinstance(entry, dict) and entry.get("by") == self.command

    def existing(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if os.path.lexists(self.path / n)]

    # -- the check before any work --------------------------------------------------------------

    def check(self, files: Iterable[str] = (), dirs: Iterable[str] = ()) -> list[str]:
        """Refuse unless the directory is writable and each name present is this command's own.

        Returns the names (files and directories) that exist already: the command's earlier
        output, to be reused or replaced. Raises ConfigError, writing nothing, otherwise.
        """
        files, dirs = list(files), list(dirs)
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise ConfigError(f"{self.what} exists and is not a directory.")
        foreign = [n for n in self.existing(files) if not self.owns(n)]
        foreign += [n + "/" for n in self.existing(dirs)
                    if not (self.owns_dir(n) and (self.path / n).is_dir())]
        if foreign:
            them = "them" if len(foreign) > 1 else "it"
            raise ConfigError(
                f"{self.what} already holds {', '.join(foreign)}, which {self.command} did not "
                f"write (or which changed since; see {MANIFEST}), so it will not overwrite "
                f"{them}: move {them} away or choose another directory."
            )
        check_writable(self.path, self.what)
        self._remove_temporaries(files)
        return self.existing(files) + self.existing(dirs)

    def _remove_temporaries(self, names: list[str]) -> None:
        """Temporary files that a killed atomic write of one of our files left behind."""
        if not self.path.is_dir():
            return
        ours = {n for n in names if n in self._manifest()["files"]} | {MANIFEST}
        for name in ours:
            for tmp in self.path.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    # -- writing ---------------------------------------------------------------------------------

    def _save_manifest(self, manifest: dict[str, Any]) -> None:
        if not manifest["files"] and not manifest["dirs"]:  # everything taken back
            self.manifest_path.unlink(missing_ok=True)
            self._remove_new_empty_dirs()
            return
        rundir.write_json(self.manifest_path, {
            "description": "what dptrain commands wrote here (sha256 per file, sub-directories "
                           "they created); a command replaces or reuses only what it wrote itself",
            "files": manifest["files"],
            "dirs": manifest["dirs"],
        })

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically, recording it in the manifest first (see the module doc)."""
        digest = sha256(data)
        manifest = self._manifest()
        entry: dict[str, Any] = {"by": self.command, "sha256": digest}
        path = self.path / name
        if path.is_file():
            old = sha256(path.read_bytes())
            if old != digest:
                entry["replacing"] = old
        manifest["files"][name] = entry
        self._save_manifest(manifest)
        rundir.write_bytes_atomic(path, data)
        if "replacing" in entry:
            del entry["replacing"]
            self._save_manifest(manifest)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json_bytes(obj))

    def remove(self, name: str) -> None:
        """Delete a file this command wrote (e.g. the marker of a finished set, before the set
        is written again), and forget it; an emptied manifest goes as in :meth:`unclaim_dir`."""
        if not self.owns(name):
            return
        (self.path / name).unlink()
        manifest = self._manifest()
        del manifest["files"][name]
        self._save_manifest(manifest)

    def unclaim_dir(self, name: str) -> None:
        """Forget a sub-directory claimed but never made (the work was refused); with nothing
        left in the manifest, the manifest goes too, and the directory if this command made it."""
        manifest = self._manifest()
        if manifest["dirs"].pop(name, None) is not None:
            self._save_manifest(manifest)

    def _remove_new_empty_dirs(self) -> None:
        if self._new_root is None:
            return
        path = self.path
        while True:
            try:
                path.rmdir()
            except OSError:  # not empty (or gone): stop
                return
            if path == self._new_root:
                return
            path = path.parent

    def claim_dir(self, name: str) -> Path:
        """Record that this command creates the sub-directory ``name`` (before creating it)."""
        manifest = self._manifest()
        if not self.owns_dir(name):
            manifest["dirs"][name] = {"by": self.command}
            self._save_manifest(manifest)
        return self.path / name
