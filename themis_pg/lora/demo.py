"""Demo adapters for the default generation model: real-format GGUF LoRA files whose deltas
are random low-rank matrices (seeded), each with a description of its own, so the demo and
the tests can show registration, selection and fusion end to end without a training run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from themis_pg.lora.adapter_file import base_model_shapes, write_adapter

__all__ = ["DEMO_ADAPTERS", "DemoAdapter", "write_demo_adapter"]

RANK = 8
TARGETS = ("attn_q", "attn_v")  # the weights PEFT adapts by default for llama models


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    domain: str
    description: str
    examples: tuple[str, ...]
    seed: int


DEMO_ADAPTERS = (
    DemoAdapter("demo-medical", "medical",
                "Clinical and medical questions: symptoms, diagnoses, medicines, dosages.",
                ("What is a normal resting heart rate?", "Which dose of ibuprofen is safe?"),
                seed=11),
    DemoAdapter("demo-legal", "legal",
                "Legal questions: contracts, liability, courts, statutes and regulations.",
                ("Is a verbal contract binding?", "What does liability insurance cover?"),
                seed=12),
    DemoAdapter("demo-cooking", "cooking",
                "Cooking: recipes, ingredients, baking times and kitchen techniques.",
                ("How long do I bake bread?", "What can replace eggs in a cake?"),
                seed=13),
)


def write_demo_adapter(base_model: Path, out: Path, seed: int, *, strength: float = 0.4,
                       rank: int = RANK) -> Path:
    """A rank-``rank`` adapter on every layer's query and value projections of
    ``base_model``."""
    arch, shapes = base_model_shapes(base_model)
    rng = np.random.default_rng(seed)
    deltas = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) == 2 and any(f".{t}.weight" in name for t in TARGETS):
            n_in, n_out = shape
            a = rng.normal(0, 1 / np.sqrt(n_in), (rank, n_in))
            b = rng.normal(0, strength, (n_out, rank))
            deltas[name] = (a, b)
    write_adapter(out, arch, deltas, alpha=float(rank), name=out.stem)
    return out
