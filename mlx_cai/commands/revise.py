"""`mlx-cai revise`: initial answer -> critique -> revision for every prompt (mlx_cai.stages.revise)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlx_cai.cli import app
from mlx_cai.commands import user_errors

PROMPTS_HELP = ("train:harmful (shipped train split), hf:REPO[:DATA_DIR][@SPLIT] (e.g. hf:Anthropic/hh-rlhf:"
                "red-team-attempts), or a .jsonl/.json/.parquet/.csv/.txt file")


@app.command()
def revise(
    prompts: str = typer.Argument(..., help=PROMPTS_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="output JSONL; rerunning continues it"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="responder: backend spec (see `mlx-cai chat`)"),
    critic: Optional[str] = typer.Option(None, help="writes critiques and revisions, e.g. "
                                         "openai:MODEL@http://127.0.0.1:8080/v1; default: --model"),
    constitution: Optional[Path] = typer.Option(None, help="constitution file (ours, Anthropic or llm-swarm format)"),
    principles: Optional[str] = typer.Option(None, help="comma-separated principle ids to sample from"),
    rounds: int = typer.Option(1, help="critique/revision rounds per prompt"),
    shots: int = typer.Option(3, help="few-shot demonstrations per prompt, drawn at random per prompt"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(32, help="prompts per batched call; records are appended per batch"),
    max_tokens: int = typer.Option(256, help="new tokens per turn"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    repetition_penalty: float = typer.Option(1.2),
    limit: Optional[int] = typer.Option(None, help="only the first N prompts"),
) -> None:
    """Write SL-CAI records: for each prompt, the model's answer, then per round a critique under a sampled
    principle and a revision, into OUTPUT (JSONL). Resumable: rerun the same command after a stop."""
    from mlx_cai import prompts as P
    from mlx_cai import records, ui
    from mlx_cai.stages import revise as R

    with user_errors():
        cfg = R.ReviseConfig(model=model, critic=critic, principles=principles.split(",") if principles else None,
                             rounds=rounds, shots=shots, seed=seed, limit=limit, max_tokens=max_tokens,
                             temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                             batch_size=batch_size, **({"constitution": str(constitution)} if constitution else {}))
        R.load_constitution(cfg)  # bad file or unknown principle: fail before loading anything big
        items = P.load(prompts, limit=limit)
        done = len({p.id for p in items} & records.done_ids(output))
        dropped = f", {items.dropped_eval} held-out eval prompts left out" if items.dropped_eval else ""
        ui.note(f"{len(items)} prompts from {prompts}{dropped}; {done} already in {output}")
        with ui.progress("revise", total=len(items), done=done) as (bar, _task, _rate):
            R.run(cfg, list(items), output, progress=bar.tick)
        ui.note(f"wrote {output}")
