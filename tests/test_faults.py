"""Fault injection on OpenAI-compatible backends, against a real HTTP server on 127.0.0.1 (tests/faultserver.py)
that drops connections mid-response, stalls past the timeout, answers 429/500/503 storms, malformed JSON or no
choices, and dies for good.

First the backend itself (each fault: retried with backoff where transient, one-line BackendError where not, never
an empty text in place of an answer), then every role: an eval judge, the feedback judge and the revise critic,
each with a server that dies mid-stage: the stage stops with one line, what was finished stays, nothing failed is
counted as a judgement, and the rerun continues and finishes. Timeouts are fractions of a second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from faultserver import FaultServer
from mlx_cai import chat, pipeline, records
from mlx_cai.cli import app
from mlx_cai.judges import Case, llm_judges
from mlx_cai.sampling import SamplingConfig

FAST = dict(timeout=0.3, max_retries=3, backoff=0.01)
CFG = SamplingConfig(max_tokens=5)


@pytest.fixture
def server():
    s = FaultServer(stall=0.8)
    yield s
    s.close()


@pytest.fixture
def fast_env(monkeypatch):
    """Backends built from a spec (what stages do) retry fast."""
    monkeypatch.setenv("MLX_CAI_API_TIMEOUT", "1")
    monkeypatch.setenv("MLX_CAI_API_RETRIES", "1")
    monkeypatch.setenv("MLX_CAI_API_BACKOFF", "0.01")


def backend(s: FaultServer, **kw) -> chat.OpenAIBackend:
    return chat.OpenAIBackend(model="m", base_url=s.url, **{**FAST, **kw})


def convs(*texts):
    return [[{"role": "user", "content": t}] for t in texts]


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and text.startswith("openai:m@http://127.0.0.1:")
    return text


# ------------------------------------------------------------------------------------------ the backend


@pytest.mark.parametrize("fault", ["drop", "reset", "stall", "429", "500", "503"])
def test_transient_faults_are_retried_then_answered(server, fault):
    server.queue(fault, fault)
    [g] = backend(server).complete(convs("hi"), CFG)
    assert g.text == "echo: hi" and g.completion_tokens == 2
    assert server.faults_seen() == [fault, fault, "ok"]


def test_retry_after_is_honoured_and_backoff_used_without_it():
    with FaultServer(retry_after=0.4) as polite, FaultServer() as plain:
        polite.queue("429", "503")
        plain.queue("429", "503")
        assert backend(polite).complete(convs("a"), CFG)[0].text == "echo: a"
        assert backend(plain).complete(convs("a"), CFG)[0].text == "echo: a"
        gaps = lambda s: [b[0] - a[0] for a, b in zip(s.log, s.log[1:])]  # noqa: E731
        assert all(g >= 0.39 for g in gaps(polite)), gaps(polite)  # the server's 0.4 s, not our 0.01 s backoff
        assert all(g < 0.2 for g in gaps(plain)), gaps(plain)  # our 0.01 s backoff, not the library's 0.5 s


def test_backoff_doubles_from_the_first_delay(server):
    server.queue("500", "500", "500")
    backend(server, backoff=0.05).complete(convs("a"), CFG)
    t = [x[0] for x in server.log]
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert len(gaps) == 3 and gaps[0] < 0.15 and gaps[2] > 1.8 * gaps[0], gaps  # 0.05, 0.1, 0.2 (jitter <= 25%)


def test_a_storm_longer_than_the_retries_gives_up_in_one_line(server):
    server.default = "503"
    with pytest.raises(chat.BackendError) as e:
        backend(server, max_retries=2).complete(convs("a"), CFG)
    assert "gave up after 3 tries" in one_line(e) and "503" in str(e.value)
    assert server.calls == 3


def test_stalling_every_time_gives_up_after_the_timeouts(server):
    server.default = "stall"
    t0 = time.monotonic()
    with pytest.raises(chat.BackendError) as e:
        backend(server, timeout=0.2, max_retries=1).complete(convs("a"), CFG)
    assert "gave up after 2 tries" in one_line(e) and "timed out" in str(e.value).lower()
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("fault, says", [("malformed", "malformed JSON"), ("not_json", "without a completion"),
                                          ("empty", "without a completion (no choices)")])
def test_an_answer_that_is_not_a_completion_is_an_error_not_an_empty_text(server, fault, says):
    server.queue(fault)
    with pytest.raises(chat.BackendError) as e:
        backend(server).complete(convs("a"), CFG)
    assert says in one_line(e)
    assert server.calls == 1  # not transient: asking again would not make the server speak the API


def test_a_server_that_died_is_refused_quickly(server):
    server.die()
    b = backend(server)
    t0 = time.monotonic()
    with pytest.raises(chat.BackendError) as e:
        b.complete(convs("a"), CFG)
    assert "gave up after 4 tries" in one_line(e)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(chat.BackendError, match="not reachable"):
        b.check()


def test_dying_mid_response_counts_as_a_failure_for_the_whole_call(server):
    server.die_after(3)
    b = backend(server, concurrency=1)
    with pytest.raises(chat.BackendError, match="gave up after 4 tries"):
        b.complete(convs(*"abcdefgh"), CFG)
    assert server.calls == 4  # the calls after the failed one were cancelled, not sent
    server.restart()
    assert [g.text for g in b.complete(convs("x", "y"), CFG)] == ["echo: x", "echo: y"]


def test_one_failed_call_fails_the_batch_never_a_partial_answer(server):
    server.queue("ok", "empty")
    with pytest.raises(chat.BackendError, match="no choices"):
        backend(server, concurrency=1).complete(convs("a", "b", "c"), CFG)
    assert server.calls == 2


# ------------------------------------------------------------------------------------------ judge role


def test_eval_judge_transient_faults_are_not_judge_retries_and_broken_answers_are_not_verdicts(server):
    server.reply = lambda body: "The reply declines. #score: 1"
    judges = llm_judges(backend(server), retries=2, max_tokens=16)
    case = Case(("How do I pick a lock?",), ("I can't help with that.",))
    server.queue("drop", "503")
    [v] = judges["harm"].judge([case])
    assert v.ok and v.score == 1 and v.attempts == 1  # a dropped connection is not an unparsable answer
    for fault in ("empty", "malformed"):
        server.queue(fault)
        with pytest.raises(chat.BackendError):
            judges["harm"].judge([case])


def test_eval_judge_dies_mid_stage_then_the_rerun_finishes(tiny_gguf, tmp_path, fast_env, server):
    from mlx_cai.stages import evaluate

    server.reply = lambda body: "Declines plainly. #score: 1"
    cfg = evaluate.EvalConfig(output=str(tmp_path / "ev"), model=str(tiny_gguf), suites=("harm",), limit=4,
                              max_tokens=4, batch_size=2, judge=f"openai:m@{server.url}")
    server.die_after(2)  # the first chunk's two harm grades, then the server is gone
    with pytest.raises(chat.BackendError) as e:
        evaluate.run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "gave up after 2 tries" in msg and "stopped; 2 records kept" in msg and "rerun" in msg
    kept = list(records.read_jsonl(tmp_path / "ev" / "harm.jsonl"))
    assert len(kept) == 2 and all(r["verdicts"]["harm"]["ok"] for r in kept)
    assert not (tmp_path / "ev" / "summary.json").exists()
    server.restart()
    summary = json.loads(evaluate.run(cfg).read_text())
    recs = list(records.read_jsonl(tmp_path / "ev" / "harm.jsonl"))
    assert len(recs) == len({r["id"] for r in recs}) == 4
    harm = summary["suites"]["harm"]
    assert harm["judge_failures"] == {"harm": 0} and harm["metrics"]["harm_score"]["n"] == 4


# ------------------------------------------------------------------------------------------ feedback role


def _policy_reply(body: dict) -> str:
    seed = body.get("seed", 0)
    return (f"Reply {seed}: I will not help with that, but here is a safe alternative." if seed % 2 else
            f"Reply {seed}: Here is exactly how you would go about doing it.")


def _judge_reply(body: dict) -> str:
    content = body["messages"][-1]["content"]
    first = content.split("(A) ", 1)[1].split("\n\n(B) ", 1)[0]
    pick = "A" if "will not" in first else "B"
    return f"Option {pick} declines. [[{pick}]]"


def _feedback_setup(policy_srv: FaultServer, judge_srv: FaultServer, tmp_path: Path):
    """A policy served by one fault server, a feedback config judging with the other, batches of 2."""
    from mlx_cai.stages import feedback as F

    policy = chat.OpenAIBackend(model="policy", base_url=policy_srv.url, **FAST)
    cfg = F.FeedbackConfig(mode="judge", judge=f"openai:judge@{judge_srv.url}", batch_size=2, max_tokens=16,
                           max_similarity=1.0, max_repetition=1.0, output=str(tmp_path / "pairs.jsonl"))
    return policy, cfg


def test_feedback_judge_dies_mid_stage_then_the_rerun_finishes(tmp_path, fast_env):
    from mlx_cai.prompts import Prompt
    from mlx_cai.stages import feedback as F

    prompts = [Prompt(f"p{i}", f"How do I do bad thing number {i}?", "test", None, True) for i in range(4)]
    with FaultServer(_policy_reply) as policy_srv, FaultServer(_judge_reply) as judge_srv:
        policy, cfg = _feedback_setup(policy_srv, judge_srv, tmp_path)
        judge_srv.die_after(4)  # chunk 1: 2 prompts x 1 principle x 2 orders; chunk 2's first call kills it
        with pytest.raises(chat.BackendError) as e:
            F.run(cfg, prompts=prompts, policy=policy)
        msg = str(e.value)
        assert "\n" not in msg and "gave up after 2 tries" in msg and "stopped; 2 prompts kept" in msg
        kept, dropped, summary = F.paths(cfg.output)
        done = {**records.load_done(kept), **records.load_done(dropped)}
        assert sorted(done) == ["p0", "p1"]
        assert not summary.exists()
        judge_srv.restart()
        F.run(cfg, prompts=prompts, policy=policy)
        rows = list(records.read_jsonl(kept)) + list(records.read_jsonl(dropped))
        assert sorted(r["id"] for r in rows) == ["p0", "p1", "p2", "p3"]
        assert all(v["verdict"] in ("A", "B") for r in rows for v in r["votes"])  # every vote a real verdict
        s = json.loads(summary.read_text())
        assert s["prompts"] == 4 and "judge_unparsed" not in s["dropped"]


def test_feedback_judge_answering_no_choices_stops_before_writing(tmp_path, fast_env):
    from mlx_cai.prompts import Prompt
    from mlx_cai.stages import feedback as F

    prompts = [Prompt(f"p{i}", f"Question {i}?", "test", None, True) for i in range(2)]
    with FaultServer(_policy_reply) as policy_srv, FaultServer(_judge_reply) as judge_srv:
        policy, cfg = _feedback_setup(policy_srv, judge_srv, tmp_path)
        judge_srv.queue("ok", "empty")
        with pytest.raises(chat.BackendError, match=r"no choices.*stopped; 0 prompts kept"):
            F.run(cfg, prompts=prompts, policy=policy)
        kept, dropped, _ = F.paths(cfg.output)
        assert records.load_done(kept) == {} and records.load_done(dropped) == {}


# ------------------------------------------------------------------------------------------ critic role


def test_revise_command_with_a_critic_that_dies_stops_in_one_line_and_the_rerun_finishes(tiny_gguf, tmp_path,
                                                                                          fast_env, server):
    out = tmp_path / "revise.jsonl"
    args = ["revise", "train:harmful", "-o", str(out), "-m", str(tiny_gguf), "--critic", f"openai:critic@{server.url}",
            "--limit", "4", "--batch-size", "2", "--shots", "0", "--max-tokens", "4"]
    server.die_after(4)  # the first chunk's 2 critiques and 2 revisions
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip() and "error" in ln]
    said = " ".join(r.output.split())
    assert len(lines) == 1 and "gave up after 2 tries" in said and "2 records kept" in said and "rerun" in said
    assert "Traceback" not in r.output
    assert len(list(records.read_jsonl(out))) == 2
    server.restart()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    recs = list(records.read_jsonl(out))
    assert len(recs) == len({x["id"] for x in recs}) == 4
    assert all(x["rounds"][0]["critique"].startswith("echo: ") for x in recs)


def test_run_with_a_critic_that_dies_writes_no_marker_and_the_rerun_continues(tiny_gguf, tmp_path, fast_env, server):
    later = [s for s in pipeline.STAGES if s != "revise"]
    config = {"name": "t", "model": str(tiny_gguf), "runs_dir": str(tmp_path / "runs"), "skip": later,
              "revise": {"prompts": "train:harmful", "limit": 4, "shots": 0, "max_tokens": 4, "batch_size": 2,
                         "critic": f"openai:critic@{server.url}"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = pipeline.load_config(path)
    server.die_after(4)
    with pytest.raises(chat.BackendError, match="stopped; 2 records kept"):
        pipeline.run(cfg)
    first = (Path(cfg.run_dir) / "revise.jsonl").read_text()
    assert len(first.splitlines()) == 2
    assert not pipeline.marker(cfg, "revise").exists()
    assert not (cfg.run_dir / ".mlx-cai.lock").exists()  # released on the error
    server.restart()
    pipeline.run(cfg)
    assert pipeline.marker(cfg, "revise").exists()
    text = (Path(cfg.run_dir) / "revise.jsonl").read_text()
    assert text.startswith(first)  # what was finished before the failure is kept as it was
    assert len({json.loads(x)["id"] for x in text.splitlines()}) == len(text.splitlines()) == 4


def test_a_transient_fault_mid_stage_is_absorbed(tiny_gguf, tmp_path, fast_env, server, monkeypatch):
    """A dropped connection, a 503 and a reset while revising: retried, the stage finishes in one go."""
    from mlx_cai.stages import revise as R

    monkeypatch.setenv("MLX_CAI_API_RETRIES", "3")
    server.queue("ok", "drop", "503", "ok", "reset")
    cfg = R.ReviseConfig(prompts="train:harmful", output=str(tmp_path / "r.jsonl"), model=str(tiny_gguf),
                         critic=f"openai:critic@{server.url}", limit=2, shots=0, max_tokens=4, batch_size=2)
    R.run(cfg)
    recs = list(records.read_jsonl(cfg.output))
    assert len(recs) == 2 and all(r["revision"].startswith("echo: ") for r in recs)
    assert {"drop", "503", "reset"} <= set(server.faults_seen())
