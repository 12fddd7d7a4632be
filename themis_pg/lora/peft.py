"""HuggingFace PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``)
to llama.cpp's GGUF adapter format, with gguf + safetensors + NumPy (no torch).

PEFT names a delta after the module it adapts (``base_model.model.model.layers.3.self_attn.
q_proj.lora_A.weight``, A of shape rank x n_in, B of shape n_out x rank); gguf-py's tensor
name map gives the base model's GGUF name (``blk.3.attn_q``).  One transformation is not a
rename: llama.cpp's converter permutes the rows of a llama model's query and key weights for
its rotary embedding layout, so the same permutation is applied to the rows of their B
matrices (llama.cpp's own convert_lora_to_gguf.py does the same).  The adapter's alpha is
PEFT's ``lora_alpha``; llama.cpp scales by alpha / rank as PEFT does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from themis_pg.errors import InvalidAdapter
from themis_pg.lora.adapter_file import base_model_number, base_model_shapes, write_adapter

__all__ = ["convert_peft"]

_PREFIX = "base_model.model."
_PERMUTED = {"attn_q": "llama.attention.head_count", "attn_k": "llama.attention.head_count_kv"}


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for a llama query/key projection (convert_hf_to_gguf)."""
    return (rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def _base_fields(base_model: Path) -> tuple[str, int, dict[str, int]]:
    """The base model's architecture, its block count, and the head counts its query and key
    rows are permuted by."""
    arch, _ = base_model_shapes(base_model)
    blocks = base_model_number(base_model, f"{arch}.block_count")
    if blocks is None:
        raise InvalidAdapter(f"the base model {base_model.name} has no {arch}.block_count")
    heads = {k: n for k, key in _PERMUTED.items()
             if (n := base_model_number(base_model, key.replace("llama", arch))) is not None}
    return arch, blocks, heads


def convert_peft(folder: Path, base_model: Path, out: Path) -> Path:
    """Write the GGUF adapter of the PEFT adapter in ``folder`` for ``base_model``."""
    from safetensors.numpy import load_file

    config_file, weights_file = folder / "adapter_config.json", \
        folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise InvalidAdapter(f"{folder} is not a PEFT adapter folder (it needs "
                             "adapter_config.json and adapter_model.safetensors)")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
        tensors = load_file(str(weights_file))
    except Exception as exc:  # bad JSON, a truncated safetensors file, ...
        raise InvalidAdapter(f"cannot read the PEFT adapter in {folder}: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter(f"{folder} is a {config.get('peft_type')} adapter, not LoRA")
    arch, blocks, heads = _base_fields(base_model)
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), blocks)
    deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, a in sorted(tensors.items()):
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        hf = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        target = names.get_name(hf)
        if b is None or target is None:
            raise InvalidAdapter(f"{folder}: cannot map {key} to a tensor of the {arch} model")
        b = b.astype(np.float32)
        kind = target.rsplit(".", 1)[-1]
        if arch == "llama" and kind in heads:
            b = _permute(b, heads[kind])
        deltas[target + ".weight"] = (a.astype(np.float32), b)
    if not deltas:
        raise InvalidAdapter(f"{folder} holds no lora_A / lora_B tensors")
    write_adapter(out, arch, deltas, alpha=float(config.get("lora_alpha", config.get("r", 8))),
                  name=folder.name)
    return out
