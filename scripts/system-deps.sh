#!/usr/bin/env bash
# Linux only: cmeel-openblas's libopenblas.so.0 needs libgfortran.so.5 from the system.
# Without it mlx-cai still runs, on MLX's bundled reference BLAS (~50x slower matmuls).
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
ldconfig -p 2>/dev/null | grep -q 'libgfortran.so.5 ' && exit 0
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "installing libgfortran5 (needed by OpenBLAS)"
  if $SUDO apt-get install -y -qq libgfortran5 >/dev/null 2>&1 || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq libgfortran5 >/dev/null 2>&1; }; then
    exit 0
  fi
fi
echo "warning: libgfortran.so.5 is missing and could not be installed; install your distribution's libgfortran5" \
     "package for fast CPU matmuls (mlx-cai falls back to a ~50x slower BLAS)" >&2
exit 0
