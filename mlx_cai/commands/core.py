"""`mlx-cai info`, `mlx-cai chat`, `mlx-cai generate`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from mlx_cai.cli import app
from mlx_cai.commands import BUDGET_HELP, user_errors

MODEL_HELP = ("smollm2-135m (embedded), qwen2.5-coder-1.5b (embedded overseer), a .gguf path, an MLX folder, "
              "or a Hub repo id")


def _preflight(command: str, model: str, batch: int, max_tokens: int, dequantize: bool | None,
               memory_budget: float | None) -> None:
    """Stop with one line when generating `batch` rows of `max_tokens` cannot fit the memory budget."""
    from functools import partial

    from mlx_cai import memcheck, memplan

    ctx = memcheck.context(command, memcheck.flag, model)
    ctx = dataclasses.replace(ctx, shape=partial(memcheck.shape_of, dequantize=dequantize))
    est = memplan.generation(ctx, model, {}, batch=batch, prompt=memplan.PROMPT_TOKENS, new_tokens=max_tokens,
                             knobs={"batch_size": batch, "max_tokens": max_tokens} if batch > 1
                             else {"max_tokens": max_tokens})
    memcheck.check([(command, est)], memcheck.budget(memory_budget))


@app.command()
def info() -> None:
    """Show the platform, MLX version and device, the BLAS in use (with a quick matmul speed), memory,
    the cache folder and the cached models."""
    import platform

    from mlx_cai import backend, embedded, kernels, models, ui

    import mlx.core as mx

    rows = [
        ["platform", f"{platform.system()} {platform.machine()} ({backend.cpu_model()}), Python {platform.python_version()}"],
        ["mlx", getattr(mx, "__version__", "?")],
        ["device", backend.default_device()],
        ["blas", backend.blas_library()],
        ["cpu kernels", kernels.status()],
        ["matmul f32 1024^3", f"{backend.matmul_gflops():.1f} GFLOP/s"],
        ["memory", backend.memory_summary()],
        ["cache dir", str(backend.cache_dir())],
        ["embedded models", "; ".join(f"{m.name} ({'ready' if m.name in models.cached_models() else 'installed' if embedded.installed(m.name) else 'not installed'})"
                                      for m in embedded.MODELS.values())],
        ["cached models", ", ".join(models.cached_models()) or "(none yet)"],
        ["dequantize on load", "yes (CPU: no fast quantized kernel)" if models.should_dequantize() else "no"],
    ]
    ui.out.print(ui.table("mlx-cai info", ["", ""], rows))


@app.command()
def chat(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    adapter: Optional[Path] = typer.Option(None, help="LoRA adapter folder"),
    max_tokens: int = typer.Option(512, help="new tokens per reply"),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.95),
    repetition_penalty: float = typer.Option(1.1),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help=BUDGET_HELP),
) -> None:
    """Chat with a model in the terminal (streaming, multi-turn). Empty line or Ctrl-D quits; /reset clears."""
    from mlx_cai import models, ui
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    with user_errors():
        _preflight("chat", model, 1, max_tokens, None, memory_budget)
        m, tok = models.load(model, adapter)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    procs = make_logits_processors(repetition_penalty=repetition_penalty if repetition_penalty != 1 else None)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    ui.console.print(f"[dim]{model}{' + ' + str(adapter) if adapter else ''} — empty line to quit, /reset to clear[/]")
    while True:
        try:
            user = ui.console.input("[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            break
        if not user.strip():
            break
        if user.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": user})
        prompt = tok.apply_chat_template(history, add_generation_prompt=True)
        reply = []
        ui.out.print("[bold blue]bot>[/] ", end="")
        for r in stream_generate(m, tok, prompt, max_tokens=max_tokens, sampler=sampler, logits_processors=procs):
            ui.out.print(r.text, end="", highlight=False, markup=False)
            reply.append(r.text)
        ui.out.print()
        history.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def generate(
    prompts: Path = typer.Argument(..., help=".txt (one prompt per line) or .jsonl (`prompt` or `messages` field)"),
    output: Path = typer.Option(..., "--output", "-o", help="output JSONL; rerunning continues it"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    adapter: Optional[Path] = typer.Option(None, help="LoRA adapter folder"),
    max_tokens: int = typer.Option(256, help="new tokens per response"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    repetition_penalty: float = typer.Option(1.0),
    batch_size: int = typer.Option(32, help="prompts decoded together"),
    seed: int = typer.Option(0),
    dequantize: Optional[bool] = typer.Option(None, "--dequantize/--keep-quantized",
                                              help="default: dequantize to float32 on CPU, keep quantized on GPU"),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help=BUDGET_HELP),
) -> None:
    """Generate a response for every prompt into OUTPUT (one JSON object per line: id, prompt, response,
    finish_reason, prompt_tokens, completion_tokens). Resumable: rerun after a kill to continue."""
    from mlx_cai import ui
    from mlx_cai.sampling import SamplingConfig
    from mlx_cai import promptfile, runlock

    with user_errors():
        cfg = SamplingConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             repetition_penalty=repetition_penalty, seed=seed)
        items = promptfile.read_prompts(prompts)
        _preflight("generate", model, batch_size, max_tokens, dequantize, memory_budget)
        with runlock.hold(output, "generate"):  # one writer per output file
            todo, done = promptfile.pending(items, output)
            if not todo:
                ui.note(f"{output}: all {len(items)} prompts already done")
                return
            ui.note(f"{len(items)} prompts, {len(done)} already in {output}, {len(todo)} to go")
            from mlx_cai import models

            m, tok = models.load(model, adapter, dequantize_weights=dequantize)
            with ui.progress("generate", total=len(items), done=len(done)) as (bar, _, _rate):
                promptfile.run(m, tok, todo, output, cfg, batch_size=batch_size, seed=seed,
                               on_record=lambda r: bar.tick(1), on_tokens=lambda n: bar.tick(0, n))
            ui.note(f"wrote {output}")
