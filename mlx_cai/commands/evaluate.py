"""`mlx-cai eval` and `mlx-cai report`."""

from __future__ import annotations

from pathlib import Path

from mlx_cai.commands.options import stage_command

def _render_eval(cfg, path: Path) -> None:
    from mlx_cai import ui

    ui.out.print(summary_table(path))
    ui.note(f"wrote {path} and the per-prompt records beside it")


def _render_report(cfg, path: Path) -> None:
    from mlx_cai import ui

    ui.out.print(path.with_suffix(".md").read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    ui.note(f"wrote {path} and {path.with_suffix('.md')}")


def _register() -> None:
    from mlx_cai.stages import evaluate, report

    stage_command("eval", evaluate.EvalConfig, evaluate.run, render=_render_eval, doc="""Evaluate a model (and
    adapter) on harmlessness, over-refusal, helpfulness and collapse.

    Writes OUTPUT/SUITE.jsonl (one record per prompt: response, finish reason, tokens, judge verdicts) as
    batches finish, then OUTPUT/summary.json with 95% intervals, and prints a summary table. Rerun the same
    command after an interruption to continue. With an LLM judge, the judge is checked before any generation.""")
    stage_command("report", report.ReportConfig, report.run, positional=("dirs",), render=_render_report,
                  doc="""Compare evaluation folders side by side: one self-contained HTML page (metric table
    with 95% intervals and deltas, plots, example responses) and a markdown table printed here and saved beside it.""")


def summary_table(path: Path):
    """A rich table of the main numbers of a summary.json."""
    from mlx_cai import records, ui
    from mlx_cai.stages.report import LABELS, fmt_estimate

    s = records.read_json(path)
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



_register()
