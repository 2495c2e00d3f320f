#!/usr/bin/env bash
# Linux only: cmeel-openblas's libopenblas.so.0 needs libgfortran.so.5 from the system.
# Without it mlx-cai still runs, on MLX's bundled reference BLAS (~50x slower matmuls).
set -u
# With --with-chromium (CI) also Debian's chromium, used by the report test to render the HTML headless.
[ "$(uname -s)" = "Linux" ] || exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
apt_install() {  # apt_install PACKAGE: quiet; refreshes the package lists once if the first try fails
  command -v apt-get >/dev/null 2>&1 || return 1
  $SUDO apt-get install -y -qq "$1" >/dev/null 2>&1 || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq "$1" >/dev/null 2>&1; }
}
if [ "${1:-}" = "--with-chromium" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (report rendering test)"
  apt_install chromium || echo "warning: chromium not installed; the report rendering test will be skipped" >&2
fi
ldconfig -p 2>/dev/null | grep -q 'libgfortran.so.5 ' && exit 0
echo "installing libgfortran5 (needed by OpenBLAS)"
apt_install libgfortran5 && exit 0
echo "warning: libgfortran.so.5 is missing and could not be installed; install your distribution's libgfortran5" \
     "package for fast CPU matmuls (mlx-cai falls back to a ~50x slower BLAS)" >&2
exit 0
