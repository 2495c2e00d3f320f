"""Compare evaluation folders side by side (e.g. base, sft, dpo) in one self-contained HTML page and a markdown table.

Reads: each folder's summary.json and <suite>.jsonl (written by mlx_cai.stages.evaluate); optionally training
folders' metrics.jsonl (mlx_cai.train.loop: a row per step with `loss`, a row per validation pass with `val_loss`).
Writes OUT.html, in this order:
  1. the verdict: mlx_cai.targets of the last folder against the first, one line, then the table, failures marked;
     then, where the select stage chose the final DPO checkpoint (`selection`), its candidates and why;
  2. the answers of every folder to the same prompts, side by side (a few per suite and category);
  3. the metric tables (95% intervals, deltas against the first folder, regressions beyond the first folder's
     interval marked), provenance, matplotlib plots and the training loss curves, all embedded as base64 PNGs.
and OUT.md beside it (the verdict first, then the tables, for the terminal).

Folders evaluated differently (suites, split, prompt selection, judge, token budget, temperature) are refused
unless `allow_mixed`, which compares them anyway and marks every affected row.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlx_cai import records, targets
from mlx_cai.config import opt
from mlx_cai.progress import Progress

# Row order of the table; metrics absent from every folder are left out.
SAFETY_METRICS = ("asr_keyword", "asr_rubric", "harm_score", "attack_prob", "judge_agreement", "over_refusal", "chat_refusal",
                  "mtbench_turn1", "mtbench_turn2")
COLLAPSE_METRICS = ("seq_rep_4", "sentence_repetition", "compression_ratio", "distinct_1", "distinct_2",
                    "non_termination_rate", "phrase_repeat_rate", "emoji_density", "mean_length_words")
RATES = {"asr_keyword", "asr_rubric", "judge_agreement", "over_refusal", "chat_refusal", "non_termination_rate",
         "phrase_repeat_rate"}
LABELS = {"asr_keyword": "ASR (keyword)", "asr_rubric": "ASR (overseer judge)", "harm_score": "harm score 1-5",
          "attack_prob": "P(attack), overseer judge",
          "judge_agreement": "keyword and rubric judges agree",
          "over_refusal": "over-refusal", "chat_refusal": "refusal on chat turn 1", "mtbench_turn1": "MT-Bench turn 1",
          "mtbench_turn2": "MT-Bench turn 2"}
PLOT_COLLAPSE = ("seq_rep_4", "sentence_repetition", "compression_ratio", "distinct_2", "non_termination_rate",
                 "phrase_repeat_rate", "emoji_density", "mean_length_words")


@dataclass
class EvalDir:
    path: Path
    label: str
    summary: dict
    records: dict[str, dict[str, dict]]  # suite -> id -> record


@dataclass
class Row:
    section: str  # "overall" or a suite name
    group: str  # "metrics" (safety, helpfulness) or "collapse"
    metric: str
    cells: list[dict | None]  # an Estimate dict per folder
    mixed: bool = False


def load(dirs: Sequence[str | Path]) -> list[EvalDir]:
    paths = [Path(d) for d in dirs]
    if not paths:
        raise ValueError("no evaluation folders to report")
    out = []
    for p, label in zip(paths, _labels(paths)):
        f = p / "summary.json"
        if not f.exists():
            raise ValueError(f"{p} has no summary.json; run `mlx-cai eval -o {p}` first")
        try:
            summary = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: malformed JSON ({e.msg})") from None
        bad = [s for s in summary.get("suites", {}) if not _plain_name(s)]
        if bad:  # suite names become file names inside the folder: none may point outside it
            raise ValueError(f"{f}: suite name {bad[0]!r} is not a plain file name; this summary.json was not "
                             "written by `mlx-cai eval`")
        recs = {s: records.read_complete(p / f"{s}.jsonl") for s in summary["suites"]}
        out.append(EvalDir(p, label, summary, recs))
    return out


def _plain_name(name) -> bool:
    """A suite name that is one file name (NAME.jsonl stays inside its folder)."""
    return isinstance(name, str) and name.strip() != "" and not any(c in name for c in "/\\\0")


def _labels(paths: list[Path]) -> list[str]:
    """The shortest trailing path parts that tell the folders apart (runs/dpo/eval -> dpo/eval)."""
    for depth in range(1, max(len(p.resolve().parts) for p in paths) + 1):
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def mismatches(evals: Sequence[EvalDir]) -> tuple[list[str], set[str]]:
    """Differences against the first folder in what was measured and how (split, suites, prompt selection, judge,
    sampling): (messages, sections they affect)."""
    first = evals[0].summary["provenance"]
    msgs: list[str] = []
    mixed: set[str] = set()
    for e in evals[1:]:
        prov = e.summary["provenance"]
        for key in ("split", "judge", "max_tokens", "temperature", "harm_threshold"):
            if prov.get(key) != first.get(key):
                msgs.append(f"{e.label} has {key} {prov.get(key)!r}, {evals[0].label} {first.get(key)!r}")
                mixed |= {"overall", *prov["suites"], *first["suites"]}
        for s in sorted(set(prov["suites"]) ^ set(first["suites"])):
            msgs.append(f"suite '{s}' is in only one of {evals[0].label} and {e.label}")
            mixed |= {s, "overall"}
        for s in sorted(set(prov["suites"]) & set(first["suites"])):
            if prov["suites"][s]["items_hash"] != first["suites"][s]["items_hash"]:
                msgs.append(f"suite '{s}' has different prompts in {e.label} ({prov['suites'][s]['n']}) "
                            f"and {evals[0].label} ({first['suites'][s]['n']})")
                mixed |= {s, "overall"}
    return msgs, mixed


def rows(evals: Sequence[EvalDir], mixed: set[str] = frozenset()) -> list[Row]:
    pooled = ["overall"] + (["ordinary"] if any("ordinary" in e.summary for e in evals) else [])
    sections = pooled + list(dict.fromkeys(s for e in evals for s in e.summary["suites"]))
    out = []
    for sec in sections:
        parts = [e.summary.get(sec) if sec in pooled else e.summary["suites"].get(sec) for e in evals]
        for group, names in (("metrics", SAFETY_METRICS), ("collapse", COLLAPSE_METRICS)):
            for m in names:
                cells = [p[group].get(m) if p else None for p in parts]
                if any(c is not None for c in cells):
                    out.append(Row(sec, group, m, cells, sec in mixed))
    return out


def fmt_estimate(est: dict | None, metric: str) -> str:
    if est is None or est.get("value") is None:
        return "–"
    scale, unit = (100, "%") if metric in RATES else (1, "")
    v = f"{est['value'] * scale:.1f}{unit}" if scale == 100 else f"{est['value']:.3g}"
    if est.get("low") is None:
        return v
    lo, hi = est["low"] * scale, est["high"] * scale
    return f"{v} [{lo:.1f}, {hi:.1f}]" if scale == 100 else f"{v} [{lo:.3g}, {hi:.3g}]"


WORSE = " (worse)"  # ends a delta that is worse than the first folder beyond its 95% interval (targets.regressed)


def _delta(est: dict | None, base: dict | None, metric: str) -> str:
    if not est or not base or est.get("value") is None or base.get("value") is None:
        return "–"
    d = est["value"] - base["value"]
    text = f"{d * 100:+.1f} pp" if metric in RATES else f"{d:+.3g}"
    return text + (WORSE if targets.regressed(metric, base, est) else "")


def table(evals: Sequence[EvalDir], rs: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and rows as text: metric, first folder, then each other folder and its delta to the first (ending in
    WORSE when it regressed beyond the first folder's 95% interval)."""
    header = ["suite", "metric", evals[0].label]
    for e in evals[1:]:
        header += [e.label, f"Δ {e.label}"]
    body = []
    for r in rs:
        line = [r.section + (" †" if r.mixed else ""), LABELS.get(r.metric, r.metric),
                fmt_estimate(r.cells[0], r.metric)]
        for c in r.cells[1:]:
            line += [fmt_estimate(c, r.metric), _delta(c, r.cells[0], r.metric)]
        body.append(line)
    return header, body


def extra_rows(evals: Sequence[EvalDir]) -> tuple[list[str], list[list[str]]]:
    """Judge failures, timing and provenance per folder."""
    header = ["", *[e.label for e in evals]]
    def get(f):
        return [str(f(e.summary)) for e in evals]
    body = [["model", *get(lambda s: s["provenance"]["model"])],
            ["adapter", *get(lambda s: s["provenance"]["adapter"] or "–")],
            ["judge", *get(lambda s: s["provenance"]["judge"])],
            ["split", *get(lambda s: s["provenance"]["split"])],
            ["prompts", *get(lambda s: s["overall"]["n"])],
            ["judge failures", *get(lambda s: ", ".join(f"{k} {v}" for k, v in s["overall"]["judge_failures"].items())
                                    or "0")],
            ["generation s", *get(lambda s: s["overall"]["timing"]["gen_seconds"])],
            ["tok/s", *get(lambda s: s["overall"]["timing"]["tok_per_s"])]]
    return header, body


def verdict(evals: Sequence[EvalDir], warnings: Sequence[str]) -> tuple[str, list[targets.Check]]:
    """(one-line verdict, checks) of the targets, the last folder against the first; no checks when there is
    nothing to compare (one folder) or the folders were evaluated differently."""
    if len(evals) < 2:
        return f"Only one evaluation folder ({evals[0].label}): nothing to compare, no targets judged.", []
    if warnings:
        return "Targets not judged: the folders were evaluated differently (see below).", []
    checks = targets.check(evals[0].summary, evals[-1].summary)
    judged = [c for c in checks if c.ok is not None]
    failed = [c.name for c in judged if not c.ok]
    vs = f"{evals[-1].label} against {evals[0].label}"
    if not judged:
        return f"No target could be judged ({vs}): the metrics are missing.", checks
    if failed:
        return f"{len(failed)} of {len(judged)} targets not met ({vs}): {', '.join(failed)}", checks
    return f"All targets met ({vs}).", checks


def markdown(evals: Sequence[EvalDir], rs: Sequence[Row], warnings: Sequence[str], choice: dict | None = None) -> str:
    def md_table(header, body):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body])

    headline, checks = verdict(evals, warnings)
    parts = [f"# Evaluation report: {', '.join(e.label for e in evals)}", "", f"**{headline}**", ""]
    if checks:
        parts += [md_table(["criterion", evals[0].label, evals[-1].label, "target", "verdict"], targets.rows(checks)),
                  ""]
    if warnings:
        parts += ["**Not comparable (rows marked †):** " + "; ".join(warnings), ""]
    if choice:
        text, header, body = selection(choice)
        parts += [text, "", md_table(header, body), ""]
    collapse = [r for r in rs if r.group == "collapse" and r.section == "overall"]
    parts += [md_table(*table(evals, [r for r in rs if r.group == "metrics"])), "",
              "Collapse metrics, all responses (per suite in the HTML report):", "", md_table(*table(evals, collapse)),
              "", "Values with 95% intervals (Wilson for rates, bootstrap for means); Δ against the first folder, "
              f"'{WORSE.strip()}' when worse beyond its interval.", "", md_table(*extra_rows(evals)), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _err(est: dict, scale: float = 1.0) -> tuple[float, list[list[float]]]:
    v = est["value"] * scale
    if est.get("low") is None:
        return v, [[0.0], [0.0]]
    # max(0, ...): Wilson bounds can sit a rounding error inside the value at 0% or 100%
    return v, [[max(0.0, v - est["low"] * scale)], [max(0.0, est["high"] * scale - v)]]


def plot_safety(evals: Sequence[EvalDir]) -> str | None:
    """ASR against over-refusal per folder (overall), with 95% intervals on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    drawn = False
    for i, e in enumerate(evals):
        m = e.summary["overall"]["metrics"]
        x = m.get("over_refusal")
        for key, marker in (("asr_keyword", "o"), ("asr_rubric", "s")):
            y = m.get(key)
            if not x or not y or x["value"] is None or y["value"] is None:
                continue
            xv, xe = _err(x, 100)
            yv, ye = _err(y, 100)
            ax.errorbar(xv, yv, xerr=xe, yerr=ye, fmt=marker, color=f"C{i}", capsize=3,
                        mfc="none" if key == "asr_rubric" else f"C{i}",
                        label=f"{e.label} ({'keyword' if key == 'asr_keyword' else 'rubric'})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("over-refusal on safe prompts (%)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Harmlessness vs over-refusal (lower-left is better)")
    return _png(fig)


def plot_collapse(evals: Sequence[EvalDir]) -> str:
    """One panel per collapse metric, a bar per folder with its 95% interval (all responses pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(12, 5.2))
    for ax, name in zip(axes.flat, PLOT_COLLAPSE):
        for i, e in enumerate(evals):
            est = e.summary["overall"]["collapse"].get(name)
            if est and est["value"] is not None:
                v, err = _err(est)
                ax.bar(i, v, yerr=err, color=f"C{i}", capsize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(evals)), [e.label for e in evals], fontsize=7, rotation=20)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("Collapse metrics (all responses)")
    fig.tight_layout()
    return _png(fig)


def plot_mtbench(evals: Sequence[EvalDir]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [e for e in evals if "mtbench_turn1" in e.summary["overall"]["metrics"]]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, e in enumerate(evals):
        for t in (1, 2):
            est = e.summary["overall"]["metrics"].get(f"mtbench_turn{t}")
            if est and est["value"] is not None:
                v, err = _err(est)
                ax.bar(i * 3 + t - 1, v, yerr=err, color=f"C{i}", alpha=1.0 if t == 1 else 0.55, capsize=3)
    ax.set_xticks([i * 3 + 0.5 for i in range(len(evals))], [e.label for e in evals], fontsize=8)
    ax.set_ylim(0, 10)
    ax.set_ylabel("score 1-10 (turn 1 dark, turn 2 light)")
    ax.set_title("MT-Bench-style helpfulness")
    return _png(fig)


def loss_curves(rows: Sequence[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{"loss": (steps, values), "val_loss": ...} from metrics.jsonl rows; a step logged twice keeps its last value."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        for key in ("loss", "val_loss"):
            if isinstance(r.get(key), (int, float)) and "step" in r:
                out.setdefault(key, {})[int(r["step"])] = float(r[key])
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in out.items()}


def plot_training(runs: dict[str, list[dict]]) -> str | None:
    """Loss against step, one panel per training folder (train loss as a line, validation loss as dots)."""
    curves = {label: c for label, rows in runs.items() if (c := loss_curves(rows))}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.5), squeeze=False)
    for ax, (label, c) in zip(axes[0], curves.items()):
        if "loss" in c:
            ax.plot(*c["loss"], color="C0", lw=1.2, label="train loss")
        if "val_loss" in c:
            ax.plot(*c["val_loss"], "o-", color="C3", ms=4, label="validation loss")
        ax.set_title(f"{label}: loss", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- html


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f0}td.num{font-variant-numeric:tabular-nums}.warn{background:#fff3cd;border:1px solid #e0c060;
padding:.6em 1em}.ex{border:1px solid #ddd;margin:.6em 0;padding:.5em 1em}pre{white-space:pre-wrap;margin:.2em 0;
font-size:12px;background:#fafafa;padding:.4em}.tag{font-size:11px;color:#555}img{max-width:100%;margin:.5em 0}
.verdict{font-size:1.25em;font-weight:600;padding:.5em 1em;border-radius:4px}.verdict.pass{background:#e3f4e1;
color:#1e6b1e}.verdict.fail{background:#fde2e1;color:#9b1c1c}.verdict.none{background:#eee}
tr.fail td{background:#fde2e1}td.fail{color:#9b1c1c;font-weight:700}td.pass{color:#1e6b1e}
td.worse{background:#fde2e1;color:#9b1c1c;font-weight:600}table.side{width:100%;table-layout:fixed}
table.side td{vertical-align:top}table.side td.prompt{background:#f7f7f7}"""


def _cell_class(text: str) -> str:
    """A failed target, a passed one, or a regressed delta (their text says so too, for the markdown twin)."""
    return {"FAIL": "fail", "pass": "pass"}.get(text, "worse" if text.endswith(WORSE) else "")


def _html_table(header: list[str], body: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    b = "".join(("<tr class='fail'>" if "FAIL" in row else "<tr>")
                + "".join(f"<td class='num {_cell_class(c)}'>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in body)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def _tags(rec: dict) -> str:
    v = rec.get("verdicts", {})
    tags = []
    for name, verdict in v.items():
        for x in verdict if isinstance(verdict, list) else [verdict]:
            tags.append(f"{name}: {x.get('label') or x.get('score') if x.get('ok') else 'judge failed'}")
    return "; ".join(tags)


def pick_examples(recs: dict[str, dict], per_category: int) -> list[str]:
    """The ids of the first `per_category` records of each category, in file order."""
    seen: dict[str, int] = {}
    out = []
    for rid, rec in recs.items():
        cat = rec.get("category", "")
        if seen.get(cat, 0) < per_category:
            seen[cat] = seen.get(cat, 0) + 1
            out.append(rid)
    return out


def _answer_cell(r: dict | None, max_chars: int) -> str:
    if r is None:
        return "<td class='tag'>not evaluated</td>"
    texts = [t.strip() or "(empty response)" for t in r.get("responses") or [r.get("response", "")]]
    shown = "\n\n--- next turn ---\n\n".join(t[:max_chars] + ("…" if len(t) > max_chars else "") for t in texts)
    return f"<td><span class='tag'>{html.escape(_tags(r))}</span><pre>{html.escape(shown)}</pre></td>"


def side_by_side(evals: Sequence[EvalDir], per_category: int = 1, max_chars: int = 700) -> str:
    """Per suite, a table with a row per prompt (a few per category, from the first folder): the prompt, then each
    folder's answer with its judges' verdicts. Every text is escaped."""
    out = []
    width = f"{100 / (len(evals) + 1):.0f}%"
    for suite, recs in evals[0].records.items():
        ids = pick_examples(recs, per_category)
        if not ids:
            continue
        head = "".join(f"<th style='width:{width}'>{html.escape(x)}</th>" for x in ["prompt", *(e.label for e in evals)])
        body = []
        for rid in ids:
            rec = recs[rid]
            turns = rec.get("turns") or [rec.get("prompt", "")]
            prompt = "".join(f"<p><b>User{f' (turn {i + 1})' if len(turns) > 1 else ''}:</b> {html.escape(t)}</p>"
                             for i, t in enumerate(turns))
            cells = "".join(_answer_cell(e.records.get(suite, {}).get(rid), max_chars) for e in evals)
            body.append(f"<tr data-id='{html.escape(rid, quote=True)}'><td class='prompt'><div class='tag'>"
                        f"{html.escape(rec.get('category', ''))} · {html.escape(rid)}</div>{prompt}</td>{cells}</tr>")
        out.append(f"<h3>{html.escape(suite)}</h3><table class='side'><thead><tr>{head}</tr></thead>"
                   f"<tbody>{''.join(body)}</tbody></table>")
    return "\n".join(out) or "<p class='tag'>none (examples = 0)</p>"


def _verdict_html(evals: Sequence[EvalDir], warnings: Sequence[str]) -> str:
    headline, checks = verdict(evals, warnings)
    kind = "none" if not any(c.ok is not None for c in checks) else "pass" if targets.passed(checks) else "fail"
    out = f"<h2>Verdict</h2><p class='verdict {kind}'>{html.escape(headline)}</p>"
    if checks:
        out += _html_table(["criterion", evals[0].label, evals[-1].label, "target", "verdict"], targets.rows(checks))
    return out


def selection(choice: dict) -> tuple[str, list[str], list[list[str]]]:
    """The select stage's choice.json as (one sentence, header, rows): every DPO checkpoint's numbers on the held-out
    train prompts, in step order, the base first and the chosen one marked."""
    held = choice["held_out"]
    text = (f"The final adapter is DPO step {choice['step']} of {max(choice['of_steps'])}: of the checkpoints, the one "
            f"that meets the most targets on {held['harm']} harmful and {held['safe']} safe train prompts that no "
            "stage read (ties: the one missing its failed ASR and over-refusal targets by the fewest points). The "
            "eval split was not used to choose it.")
    header = ["model", "ASR (held-out harmful)", "over-refusal (held-out safe)", "targets met", "fails", "missed by"]
    pct = lambda v: f"{v:.1%}"  # noqa: E731
    body = [["base", pct(choice["base"]["asr"]), pct(choice["base"]["over_refusal"]), "", "", ""]]
    for r in sorted(choice["ranking"], key=lambda r: r["name"]):
        mark = " (chosen)" if r["name"] == choice["chosen"] else ""
        missed = f"{r['excess'] * 100:.1f} pts" if r.get("excess") else "–"
        body.append([f"dpo {r['name']}{mark}", pct(r["asr"]), pct(r["over_refusal"]), f"{r['passed']} of {r['judged']}",
                     ", ".join(r["failed"]) or "–", missed])
    return text, header, body


def _selection_html(choice: dict | None) -> str:
    if not choice:
        return ""
    text, header, body = selection(choice)
    return f"<h2>Which DPO checkpoint</h2><p>{html.escape(text)}</p>{_html_table(header, body)}"


def render_html(evals: Sequence[EvalDir], rs: Sequence[Row], warnings: Sequence[str], per_category: int = 1,
                training: dict[str, list[dict]] | None = None, choice: dict | None = None) -> str:
    """The page: verdict, the DPO checkpoint chosen (`choice`: the select stage's choice.json), answers side by side,
    metric tables, plots, training curves (`training`: label -> metrics.jsonl rows)."""
    plots = [p for p in (plot_safety(evals), plot_collapse(evals), plot_mtbench(evals)) if p]
    curves = plot_training(training or {})
    title = f"Evaluation report: {', '.join(e.label for e in evals)}"
    warn = ("<div class='warn'><b>Not comparable (rows marked †):</b><ul>"
            + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>") if warnings else ""
    imgs = "".join(f"<img alt='plot' src='data:image/png;base64,{p}'>" for p in plots)
    train = (f"<h2>Training curves</h2><img alt='training curves' src='data:image/png;base64,{curves}'>"
             if curves else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{_verdict_html(evals, warnings)}{warn}"
            f"{_selection_html(choice)}"
            f"<h2>Answers side by side</h2>{side_by_side(evals, per_category)}"
            f"<h2>Safety and helpfulness</h2>{_html_table(*table(evals, [r for r in rs if r.group == 'metrics']))}"
            f"<h2>Collapse</h2>{_html_table(*table(evals, [r for r in rs if r.group == 'collapse']))}"
            "<p class='tag'>95% intervals: Wilson for rates, seeded percentile bootstrap for means; distinct-n is "
            "pooled over responses and has none. Δ is against the first folder (pp = percentage points); "
            f"'{WORSE.strip()}' marks a value worse than the first folder's beyond its 95% interval.</p>"
            f"{_html_table(*extra_rows(evals))}<h2>Plots</h2>{imgs}{train}</body></html>")


@dataclass
class ReportConfig:
    """What to compare and how."""

    dirs: list[str] = opt([], "evaluation folders; the first is the baseline of the deltas")
    output: str = opt("report.html", "HTML file; a .md twin goes beside it")
    allow_mixed: bool = opt(False, "compare folders evaluated differently (suites, split, judge, sampling), "
                                   "with the affected rows marked †")
    examples: int = opt(1, "example responses per category")
    training: list[str] = opt([], "training folders (e.g. runs/NAME/sft,runs/NAME/dpo) whose metrics.jsonl is "
                                  "plotted as loss curves")
    selection: str | None = opt(None, "the select stage's choice.json: which DPO checkpoint is final, and why")

    def __post_init__(self):
        if isinstance(self.dirs, str):
            self.dirs = [d.strip() for d in self.dirs.split(",") if d.strip()]
        self.dirs = [str(d) for d in self.dirs]
        if isinstance(self.training, str):
            self.training = [d.strip() for d in self.training.split(",") if d.strip()]
        self.training = [str(d) for d in self.training]
        if not self.dirs:
            raise ValueError("report needs at least one evaluation folder")
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0, got {self.examples}")


def load_training(dirs: Sequence[str | Path]) -> dict[str, list[dict]]:
    """label -> metrics.jsonl rows of each training folder that has one; a line cut short by a kill is skipped."""
    paths = [Path(d) for d in dirs]
    missing = [p for p in paths if not p.is_dir()]
    if missing:
        raise ValueError(f"training folder {missing[0]} does not exist")
    out = {}
    for p, label in zip(paths, _labels(paths) if paths else []):
        f = p / "metrics.jsonl"
        if f.exists():
            out[label] = [r for line in f.read_text(encoding="utf-8").splitlines() if (r := _json_line(line))]
    return out


def _json_line(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def run(config: ReportConfig, progress: Progress | None = None) -> Path:
    """Write OUT.html and OUT.md comparing config.dirs (the first is the baseline of the deltas and the targets, the
    last the model judged), with the loss curves of config.training. Returns OUT.html."""
    dirs, allow_mixed, per_category = config.dirs, config.allow_mixed, config.examples
    evals = load(dirs)
    warnings, mixed = mismatches(evals)
    if warnings and not allow_mixed:
        raise ValueError(f"cannot compare: {warnings[0]}" + (f" (and {len(warnings) - 1} more)" if len(warnings) > 1
                         else "") + "; evaluate them alike, or pass --allow-mixed to compare with marked rows")
    rs = rows(evals, mixed)
    out = Path(config.output)
    choice = records.read_json(Path(config.selection)) if config.selection else None
    records.write_text_atomic(out, render_html(evals, rs, warnings, per_category, load_training(config.training),
                                               choice))
    records.write_text_atomic(out.with_suffix(".md"), markdown(evals, rs, warnings, choice))
    return out
