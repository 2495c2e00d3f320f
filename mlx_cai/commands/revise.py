"""`mlx-cai revise`: initial answer -> critique -> revision for every prompt (mlx_cai.stages.revise)."""

from __future__ import annotations

from mlx_cai.commands.options import stage_command


def _render(cfg, out) -> None:
    from mlx_cai import ui

    ui.note(f"wrote {out}")


def _register() -> None:
    from mlx_cai.stages import revise

    stage_command("revise", revise.ReviseConfig, revise.run, positional=("prompts",), render=_render, doc="""Write
    SL-CAI records: for each prompt, the model's answer, then per round a critique under a sampled principle and
    a revision, into OUTPUT (JSONL). Resumable: rerun the same command after a stop.""")


_register()
