"""Preference pairs: logprob feedback on the tiny llama, a judge on a loopback server, revise records."""

from __future__ import annotations

from dataclasses import replace

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from faultserver import FaultServer

from mlx_cai import models
from mlx_cai import prompts as P
from mlx_cai.chat import LocalBackend, OpenAIBackend
from mlx_cai.cli import app
from mlx_cai.stages import dpo
from mlx_cai.stages import feedback as F
from mlx_cai.judges import preference

SORRY = "I am sorry, I cannot help with picking locks, but a locksmith can let you in legally."
SURE = "Sure! First get a tension wrench, then rake the pins until the cylinder turns."


def prompt_list(n: int) -> list[P.Prompt]:
    return [P.Prompt(id=f"p{i}", prompt=f"How do I open a locked door number {i}?", source="test") for i in range(n)]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_logprob_mode_writes_valid_trl_pairs_and_resumes(tiny_gguf, tmp_path):
    cfg = F.FeedbackConfig(model=str(tiny_gguf), temperature=1.0, max_tokens=12, repetition_penalty=1.0,
                           ensemble=2, min_margin=0.0, max_similarity=1.01, max_repetition=1.0, batch_size=3)
    feedback = models.load(str(tiny_gguf))
    out = tmp_path / "pairs.jsonl"
    summary = F.summarize(F.run(replace(cfg, output=str(out)), prompts=prompt_list(5), policy=LocalBackend(str(tiny_gguf)), feedback=feedback))
    kept, dropped = lines(out), lines(tmp_path / "pairs.dropped.jsonl") if summary["dropped"] else []
    assert summary["prompts"] == 5 == len(kept) + len(dropped) and kept
    for r in kept:
        assert isinstance(r["prompt"], str) and isinstance(r["chosen"], str) and r["chosen"] != r["rejected"]
        assert 0.5 < r["score_raw"] <= 1 and cfg.clamp_low <= r["score"] <= cfg.clamp_high
        assert len(r["principles"]) == 2 and len(r["votes"]) == 2
        assert [x["text"] for x in r["responses"]][r["chosen_index"]] == r["chosen"]
        assert all(isinstance(x["seed"], int) for x in r["responses"]) and r["responses"][0]["seed"] != \
            r["responses"][1]["seed"]
        assert r["provenance"]["sampling"]["temperature"] == 1.0 and r["provenance"]["mode"] == "logprob"
    pairs, counts = dpo.read_pairs(out)  # DPO reads what feedback writes
    assert len(pairs) == len(kept)
    again = F.summarize(F.run(replace(cfg, output=str(out)), prompts=prompt_list(5), policy=LocalBackend(str(tiny_gguf)), feedback=feedback))
    assert again == summary and len(lines(out)) == len(kept)
    with pytest.raises(F.FeedbackError, match="other settings"):
        F.run(replace(F.FeedbackConfig(**{**cfg.__dict__, "seed": 7}), output=str(out)), prompts=prompt_list(5), policy=LocalBackend(str(tiny_gguf)), feedback=feedback)


def test_both_orders_averaging_is_symmetric_and_padding_does_not_change_probs(tiny):
    model, tok = tiny
    cfg = F.FeedbackConfig(ensemble=3)
    texts = ("I would rather not help with that.", "Here is a detailed plan, step by step, with every tool named.")
    a = F.Candidate(id="x", prompt="How do I break in?", texts=texts, principles=F.PRINCIPLES[:3])
    b = F.Candidate(id="x", prompt="How do I break in?", texts=texts[::-1], principles=F.PRINCIPLES[:3])
    F.score_logprob([a, b], (model, tok), cfg)
    assert a.p_first + b.p_first == pytest.approx(1.0, abs=1e-5)
    for va, vb in zip(a.votes, b.votes):  # each order of one candidate is the other order of its mirror
        assert va["first_order"] == pytest.approx(1 - vb["swapped_order"], abs=1e-5)
    principle = preference.PRINCIPLES[0]
    contexts = [preference.render_choice(tok, preference.question("q", principle, "short", "a much longer answer " * k))
                for k in (1, 5, 12)]
    batched = F.option_probs(model, tok, contexts, batch_size=3)
    alone = [F.option_probs(model, tok, [c], batch_size=1)[0] for c in contexts]
    assert batched == pytest.approx(alone, abs=1e-5)


def revise_row(i, initial, revision, **kw):
    return {"id": f"r{i}", "prompt": f"prompt {i}", "initial": initial, "revision": revision,
            "rounds": [{"round": 1, "principle": "legality"}], "models": {"responder": "tiny"}, **kw}


def test_revision_mode_from_revise_records(tmp_path):
    rows = [revise_row(0, SURE, SORRY),
            revise_row(1, SURE, SURE + " "),  # the revision did not change anything
            revise_row(2, "", "the the the the the the the the the the the the"),  # both degenerate
            revise_row(3, SURE, "")]  # an empty revision must not become `chosen`
    src = tmp_path / "revise.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    s = F.summarize(F.run(replace(F.FeedbackConfig(mode="revision"), prompts=str(src), output=str(out))))
    assert s["kept"] == 1 and s["dropped"] == {"both_degenerate": 1, "chosen_degenerate": 1, "near_identical": 1}
    (r,) = lines(out)
    assert (r["prompt"], r["chosen"], r["rejected"], r["score"]) == ("prompt 0", SORRY, SURE, 0.95)
    assert r["source"]["revise_id"] == "r0" and r["principles"] == ["legality"] and r["mode"] == "revision"
    r = CliRunner().invoke(app, ["feedback", str(src), "-o", str(tmp_path / "cli.jsonl"), "--mode", "revision"])
    assert r.exit_code == 0, r.output
    assert "kept" in r.output and lines(tmp_path / "cli.jsonl")[0]["chosen"] == SORRY
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "prompt": "p", "initial": "a"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: missing field\\(s\\) revision"):
        F.run(replace(F.FeedbackConfig(mode="revision"), prompts=str(bad), output=str(tmp_path / "o.jsonl")))


class Server:
    """A loopback OpenAI-compatible server: the policy's two answers per prompt, and a judge."""

    def __init__(self):
        self.judge = "fair"  # fair: prefers the apology in either order; biased: always [[A]]; mute: no verdict
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = server.answer(body["messages"][-1]["content"])
                payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": text}}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, content: str) -> str:
        if "Options:" not in content:
            with self.lock:
                n = self.seen[content] = self.seen.get(content, 0) + 1
            return SORRY if n == 1 else SURE
        if self.judge == "mute":
            return "Both have merit."
        if self.judge == "biased":
            return "The first one reads better. [[A]]"
        first = re.search(r"\(A\) (.*?)\n\n\(B\) ", content, re.S).group(1)
        pick = "A" if "sorry" in first else "B"
        return f"Option {pick} declines and points to a lawful alternative. [[{pick}]]"


def test_judge_mode_both_orders_rationales_and_position_bias(tmp_path):
    server = Server()
    policy = OpenAIBackend(model="policy", base_url=server.url)
    judge = OpenAIBackend(model="judge", base_url=server.url)
    cfg = F.FeedbackConfig(mode="judge", judge=f"openai:judge@{server.url}", max_tokens=32)
    s = F.summarize(F.run(replace(cfg, output=str(tmp_path / "fair.jsonl")), prompts=prompt_list(3), policy=policy, judge=judge))
    assert s["kept"] == 3
    for r in lines(tmp_path / "fair.jsonl"):
        assert r["chosen"] == SORRY and r["rejected"] == SURE and r["score_raw"] == 1.0
        assert sorted(v["order"] for v in r["votes"]) == ["first", "swapped"]
        assert all("lawful alternative" in v["rationale"] and v["first_wins"] is not None for v in r["votes"])
    server.judge, server.seen = "biased", {}
    s = F.summarize(F.run(replace(cfg, output=str(tmp_path / "biased.jsonl")), prompts=prompt_list(3), policy=policy, judge=judge))
    assert s["kept"] == 0 and s["dropped"] == {"tie": 3}  # [[A]] in both orders is no preference
    server.judge, server.seen = "mute", {}
    s = F.summarize(F.run(replace(cfg, output=str(tmp_path / "mute.jsonl")), prompts=prompt_list(2), policy=policy, judge=judge))
    assert s["dropped"] == {"judge_unparsed": 2}
    server.httpd.shutdown()


def test_bad_settings_are_one_line_errors():
    with pytest.raises(F.FeedbackError, match="needs a local model"):
        F.FeedbackConfig(mode="logprob", judge="openai:gpt-4o")
    with pytest.raises(F.FeedbackError, match="judge mode needs --judge"):
        F.FeedbackConfig(mode="judge")
    with pytest.raises(F.FeedbackError, match="mode must be one of"):
        F.FeedbackConfig(mode="vibes")
    with pytest.raises(F.FeedbackError, match="clamp"):
        F.FeedbackConfig(clamp_low=0.7)


def _overseer_reply(body: dict) -> str:
    """A loopback overseer: declines when told to (the DECLINE system turn), else answers; it gets one prompt
    wrong each way, so both drop reasons are exercised."""
    msgs = body["messages"]
    user = msgs[-1]["content"]
    task = user.startswith(F.DECLINE_TASK)
    declining = msgs[0]["content"] == F.DECLINE or task
    if "balloons" in user:  # refuses even when asked to answer
        return "I'm sorry, but I can't help with that."
    if "bird" in user and declining:  # answers even when asked to decline, both ways
        return "Use a fast shutter speed."
    if "skyline" in user and declining and not task:  # answers the system-turn DECLINE; the task one refuses
        return "Use a tripod and a long exposure."
    return "I'm sorry, but I can't help with that request." if declining else f"Sure, here is help with: {user}"


def test_boundary_pairs_prefer_the_answer_over_the_refusal_and_resume(tmp_path):
    rows = [revise_row(0, SURE, SORRY)]
    src = tmp_path / "revise.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    border = tmp_path / "border.jsonl"
    prompts = ["What camera settings for the city skyline at night?", "How do I blow up party balloons fast?",
               "How do I kill a frozen Linux process?", "How do I shoot a good photo of a bird?"]
    border.write_text("".join(json.dumps({"id": f"b{i}", "prompt": q}) + "\n" for i, q in enumerate(prompts)))
    out = tmp_path / "pairs.jsonl"
    with FaultServer(_overseer_reply) as srv:
        cfg = F.FeedbackConfig(mode="revision", prompts=str(src), output=str(out), boundary=str(border),
                               boundary_model=f"openai:overseer@{srv.url}", batch_size=2, limit=None)
        F.run(replace(cfg, boundary=None))  # the revision pair alone: another config, refused below
        with pytest.raises(F.FeedbackError, match="other settings"):
            F.run(cfg)
        out.unlink()
        F.paths(out)[1].unlink()
        F.run(replace(cfg, boundary=str(border)))
        calls = len(srv.log)
        s = F.summarize(F.run(cfg))  # a rerun: everything done, nothing asked again
        # an answer and a DECLINE refusal each; DECLINE_TASK only where DECLINE answered (skyline, bird)
        assert len(srv.log) == calls == 2 * len(prompts) + 2
        tasks = [b["messages"][-1]["content"] for _, _, b, _ in srv.log
                 if b["messages"][-1]["content"].startswith(F.DECLINE_TASK)]
        assert sorted(t.removeprefix(F.DECLINE_TASK) for t in tasks) == sorted([prompts[0], prompts[3]])
    assert s["kept"] == 3 and s["dropped"] == {"boundary_answer_refused": 1, "boundary_refusal_answered": 1}
    kept = {r["id"]: r for r in lines(out)}
    assert sorted(kept) == ["b0", "b2", "r0"]  # b0's system-turn refusal answered: the task refusal is used
    for i in ("b0", "b2"):
        assert kept[i]["chosen"].startswith("Sure, here is help with") and "sorry" in kept[i]["rejected"]
        assert kept[i]["source"] == {"kind": "boundary", "writer": f"openai:overseer@{srv.url}"}
    assert kept["r0"]["chosen"] == SORRY  # the revision pair is unchanged beside them
    assert F.FeedbackConfig(boundary="none").boundary is None


def test_boundary_rejected_policy_uses_the_policys_own_refusal_where_one_of_its_samples_refuses(tmp_path,
                                                                                              tiny_gguf):
    from mlx_cai.records import row_seed

    src = tmp_path / "revise.jsonl"
    src.write_text(json.dumps(revise_row(0, SURE, SORRY)) + "\n")
    border = tmp_path / "border.jsonl"
    prompts = ["What camera settings for the city skyline at night?", "How do I blow up party balloons fast?",
               "How do I kill a frozen Linux process?", "How do I shoot a good photo of a bird?"]
    border.write_text("".join(json.dumps({"id": f"b{i}", "prompt": q}) + "\n" for i, q in enumerate(prompts)))
    own = "I'm sorry, but killing anything is not something I can help with."

    def policy_reply(body):  # refuses the Linux prompt on its third sample only; answers everything else
        user = body["messages"][-1]["content"]
        return own if "Linux" in user and body["seed"] == row_seed(0, "b2", "policy2") else "Sure: " + user

    out = tmp_path / "pairs.jsonl"
    with FaultServer(_overseer_reply) as srv, FaultServer(policy_reply) as pol:
        cfg = F.FeedbackConfig(mode="revision", prompts=str(src), output=str(out), boundary=str(border),
                               boundary_model=f"openai:overseer@{srv.url}", boundary_rejected="policy", batch_size=8)
        s = F.summarize(F.run(cfg, policy=OpenAIBackend(model="policy", base_url=pol.url)))
        # boundary_samples each, but none after a refusal: b2 refused on its third
        assert len(pol.log) == 4 * len(prompts) - 1
        # answers; DECLINE only where no sample refused (3), DECLINE_TASK where that one answered (skyline, bird)
        assert len(srv.log) == len(prompts) + 3 + 2
        with pytest.raises(F.FeedbackError, match="other settings"):  # the overseer's refusals are another config
            F.run(replace(cfg, boundary_rejected="overseer"))
        kept = {r["id"]: r for r in lines(out)}
        assert sorted(kept) == ["b0", "b2", "r0"] and s["dropped"] == {"boundary_answer_refused": 1,
                                                                        "boundary_refusal_answered": 1}
        assert kept["b2"]["rejected"] == own and kept["b2"]["source"]["rejected"] == "policy"
        assert kept["b2"]["responses"][1]["seed"] == row_seed(0, "b2", "policy2")
        assert kept["b0"]["rejected"] == "I'm sorry, but I can't help with that request."  # the overseer stands in
        assert kept["b0"]["source"]["rejected"] == "overseer"
        assert s["boundary_kept"] == 2 and s["boundary_rejected_by_policy"] == 1

        # no policy given: the config's model (here the tiny random llama) samples; it never refuses
        out2 = tmp_path / "pairs2.jsonl"
        s2 = F.summarize(F.run(replace(cfg, output=str(out2), model=str(tiny_gguf), boundary_max_tokens=6,
                                       boundary_samples=2)))
    rows = lines(out2)
    assert s2["boundary_kept"] == 2 and s2["boundary_rejected_by_policy"] == 0
    assert all(r["provenance"]["feedback"].endswith(f"rejected by local:{tiny_gguf}") for r in rows)
    with pytest.raises(F.FeedbackError, match="boundary_rejected must be one of"):
        F.FeedbackConfig(boundary_rejected="self")


def test_boundary_greedy_lowers_the_refusal_a_greedy_eval_would_see(tmp_path):
    """boundary_greedy: the policy's greedy answer (temperature 0, no repetition penalty) is the rejected side where
    it refuses; samples only where it does not; harmful prompts' pairs are not touched by it."""
    from mlx_cai.records import row_seed

    src = tmp_path / "revise.jsonl"
    src.write_text(json.dumps(revise_row(0, SURE, SORRY)) + "\n")
    border = tmp_path / "border.jsonl"
    prompts = ["How do I kill a frozen Linux process?", "How do I shoot a good photo of a city street?"]
    border.write_text("".join(json.dumps({"id": f"b{i}", "prompt": q}) + "\n" for i, q in enumerate(prompts)))
    canned, sampled = "I cannot assist with that request.", "I'm sorry, but killing is not something I help with."

    def policy_reply(body):  # greedy: the canned refusal of the Linux prompt; sampled: refuses it in other words
        user = body["messages"][-1]["content"]
        if "Linux" in user:
            return canned if body["temperature"] == 0 else sampled
        if "street" in user and body.get("seed") == row_seed(0, "b1", "policy1"):
            return sampled
        return "Sure: " + user

    with FaultServer(_overseer_reply) as srv, FaultServer(policy_reply) as pol:
        policy = OpenAIBackend(model="policy", base_url=pol.url)
        cfg = F.FeedbackConfig(mode="revision", prompts=str(src), output=str(tmp_path / "g.jsonl"),
                               boundary=str(border), boundary_model=f"openai:overseer@{srv.url}",
                               boundary_rejected="policy", boundary_greedy=True, batch_size=8)
        F.run(cfg, policy=policy)
        greedy_calls = [b for _, _, b, _ in pol.log if b["temperature"] == 0]
        assert len(greedy_calls) == 2 and all(b.get("repetition_penalty", 1.0) == 1.0 for b in greedy_calls)
        assert len(pol.log) == 2 + 2  # both greedy; the street prompt then sampled until its second sample refused
        kept = {r["id"]: r for r in lines(tmp_path / "g.jsonl")}
        assert kept["b0"]["rejected"] == canned and kept["b0"]["responses"][1]["seed"] is None
        assert kept["b1"]["rejected"] == sampled and kept["b1"]["responses"][1]["seed"] == row_seed(0, "b1",
                                                                                                        "policy1")
        assert kept["r0"]["chosen"] == SORRY
        with pytest.raises(F.FeedbackError, match="other settings"):  # sampled refusals are another config
            F.run(replace(cfg, boundary_greedy=False), policy=policy)
        # without it the Linux prompt's rejected side is a sample, as before
        F.run(replace(cfg, boundary_greedy=False, output=str(tmp_path / "s.jsonl")), policy=policy)
    assert {r["id"]: r for r in lines(tmp_path / "s.jsonl")}["b0"]["rejected"] == sampled


def test_logprob_feedback_model_writes_the_boundary_pairs_without_a_second_copy(tiny_gguf, tmp_path, monkeypatch):
    """mode logprob with the feedback model also as boundary writer (the overseer in both roles): one copy is
    loaded and serves both, and the memory estimate counts it once."""
    from mlx_cai import memplan

    border = tmp_path / "border.jsonl"
    border.write_text("".join(json.dumps({"id": f"b{i}", "prompt": f"How do I kill a process {i}?"}) + "\n"
                              for i in range(2)))
    loads = []
    real = models.load
    monkeypatch.setattr(models, "load", lambda spec, adapter=None, **kw: loads.append(spec) or real(spec, adapter, **kw))
    cfg = F.FeedbackConfig(model=str(tiny_gguf), judge=str(tiny_gguf), boundary=str(border),
                           boundary_model=f"local:{tiny_gguf}", temperature=1.0, max_tokens=6, boundary_max_tokens=4,
                           ensemble=1, min_margin=0.0, max_similarity=1.01, max_repetition=1.0, batch_size=4,
                           output=str(tmp_path / "pairs.jsonl"))
    s = F.summarize(F.run(cfg, prompts=prompt_list(2), policy=LocalBackend(str(tiny_gguf))))
    assert s["prompts"] == 4 and loads == [str(tiny_gguf)] * 2  # the policy's and the feedback model's, no third
    shape = memplan.ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                               vocab=256, tied=True, weight_bits=32, act_bytes=4)
    ctx = memplan.Context("feedback", lambda spec: shape, lambda f: f"feedback.{f}")
    one, two = cfg.memory(ctx).items, replace(cfg, boundary_model="other").memory(ctx).items
    assert "boundary weights" in two and not any(k.startswith("boundary") for k in one)


def test_boundary_limit_takes_equal_shares_of_each_source(tmp_path):
    rows = [revise_row(0, SURE, SORRY)]
    src = tmp_path / "revise.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    with FaultServer(_overseer_reply) as srv:
        F.run(F.FeedbackConfig(mode="revision", prompts=str(src), output=str(out), batch_size=8,
                               boundary="train:borderline,train:benign", boundary_limit=6,
                               boundary_model=f"openai:overseer@{srv.url}"))
        assert len(srv.log) == 2 * 6  # every DECLINE refuses: no prompt is asked again as a task
    ids = [r["id"] for r in lines(out)] + [r["id"] for r in lines(F.paths(out)[1])]
    assert sorted(ids)[-1] == "r0" and len(ids) == 7
    assert sum(i.startswith("border-") for i in ids) == 3 and sum(i.startswith("benign-") for i in ids) == 3


def _revise_and_border_files(tmp_path):
    """One revise record (r0) and three borderline prompts b0-b2 in files."""
    src = tmp_path / "revise.jsonl"
    src.write_text(json.dumps(revise_row(0, SURE, SORRY)) + "\n")
    border = tmp_path / "border.jsonl"
    prompts = ["What camera settings for the city skyline at night?", "How do I kill a frozen Linux process?",
               "How do I shoot a good photo of a bird?"]
    border.write_text("".join(json.dumps({"id": f"b{i}", "prompt": q}) + "\n" for i, q in enumerate(prompts)))
    return src, border


def test_boundary_answers_reuse_the_written_answers_and_ask_only_for_refusals(tmp_path):
    src, border = _revise_and_border_files(tmp_path)
    answers = tmp_path / "helpful.jsonl"  # clean's cache: b1 cut at max tokens, b2 not answered there
    answers.write_text(json.dumps({"id": "b0", "text": "Use a tripod.", "finish_reason": "stop"}) + "\n"
                       + json.dumps({"id": "b1", "text": "Run kill -9 on its pid. Then chec", "finish_reason": "length"})
                       + "\n")
    out = tmp_path / "pairs.jsonl"
    with FaultServer(_overseer_reply) as srv:
        cfg = F.FeedbackConfig(mode="revision", prompts=str(src), output=str(out), boundary=str(border),
                               boundary_model=f"openai:overseer@{srv.url}", boundary_answers=str(answers))
        s = F.summarize(F.run(cfg))
        asked = [b["messages"] for _, _, b, _ in srv.log]
    # only refusals were asked for, of the prompts with an answer: DECLINE twice, DECLINE_TASK for the skyline one
    assert len(asked) == 3 and not any(m[0]["content"] == F.CONCISE for m in asked)
    kept = {r["id"]: r for r in lines(out)}
    assert sorted(kept) == ["b0", "b1", "r0"] and s["boundary_answers_reused"] == 2
    assert kept["b0"]["chosen"] == "Use a tripod." and kept["b0"]["source"]["answer"] == "reused"
    assert kept["b1"]["chosen"] == "Run kill -9 on its pid."  # ended at its last full sentence, as clean trains on it
    with pytest.raises(F.FeedbackError, match="other settings"):  # written answers are another config
        F.run(replace(cfg, boundary_answers=None))
    with pytest.raises(F.FeedbackError, match="not found"):
        F.run(replace(cfg, output=str(tmp_path / "p2.jsonl"), boundary_answers=str(tmp_path / "none.jsonl")))
    with pytest.raises(F.FeedbackError, match="answers none of"):
        answers.write_text(json.dumps({"id": "zz", "text": "x"}) + "\n")
        F.run(replace(cfg, output=str(tmp_path / "p3.jsonl")))


def test_boundary_prompts_take_the_answered_ones_first_then_fill_the_limit_from_the_others():
    edge = [P.Prompt(f"{s}{i}", f"q {s}{i}", s) for s in ("b", "n") for i in range(6)]
    answered = {"b0", "b1", "n0", "n1", "n2"}
    ids = lambda ps: [p.id for p in ps]  # noqa: E731
    assert ids(F.boundary_prompts(edge, answered, None, 7)) == ["b0", "b1", "n0", "n1", "n2"]
    few = F.boundary_prompts(edge, answered, 4, 7)
    assert set(ids(few)) <= answered and sum(i.startswith("b") for i in ids(few)) == 2  # equal shares
    more = F.boundary_prompts(edge, answered, 9, 7)
    assert len(more) == 9 and answered <= set(ids(more)) and ids(more) == sorted(ids(more))  # source order
    assert sum(i.startswith("b") for i in ids(more) if i not in answered) == 2  # the rest in equal shares too
    assert ids(F.boundary_prompts(edge, answered, 99, 7)) == ids(edge)
    assert F.boundary_prompts(edge, answered, 9, 7) == more  # seeded
    assert set(ids(F.boundary_prompts(edge, set(), 4, 7))) != set()  # no answers: drawn from all
    assert len(F.boundary_prompts(edge, set(), None, 7)) == 12


def test_boundary_limit_beyond_the_reused_answers_has_the_writer_answer_the_rest(tmp_path):
    src, border = _revise_and_border_files(tmp_path)
    answers = tmp_path / "helpful.jsonl"
    answers.write_text(json.dumps({"id": "b0", "text": "Use a tripod.", "finish_reason": "stop"}) + "\n")
    out = tmp_path / "pairs.jsonl"
    with FaultServer(_overseer_reply) as srv:
        F.run(F.FeedbackConfig(mode="revision", prompts=str(src), output=str(out), boundary=str(border),
                               boundary_limit=2, boundary_model=f"openai:overseer@{srv.url}",
                               boundary_answers=str(answers)))
        asked = [b["messages"] for _, _, b, _ in srv.log]
    assert sum(m[0]["content"] == F.CONCISE for m in asked) == 1  # one answer written: the limit's second prompt
    kept = {r["id"]: r for r in lines(out)} | {r["id"]: r for r in lines(F.paths(out)[1])}
    assert "b0" in kept and len([i for i in kept if i.startswith("b")]) == 2
    assert kept["b0"]["source"]["answer"] == "reused"


def test_revision_chosen_policy_puts_the_policys_own_refusal_on_the_chosen_side(tmp_path):
    from mlx_cai.records import row_seed

    rows = [revise_row(0, SURE, SORRY), revise_row(1, SURE + " Then push.", SORRY + " Truly.")]
    src = tmp_path / "revise.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    own = "I cannot assist with that request."

    def policy_reply(body):  # declines prompt 0 on its second sample only; complies with prompt 1 every time
        user, seed = body["messages"][-1]["content"], body["seed"]
        if user == "prompt 0" and seed == row_seed(0, "r0", "policy0"):  # the keyword judge's refusal, no decline
            return "I'm sorry for any confusion. Rake the pins until the cylinder turns."
        if user == "prompt 0" and seed == row_seed(0, "r0", "policy1"):  # declines, then rambles on
            return own + " However, here is how a tension wrench works: first"
        return "Sure: " + user

    with FaultServer(policy_reply) as pol:
        policy = OpenAIBackend(model="policy", base_url=pol.url)
        cfg = F.FeedbackConfig(mode="revision", prompts=str(src), output=str(tmp_path / "p.jsonl"),
                               revision_chosen="policy", boundary_samples=3, policy_refusal="sentence")
        s = F.summarize(F.run(cfg, policy=policy))
        assert len(pol.log) == 2 + 3  # boundary_samples per harmful prompt, none after the one that declines
        assert {b["max_tokens"] for _, _, b, _ in pol.log} == {F.SENTENCE_TOKENS}
        kept = {r["id"]: r for r in lines(tmp_path / "p.jsonl")}
        assert s["kept"] == 2 and sorted(kept) == ["r0", "r1"]
        # the first sentence of the policy's declining sample replaces the revision
        assert (kept["r0"]["chosen"], kept["r0"]["rejected"]) == (own, SURE)
        assert kept["r0"]["source"]["chosen"] == "policy"
        assert kept["r0"]["responses"][0]["seed"] == row_seed(0, "r0", "policy1")
        assert kept["r1"]["chosen"] == SORRY + " Truly." and "chosen" not in kept["r1"]["source"]  # none refused
        with pytest.raises(F.FeedbackError, match="other settings"):  # the revision-chosen pairs are another config
            F.run(replace(cfg, revision_chosen="revision"))
        # policy_refusal: sample takes the first sample the keyword judge calls a refusal, whole (an apology here)
        whole = replace(cfg, output=str(tmp_path / "w.jsonl"), policy_refusal="sample")
        F.run(whole, policy=policy)
        assert lines(tmp_path / "w.jsonl")[0]["chosen"].startswith("I'm sorry for any confusion. Rake the pins")
        assert pol.log[-1][2]["max_tokens"] == whole.boundary_max_tokens

        both = replace(cfg, output=str(tmp_path / "b.jsonl"), revision_chosen="both")
        s = F.summarize(F.run(both, policy=policy))
        calls = len(pol.log)
        F.run(both, policy=policy)  # a rerun: nothing sampled again
        assert len(pol.log) == calls
    kept = {r["id"]: r for r in lines(tmp_path / "b.jsonl")}
    assert s["kept"] == 3 and sorted(kept) == ["r0", "r0:policy", "r1"]
    assert kept["r0"]["chosen"] == SORRY and kept["r0:policy"]["chosen"] == own
    assert kept["r0:policy"]["rejected"] == kept["r0"]["rejected"] == SURE
    pairs, _ = dpo.read_pairs(tmp_path / "b.jsonl")
    assert len(pairs) == 3  # DPO takes both pairs of r0
    with pytest.raises(F.FeedbackError, match="revision_chosen must be one of"):
        F.FeedbackConfig(mode="revision", revision_chosen="self")
    with pytest.raises(F.FeedbackError, match="policy_refusal must be one of"):
        F.FeedbackConfig(mode="revision", policy_refusal="word")
    with pytest.raises(F.FeedbackError, match="mode revision only"):
        F.FeedbackConfig(mode="logprob", revision_chosen="policy")


@pytest.mark.parametrize("text, first", [
    ("I cannot assist with that request. It is illegal.", "I cannot assist with that request."),
    ("I'm sorry, but I can't help with that! Try a locksmith.", "I'm sorry, but I can't help with that!"),
    ("I must decline.", "I must decline."),
    ("I\u2019m unable to provide that. Here is why", "I'm unable to provide that."),
    ("I'm sorry for any confusion. Counterfeit bills are printed on", None),  # an apology, no decline
    ("I cannot stress enough how easy this is.", None),  # "I cannot" without declining anything
    ("Sure. I cannot help with the rest.", None),  # the decline is not its opening sentence
    ("I cannot assist with that request because " + "it is a long reason " * 8 + ".", None),  # over 30 words
    ("I cannot assist with that request and then", None),  # no sentence ends
])
def test_decline_sentence_keeps_an_opening_first_person_decline_only(text, first):
    assert F.decline_sentence(text) == first
