"""The compiled decode path (mlx_cai.fastllama) on models kept quantized: QuantizedLinear, LoRALinear over it and
QuantizedEmbedding (MLX_CAI_DEQUANTIZE=0, as a Mac runs mlx-community's 4-bit models).

Tiny random llama and qwen2 models (mlx-lm's own classes, float32, weights large enough that greedy rows vary)
quantized by `mlx.nn.quantize` (4- and 8-bit, groups of 32 and 64, embeddings included, tied and untied heads),
with the tiny llama's byte-level tokenizer (conftest's `tiny`). The fast path's greedy tokens equal mlx-lm's
generic path's, batched and alone, with and without a LoRA adapter, with a shared prefix and with K/V reuse; with
the C++ kernels (decode rows on `kernels.linear_rows_q`, prefill on them or dequantized blocks) and with MLX ops;
and `build` keeps the weights quantized (uint32 codes, no float copy of a weight).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_cai import backend, fastllama, kernels
from mlx_cai.fastllama import FastLlama, FastRunner, QLinear, QWeight
from mlx_cai.generate import _decode_batch, encode, generate
from mlx_cai.sampling import SamplingConfig
from tinymodels import add_lora, assert_matches_forward, randomize, reuse_runs
from test_fastllama_qwen2 import tiny_qwen2

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly and plainly, please."}
TEXTS = ["hi", "hello there, how are you today?", "a much longer prompt " * 6, "ok", "tell me about rivers",
         "why", "what is the capital of France and why", "count to ten"]
FOLLOW_UPS = ["Now say that again, shorter.", "Why?", "Explain the first part of your answer in detail.",
              "Thanks.", "Is that true?", "Go on."]
# (architecture, bits, group size, tied embeddings)
QUANTS = [("llama", 4, 64, False), ("llama", 8, 32, True), ("qwen2", 4, 32, True), ("qwen2", 8, 64, False)]
built = pytest.mark.skipif(kernels._ext is None, reason=f"kernels not built: {kernels._ERROR}")


def convs(texts):
    return [[SYSTEM, {"role": "user", "content": t}] for t in texts]


def tiny_llama(vocab: int, tied: bool, seed: int = 0):
    """A random 2-layer llama (hidden 64, 4 heads, 2 K/V heads), float32, layers large next to the embeddings
    (as tiny_qwen2: the tiny GGUF llama's greedy rows just repeat one token)."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=vocab, num_key_value_heads=2,
                           max_position_embeddings=1024, tie_word_embeddings=tied)
    model = llama.Model(args)
    randomize(model, seed)
    return model


def quantized(kind: str, vocab: int, bits: int, group: int, tied: bool, predicate=None):
    model = (tiny_llama if kind == "llama" else tiny_qwen2)(vocab, tied=tied)
    nn.quantize(model, group, bits, class_predicate=predicate)
    model.eval()
    mx.eval(model.parameters())
    return model


def qid(q) -> str:
    return q if isinstance(q, str) else f"{q[0]}-{q[1]}bit-g{q[2]}-{'tied' if q[3] else 'untied'}"


@pytest.fixture(params=QUANTS, ids=qid)
def qmodel(tiny, request):
    """(tiny quantized model, the tiny llama's tokenizer, its (kind, bits, group, tied)). Fresh per test."""
    llama, tok = tiny
    kind, bits, group, tied = request.param
    return quantized(kind, llama.args.vocab_size, bits, group, tied), tok, request.param


@pytest.fixture(params=["kernels", "mlx-ops"])
def paths(monkeypatch, request):
    """With the C++ kernels (every product of up to Q_ROWS_MAX rows on linear_rows_q: all of these tiny prompts)
    and with MLX ops (MLX_CAI_KERNELS=0: dequantized blocks and BLAS, quantized_matmul for one row, decode steps
    split over two streams); prefill in two runs of rows either way. Also "kernels-dequant" (Q_ROWS_MAX 4: decode
    steps on the kernels, prefill on dequantized blocks) and "quantized-matmul" (MLX ops, every product on
    mx.quantized_matmul and fused blocks: what Metal and CUDA run)."""
    monkeypatch.setenv("MLX_CAI_STREAM_ROWS", "1")
    monkeypatch.setattr(backend, "blas_threads", lambda: 2)
    if request.param in ("mlx-ops", "quantized-matmul"):
        monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    elif kernels._ext is None:
        pytest.skip(f"kernels not built: {kernels._ERROR}")
    if request.param == "kernels-dequant":
        monkeypatch.setattr(fastllama, "Q_ROWS_MAX", 4)
    if request.param == "quantized-matmul":
        monkeypatch.setattr(fastllama, "CPU_QMM_ROWS", 10**9)
    return request.param


def pairs(*which):
    """Each quantization with one of the paths (in turn), for the slower tests."""
    which = which or ("kernels", "mlx-ops")
    return pytest.mark.parametrize("qmodel,paths", [(q, which[i % len(which)]) for i, q in enumerate(QUANTS)],
                                   indirect=True, ids=qid)


def _close(a, b, tol=1e-4):
    return np.allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def _arrays(obj, seen=None):
    """Every mx.array an object holds (dataclasses, tuples, lists, dicts), once each."""
    seen = set() if seen is None else seen
    if isinstance(obj, mx.array):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _arrays(x, seen)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _arrays(x, seen)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _arrays(getattr(obj, name), seen)


def _dense_shapes(model) -> set:
    """The (out, in) shapes, and their transposes, of every weight of `model` (fused q/k/v and gate/up too)."""
    shapes = set()
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            n, k = m.weight.shape[0], m.weight.shape[1] * 32 // m.bits
            shapes |= {(n, k), (k, n)}
    a, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    k = a.q_proj.weight.shape[1] * 32 // a.q_proj.bits
    for n in (a.q_proj.weight.shape[0] + 2 * a.k_proj.weight.shape[0], 2 * mlp.gate_proj.weight.shape[0]):
        shapes |= {(n, k), (k, n)}
    return shapes


@pytest.mark.parametrize("kern", ["kernels", "mlx-ops"])
def test_build_takes_quantized_models_and_keeps_them_quantized(qmodel, kern, monkeypatch):
    model, _, (kind, bits, group, tied) = qmodel
    if kern == "mlx-ops":
        monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    elif kernels._ext is None:
        pytest.skip(f"kernels not built: {kernels._ERROR}")
    fast = FastLlama.build(model)
    assert fast is not None
    assert isinstance(fast.embed, QWeight) and fast.embed.bits == bits and isinstance(fast.lm_head, QLinear)
    held = list(_arrays(fast.layers)) + list(_arrays([fast.embed, fast.lm_head, fast.norm]))
    shapes = _dense_shapes(model)
    for x in held:  # no float array of any weight's shape: nothing was dequantized and kept
        assert not (mx.issubdtype(x.dtype, mx.floating) and x.ndim >= 2 and tuple(x.shape[-2:]) in shapes), x.shape
    for lyr, block in zip(fast.layers, model.model.layers):
        for w in (lyr.w_qkv, lyr.w_o, lyr.w_gu, lyr.w_down):
            assert isinstance(w, QLinear) and len(w.parts) == 1 and w.lora is None
            part = w.parts[0]
            assert (part.bits, part.group_size) == (bits, group)
            assert all(c.dtype == mx.uint32 and c.shape[1] * 32 // bits == s.shape[1] * group for c, s, _ in part.blocks)
            if kern == "kernels":  # the model's own triples (no copy) and one pack, uint32
                assert part.packed is not None and part.packed.dtype == mx.uint32
            else:  # fused: one concatenated quantized copy, no pack
                assert part.packed is None and len(part.blocks) == 1
        a = block.self_attn
        assert lyr.w_qkv.n_out == sum(p.weight.shape[0] for p in (a.q_proj, a.k_proj, a.v_proj))
        if kern == "kernels":
            assert [b[0] for b in lyr.w_qkv.parts[0].blocks] == [p.weight for p in (a.q_proj, a.k_proj, a.v_proj)]
        assert (lyr.b_qkv is not None) == (kind == "qwen2")
    if tied:
        assert fast.lm_head.parts[0] is fast.embed
    assert fast.packed_decode == (kern == "kernels")
    # What it holds beyond the model's own arrays (packs, or fused q/k/v and gate/up copies) is far below a
    # float32 copy of the weights.
    own = {id(v) for _, v in tree_flatten(model.parameters())}
    extra = sum(x.nbytes for x in held if id(x) not in own)
    dense = sum(4 * m.weight.size * 32 // m.bits for _, m in model.named_modules()
                if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    assert 0 < extra < dense / 2


def test_greedy_tokens_match_the_generic_path_batched_and_alone(qmodel, paths):
    model, tok, _ = qmodel
    cfg = SamplingConfig(max_tokens=12)
    fast = generate(model, tok, convs(TEXTS), cfg, batch_size=8)
    assert FastLlama.for_model(model) is not None  # generate took the fast path
    generic = generate(model, tok, convs(TEXTS), cfg, batch_size=8, use_fast=False)
    assert len({tuple(g.tokens) for g in generic}) >= len(TEXTS) - 1  # rows differ: a real check
    assert all(len(set(g.tokens)) > 2 for g in generic)  # ...and do not just repeat a token
    assert [g.tokens for g in fast] == [g.tokens for g in generic]
    alone = [generate(model, tok, convs([t]), cfg, batch_size=1)[0] for t in TEXTS[:4]]
    assert [g.tokens for g in fast[:4]] == [g.tokens for g in alone]


@pytest.mark.parametrize("paths", ["kernels", "kernels-dequant", "mlx-ops", "quantized-matmul"], indirect=True)
def test_prefill_and_decode_steps_match_the_model_logits(qmodel, paths):
    """Row by row against mlx-lm's own forward pass: prefill (a shared prefix, two runs of rows, length groups)
    and two decode steps, on each matmul path."""
    model, tok, _ = qmodel
    prompts = sorted([encode(tok, c) for c in convs(TEXTS)], key=len, reverse=True)
    assert len(fastllama._token_halves([len(p) for p in prompts])) == 2 and fastllama.shared_prefix(prompts) > 0
    assert len(fastllama.length_groups([len(p) for p in prompts], slack=fastllama.PACKED_SLACK, min_slack=16)) > 1
    assert_matches_forward(FastLlama.build(model), model, prompts)


@built
def test_the_matmul_paths_are_the_ones_chosen(qmodel, monkeypatch):
    """With the kernels a decode step's products all run on linear_rows_q and none on mx.quantized_matmul (the
    slow one on the CPU); prefill of more than Q_ROWS_MAX rows dequantizes; without the kernels one row takes
    quantized_matmul and more dequantize."""
    model, tok, _ = qmodel
    calls = {"rows_q": 0, "qmm": 0, "deq": 0}

    def counted(name, f):
        def g(*a, **k):
            calls[name] += 1
            return f(*a, **k)
        return g

    monkeypatch.setattr(kernels, "linear_rows_q", counted("rows_q", kernels.linear_rows_q))
    monkeypatch.setattr(mx, "quantized_matmul", counted("qmm", mx.quantized_matmul))
    monkeypatch.setattr(mx, "dequantize", counted("deq", mx.dequantize))
    monkeypatch.setattr(fastllama, "Q_ROWS_MAX", 8)
    prompts = [encode(tok, c) for c in convs(TEXTS[:3])]
    fast = FastLlama.build(model)
    n = 2 * 4 + 1  # per step: q/k/v, o, gate/up, down per layer and the head
    runner = FastRunner(fast, prompts, 2)
    runner.prefill()
    assert calls["deq"] >= n and calls["qmm"] == 0
    calls.update(rows_q=0, deq=0)
    runner.step(mx.array([5, 6, 7]))
    assert calls == {"rows_q": n, "qmm": 0, "deq": 1}  # the embedding's gathered rows only
    monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    fast = FastLlama.build(model)
    calls.update(rows_q=0, qmm=0, deq=0)
    runner = FastRunner(fast, prompts[:1], 2)
    runner.prefill()
    runner.step(mx.array([5]))
    # prefill: the layers' products dequantize, the head's one row and the embedding's rows too; the step: all
    # products on quantized_matmul (one row), the embedding's row dequantized
    assert calls == {"rows_q": 0, "qmm": n + 1, "deq": n + 1}


def _lora(model, keys, rank=4, scale=10.0):
    """LoRA (rank 4, nonzero B) on `keys` of both layers: LoRALinear over the QuantizedLinear."""
    from mlx_lm.tuner.lora import LoRALinear

    for lin in add_lora(model, keys, rank, scale):
        assert isinstance(lin, LoRALinear) and isinstance(lin.linear, nn.QuantizedLinear)


@pairs()
def test_lora_over_quantized_layers_is_a_side_term_with_the_generic_tokens(qmodel, paths):
    """q and v (not k), o, gate (not up) and down adapted: the fused q/k/v and gate/up side terms carry zero
    blocks for k and up. The adapter changes the tokens (the check sees it)."""
    model, tok, (_, bits, _, _) = qmodel
    cfg = SamplingConfig(max_tokens=12)
    plain = generate(model, tok, convs(TEXTS), cfg, batch_size=8, use_fast=False)
    keys = ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    _lora(model, keys)
    fast_model = FastLlama.build(model)
    lyr, a = fast_model.layers[0], model.model.layers[0].self_attn
    assert lyr.w_qkv.lora is not None and lyr.w_gu.lora is not None and lyr.w_down.lora is not None
    A, B = lyr.w_qkv.lora
    q_out, k_out = a.q_proj.linear.weight.shape[0], a.k_proj.weight.shape[0]
    assert A.shape[1] == 8 and B.shape == (8, lyr.w_qkv.n_out)
    assert not np.any(np.array(B[:, q_out : q_out + k_out]))  # k has no adapter
    assert all(c.dtype == mx.uint32 for p in lyr.w_qkv.parts for c, _, _ in p.blocks)  # the base stays quantized
    fast = generate(model, tok, convs(TEXTS), cfg, batch_size=8)
    generic = generate(model, tok, convs(TEXTS), cfg, batch_size=8, use_fast=False)
    assert [g.tokens for g in fast] == [g.tokens for g in generic]
    assert [g.tokens for g in generic] != [g.tokens for g in plain]  # the adapter matters
    alone = [generate(model, tok, convs([t]), cfg, batch_size=1)[0] for t in TEXTS[:3]]
    assert [g.tokens for g in fast[:3]] == [g.tokens for g in alone]


def test_mixed_bits_in_fused_projections_keep_their_parts(tiny, paths):
    """mlx-lm's mixed recipes give v_proj and down_proj more bits than the rest: q/k/v become two parts (q/k 4-bit
    and v 8-bit), gate/up stay one; the tokens are the generic path's."""
    llama, tok = tiny

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return {"bits": 8, "group_size": 32} if path.endswith(("v_proj", "down_proj")) else True

    model = quantized("llama", llama.args.vocab_size, 4, 64, False, predicate)
    fast = FastLlama.build(model)
    parts = fast.layers[0].w_qkv.parts
    assert [(p.bits, p.group_size, len(p.blocks)) for p in parts] in ([(4, 64, 2), (8, 32, 1)], [(4, 64, 1), (8, 32, 1)])
    assert fast.layers[0].w_down.parts[0].bits == 8
    cfg = SamplingConfig(max_tokens=10)
    got = generate(model, tok, convs(TEXTS), cfg, batch_size=8)
    want = generate(model, tok, convs(TEXTS), cfg, batch_size=8, use_fast=False)
    assert [g.tokens for g in got] == [g.tokens for g in want]


def _second_turns(first, gens):
    more = [c + [{"role": "assistant", "content": g.text}, {"role": "user", "content": f}]
            for c, g, f in zip(first, gens, FOLLOW_UPS)]
    return more + convs(["something else entirely, asked fresh", "and one more new one"])


@pairs("mlx-ops", "kernels")
def test_kv_reuse_gives_the_same_tokens_on_quantized_models(qmodel, paths, monkeypatch):
    """Conversations carried on: the second turn takes the first turn's K/V from the PrefixStore (batched and
    alone) and gives the tokens of a prefill from scratch and of the generic path."""
    model, tok, _ = qmodel
    cfg = SamplingConfig(max_tokens=8)
    first = convs(TEXTS[:6])
    on, off = reuse_runs(model, tok, first, _second_turns, cfg, monkeypatch)
    assert on["prefilled"] + on["reused"] == off["prefilled"]
