"""A GGUF file's header (metadata and tensor table) read in one pass over its bytes.

gguf's GGUFReader makes a numpy view for every item of every array: its constructor takes about 4 s on SmolLM2's
49K-token vocabulary and merges and 12 s on Qwen2.5's 151K, on every start of a server or command (a faster
reader was proposed upstream, llama.cpp PR 13378). Here each value is decoded with struct from one read of the
header, and the tensors' data are views of one memmap, as GGUFReader gives them: the same header in a small
fraction of the time. GGUFReader stays the reference: the tests compare both on the same files.

Layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64; each entry
a string key, a value type u32 and the value (arrays: item type u32, count u64, the items); each tensor a name,
n_dims u32, dims u64 x n_dims (fastest first), ggml type u32 and offset u64 from the data section, which starts
at the next multiple of general.alignment (32 by default).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # type -> struct
_STRING, _ARRAY = 8, 9
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
          GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}
_HEADER_READ = 1 << 20  # bytes read at first; the buffer at least doubles each time the header runs past it


@dataclass
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # as stored: fastest dimension first
    offset: int  # of its first byte in the file
    data: np.ndarray  # a read-only view; quantized types as [rows, bytes per row] uint8, as GGUFReader gives them


@dataclass
class GGUFHeader:
    fields: dict[str, object]  # key -> int, float, bool, str, or a list (strings) / numpy array (numbers)
    spans: dict[str, tuple[int, int]]  # key -> the entry's byte range in the file (key, type and value)
    tensors: list[Tensor] = field(default_factory=list)


class _Cursor:
    """Reads little-endian values from a bytes buffer, growing it from the file when a read runs past its end."""

    def __init__(self, f):
        self.f, self.buf, self.pos = f, f.read(_HEADER_READ), 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            more = self.f.read(max(n, len(self.buf)))
            if self.pos + n > len(self.buf) + len(more):
                raise ValueError(f"the header ends early, at byte {len(self.buf) + len(more)}")
            self.buf += more

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)  # "<": no native alignment padding
        self.need(size)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        (n,) = self.unpack("Q")
        self.need(n)
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])[0]
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self.unpack("IQ")
        if item == _STRING:
            return [self.string() for _ in range(count)]
        if item in _SCALARS:
            fmt = _SCALARS[item]
            self.need(count * struct.calcsize("<" + fmt))
            arr = np.frombuffer(self.buf, dtype=np.dtype("<" + fmt), count=count, offset=self.pos)
            self.pos += arr.nbytes
            return arr
        return [self.value(item) for _ in range(count)]  # arrays of arrays


def read_header(path: str) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file; ValueError on a file that is not one or ends early."""
    with open(path, "rb") as f:
        c = _Cursor(f)
        magic, version, n_tensors, n_fields = c.unpack("4sIQQ")
        if magic != b"GGUF":
            raise ValueError("GGUF magic invalid")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        fields, spans = {}, {}
        for _ in range(n_fields):
            start = c.pos
            key = c.string()
            if key in fields:
                raise ValueError(f"metadata key {key} appears twice")
            (kind,) = c.unpack("I")
            fields[key] = c.value(kind)
            spans[key] = (start, c.pos)
        table, names = [], set()
        for _ in range(n_tensors):
            name = c.string()
            if name in names:
                raise ValueError(f"tensor {name} appears twice")
            names.add(name)
            (n_dims,) = c.unpack("I")
            dims = c.unpack("Q" * n_dims)
            kind, offset = c.unpack("IQ")
            table.append((name, dims, GGMLQuantizationType(kind), offset))
    alignment = int(fields.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"invalid alignment {alignment}: must be a power of two")
    start = -(-c.pos // alignment) * alignment
    data = np.memmap(path, mode="r")
    tensors = []
    for name, dims, kind, offset in table:
        n = int(np.prod(dims, dtype=np.int64))
        shape = tuple(reversed(dims))
        block, type_size = GGML_QUANT_SIZES[kind]
        at = start + offset
        if kind in _PLAIN:
            view = data[at:at + n * np.dtype(_PLAIN[kind]).itemsize].view(_PLAIN[kind])
        else:
            view, shape = data[at:at + n * type_size // block], quant_shape_to_byte_shape(shape, kind)
        if view.size * view.itemsize < n * type_size // block:
            raise ValueError(f"tensor {name} runs past the end of the file")
        tensors.append(Tensor(name, kind, tuple(dims), at, view.reshape(shape)))
    return GGUFHeader(fields, spans, tensors)
