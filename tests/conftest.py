"""Shared fixtures: MLX prepared first, a private cache home, tiny random llamas, the embedded model."""

import os
import tempfile

import mlx_cai.backend  # noqa: F401  (OpenBLAS before mlx.core, once for the whole suite)

# Converted models go to a throwaway home unless the caller chose one (CI reuses one per run).
os.environ.setdefault("MLX_CAI_HOME", tempfile.mkdtemp(prefix="mlx-cai-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
