"""Decode llama.cpp GGUF K-quant tensors (Q4_K, Q5_K, Q6_K) into numpy arrays.

Reads: the raw bytes of one GGUF tensor (a uint8 array, as `gguf.GGUFReader` or a memory map gives
it) plus its type name and its numpy shape (GGUF's `ne` reversed: the last axis is the innermost, the
one blocks run along). Writes nothing: returns float32 weights (`dequantize`) or, where it is exact,
MLX affine-quantized triples (`to_affine`). Pure numpy; MLX is imported only inside `to_affine`.

Block layouts (one super-block = 256 consecutive weights of a row; ggml-common.h, gguf-py quants.py),
fp16 fields little-endian:

    Q4_K (144 B): d fp16 | dmin fp16 | scales[12] | qs[128]
        8 sub-blocks of 32; 6-bit scale sc_j and min m_j packed in scales[12]; 4-bit q in qs
        (bytes 32c..32c+31 hold sub-block 2c in the low nibbles, 2c+1 in the high).
        w = d*sc_j*q - dmin*m_j
    Q5_K (176 B): d | dmin | scales[12] | qh[32] | qs[128]
        as Q4_K, plus the 5th bit of weight l of sub-block j in bit j of qh[l].
    Q6_K (210 B): ql[128] | qh[64] | scales[16] int8 | d fp16
        16 sub-blocks of 16, one int8 scale each; 6-bit q = 4 low bits (ql) | 2 high bits (qh) << 4.
        w = d*sc*(q - 32)

Every type decodes to (q, scales, biases) with w = scales*q + biases per group, which is both MLX's
affine convention and, done in float32, bit-identical to gguf-py's dequantizer (each product is exact).
"""

from __future__ import annotations

import functools

import numpy as np

QK_K = 256  # weights per super-block, every K-quant

# name -> (block_size in weights, type_size in bytes), as gguf's GGML_QUANT_SIZES
QTYPES: dict[str, tuple[int, int]] = {
    "Q4_K": (QK_K, 144),
    "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
}

# name -> (bits, group_size) of the exact MLX affine form
AFFINE: dict[str, tuple[int, int]] = {"Q4_K": (4, 32), "Q5_K": (5, 32), "Q6_K": (6, 16)}

# Blocks decoded per step: keeps the uint8/float32 temporaries small (~16 MB) on big tensors.
_CHUNK_BLOCKS = 1 << 14


class KQuantError(ValueError):
    """Raw bytes that are not a K-quant tensor of the given type and shape (message is one line)."""


def _blocks(raw: np.ndarray, qtype: str, shape: tuple) -> np.ndarray:
    """The raw bytes as an (n_blocks, type_size) uint8 array, after checking type, shape and size."""
    if qtype not in QTYPES:
        raise KQuantError(f"unsupported K-quant type {qtype!r} (supported: {', '.join(QTYPES)})")
    block_size, type_size = QTYPES[qtype]
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % block_size:
        raise KQuantError(f"{qtype} tensor shape {shape}: last axis must be a multiple of {block_size}")
    n_blocks = int(np.prod(shape)) // block_size
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, np.uint8)
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size != n_blocks * type_size:
        raise KQuantError(
            f"{qtype} tensor of shape {shape} needs {n_blocks * type_size} bytes, got {data.size}"
        )
    return data.reshape(n_blocks, type_size)


def _f16(b: np.ndarray) -> np.ndarray:
    """Two-byte columns (n, 2) as float32 (n, 1)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs (n, 128) -> 4-bit values (n, 8, 32): per 32-byte run, low nibbles then high nibbles."""
    qs = qs.reshape(-1, 4, 1, 32)
    return ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(-1, 8, 32)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 bytes of 6-bit (scale, min) pairs of Q4_K/Q5_K -> two (n, 8) uint8 arrays.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for
    mins; bytes 8-11 the low 4 bits of scale 4+i (low nibble) and min 4+i (high nibble).
    """
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _decode_q4_k(b: np.ndarray):
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _nibbles(b[:, 16:144])
    return q, _f16(b[:, 0:2]) * sc, -(_f16(b[:, 2:4]) * mn)


def _decode_q5_k(b: np.ndarray):
    sc, mn = _scale_min_k4(b[:, 4:16])
    hi = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # (n, 8, 32)
    q = _nibbles(b[:, 48:176]) | (hi << 4)
    return q, _f16(b[:, 0:2]) * sc, -(_f16(b[:, 2:4]) * mn)


def _decode_q6_k(b: np.ndarray):
    # Per 128-weight half: ql[64] low nibbles -> weights 0-63, high nibbles -> 64-127;
    # qh[32] bit pairs 0-1, 2-3, 4-5, 6-7 -> weights 0-31, 32-63, 64-95, 96-127.
    lo = (b[:, 0:128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = lo.reshape(-1, 16, 16) | (hi.reshape(-1, 16, 16) << 4)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8)
    return q, scale, -32.0 * scale  # q - 32 folded into the bias: exact in float32


_DECODERS = {"Q4_K": _decode_q4_k, "Q5_K": _decode_q5_k, "Q6_K": _decode_q6_k}


def _decode(blocks: np.ndarray, qtype: str):
    """(q uint8 (n, groups, group_size), scales f32 (n, groups), biases f32 (n, groups))."""
    q, scales, biases = _DECODERS[qtype](blocks)
    groups = scales.shape[1]
    return q.reshape(-1, groups, QK_K // groups), scales.astype(np.float32), biases.astype(np.float32)


def dequantize(raw: np.ndarray, qtype: str, shape: tuple) -> np.ndarray:
    """The tensor as float32 of `shape`, equal to gguf-py's `gguf.quants.dequantize`."""
    blocks = _blocks(raw, qtype, shape)
    out = np.empty((blocks.shape[0], QK_K), np.float32)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        q, scales, biases = _decode(blocks[start:start + _CHUNK_BLOCKS], qtype)
        dst = out[start:start + q.shape[0]].reshape(q.shape)
        np.multiply(q, scales[..., None], out=dst)
        dst += biases[..., None]
    return out.reshape(tuple(int(s) for s in shape))


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit values along the last axis into uint32 as MLX does.

    MLX's layout is one little-endian bit stream per row (value i at bits i*bits..), read as
    little-endian uint32 words; 32 values fill exactly `bits` words, so we pack 32 at a time.
    """
    q = np.asarray(q)
    if q.shape[-1] % 32:
        raise KQuantError(f"cannot pack a last axis of {q.shape[-1]} values (need a multiple of 32)")
    runs = q.reshape(-1, 32).astype(np.uint32)
    words = np.zeros((runs.shape[0], bits), np.uint32)
    for i in range(32):  # 32 vectorised steps, independent of the tensor's size
        word, off = divmod(i * bits, 32)
        words[:, word] |= runs[:, i] << np.uint32(off)
        if off + bits > 32:  # value straddles two words
            words[:, word + 1] |= runs[:, i] >> np.uint32(32 - off)
    return words.reshape(*q.shape[:-1], q.shape[-1] * bits // 32)


@functools.cache
def mlx_supports(bits: int, group_size: int) -> bool:
    """Whether this MLX reads our `pack` layout at (bits, group_size) exactly, in `mx.dequantize` and
    in `mx.quantized_matmul` (what `nn.QuantizedLinear` runs). Checked once on a small array.

    Both are needed: MLX 0.32's dequantize accepts a group of 16, its quantized matmul does not.
    """
    try:
        from mlx_cai import backend  # noqa: F401  (OpenBLAS before mlx.core)

        import mlx.core as mx
    except ImportError:
        return False
    # Dyadic scales keep every product exact, so any rounding or fused multiply-add gives `want`.
    q = (np.arange(2 * 128) * 7 % (1 << bits)).reshape(2, 128)
    n_groups = 128 // group_size
    scales = (np.arange(2 * n_groups, dtype=np.float32).reshape(2, n_groups) + 1) / 8
    biases = -(np.arange(2 * n_groups, dtype=np.float32).reshape(2, n_groups) + 3) / 4
    want = q.reshape(2, n_groups, group_size).astype(np.float32) * scales[..., None] + biases[..., None]
    want = want.reshape(2, 128)
    args = (mx.array(pack(q, bits)), mx.array(scales), mx.array(biases))
    try:
        got = np.array(mx.dequantize(*args, group_size=group_size, bits=bits))
        # identity @ W.T = W.T: every output is one exact product, so this too must match exactly
        eye = mx.eye(128, dtype=mx.float32)
        got_mm = np.array(mx.quantized_matmul(eye, *args, transpose=True, group_size=group_size, bits=bits))
    except (ValueError, RuntimeError):  # MLX rejects unsupported bits / group sizes
        return False
    return bool(np.array_equal(got, want) and np.array_equal(got_mm, want.T))


def to_affine(raw: np.ndarray, qtype: str, shape: tuple):
    """The tensor as MLX affine triples (wq uint32, scales f32, biases f32, bits, group_size), or None.

    Exact: `mx.dequantize(wq, scales, biases, group_size, bits)` equals `dequantize(raw, qtype, shape)`.
    None where this MLX lacks the type's (bits, group_size) (e.g. Q6_K's group of 16): dequantize then.
    """
    blocks = _blocks(raw, qtype, shape)
    bits, group_size = AFFINE[qtype]
    if not mlx_supports(bits, group_size):
        return None
    n, groups = blocks.shape[0], QK_K // group_size
    wq = np.empty((n, QK_K * bits // 32), np.uint32)
    scales = np.empty((n, groups), np.float32)
    biases = np.empty((n, groups), np.float32)
    for start in range(0, n, _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, n)
        q, scales[start:stop], biases[start:stop] = _decode(blocks[start:stop], qtype)
        wq[start:stop] = pack(q.reshape(stop - start, QK_K), bits)
    # Blocks run along the last axis, so (n_blocks, per-block) reshapes straight to the row layout.
    shape = tuple(int(s) for s in shape)
    lead, cols = shape[:-1], shape[-1]
    return (wq.reshape(*lead, cols * bits // 32), scales.reshape(*lead, cols // group_size),
            biases.reshape(*lead, cols // group_size), bits, group_size)
