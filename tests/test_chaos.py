"""The chaos harness (bench/chaos.py), small: the tiny pipeline SIGKILLed 3 times (by the clock and inside file
writes) and Ctrl-C'd once, each rerun to the end, gives what an uninterrupted run gives (~40 s on 2 cores)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import chaos  # noqa: E402
import chaos_compare  # noqa: E402


def test_killed_and_interrupted_runs_match_an_uninterrupted_one(tmp_path):
    res = chaos.run(kills=3, sigints=1, seed=3, work=tmp_path, write_share=0.6, log=lambda line: None)
    kills = [k for t in res["trials"] for k in t["kills"]]
    problems = [f for t in res["trials"] + res["sigints"] for f in t["failures"] + t.get("differences", [])]
    assert problems == [] and res["ok"]
    assert len(kills) == 3 and all(k["stage"] in (*chaos.STAGES, "after report") for k in kills)
    [ctrl_c] = res["sigints"]
    assert ctrl_c["rc"] in (0, 130)  # 0: the run was through before the signal came
    if ctrl_c["rc"] == 130:
        assert ctrl_c["message"].startswith("error: interrupted; rerun the same command")
    table = chaos.markdown(res)
    assert table.startswith("## Chaos") and "| B1 | " in table and "identical" in table


def test_the_checks_see_torn_files_and_differences(tmp_path):
    """The harness's own checks fail when they should (else a passing chaos run would prove nothing)."""
    a, b = tmp_path / "A" / "runs" / "t", tmp_path / "B" / "runs" / "t"
    for root, loss in ((a, 0.5), (b, 0.7)):
        (root / "sft").mkdir(parents=True)
        (root / "revise.jsonl").write_text('{"id": "x", "gen_seconds": 1.0}\n{"id": "y"}\n')
        (root / "sft" / "metrics.jsonl").write_text(f'{{"step": 1, "loss": {loss}, "seconds": 0.1}}\n')
    assert chaos_compare.differences(a, b) == ["sft/metrics.jsonl[0].loss: 0.5 vs 0.7"]
    (b / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "seconds": 9.0}\n')
    assert chaos_compare.differences(a, b) == []  # timing fields do not count
    (b / "revise.jsonl").write_text('{"id": "x"}\n{"id": "x"}\n{"id": "y"}\n{"id": "z", "tr')
    assert chaos_compare.torn(b) == []  # a torn JSONL tail is what a kill may leave
    assert chaos_compare.unfinished(b) == ["revise.jsonl: torn last line", "revise.jsonl: duplicate ids ['x']"]
    (b / "sft" / "summary.json").write_text('{"steps": 3, "la')
    (b / "sft" / "adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert [t.split(":")[0] for t in chaos_compare.torn(b)] == ["sft/adapters.safetensors", "sft/summary.json"]
