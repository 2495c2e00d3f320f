"""`mlx-cai sft`, `mlx-cai feedback`, `mlx-cai dpo`, `mlx-cai fuse`.

`sft` and `dpo` get one option per field of their config dataclass (help text from the field), all
defaulting to "not given", so a value comes from the command line, else `--config FILE`, else the default.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from contextlib import ExitStack
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from mlx_cai.cli import app
from mlx_cai.commands import user_errors

SHORT = {"output": ("--output", "-o"), "model": ("--model", "-m")}


def _cli_type(hint):
    """Option type for a config field type: scalars as themselves, lists as comma-separated text."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    return str if typing.get_origin(hint) is list else hint


def _config_params(cls) -> list[inspect.Parameter]:
    from mlx_cai.training import field_help

    hints = typing.get_type_hints(cls)
    params = []
    for f in fields(cls):
        typ = _cli_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        decls = SHORT.get(f.name, (flag,))
        if typ is bool:
            decls = (f"{flag}/--no-{flag[2:]}",)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[typ],
                                        default=typer.Option(None, *decls, help=field_help(cls, f.name),
                                                             show_default=False)))
    return params


class _Bars:
    """Progress for a training run: a bar over steps whose text shows the newest metrics."""

    KEYS = ("loss", "val_loss", "rewards/accuracies", "rewards/margins", "grad_norm", "tokens_per_second")

    def __init__(self, iters: int):
        self.iters, self.stack, self.bar, self.ref = iters, ExitStack(), None, None
        self.shown: dict = {}

    def __call__(self, row: dict) -> None:
        from mlx_cai import ui

        event = row.get("event")
        if event == "start":
            counts = {k: v for k, v in row.items() if k not in ("event", "stage", "warnings")}
            ui.note(" ".join(f"{k}={json.dumps(v)}" for k, v in counts.items()))
            for w in row.get("warnings", []):
                ui.note(f"[yellow]warning:[/] {w}")
            return
        if event == "reference":
            if self.ref is None:
                self.ref, _, _ = self.stack.enter_context(ui.progress("reference log-probs", total=row["total"]))
                self.ref.seen = 0
            self.ref.tick(row["done"] - self.ref.seen)
            self.ref.seen = row["done"]
            return
        if self.bar is None:
            self.bar, self.task, _ = self.stack.enter_context(
                ui.progress("train", total=self.iters, done=max(row["step"] - 1, 0)))
            self.step = max(row["step"] - 1, 0)
        self.shown.update({k: row[k] for k in self.KEYS if k in row})
        text = "  ".join(f"{k.split('/')[-1]} {v:,.3f}" if k != "tokens_per_second" else f"{v:,.0f} tok/s"
                         for k, v in self.shown.items())
        self.bar.update(self.task, advance=row["step"] - self.step, rate=text)
        self.step = row["step"]

    def close(self) -> None:
        self.stack.close()


def _final_table(out: Path, title: str):
    from mlx_cai import records, ui

    last: dict = {}
    for row in records.read_jsonl(out / "metrics.jsonl"):
        last.update(row)
    skip = ("seconds", "sequences", "examples", "loss_tokens")
    rows = [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in last.items() if k not in skip]
    return ui.table(title, ["metric (newest)", "value"], rows)


def _train_command(name: str, cls, stage: str, doc: str) -> None:
    def command(**kw) -> None:
        import importlib

        from mlx_cai import distributed as D
        from mlx_cai import training as T
        from mlx_cai import ui

        config_file, resume = kw.pop("config"), kw.pop("resume")
        with user_errors():
            # On --resume the run's own config.yaml is the base layer: only changed settings need repeating.
            saved = Path(kw["output"]) / "config.yaml" if resume and kw.get("output") else None
            layers = [p for p in (saved if saved and saved.exists() else None, config_file) if p]
            cfg = T.build_config(cls, layers, **kw)
            run = importlib.import_module(f"mlx_cai.stages.{stage}").run
            bars = _Bars(cfg.iters)
            try:
                out = run(cfg, progress=bars, resume=resume)
            finally:
                bars.close()
            if not D.is_main():  # rank 0 wrote the metrics and prints them
                return
            ui.out.print(_final_table(out, f"{name}: {out}"))
            ui.note(f"adapter in {out} (mlx_lm.generate --adapter-path {out}); metrics in {out / 'metrics.jsonl'}")

    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", "-c", help="YAML file of settings "
                                               "(command-line options override it)")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--resume", help="continue from the newest checkpoint in "
                                               "the output folder")),
        *_config_params(cls),
    ]
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    command.__name__ = name
    app.command(name)(command)


def _register() -> None:
    from mlx_cai.stages.dpo import DPOConfig
    from mlx_cai.stages.sft import SFTConfig

    _train_command("sft", SFTConfig, "sft", """LoRA fine-tuning on SL-CAI data (train.jsonl / valid.jsonl in
    mlx-lm chat format, e.g. from `mlx-cai clean`), loss on the answers only. Writes an mlx-lm adapter,
    checkpoints (with optimizer state and data position: `--resume` continues after a kill), metrics.jsonl
    and the resolved config.yaml into OUTPUT.""")
    _train_command("dpo", DPOConfig, "dpo", """DPO on preference pairs ({prompt, chosen, rejected} JSONL, e.g.
    from `mlx-cai feedback`), continuing the SFT adapter. Reference log-probs are computed once with the SFT
    model and stored in OUTPUT/ref_logps.jsonl, so one model is in memory. Writes the adapter, checkpoints
    (`--resume`), metrics.jsonl (rewards/*, logps/*) and config.yaml into OUTPUT.""")


_register()


@app.command()
def feedback(
    prompts: str = typer.Argument(..., help="prompts (train:harmful, a file, hf:...); for --mode revision, a "
                                  "revise JSONL"),
    output: Path = typer.Option(..., "--output", "-o", help="pairs JSONL; .dropped.jsonl and .summary.json "
                                "go beside it; rerunning continues it"),
    mode: str = typer.Option("logprob", help="logprob (local feedback model's (A)/(B) probabilities), judge "
                             "(OpenAI-compatible judge, rationale kept) or revision (chosen = revision, rejected "
                             "= initial, from revise records)"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="policy that samples two responses"),
    adapter: Optional[Path] = typer.Option(None, help="the policy's SFT adapter"),
    judge: Optional[str] = typer.Option(None, help="logprob: local model spec (default: --model without "
                                        "adapter); judge: backend spec, e.g. openai:gpt-4o"),
    principles: Optional[Path] = typer.Option(None, help="comparison principles file (YAML list or one per "
                                              "line); default: built-in, after Bai et al. 2022"),
    ensemble: Optional[int] = typer.Option(None, help="principles per prompt (default 4 logprob, 1 judge)"),
    temperature: float = typer.Option(0.8, help="sampling temperature of the two responses"),
    top_p: float = typer.Option(0.95),
    repetition_penalty: float = typer.Option(1.2),
    max_tokens: int = typer.Option(256, help="new tokens per response"),
    seed: int = typer.Option(0),
    min_margin: float = typer.Option(0.05, help="|p - 0.5| below this is a tie (dropped)"),
    max_similarity: float = typer.Option(0.9, help="word similarity that counts as near-identical (dropped)"),
    clamp_low: float = typer.Option(0.05, help="score clamp, low end"),
    clamp_high: float = typer.Option(0.95, help="score clamp, high end"),
    batch_size: int = typer.Option(16, help="prompts per chunk; pairs are appended per chunk"),
    limit: Optional[int] = typer.Option(None, help="only the first N prompts"),
) -> None:
    """Make preference pairs with AI feedback: two samples per prompt from the SFT model, labelled by a
    feedback model in both orders (or taken from revise records), with ties, near-identical and degenerate
    pairs dropped and counted. Writes TRL-format {prompt, chosen, rejected} + score + provenance."""
    from mlx_cai import records, ui
    from mlx_cai.stages import feedback as F

    with user_errors():
        cfg = F.FeedbackConfig(mode=mode, model=model, adapter=str(adapter) if adapter else None, judge=judge,
                               principles=str(principles) if principles else None, ensemble=ensemble,
                               temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                               max_tokens=max_tokens, seed=seed, min_margin=min_margin,
                               max_similarity=max_similarity, clamp_low=clamp_low, clamp_high=clamp_high,
                               batch_size=batch_size, limit=limit)
        kept, dropped, _ = F.paths(output)
        done = len(records.done_ids(kept) | records.done_ids(dropped))
        if mode == "revision":
            total = sum(1 for _ in records.read_jsonl(prompts))
        else:
            from mlx_cai import prompts as P

            items = P.load(prompts, limit=limit)
            prompts, total = list(items), len(items)
        total = min(total, limit) if limit else total
        with ui.progress(f"feedback ({mode})", total=total, done=done) as (bar, _task, _rate):
            s = F.run(cfg, prompts, output, progress=bar.tick)
        rows = [["kept", s["kept"], f"{s['kept_share']:.1%}"]]
        rows += [[f"dropped: {k}", v, f"{s['dropped_share'][k]:.1%}"] for k, v in s["dropped"].items()]
        ui.out.print(ui.table(f"feedback: {s['prompts']} prompts", ["", "count", "share"], rows))
        ui.note(f"wrote {kept} (dropped pairs in {dropped})")


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
    from mlx_cai.stages import fuse as Fu

    with user_errors():
        with ui.console.status("fusing"):
            out = Fu.run(Fu.FuseConfig(model=model, adapter=str(adapter), output=str(output), dequantize=dequantize))
        ui.note(f"wrote {out}")
