"""A compiled decode path for dense llama-family models (SmolLM2, Llama 3, Mistral-style GQA).

Why: on the CPU a decode step of mlx-lm's model is dominated by per-op overhead and by small matmuls,
not by FLOPs. Here a step is one `mx.compile`d function over a *static-shape* KV cache (so it compiles
once per batch size and length bucket), q/k/v and gate/up projections are fused into one matmul each,
and LoRA adapters are folded into the dense weights (generation with an adapter costs nothing extra).

Layout: K/V caches (B, n_kv_heads, S, head_dim); prompts are left-padded so slot s of row b holds
position s - pad[b]; slot `p` is written at step p. Weights are read from an mlx-lm llama `Model`;
anything else (quantized weights, rope scaling, other architectures) returns None from `build` and the
caller uses the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_cai import backend  # noqa: F401

import mlx.core as mx
import mlx.nn as nn

BUCKET = 64  # cache length rounds up to this: few distinct compiled shapes, little wasted attention


@dataclass
class Layer:
    w_qkv: mx.array  # (H*D + 2*KVH*D, hidden)
    w_o: mx.array  # (hidden, H*D)
    w_gu: mx.array  # (2*ffn, hidden)
    w_down: mx.array  # (hidden, ffn)
    norm_in: mx.array
    norm_post: mx.array


def _dense(linear) -> mx.array | None:
    """The effective dense weight of a Linear or a LoRA-wrapped Linear (None if quantized/other)."""
    if type(linear) is nn.Linear and "bias" not in linear:
        return linear.weight
    base = getattr(linear, "linear", None)
    if base is not None and hasattr(linear, "lora_a") and type(base) is nn.Linear and "bias" not in base:
        if getattr(linear, "m", None) is not None:  # DoRA rescales by a learned magnitude: generic path
            return None
        delta = (linear.scale * linear.lora_b.T) @ linear.lora_a.T  # (out, in)
        return base.weight + delta.astype(base.weight.dtype)
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
        self._step = mx.compile(self._step_impl)

    @classmethod
    def build(cls, model) -> "FastLlama | None":
        args = getattr(model, "args", None)
        if getattr(args, "model_type", None) not in ("llama", "mistral") or getattr(args, "rope_scaling", None):
            return None
        if getattr(args, "attention_bias", False) or getattr(args, "mlp_bias", False):
            return None
        inner = model.model
        layers = []
        for lyr in inner.layers:
            a, m = lyr.self_attn, lyr.mlp
            ws = [_dense(x) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)]
            if any(w is None for w in ws):
                return None
            q, k, v, o, g, u, d = ws
            layers.append(Layer(mx.concatenate([q, k, v]), o, mx.concatenate([g, u]), d,
                                lyr.input_layernorm.weight, lyr.post_attention_layernorm.weight))
        if type(inner.embed_tokens) is not nn.Embedding:
            return None
        embed = inner.embed_tokens.weight
        head = embed if args.tie_word_embeddings else _dense(model.lm_head)
        if head is None:
            return None
        fast = cls(args, layers, embed, head, inner.norm.weight)
        mx.eval([lyr.w_qkv for lyr in layers] + [lyr.w_gu for lyr in layers])
        return fast

    # --- the model -------------------------------------------------------------------------------
    def _layer(self, lyr: Layer, x, K, V, start, offsets, mask, end=None):
        """x (B, T, hidden); K/V (B, KVH, S, D); writes slots [start, start+T); offsets (B,) rope positions.
        `end` (a python int, prefill only): attend to slots [0, end) instead of the whole static cache."""
        B, T, _ = x.shape
        H, KVH, D = self.n_heads, self.n_kv, self.head_dim
        h = mx.fast.rms_norm(x, lyr.norm_in, self.eps)
        qkv = h @ lyr.w_qkv.T
        q, k, v = mx.split(qkv, [H * D, (H + KVH) * D], axis=-1)
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, KVH, D).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, KVH, D).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, D, traditional=self.traditional, base=self.theta, scale=1.0, offset=offsets)
        k = mx.fast.rope(k, D, traditional=self.traditional, base=self.theta, scale=1.0, offset=offsets)
        K = mx.slice_update(K, k.astype(K.dtype), start, axes=(2,))
        V = mx.slice_update(V, v.astype(V.dtype), start, axes=(2,))
        Ka, Va = (K, V) if end is None else (K[:, :, :end], V[:, :, :end])
        o = mx.fast.scaled_dot_product_attention(q, Ka, Va, scale=self.scale, mask=mask)
        x = x + o.transpose(0, 2, 1, 3).reshape(B, T, H * D) @ lyr.w_o.T
        h = mx.fast.rms_norm(x, lyr.norm_post, self.eps)
        g, u = mx.split(h @ lyr.w_gu.T, 2, axis=-1)
        return x + (nn.silu(g) * u) @ lyr.w_down.T, K, V

    def _forward(self, tokens, caches, start, pad, end=None):
        """tokens (B, T) at slots [start, start+T). Returns (last-position logits (B, V), new caches).
        `end` = start + T as a python int (prefill): attention skips the empty slots after it."""
        B, T = tokens.shape
        S = caches[0][0].shape[2] if end is None else end
        slots = mx.arange(S)
        pos = start + mx.arange(T)  # (T,) slots being written
        offsets = start - pad  # (B,) rope position of the first new token per row
        # (B, 1, T, S): a row attends to its own non-pad slots up to the current one. A pad query also
        # sees itself, so no softmax row is empty (an empty row gives NaN, and NaN * 0 leaks into V).
        s4, p4 = slots[None, None, None, :], pos[None, None, :, None]
        mask = ((s4 >= pad[:, None, None, None]) & (s4 <= p4)) | (s4 == p4)
        x = self.embed[tokens]
        new = []
        for lyr, (K, V) in zip(self.layers, caches):
            x, K, V = self._layer(lyr, x, K, V, start, offsets, mask, end)
            new.append((K, V))
        x = mx.fast.rms_norm(x[:, -1, :], self.norm, self.eps)
        return x @ self.lm_head.T, new

    def _step_impl(self, tokens, caches, start, pad):
        return self._forward(tokens[:, None], caches, start, pad)

    # --- public ----------------------------------------------------------------------------------
    def new_cache(self, B: int, length: int, dtype=mx.float32):
        S = -(-length // BUCKET) * BUCKET
        shape = (B, self.n_kv, S, self.head_dim)
        return [(mx.zeros(shape, dtype), mx.zeros(shape, dtype)) for _ in self.layers]

    def prefill(self, tokens: mx.array, pad: mx.array, caches, chunk: int = 256):
        """Run left-padded prompts (B, L) into the cache; returns last-position logits (B, V)."""
        L = tokens.shape[1]
        logits = None
        for s in range(0, L, chunk):
            piece = tokens[:, s : s + chunk]
            logits, caches = self._forward(piece, caches, mx.array(s), pad, end=s + piece.shape[1])
            mx.eval(caches)
        return logits, caches

    def step(self, tokens: mx.array, caches, slot: int, pad: mx.array):
        """One compiled decode step: tokens (B,) go to `slot`. Returns (logits (B, V), caches)."""
        return self._step(tokens, caches, mx.array(slot), pad)


class FastRunner:
    """The decode-loop interface (prefill / step / keep) over FastLlama's static cache."""

    def __init__(self, fast: FastLlama, tokens: mx.array, pad: list[int], max_tokens: int):
        self.fast = fast
        self.tokens = tokens
        self.pad = mx.array(pad)
        self.slot = tokens.shape[1]
        self.caches = fast.new_cache(tokens.shape[0], self.slot + max_tokens)

    def prefill(self) -> mx.array:
        logits, self.caches = self.fast.prefill(self.tokens, self.pad, self.caches)
        return logits

    def step(self, y: mx.array) -> mx.array:
        logits, self.caches = self.fast.step(y, self.caches, self.slot, self.pad)
        self.slot += 1
        return logits

    def keep(self, idx: mx.array) -> None:
        self.caches = [(K[idx], V[idx]) for K, V in self.caches]
        self.pad = self.pad[idx]
