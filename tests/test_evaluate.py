"""The evaluate stage end to end on a tiny random llama (junk text, real plumbing), a real local judge server, and
the embedded model (integration)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlx_cai import evalsets
from mlx_cai.chat import BackendError
from mlx_cai.stages import evaluate
from mlx_cai.stages.evaluate import EvalConfig

TINY = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 49152,
        "max_position_embeddings": 2048, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer llama with the embedded model's tokenizer, saved as an MLX model folder."""
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import save_model

    from mlx_cai import models

    src = models.resolve("smollm2-135m")  # converted once per test home; we only need its tokenizer files
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(TINY))
    mx.eval(model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps(TINY))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_records_and_summary(tiny_model, tmp_path):
    cfg = EvalConfig(output=str(tmp_path / "ev"), model=tiny_model, suites=("harm", "benign", "mtbench"), limit=3,
                     max_tokens=6, batch_size=2, temperature=1.0)
    events = []
    path = evaluate.run(cfg, progress=events.append)
    assert path == tmp_path / "ev" / "summary.json"
    harm = lines(tmp_path / "ev" / "harm.jsonl")
    assert len(harm) == 3 and len({r["id"] for r in harm}) == 3
    r = harm[0]
    for key in ("id", "category", "prompt", "response", "finish_reason", "prompt_tokens", "completion_tokens"):
        assert key in r
    assert r["verdicts"]["keyword"]["label"] in ("refusal", "answer") and r["completion_tokens"] <= 6
    assert {x["id"] for x in harm} == {i.id for i in evalsets.select(evalsets.load_suite("harm").items, 3)}
    mt = lines(tmp_path / "ev" / "mtbench.jsonl")
    assert all(len(x["responses"]) == 2 and len(x["verdicts"]["keyword"]) == 2 for x in mt)
    assert mt[0]["prompt_tokens"][1] > mt[0]["prompt_tokens"][0]  # turn 2 carries turn 1 and its answer

    s = json.loads(path.read_text())
    assert set(s["suites"]) == {"harm", "benign", "mtbench"}
    harm_m = s["suites"]["harm"]["metrics"]["asr_keyword"]
    answered = sum(x["verdicts"]["keyword"]["label"] == "answer" for x in harm)
    assert (harm_m["k"], harm_m["n"]) == (answered, 3) and harm_m["low"] <= harm_m["value"] <= harm_m["high"]
    assert s["suites"]["benign"]["metrics"]["over_refusal"]["n"] == 3
    assert s["overall"]["collapse"]["non_termination_rate"]["n"] == 3 + 3 + 6
    assert s["overall"]["timing"]["tok_per_s"] > 0
    assert s["provenance"]["model"] == tiny_model and s["provenance"]["split"] == "eval"
    assert s["provenance"]["suites"]["harm"]["n"] == 3
    assert json.loads((tmp_path / "ev" / "config.json").read_text())["limit"] == 3
    assert (events[0].task, events[0].done, events[0].total) == ("eval harm", 0, 3)
    assert sum(e.advance for e in events if e.task == "eval mtbench") == 3
    assert sum(e.tokens for e in events) > 0  # decoded tokens reach the progress bar


def test_resume_after_torn_write_has_no_duplicates(tiny_model, tmp_path):
    cfg = EvalConfig(output=str(tmp_path / "ev"), model=tiny_model, suites=("harm", "benign"), limit=4,
                     max_tokens=5, batch_size=2, temperature=1.0)
    evaluate.run(cfg)
    harm = tmp_path / "ev" / "harm.jsonl"
    full = harm.read_text().splitlines(keepends=True)
    assert len(full) == 4
    harm.write_text(full[0] + full[1][: len(full[1]) // 2])  # a kill mid-write of the second record
    events = []
    evaluate.run(cfg, progress=events.append)
    again = harm.read_text().splitlines(keepends=True)
    ids = [json.loads(x)["id"] for x in again]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert again[0] == full[0]  # what was done is kept, not redone
    assert (events[0].task, events[0].done, events[0].total) == ("eval harm", 1, 4)
    benign = [e for e in events if e.task == "eval benign"]  # benign was complete: nothing to do
    assert [(e.done, e.total) for e in benign] == [(4, 4)] and not any(e.advance for e in benign)
    assert len(lines(tmp_path / "ev" / "benign.jsonl")) == 4


def test_rerun_after_sigkill_continues(tiny_model, tmp_path):
    out = tmp_path / "ev"
    code = ("import sys; from mlx_cai.stages import evaluate as e; "
            f"e.run(e.EvalConfig(output={str(out)!r}, model={tiny_model!r}, suites=('harm',), limit=30, "
            "max_tokens=32, batch_size=2, temperature=1.0))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    try:
        deadline = time.time() + 120
        harm = out / "harm.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if harm.exists() and len(harm.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed; make it slower"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = len(lines(harm))
    assert 2 <= before < 30
    evaluate.run(EvalConfig(output=str(out), model=tiny_model, suites=("harm",), limit=30, max_tokens=32, batch_size=2,
                            temperature=1.0))
    ids = [r["id"] for r in lines(harm)]
    assert len(ids) == 30 and len(set(ids)) == 30


def test_other_settings_are_not_mixed_into_a_folder(tiny_model, tmp_path):
    cfg = EvalConfig(output=str(tmp_path / "ev"), model=tiny_model, suites=("harm",), limit=1, max_tokens=3)
    evaluate.run(cfg)
    with pytest.raises(ValueError, match="other settings .*seed: 0 -> 1"):
        evaluate.run(EvalConfig(output=str(tmp_path / "ev"), model=tiny_model, suites=("harm",), limit=1,
                                max_tokens=3, seed=1))


def test_judge_down_fails_before_any_generation(tmp_path):
    out = tmp_path / "ev"
    cfg = EvalConfig(output=str(out), model="/no/such/model", suites=("harm",),
                     judge="openai:judge@http://127.0.0.1:9/v1")
    with pytest.raises(BackendError, match="not reachable"):
        evaluate.run(cfg)  # the judge is checked before the model is even loaded
    assert not out.exists()


# ---------------------------------------------------------------- a real OpenAI-compatible judge server


class JudgeServer(ThreadingHTTPServer):
    """Serves /v1/models and /v1/chat/completions; replies come from `reply(messages)`."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "judge", "object": "model", "created": 0, "owned_by": "t"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(req)
        text = self.server.reply(req["messages"])
        self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})


@pytest.fixture
def judge_server():
    harm = evalsets.select(evalsets.load_suite("harm").items, 4)
    broken = harm[0].prompt  # the judge never grades this one properly

    def reply(messages):
        text = messages[-1]["content"]
        if "#score: N" in text:
            if broken in text:
                return "I would rather not grade this."
            return "Gives usable steps.\n#score: 5" if len(text) % 2 else "Stays general.\n#score: 2"
        return "Second answer is weak. [[4]]" if "[Conversation]" in text else "Solid. [[7]]"

    server = JudgeServer(reply)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.broken = broken
    yield server
    server.shutdown()
    server.server_close()


def test_llm_judge_scores_failures_and_turns(tiny_model, tmp_path, judge_server):
    cfg = EvalConfig(output=str(tmp_path / "ev"), model=tiny_model, suites=("harm", "mtbench"), limit=4,
                     max_tokens=4, batch_size=4, temperature=1.0, judge=f"openai:judge@{judge_server.url}",
                     judge_retries=2)
    s = json.loads(evaluate.run(cfg).read_text())
    harm = lines(tmp_path / "ev" / "harm.jsonl")
    broken = [r for r in harm if r["prompt"] == judge_server.broken][0]
    v = broken["verdicts"]["harm"]
    assert not v["ok"] and v["attempts"] == 3 and v["raw"] == "I would rather not grade this." and "score" not in v
    assert sum(judge_server.broken in r["messages"][-1]["content"] for r in judge_server.requests) == 3
    scores = [r["verdicts"]["harm"]["score"] for r in harm if r["verdicts"]["harm"]["ok"]]
    m = s["suites"]["harm"]["metrics"]
    assert s["suites"]["harm"]["judge_failures"] == {"harm": 1}
    assert (m["asr_rubric"]["n"], m["asr_rubric"]["k"]) == (3, sum(x >= 5 for x in scores))
    assert m["harm_score"]["value"] == pytest.approx(sum(scores) / 3)
    assert "asr_keyword" in m  # the keyword judge always runs too
    mt = s["suites"]["mtbench"]["metrics"]
    assert mt["mtbench_turn1"]["value"] == 7.0 and mt["mtbench_turn2"]["value"] == 4.0
    assert mt["mtbench_turn1"]["n"] == 4 and s["suites"]["mtbench"]["judge_failures"] == {"helpfulness": 0}
    rec = lines(tmp_path / "ev" / "mtbench.jsonl")[0]
    assert [x["score"] for x in rec["verdicts"]["helpfulness"]] == [7.0, 4.0]


# ---------------------------------------------------------------- summary arithmetic (pure)


def _rec(kind, label, harm=None, **extra):
    r = {"id": str(id(extra)) + label + str(harm), "kind": kind, "category": "c", "response": "text",
         "finish_reason": "stop", "completion_tokens": 2, "gen_seconds": 0.5,
         "verdicts": {"keyword": {"judge": "keyword", "ok": True, "raw": "", "label": label}}}
    if harm is not None:
        r["verdicts"]["harm"] = {"ok": harm != "fail", **({"score": harm} if harm != "fail" else {})}
    return r | extra


def test_summarize_counts_threshold_and_failures():
    recs = [_rec("harmful", "answer", 5), _rec("harmful", "answer", 4), _rec("harmful", "refusal", "fail"),
            _rec("harmful", "refusal", 1), _rec("safe", "refusal"), _rec("safe", "answer")]
    s = evaluate.summarize({"x": recs}, threshold=5)
    m = s["suites"]["x"]["metrics"]
    assert (m["asr_keyword"]["k"], m["asr_keyword"]["n"]) == (2, 4)
    assert (m["asr_rubric"]["k"], m["asr_rubric"]["n"]) == (1, 3)  # the failure is not a score
    assert m["harm_score"]["value"] == pytest.approx(10 / 3)
    assert s["suites"]["x"]["judge_failures"] == {"harm": 1}
    assert (m["over_refusal"]["k"], m["over_refusal"]["n"]) == (1, 2)
    # keyword answer & score 5: agree; answer & 4: disagree; refusal & 1: agree; the failure is left out
    assert (m["judge_agreement"]["k"], m["judge_agreement"]["n"]) == (2, 3)
    assert s["suites"]["x"]["timing"] == {"gen_seconds": 3.0, "completion_tokens": 12, "tok_per_s": 4.0,
                                          "judge_seconds": 0.0}
    lower = evaluate.summarize({"x": recs}, threshold=4)["suites"]["x"]["metrics"]["asr_rubric"]
    assert (lower["k"], lower["n"]) == (2, 3)
    assert s["ordinary"]["n"] == 2 and s["overall"]["n"] == 6  # ordinary: the answers to safe (and chat) prompts
    assert "ordinary" not in evaluate.summarize({"x": recs[:4]})  # harmful prompts only


def test_ordinary_collapse_leaves_out_refusals_of_harmful_prompts():
    refusal = "I'm sorry, but I can't help with that request."
    recs = [_rec("harmful", "refusal", response=refusal) for _ in range(6)] + \
        [_rec("safe", "answer", response=f"Answer number {w} is about {w} things.") for w in ("one", "two", "six")]
    s = evaluate.summarize({"x": recs})
    assert s["overall"]["collapse"]["phrase_repeat_rate"]["value"] == pytest.approx(6 / 9)  # the refusals
    assert s["ordinary"]["collapse"]["phrase_repeat_rate"]["value"] == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="split"):
        EvalConfig(output="x", split="test")
    with pytest.raises(ValueError, match="harm_threshold"):
        EvalConfig(output="x", harm_threshold=6)
    with pytest.raises(ValueError, match="no suites"):
        EvalConfig(output="x", suites=("",))


# ---------------------------------------------------------------- CLI


def test_cli_eval_prints_table_and_judge_down_is_one_line(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from mlx_cai.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", "-m", tiny_model, "-o", str(tmp_path / "ev"), "-s", "harm", "--suite",
                              "benign", "--limit", "2", "--max-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "ASR (keyword)" in res.output and "over-refusal" in res.output
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["provenance"]["suites"].keys() == {"harm",
                                                                                                       "benign"}
    res = runner.invoke(app, ["eval", "-o", str(tmp_path / "ev2"), "--judge", "openai:j@http://127.0.0.1:9/v1"])
    assert res.exit_code == 1
    assert "error:" in res.output and "not reachable" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------- the embedded model


@pytest.mark.integration
def test_embedded_model_keyword_eval(tmp_path):
    cfg = EvalConfig(output=str(tmp_path / "ev"), suites=("harm", "benign"), limit=4, max_tokens=24, batch_size=8)
    s = json.loads(evaluate.run(cfg).read_text())
    recs = lines(tmp_path / "ev" / "harm.jsonl") + lines(tmp_path / "ev" / "benign.jsonl")
    assert len(recs) == 8 and sum(bool(r["response"].strip()) for r in recs) >= 6  # a real model writes text
    assert all(r["finish_reason"] in ("stop", "length") and 0 < r["completion_tokens"] <= 24 for r in recs)
    o = s["overall"]
    assert o["metrics"]["asr_keyword"]["n"] == 4 and o["metrics"]["over_refusal"]["n"] == 4
    assert o["collapse"]["mean_length_words"]["value"] > 3 and o["timing"]["tok_per_s"] > 1


def test_summarize_with_probability_verdicts_counts_labels_and_mean_attack_probability():
    recs = [_rec("harmful", "answer"), _rec("harmful", "refusal"), _rec("harmful", "answer")]
    for r, p in zip(recs, (0.8, 0.3, 0.45)):
        r["verdicts"]["harm"] = {"ok": True, "score": p, "label": "attack" if p >= 0.5 else "safe"}
    m = evaluate.summarize({"x": recs}, threshold=5)["suites"]["x"]["metrics"]
    assert (m["asr_rubric"]["k"], m["asr_rubric"]["n"]) == (1, 3)  # labels, not score >= 5
    assert m["attack_prob"]["value"] == pytest.approx(1.55 / 3) and "harm_score" not in m
    assert (m["judge_agreement"]["k"], m["judge_agreement"]["n"]) == (2, 3)  # the third: keyword answer, judge safe


def test_probability_judge_end_to_end_on_a_local_judge_model(tiny_model, tmp_path, monkeypatch):
    """judge: a local model -> judge_mode probs: every harmful record gets P(attack) from the judge's Yes/No
    probabilities (the same numbers as asking the model directly), the summary counts them; a judge whose Yes/No
    hold too little of its probability gives counted failures; resuming with the text rubric is refused."""
    from mlx_cai import models
    from mlx_cai.judges import rubrics
    from mlx_cai.judges.choice import option_probs, render_answer_start

    strict = json.loads(evaluate.run(EvalConfig(output=str(tmp_path / "strict"), model=tiny_model, suites=("harm",),
                                                limit=3, max_tokens=4, batch_size=4, judge=tiny_model)).read_text())
    assert strict["suites"]["harm"]["judge_failures"] == {"harm": 3}  # a random model does not answer Yes or No
    assert all("would not answer Yes or No" in r["verdicts"]["harm"]["error"]
               for r in lines(tmp_path / "strict" / "harm.jsonl"))
    monkeypatch.setattr(rubrics, "MIN_ANSWER_MASS", 0.0)  # read its Yes/No shares all the same

    cfg = EvalConfig(output=str(tmp_path / "ev"), model=tiny_model, suites=("harm",), limit=3, max_tokens=4,
                     batch_size=4, judge=tiny_model)
    assert cfg.judge_mode == "probs"
    s = json.loads(evaluate.run(cfg).read_text())
    assert json.loads((tmp_path / "ev" / "config.json").read_text())["judge_mode"] == "probs"
    recs = lines(tmp_path / "ev" / "harm.jsonl")
    model, tok = models.load(tiny_model)
    for r in recs:
        case = rubrics.Case(turns=(r["prompt"],), answers=(r["response"],))
        want = []
        for question, attack in rubrics.HARM_QUESTIONS:
            ctx = render_answer_start(tok, rubrics.harm_question_messages(case, question), rubrics.ANSWER_PREFIX)
            (probs, mass), = option_probs(model, tok, [ctx], rubrics.YES_NO)
            want.append(probs[rubrics.YES_NO.index(attack)])
        v = r["verdicts"]["harm"]
        assert v["ok"] and v["score"] == pytest.approx(sum(want) / 2, abs=1e-3)
        assert v["label"] == ("attack" if v["score"] >= 0.5 else "safe")
    m = s["suites"]["harm"]["metrics"]
    assert s["suites"]["harm"]["judge_failures"] == {"harm": 0}
    assert m["asr_rubric"]["k"] == sum(r["verdicts"]["harm"]["label"] == "attack" for r in recs)
    assert m["attack_prob"]["value"] == pytest.approx(sum(r["verdicts"]["harm"]["score"] for r in recs) / 3)
    from mlx_cai.config import ConfigError
    with pytest.raises(ConfigError, match="judge_mode"):
        evaluate.run(EvalConfig(**{**cfg.__dict__, "judge_mode": "text"}))
    with pytest.raises(ValueError, match="local judge"):
        EvalConfig(output="x", judge="openai:gpt-4o-mini", judge_mode="probs")
    assert EvalConfig(output="x", judge="openai:gpt-4o-mini").judge_mode == "text"
