#!/usr/bin/env bash
# Builds mlx-cai's fused CPU kernels (csrc/) into mlx_cai/_kernels*.so for this machine (-march=native).
# Usage: scripts/build-kernels.sh [PYTHON]   (default .venv/bin/python). Linux only: on macOS MLX runs on
# the GPU and these CPU kernels are not needed. A failed build is a warning: mlx-cai then uses MLX ops
# (slower, same results), and `mlx-cai info` says why.
set -u
PY="${1:-.venv/bin/python}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[ "$(uname -s)" = "Linux" ] || { echo "kernels: not built on $(uname -s) (CPU kernels are for Linux)"; exit 0; }
warn() { echo "warning: mlx-cai's CPU kernels were not built ($1); MLX ops are used instead" >&2; exit 0; }
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || warn "no C++ compiler: install g++"
# nanobind 3.x: the ABI of mlx.core's bindings (its internals key ends in _v22); arrays cannot cross otherwise.
"$PY" -m pip install -q "nanobind==3.1.0" || warn "pip could not install nanobind"
CMAKE=cmake
if ! command -v cmake >/dev/null 2>&1; then
  "$PY" -m pip install -q "cmake>=3.18,<4" || warn "no cmake and pip could not install it"
  CMAKE="$(dirname "$PY")/cmake"
fi
BUILD="$ROOT/build/kernels"
mkdir -p "$ROOT/build"
"$CMAKE" -S "$ROOT/csrc" -B "$BUILD" -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
  -DCMAKE_BUILD_TYPE=Release >"$BUILD.log" 2>&1 || warn "cmake configure failed, see $BUILD.log"
"$CMAKE" --build "$BUILD" -j "$(nproc 2>/dev/null || echo 2)" >>"$BUILD.log" 2>&1 || warn "compile failed, see $BUILD.log"
# copy, then rename: a process that has the old module loaded keeps its file (overwriting it in place can crash it)
SO="$(ls "$BUILD"/_kernels*.so 2>/dev/null | head -n 1)"
[ -n "$SO" ] || warn "no module was produced, see $BUILD.log"
cp "$SO" "$ROOT/mlx_cai/.$(basename "$SO").tmp" && mv -f "$ROOT/mlx_cai/.$(basename "$SO").tmp" "$ROOT/mlx_cai/$(basename "$SO")" \
  || warn "could not install $SO into mlx_cai/"
"$PY" -c "from mlx_cai import kernels; print('mlx-cai kernels:', kernels.status())"
