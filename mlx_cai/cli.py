"""The `mlx-cai` command: a thin Typer app. Each module in mlx_cai/commands/ adds its commands to `app`.

Commands parse arguments, build a typed config, call the library, and turn library errors into one
red line with exit code 1 (no traceback).
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="markdown",
                  help="Constitutional AI on MLX: revise, clean, sft, feedback, dpo, eval, report, run.")


def _register() -> None:
    from mlx_cai import commands

    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"mlx_cai.commands.{mod}")


if __name__ != "__main__":  # run as `python -m mlx_cai.cli`, the commands register on the imported module below
    _register()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling (while starting up or parsing)
        from mlx_cai import ui

        ui.fail("interrupted; rerun the same command to continue where it stopped", code=130)


if __name__ == "__main__":
    from mlx_cai.cli import main as registered  # the commands add themselves to that module's `app`, not to this copy

    registered()
