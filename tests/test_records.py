"""JSONL records: line-numbered errors, torn-tail repair, append-and-resume."""

import json

import pytest

from mlx_cai import records


def test_read_reports_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1}\n\n{"id": 2\n')
    with pytest.raises(records.RecordError, match=r"x.jsonl:3: malformed JSON"):
        list(records.read_jsonl(p))
    p.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(records.RecordError, match=r"x.jsonl:2: expected a JSON object"):
        list(records.read_jsonl(p))
    p.write_text('{"id": 1}\n{"x": 2}\n')
    with pytest.raises(records.RecordError, match=r"x.jsonl:2: missing field\(s\) id"):
        list(records.read_jsonl(p, required=["id"]))


def test_torn_tail_is_dropped_and_complete_tail_kept(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b", "te')
    assert records.repair_tail(p) > 0
    assert p.read_text() == '{"id": "a"}\n'
    p.write_text('{"id": "a"}\n{"id": "b"}')  # complete record, only the newline missing
    assert records.repair_tail(p) == 0
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_writer_appends_after_repair_and_done_ids(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b", "te')
    with records.JsonlWriter(p) as w:
        w.write({"id": "c"})
    assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == ["a", "c"]
    assert records.done_ids(p) == {"a", "c"}


def test_stable_id_depends_only_on_inputs():
    assert records.stable_id("x", 1) == records.stable_id("x", 1)
    assert records.stable_id("x", 1) != records.stable_id("x", 2)
    assert records.stable_id({"b": 1, "a": 2}) == records.stable_id({"a": 2, "b": 1})


def test_atomic_write_leaves_no_temp(tmp_path):
    p = records.write_jsonl_atomic(tmp_path / "d" / "f.jsonl", [{"id": 1}, {"id": 2}])
    assert len(p.read_text().splitlines()) == 2
    assert [x.name for x in p.parent.iterdir()] == ["f.jsonl"]


def test_writer_of_a_non_main_process_writes_nothing(tmp_path):
    from mlx_cai import records

    with records.writer(tmp_path / "a.jsonl", enabled=False) as w:
        w.write({"id": "x"})
    assert not (tmp_path / "a.jsonl").exists()
    with records.writer(tmp_path / "b.jsonl") as w:
        w.write({"id": "x"})
    assert list(records.read_jsonl(tmp_path / "b.jsonl")) == [{"id": "x"}]


def test_sweep_stale_removes_temporaries_of_dead_writers_only(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has exited
    (tmp_path / "sft").mkdir()
    stale = [tmp_path / f".pairs.jsonl.tmp-{dead}", tmp_path / "sft" / f".adapters.safetensors.tmp-{dead}.safetensors"]
    stale_dir = tmp_path / f".fused.tmp-{dead}"
    live = tmp_path / f".summary.json.tmp-{os.getpid()}"
    keep = [tmp_path / "pairs.jsonl", tmp_path / ".hidden.tmp-notapid", live]
    for p in stale + keep:
        p.write_text("x")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_text("x")
    removed = records.sweep_stale(tmp_path)
    assert sorted(removed) == sorted(stale + [stale_dir])
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale + [stale_dir])


def test_read_complete_skips_a_torn_tail_without_touching_the_file(tmp_path):
    path = tmp_path / "harm.jsonl"
    body = '{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n{"id": "c", "x'
    path.write_text(body)
    assert sorted(records.read_complete(path)) == ["a", "b"]
    assert path.read_text() == body  # a reader does not write
    path.write_text('{"id": "a"}\n{"id": "b"}')  # a complete last record without its newline counts
    assert sorted(records.read_complete(path)) == ["a", "b"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(records.RecordError, match=r"harm.jsonl:2: malformed JSON"):
        records.read_complete(path)
