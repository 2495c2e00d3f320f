"""The comparison report: the verdict first, answers side by side, tables with intervals, deltas and regressions,
embedded PNG plots and training curves, mixed-suite refusal, rendering."""

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
    assert "Answers side by side" in html and "illegal_activity" in html
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Evaluation report") and "| suite | metric | base/eval | dpo/eval | Δ dpo/eval |" in md
    assert "ASR (keyword)" in md
    headline, _ = report.verdict(report.load(eval_dirs), [])
    assert "(dpo/eval against base/eval)" in headline and f"**{headline}**" in md
    assert "| over-refusal (benign) |" in md and "| non_termination_rate |" in md


def test_llm_judged_folders_get_rubric_rows_and_mtbench_plot(tmp_path, judge_server):
    model = str(make_tiny_model(tmp_path / "tiny"))
    cfg = evaluate.EvalConfig(output=str(tmp_path / "a" / "eval"), model=model, suites=("harm", "benign", "mtbench"),
                              limit=2, max_tokens=4, temperature=1.0, judge=f"openai:judge@{judge_server.url}")
    evaluate.run(cfg)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same evaluation under another name compares cleanly
    html = report.run(ReportConfig(dirs=[str(d) for d in [tmp_path / "a" / "eval", tmp_path / "b" / "eval"]], output=str(tmp_path / "r.html"))).read_text()
    for label in ("ASR (overseer judge)", "harm score 1-5", "MT-Bench turn 1", "MT-Bench turn 2"):
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
    row = side_rows(html)[recs[0]["id"]]  # in the side-by-side row of its prompt, beside the base model's answer
    assert "&lt;script&gt;alert(1)" in row[2] and "alert(1)" not in row[1]


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


# ---------------------------------------------------------------- hand-made evaluation folders (no model)


def fake_eval(path: Path, *, refuse_harm: bool, refuse_benign: bool, n: int = 6, prompt_extra: str = "") -> Path:
    """An evaluation folder as mlx_cai.stages.evaluate writes it, from hand-made records (two categories a suite)."""
    path.mkdir(parents=True)
    recs = {}
    for suite, kind, refuse in (("harm", "harmful", refuse_harm), ("benign", "safe", refuse_benign)):
        recs[suite] = []
        for i in range(n):
            rid = f"{suite}-{i}"
            text = (f"I cannot help with {rid}." if refuse else
                    f"Sure, here is how ({rid}): first you take the steps you asked about, then the rest.")
            recs[suite].append({"id": rid, "suite": suite, "category": f"cat{i % 2}", "kind": kind,
                                "prompt": f"question {rid}{prompt_extra}", "response": text, "finish_reason": "stop",
                                "completion_tokens": 12, "gen_seconds": 0.1,
                                "verdicts": {"keyword": {"judge": "keyword", "ok": True, "raw": "",
                                                         "label": "refusal" if refuse else "answer"}}})
        (path / f"{suite}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[suite]))
    summary = evaluate.summarize(recs)
    summary["provenance"] = {"model": "m", "adapter": None, "judge": "keyword", "split": "eval", "max_tokens": 16,
                             "temperature": 0.0, "harm_threshold": 5,
                             "suites": {s: {"source": s, "n": n, "items_hash": f"h-{s}"} for s in recs}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def base_dir(tmp_path):
    return fake_eval(tmp_path / "base", refuse_harm=False, refuse_benign=False, prompt_extra=" <b>bold</b>")


def side_rows(html: str) -> dict[str, list[str]]:
    """Prompt id -> the cells of its side-by-side row (prompt, then one per folder)."""
    return {rid: re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
            for rid, row in re.findall(r"<tr data-id='([^']+)'>(.*?)</tr>", html, re.S)}


def test_verdict_leads_and_a_failing_target_is_marked(base_dir, tmp_path):
    final = fake_eval(tmp_path / "final", refuse_harm=True, refuse_benign=True)  # refuses everything
    html = report.run(ReportConfig(dirs=[str(base_dir), str(final)], output=str(tmp_path / "r.html"))).read_text()
    verdict = re.search(r"<p class='verdict (\w+)'>(.*?)</p>", html)
    assert verdict.group(1) == "fail" and re.fullmatch(r"1 of \d+ targets not met \(final against base\): "
                                                       r"over-refusal \(benign\)", verdict.group(2))
    assert html.index("verdict fail") < html.index("Answers side by side") < html.index("Safety and helpfulness")
    failed = re.findall(r"<tr class='fail'>(.*?)</tr>", html)
    assert len(failed) == 1 and "over-refusal (benign)" in failed[0] and "class='num fail'>FAIL<" in failed[0]
    asr = re.search(r"<tr>(<td[^>]*>ASR \(keyword\)</td>.*?)</tr>", html).group(1)  # passed: not marked
    assert "class='num pass'>pass<" in asr
    md = (tmp_path / "r.md").read_text()
    assert md.index("**1 of") < md.index("| over-refusal (benign) | 0.0% | 100.0% |") < md.index("| suite | metric")
    assert "| FAIL |" in md


def test_regressions_are_marked_in_the_metric_tables(base_dir, tmp_path):
    final = fake_eval(tmp_path / "final", refuse_harm=True, refuse_benign=True)
    html = report.run(ReportConfig(dirs=[str(base_dir), str(final)], output=str(tmp_path / "r.html"))).read_text()
    metrics = html[html.index("<h2>Safety and helpfulness"):html.index("<h2>Collapse")]
    cells = {tuple(re.findall(r"<td[^>]*>(.*?)</td>", r)[:2]): r for r in re.findall(r"<tr>(.*?)</tr>", metrics)}
    assert "class='num worse'>+100.0 pp (worse)<" in cells[("benign", "over-refusal")]  # 0/6 -> 6/6 refused
    assert "worse" not in cells[("harm", "ASR (keyword)")]  # 100% -> 0%: better, not marked
    assert "| benign | over-refusal | 0.0% [0.0, 39.0] | 100.0% [61.0, 100.0] | +100.0 pp (worse) |" in \
        (tmp_path / "r.md").read_text()


def test_all_targets_met_and_nothing_marked(base_dir, tmp_path):
    final = fake_eval(tmp_path / "final", refuse_harm=True, refuse_benign=False)  # refuses only the harmful
    html = report.run(ReportConfig(dirs=[str(base_dir), str(final)], output=str(tmp_path / "r.html"))).read_text()
    assert "<p class='verdict pass'>All targets met (final against base).</p>" in html
    assert "<tr class='fail'>" not in html and "num worse" not in html
    md = (tmp_path / "r.md").read_text()
    assert md.split("\n")[2] == "**All targets met (final against base).**" and "(worse) |" not in md


def test_one_folder_has_nothing_to_compare(base_dir, tmp_path):
    html = report.run(ReportConfig(dirs=[str(base_dir)], output=str(tmp_path / "r.html"))).read_text()
    assert "nothing to compare" in html and "<th>criterion</th>" not in html
    assert html.index("nothing to compare") < html.index("Safety and helpfulness")
    md = (tmp_path / "r.md").read_text()
    assert "nothing to compare" in md and "| criterion |" not in md


def test_answers_side_by_side_per_prompt(base_dir, tmp_path):
    final = fake_eval(tmp_path / "final", refuse_harm=True, refuse_benign=False)
    html = report.run(ReportConfig(dirs=[str(base_dir), str(final)], output=str(tmp_path / "r.html"),
                                   examples=2)).read_text()
    rows = side_rows(html)
    assert sorted(rows) == ["benign-0", "benign-1", "benign-2", "benign-3", "harm-0", "harm-1", "harm-2", "harm-3"]
    for rid, (prompt, base, tuned) in rows.items():  # the same prompt's answers, each in its folder's column
        assert f"question {rid} &lt;b&gt;bold&lt;/b&gt;" in prompt
        assert f"Sure, here is how ({rid})" in base and "keyword: answer" in base
        if rid.startswith("harm"):
            assert f"I cannot help with {rid}." in tuned and "keyword: refusal" in tuned
        else:
            assert f"Sure, here is how ({rid})" in tuned
    assert "<b>bold</b>" not in html


def test_training_curves_appear_only_with_metrics_jsonl(base_dir, tmp_path):
    final = fake_eval(tmp_path / "final", refuse_harm=True, refuse_benign=False)
    sft, dpo = tmp_path / "run" / "sft", tmp_path / "run" / "dpo"
    sft.mkdir(parents=True), dpo.mkdir()
    steps = [{"step": i, "loss": 3.0 - 0.2 * i, "learning_rate": 1e-4} for i in range(1, 11)]
    (sft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + json.dumps(
        {"step": 10, "val_loss": 2.5}) + "\n" + '{"step": 11, "lo')  # a line cut short by a kill
    dirs = [str(base_dir), str(final)]
    plain = report.run(ReportConfig(dirs=dirs, output=str(tmp_path / "a.html"))).read_text()
    empty = report.run(ReportConfig(dirs=dirs, output=str(tmp_path / "b.html"), training=[str(dpo)])).read_text()
    curves = report.run(ReportConfig(dirs=dirs, output=str(tmp_path / "c.html"),
                                     training=f"{sft},{dpo}")).read_text()
    assert "Training curves" not in plain and "Training curves" not in empty and len(pngs(empty)) == len(pngs(plain))
    assert "Training curves" in curves and len(pngs(curves)) == len(pngs(plain)) + 1
    assert curves.index("Training curves") > curves.index("Safety and helpfulness")
    with pytest.raises(ValueError, match="training folder .*nope does not exist"):
        report.run(ReportConfig(dirs=dirs, output=str(tmp_path / "d.html"), training=[str(tmp_path / "nope")]))


def test_loss_curves_from_metrics_rows():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "val_loss": 1.8}, {"step": 1, "loss": 1.9},
            {"step": 3, "grad_norm": 1.0}]
    assert report.loss_curves(rows) == {"loss": ([1, 2], [1.9, 1.5]), "val_loss": ([2], [1.8])}
    assert report.loss_curves([{"step": 1, "rewards/margin": 0.1}]) == {}


def test_pipeline_passes_the_training_folders_to_the_report(tmp_path):
    from mlx_cai.stages import REGISTRY, Layout

    paths = REGISTRY["report"].paths
    everything = paths(Layout(tmp_path, ("sft", "dpo", "eval-base", "eval-dpo", "report")), {})
    assert everything["training"] == [str(tmp_path / "sft"), str(tmp_path / "dpo")]
    assert everything["dirs"] == [str(tmp_path / "eval" / "base"), str(tmp_path / "eval" / "dpo")]
    assert paths(Layout(tmp_path, ("dpo", "eval-base", "report")), {})["training"] == [str(tmp_path / "dpo")]
