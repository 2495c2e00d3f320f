"""The one place that prepares MLX: fast BLAS on Linux, device choice.

Import this module (or anything in mlx_cai that uses MLX) before `mlx.core`. On Linux the mlx-cpu wheel
bundles the reference BLAS (~4 GFLOP/s); loading OpenBLAS from `cmeel-openblas` into the global symbol
scope first makes float32 matmul ~55x faster. Set MLX_CAI_NO_OPENBLAS=1 to measure without it.

Reads MLX_CAI_NO_OPENBLAS and MLX_CAI_BLAS_THREADS (mlx_cai.settings) once, at import: the only settings read
then; sets OPENBLAS_NUM_THREADS for the library it loads. Writes no files.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
import sysconfig
import time
from pathlib import Path

from mlx_cai.settings import Settings, SettingsError, settings

_BLAS_PATH: str | None = None
_BLAS_ERROR: str | None = None


def _openblas_candidates() -> list[str]:
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    roots.update(p for p in sys.path if p.endswith("site-packages"))
    found: list[str] = []
    for root in sorted(roots):
        found += glob.glob(os.path.join(root, "cmeel.prefix", "lib", "libopenblas.so*"))
    return sorted(found, key=lambda p: (not p.endswith(".so.0"), p))


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return sum(v) - idle, sum(v)


def _others_busy(cores: int, seconds: float = 0.1) -> bool:
    """Whether other work keeps the cores busy right now: at least cores - 0.5 of them over `seconds` of
    /proc/stat (this process is idle meanwhile). The 1-minute load average, used where /proc/stat is
    missing, lags: right after a test run it still said 2+ on a quiet 2-core machine, and a demo started
    then ran with one BLAS thread throughout (~2x slower training)."""
    a = _cpu_times()
    if a is None:
        return hasattr(os, "getloadavg") and os.getloadavg()[0] >= cores
    time.sleep(seconds)
    b = _cpu_times()
    busy, total = b[0] - a[0], b[1] - a[1]
    n_cpus = os.cpu_count() or cores
    return total > 0 and busy / total * n_cpus >= cores - 0.5


def _choose_blas_threads(chosen: int | None) -> None:
    """OpenBLAS threads spin while waiting for work: on a machine already busy (other work on every core) that
    made a decode step 6x slower than one thread (measured on 2 cores under load ~8). Use one thread then, all
    cores otherwise. OPENBLAS_NUM_THREADS or MLX_CAI_BLAS_THREADS, if set, win."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if chosen is None:
        chosen = 1 if cores > 1 and _others_busy(cores) else cores
    os.environ["OPENBLAS_NUM_THREADS"] = str(chosen)


_BLAS_LIB: ctypes.CDLL | None = None


def _load_openblas() -> str | None:
    try:
        env = settings()
    except SettingsError:  # imports run outside the CLI's error handler: the command's next settings() says it
        env = Settings()
    if not sys.platform.startswith("linux") or env.no_openblas:
        return None
    if "mlx.core" in sys.modules:
        # Too late to change symbol resolution of an already-loaded libmlx; say so in `info`.
        return None
    global _BLAS_ERROR, _BLAS_LIB
    _choose_blas_threads(env.blas_threads)
    for path in _openblas_candidates():
        try:
            _BLAS_LIB = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError as e:  # typically libgfortran.so.5 missing: `make setup` installs it
            _BLAS_ERROR = str(e).split(":")[-1].strip() if "libgfortran" not in str(e) else \
                "libgfortran.so.5 missing: apt-get install libgfortran5"
    return None


_BLAS_PATH = _load_openblas()

import mlx.core as mx  # noqa: E402  (must come after the BLAS load above)


def blas_library() -> str:
    """Which BLAS the MLX CPU backend resolves to: the OpenBLAS path, or a description of the fallback."""
    if _BLAS_PATH:
        return f"OpenBLAS (cmeel-openblas), {os.environ.get('OPENBLAS_NUM_THREADS')} thread(s), {_BLAS_PATH}"
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if _BLAS_ERROR:
        return f"bundled reference BLAS, ~50x slower: OpenBLAS failed to load ({_BLAS_ERROR})"
    return "bundled reference BLAS, ~50x slower (pip install cmeel-openblas)"


def blas_threads() -> int:
    """OpenBLAS's thread count as chosen at import (1 without OpenBLAS)."""
    return int(os.environ.get("OPENBLAS_NUM_THREADS") or 1) if _BLAS_LIB is not None else 1


_threads_now: int | None = None  # what blas_threads_set last set (None: the import-time choice)


@contextlib.contextmanager
def blas_threads_set(n: int):
    """Run the block with OpenBLAS at `n` threads, then restore the previous setting (nestable). For work
    that gets its parallelism from several MLX CPU streams instead (fastllama, training slices): one BLAS
    thread per stream, as two 2-thread BLAS calls on 2 cores oversubscribe them."""
    global _threads_now
    before = _threads_now or blas_threads()
    if _BLAS_LIB is None or n == before:
        yield
        return
    _BLAS_LIB.openblas_set_num_threads(n)
    _threads_now = n
    try:
        yield
    finally:
        _BLAS_LIB.openblas_set_num_threads(before)
        _threads_now = before


def ram_bytes() -> int:
    """The machine's physical memory in bytes (0 where it cannot be read): the budget for packed weight copies."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_threads() -> int:
    """Threads the CPU work being set up now may use: the BLAS threads in effect (blas_threads_set's, else the
    import-time choice), so kernels on parallel streams share the cores as BLAS does."""
    if _BLAS_LIB is None:
        return max(1, os.cpu_count() or 1)
    return _threads_now or blas_threads()


def blas_threads_per(streams: int):
    """blas_threads_set for work split over `streams` parallel MLX CPU streams: the process's BLAS threads
    shared out between them (one each on 2 cores), or nothing to change for one stream."""
    return blas_threads_set(max(1, blas_threads() // streams)) if streams > 1 else contextlib.nullcontext()


_CPU_STREAMS: list = []


def cpu_stream(i: int):
    """The process's i-th extra MLX CPU stream, created once and shared (each stream is a thread): work split
    over parallel streams (fastllama's decode parts, training slices, the DPO reference pass) takes 0, 1, ..."""
    while len(_CPU_STREAMS) <= i:
        _CPU_STREAMS.append(mx.new_stream(mx.cpu))
    return _CPU_STREAMS[i]


def default_device() -> str:
    """'gpu' on Metal/CUDA builds with a device, else 'cpu'."""
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """A quick float32 n x n matmul throughput probe, GFLOP/s."""
    import time

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    dt = (time.perf_counter() - t0) / repeats
    return 2 * n**3 / dt / 1e9


def cache_dir() -> Path:
    """Where converted models and other caches live: $MLX_CAI_HOME or ~/.cache/mlx-cai."""
    return settings().home


def memory_summary() -> str:
    """Total and available system memory, plus MLX's peak use in this process."""
    total = avail = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        total, avail = info.get("MemTotal"), info.get("MemAvailable")
    except OSError:
        total = ram_bytes() or None
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    parts = []
    if total:
        parts.append(f"{gib(total)} total")
    if avail:
        parts.append(f"{gib(avail)} available")
    parts.append(f"MLX peak {gib(mx.get_peak_memory())}")
    return ", ".join(parts)


def cpu_model() -> str:
    """The CPU's model name (for benchmark headers and `info`)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
