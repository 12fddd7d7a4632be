"""The header of a GGUF file (its key/value fields and tensor table), read with the standard
library alone.

Why not gguf-py: this module runs inside PostgreSQL backends too (``themis_lora_register``
checks an adapter sent as ``bytea``), whose Python has only the standard library and psycopg.
It reads what llama.cpp's GGUF specification (ggml's ``docs/gguf.md``, versions 2 and 3)
puts before the tensor data and nothing more: no tensor is read.  Every length and count is
checked against the bytes that are there, so a truncated or hostile file is a
:class:`GGUFError`, never a huge allocation or a crash.  Array fields are skipped (the
vocabulary of a model is one); scalars and strings are kept.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["FileBytes", "GGUFError", "GGUFHeader", "TensorInfo", "read_header"]

FileBytes = bytes | memoryview | mmap.mmap
"""A whole file: its bytes, or a memory map of it."""

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# value types of the key/value section: struct format of the scalar ones
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_UINT32, _STRING, _ARRAY = 4, 8, 9

# ggml tensor types: (elements per block, bytes per block), for the data-extent check
GGML_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),
    28: (1, 8), 30: (1, 2),
}


class GGUFError(ValueError):
    """Not a GGUF file, or one whose header is cut short or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]  # ggml order: the row length (n_in) first
    ggml_type: int
    offset: int  # from the start of the data section

    def nbytes(self) -> int | None:
        """Bytes of the tensor's data, or None for a type this module does not know or a
        row length that is not a whole number of the type's blocks (llama.cpp refuses it)."""
        size = GGML_TYPE_SIZES.get(self.ggml_type)
        if size is None or self.shape[0] % size[0]:
            return None
        n = 1
        for d in self.shape:
            n *= d
        block, block_bytes = size
        return n // block * block_bytes


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]  # scalar and string fields (arrays are skipped)
    tensors: dict[str, TensorInfo]
    data_offset: int  # where the data section starts in the file
    alignment: int = DEFAULT_ALIGNMENT  # of the data section and of every tensor in it

    def data_end(self) -> int | None:
        """Where the last tensor's data ends (None if a tensor type is unknown)."""
        end = self.data_offset
        for t in self.tensors.values():
            n = t.nbytes()
            if n is None:
                return None
            end = max(end, self.data_offset + t.offset + n)
        return end


class _Cursor:
    def __init__(self, buf: FileBytes) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def skip(self, n: int) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(f"the header is cut short (wants {n} bytes at offset {self.pos}, "
                            f"the file has {len(self.buf)})")
        self.pos += n
        return self.pos - n

    def take(self, n: int) -> bytes:
        # a copy: no view of the caller's buffer (a memory map) outlives the parse
        start = self.skip(n)
        return bytes(self.buf[start:self.pos])

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("<Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"a string at offset {self.pos - len(raw)} is not UTF-8") from exc

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            self.skip_array()
            return None
        raise GGUFError(f"unknown value type {vtype} at offset {self.pos}")

    def skip_array(self) -> None:
        etype, count = self.unpack("<I"), self.unpack("<Q")
        if etype in _SCALARS:
            self.skip(count * struct.calcsize(_SCALARS[etype]))
        elif etype == _STRING:
            if count > len(self.buf) - self.pos:  # every element takes at least one byte
                raise GGUFError(f"an array of {count} elements cannot fit in the file")
            for _ in range(count):
                self.string()
        elif etype == _ARRAY:  # llama.cpp refuses them too (and they would recurse here)
            raise GGUFError(f"an array of arrays at offset {self.pos}")
        else:
            raise GGUFError(f"unknown array element type {etype} at offset {self.pos}")


def read_header(buf: FileBytes) -> GGUFHeader:
    """Parse the header of the GGUF file whose bytes (or a memory map of them) are ``buf``."""
    cur = _Cursor(buf)
    try:
        return _parse(cur)
    finally:
        cur.buf.release()  # the caller may close its memory map at once


def _parse(cur: _Cursor) -> GGUFHeader:
    if len(cur.buf) < 4 or bytes(cur.buf[:4]) != MAGIC:
        raise GGUFError("not a GGUF file (it does not start with the bytes 'GGUF')")
    cur.take(4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_fields = cur.unpack("<Q"), cur.unpack("<Q")
    fields: dict[str, Any] = {}
    keys: set[str] = set()
    for _ in range(n_fields):
        key = cur.string()
        vtype = cur.unpack("<I")
        if key in keys:  # as llama.cpp: a second value would be ambiguous
            raise GGUFError(f"the key {key!r} appears twice")
        keys.add(key)
        if key == "general.alignment" and vtype != _UINT32:
            raise GGUFError("general.alignment is not a uint32")
        value = cur.value(vtype)
        if value is not None:
            fields[key] = value
    tensors: dict[str, TensorInfo] = {}
    for _ in range(n_tensors):
        name = cur.string()
        if name in tensors:
            raise GGUFError(f"the tensor {name!r} appears twice")
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
        tensors[name] = TensorInfo(shape, cur.unpack("<I"), cur.unpack("<Q"))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment is {alignment}, not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    return GGUFHeader(version, fields, tensors, data_offset, alignment)
