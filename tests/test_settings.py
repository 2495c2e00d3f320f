"""The MLX_CAI_* environment settings: parsing, validation, re-reading, README's table, and their call sites."""

import os
import subprocess
import sys
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_cai import backend, kernels
from mlx_cai.settings import TABLE, VARIABLES, Settings, SettingsError, markdown_table, settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_when_nothing_is_set(clean_env):
    s = settings()
    assert s == Settings()
    assert (s.kernels, s.fast_ops, s.packed_train, s.no_openblas) == (True, True, True, False)
    assert (s.blas_threads, s.train_streams, s.dequantize) == (None, None, None)
    assert (s.stream_rows, s.progress_every, s.kv_reuse_mb) == (16, 30.0, 2048)
    assert s.home == Path.home() / ".cache" / "mlx-cai"


@pytest.mark.parametrize("raw, value", [("1", True), ("0", False), ("true", True), ("False", False),
                                        ("yes", True), ("NO", False), ("on", True), ("off", False), (" 0 ", False)])
def test_flags(clean_env, raw, value):
    clean_env.setenv("MLX_CAI_DEQUANTIZE", raw)
    clean_env.setenv("MLX_CAI_KERNELS", raw)
    assert settings().dequantize is value and settings().kernels is value


def test_numbers_paths_and_empty_values(clean_env, tmp_path):
    clean_env.setenv("MLX_CAI_STREAM_ROWS", "4")
    clean_env.setenv("MLX_CAI_TRAIN_STREAMS", "2")
    clean_env.setenv("MLX_CAI_BLAS_THREADS", "3")
    clean_env.setenv("MLX_CAI_PROGRESS_EVERY", "0.5")
    clean_env.setenv("MLX_CAI_HOME", str(tmp_path))
    clean_env.setenv("MLX_CAI_KERNELS", "")  # empty: unset
    s = settings()
    assert (s.stream_rows, s.train_streams, s.blas_threads, s.progress_every) == (4, 2, 3, 0.5)
    assert s.home == tmp_path and s.kernels is True


@pytest.mark.parametrize("name, raw, says", [
    ("MLX_CAI_TRAIN_STREAMS", "two", "MLX_CAI_TRAIN_STREAMS must be a whole number >= 1, got 'two'"),
    ("MLX_CAI_TRAIN_STREAMS", "0", "MLX_CAI_TRAIN_STREAMS must be a whole number >= 1, got '0'"),
    ("MLX_CAI_STREAM_ROWS", "1.5", "MLX_CAI_STREAM_ROWS must be a whole number >= 1, got '1.5'"),
    ("MLX_CAI_BLAS_THREADS", "-2", "MLX_CAI_BLAS_THREADS must be a whole number >= 1, got '-2'"),
    ("MLX_CAI_KERNELS", "maybe", "MLX_CAI_KERNELS must be 1 or 0 (or true/false, yes/no, on/off), got 'maybe'"),
    ("MLX_CAI_NO_OPENBLAS", "2", "MLX_CAI_NO_OPENBLAS must be 1 or 0"),
    ("MLX_CAI_PROGRESS_EVERY", "-1", "MLX_CAI_PROGRESS_EVERY must be a number of seconds >= 0, got '-1'"),
    ("MLX_CAI_PROGRESS_EVERY", "nan", "MLX_CAI_PROGRESS_EVERY must be a number of seconds >= 0, got 'nan'"),
])
def test_a_bad_value_is_one_line_naming_the_variable(clean_env, name, raw, says):
    clean_env.setenv(name, raw)
    with pytest.raises(SettingsError) as e:
        settings()
    assert str(e.value).startswith(says) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)  # what the CLI turns into one red line


def test_read_when_called_not_cached_past_a_change(clean_env):
    first = settings()
    assert settings() is first  # unchanged environment: parsed once
    clean_env.setenv("MLX_CAI_STREAM_ROWS", "7")
    assert settings().stream_rows == 7
    clean_env.delenv("MLX_CAI_STREAM_ROWS")
    assert settings().stream_rows == 16


def test_settings_are_frozen_and_parse_a_given_mapping():
    s = Settings.from_env({"MLX_CAI_FAST_OPS": "0", "MLX_CAI_PACKED_TRAIN": "off"})
    assert s.fast_ops is False and s.packed_train is False and s.kernels is True
    with pytest.raises(FrozenInstanceError):
        s.kernels = False


def test_one_table_row_per_field_and_readme_shows_the_table():
    assert [row[0] for row in TABLE] == list(VARIABLES) == [f.metadata["env"] for f in fields(Settings)]
    assert len(set(VARIABLES)) == len(fields(Settings)) == 14
    assert all(name.startswith("MLX_CAI_") and meaning for name, _, meaning in TABLE)
    assert markdown_table() in (ROOT / "README.md").read_text(), "README's table is stale: paste markdown_table()"


def test_nothing_else_reads_mlx_cai_variables():
    """Every module reads MLX_CAI_* through settings()."""
    for path in sorted((ROOT / "mlx_cai").rglob("*.py")):
        if path.name == "settings.py":
            continue
        text = path.read_text()
        assert "environ.get(\"MLX_CAI_" not in text and "environ[\"MLX_CAI_" not in text, path


def test_call_sites_follow_the_environment(clean_env, tmp_path):
    assert kernels.enabled()
    clean_env.setenv("MLX_CAI_KERNELS", "0")
    assert not kernels.enabled() and kernels.status() == "built, off (MLX_CAI_KERNELS=0)"
    clean_env.setenv("MLX_CAI_HOME", str(tmp_path / "home"))
    assert backend.cache_dir() == tmp_path / "home"
    from mlx_cai.fastllama import PrefixStore

    assert PrefixStore.budget() == 2048 * 2**20
    clean_env.setenv("MLX_CAI_KV_REUSE_MB", "0")
    assert PrefixStore.budget() == 0


def test_a_bad_value_is_one_red_line_in_the_cli(clean_env, tiny_gguf, tmp_path):
    from mlx_cai.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    clean_env.setenv("MLX_CAI_STREAM_ROWS", "lots")
    r = CliRunner().invoke(app, ["generate", str(prompts), "-o", str(tmp_path / "o.jsonl"), "-m", str(tiny_gguf)])
    assert r.exit_code == 1
    assert [ln for ln in r.output.splitlines() if ln.strip()][-1].endswith(
        "MLX_CAI_STREAM_ROWS must be a whole number >= 1, got 'lots'")
    assert "Traceback" not in r.output


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in VARIABLES and k != "OPENBLAS_NUM_THREADS"}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS is loaded on Linux only")
def test_backend_reads_its_two_settings_at_import():
    r = _fresh_python("from mlx_cai import backend; print(backend.blas_threads())", MLX_CAI_BLAS_THREADS="3")
    assert r.returncode == 0 and r.stdout.split() == ["3"], r.stderr
    r = _fresh_python("from mlx_cai import backend; print(backend.blas_library())", MLX_CAI_NO_OPENBLAS="1")
    assert r.returncode == 0 and "OpenBLAS (cmeel" not in r.stdout, r.stderr
    # A bad value does not break the import; the first settings() call says what is wrong.
    r = _fresh_python("from mlx_cai import backend\nfrom mlx_cai.settings import settings\nsettings()",
                      MLX_CAI_BLAS_THREADS="many")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith("MLX_CAI_BLAS_THREADS must be a whole number >= 1, got 'many'")
