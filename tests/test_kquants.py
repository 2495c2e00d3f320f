"""K-quant (Q4_K, Q5_K, Q6_K) decoding against llama.cpp's own gguf-py dequantizer.

Blocks are random bytes (every bit pattern of the packed fields is valid) with the fp16 d/dmin fields
set to small finite values; gguf-py's `gguf.quants.dequantize` is the independent reference.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import mlx.core as mx  # noqa: E402
from gguf.quants import GGMLQuantizationType as GQ  # noqa: E402

from mlx_cai import kquants as kq  # noqa: E402

SHAPE = (8, 512)


def random_blocks(qtype: str, shape: tuple, seed: int = 0) -> np.ndarray:
    """Raw bytes of a valid random `qtype` tensor of `shape` (1-D uint8, as a GGUF reader gives)."""
    rng = np.random.default_rng(seed)
    block_size, type_size = kq.QTYPES[qtype]
    n = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, (n, type_size), dtype=np.uint8)

    def f16(lo, hi):
        return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)

    if qtype == "Q6_K":
        blocks[:, 208:210] = f16(1e-4, 1e-2)  # d is the last field
    else:
        blocks[:, 0:2], blocks[:, 2:4] = f16(1e-4, 1e-2), f16(1e-4, 1e-2)  # d, dmin lead
    return blocks.reshape(-1)


def reference(raw: np.ndarray, qtype: str, shape: tuple) -> np.ndarray:
    rows = raw.reshape(-1, shape[-1] // 256 * kq.QTYPES[qtype][1])
    return gguf.quants.dequantize(rows, GQ[qtype]).reshape(shape)


@pytest.mark.parametrize("qtype", list(kq.QTYPES))
@pytest.mark.parametrize("shape", [SHAPE, (2, 3, 256)])
def test_dequantize_matches_gguf_py(qtype, shape):
    raw = random_blocks(qtype, shape)
    got = kq.dequantize(raw, qtype, shape)
    assert got.dtype == np.float32 and got.shape == shape
    assert np.isfinite(got).all() and got.std() > 0
    np.testing.assert_array_equal(got, reference(raw, qtype, shape))


def test_dequantize_spans_several_chunks(monkeypatch):
    monkeypatch.setattr(kq, "_CHUNK_BLOCKS", 3)  # 16 blocks -> 6 chunks, the last one short
    raw = random_blocks("Q5_K", SHAPE, seed=1)
    np.testing.assert_array_equal(kq.dequantize(raw, "Q5_K", SHAPE), reference(raw, "Q5_K", SHAPE))


@pytest.mark.parametrize("qtype", list(kq.QTYPES))
def test_to_affine_round_trips_through_mlx(qtype):
    raw = random_blocks(qtype, SHAPE, seed=2)
    got = kq.to_affine(raw, qtype, SHAPE)
    bits, group_size = kq.AFFINE[qtype]
    if got is None:
        assert not kq.mlx_supports(bits, group_size)
        pytest.skip(f"this MLX has no {bits}-bit / group {group_size} quantized matmul")
    wq, scales, biases, got_bits, got_group = got
    assert (got_bits, got_group) == (bits, group_size)
    assert wq.dtype == np.uint32 and wq.shape == (SHAPE[0], SHAPE[1] * bits // 32)
    assert scales.dtype == biases.dtype == np.float32 and scales.shape == (SHAPE[0], SHAPE[1] // group_size)
    args = (mx.array(wq), mx.array(scales), mx.array(biases))
    w = np.array(mx.dequantize(*args, group_size=group_size, bits=bits))
    np.testing.assert_array_equal(w, kq.dequantize(raw, qtype, SHAPE))
    # and the matmul a QuantizedLinear would run on these triples agrees with the float weights
    x = np.random.default_rng(3).standard_normal((4, SHAPE[1])).astype(np.float32)
    y = np.array(mx.quantized_matmul(mx.array(x), *args, transpose=True, group_size=group_size, bits=bits))
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)


def test_mlx_support_expected():
    # 4- and 5-bit at group 32 are in every MLX this project supports; Q6_K's group of 16 is not.
    assert kq.mlx_supports(4, 32) and kq.mlx_supports(5, 32)
    assert kq.mlx_supports(6, 16) == (kq.to_affine(random_blocks("Q6_K", SHAPE), "Q6_K", SHAPE) is not None)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_pack_matches_mlx_layout(bits):
    q = np.random.default_rng(bits).integers(0, 1 << bits, (3, 128))
    ones, zeros = np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32)
    w = mx.dequantize(mx.array(kq.pack(q, bits)), mx.array(ones), mx.array(zeros), group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(w), q.astype(np.float32))


@pytest.mark.parametrize("qtype", list(kq.QTYPES))
def test_wrong_byte_count_raises(qtype):
    raw = random_blocks(qtype, SHAPE)
    for bad in (raw[:-1], np.concatenate([raw, raw[:5]])):
        with pytest.raises(kq.KQuantError, match="needs .* bytes, got"):
            kq.dequantize(bad, qtype, SHAPE)
        with pytest.raises(kq.KQuantError):
            kq.to_affine(bad, qtype, SHAPE)


def test_accepts_bytes():
    raw = random_blocks("Q6_K", SHAPE)
    np.testing.assert_array_equal(kq.dequantize(raw.tobytes(), "Q6_K", SHAPE), kq.dequantize(raw, "Q6_K", SHAPE))


def test_bad_type_and_shape_raise():
    raw = random_blocks("Q4_K", SHAPE)
    with pytest.raises(kq.KQuantError, match="unsupported K-quant type"):
        kq.dequantize(raw, "Q3_K", SHAPE)
    with pytest.raises(kq.KQuantError, match="multiple of 256"):
        kq.dequantize(raw, "Q4_K", (16, 288))
    assert issubclass(kq.KQuantError, ValueError)


@pytest.mark.parametrize("qtype", list(kq.QTYPES))
def test_from_real_float_data(qtype):
    """Quantize smooth float weights with gguf-py (where it can) and decode them back."""
    data = np.sin(np.arange(int(np.prod(SHAPE)), dtype=np.float32) / 7).reshape(SHAPE) * 0.05
    try:
        raw = gguf.quants.quantize(data, GQ[qtype])
    except NotImplementedError:
        pytest.skip(f"gguf-py cannot quantize {qtype} (it only dequantizes K-quants)")
    got = kq.dequantize(raw.reshape(-1), qtype, SHAPE)
    np.testing.assert_array_equal(got, reference(raw.reshape(-1), qtype, SHAPE))
    np.testing.assert_allclose(got, data, atol=0.01)
