"""Data parallelism: 2 processes on loopback (`mlx.launch -n 2 --backend ring`) give what 1 process gives.

One module fixture runs sft, dpo, generate, revise, feedback and eval through the CLI twice: in this process (one
process, the reference) and under mlx.launch (two processes, one start for all six commands). generate and revise
continue an output that one process began, so resume across the two is covered too. A last test runs the whole
pipeline (`mlx-cai run`) both ways.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_cai import adapters
from mlx_cai import distributed as D
from mlx_cai.cli import app
from mlx_cai.train import data

LAUNCH = Path(sys.executable).with_name("mlx.launch")
JOB = Path(__file__).with_name("distributed_job.py")
WORDS = ["cat", "dog", "sun", "tree", "moon"]
needs_ring = pytest.mark.skipif(not (mx.distributed.is_available("ring") and LAUNCH.exists()),
                                reason="needs MLX's ring backend and the mlx.launch script beside the interpreter")


def test_one_process_helpers_are_the_identity():
    assert (D.size(), D.rank(), D.is_main()) == (1, 0, True)
    assert D.shard([3, 1, 2]) == [3, 1, 2] and D.gather({"a": 1}) == [{"a": 1}] and D.from_main(5) == 5
    chunks = list(D.map_chunks(list(range(5)), 2, lambda part: [x * 10 for x in part]))
    assert chunks == [([0, 1], [0, 10]), ([2, 3], [20, 30]), ([4], [40])]
    assert data.local_batch([4, 0, 2], lambda rows: tuple(rows)) == (4, 0, 2)


def _chat(word: str) -> dict:
    return {"messages": [{"role": "user", "content": f"say {word}"},
                         {"role": "assistant", "content": f"{word} {word} {word}"}]}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(root: Path, model: str, sft_adapter: Path) -> list[list[str]]:
    """sft, dpo, generate and revise into ROOT (the same for one and two processes)."""
    train = ["--model", model, "--lora-layers", "2", "--learning-rate", "1e-3", "--warmup-steps", "0"]
    gen = ["--model", model, "--max-tokens", "6", "--batch-size", "2"]
    return [
        # 5 examples in batches of 4: batches of 4 and 1 rows (the 1-row one leaves a process without rows);
        # 2 batches per step exercise the per-batch weighting under gradient accumulation.
        ["sft", "--data", str(root.parent / "sft-data"), "-o", str(root / "sft"), "--iters", "3", "--batch-size",
         "4", "--grad-accumulation", "2", "--steps-per-eval", "3", "--steps-per-save", "2", *train],
        ["dpo", "--pairs", str(root.parent / "pairs.jsonl"), "--adapter", str(sft_adapter), "-o", str(root / "dpo"),
         "--iters", "3", "--batch-size", "4", *train],
        ["generate", str(root.parent / "prompts.txt"), "-o", str(root / "generate.jsonl"), *gen],
        ["revise", str(root.parent / "prompts.txt"), "-o", str(root / "revise.jsonl"), "--shots", "0", *gen],
        ["feedback", str(root.parent / "prompts.txt"), "-o", str(root / "pairs.jsonl"), "--ensemble", "2", *gen],
        ["eval", "-o", str(root / "eval"), "--suite", f"{root.parent / 'prompts.txt'}:harmful", *gen],
    ]


@pytest.fixture(scope="module")
def runs(tiny_gguf, tmp_path_factory):
    """(one-process folder, two-process folder, output of mlx.launch)."""
    base = tmp_path_factory.mktemp("dist")
    data = base / "sft-data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(_chat(w)) + "\n" for w in WORDS))
    (data / "valid.jsonl").write_text("".join(json.dumps(_chat(w)) + "\n" for w in WORDS[:3]))
    pairs = [{"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": f"no {w} today"} for w in WORDS]
    (base / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (base / "prompts.txt").write_text("".join(f"tell me about the {w} number {i}\n" for i, w in
                                              enumerate(WORDS + ["star", "rain"])))
    one, two = base / "one", base / "two"
    model, runner = str(tiny_gguf), CliRunner()
    for args in _commands(one, model, one / "sft"):  # dpo continues this SFT adapter in both runs
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (args[0], r.output)
    # The two-process generation runs continue files that one process began (the first 3 records).
    two.mkdir()
    for name in ("generate.jsonl", "revise.jsonl"):
        (two / name).write_text("".join(line + "\n" for line in _lines(one / name)[:3]))
    output = _launch(_commands(two, model, one / "sft"))
    assert (two / "eval" / "summary.json").exists(), output  # mlx.launch exits 0 even when a process fails
    return one, two, output


def _launch(commands: list[list[str]], *job_args: str) -> str:
    """Run the mlx-cai `commands` in 2 processes on loopback (`job_args`: distributed_job.py's options); returns
    what they printed."""
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port()), "--",
           sys.executable, str(JOB), json.dumps(commands), *job_args]
    # two processes on a small machine, one training stream each (a test may ask its one-process run for 2)
    env = {**os.environ, "MLX_CAI_BLAS_THREADS": "1", "MLX_CAI_TRAIN_STREAMS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


@needs_ring
def test_sft_on_two_processes_gives_the_one_process_adapter(runs):
    one, two, output = runs
    a, b = dict(mx.load(str(one / "sft" / adapters.ADAPTER_FILE))), dict(mx.load(str(two / "sft" / adapters.ADAPTER_FILE)))
    assert a.keys() == b.keys()
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5), k
    rows_a, rows_b = ([json.loads(x) for x in _lines(d / "sft" / "metrics.jsonl")] for d in (one, two))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 3]  # 3 steps, 1 validation
    for ra, rb in zip(rows_a, rows_b):  # rank 0 logs the whole batch: counts summed, means weighted
        assert {k: ra[k] for k in ("tokens", "sequences", "loss_tokens") if k in ra} == \
               {k: rb[k] for k in ("tokens", "sequences", "loss_tokens") if k in rb}
        for k in ("loss", "grad_norm", "val_loss"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4), k
    # Rank 0 alone wrote the folder (the same files as one process) and printed the final table.
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(one / "sft") == files(two / "sft")
    assert output.count("adapter in") == 2  # sft and dpo, once each


@needs_ring
def test_dpo_on_two_processes_gives_the_one_process_adapter_and_reference(runs):
    one, two, _ = runs
    ref_a, ref_b = ({r["id"]: r for r in map(json.loads, _lines(d / "dpo" / "ref_logps.jsonl"))} for d in (one, two))
    assert ref_a.keys() == ref_b.keys() and len(ref_a) == len(WORDS)
    for pid, ra in ref_a.items():
        rb = ref_b[pid]
        assert (ra["key"], ra["chosen_tokens"], ra["rejected_tokens"]) == \
               (rb["key"], rb["chosen_tokens"], rb["rejected_tokens"])
        assert (rb["chosen"], rb["rejected"]) == (pytest.approx(ra["chosen"], abs=1e-4),
                                                  pytest.approx(ra["rejected"], abs=1e-4))
    a, b = dict(mx.load(str(one / "dpo" / adapters.ADAPTER_FILE))), dict(mx.load(str(two / "dpo" / adapters.ADAPTER_FILE)))
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5), k
    rows_a, rows_b = ([json.loads(x) for x in _lines(d / "dpo" / "metrics.jsonl")] for d in (one, two))
    assert [r["examples"] for r in rows_b] == [r["examples"] for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        for k in ("loss", "rewards/margins"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), k
        # At step 1 the policy is the reference: every reward is float noise (~1e-7, from how the passes were
        # batched or split over streams) and `chosen > rejected` a coin toss; compare accuracies after that.
        if ra["step"] > 1:
            assert rb["rewards/accuracies"] == pytest.approx(ra["rewards/accuracies"]), ra["step"]


@needs_ring
@pytest.mark.parametrize("names", [["generate.jsonl"], ["revise.jsonl"], ["pairs.jsonl", "pairs.dropped.jsonl"],
                                   ["eval/prompts.jsonl"]], ids=["generate", "revise", "feedback", "eval"])
def test_generation_stages_shard_and_merge_into_the_one_process_records(runs, names):
    one, two, _ = runs
    a, b = ([json.loads(x) for n in names if (d / n).exists() for x in _lines(d / n)] for d in (one, two))
    assert len(b) == len({r["id"] for r in b}) == 7  # every prompt once (generate, revise: continued from 3)
    same = lambda recs: {r["id"]: {k: v for k, v in r.items() if k not in ("gen_seconds", "judge_seconds")}  # noqa
                         for r in recs}
    assert same(b) == same(a)


@needs_ring
def test_rank_0_writes_the_summaries_of_all_records(runs):
    one, two, _ = runs
    assert json.loads((two / "pairs.summary.json").read_text()) == json.loads((one / "pairs.summary.json").read_text())
    a, b = (json.loads((d / "eval" / "summary.json").read_text()) for d in (one, two))
    assert b["suites"]["prompts"]["metrics"] == a["suites"]["prompts"]["metrics"]
    assert b["suites"]["prompts"]["collapse"] == a["suites"]["prompts"]["collapse"]


@needs_ring
def test_pipeline_on_two_processes_matches_one_process(tiny_gguf, tmp_path):
    """`mlx-cai run` under mlx.launch: every stage done once, rank 0's files equal to one process's."""
    from test_pipeline import tiny_config

    from mlx_cai import pipeline

    configs = {}
    for name in ("one", "two"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(json.dumps(tiny_config(tmp_path / name, str(tiny_gguf))))
    r = CliRunner().invoke(app, ["run", str(configs["one"])])
    assert r.exit_code == 0, r.output
    output = _launch([["run", str(configs["two"])]])
    one, two = (pipeline.load_config(configs[n]).run_dir for n in ("one", "two"))
    assert (two / "report.html").exists() and (two / "final").resolve() == (two / "dpo").resolve(), output
    assert output.count("stage wall time") == 1  # printed by rank 0 only
    for name in ("revise.jsonl", "clean/train.jsonl", "pairs.jsonl", "eval/dpo/harm.jsonl"):
        a, b = (sorted(json.dumps({k: v for k, v in json.loads(x.replace(str(d), "RUN")).items()
                                   if k not in ("gen_seconds", "judge_seconds")}) for x in _lines(d / name))
                for d in (one, two))
        assert b == a, name
    for stage in ("sft", "dpo"):
        a, b = (dict(mx.load(str(d / stage / adapters.ADAPTER_FILE))) for d in (one, two))
        assert all(np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5) for k in a), stage
