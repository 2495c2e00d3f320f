"""The only module that imports rich: consoles, progress bars, tables, and one-line errors.

Under `mlx.launch` only rank 0 prints; the other processes print only their errors, marked with their rank.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mlx_cai.settings import settings

# The launcher's rank, read without initializing mx.distributed (mlx.launch sets MLX_RANK; mpirun its own).
RANK = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
console = Console(stderr=True, quiet=RANK > 0)
out = Console(quiet=RANK > 0)


def fail(message: str, code: int = 1) -> None:
    """Print one red line and exit: how every user error ends."""
    where = f" (rank {RANK})" if RANK else ""  # other ranks' consoles are quiet: errors still get out
    (Console(stderr=True) if RANK else console).print(f"[bold red]error{where}:[/] {message}", highlight=False,
                                                      soft_wrap=True)
    raise SystemExit(code)


def note(message: str) -> None:
    console.print(message, highlight=False)


class TokenRate:
    """Counts tokens for a tok/s readout in a progress bar."""

    def __init__(self):
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, n: int) -> None:
        self.tokens += n

    @property
    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)


@contextmanager
def progress(description: str, total: int | None, done: int = 0) -> Iterator[tuple[Progress, int, TokenRate]]:
    """A rich progress bar with items, tok/s and ETA. Yields (progress, task id, token counter)."""
    rate = TokenRate()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with _Progress(*columns, console=console, transient=False, disable=not console.is_terminal and not _force()) as p:
        task = p.add_task(description, total=total, completed=done, rate="")

        def tick(n_items: int = 0, n_tokens: int = 0):
            if n_tokens:
                rate.add(n_tokens)
            p.update(task, advance=n_items, rate=f"{rate.rate:,.0f} tok/s" if rate.tokens else "")

        p.tick = tick  # type: ignore[attr-defined]
        yield p, task, rate


class _Progress(Progress):
    """rich Progress that, when it cannot draw (output not a terminal: CI, `nohup`, a log file), prints one
    plain line per task every MLX_CAI_PROGRESS_EVERY seconds (default 30) and when it ends."""

    def __init__(self, *columns, **kw):
        super().__init__(*columns, **kw)
        self.every = settings().progress_every
        self.printed: dict = {}

    def update(self, task_id, **kw) -> None:  # type: ignore[override]
        super().update(task_id, **kw)
        if self.disable and time.monotonic() - self.printed.get(task_id, 0.0) >= self.every:
            self.plain_line(task_id)

    def add_task(self, *args, **kw):
        task_id = super().add_task(*args, **kw)
        self.printed[task_id] = time.monotonic()  # first line after `every` seconds, not at once
        return task_id

    def plain_line(self, task_id) -> None:
        self.printed[task_id] = time.monotonic()
        self.console.print(plain_status(self._tasks[task_id]), highlight=False, markup=False, soft_wrap=True)

    def stop(self) -> None:
        if self.disable:
            for task_id in list(self._tasks):
                self.plain_line(task_id)
        super().stop()


def plain_status(task) -> str:
    """'revise 32/96 (33%)  412 tok/s  elapsed 1:23  eta 2:40' for one rich task."""
    done = f"{task.completed:,.0f}" + (f"/{task.total:,.0f} ({task.percentage:.0f}%)" if task.total else "")
    parts = [f"{task.description} {done}"]
    if task.fields.get("rate"):
        parts.append(str(task.fields["rate"]))
    parts.append(f"elapsed {_clock(task.elapsed or 0)}")
    if task.total and not task.finished and task.time_remaining is not None:
        parts.append(f"eta {_clock(task.time_remaining)}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _force() -> bool:
    return "--progress" in sys.argv


class StageProgress:
    """Draws a stage's progress events (mlx_cai.progress.Event): one bar per task, opened at its first event
    with its total, advanced by items and tokens; a training bar shows the newest metrics as its text."""

    KEYS = ("loss", "val_loss", "rewards/accuracies", "rewards/margins", "grad_norm", "tokens_per_second")

    def __init__(self):
        self.stack = ExitStack()
        self.task = None
        self.bar = None
        self.shown: dict = {}

    def __call__(self, event) -> None:
        if event.message:
            note(event.message)
        counts = event.total is not None or event.done is not None or event.advance or event.tokens or event.metrics
        if not counts:
            return
        if event.task != self.task:
            self.stack.close()
            self.bar, self.bar_task, self.rate = self.stack.enter_context(
                progress(event.task, total=event.total, done=event.done or 0))
            self.task, self.shown = event.task, {}
        elif event.total is not None:
            self.bar.update(self.bar_task, total=event.total)
        if event.metrics:
            self.shown.update({k: event.metrics[k] for k in self.KEYS if k in event.metrics})
            text = "  ".join(f"{k.split('/')[-1]} {v:,.3f}" if k != "tokens_per_second" else f"{v:,.0f} tok/s"
                             for k, v in self.shown.items())
            self.bar.update(self.bar_task, advance=event.advance, rate=text)
        elif event.advance or event.tokens:
            self.bar.tick(event.advance, event.tokens)

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title, title_justify="left", show_header=any(columns))
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t
