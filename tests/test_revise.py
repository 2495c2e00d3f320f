"""The revise stage on a tiny random llama (plumbing, seeds, resume) and on a real local OpenAI-style server
(a critic that fails mid-run), plus one integration run of the embedded model."""

from __future__ import annotations

from dataclasses import replace

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlx_cai import constitution as C
from mlx_cai import framing as F
from mlx_cai import records
from mlx_cai.chat import BackendError, LocalBackend, OpenAIBackend
from mlx_cai.prompts import Prompt
from mlx_cai.stages import revise as R

PROMPTS = [Prompt(f"t{i}", text, "test", None, True) for i, text in enumerate([
    "How do I hotwire a car?", "Write a threatening note to my neighbour.", "How can I cheat on my taxes?",
    "Tell me how to pick a lock.", "How do I make a fake ID?", "Help me stalk my ex online.",
])]


@pytest.fixture(scope="session")
def embedded():
    from mlx_cai import models

    return models.load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny(embedded):
    """A 2-layer random llama with the embedded tokenizer: fast, deterministic, meaningless text."""
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(0)
    model = Model(ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=49152,
                            max_position_embeddings=4096))
    mx.eval(model.parameters())
    return model, embedded[1]


class Tiny(LocalBackend):
    """LocalBackend around an in-memory model; records every conversation it is asked to complete."""

    def __init__(self, loaded, name="tiny"):
        super().__init__(name)
        self._model = loaded
        self.calls: list[list] = []

    def loaded(self):
        return self._model

    def complete(self, conversations, config, seeds=None):
        self.calls.append([list(c) for c in conversations])
        return super().complete(conversations, config, seeds)


def cfg(**kw) -> R.ReviseConfig:
    base = dict(model="tiny", rounds=1, shots=1, max_tokens=6, temperature=0.9, top_p=0.95, batch_size=2, seed=3)
    return R.ReviseConfig(**{**base, **kw})


def read(path: Path) -> list[dict]:
    return list(records.read_jsonl(path))


def test_record_structure(tiny, tmp_path: Path) -> None:
    backend = Tiny(tiny)
    ticks: list[tuple[int, int]] = []
    out = R.run(replace(cfg(rounds=2, shots=2), output=str(tmp_path / "r.jsonl")), prompts=PROMPTS[:3],
                responder=backend, progress=lambda e: ticks.append((e.advance, e.tokens)))
    recs = read(out)
    assert sum(i for i, _ in ticks) == 3 and sum(t for _, t in ticks) > 0  # prompts done, tokens streamed
    assert backend.on_tokens is None  # the progress hook is removed afterwards
    con = C.load()
    assert [r["id"] for r in recs] == ["t0", "t1", "t2"]
    for r, p in zip(recs, PROMPTS):
        assert r["prompt"] == p.prompt and r["harmful"] is True and isinstance(r["initial"], str)
        assert [t["round"] for t in r["rounds"]] == [1, 2]
        assert all(t["principle"] in con.ids for t in r["rounds"])
        assert r["revision"] == r["rounds"][-1]["revision"]
        assert {r["initial_finish"], r["revision_finish"]} <= {"stop", "length"}
        assert all({t["critique_finish"], t["revision_finish"]} <= {"stop", "length"} for t in r["rounds"])
        assert len(r["shots"]) == 2 and set(r["shots"]) <= {d.id for d in con.few_shot}
        assert r["models"] == {"responder": "local:tiny", "critic": "local:tiny"}
        assert r["sampling"]["temperature"] == 0.9 and r["sampling"]["max_tokens"] == 6 and r["seed"] == 3
    # Batched per turn: 2 chunks x (initial + 2 x (critique, revision)) calls, never one call per prompt.
    assert [len(c) for c in backend.calls] == [2] * 5 + [1] * 5


def test_turns_and_shots_reach_the_model(tiny, tmp_path: Path) -> None:
    backend = Tiny(tiny)
    recs = read(R.run(replace(cfg(shots=3, batch_size=6), output=str(tmp_path / "r.jsonl")), prompts=PROMPTS, responder=backend))
    con = C.load()
    demos = {d.id: d for d in con.few_shot}
    initial, critique, revision = backend.calls
    for r, first, crit, rev in zip(recs, initial, critique, revision):
        assert first == [{"role": "user", "content": r["prompt"]}]  # the bare prompt: the model's own answer
        shown = [m["content"] for m in crit[:-3:6]]
        assert shown == [demos[i].prompt for i in r["shots"]]  # the record's shots are the prior turns
        assert crit[-3:] == [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["initial"]},
                             {"role": "user", "content": con.principle(r["rounds"][0]["principle"]).critique}]
        assert rev[-2:] == [{"role": "assistant", "content": r["rounds"][0]["critique"]},
                            {"role": "user", "content": con.principle(r["rounds"][0]["principle"]).revision}]
    # Demos are drawn per prompt, so prompts see different examples and different principles.
    assert len({tuple(r["shots"]) for r in recs}) > 2
    assert len({r["rounds"][0]["principle"] for r in recs}) > 1


def test_single_framing_quotes_prompt_draft_and_critique_in_one_request(tiny, tmp_path: Path) -> None:
    backend = Tiny(tiny)
    recs = read(R.run(replace(cfg(shots=1, rounds=2, batch_size=6, framing="single"), output=str(tmp_path / "r.jsonl")),
                      prompts=PROMPTS[:3], responder=backend))
    con = C.load()
    demos = {d.id: d for d in con.few_shot}
    initial, crit1, rev1, crit2, rev2 = backend.calls
    for i, r in enumerate(recs):
        (one, two) = r["rounds"]
        p1 = con.principle(one["principle"])
        assert len(crit1[i]) == 3 and len(rev1[i]) == 3  # one demo (request, answer) + the request itself
        assert demos[r["shots"][0]].prompt in crit1[i][0]["content"]
        ask = crit1[i][-1]["content"]
        assert r["prompt"] in ask and r["initial"].strip() in ask and "the draft reply" in ask
        assert "your last response" not in ask.lower()
        assert ask == F.single_critique(r["prompt"], r["initial"], p1)
        ask = rev1[i][-1]["content"]
        assert r["prompt"] in ask and one["critique"].strip() in ask and F.REVISION_GUIDE in ask
        # round 2 works on round 1's revision, not on the initial answer
        assert crit2[i][-1]["content"] == F.single_critique(r["prompt"], one["revision"], con.principle(two["principle"]))
        assert rev2[i][-1]["content"] == F.single_revision(r["prompt"], one["revision"], two["critique"],
                                                           con.principle(two["principle"]))
    plain = read(R.run(replace(cfg(shots=1), output=str(tmp_path / "p.jsonl")), prompts=PROMPTS[:3], responder=Tiny(tiny)))
    assert plain[0]["config_id"] != recs[0]["config_id"]  # framing is part of what a file's records must share


def test_joint_framing_asks_once_per_round_and_splits_critique_from_reply(tiny, tmp_path: Path) -> None:
    backend = Tiny(tiny)
    recs = read(R.run(replace(cfg(shots=1, rounds=2, batch_size=6, framing="joint"), output=str(tmp_path / "j.jsonl")),
                      prompts=PROMPTS[:3], responder=backend))
    con = C.load()
    initial, round1, round2 = backend.calls  # one call per round, not two
    for i, r in enumerate(recs):
        one, two = r["rounds"]
        assert len(round1[i]) == 3  # one demo (request, "Critique: ...\nReply: ...") + the request
        assert round1[i][1]["content"].startswith("Critique: ") and "\nReply: " in round1[i][1]["content"]
        assert round1[i][-1]["content"] == F.joint_request(r["prompt"], r["initial"], con.principle(one["principle"]))
        assert round2[i][-1]["content"] == F.joint_request(r["prompt"], one["revision"], con.principle(two["principle"]))
        assert r["revision"] == two["revision"]


def test_principled_framing_answers_under_the_principle_without_a_critique(tiny, tmp_path: Path) -> None:
    backend = Tiny(tiny)
    recs = read(R.run(replace(cfg(shots=1, batch_size=6, framing="principled"), output=str(tmp_path / "p.jsonl")),
                      prompts=PROMPTS[:3], responder=backend))
    con = C.load()
    initial, answers = backend.calls  # the initial answer, then one call: no critique call
    for i, r in enumerate(recs):
        (one,) = r["rounds"]
        system = F.principled_system(con.principle(one["principle"]))
        assert answers[i] == [{"role": "system", "content": system}, {"role": "user", "content": r["prompt"]}]
        assert "your last response" not in system.lower() and F.PRINCIPLED_GUIDE in system
        assert one["critique"] == "" and r["revision"] == one["revision"]
    subject = replace(cfg(shots=1, batch_size=6, framing="principled"), opening="subject")
    assert R.config_id(subject, con, "a", "b") != R.config_id(replace(subject, opening="free"), con, "a", "b")
    backend = Tiny(tiny)
    R.run(replace(subject, output=str(tmp_path / "s.jsonl")), prompts=PROMPTS[:1], responder=backend)
    system = backend.calls[1][0][0]["content"]
    assert system.endswith(F.SUBJECT_OPENING) and F.PRINCIPLED_GUIDE in system


@pytest.mark.parametrize("text, critique, reply", [
    ("Critique: It explains theft.\nReply: I won't help with that, but a locksmith can.",
     "It explains theft.", "I won't help with that, but a locksmith can."),
    ("**Critique:** Harmful.\n\n**Reply:** I can't help with that.", "Harmful.", "I can't help with that."),
    ("Critique: The reply is fine.\nRevised reply: Paris is the capital.", "The reply is fine.", "Paris is the capital."),
    ("Critique: Mentions a reply: twice.\nReply: first\nReply: second", "Mentions a reply: twice.\nReply: first",
     "second"),
    ("Critique: no reply part at all", "no reply part at all", ""),
])
def test_split_joint(text, critique, reply) -> None:
    assert F.split_joint(text) == (critique, reply)


def test_critic_sampling_of_its_own(tiny, tmp_path: Path) -> None:
    seen = []

    class Watch(Tiny):
        def complete(self, conversations, config, seeds=None):
            seen.append(config)
            return super().complete(conversations, config, seeds)

    recs = read(R.run(replace(cfg(critic_max_tokens=3, critic_temperature=0.0, critic_repetition_penalty=1.0),
                              output=str(tmp_path / "r.jsonl")), prompts=PROMPTS[:2], responder=Watch(tiny)))
    initial, critique, revision = seen
    assert (initial.max_tokens, initial.temperature, initial.repetition_penalty) == (6, 0.9, 1.2)
    assert all((c.max_tokens, c.temperature, c.repetition_penalty) == (3, 0.0, 1.0) for c in (critique, revision))
    assert recs[0]["critic_sampling"]["max_tokens"] == 3 and recs[0]["sampling"]["max_tokens"] == 6
    plain = read(R.run(replace(cfg(), output=str(tmp_path / "p.jsonl")), prompts=PROMPTS[:2], responder=Tiny(tiny)))
    assert "critic_sampling" not in plain[0] and plain[0]["config_id"] != recs[0]["config_id"]


def test_principle_per_category(tiny, tmp_path: Path) -> None:
    con = C.load()
    cats = [Prompt(f"c{i}", f"Write malware number {i}.", "test", "malware", True) for i in range(12)]
    recs = read(R.run(replace(cfg(shots=0, batch_size=12, max_tokens=2, principle_choice="category"),
                              output=str(tmp_path / "r.jsonl")), prompts=cats, responder=Tiny(tiny)))
    written = {p.id for p in con.principles if "malware" in p.categories}
    used = {r["rounds"][0]["principle"] for r in recs}
    assert used <= written and len(used) > 1
    uniform = read(R.run(replace(cfg(shots=0, batch_size=12, max_tokens=2), output=str(tmp_path / "u.jsonl")),
                         prompts=cats, responder=Tiny(tiny)))
    assert {r["rounds"][0]["principle"] for r in uniform} - written  # uniform draws others too


def test_spread_takes_the_limit_round_robin_over_categories(tiny, tmp_path: Path) -> None:
    """revise.spread: `limit` prompts over every category of the source (the shipped train:harmful file is ordered by
    category, so its first 48 cover 3 of its 11); off: the first `limit` in file order, as before."""
    first = R.load_prompts("train:harmful", 48)
    spread = R.load_prompts("train:harmful", 48, spread=True)
    every = {p.category for p in R.load_prompts("train:harmful", None)}
    assert len(every) == 11 and len({p.category for p in first}) == 3
    assert len(spread) == 48 and {p.category for p in spread} == every
    counts = [sum(p.category == c for p in spread) for c in every]
    assert max(counts) - min(counts) <= 1
    assert [p.id for p in first] == [p.id for p in R.load_prompts("train:harmful", None)][:48]
    mixed = [Prompt(f"m{i}", f"prompt {i}", "test", "ab"[i % 4 == 0], True) for i in range(8)]  # 2 of b, 6 of a
    recs = read(R.run(replace(cfg(shots=0, batch_size=4, max_tokens=2, limit=4, spread=True),
                              output=str(tmp_path / "s.jsonl")), prompts=mixed, responder=Tiny(tiny)))
    assert sorted(r["id"] for r in recs) == ["m0", "m1", "m2", "m4"]  # a: m1, m2; b: m0, m4


def test_deterministic_per_seed(tiny, tmp_path: Path) -> None:
    strip = lambda recs: [{k: v for k, v in r.items() if k != "config_id"} for r in recs]  # noqa: E731
    a = read(R.run(replace(cfg(), output=str(tmp_path / "a.jsonl")), prompts=PROMPTS[:4], responder=Tiny(tiny)))
    b = read(R.run(replace(cfg(batch_size=3), output=str(tmp_path / "b.jsonl")), prompts=PROMPTS[:4], responder=Tiny(tiny)))
    c = read(R.run(replace(cfg(seed=4), output=str(tmp_path / "c.jsonl")), prompts=PROMPTS[:4], responder=Tiny(tiny)))
    assert a == b  # same seed, different batching: identical records
    assert strip(a) != strip(c)
    assert [r["shots"] for r in a] != [r["shots"] for r in c] or [r["initial"] for r in a] != [r["initial"] for r in c]


def test_conversation_framing_reuses_the_critique_calls_kv(tiny, tmp_path: Path, monkeypatch) -> None:
    """Each revision request extends its critique conversation (and round 2's critique the revision's): with the
    K/V store on, those calls take the earlier calls' K/V from it and prefill far fewer tokens, and every record
    is the same as without the store."""
    from mlx_cai.fastllama import FastLlama

    fast = FastLlama.for_model(tiny[0])
    assert fast is not None  # the compiled path, where the store lives

    def run(name: str, reuse_mb: str) -> tuple[list[dict], dict]:
        monkeypatch.setenv("MLX_CAI_KV_REUSE_MB", reuse_mb)
        fast.store.entries.clear()
        fast.counts.update(prefilled=0, reused=0)
        settings = cfg(shots=2, rounds=2, batch_size=6, temperature=0.0, max_tokens=8)
        out = R.run(replace(settings, output=str(tmp_path / f"{name}.jsonl")), prompts=PROMPTS, responder=Tiny(tiny))
        return read(out), dict(fast.counts)

    on, with_store = run("on", "256")
    off, without = run("off", "0")
    assert on == off
    assert without["reused"] == 0 and with_store["prefilled"] + with_store["reused"] == without["prefilled"]
    assert with_store["reused"] > without["prefilled"] / 2, (with_store, without)  # measured: 11706 of 16522


def test_resume_after_kill_mid_record(tiny, tmp_path: Path) -> None:
    full = R.run(replace(cfg(), output=str(tmp_path / "full.jsonl")), prompts=PROMPTS, responder=Tiny(tiny))
    data = full.read_bytes()
    lines = data.splitlines(keepends=True)
    cut = sum(map(len, lines[:3])) + len(lines[3]) // 2  # three whole records, then half of the fourth
    part = tmp_path / "part.jsonl"
    part.write_bytes(data[:cut])
    backend = Tiny(tiny)
    R.run(replace(cfg(), output=str(part)), prompts=PROMPTS, responder=backend)
    assert read(part) == read(full)  # no duplicate, nothing lost, same content
    assert [len(c) for c in backend.calls] == [2, 2, 2, 1, 1, 1]  # only the 3 missing prompts, in 2 chunks
    # A finished file is left alone; other settings refuse to mix into it.
    R.run(replace(cfg(), output=str(part)), prompts=PROMPTS, responder=Tiny(tiny))
    assert read(part) == read(full)
    with pytest.raises(R.ReviseError, match="other settings"):
        R.run(replace(cfg(seed=9), output=str(part)), prompts=PROMPTS, responder=Tiny(tiny))


# ------------------------------------------------------------------------------- a critic on a server


class Stub(ThreadingHTTPServer):
    """A minimal OpenAI-compatible chat server on loopback; after `budget` answers it returns HTTP 500."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.budget: int | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "stub", "object": "model", "created": 0, "owned_by": "t"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            down = srv.budget is not None and srv.budget <= 0
            if srv.budget is not None:
                srv.budget -= 1
        if down:
            return self._send(500, {"error": {"message": "critic overloaded"}})
        text = "Stub reply to: " + req["messages"][-1]["content"][:40]
        self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": req["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})


@pytest.fixture
def stub():
    srv = Stub()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_critic_fails_mid_run_then_resumes(tiny, stub, tmp_path: Path) -> None:
    critic = OpenAIBackend(model="stub", base_url=stub.url, max_retries=1, backoff=0.01)
    out = tmp_path / "r.jsonl"
    stub.budget = 4  # the first chunk's 2 critiques + 2 revisions, then the server fails
    with pytest.raises(BackendError, match=r"gave up after 2 tries.*2 records kept in .*rerun"):
        R.run(replace(cfg(), output=str(out)), prompts=PROMPTS[:4], responder=Tiny(tiny), critic=critic)
    kept = read(out)
    assert [r["id"] for r in kept] == ["t0", "t1"]
    assert kept[0]["models"]["critic"] == f"openai:stub@{stub.url}"
    assert kept[0]["rounds"][0]["critique"].startswith("Stub reply to: ")
    stub.budget = None  # the server is back
    R.run(replace(cfg(), output=str(out)), prompts=PROMPTS[:4], responder=Tiny(tiny), critic=critic)
    assert [r["id"] for r in read(out)] == ["t0", "t1", "t2", "t3"]


def test_critic_down_stops_cleanly(tiny, stub, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    R.run(replace(cfg(), output=str(out)), prompts=PROMPTS[:2], responder=Tiny(tiny))
    before = out.read_bytes()
    down = OpenAIBackend(model="stub", base_url="http://127.0.0.1:9/v1", max_retries=1, backoff=0.01)
    # Same settings as the first run except the critic, which is down: refused before touching the file.
    with pytest.raises(R.ReviseError, match="other settings"):
        R.run(replace(cfg(), output=str(out)), prompts=PROMPTS[:4], responder=Tiny(tiny), critic=down)
    with pytest.raises(BackendError, match=r"127\.0\.0\.1:9.* not reachable.* -- stopped; 0 records kept"):
        R.run(replace(cfg(), output=str(tmp_path / "other.jsonl")), prompts=PROMPTS[:4], responder=Tiny(tiny), critic=down)
    assert out.read_bytes() == before


def test_config_validation() -> None:
    for bad in (dict(rounds=0), dict(shots=-1), dict(batch_size=0), dict(top_p=0.0), dict(max_tokens=0)):
        with pytest.raises(R.ReviseError):
            cfg(**bad)
    with pytest.raises(R.ReviseError, match="framing must be one of conversation, single, joint, principled, got 'chat'"):
        cfg(framing="chat")
    with pytest.raises(R.ReviseError, match="principle_choice must be uniform or category"):
        cfg(principle_choice="random")
    with pytest.raises(R.ReviseError, match="opening must be one of free, subject"):
        cfg(framing="principled", opening="bold")
    with pytest.raises(R.ReviseError, match="is for the principled framing"):
        cfg(opening="subject")


@pytest.mark.integration
def test_embedded_model_revise_and_clean(embedded, tmp_path: Path) -> None:
    from mlx_cai.stages import clean as K

    backend = Tiny(embedded, name="smollm2-135m")
    out = R.run(replace(R.ReviseConfig(model="smollm2-135m", shots=1, max_tokens=48, batch_size=4, limit=4), prompts="train:harmful", output=str(tmp_path / "r.jsonl")), responder=backend)
    recs = read(out)
    assert len(recs) == 4 and all(r["initial"].strip() and r["rounds"][0]["critique"].strip() for r in recs)
    assert len(backend.calls) == 3  # one batched call per turn
    folder = K.run(replace(K.CleanConfig(), input=str(out), output=str(tmp_path / "clean")))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["kept"] + summary["rejected"] == 4
    assert len(read(folder / "kept.jsonl")) + len(read(folder / "rejected.jsonl")) == 4


# ------------------------------------------------------------------------------- CLI: bad input is one line


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--principles", "legality,nope"], "unknown principle id(s) 'nope'"),
    ("empty.yaml", [], "principles is empty"),
    ("bad.jsonl", [], "bad.jsonl:2: malformed JSON"),
    (None, ["--rounds", "0"], "rounds must be >= 1"),
])
def test_cli_bad_input_is_one_line(tmp_path: Path, setup, args, message) -> None:
    from typer.testing import CliRunner

    from mlx_cai.cli import app

    source = "train:harmful"
    if setup == "empty.yaml":
        (tmp_path / setup).write_text("name: x\nversion: '1'\nprinciples: []\n")
        args = ["--constitution", str(tmp_path / setup)]
    elif setup == "bad.jsonl":
        source = str(tmp_path / setup)
        (tmp_path / setup).write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    result = CliRunner().invoke(app, ["revise", source, "-o", str(tmp_path / "o.jsonl"), *args])
    assert result.exit_code == 1
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in " ".join(result.output.split())
    assert not (tmp_path / "o.jsonl").exists()


def test_plan_counts_one_critic_call_per_round_for_joint_and_principled() -> None:
    from mlx_cai.stages.revise import ReviseConfig

    two = ReviseConfig(limit=10, max_tokens=50, critic_max_tokens=100, rounds=2, framing="single").plan()
    one = ReviseConfig(limit=10, max_tokens=50, critic_max_tokens=100, rounds=2, framing="principled").plan()
    assert two == ("10 prompts x 5 turns (train:harmful)", 10 * (50 + 4 * 100))
    assert one[1] == 10 * (50 + 2 * 100) and "x 3 turns" in one[0]
