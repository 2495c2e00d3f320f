"""`mlx-cai sft`, `mlx-cai feedback`, `mlx-cai dpo` (stage commands generated from their configs) and
`mlx-cai fuse`."""

from __future__ import annotations

from pathlib import Path

import typer

from mlx_cai.cli import app
from mlx_cai.commands import user_errors
from mlx_cai.commands.options import stage_command


def _render_training(cfg, out: Path) -> None:
    from mlx_cai import records, ui
    from mlx_cai.train.fit import last_rows

    skip = ("seconds", "sequences", "examples", "loss_tokens")
    rows = [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in last_rows(out / "metrics.jsonl").items()
            if k not in skip]
    ui.out.print(ui.table(f"{records.read_json(out / 'summary.json')['stage'].split('/')[0]}: {out}",
                          ["metric (newest)", "value"], rows))
    ui.note(f"adapter in {out} (mlx_lm.generate --adapter-path {out}); metrics in {out / 'metrics.jsonl'}")


def _register_training() -> None:
    from mlx_cai.stages import dpo, sft

    stage_command("sft", sft.SFTConfig, sft.run, render=_render_training, doc="""LoRA fine-tuning on SL-CAI data
    (train.jsonl / valid.jsonl in mlx-lm chat format, e.g. from `mlx-cai clean`), loss on the answers only.
    Writes an mlx-lm adapter, checkpoints (with optimizer state and data position: `--resume` continues after a
    kill), metrics.jsonl and the resolved config.yaml into OUTPUT.""")
    stage_command("dpo", dpo.DPOConfig, dpo.run, render=_render_training, doc="""DPO on preference pairs
    ({prompt, chosen, rejected} JSONL, e.g. from `mlx-cai feedback`), continuing the SFT adapter. Reference
    log-probs are computed once with the SFT model and stored in OUTPUT/ref_logps.jsonl, so one model is in
    memory. Writes the adapter, checkpoints (`--resume`), metrics.jsonl (rewards/*, logps/*) and config.yaml
    into OUTPUT.""")


_register_training()


def _render_feedback(cfg, out: Path) -> None:
    from mlx_cai import records, ui
    from mlx_cai.stages import feedback

    kept, dropped, summary = feedback.paths(out)
    s = records.read_json(summary)
    rows = [["kept", s["kept"], f"{s['kept_share']:.1%}"]]
    rows += [[f"dropped: {k}", v, f"{s['dropped_share'][k]:.1%}"] for k, v in s["dropped"].items()]
    ui.out.print(ui.table(f"feedback: {s['prompts']} prompts", ["", "count", "share"], rows))
    ui.note(f"wrote {kept} (dropped pairs in {dropped})")


def _register_feedback() -> None:
    from mlx_cai.commands.options import stage_command
    from mlx_cai.stages import feedback

    stage_command("feedback", feedback.FeedbackConfig, feedback.run, positional=("prompts",),
                  render=_render_feedback, doc="""Make preference pairs with AI feedback: two samples per prompt
    from the SFT model, labelled by a feedback model in both orders (or taken from revise records), with ties,
    near-identical and degenerate pairs dropped and counted. Writes TRL-format {prompt, chosen, rejected} + score
    + provenance.""")


_register_feedback()


@app.command()
def fuse(
    adapter: Path = typer.Option(..., help="adapter folder (sft or dpo output)"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for the fused model"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="the adapter's base model"),
    dequantize: bool = typer.Option(False, "--dequantize", help="write float32 weights even if the base is "
                                    "quantized (fast on CPU; quantized is smaller and fast on Metal/CUDA)"),
) -> None:
    """Merge an adapter into its base model: a standalone MLX model folder for `mlx_lm.load`,
    `mlx_lm.server --model OUTPUT` and `mlx-cai chat --model OUTPUT`."""
    from mlx_cai import ui
    from mlx_cai import fuse as fusing

    with user_errors():
        with ui.console.status("fusing"):
            out = fusing.run(fusing.FuseConfig(model=model, adapter=str(adapter), output=str(output), dequantize=dequantize))
        ui.note(f"wrote {out}")
