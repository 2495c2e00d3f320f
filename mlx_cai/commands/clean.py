"""`mlx-cai clean`: keep good revisions, reject collapsed ones, write SFT data (mlx_cai.stages.clean)."""

from __future__ import annotations

from pathlib import Path

from mlx_cai.commands.options import stage_command


def _render(cfg, out: Path) -> None:
    from mlx_cai import records, ui

    s = records.read_json(out / "summary.json")
    rows = [[name, n, f"{n / s['records']:.0%}"] for name, n in s["reasons"].items()]
    rows += [["kept", s["kept"], f"{s['kept_share']:.0%}"], ["repaired", s["repaired"], ""],
             ["helpful used", s["helpful"]["used"], ""],
             ["sft train / valid", f"{s['sft']['train']} / {s['sft']['valid']}", ""]]
    ui.out.print(ui.table(f"clean: {s['records']} records", ["reason", "count", "share"], rows))
    ui.note(f"wrote {out}")


def _register() -> None:
    from mlx_cai.stages import clean

    stage_command("clean", clean.CleanConfig, clean.run, positional=("input",), render=_render, doc="""Apply the
    cleaning rules to INPUT, write kept/rejected records with reasons, a summary, and SFT data (train.jsonl /
    valid.jsonl, mlx-lm chat format) mixed with helpful examples, into OUTPUT.""")


_register()
