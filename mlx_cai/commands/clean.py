"""`mlx-cai clean`: keep good revisions, reject collapsed ones, write SFT data (mlx_cai.stages.clean)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mlx_cai.cli import app
from mlx_cai.commands import user_errors


@app.command()
def clean(
    input: Path = typer.Argument(..., help="revise output (JSONL)"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder"),
    helpful: str = typer.Option("train:benign", help="helpful examples: a file with answers, or prompts the "
                                "responder answers (train:benign, a file, hf:...); 'none' to skip"),
    helpful_ratio: float = typer.Option(1.0, help="helpful examples per kept revision"),
    helpful_model: Optional[str] = typer.Option(None, help="answers helpful prompts; default: the responder"),
    repair: Optional[str] = typer.Option(None, help="backend spec that rewrites rejected revisions"),
    complies: str = typer.Option("changed", help="changed | keyword | off: how to judge a revision that "
                                 "still complies"),
    rules: Optional[str] = typer.Option(None, help="comma-separated rules to apply (default: all; 'none' keeps every revision: the no-clean ablation)"),
    demo_copy_chars: int = typer.Option(60, help="shared characters with a demo that count as a copy"),
    valid_fraction: float = typer.Option(0.1),
    seed: int = typer.Option(0),
    push_to_hub: Optional[str] = typer.Option(None, help="push the SFT data to this dataset repo (token in $HF_TOKEN)"),
    private: bool = typer.Option(False, help="make the pushed dataset private"),
) -> None:
    """Apply the cleaning rules to INPUT, write kept/rejected records with reasons, a summary, and SFT data
    (train.jsonl / valid.jsonl, mlx-lm chat format) mixed with helpful examples, into OUTPUT."""
    from mlx_cai import hub, ui
    from mlx_cai.stages import clean as K

    with user_errors():
        cfg = K.CleanConfig(rules=([] if rules == "none" else rules.split(",")) if rules else None, complies=complies,
                            demo_copy_chars=demo_copy_chars, repair=repair,
                            helpful=None if helpful.lower() == "none" else helpful, helpful_ratio=helpful_ratio,
                            helpful_model=helpful_model, valid_fraction=valid_fraction, seed=seed)
        with ui.console.status("cleaning (helpful answers and repairs call a model)"):
            out = K.run(cfg, input, output)
        s = json.loads((out / "summary.json").read_text())
        rows = [[name, n, f"{n / s['records']:.0%}"] for name, n in s["reasons"].items()]
        rows += [["kept", s["kept"], f"{s['kept_share']:.0%}"], ["repaired", s["repaired"], ""],
                 ["helpful used", s["helpful"]["used"], ""],
                 ["sft train / valid", f"{s['sft']['train']} / {s['sft']['valid']}", ""]]
        ui.out.print(ui.table(f"clean: {s['records']} records", ["reason", "count", "share"], rows))
        ui.note(f"wrote {out}")
        if push_to_hub:
            ui.note(f"pushed to {hub.push(out, push_to_hub, private=private)}")
