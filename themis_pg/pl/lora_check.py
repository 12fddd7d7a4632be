"""What a valid GGUF LoRA adapter for a given base model is: one set of rules for the CLI
(``themis lora add``) and for ``themis_lora_register`` inside the server.

llama.cpp's adapter format (../shared/DESIGN.md section 6): ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha`` and, for every adapted weight ``W`` of the
base model, ``W.lora_a`` ([n_in, rank] in ggml order) and ``W.lora_b`` ([rank, n_out]).  The
base model is known only by its architecture and its matrices' shapes, which is what
registration records of a generation model (``themis.models.gguf_header``), so the check
needs neither the model file nor gguf-py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .gguf_header import FileBytes, GGUFError, GGUFHeader, read_header

__all__ = ["AdapterFacts", "AdapterProblem", "BaseModelShapes", "check_adapter",
           "check_adapter_bytes"]

BaseModelShapes = tuple[str, dict[str, tuple[int, ...]]]
"""A base model's architecture and its tensors' shapes (ggml order)."""


class AdapterProblem(ValueError):
    """The first reason a file is not a LoRA adapter for the base model."""


@dataclass(frozen=True)
class AdapterFacts:
    """What registration records about a valid adapter."""

    architecture: str
    rank: int
    alpha: float
    adapted: tuple[str, ...]  # the base weights it changes


def check_adapter_bytes(data: FileBytes, base: BaseModelShapes, *,
                        label: str = "the adapter", base_label: str = "the base model"
                        ) -> AdapterFacts:
    """Parse and check a whole adapter file given as bytes (or a memory map of them)."""
    try:
        header = read_header(data)
    except GGUFError as exc:
        if str(exc).startswith("not a GGUF file"):
            raise AdapterProblem(f"{label} is not a GGUF file") from exc
        raise AdapterProblem(f"{label} is not a readable GGUF file (truncated or corrupt: "
                             f"{exc})") from exc
    return check_adapter(header, len(data), base, label=label, base_label=base_label)


def check_adapter(header: GGUFHeader, file_size: int, base: BaseModelShapes, *,
                  label: str = "the adapter", base_label: str = "the base model"
                  ) -> AdapterFacts:
    """Check a parsed adapter header against the base model; raise AdapterProblem naming the
    first thing that does not fit."""
    f = header.fields
    if f.get("general.type") != "adapter":
        raise AdapterProblem(f"{label} is a GGUF file but not an adapter (general.type is "
                             f"{f.get('general.type')!r}, not 'adapter')")
    if f.get("adapter.type") != "lora":
        raise AdapterProblem(f"{label} is not a LoRA adapter (adapter.type is "
                             f"{f.get('adapter.type')!r}, not 'lora')")
    alpha = f.get("adapter.lora.alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
            not math.isfinite(alpha):
        raise AdapterProblem(f"{label} has no numeric adapter.lora.alpha")
    arch, base_shapes = base
    if f.get("general.architecture") != arch:
        raise AdapterProblem(f"{label} is an adapter for the architecture "
                             f"{f.get('general.architecture')!r}; {base_label} is {arch!r}")
    end = header.data_end()
    if end is None:
        raise AdapterProblem(f"{label} has a tensor of a type llama.cpp adapters do not use, "
                             "or rows that are not whole blocks of its type")
    expected = 0
    for name, t in header.tensors.items():  # in file order, each at the next aligned place
        if t.offset != expected:
            raise AdapterProblem(f"{label}: the data of tensor {name} is at offset {t.offset}, "
                                 f"not {expected} where llama.cpp expects it")
        expected += -(-(t.nbytes() or 0) // header.alignment) * header.alignment
    if end > file_size:
        raise AdapterProblem(f"{label} is not a readable GGUF file (truncated or corrupt: its "
                             f"tensors end at byte {end}, the file has {file_size})")
    shapes = {name: t.shape for name, t in header.tensors.items()}
    ranks: set[int] = set()
    adapted = []
    for name, a_shape in sorted(shapes.items()):
        if not name.endswith(".lora_a"):
            if not name.endswith(".lora_b"):
                raise AdapterProblem(f"{label} has a tensor {name!r} that is neither a lora_a "
                                     "nor a lora_b")
            if name[: -len(".lora_b")] + ".lora_a" not in shapes:
                raise AdapterProblem(f"{label} has {name} without its lora_a")
            continue
        weight = name[: -len(".lora_a")]
        b_shape = shapes.get(weight + ".lora_b")
        w_shape = base_shapes.get(weight)
        if b_shape is None:
            raise AdapterProblem(f"{label} has {name} without {weight}.lora_b")
        if w_shape is None or len(w_shape) != 2:
            raise AdapterProblem(f"{label} adapts {weight!r}, which {base_label} has no "
                                 "matrix of")
        n_in, n_out = w_shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != n_in or \
                b_shape[1] != n_out or a_shape[1] != b_shape[0]:
            raise AdapterProblem(
                f"{label}: the shapes of {weight}.lora_a {list(a_shape)} and .lora_b "
                f"{list(b_shape)} do not fit the base weight {list(w_shape)} (want "
                f"[{n_in}, r] and [r, {n_out}])")
        if a_shape[1] < 1:
            raise AdapterProblem(f"{label}: {weight} has rank 0")
        ranks.add(a_shape[1])
        adapted.append(weight)
    if not adapted:
        raise AdapterProblem(f"{label} adapts no tensor")
    return AdapterFacts(architecture=arch, rank=max(ranks), alpha=float(alpha),
                        adapted=tuple(adapted))
