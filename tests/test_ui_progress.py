"""Plain-line progress when the output is not a terminal (CI logs, nohup): the rich bar cannot draw there."""

from mlx_cai import ui


def _run(monkeypatch, every: str, ticks: int) -> None:
    monkeypatch.setenv("MLX_CAI_PROGRESS_EVERY", every)
    with ui.progress("revise", total=ticks) as (bar, _task, _rate):
        for _ in range(ticks):
            bar.tick(1, 25)


def test_plain_lines_every_interval_and_at_the_end(monkeypatch, capsys):
    assert not ui.console.is_terminal  # pytest captures stderr: the rich bar is disabled
    _run(monkeypatch, "0", 3)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 4  # one per update (interval 0) plus the final one
    assert lines[0].startswith("revise 1/3 (33%)")
    assert lines[-1].startswith("revise 3/3 (100%)")
    assert "tok/s" in lines[-1] and "elapsed" in lines[-1] and "eta" not in lines[-1]


def test_long_interval_prints_only_the_final_line(monkeypatch, capsys):
    _run(monkeypatch, "1000", 5)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("revise 5/5 (100%)")


def test_plain_status_without_total():
    from rich.progress import Progress

    p = Progress(disable=True)
    task = p.add_task("generate", total=None, rate="12 tok/s")
    p.update(task, advance=7)
    line = ui.plain_status(p._tasks[task])
    assert line.startswith("generate 7  12 tok/s  elapsed 0:0")
