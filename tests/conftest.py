"""Shared fixtures: MLX prepared first, a private cache home, tiny random llamas, the embedded model."""

import atexit
import os
import shutil
import tempfile

import mlx_cai.backend  # noqa: F401  (OpenBLAS before mlx.core, once for the whole suite)

# Converted models go to a throwaway home (removed at exit) unless the caller chose one.
if "MLX_CAI_HOME" not in os.environ:
    _home = tempfile.mkdtemp(prefix="mlx-cai-test-home-")
    os.environ["MLX_CAI_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Generation prefills every prompt from scratch (the tests compare batched with alone, fast with generic paths);
# the prefix-reuse tests (test_kv_reuse.py) turn the K/V store on themselves.
os.environ.setdefault("MLX_CAI_KV_REUSE_MB", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A random 2-layer llama (byte-level vocab of 261, ChatML-like template) as a .gguf file."""
    from tinymodels import write_tiny_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    write_tiny_gguf(path, {})
    return path


@pytest.fixture(scope="session")
def tiny_mlx_q4(tiny_gguf, tmp_path_factory):
    """The same tiny llama as an MLX folder quantized by mlx-lm (4-bit, group 64, bfloat16), like the Mac's model."""
    from tinymodels import write_tiny_mlx_quantized

    return write_tiny_mlx_quantized(tiny_gguf, tmp_path_factory.mktemp("tiny-mlx") / "tiny-4bit")


@pytest.fixture
def tiny(tiny_gguf):
    """(model, tokenizer) of the tiny random llama, float32. Fresh per test: tests may change eos ids."""
    from mlx_cai import models

    return models.load(str(tiny_gguf))
