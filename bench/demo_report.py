"""BENCHMARKS.md sections from finished pipeline runs: the demo's stage wall times and result, ablations beside it,
and the SL-CAI data it made (issue 4's measured outcome: kept share, reasons, refusal rate and distinct-2 of the
kept revisions, revisions per minute).

  python bench/demo_report.py runs/demo [runs/demo-noclean ...] [--write] [--out BENCHMARKS.md]

The first run is the demo; every run's final model is compared with its own base evaluation (mlx_cai.targets).
Reads only the run folders (stage markers, eval summaries, revise.jsonl, clean/summary.json); runs nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mlx_cai import backend, metrics, records, targets
from mlx_cai.refusal import is_refusal

ROOT = Path(__file__).resolve().parents[1]
DEMO = "## The demo run: stage wall time and result (bench/demo_report.py)"
DATA = "## SL-CAI data of the demo (bench/demo_report.py)"
STAGES = ("revise", "clean", "sft", "feedback", "dpo", "eval-base", "eval-sft", "eval-dpo", "report")


def markers(run: Path) -> dict[str, dict]:
    out = {}
    for s in STAGES:
        m = run / "stages" / f"{s}.json"
        if m.exists():
            out[s] = json.loads(m.read_text())
    return out


def summary(run: Path, which: str) -> dict | None:
    f = run / "eval" / which / "summary.json"
    return json.loads(f.read_text()) if f.exists() else None


def final_eval(run: Path) -> tuple[str, dict | None]:
    for which in ("dpo", "sft"):
        s = summary(run, which)
        if s:
            return which, s
    return "-", None


TIMING = ("gen_seconds", "tok_per_s", "seconds", "judge_seconds", "finished", "started", "written")


def untimed(x):
    """A summary without its timing fields: two evaluations of the same model and prompts then compare equal."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k not in TIMING}
    return [untimed(v) for v in x] if isinstance(x, list) else x


def pct(est: dict | None) -> str:
    if not est or est.get("value") is None:
        return "–"
    lo, hi = est.get("low"), est.get("high")
    return f"{est['value']:.1%}" + (f" [{lo * 100:.1f}, {hi * 100:.1f}]" if lo is not None else "")


def num(est: dict | None) -> str:
    return "–" if not est or est.get("value") is None else f"{est['value']:.3g}"


def result_rows(run: Path, skip_base: bool = False) -> list[list[str]]:
    """One row per evaluated model of a run: ASR, over-refusal per suite, collapse, verdict vs its base."""
    base = summary(run, "base")
    rows = []
    for which in ("base", "sft", "dpo"):
        s = summary(run, which)
        if not s or (which == "base" and skip_base):
            continue
        o, su = s["overall"], s["suites"]
        verdict = "" if which == "base" or not base else (
            "met" if targets.passed(targets.check(base, s)) else
            "not met: " + ", ".join(c.name for c in targets.check(base, s) if c.ok is False))
        rows.append([run.name, which, pct(o["metrics"].get("asr_keyword")),
                     pct(su.get("benign", {}).get("metrics", {}).get("over_refusal")),
                     pct(su.get("borderline", {}).get("metrics", {}).get("over_refusal")),
                     pct(o["collapse"].get("phrase_repeat_rate")), pct(o["collapse"].get("non_termination_rate")),
                     num(o["collapse"].get("seq_rep_4")),
                     num(o["collapse"].get("distinct_2")), num(o["collapse"].get("mean_length_words")), verdict])
    return rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def demo_section(runs: list[Path]) -> str:
    demo = runs[0]
    ms = markers(demo)
    total = sum(m["seconds"] for m in ms.values())
    loads = [m.get("load_avg_15min") for m in ms.values() if m.get("load_avg_15min") is not None]
    stage_rows = [[s, f"{m['seconds'] / 60:.1f}", f"{m['seconds'] / total:.0%}", m.get("finished", "")]
                  for s, m in ms.items()]
    stage_rows.append(["total", f"{total / 60:.1f}", "100%", ""])
    header = ["run", "model", "ASR (keyword, harm eval)", "over-refusal benign", "over-refusal borderline",
              "phrase repeat", "non-termination", "seq_rep_4", "distinct-2", "mean words", "targets vs base"]
    same_base = lambda run: untimed(summary(run, "base")) == untimed(summary(demo, "base"))  # noqa: E731
    rows = [r for i, run in enumerate(runs) for r in result_rows(run, skip_base=i > 0 and same_base(run))]
    base, final = summary(demo, "base"), final_eval(demo)
    checks = targets.check(base, final[1]) if base and final[1] else []
    load = f"15-min load average at stage ends {min(loads):.1f}-{max(loads):.1f}" if loads else "load not recorded"
    return "\n".join([
        DEMO, "",
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{demo}` "
        f"(config `{demo / 'config.yaml'}`). Machine: {backend.cpu_model()}, {_cores()} cores; {load}.",
        "Command: `make demo` (= `mlx-cai run configs/demo.yaml --name demo`).", "",
        md_table(["stage", "minutes", "share", "finished"], stage_rows), "",
        *([bound_by(demo, ms, total), ""] if ms else []),
        f"Targets of the final model ({final[0]}) against the base model, shipped eval splits, keyword judge:", "",
        md_table(["criterion", "base", final[0], "target", "verdict"], targets.rows(checks)) if checks else "(no eval)",
        "",
        "All runs (each final model judged against its own base evaluation; an ablation that reuses the demo's "
        "base evaluation shows no base row; intervals are Wilson 95%):", "",
        md_table(header, rows), "",
        *[f"- `{run.name}`: {overrides(run, demo)} (earlier stages' outputs reused from `{demo.name}`)"
          for run in runs[1:]], ""])


def bound_by(run: Path, ms: dict[str, dict], total: float) -> str:
    """Which model the largest stage waits on, and the share of the run the overseer's stages take."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    model = cfg.get("model")
    roles = {"revise": cfg.get("revise", {}).get("critic"), "clean": cfg.get("clean", {}).get("helpful_model"),
             "feedback": cfg.get("feedback", {}).get("boundary_model")}
    big = max(ms, key=lambda s: ms[s]["seconds"])
    other = {s: m for s, m in roles.items() if m and m != model and s in ms}
    if not other:
        return (f"{big} is the largest stage ({ms[big]['seconds'] / total:.0%}); {model} plays every role, so "
                "generation by the responder bounds it.")
    names = sorted(set(other.values()))
    share = sum(ms[s]["seconds"] for s in other) / total
    return (f"{big} is the largest stage ({ms[big]['seconds'] / total:.0%}). The stages where {', '.join(names)} "
            f"writes ({', '.join(other)}) take {share:.0%} of the run: on a CPU its prefill and decode "
            f"(~3 GFLOP per token) bound them, not the {model} responder or training.")


def overrides(run: Path, demo: Path) -> str:
    """The settings in which `run`'s resolved config differs from the demo's (name and paths aside)."""
    import yaml

    def flat(d: dict, pre: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    a, b = (flat(yaml.safe_load((r / "config.yaml").read_text())) for r in (run, demo))
    diff = [f"{k}={json.dumps(a.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "name"]
    return ", ".join(diff) or "none"


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def data_section(run: Path) -> str:
    recs = list(records.read_jsonl(run / "revise.jsonl"))
    s = json.loads((run / "clean" / "summary.json").read_text())
    kept = list(records.read_jsonl(run / "clean" / "kept.jsonl"))
    m = markers(run)
    secs = m.get("revise", {}).get("seconds")
    cfg = m.get("revise", {}).get("config", {})

    def rates(texts: list[str]) -> list[str]:
        if not texts:
            return ["0", "–", "–", "–"]
        return [str(len(texts)), f"{sum(map(is_refusal, texts)) / len(texts):.1%}",
                f"{metrics.distinct_n(texts, 2):.3f}", f"{sum(len(metrics.words(t)) for t in texts) / len(texts):.0f}"]

    reasons = sorted(s["reasons"].items(), key=lambda kv: -kv[1])
    return "\n".join([
        DATA, "",
        f"From `{run}`: {len(recs)} shipped `train` harmful prompts, {cfg.get('rounds')} round, {cfg.get('shots')} "
        f"shots, framing {cfg.get('framing', 'conversation')}, max_tokens {cfg.get('max_tokens')}, temperature "
        f"{cfg.get('temperature') or 'greedy'}, repetition penalty {cfg.get('repetition_penalty')}, batch "
        f"{cfg.get('batch_size')}, critic {cfg.get('critic') or 'the responder itself'}. "
        f"Machine: {backend.cpu_model()}, {_cores()} cores.",
        (f"Revise: {secs / 60:.1f} min = **{len(recs) / secs * 60:.1f} revisions/min** (initial answer and "
         "revision per prompt)." if secs else "Revise time not recorded."), "",
        f"Kept by `clean`: **{s['kept']}/{s['records']} = {s['kept_share']:.1%}**. Records failing each rule "
        "(a record can fail several):", "",
        md_table(["rule", "records", "share"], [[k, v, f"{v / s['records']:.0%}"] for k, v in reasons]), "",
        md_table(["texts", "n", "keyword refusal rate", "distinct-2", "mean words"],
                 [["kept revisions", *rates([r["revision"] for r in kept])],
                  ["all revisions", *rates([r["revision"] for r in recs])],
                  ["initial answers", *rates([r["initial"] for r in recs])]]), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the demo")
    ap.add_argument("--write", action="store_true", help="write/replace the two sections in BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    blocks = {DEMO: demo_section(args.runs), DATA: data_section(args.runs[0])}
    for block in blocks.values():
        print(block)
    if args.write:
        from sections import replace_section

        for title, block in blocks.items():
            replace_section(args.out, title, block)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
