"""GGUF LoRA adapter files: what a valid one is, and how to write one.

llama.cpp's adapter format (../shared/DESIGN.md section 6): a GGUF file with
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` and, for every
adapted weight ``W`` of the base model, the tensors ``W.lora_a`` (rank x n_in) and
``W.lora_b`` (n_out x rank): the same layout as PEFT's ``lora_A`` / ``lora_B``.  llama.cpp
adds ``scale * alpha / rank * B @ A`` to ``W``'s product.

An adapter is checked against the base model's own GGUF header before anything is stored: a
file llama.cpp would refuse (or, worse, load into the wrong model) is rejected with a clear
error.  The rules and the header reader are the server-side package's
(``themis_pg/pl/lora_check.py``, standard library only), so ``themis lora add`` and the SQL
function ``themis_lora_register`` accept exactly the same files; gguf-py (the ``gguf``
package, kept by the llama.cpp project) writes them.  Nothing here loads weights.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from themis_pg.errors import InvalidAdapter
from themis_pg.pl.gguf_header import GGUFError, read_header
from themis_pg.pl.lora_check import AdapterFacts, AdapterProblem, check_adapter_bytes

__all__ = ["AdapterFacts", "base_model_header", "base_model_number", "base_model_shapes",
           "validate_adapter", "write_adapter"]


def base_model_shapes(model: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The base model's architecture and its tensors' shapes (ggml order: n_in first)."""
    arch, shapes, _ = _base_model_header(model)
    return arch, shapes


def base_model_number(model: Path, key: str) -> int | None:
    """A number of the base model's GGUF header (e.g. ``llama.block_count``), or None."""
    value = _base_model_header(model)[2].get(key)
    return int(value) if isinstance(value, (int, float)) else None


def base_model_header(model: Path) -> dict[str, Any]:
    """What adapter validation needs to know of a generation model, as stored in
    ``themis.models.gguf_header``: its architecture and the shapes of its matrices."""
    arch, shapes = base_model_shapes(model)
    return {"architecture": arch,
            "tensors": {name: list(s) for name, s in sorted(shapes.items()) if len(s) == 2}}


def _base_model_header(model: Path) -> tuple[str, dict[str, tuple[int, ...]], dict[str, Any]]:
    st = model.stat()
    return _read_base_model(model, st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def _mapped(path: Path, what: str) -> Iterator[mmap.mmap | bytes]:
    """The file's bytes, memory-mapped (headers are read without reading the tensors)."""
    try:
        with open(path, "rb") as f:
            try:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                yield b""
                return
            with data:
                yield data
    except OSError as exc:
        raise InvalidAdapter(f"cannot read the {what} {path}: {exc.strerror}") from exc


@functools.lru_cache(maxsize=8)
def _read_base_model(model: Path, size: int, mtime_ns: int
                     ) -> tuple[str, dict[str, tuple[int, ...]], dict[str, Any]]:
    # read once per file version: the vocabulary makes it tens of milliseconds
    with _mapped(model, "base model") as data:
        try:
            header = read_header(data)
        except GGUFError as exc:
            raise InvalidAdapter(f"the base model {model} is not a readable GGUF file: "
                                 f"{exc}") from exc
    numbers = {k: v for k, v in header.fields.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return (str(header.fields.get("general.architecture")),
            {name: t.shape for name, t in header.tensors.items()}, numbers)


def validate_adapter(path: Path, base_model: Path) -> AdapterFacts:
    """Check ``path`` is a GGUF LoRA adapter that fits ``base_model``; raise InvalidAdapter
    naming the first thing that does not."""
    base = base_model_shapes(base_model)
    with _mapped(path, "adapter") as data:
        try:
            return check_adapter_bytes(data, base, label=str(path),
                                       base_label=f"the base model {base_model.name}")
        except AdapterProblem as exc:
            hint = ("LoRA adapters are GGUF files (convert a PEFT adapter with "
                    "`themis lora import DIR`)." if "is not a GGUF file" in str(exc) else None)
            raise InvalidAdapter(str(exc), hint=hint) from exc


def write_adapter(path: Path, architecture: str,
                  deltas: dict[str, tuple[np.ndarray, np.ndarray]], *, alpha: float,
                  name: str = "") -> None:
    """Write a GGUF LoRA adapter: ``deltas`` maps a base weight name to (A, B), A of shape
    (rank, n_in) and B of shape (n_out, rank), float32."""
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    if name:
        writer.add_name(name)
    for weight, (a, b) in deltas.items():
        writer.add_tensor(weight + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(weight + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
