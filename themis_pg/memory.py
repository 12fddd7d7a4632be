"""One memory budget for a worker: the matrix, the models and the KV cache, counted before
anything large is allocated.

A worker on a GPU holds three things there: the embedding matrix (the GPU store keeps an fp16
copy that every search scans and an fp32 copy for the exact rescoring: 6 bytes per element),
the offloaded model weights (about their GGUF file size) and the generation model's KV cache
(``n_ctx`` cells x layers x (K + V) width x 2 bytes for f16).  :func:`plan_worker_memory`
adds them up from the row count and the GGUF headers (no weights are read), and
:meth:`MemoryPlan.check` refuses a configuration over the budget with the figures and what to
change, instead of an out-of-memory error halfway through loading.

The budget is ``THEMIS_MEMORY_BUDGET`` (bytes, or "40GiB"/"512MB"); unset, 90% of the GPU's
memory when the matrix or a model lives on a GPU, and no limit in host memory.  The figures
go to ``themis_stats()`` (``memory``), and what is left is what the continuous-batching engine
may give its KV pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ThemisError

GPU_DEFAULT_SHARE = 0.9
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}

BYTES_PER_ELEMENT = {"cpu": 4, "cuda": 6}  # NumPy: fp32; CuPy: fp16 scan + fp32 rescoring
KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 + one f16 scale


class MemoryBudgetExceeded(ThemisError):
    """The worker's matrix, models and KV cache do not fit the memory budget."""

    sqlstate = "53200"  # out_of_memory


def parse_bytes(text: str) -> int:
    """'40GiB', '512 MB', '1e9' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes or e.g. '40GiB', '512MB')")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return int(value)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Part:
    name: str
    device: str  # "cpu" or "cuda:N"
    bytes: int


@dataclass
class MemoryPlan:
    """What a worker will hold, where; ``budget`` applies to the parts on ``device``."""

    device: str
    budget: int | None
    parts: list[Part] = field(default_factory=list)

    def on_device(self) -> int:
        return sum(p.bytes for p in self.parts if p.device == self.device)

    def left(self) -> int | None:
        """Bytes of the budget not planned for (None: no limit)."""
        return None if self.budget is None else self.budget - self.on_device()

    def check(self) -> None:
        """Raise :class:`MemoryBudgetExceeded` if the parts on the budget's device do not fit."""
        left = self.left()
        if left is None or left >= 0:
            return
        listed = ", ".join(f"{p.name} {_human(p.bytes)}" for p in self.parts
                           if p.device == self.device)
        raise MemoryBudgetExceeded(
            f"the worker needs {_human(self.on_device())} on {self.device} ({listed}), over "
            f"its memory budget of {_human(self.budget or 0)}",
            hint="Lower THEMIS_N_CTX, keep models on the CPU (THEMIS_N_GPU_LAYERS=0), keep the "
            "matrix in host memory (THEMIS_RETRIEVAL_DEVICE=cpu) or raise THEMIS_MEMORY_BUDGET.")

    def as_json(self) -> dict[str, Any]:
        return {"device": self.device, "budget": self.budget, "planned": self.on_device(),
                "parts": {p.name: {"device": p.device, "bytes": p.bytes} for p in self.parts}}


@dataclass(frozen=True)
class ModelShape:
    """What the GGUF header says about a model's size."""

    file_bytes: int
    n_layer: int
    kv_width: int  # K + V elements per cell per layer (head width x n_head_kv each)


def model_shape(path: Path) -> ModelShape:
    """From the GGUF header (``gguf``'s reader maps the file; no weights are read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str, default: int | None = None) -> int:
        field = reader.fields.get(key)
        if field is None:
            if default is None:
                raise ThemisError(f"{path} has no {key} in its GGUF header")
            return default
        got = field.contents()
        return int(max(got) if isinstance(got, list) else got)  # per-layer lists: the widest

    arch = str(reader.fields["general.architecture"].contents())
    n_embd = value(f"{arch}.embedding_length")
    n_head = max(1, value(f"{arch}.attention.head_count"))
    n_head_kv = value(f"{arch}.attention.head_count_kv", n_head)
    key = value(f"{arch}.attention.key_length", n_embd // n_head)
    val = value(f"{arch}.attention.value_length", n_embd // n_head)
    return ModelShape(Path(path).stat().st_size, value(f"{arch}.block_count"),
                      (key + val) * n_head_kv)


def kv_cache_bytes(shape: ModelShape, n_ctx: int, bytes_per_element: float = 2.0) -> int:
    """f16 cells for ``n_ctx`` tokens (q8_0: about 1.06 bytes per element)."""
    return int(n_ctx * shape.n_layer * shape.kv_width * bytes_per_element)


def gpu_offload(n_gpu_layers: int = -1) -> bool:
    """Whether llama.cpp puts a model's layers on a GPU: this build can, and
    ``n_gpu_layers`` (THEMIS_N_GPU_LAYERS) asks for at least one."""
    import llama_cpp

    return n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())


def device_total_bytes(device: str) -> int | None:
    """Total memory of ``cuda:N`` (None for the CPU or without CuPy)."""
    if not device.startswith("cuda"):
        return None
    try:
        import cupy as cp

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        with cp.cuda.Device(index):
            return int(cp.cuda.runtime.memGetInfo()[1])
    except Exception:
        return None


def plan_worker_memory(*, store_device: str, rows: int, dim: int, embedding_model: Path,
                       generation_model: Path | None, kv_cells: int, n_gpu_layers: int,
                       kv_type: str = "f16", budget: str = "") -> MemoryPlan:
    """The plan of a worker about to load: the matrix for ``rows``, the models and the KV
    cache (``kv_cells`` cells of ``kv_type``) where llama.cpp will put them."""
    offload = gpu_offload(n_gpu_layers)
    model_device = (store_device if store_device.startswith("cuda") else "cuda:0") \
        if offload else "cpu"
    kind = "cuda" if store_device.startswith("cuda") else "cpu"
    parts = [Part("matrix", store_device, rows * dim * BYTES_PER_ELEMENT[kind] + rows * 8),
             Part("embedding_model", model_device, Path(embedding_model).stat().st_size)]
    if generation_model is not None:
        shape = model_shape(generation_model)
        parts += [Part("generation_model", model_device, shape.file_bytes),
                  Part("kv_cache", model_device, kv_cache_bytes(
                      shape, kv_cells, KV_BYTES_PER_ELEMENT[kv_type]))]
    device = next((p.device for p in parts if p.device.startswith("cuda")), "cpu")
    if budget:
        limit: int | None = parse_bytes(budget)
    else:
        total = device_total_bytes(device)
        limit = None if total is None else int(total * GPU_DEFAULT_SHARE)
    return MemoryPlan(device, limit, parts)
