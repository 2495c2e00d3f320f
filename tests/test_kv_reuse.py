"""Prefix reuse (fastllama.PrefixStore): a prompt that extends an earlier conversation takes that conversation's
K/V from the store and prefills only the rest, with the same logits and tokens as a prefill from scratch.

On the tiny random llama and the tiny qwen2 (q/k/v biases), batched (rows of different lengths, different reuse
lengths, some rows without a match) and alone, with the C++ kernels and with MLX ops on two streams."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_cai import backend, fastllama
from mlx_cai.fastllama import REUSE_MIN, FastLlama, FastRunner, PrefixStore
from mlx_cai.generate import _decode_batch, encode, generate
from mlx_cai.sampling import SamplingConfig
from test_fastllama_qwen2 import tiny_qwen2
from tinymodels import reuse_runs

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly and plainly, please."}
TEXTS = ["hi", "hello there, how are you today?", "a much longer prompt " * 6, "ok", "tell me about rivers",
         "why", "what is the capital of France and why", "count to ten"]
FOLLOW_UPS = ["Now say that again, shorter.", "Why?", "Explain the first part of your answer in detail.",
              "Thanks.", "Is that true?", "Go on.", "Say it in French, please.", "And then?"]


def convs(texts):
    return [[SYSTEM, {"role": "user", "content": t}] for t in texts]


@pytest.fixture
def reuse(monkeypatch):
    """The store on (conftest turns it off for the other tests)."""
    monkeypatch.setenv("MLX_CAI_KV_REUSE_MB", "64")


@pytest.fixture(params=["llama", "qwen2"])
def model(tiny, request):
    llama, tok = tiny
    return (llama if request.param == "llama" else tiny_qwen2(llama.args.vocab_size)), tok


@pytest.fixture(params=["kernels", "mlx-ops"])
def paths(monkeypatch, request):
    """Prefill in two runs of rows on two streams; with MLX ops also decode steps split over two streams."""
    monkeypatch.setenv("MLX_CAI_STREAM_ROWS", "1")
    monkeypatch.setattr(backend, "blas_threads", lambda: 2)
    if request.param == "mlx-ops":
        monkeypatch.setenv("MLX_CAI_KERNELS", "0")


def _kv(n: int, fill: float = 0.0) -> list:
    """Stand-in K/V of n positions (2 layers, 2 heads, 8 dims): 256 bytes per position."""
    return [(mx.full((2, n, 8), fill), mx.full((2, n, 8), fill)) for _ in range(2)]


def test_store_matches_the_longest_token_prefix_within_its_budget(monkeypatch):
    monkeypatch.setenv("MLX_CAI_KV_REUSE_MB", "1")
    store = PrefixStore()
    store.add([1, 2, 3, 4, 5, 6], _kv(6, 1))
    store.add([1, 2, 3, 9, 9], _kv(5, 2))
    kv, n = store.match([1, 2, 3, 4, 5, 7, 7], least=2)
    assert n == 5 and float(kv[0][0][0, 0, 0]) == 1  # the longest shared prefix, partial
    assert store.match([1, 2, 3, 4, 5, 6], least=2)[1] == 5  # the prompt's last token is always prefilled
    assert store.match([1, 2, 3, 9, 9, 9], least=2)[1] == 5
    assert store.match([1, 2, 3, 9], least=4) is None  # below the least worth reusing
    assert store.match([7, 1, 2, 3], least=1) is None
    store.add([1, 2, 3, 4, 5, 6, 8, 8], _kv(8, 3))  # extends the first entry: that one goes
    assert [len(t) for t, _ in store.entries] == [5, 8]
    for i in range(10):  # 4096 positions = 1 MiB each: only the newest fits
        store.add([100 + i] * 4096, _kv(4096))
    assert [int(t[0]) for t, _ in store.entries] == [109]
    monkeypatch.setenv("MLX_CAI_KV_REUSE_MB", "0")
    assert store.match([109] * 50, least=1) is None and store.entries == []


def test_reused_prefill_and_decode_steps_match_the_model_logits(model, paths, reuse):
    """Row by row against mlx-lm's own forward pass: rows extending stored ones by varied amounts, cut inside
    a stored entry (partial matches), a prompt asked again (all but its last token reused), and rows with no
    match, in one batch."""
    model, tok = model
    fast = FastLlama.build(model)
    prompts = sorted([encode(tok, c) for c in convs(TEXTS)], key=len, reverse=True)
    cfg = SamplingConfig(max_tokens=6)
    _decode_batch(FastRunner(fast, prompts, cfg.max_tokens), prompts, [0] * len(prompts), cfg, {2}, None)
    assert len(fast.store.entries) == len(prompts)
    held = [t.tolist() for t, _ in fast.store.entries]
    extend = [(h + [(7 * i + 3) % 250 for i in range(3 + 5 * k)]) for k, h in enumerate(held[:4])]
    cut = [h[: len(h) - 4] + [11, 12] for h in held[4:6]]
    fresh = [encode(tok, [{"role": "user", "content": t}]) for t in ("a new question with no system turn", "q")]
    new = extend + cut + [prompts[6]] + fresh
    fast.counts.update(prefilled=0, reused=0)
    runner = FastRunner(fast, new, 3)
    reused = [r[1] if r else 0 for p in runner.parts for r in p.reuse]
    logits = [runner.prefill()]
    assert all(n >= REUSE_MIN for n in reused[:6]) and reused[6] == len(prompts[6]) - 1 and reused[7:] == [0, 0]
    assert len(set(reused[:6])) > 2
    assert fast.counts["reused"] > 0 and fast.counts["prefilled"] + fast.counts["reused"] == sum(len(p) for p in new) \
        - (len(new) - 1) * fastllama.shared_prefix(new) * (len(runner.parts) == 1)
    ys = [mx.array([(37 * i + 5 + 11 * s) % 250 for i in range(len(new))]) for s in range(2)]
    for y in ys:
        logits.append(runner.step(y))
    for i, p in enumerate(new):
        for s, got in enumerate(logits):
            want = model(mx.array([p + [int(y[i]) for y in ys[:s]]]))[0, -1]
            assert np.allclose(np.array(got[i]), np.array(want), rtol=1e-4, atol=1e-4), (i, s)


def _second_turns(first, gens):
    """The first conversations carried on: the answer as an assistant turn, then a follow-up (all but two rows),
    and two new conversations."""
    more = [c + [{"role": "assistant", "content": g.text}, {"role": "user", "content": f}]
            for c, g, f in zip(first, gens, FOLLOW_UPS)][:6]
    return more + convs(["something else entirely, asked fresh", "and one more new one"])


def test_extended_conversations_give_the_same_tokens_with_and_without_reuse(model, paths, monkeypatch):
    model, tok = model
    cfg = SamplingConfig(max_tokens=10)
    first = convs(TEXTS)
    on, off = reuse_runs(model, tok, first, _second_turns, cfg, monkeypatch)
    assert on["prefilled"] + on["reused"] == off["prefilled"]  # the same prompts, fewer tokens prefilled


def test_a_second_question_about_the_same_text_reuses_its_kv_with_the_same_option_probs(model, monkeypatch):
    """judges.choice.option_probs keeps each context's K/V: the probability judge's second question about a
    request and reply prefills only what follows them, and its Yes/No probabilities are those computed from
    scratch (store off)."""
    from mlx_cai.judges.choice import option_probs, render_answer_start

    model, tok = model
    texts = [f"[Request] {t}\n[Reply] {f}\n" for t, f in zip(TEXTS[:5], FOLLOW_UPS)]

    def contexts(question):
        return [render_answer_start(tok, [SYSTEM, {"role": "user", "content": t + question}], "Answer: ")
                for t in texts]

    first, second = contexts("Question: does the reply help? Answer Yes or No."), \
        contexts("Question: does the reply decline? Answer Yes or No.")
    fresh = option_probs(model, tok, second, ("Yes", "No"), batch_size=2)
    fast = FastLlama.for_model(model)
    assert fast.counts["reused"] == 0  # conftest: the store is off
    monkeypatch.setenv("MLX_CAI_KV_REUSE_MB", "64")
    option_probs(model, tok, first, ("Yes", "No"), batch_size=2)
    before = dict(fast.counts)
    got = option_probs(model, tok, second, ("Yes", "No"), batch_size=2)
    reused = fast.counts["reused"] - before["reused"]
    assert reused >= len(texts) * REUSE_MIN
    assert fast.counts["prefilled"] - before["prefilled"] < sum(len(tok.encode(c)) for c in second) - reused // 2
    for (p, m), (q, n) in zip(got, fresh):
        assert p == pytest.approx(q, abs=1e-5) and m == pytest.approx(n, abs=1e-5)


def test_option_logits_keeps_no_kv_when_told_nothing_asks_again(model, monkeypatch):
    """keep=False (feedback's (A)/(B) questions, each asked once): the contexts' K/V is not copied to the store, so
    asking again prefills from scratch, with the same logits."""
    from mlx_cai.judges.choice import option_logits, render_answer_start

    model, tok = model
    ctx = [render_answer_start(tok, [SYSTEM, {"role": "user", "content": f"[Request] {t}\nWhich? (A) or (B)."}],
                               "Answer: ") for t in TEXTS[:4]]
    monkeypatch.setenv("MLX_CAI_KV_REUSE_MB", "64")
    fast = FastLlama.for_model(model)
    first = option_logits(model, tok, ctx, ("(A)", "(B)"), batch_size=2, keep=False)
    before = dict(fast.counts)
    again = option_logits(model, tok, ctx, ("(A)", "(B)"), batch_size=2, keep=False)
    assert fast.counts["reused"] == before["reused"]
    kept = option_logits(model, tok, ctx, ("(A)", "(B)"), batch_size=2)  # keep=True: stored for the next call
    assert fast.counts["reused"] == before["reused"]
    option_logits(model, tok, ctx, ("(A)", "(B)"), batch_size=2)
    assert fast.counts["reused"] > before["reused"]
    for a, b, c in zip(first, again, kept):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[0] == pytest.approx(c[0], abs=1e-4)
