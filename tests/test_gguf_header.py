"""The standard-library GGUF header reader (themis_pg/pl/gguf_header.py) against gguf-py on
real files, and on files cut short or lying about their sizes: always a GGUFError, never
another exception, a hang or a huge allocation."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from themis_pg.lora.adapter_file import write_adapter
from themis_pg.pl.gguf_header import GGUFError, GGUFHeader, TensorInfo, read_header
from themis_pg.pl.lora_check import AdapterProblem, check_adapter, check_adapter_bytes


def _as_gguf_py(path: Path) -> tuple[dict[str, tuple[int, ...]], int, dict[str, Any]]:
    reader = gguf.GGUFReader(str(path))
    scalars = {k: f.contents() for k, f in reader.fields.items()
               if f.types and f.types[0] != gguf.GGUFValueType.ARRAY
               and not k.startswith("GGUF.")}
    return ({t.name: tuple(int(x) for x in t.shape) for t in reader.tensors},
            reader.data_offset, scalars)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "a.gguf"
    rng = np.random.default_rng(3)
    write_adapter(path, "llama", {
        "blk.0.attn_q.weight": (rng.standard_normal((4, 64)), rng.standard_normal((32, 4))),
        "blk.1.attn_v.weight": (rng.standard_normal((4, 64)), rng.standard_normal((16, 4)))},
        alpha=8, name="test adapter")
    return path


def test_the_header_matches_gguf_py_on_the_default_models(default_models):
    for model in default_models:
        header = read_header(Path(model.path).read_bytes())
        shapes, data_offset, scalars = _as_gguf_py(Path(model.path))
        assert {n: t.shape for n, t in header.tensors.items()} == shapes
        assert header.data_offset == data_offset
        assert header.data_end() == Path(model.path).stat().st_size
        for key, value in scalars.items():
            assert header.fields[key] == pytest.approx(value), key


def test_an_adapter_reads_back_as_written(adapter):
    header = read_header(adapter.read_bytes())
    assert header.fields["general.type"] == "adapter"
    assert header.fields["adapter.lora.alpha"] == 8.0
    assert header.tensors["blk.0.attn_q.weight.lora_a"].shape == (64, 4)
    assert header.tensors["blk.1.attn_v.weight.lora_b"].shape == (4, 16)
    assert header.data_end() == adapter.stat().st_size


def test_every_cut_of_an_adapter_is_rejected_as_such(adapter):
    data = adapter.read_bytes()
    base = ("llama", {"blk.0.attn_q.weight": (64, 32), "blk.1.attn_v.weight": (64, 16)})
    assert check_adapter_bytes(data, base).rank == 4
    for cut in [*range(0, 400, 7), len(data) // 2, len(data) - 1]:
        with pytest.raises(AdapterProblem, match=r"not a GGUF file|truncated or corrupt"):
            check_adapter_bytes(data[:cut], base)


def _header(n_tensors: int, fields: bytes, n_fields: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_fields) + fields


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize("data", [
    b"",
    b"GGML" + bytes(20),
    b"GGUF" + struct.pack("<IQQ", 1, 0, 0),                        # version 1
    _header(0, b"", 2**63),                                        # more fields than bytes
    _header(0, _key("a") + struct.pack("<I", 8) + struct.pack("<Q", 2**62), 1),  # huge string
    _header(0, _key("a") + struct.pack("<IIQ", 9, 8, 2**60), 1),   # huge array of strings
    _header(0, _key("a") + struct.pack("<IIQ", 9, 6, 2**60), 1),   # huge array of floats
    _header(0, _key("a") + struct.pack("<I", 99), 1),              # unknown value type
    _header(0, struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1), 1),  # not UTF-8
    _header(1, _key("t") + struct.pack("<I", 9), 0),               # 9 dimensions
    _header(0, _key("a") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 600, 1),
    _header(0, (_key("a") + struct.pack("<IB", 0, 1)) * 2, 2),     # a key twice
    _header(2, (_key("t") + struct.pack("<IQIQ", 1, 4, 0, 0)) * 2, 0),  # a tensor twice
    _header(0, _key("general.alignment") + struct.pack("<IQ", 10, 32), 1),  # not a uint32
    _header(0, _key("general.alignment") + struct.pack("<II", 4, 24), 1),   # not 2^n
], ids=["empty", "magic", "version", "fields", "string", "array", "floats", "type", "utf8",
        "dims", "nested", "key twice", "tensor twice", "alignment type", "alignment"])
def test_hostile_headers_are_a_gguf_error(data):
    with pytest.raises(GGUFError):
        read_header(data)


@pytest.mark.parametrize("b_offset, rank, problem", [
    (64, 4, "not 1024 where llama.cpp expects it"),  # the second tensor's data misplaced
    (0, 0, "rank 0"),
])
def test_misplaced_data_and_rank_zero_are_rejected(b_offset, rank, problem):
    fields = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0,
              "general.architecture": "llama"}
    header = GGUFHeader(3, fields, {
        "blk.0.attn_q.weight.lora_a": TensorInfo((64, rank), 0, 0),
        "blk.0.attn_q.weight.lora_b": TensorInfo((rank, 32), 0, b_offset)}, 64)
    with pytest.raises(AdapterProblem, match=problem):
        check_adapter(header, 1 << 20, ("llama", {"blk.0.attn_q.weight": (64, 32)}))
