"""GGUF LoRA adapter files: what a valid one is, and how to write one.

llama.cpp's adapter format (../shared/DESIGN.md section 6): a GGUF file with
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` and, for every
adapted weight ``W`` of the base model, the tensors ``W.lora_a`` (rank x n_in) and
``W.lora_b`` (n_out x rank): the same layout as PEFT's ``lora_A`` / ``lora_B``.  llama.cpp
adds ``scale * alpha / rank * B @ A`` to ``W``'s product.

An adapter is checked against the base model's own GGUF header before anything is stored: a
file llama.cpp would refuse (or, worse, load into the wrong model) is rejected with a clear
error.  gguf-py (the ``gguf`` package, kept by the llama.cpp project) reads and writes the
files; nothing here loads weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from themis_pg.errors import InvalidAdapter

__all__ = ["AdapterInfo", "base_model_number", "base_model_shapes", "validate_adapter",
           "write_adapter"]

_MAGIC = b"GGUF"


@dataclass(frozen=True)
class AdapterInfo:
    """What registration records about a valid adapter file."""

    architecture: str
    rank: int
    alpha: float
    adapted: tuple[str, ...]  # the base weights it changes


def _reader(path: Path, what: str) -> gguf.GGUFReader:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise InvalidAdapter(f"cannot read the {what} {path}: {exc.strerror}") from exc
    if magic != _MAGIC:
        raise InvalidAdapter(f"the {what} {path} is not a GGUF file",
                             hint="LoRA adapters are GGUF files (convert a PEFT adapter with "
                                  "`themis lora import DIR`).")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError, ...
        raise InvalidAdapter(f"the {what} {path} is not a readable GGUF file "
                             f"(truncated or corrupt: {exc})") from exc


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def base_model_shapes(model: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The base model's architecture and its tensors' shapes (ggml order: n_in first)."""
    arch, shapes, _ = _base_model_header(model)
    return arch, shapes


def base_model_number(model: Path, key: str) -> int | None:
    """A number of the base model's GGUF header (e.g. ``llama.block_count``), or None."""
    value = _base_model_header(model)[2].get(key)
    return int(value) if isinstance(value, (int, float)) else None


def _base_model_header(model: Path) -> tuple[str, dict[str, tuple[int, ...]], dict[str, Any]]:
    st = model.stat()
    return _read_base_model(model, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_base_model(model: Path, size: int, mtime_ns: int
                     ) -> tuple[str, dict[str, tuple[int, ...]], dict[str, Any]]:
    # gguf-py parses the whole header, vocabulary included (seconds for a 49k-token one):
    # read once per file version
    reader = _reader(model, "base model")
    arch = _field(reader, "general.architecture")
    numbers = {k: f.contents() for k, f in reader.fields.items()
               if len(f.types) == 1 and f.types[0] != gguf.GGUFValueType.STRING
               and f.types[0] != gguf.GGUFValueType.ARRAY}
    return (str(arch), {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors},
            numbers)


def validate_adapter(path: Path, base_model: Path) -> AdapterInfo:
    """Check ``path`` is a GGUF LoRA adapter that fits ``base_model``; raise InvalidAdapter
    naming the first thing that does not."""
    reader = _reader(path, "adapter")
    if _field(reader, "general.type") != "adapter":
        raise InvalidAdapter(f"{path} is a GGUF file but not an adapter (general.type is "
                             f"{_field(reader, 'general.type')!r}, not 'adapter')")
    if _field(reader, "adapter.type") != "lora":
        raise InvalidAdapter(f"{path} is not a LoRA adapter (adapter.type is "
                             f"{_field(reader, 'adapter.type')!r}, not 'lora')")
    alpha = _field(reader, "adapter.lora.alpha")
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise InvalidAdapter(f"{path} has no numeric adapter.lora.alpha")
    arch, base = base_model_shapes(base_model)
    if _field(reader, "general.architecture") != arch:
        raise InvalidAdapter(f"{path} is an adapter for the architecture "
                             f"{_field(reader, 'general.architecture')!r}; the base model "
                             f"{base_model.name} is {arch!r}")
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    ranks: set[int] = set()
    adapted = []
    for name, a_shape in sorted(shapes.items()):
        if not name.endswith(".lora_a"):
            if not name.endswith(".lora_b"):
                raise InvalidAdapter(f"{path} has a tensor {name!r} that is neither a lora_a "
                                     "nor a lora_b")
            continue
        weight = name[: -len(".lora_a")]
        b_shape = shapes.get(weight + ".lora_b")
        w_shape = base.get(weight)
        if b_shape is None:
            raise InvalidAdapter(f"{path} has {name} without {weight}.lora_b")
        if w_shape is None or len(w_shape) != 2:
            raise InvalidAdapter(f"{path} adapts {weight!r}, which the base model "
                                 f"{base_model.name} has no matrix of")
        n_in, n_out = w_shape
        # ggml order: lora_a is [n_in, rank], lora_b is [rank, n_out]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != n_in or \
                b_shape[1] != n_out or a_shape[1] != b_shape[0]:
            raise InvalidAdapter(
                f"{path}: the shapes of {weight}.lora_a {list(a_shape)} and .lora_b "
                f"{list(b_shape)} do not fit the base weight {list(w_shape)} (want "
                f"[{n_in}, r] and [r, {n_out}])")
        ranks.add(a_shape[1])
        adapted.append(weight)
    for name in shapes:
        if name.endswith(".lora_b") and name[: -len(".lora_b")] + ".lora_a" not in shapes:
            raise InvalidAdapter(f"{path} has {name} without its lora_a")
    if not adapted:
        raise InvalidAdapter(f"{path} adapts no tensor")
    return AdapterInfo(architecture=arch, rank=max(ranks), alpha=float(alpha),
                       adapted=tuple(adapted))


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
