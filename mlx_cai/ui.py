"""The only module that imports rich: consoles, progress bars, tables, and one-line errors."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 1) -> None:
    """Print one red line and exit: how every user error ends."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and not _force()) as p:
        task = p.add_task(description, total=total, completed=done, rate="")

        def tick(n_items: int = 0, n_tokens: int = 0):
            if n_tokens:
                rate.add(n_tokens)
            p.update(task, advance=n_items, rate=f"{rate.rate:,.0f} tok/s" if rate.tokens else "")

        p.tick = tick  # type: ignore[attr-defined]
        yield p, task, rate


def _force() -> bool:
    return "--progress" in sys.argv


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title, title_justify="left", show_header=any(columns))
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t
