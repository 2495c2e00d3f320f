"""A small GGUF reader: metadata, tensor table and each tensor's raw bytes, without loading the weights.

Reads the GGUF v2/v3 layout (llama.cpp's gguf.md): header (magic, version, tensor and key counts), typed
key/value metadata, then one entry per tensor (name, dims innermost first, ggml type, offset), then the data
section at the next multiple of `general.alignment` (default 32). Tensor bytes come from a read-only numpy
memmap, so a 1 GB file costs no memory until a tensor is decoded. Writes nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"

# ggml tensor types: name, elements per block, bytes per block (ggml.h / gguf-py constants)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    30: ("BF16", 1, 2),
}

# metadata value types -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class GGUFReadError(ValueError):
    """Not a GGUF file this reader understands (one-line message)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (outermost first), as numpy and MLX index it
    type: str  # ggml type name, e.g. "Q4_K"
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise GGUFReadError("the file ends inside its header (truncated?)")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item, n = self.take("I"), self.take("Q")
            if item in _NUMPY:  # numeric arrays (token types, scores) as one numpy read
                dt = np.dtype(_NUMPY[item]).newbyteorder("<")
                out = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos += n * dt.itemsize
                return out
            return [self.value(item) for _ in range(n)]
        if vtype not in _SCALARS:
            raise GGUFReadError(f"unknown metadata value type {vtype}")
        return self.take(_SCALARS[vtype])


class GGUFFile:
    """`GGUFFile(path)`: `.metadata` (dict), `.tensors` (name -> TensorInfo), `.raw(name)` (uint8 bytes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._map))
        if bytes(self._map[:4]) != MAGIC:
            raise GGUFReadError(f"{self.path}: not a GGUF file (no GGUF magic)")
        cur.pos = 4
        self.version = cur.take("I")
        if self.version not in (2, 3):
            raise GGUFReadError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("I"))
        entries = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("Q") for _ in range(cur.take("I"))]
            gtype, offset = cur.take("I"), cur.take("Q")
            entries.append((name, tuple(reversed(dims)), gtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, gtype, offset in entries:
            if gtype not in GGML_TYPES:
                raise GGUFReadError(f"{self.path}: tensor '{name}' has unknown ggml type {gtype}")
            tname, block, size = GGML_TYPES[gtype]
            count = int(np.prod(shape)) if shape else 1
            if count % block:
                raise GGUFReadError(f"{self.path}: tensor '{name}' ({tname}) is not whole blocks")
            info = TensorInfo(name, shape, tname, start + offset, count // block * size)
            if info.offset + info.nbytes > len(self._map):
                raise GGUFReadError(f"{self.path}: tensor '{name}' runs past the end of the file (truncated?)")
            self.tensors[name] = info

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (a read-only view into the file)."""
        info = self.tensors[name]
        return self._map[info.offset : info.offset + info.nbytes]

    def types(self) -> set[str]:
        return {t.type for t in self.tensors.values()}
