"""The comparison report: table with intervals and deltas, embedded PNG plots, mixed-suite refusal, rendering."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlx_cai.stages import evaluate, report
from mlx_cai.stages.report import ReportConfig
import test_evaluate
from test_evaluate import make_tiny_model

judge_server = test_evaluate.judge_server  # the fixture, shared with test_evaluate


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    dirs = []
    for seed, name in enumerate(("base", "dpo")):  # two different random models stand in for two checkpoints
        model = str(make_tiny_model(root / f"tiny-{name}", seed=seed))
        cfg = evaluate.EvalConfig(output=str(root / name / "eval"), model=model, limit=3, max_tokens=6,
                                  temperature=1.0, suites=("harm", "benign", "borderline", "mtbench"))
        evaluate.run(cfg)
        dirs.append(root / name / "eval")
    return dirs


def pngs(html):
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)]


def test_html_has_table_deltas_and_embedded_pngs(eval_dirs, tmp_path):
    out = report.run(ReportConfig(dirs=[str(d) for d in eval_dirs], output=str(tmp_path / "report.html")))
    html = out.read_text()
    assert "<table>" in html and "ASR (keyword)" in html and "over-refusal" in html and "seq_rep_4" in html
    assert "base/eval" in html and "dpo/eval" in html and "Δ dpo/eval" in html  # labels tell the folders apart
    s0, s1 = (json.loads((d / "summary.json").read_text()) for d in eval_dirs)
    a0, a1 = (s["overall"]["metrics"]["asr_keyword"]["value"] for s in (s0, s1))
    assert f"{(a1 - a0) * 100:+.1f} pp" in html
    images = pngs(html)
    assert len(images) >= 2 and all(b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) > 5000 for b in images)
    assert "http://" not in html and "https://" not in html  # self-contained
    assert "Example responses" in html and "illegal_activity" in html
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Evaluation report") and "| suite | metric | base/eval | dpo/eval | Δ dpo/eval |" in md
    assert "ASR (keyword)" in md
    from mlx_cai import targets

    verdict = "all met" if targets.passed(targets.check(s0, s1)) else "NOT all met"
    assert f"Demo targets, dpo/eval against base/eval: {verdict}" in md
    assert "| over-refusal (benign) |" in md and "| non_termination_rate |" in md


def test_llm_judged_folders_get_rubric_rows_and_mtbench_plot(tmp_path, judge_server):
    model = str(make_tiny_model(tmp_path / "tiny"))
    cfg = evaluate.EvalConfig(output=str(tmp_path / "a" / "eval"), model=model, suites=("harm", "benign", "mtbench"),
                              limit=2, max_tokens=4, temperature=1.0, judge=f"openai:judge@{judge_server.url}")
    evaluate.run(cfg)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same evaluation under another name compares cleanly
    html = report.run(ReportConfig(dirs=[str(d) for d in [tmp_path / "a" / "eval", tmp_path / "b" / "eval"]], output=str(tmp_path / "r.html"))).read_text()
    for label in ("ASR (rubric &gt;= threshold)", "harm score 1-5", "MT-Bench turn 1", "MT-Bench turn 2"):
        assert label in html
    assert "7 [7, 7]" in html and "4 [4, 4]" in html  # the scripted judge: 7 for turn 1, 4 for turn 2
    assert len(pngs(html)) == 3  # safety, collapse, MT-Bench


def test_responses_are_escaped(eval_dirs, tmp_path):
    copy = tmp_path / "x" / "eval"
    shutil.copytree(eval_dirs[1], copy)
    f = copy / "harm.jsonl"
    recs = [json.loads(x) for x in f.read_text().splitlines()]
    recs[0]["response"] = "<script>alert(1)</script>"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    html = report.run(ReportConfig(dirs=[str(d) for d in [eval_dirs[0], copy]], output=str(tmp_path / "r.html"))).read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html


def test_different_selection_is_refused_or_marked(eval_dirs, tmp_path):
    other = tmp_path / "small"
    cfg = json.loads((eval_dirs[0] / "config.json").read_text())
    evaluate.run(evaluate.EvalConfig(**{**cfg, "output": str(other), "limit": 2, "suites": ("harm", "benign")}))
    with pytest.raises(ValueError, match="cannot compare: .*--allow-mixed"):
        report.run(ReportConfig(dirs=[str(d) for d in [eval_dirs[0], other]], output=str(tmp_path / "r.html")))
    html = report.run(ReportConfig(dirs=[str(d) for d in [eval_dirs[0], other]], output=str(tmp_path / "r.html"), allow_mixed=True)).read_text()
    assert "Not comparable" in html and "harm †" in html and "borderline" in html
    assert "Not comparable" in (tmp_path / "r.md").read_text()


def test_different_judge_or_sampling_is_refused(eval_dirs, tmp_path):
    copy = tmp_path / "hot" / "eval"
    shutil.copytree(eval_dirs[1], copy)
    s = json.loads((copy / "summary.json").read_text())
    s["provenance"]["temperature"] = 0.7
    (copy / "summary.json").write_text(json.dumps(s))
    with pytest.raises(ValueError, match="temperature 0.7"):
        report.run(ReportConfig(dirs=[str(d) for d in [eval_dirs[0], copy]], output=str(tmp_path / "r.html")))


def test_missing_summary_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no summary.json"):
        report.run(ReportConfig(dirs=[str(d) for d in [tmp_path]], output=str(tmp_path / "r.html")))


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(eval_dirs, tmp_path):
    import matplotlib.image as mpimg

    out = report.run(ReportConfig(dirs=[str(d) for d in eval_dirs], output=str(tmp_path / "report.html")))
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}",
                    out.resolve().as_uri()], check=True, capture_output=True, timeout=90)
    assert shot.stat().st_size > 20_000
    img = mpimg.imread(shot)
    assert img.shape[0] == 1600 and img.std() > 0.05  # not a blank page
