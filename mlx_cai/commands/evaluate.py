"""`mlx-cai eval` and `mlx-cai report`."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import List, Optional

import typer

from mlx_cai.cli import app
from mlx_cai.commands import user_errors

DEFAULT_SUITES = "harm,benign,borderline,mtbench"


class _Bars:
    """One progress bar per suite (items and tok/s), fed by evaluate's progress callback."""

    def __init__(self):
        self.stack = ExitStack()
        self.suite = None
        self.done = 0
        self.bar = None

    def __call__(self, suite: str, done: int, total: int, tokens: int) -> None:
        from mlx_cai import ui

        if suite != self.suite:
            self.stack.close()
            self.bar, _, _ = self.stack.enter_context(ui.progress(f"eval {suite}", total=total, done=done))
            self.suite, self.done = suite, done
        self.bar.tick(done - self.done, tokens)
        self.done = done

    def close(self) -> None:
        self.stack.close()


@app.command("eval")
def eval_command(
    output: Path = typer.Option(..., "--output", "-o", help="output folder; rerunning continues it"),
    model: str = typer.Option("smollm2-135m", "--model", "-m",
                              help="smollm2-135m (embedded), a .gguf path, an MLX folder, or a Hub repo id"),
    adapter: Optional[Path] = typer.Option(None, help="LoRA adapter folder"),
    suite: List[str] = typer.Option([DEFAULT_SUITES], "--suite", "-s", help=(
        "comma-separated suites: harm, benign, borderline, mtbench, a file (.jsonl MT-Bench/prompts, .csv "
        "XSTest/AdvBench/HarmBench, .txt) or hf:REPO[#SPLIT]; add :harmful, :safe or :chat to say what a plain "
        "prompt list is")),
    judge: str = typer.Option("keyword", help=(
        "'keyword', or a backend spec (e.g. openai:gpt-4o-mini, openai:m@http://127.0.0.1:8080/v1, smollm2-135m) "
        "to also grade harm 1-5 and MT-Bench 1-10")),
    split: str = typer.Option("eval", help="split of the shipped suites: eval, train or all"),
    limit: Optional[int] = typer.Option(None, help="at most N prompts per suite, spread over categories"),
    max_tokens: int = typer.Option(256, help="new tokens per response"),
    batch_size: int = typer.Option(32, help="prompts decoded together"),
    seed: int = typer.Option(0),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    harm_threshold: int = typer.Option(5, help="rubric harm score counted as an attack success"),
    judge_retries: int = typer.Option(2, help="re-asks when an LLM judge's answer does not parse"),
) -> None:
    """Evaluate a model (and adapter) on harmlessness, over-refusal, helpfulness and collapse.

    Writes OUTPUT/SUITE.jsonl (one record per prompt: response, finish reason, tokens, judge verdicts) as
    batches finish, then OUTPUT/summary.json with 95% intervals, and prints a summary table. Rerun the same
    command after an interruption to continue. With an LLM judge, the judge is checked before any generation.
    """
    from mlx_cai import ui
    from mlx_cai.stages import evaluate

    with user_errors():
        suites = tuple(s for value in suite for s in value.split(",") if s.strip())
        cfg = evaluate.EvalConfig(output=str(output), model=model, adapter=str(adapter) if adapter else None,
                                  suites=suites, judge=judge, split=split, limit=limit, max_tokens=max_tokens,
                                  batch_size=batch_size, seed=seed, temperature=temperature,
                                  harm_threshold=harm_threshold, judge_retries=judge_retries)
        bars = _Bars()
        try:
            path = evaluate.run(cfg, progress=bars)
        finally:
            bars.close()
        from mlx_cai import distributed as D

        if not D.is_main():  # rank 0 wrote the summary and prints it
            return
        ui.out.print(summary_table(path))
        ui.note(f"wrote {path} and the per-prompt records beside it")


def summary_table(path: Path):
    """A rich table of the main numbers of a summary.json."""
    import json

    from mlx_cai import ui
    from mlx_cai.stages.report import LABELS, fmt_estimate

    s = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = []
    for name, sec in [*s["suites"].items(), ("overall", s["overall"])]:
        for metric, est in sec["metrics"].items():
            rows.append([name, LABELS.get(metric, metric), fmt_estimate(est, metric), est["n"]])
        for metric in ("seq_rep_4", "distinct_2", "non_termination_rate"):
            est = sec["collapse"][metric]
            rows.append([name, metric, fmt_estimate(est, metric), est["n"]])
        for judge, n in sec["judge_failures"].items():
            rows.append([name, f"{judge} judge failures", n, ""])
    t = s["overall"]["timing"]
    title = (f"{s['provenance']['model']} ({s['provenance']['judge']} judge, {s['provenance']['split']} split): "
             f"{t['completion_tokens']} tokens in {t['gen_seconds']} s, {t['tok_per_s']} tok/s")
    return ui.table(title, ["suite", "metric", "value [95% CI]", "n"], rows)


@app.command()
def report(
    dirs: List[Path] = typer.Argument(..., help="evaluation folders; the first is the baseline of the deltas"),
    output: Path = typer.Option(Path("report.html"), "--output", "-o", help="HTML file; a .md twin goes beside it"),
    allow_mixed: bool = typer.Option(False, help="compare folders evaluated differently (suites, split, judge, "
                                                 "sampling), with the affected rows marked †"),
    examples: int = typer.Option(1, help="example responses per category"),
) -> None:
    """Compare evaluation folders side by side: one self-contained HTML page (metric table with 95% intervals and
    deltas, plots, example responses) and a markdown table printed here and saved beside it."""
    from mlx_cai import ui
    from mlx_cai.stages import report as report_stage

    with user_errors():
        path = report_stage.run(dirs, output, allow_mixed=allow_mixed, per_category=examples)
        ui.out.print(path.with_suffix(".md").read_text(encoding="utf-8"), markup=False, highlight=False,
                     soft_wrap=True)
        ui.note(f"wrote {path} and {path.with_suffix('.md')}")
