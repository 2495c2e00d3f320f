"""A compiled decode path for llama-family models (SmolLM2, Llama 3, Mistral-style GQA, Qwen2/Qwen2.5), dense or
kept quantized.

Why: on the CPU a decode step of mlx-lm's model is dominated by per-op overhead and by small matmuls,
not by FLOPs. Here a step is one `mx.compile`d function over a *static-shape* KV cache (so it compiles
once per batch size and length bucket), q/k/v and gate/up projections are fused into one matmul each,
and LoRA adapters are folded into dense weights (generation with an adapter costs nothing extra).

Layout: K/V caches (B, n_kv_heads, S, head_dim). The batch's shared prompt prefix (system prompt,
few-shot demos: `prefix` tokens) sits in slots [0, prefix) of every row, the row's pad slots follow, then
its own tokens, right-aligned so every row's prompt ends at the same slot: slot s of row b holds position
s (s < prefix) or s - pad[b] (s >= prefix + pad[b]); slot `p` is written at decode step p.
Prefill runs the shared prefix once (one row) and copies its K/V into every row, then the rest of the
prompts in groups of similar length, so little arithmetic goes to padding (SmolLM2 chats share their
~30-token system prompt; SL-CAI critique/revision prompts share hundreds of tokens of few-shot demos).
Weights are read from an mlx-lm `Model` of model_type llama or mistral (no biases), or qwen2 (the llama
layout plus biases on the q/k/v projections, added right after the fused projection; o-projection and MLP
without bias); anything else (rope scaling, DoRA, other biases or architectures, quantization modes other than
MLX's affine one) returns None from `build` and the caller uses the generic path.

Quantized weights (nn.QuantizedLinear, LoRALinear over it, nn.QuantizedEmbedding: a model kept quantized,
MLX_CAI_DEQUANTIZE=0, as a Mac runs mlx-community's 4-bit models) stay quantized: no dense copy is made. q/k/v
and gate/up are fused by concatenating their (w, scales, biases) triples along the output axis where their bits
and group sizes match; a LoRA adapter is a side term (x @ A) @ (scale * B) added to the quantized base's output
(the base cannot absorb it); the embedding dequantizes only the gathered rows, and a tied head multiplies by
the quantized embedding. Every quantized product goes through `_qmm`, which picks per call (the row count is
known when a step is traced): on the CPU with the C++ kernels, up to Q_ROWS_MAX rows (every decode step, and
prefill chunks of up to that many tokens) `kernels.linear_rows_q` over a pack made once at build (there the
weight stays in its original (unfused) blocks and the pack is the only fused copy); more rows on the CPU
dequantize the block just for that product and use BLAS (MLX's CPU quantized matmul is single-threaded, ~25-60x
slower than the kernel at 8-32 rows); elsewhere (Metal, CUDA) mx.quantized_matmul, the fast path there. Where
a product is one plain kernel call (no LoRA, one part), the norm before it, the SwiGLU and the residual add after
it go into that call (`_norm_mm`, `_add_mm`, `_mlp`): fewer graph nodes per decode step.

Prefix reuse: when a batch ends, each row's K/V (its prompt and the generated tokens fed back) goes to the
model's `PrefixStore`; a later prompt that starts with the same token ids (the revision request of a
conversation after its critique) takes those K/V into its slots and prefills only the rest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

from mlx_cai import backend

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_cai import fastmath, kernels
from mlx_cai.settings import settings

BUCKET = 64  # cache length rounds up to this: few distinct compiled shapes
SPAN = 32  # a decode step attends to the cache up to the next multiple of this...
SPAN_ROWS = 8  # ...when it has at least this many rows
PACKED_SLACK = 0.5  # prefill groups: rows whose own lengths are within this share of the group's longest
FAST_OPS_ROWS = 4  # token rows (batch x positions) from which the CPU uses fastmath's attention and SwiGLU
REUSE_MIN = 16  # fewest stored tokens past the batch's shared prefix worth copying into a row instead of prefilling


# Quantized weights: token rows up to which the CPU multiplies by kernels.linear_rows_q (over the pack made at
# build); above, it dequantizes the block for the product and uses BLAS. Measured (2 cores, under load from
# another job): MLX's dequantize costs ~3-6 ns per weight, so linear_rows_q was faster up to about 512 rows
# (576x1536 4-bit g64 at 512 rows: 18.6 vs 17.7 ms; 4096x4096: 267 vs 341 ms) and slower from 1024 (4096x4096
# 4-bit: 559 vs 482 ms; 8-bit: 740 vs 490 ms). mx.quantized_matmul was 10-40x slower than either from 8 rows.
Q_ROWS_MAX = 512
# Without the kernels, the CPU uses mx.quantized_matmul up to this many rows and dequantize + BLAS above (at 8
# rows 576x1536 4-bit: quantized_matmul ~8 ms, dequantize ~1.3 ms + a BLAS product of ~0.05 ms).
CPU_QMM_ROWS = 1


@dataclass
class QWeight:
    """Quantized row blocks that share group size and bits (MLX's affine mode): `blocks` ((w uint32, scales,
    biases), ...), one block when fused (a concatenated copy) or the model's own triples side by side; `packed`
    (CPU kernels): all blocks in one `kernels.pack_quantized` pack, made once."""

    blocks: tuple
    group_size: int
    bits: int
    packed: mx.array | None = None

    @property
    def n_out(self) -> int:
        return sum(w.shape[0] for w, _, _ in self.blocks)

    def fused(self) -> "QWeight":
        if len(self.blocks) == 1:
            return self
        block = tuple(mx.concatenate([b[i] for b in self.blocks]) for i in range(3))
        return QWeight((block,), self.group_size, self.bits, self.packed)

    def pack(self) -> mx.array:
        w, s, b = self.fused().blocks[0]
        return kernels.pack_quantized(w, s, b, self.group_size, self.bits)


@dataclass
class QLinear:
    """A quantized projection: `parts` (QWeight, ...) whose outputs sit side by side (one part unless fused
    projections differ in bits or group size), and a LoRA side term `lora` (A (K, R), B (R, N)): the output is
    x @ W.T + (x @ A) @ B, B holding the adapters' scales (and zero rows where a fused projection has none)."""

    parts: tuple
    lora: tuple | None = None

    @property
    def n_out(self) -> int:
        return sum(p.n_out for p in self.parts)

    def arrays(self) -> list:
        """Every array held (for evaluation and memory accounting)."""
        out = [a for p in self.parts for blk in p.blocks for a in blk] + [p.packed for p in self.parts]
        return [a for a in out + list(self.lora or ()) if a is not None]


Weight = "mx.array | tuple[mx.array, ...] | QLinear"  # one matrix, its row blocks kept apart (see _fuse_copies_fit), or quantized


@dataclass
class Layer:
    w_qkv: Weight  # (H*D + 2*KVH*D, hidden): fused q/k/v, or (q, k, v)
    w_o: Weight  # (hidden, H*D)
    w_gu: Weight  # (2*ffn, hidden): fused gate/up, or (gate, up)
    w_down: Weight  # (hidden, ffn)
    norm_in: mx.array
    norm_post: mx.array
    b_qkv: mx.array | None = None  # (H*D + 2*KVH*D,) fused q/k/v bias (qwen2); None: no bias, no op (llama)
    # (qkv, o, gu, down) packed for kernels.linear_rows, used by decode steps on the CPU: BLAS repacks a weight
    # on every call, which at 32 rows costs about as much as the product (a fifth of a generation benchmark's
    # samples); batch 1 ran 26-29 vs 17-19 tok/s, batch 64 227-231 vs 204-224 (alternating).
    packed: tuple | None = None


def _dense_bias(linear) -> tuple[mx.array, mx.array | None] | None:
    """(effective dense weight, bias or None) of a Linear or a LoRA-wrapped Linear (None if quantized/other).
    LoRA over a biased base: weight W + scale * B^T A^T, the bias unchanged (mlx-lm's LoRALinear adds the
    adapter's product to the base layer's output, bias included)."""
    if type(linear) is nn.Linear:
        return linear.weight, (linear.bias if "bias" in linear else None)
    base = getattr(linear, "linear", None)
    if base is not None and hasattr(linear, "lora_a") and type(base) is nn.Linear:
        if getattr(linear, "m", None) is not None:  # DoRA rescales by a learned magnitude: generic path
            return None
        delta = (linear.scale * linear.lora_b.T) @ linear.lora_a.T  # (out, in)
        return base.weight + delta.astype(base.weight.dtype), (base.bias if "bias" in base else None)
    return None


def _dense(linear) -> mx.array | None:
    """The effective dense weight of an unbiased Linear or LoRA-wrapped Linear (None if biased/quantized/other)."""
    wb = _dense_bias(linear)
    return wb[0] if wb is not None and wb[1] is None else None


def _projections(linears: list) -> tuple[Weight, mx.array | None] | None:
    """(weight, bias or None) of projections of the same input (q/k/v, gate/up, or one), outputs side by side:
    dense weights (LoRA folded in) as a tuple of blocks (one array for a single projection), quantized ones as a
    QLinear (`_join`); the biases concatenated (a missing one counts as zeros; None if none has one). None if
    any is neither, or dense and quantized ones are mixed."""
    dense = [_dense_bias(x) for x in linears]
    if all(d is not None for d in dense):
        ws, bs = [w for w, _ in dense], [b for _, b in dense]
        weight, sizes = ws[0] if len(ws) == 1 else tuple(ws), [w.shape[0] for w in ws]
    else:
        quant = [_quantized(x) for x in linears]
        if any(q is None for q in quant):
            return None
        bs = [b for _, b in quant]
        weight, sizes = _join([q for q, _ in quant]), [q.n_out for q, _ in quant]
    if all(b is None for b in bs):
        return weight, None
    dtype = next(b.dtype for b in bs if b is not None)
    return weight, mx.concatenate([b if b is not None else mx.zeros((n,), dtype) for n, b in zip(sizes, bs)])


def _affine(q) -> bool:
    return getattr(q, "mode", "affine") == "affine" and q.get("biases") is not None


def _quantized(linear) -> tuple[QLinear, mx.array | None] | None:
    """(QLinear, bias or None) of an nn.QuantizedLinear (MLX's affine mode) or a LoRALinear over one, the
    model's own arrays (no copy); None for anything else. The adapter's B is scaled (a small copy)."""
    base, lora = linear, None
    if hasattr(linear, "lora_a") and getattr(linear, "linear", None) is not None:
        if getattr(linear, "m", None) is not None:  # DoRA
            return None
        base = linear.linear
        lora = (linear.lora_a.astype(mx.float32), (linear.scale * linear.lora_b).astype(mx.float32))
    if type(base) is not nn.QuantizedLinear or not _affine(base):
        return None
    part = QWeight(((base.weight, base.scales, base.biases),), base.group_size, base.bits)
    return QLinear((part,), lora), (base.bias if "bias" in base else None)


def _join(qs: list[QLinear]) -> QLinear:
    """Projections of the same input (q/k/v, gate/up) side by side: consecutive parts of equal bits and group
    size in one QWeight (blocks kept apart until `QWeight.fused`); their LoRA terms as one, A's columns
    concatenated and the B's block-diagonal (zeros for a projection without an adapter)."""
    parts = []
    for q in qs:
        for p in q.parts:
            last = parts[-1] if parts else None
            if last is not None and (last.group_size, last.bits) == (p.group_size, p.bits):
                parts[-1] = QWeight(last.blocks + p.blocks, p.group_size, p.bits)
            else:
                parts.append(p)
    lora = None
    if any(q.lora is not None for q in qs):
        A = mx.concatenate([q.lora[0] for q in qs if q.lora is not None], axis=1)
        R, cols = A.shape[1], []
        r0 = 0
        for q in qs:
            if q.lora is None:
                cols.append(mx.zeros((R, q.n_out), mx.float32))
                continue
            a, b = q.lora
            r = a.shape[1]
            cols.append(mx.concatenate([mx.zeros((r0, b.shape[1])), b, mx.zeros((R - r0 - r, b.shape[1]))]))
            r0 += r
        lora = (A, mx.concatenate(cols, axis=1))
    return QLinear(tuple(parts), lora)


def _qmm(x: mx.array, q: QWeight) -> mx.array:
    """x (..., K) @ W.T for the quantized W of `q`, float32, by the fastest path for x's row count here (see
    Q_ROWS_MAX and CPU_QMM_ROWS): the C++ kernel over q.packed, dequantize + BLAS one block at a time (the
    dequantized block is a temporary of this product only), or mx.quantized_matmul (Metal, CUDA)."""
    rows = x.size // x.shape[-1]
    x = x.astype(mx.float32)
    if q.packed is not None and rows <= Q_ROWS_MAX and kernels.enabled():
        return kernels.linear_rows_q(x, q.packed, q.n_out)
    f32 = mx.float32
    if mx.default_device() == mx.cpu and rows > CPU_QMM_ROWS:
        outs = [x @ mx.dequantize(w, s.astype(f32), b.astype(f32), q.group_size, q.bits).T for w, s, b in q.blocks]
    else:
        outs = [mx.quantized_matmul(x, w, s, b, transpose=True, group_size=q.group_size, bits=q.bits)
                for w, s, b in q.blocks]
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


def _kernel_qweight(x: mx.array, w) -> "QWeight | None":
    """The one QWeight of w when x @ w.T would be a plain kernels.linear_rows_q call (see _qmm), else None."""
    if not isinstance(w, QLinear) or w.lora is not None or len(w.parts) != 1:
        return None
    q = w.parts[0]
    rows = x.size // x.shape[-1]
    return q if q.packed is not None and rows <= Q_ROWS_MAX and kernels.enabled() else None


def _qlinear(x: mx.array, q: QLinear) -> mx.array:
    """x (..., K) @ W.T (+ the LoRA side term) for a quantized projection."""
    outs = [_qmm(x, p) for p in q.parts]
    y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)
    if q.lora is not None:
        a, b = q.lora
        y = y + (x.astype(mx.float32) @ a) @ b
    return y


def _embedding(emb) -> "mx.array | QWeight | None":
    """An nn.Embedding's weight, an nn.QuantizedEmbedding's (affine) triple as a QWeight, else None."""
    if type(emb) is nn.Embedding:
        return emb.weight
    if type(emb) is nn.QuantizedEmbedding and _affine(emb):
        return QWeight(((emb.weight, emb.scales, emb.biases),), emb.group_size, emb.bits)
    return None


class FastLlama:
    def __init__(self, args, layers: list[Layer], embed: mx.array, lm_head: mx.array, norm: mx.array):
        self.n_heads = args.num_attention_heads
        self.n_kv = args.num_key_value_heads or self.n_heads
        self.head_dim = getattr(args, "head_dim", None) or args.hidden_size // self.n_heads
        self.eps = args.rms_norm_eps
        self.theta = args.rope_theta
        self.traditional = args.rope_traditional
        self.layers, self.embed, self.lm_head, self.norm = layers, embed, lm_head, norm
        self.scale = self.head_dim**-0.5
        self._steps: dict[tuple[int, int], object] = {}  # compiled decode step per (span, part)
        self.head_packed: mx.array | None = None  # lm_head for kernels.linear_rows (see Layer.packed)
        self.cpu = mx.default_device() == mx.cpu  # then fastmath's attention and SwiGLU
        self.store = PrefixStore()  # finished rows' K/V; a new FastLlama (new weights) starts empty
        self.counts = {"prefilled": 0, "reused": 0}  # prompt tokens prefilled / taken from the store

    @classmethod
    def build(cls, model) -> "FastLlama | None":
        args = getattr(model, "args", None)
        kind = getattr(args, "model_type", None)
        if kind not in ("llama", "mistral", "qwen2") or getattr(args, "rope_scaling", None):
            return None
        if getattr(args, "attention_bias", False) or getattr(args, "mlp_bias", False):  # llama's flags
            return None
        inner = model.model
        layers = []
        for lyr in inner.layers:
            a, m = lyr.self_attn, lyr.mlp
            qkv = _projections([a.q_proj, a.k_proj, a.v_proj])
            rest = [_projections([x]) for x in (a.o_proj, m.down_proj)]
            gu = _projections([m.gate_proj, m.up_proj])
            if qkv is None or gu is None or any(x is None for x in rest):
                return None
            if any(bias is not None for _, bias in rest + [gu]):  # biases on q/k/v only
                return None
            (w_qkv, bias), ((o, _), (d, _)) = qkv, rest
            if kind != "qwen2" and bias is not None:  # llama/mistral: no q/k/v bias
                return None
            layers.append(Layer(w_qkv, o, gu[0], d, lyr.input_layernorm.weight, lyr.post_attention_layernorm.weight,
                                bias))
        embed = _embedding(inner.embed_tokens)
        if embed is None:
            return None
        if args.tie_word_embeddings:
            head = QLinear((embed,)) if isinstance(embed, QWeight) else embed
        else:
            head = _projections([model.lm_head])
            if head is None or head[1] is not None:
                return None
            head = head[0]
        fast = cls(args, layers, embed, head, inner.norm.weight)
        pack = fast.cpu and kernels.enabled() and _packing_fits(layers, head)
        fuse = not pack or _fuse_copies_fit(layers, head)
        for lyr in layers:  # one layer at a time, so a fused temporary of the packing is freed before the next
            if pack:  # decode steps stream these panels once per step instead of BLAS repacking them
                lyr.packed = tuple(kernels.pack_weight(_fused(w)) for w in (lyr.w_qkv, lyr.w_o, lyr.w_gu, lyr.w_down))
            if fuse:
                lyr.w_qkv, lyr.w_gu = _fused(lyr.w_qkv), _fused(lyr.w_gu)
            mx.eval([w for w in (lyr.packed, lyr.w_qkv, lyr.w_gu, lyr.b_qkv) if not isinstance(w, QLinear)])
        if pack:
            fast.head_packed = kernels.pack_weight(head)
            mx.eval(fast.head_packed)
        fast._prepare_quantized()
        return fast

    def _prepare_quantized(self) -> None:
        """Quantized projections: on the CPU with the kernels, a `kernels.linear_rows_q` pack per QWeight (its
        blocks stay the model's own arrays, for products of more than Q_ROWS_MAX rows); elsewhere, or for bits
        and group sizes the kernel lacks, fused blocks (a concatenated quantized copy) where they fit in
        PACK_MEMORY_SHARE of the RAM, else the blocks one after the other. One weight at a time, so a fused
        temporary of the packing is freed before the next."""
        qs = [w for lyr in self.layers for w in (lyr.w_qkv, lyr.w_o, lyr.w_gu, lyr.w_down) if isinstance(w, QLinear)]
        if isinstance(self.lm_head, QLinear):
            qs.append(self.lm_head)
        if not qs:
            return
        parts = {id(p): p for q in qs for p in q.parts}.values()  # a tied head's part is the embedding's
        budget = PACK_MEMORY_SHARE * backend.ram_bytes()
        pack = self.cpu and kernels.enabled() and sum(_qpack_nbytes(p) for p in parts if _packable(p)) <= budget
        fuse = sum(_qpack_nbytes(p) for p in parts if len(p.blocks) > 1) <= budget
        for p in parts:
            if pack and _packable(p):
                p.packed = p.pack()
                mx.eval(p.packed)
        for q in qs:
            q.parts = tuple(p if p.packed is not None or not fuse else p.fused() for p in q.parts)
            mx.eval(q.arrays())

    @property
    def packed_decode(self) -> bool:
        """Whether decode steps run on packed weights (the C++ kernels use every thread in one stream)."""
        return self.head_packed is not None or any(
            isinstance(w, QLinear) and any(p.packed is not None for p in w.parts)
            for lyr in self.layers for w in (lyr.w_qkv, lyr.w_o, lyr.w_gu, lyr.w_down))

    def _embed(self, tokens: mx.array) -> mx.array:
        """Embedding rows of `tokens`; a quantized embedding dequantizes only the gathered rows."""
        if not isinstance(self.embed, QWeight):
            return self.embed[tokens]
        (w, s, b), = self.embed.blocks
        return mx.dequantize(w[tokens], s[tokens], b[tokens], self.embed.group_size, self.embed.bits).astype(mx.float32)

    @classmethod
    def for_model(cls, model) -> "FastLlama | None":
        """`build(model)`, kept on the model and reused while its parameter arrays are the same objects.

        A FastLlama holds fused weight copies and its compiled decode steps (one trace per span and part,
        ~0.3 s each), so building it per `generate` call re-pays both: 64 chats x 64 tokens ran 18.5-19.6 s
        reused vs 20.4-22.1 s rebuilt. Loading weights, `model.update` and an optimizer step put new array
        objects in the model, which makes a new key; the kept arrays stop their ids from being reused."""
        params = [v for _, v in tree_flatten(model.parameters())]
        key = [id(v) for v in params]
        kept = getattr(model, "_mlx_cai_fast", None)
        if kept is not None and kept[0] == key:
            return kept[2]
        fast = cls.build(model)
        object.__setattr__(model, "_mlx_cai_fast", (key, params, fast))
        return fast

    # --- the model -------------------------------------------------------------------------------
    def _layer(self, lyr: Layer, x, K, V, start, offsets, mask, end=None, holes=None, decode=False, cossin=None,
               real=None, write=None):
        """x (B, T, hidden); K/V (B, KVH, S, D); writes slots [start, start+T); offsets (B,) rope positions.
        `end` (a python int): attend to slots [0, end) instead of the whole static cache. `holes` (B, 2): each
        row's pad slots, for the C++ attention of prefill calls and of `decode` steps (T == 1), which rotate by
        `cossin` (B, D), kernels.rope_angles of the rows' positions.
        `real` (packed prefill): (B, T, (idx (M,), inv (B*T,))): x is (M, hidden), the M real (non-pad) tokens
        of the (B, T) block, idx their flat positions in it and inv each flat position's row in x (pads: any).
        `write` (prefill, (B, 1, T, 1) bool): slots to write; the others keep their K/V (reused from the store)."""
        if real is not None:
            B, T, (idx, inv) = real
        else:
            B, T, _ = x.shape
        H, KVH, D = self.n_heads, self.n_kv, self.head_dim
        # up to PACKED_ROWS_MAX token rows (decode steps) with packed weights: kernels.linear_rows, else BLAS
        def mm(a, i, w):
            if isinstance(w, QLinear):  # quantized: the kernel, dequantize + BLAS or quantized_matmul (_qmm)
                return _qlinear(a, w)
            if lyr.packed is not None and a.size // a.shape[-1] <= PACKED_ROWS_MAX:
                return kernels.linear_rows(a, lyr.packed[i], _rows(w))
            if isinstance(w, tuple):  # unfused (large models): one product per block, side by side
                return mx.concatenate([a @ x.T for x in w], axis=-1)
            return a @ w.T

        qkv = self._norm_mm(x, lyr.norm_in, lyr.w_qkv, mm, 0)
        if lyr.b_qkv is not None:  # qwen2's q/k/v biases (llama: no op)
            qkv = qkv + lyr.b_qkv
        if real is not None:  # projections on the real tokens only; attention on the padded block
            qkv = qkv[inv].reshape(B, T, -1)
        if decode:  # the C++ decode kernels: rope + cache write in place, then attention over K/V in place
            q, K, V = kernels.rope_cache(qkv.reshape(B, -1), K, V, cossin, start, H, self.traditional)
            o = kernels.decode_attention(q, K, V, holes, start, self.scale, end).reshape(B, 1, H * D)
            return self._mlp(lyr, x, o, mm), K, V
        q, k, v = mx.split(qkv, [H * D, (H + KVH) * D], axis=-1)
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, KVH, D).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, KVH, D).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, D, traditional=self.traditional, base=self.theta, scale=1.0, offset=offsets)
        k = mx.fast.rope(k, D, traditional=self.traditional, base=self.theta, scale=1.0, offset=offsets)
        k, v = k.astype(K.dtype), v.astype(V.dtype)
        if write is not None:  # a pad's K/V would overwrite a reused slot (prefill: the slots are [end - T, end))
            k, v = mx.where(write, k, K[:, :, end - T : end]), mx.where(write, v, V[:, :, end - T : end])
        K = mx.slice_update(K, k, start, axes=(2,))
        V = mx.slice_update(V, v, start, axes=(2,))
        Ka, Va = (K, V) if end is None else (K[:, :, :end], V[:, :, :end])
        # fastmath's ops pay off from a few rows up; at one row they were 2.5% slower (more ops per step)
        fast_ops = self.cpu and B * T >= FAST_OPS_ROWS
        if fast_ops and holes is not None:  # prefill: the C++ masked softmax (causal minus pad slots)
            o = fastmath.attention_holes(q, Ka, Va, self.scale, holes)
        elif fast_ops:
            o = fastmath.attention(q, Ka, Va, self.scale, mask)
        else:
            o = mx.fast.scaled_dot_product_attention(q, Ka, Va, scale=self.scale, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, H * D)
        if real is not None:
            o = o.reshape(B * T, H * D)[idx]
        return self._mlp(lyr, x, o, mm, fast_ops), K, V

    def _mlp(self, lyr: Layer, x, o, mm, fast_ops=True):
        """The rest of a layer after attention's output o (B, T, H*D): o-projection, residual, norm, SwiGLU."""
        x = self._add_mm(x, o, lyr.w_o, mm, 1)
        gu = self._norm_mm(x, lyr.norm_post, lyr.w_gu, mm, 2)
        q = _kernel_qweight(gu, lyr.w_down)  # (its rows are gu's)
        if q is not None and x.shape == gu.shape[:-1] + (q.n_out,):  # SwiGLU, down projection, residual: one call
            return kernels.linear_rows_q(gu, q.packed, q.n_out, residual=x, gate=True)
        if self.cpu and kernels.enabled():  # one C++ pass over the fused [g | u]
            act = kernels.silu_mul(gu)
        else:
            g, u = mx.split(gu, 2, axis=-1)
            act = fastmath.silu_mul(g, u) if fast_ops else nn.silu(g) * u
        return self._add_mm(x, act, lyr.w_down, mm, 3)

    # A quantized projection on the kernel takes the norm before it and the residual add after it into its one
    # call: each is otherwise a few graph nodes, and per-node overhead (~1-3 us) is much of a batch-1 decode step.
    def _norm_mm(self, x, norm, w, mm, i):
        """mm(rms_norm(x, norm), i, w)."""
        q = _kernel_qweight(x, w)
        if q is not None:
            return kernels.linear_rows_q(x, q.packed, q.n_out, norm=norm, eps=self.eps)
        return mm(mx.fast.rms_norm(x, norm, self.eps), i, w)

    def _add_mm(self, x, a, w, mm, i):
        """x + mm(a, i, w)."""
        q = _kernel_qweight(a, w)
        if q is not None and x.shape == a.shape[:-1] + (q.n_out,):
            return kernels.linear_rows_q(a, q.packed, q.n_out, residual=x)
        return x + mm(a, i, w)

    def _forward(self, tokens, caches, start, pad, prefix, end=None, prefill=False, real=None, write=None):
        """tokens (B, T) at slots [start, start+T). Returns (last-position logits (B, V), new caches).
        `end` (a python int): attention reads slots [0, end) only (prefill: start + T; decode: the span end).
        `prefill`: end == start + T, so query t sits at slot t + end - T (the C++ masked softmax needs that).
        `real` (prefill; numpy bool (B, T)): which tokens are not padding. Then the matmuls, norms and gate run
        on those tokens only (one large matmul per weight instead of a padded block); every row's last token
        must be real. `write` (prefill; numpy bool (B, T)): which tokens' K/V to write (None: all); the other
        slots keep theirs."""
        B, T = tokens.shape
        S = caches[0][0].shape[2] if end is None else end
        slots = mx.arange(S)
        pos = start + mx.arange(T)  # (T,) slots being written
        offsets = start - pad  # (B,) rope position of the first new token per row (prefix rows: pad 0)
        # (B, 1, T, S): a row attends to the shared prefix and its own non-pad slots up to the current one.
        # A pad query also sees itself, so no softmax row is empty (an empty row gives NaN, and NaN * 0
        # leaks into V).
        s4, p4 = slots[None, None, None, :], pos[None, None, :, None]
        lo = mx.broadcast_to(prefix, pad.shape)[:, None, None, None]  # (B,) or one shared length
        own = (s4 < lo) | (s4 >= lo + pad[:, None, None, None])
        mask = (own & (s4 <= p4)) | (s4 == p4)
        x = self._embed(tokens)
        last = None
        if real is not None:
            flat = real.reshape(-1)
            idx = np.flatnonzero(flat)
            inv = np.maximum(np.cumsum(flat) - 1, 0)  # pads: the row before (their outputs are never read)
            last = mx.array(inv.reshape(B, T)[:, -1].astype(np.int32))
            real = (B, T, (mx.array(idx.astype(np.int32)), mx.array(inv.astype(np.int32))))
            x = x.reshape(B * T, -1)[real[2][0]]
        if write is not None:
            write = mx.array(write)[:, None, :, None]
        new = []
        # Prefill (query t at slot t + S - T) on the CPU kernels: the mask as each row's pad
        # slots [lo, lo + pad) on top of causal. 16 prompts of ~1000 tokens: attention was 64% of prefill.
        # Decode steps on the CPU kernels: one C++ pass per layer over K and V with the same mask.
        holes = None
        kern = self.cpu and kernels.enabled()
        decode = kern and not prefill and T == 1 and end is not None
        if kern and (prefill or decode):
            holes = mx.stack([lo[:, 0, 0, 0], lo[:, 0, 0, 0] + pad], axis=-1).astype(mx.int32)
        cossin = kernels.rope_angles(offsets, self.head_dim, self.theta) if decode else None  # shared by the layers
        for lyr, (K, V) in zip(self.layers, caches):
            x, K, V = self._layer(lyr, x, K, V, start, offsets, mask, end, holes, decode, cossin, real, write)
            new.append((K, V))
        x = x[:, -1, :] if last is None else x[last]
        if _kernel_qweight(x, self.lm_head) is not None:  # the final norm inside the head's kernel call
            return self._norm_mm(x, self.norm, self.lm_head, None, None), new
        x = mx.fast.rms_norm(x, self.norm, self.eps)
        if self.head_packed is not None:
            return kernels.linear_rows(x, self.head_packed, self.lm_head.shape[0]), new
        if isinstance(self.lm_head, QLinear):
            return _qlinear(x, self.lm_head), new
        return x @ self.lm_head.T, new

    def _step_impl(self, tokens, caches, start, pad, prefix, end=None):
        return self._forward(tokens[:, None], caches, start, pad, prefix, end)

    # --- public ----------------------------------------------------------------------------------
    def new_cache(self, B: int, length: int, dtype=mx.float32):
        S = -(-length // BUCKET) * BUCKET
        shape = (B, self.n_kv, S, self.head_dim)
        return [(mx.zeros(shape, dtype), mx.zeros(shape, dtype)) for _ in self.layers]

    def prefix_steps(self, tokens: list[int], chunk: int = 256):
        """The K/V of a shared prompt prefix (one row), as a generator like `prefill_steps`; returns the per-layer
        (K, V) of its len(tokens) slots (None for no tokens)."""
        if not tokens:
            return None
        zero = mx.zeros((1,), mx.int32)
        one = self.new_cache(1, len(tokens))
        for s in range(0, len(tokens), chunk):
            piece = mx.array([tokens[s : s + chunk]])
            _, one = self._forward(piece, one, mx.array(s), zero, 0, end=s + piece.shape[1], prefill=True)
            yield one
        return [(K[:, :, : len(tokens)], V[:, :, : len(tokens)]) for K, V in one]

    def prefill_steps(self, prompts: list[list[int]], prefix: int, caches, end: int, chunk: int = 256,
                      row0: int = 0, shared=None, reuse=None):
        """Run prompts into `caches` rows row0, row0 + 1, ... (laid out as in the module docstring, every prompt
        ending at slot end - 1), as a generator: it yields the arrays to evaluate after each chunk of work (so
        the graph stays small) and returns the last-position logits (B, V).
        Rows' first `prefix` tokens must be equal (their K/V: `shared` from `prefix_steps`, else computed
        here); each row needs a token after them. `reuse` (per row, None or (K/V, n) from PrefixStore.match,
        n > prefix): the K/V of the row's first n tokens, copied in instead of computed."""
        zero = mx.zeros((1,), mx.int32)
        if prefix and shared is None:
            shared = yield from self.prefix_steps(prompts[0][:prefix], chunk)
        reuse = reuse or [None] * len(prompts)
        done = [prefix if r is None else r[1] for r in reuse]  # leading tokens whose K/V are known
        own = [len(p) - d for p, d in zip(prompts, done)]
        # With reuse, rows in groups by what is left to prefill; without, in the given (length) order.
        order = sorted(range(len(prompts)), key=lambda i: -own[i]) if any(reuse) else list(range(len(prompts)))
        out = []
        # Matmuls run on the real tokens only (see _forward's `real`), so padding costs only attention: groups
        # may be loose. 32 chats: one group per ~4 tokens of length (6 groups) took 2.4 s, the real tokens
        # in looser groups 2.1 s.
        for a, b in length_groups([own[i] for i in order], slack=PACKED_SLACK, min_slack=16):
            rows = order[a:b]
            width = max(own[i] for i in rows)  # the group's own tokens, left-padded to this
            first = end - width  # ...and ending at slot end - 1 like every row
            real = np.arange(width)[None, :] >= np.array([[width - own[i]] for i in rows])
            toks = mx.array([[0] * (width - own[i]) + prompts[i][done[i]:] for i in rows])
            pads = [end - len(prompts[i]) for i in rows]
            pad = mx.array(pads)
            group = self.new_cache(len(rows), end)
            if shared:
                group = [(mx.slice_update(K, mx.broadcast_to(k, (len(rows), *k.shape[1:])), zero, axes=(2,)),
                          mx.slice_update(V, mx.broadcast_to(v, (len(rows), *v.shape[1:])), zero, axes=(2,)))
                         for (K, V), (k, v) in zip(group, shared)]
            kept = [reuse[i] for i in rows]
            write = real if any(kept) else None  # pads sit over reused slots: keep those
            if write is not None:
                group = _place(group, kept, pads, prefix)
            for s in range(0, width, chunk):
                piece = toks[:, s : s + chunk]
                logits, group = self._forward(piece, group, mx.array(first + s), pad, prefix,
                                              end=first + s + piece.shape[1], prefill=True,
                                              real=real[:, s : s + chunk],
                                              write=None if write is None else write[:, s : s + chunk])
                yield [logits, group]
            at = _rows_at(rows, row0)
            for (K, V), (k, v) in zip(caches, group):
                K[at, :, :end] = k[:, :, :end]
                V[at, :, :end] = v[:, :, :end]
            yield caches
            out.append(logits)
        logits = mx.concatenate(out) if len(out) > 1 else out[0]  # rows in `order`
        return logits if order == sorted(order) else logits[mx.array(np.argsort(order))]

    def step(self, tokens: mx.array, caches, slot: int, pad: mx.array, prefix: mx.array, part: int = 0):
        """One compiled decode step: tokens (B,) go to `slot`. Returns (logits (B, V), caches).
        Attention reads the cache only up to the next multiple of SPAN past `slot` (one compiled step per
        span and stream part: a compiled graph keeps the stream it was traced on), not the whole cache."""
        S = caches[0][0].shape[2]
        # Few rows: attention over the whole cache is cheap, and each span would cost a trace (~0.3 s).
        end = S if tokens.shape[0] < SPAN_ROWS else min(S, (slot // SPAN + 1) * SPAN)
        key = (end, part)
        if key not in self._steps:
            self._steps[key] = mx.compile(partial(self._step_impl, end=end))
        return self._steps[key](tokens, caches, mx.array(slot), pad, prefix)


# Token rows up to which matmuls use the packed weights (decode steps): there linear_rows, which prefetches the
# next panel while it computes, beat OpenBLAS (a batch-32 decode step's matmuls, 2 threads: 52 vs 72 ms
# before the prefetch). For prefill's hundreds of rows OpenBLAS was faster (32 chats: 2.1 vs 2.5 s).
PACKED_ROWS_MAX = 64
PACK_MEMORY_SHARE = 0.25  # packed decode weights are made only if they take at most this share of the RAM


def _blocks(w: Weight) -> tuple[mx.array, ...]:
    return w if isinstance(w, tuple) else (w,)


def _fused(w: Weight) -> mx.array:
    return mx.concatenate(w) if isinstance(w, tuple) else w


def _rows(w: Weight) -> int:
    return sum(x.shape[0] for x in _blocks(w))


def _nbytes(w: Weight) -> int:
    return sum(x.nbytes for x in _blocks(w))


def _weights(layers: list[Layer], head: mx.array) -> list[mx.array]:
    """Every matrix the packed copies would hold, as blocks."""
    return [head] + [x for lyr in layers for w in (lyr.w_qkv, lyr.w_o, lyr.w_gu, lyr.w_down) for x in _blocks(w)]


def _packing_fits(layers: list[Layer], head: mx.array) -> bool:
    """Whether to keep packed copies of the weights for decode steps: float32, and small next to the machine's
    memory (the copies are a second model: +0.5 GiB for SmolLM2-135M, too much for an 8B model in float32).
    They pay off most at one row: Qwen2.5-Coder-1.5B batch 1 decoded 5.6 tok/s packed vs 2.2 with BLAS."""
    ws = _weights(layers, head)
    if any(isinstance(w, QLinear) or w.dtype != mx.float32 for w in ws):  # quantized: see _prepare_quantized
        return False
    return sum(w.nbytes for w in ws) <= PACK_MEMORY_SHARE * backend.ram_bytes()


def _fuse_copies_fit(layers: list[Layer], head: mx.array) -> bool:
    """Whether fused q/k/v and gate/up copies (prefill's BLAS matmuls) fit beside the packed copies within
    PACK_MEMORY_SHARE of the RAM. If not, prefill multiplies by the model's own blocks one after the other
    and nothing is copied: for Qwen2.5-Coder-1.5B the fused copies are 3.4 GB on top of 6.2 GB packed
    (16.7 GB resident instead of 13.3 GB), for SmolLM2-135M 0.3 GB next to 0.5 GB (kept: one matmul each)."""
    fused = sum(_nbytes(lyr.w_qkv) + _nbytes(lyr.w_gu) for lyr in layers)
    packed = sum(w.nbytes for w in _weights(layers, head))
    return fused + packed <= PACK_MEMORY_SHARE * backend.ram_bytes()


def _packable(q: QWeight) -> bool:
    """Whether kernels.linear_rows_q takes this quantization (4 or 8 bits, groups of 32, 64 or 128)."""
    return q.bits in (4, 8) and q.group_size in (32, 64, 128)


def _qpack_nbytes(q: QWeight) -> int:
    """Bytes of a pack or fused copy of `q` (codes, float32 scales and biases)."""
    return sum(w.nbytes + 4 * (s.size + b.size) for w, s, b in q.blocks)


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least one token of its own."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def length_groups(lengths: list[int], slack: float = 0.125, min_slack: int = 4) -> list[tuple[int, int]]:
    """Contiguous row ranges [a, b) whose lengths are within `slack` (or `min_slack` tokens) of the
    range's longest, so a group padded to its longest wastes little. Sorted lengths give few groups."""
    groups, a = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths):
            groups.append((a, i))
            break
        longest = max(lengths[a:i])
        if max(longest, lengths[i]) - min(lengths[a : i + 1]) > max(min_slack, slack * max(longest, lengths[i])):
            groups.append((a, i))
            a = i
    return groups


def _place(group, reuse, pads: list[int], prefix: int):
    """A group's caches with reused K/V written in: row r's positions [prefix, n) at slots prefix + pads[r]
    onward (the right-aligned layout, so the rows' remaining tokens follow them); rows without reuse (None)
    are left as they are."""
    out = []
    for layer, (K, V) in enumerate(group):
        for r, kept in enumerate(reuse):
            if kept is not None:
                kv, n = kept
                k, v = kv[layer]
                lo = prefix + pads[r]
                K[r, :, lo : lo + n - prefix] = k[:, prefix:n]
                V[r, :, lo : lo + n - prefix] = v[:, prefix:n]
        out.append((K, V))
    return out


def _rows_at(rows: list[int], row0: int):
    """An index for cache rows row0 + rows: a slice when they are consecutive (a plain copy), else an array."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(row0 + rows[0], row0 + rows[0] + len(rows))
    return mx.array([row0 + i for i in rows])


def _nbytes_kv(kv: list) -> int:
    return sum(k.nbytes + v.nbytes for k, v in kv)


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading token ids a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixStore:
    """K/V of finished rows, by the token ids they hold, for later prompts that continue them.

    Why: in the conversation framing a revision prompt is its critique prompt, the critique and one more user
    turn, so prefilling it recomputes K/V the critique call already had (hundreds of tokens of demos, request
    and draft per row). Entries are matched by token ids, never text: the chat template re-encodes a generated
    answer, which may tokenize otherwise near its end, so the longest common prefix is used as far as it goes.
    Bounded: the least recently used entries go once all take more than MLX_CAI_KV_REUSE_MB (0: none kept), and
    an entry that a new one extends is dropped."""

    def __init__(self):
        self.entries: list[tuple[np.ndarray, list]] = []  # (token ids, per-layer (K, V) (KVH, n, D)), LRU first

    @staticmethod
    def budget() -> int:
        return settings().kv_reuse_mb * 2**20

    def _trim(self) -> None:
        budget, total = self.budget(), sum(_nbytes_kv(kv) for _, kv in self.entries)
        while self.entries and total > budget:
            total -= _nbytes_kv(self.entries.pop(0)[1])

    def add(self, tokens: list[int], kv: list) -> None:
        """Keep `kv`, per layer the (K, V) of `tokens` at positions 0, 1, ... (evaluated copies, not views of a
        batch's cache)."""
        ids = np.asarray(tokens, np.int32)
        self.entries = [(t, x) for t, x in self.entries if len(t) > len(ids) or _common(ids, t) < len(t)]
        self.entries.append((ids, kv))
        self._trim()

    def match(self, prompt: list[int], least: int) -> tuple[list, int] | None:
        """(K/V, n) of the entry sharing the longest token prefix with `prompt`: its first n tokens, at least
        `least`, and short of the prompt's last token (prefill must compute at least one); None if none."""
        self._trim()
        ids = np.asarray(prompt[:-1], np.int32)
        shares = [_common(ids, t) for t, _ in self.entries]
        if not shares or max(shares) < least:
            return None
        best = int(np.argmax(shares))
        entry = self.entries.pop(best)
        self.entries.append(entry)  # most recently used last
        return entry[1], shares[best]


@dataclass
class _Part:
    """A slice of the batch's rows with its own cache, run on its own CPU stream. `prefix` (rows,): each
    row's shared-prefix length (parts merged by `keep` can differ); `prompts` and `reuse` (per row, None or the
    store's K/V of its first tokens, PrefixStore.match) only until prefill."""

    prompts: list[list[int]] | None
    prefix: mx.array
    pad: mx.array
    caches: list
    reuse: list | None = None

    @classmethod
    def start(cls, fast: FastLlama, prompts: list[list[int]], end: int, max_tokens: int) -> "_Part":
        n, prefix = len(prompts), shared_prefix(prompts)
        reuse = [fast.store.match(p, prefix + REUSE_MIN) for p in prompts]
        return cls(prompts, mx.full((n,), prefix, mx.int32), mx.array([end - len(p) for p in prompts]),
                   fast.new_cache(n, end + max_tokens), reuse)


class FastRunner:
    """The decode-loop interface (prefill / step / keep) over FastLlama's static cache.

    With `streams` > 1 the rows are split into that many parts, each run on its own MLX CPU stream (its own
    thread): MLX's CPU ops other than BLAS are single-threaded, so one stream leaves the other cores idle
    during norms, rope, softmax and the gate. Use with the BLAS threads shared out (backend.blas_threads_per).
    """

    def __init__(self, fast: FastLlama, prompts: list[list[int]], max_tokens: int, streams: int = 1):
        self.fast = fast
        self.slot = max(len(p) for p in prompts)
        self.n_parts = max(1, min(streams, len(prompts)))
        self.parts = [_Part.start(fast, prompts[a:b], self.slot, max_tokens)
                      for a, b in _split(len(prompts), self.n_parts)]

    def _stream(self, i: int, n: int | None = None):
        """Stream i of n parallel ones (default: the decode parts), or the default stream when n is 1."""
        return mx.stream(backend.cpu_stream(i)) if (n or self.n_parts) > 1 else contextlib.nullcontext()

    def prefill(self) -> mx.array:
        """All parts, one after the other. A part's rows are split in two runs of about equal token counts, each
        on its own CPU stream with one BLAS thread: prefill's matmuls are large enough for one thread each, and
        the two runs overlap each other's single-threaded MLX ops (norms, rope, gate) instead of leaving a BLAS
        thread spinning through them (32 chats, alternating: 1.58-1.70 vs 1.93-2.24 s). Decode steps then use the
        part's streams."""
        logits = []
        two = backend.blas_threads() >= 2
        for p in self.parts:
            prefix = p.prefix[0].item()
            done = [prefix if r is None else r[1] for r in p.reuse]  # leading tokens whose K/V are known
            sizes = [len(q) - d for q, d in zip(p.prompts, done)]  # tokens left to prefill
            self.fast.counts["prefilled"] += prefix + sum(sizes)
            self.fast.counts["reused"] += sum(done) - prefix * len(done)
            # balanced by each row's tokens less those reused (without reuse: its length, as before reuse)
            balance = [s + prefix for s in sizes]
            runs = _token_halves(balance) if two else [(0, len(sizes))]
            shared = None
            if len(runs) > 1:  # the shared prefix once, with all threads
                shared = self._run([self.fast.prefix_steps(p.prompts[0][:prefix])])[0]
            with backend.blas_threads_set(1 if len(runs) > 1 else backend.blas_threads()):
                out = self._run([self.fast.prefill_steps(p.prompts[a:b], prefix, p.caches, self.slot, row0=a,
                                                         shared=shared, reuse=p.reuse[a:b]) for a, b in runs])
            p.reuse = None  # the store may drop those entries now; the part holds their copies in its cache
            logits.append(mx.concatenate(out) if len(out) > 1 else out[0])
        return mx.concatenate(logits) if len(logits) > 1 else logits[0]

    def _run(self, gens: list) -> list:
        """Run prefill generators to their ends, generator i on stream i (the default stream for one),
        evaluating what each step of all of them yields together; their return values."""
        out, done = [None] * len(gens), [False] * len(gens)
        while not all(done):
            todo = []
            for i, gen in enumerate(gens):
                if done[i]:
                    continue
                with self._stream(i, len(gens)):
                    try:
                        todo.append(next(gen))
                    except StopIteration as stop:
                        out[i], done[i] = stop.value, True
            mx.eval(todo)
        return out

    def step(self, y: mx.array) -> mx.array:
        out, a = [], 0
        for i, p in enumerate(self.parts):
            b = a + p.pad.shape[0]
            with self._stream(i):
                logits, p.caches = self.fast.step(y[a:b], p.caches, self.slot, p.pad, p.prefix, part=i)
            out.append(logits)
            a = b
        self.slot += 1
        return mx.concatenate(out) if len(out) > 1 else out[0]

    def retire(self, rows: list[int], tokens: list[list[int]]) -> None:
        """Put the K/V of batch rows `rows` (positions) in the model's PrefixStore, before `keep` drops them or
        the batch ends; tokens[i]: the ids row i's cache holds from position 0 (its prompt, then the generated
        tokens that were fed to a step). One row at a time: each copy is evaluated (it must not keep the whole
        batch cache alive as a view) before the next is made. One copy per layer and K/V (a stacked block
        took about twice as long: 32 rows of ~800 tokens in caches of SmolLM2's shape, 0.6-0.9 vs 0.3-0.45 s)."""
        if not self.fast.store.budget():
            return
        where = [(p, j) for p in self.parts for j in range(p.pad.shape[0])]
        for r, toks in zip(rows, tokens):
            p, j = where[r]
            prefix, pad = p.prefix[j].item(), p.pad[j].item()
            kv = [tuple(mx.concatenate([X[j, :, :prefix], X[j, :, prefix + pad : pad + len(toks)]], axis=1)
                        for X in (K, V)) for K, V in p.caches]
            mx.eval(kv)
            self.fast.store.add(toks, kv)

    def keep(self, idx: mx.array) -> None:
        """Keep rows `idx` (positions in the batch), rebalanced over the parts."""
        parts = self.parts

        def take(xs):
            return xs[0][idx] if len(xs) == 1 else mx.concatenate(xs)[idx]

        caches = [(take([p.caches[i][0] for p in parts]), take([p.caches[i][1] for p in parts]))
                  for i in range(len(parts[0].caches))]
        prefix, pad = take([p.prefix for p in parts]), take([p.pad for p in parts])
        self.n_parts = min(self.n_parts, idx.shape[0])
        self.parts = [_Part(None, prefix[a:b], pad[a:b], [(K[a:b], V[a:b]) for K, V in caches])
                      for a, b in _split(idx.shape[0], self.n_parts)]


# Prefill rows (of one part) from which they are split in two runs on two streams (prefill's matmuls then
# get one BLAS thread each); fewer rows make matmuls too small for that.
PREFILL_SPLIT_ROWS = 8


def _token_halves(sizes: list[int]) -> list[tuple[int, int]]:
    """[(0, k), (k, n)] splitting the rows where the token counts (`sizes`, one per row) before and after are
    closest (one range for fewer than PREFILL_SPLIT_ROWS rows)."""
    n = len(sizes)
    if n < PREFILL_SPLIT_ROWS:
        return [(0, n)]
    total, run, best = sum(sizes), 0, (float("inf"), 1)
    for k in range(1, n):
        run += sizes[k - 1]
        best = min(best, (abs(total - 2 * run), k))
    return [(0, best[1]), (best[1], n)]


def _split(n: int, k: int) -> list[tuple[int, int]]:
    """k contiguous, near-equal ranges covering range(n)."""
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]
