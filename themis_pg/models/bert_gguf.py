"""Convert a sentence-transformers BERT checkpoint to a GGUF file that llama.cpp embeds with.

Why our own converter: llama.cpp's ``convert_hf_to_gguf.py`` needs torch and transformers,
which themis-pg does not otherwise depend on.  This one reads ``config.json``,
``tokenizer.json``, ``model.safetensors`` and the pooling module with gguf, safetensors and
NumPy only, and writes what llama.cpp's ``bert`` architecture expects:

* vocabulary in llama.cpp's WordPiece form: a word-start piece ``foo`` becomes ``▁foo``
  (phantom space), a continuation piece ``##bar`` becomes ``bar``, special tokens stay as they
  are (token type CONTROL);
* ``[CLS]`` as BOS and ``[SEP]`` as separator, so ``llama_tokenize(add_special=True)`` yields
  ``[CLS] … [SEP]`` exactly like the Hugging Face tokenizer;
* non-causal attention, the pooling type of the sentence-transformers pooling module, the
  LayerNorm epsilon, the 512-position context and the token-type embeddings;
* tensor names from gguf's ``TensorNameMap``; the unused MLM/NSP heads, pooler and
  ``position_ids`` buffer are dropped.

With ``dtype='f16'`` matrices are stored as float16; vectors (norms, biases) and the
position/token-type tables stay float32, as llama.cpp's own converter does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
from safetensors import safe_open

__all__ = ["convert_sentence_transformer"]

log = logging.getLogger(__name__)

# llama.cpp reads these keys (src/llama-arch.cpp) but gguf 0.19 has no constants for them.
_KEY_NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
_KEY_NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"

_PHANTOM_SPACE = "\u2581"
_CONTINUATION = "##"

# HF tensors llama.cpp's bert graph has no use for (embedding-only inference).
_SKIPPED_PREFIXES = ("pooler.", "cls.predictions", "cls.seq_relationship")
_SKIPPED_NAMES = frozenset({"embeddings.position_ids"})
# 2-D tables that stay float32 even in an f16 file (llama.cpp keeps them exact).
_ALWAYS_F32 = frozenset({gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES})


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _pooling_type(model_dir: Path) -> gguf.PoolingType:
    """Pooling from the sentence-transformers ``modules.json`` chain (mean if none given)."""
    pooling_dir: Path | None = None
    modules_path = model_dir / "modules.json"
    if modules_path.is_file():
        for module in _read_json(modules_path):
            if str(module.get("type", "")).endswith("Pooling"):
                pooling_dir = model_dir / str(module.get("path", ""))
                break
    if pooling_dir is None or not (pooling_dir / "config.json").is_file():
        log.warning("no sentence-transformers pooling config in %s; assuming mean", model_dir)
        return gguf.PoolingType.MEAN
    cfg = _read_json(pooling_dir / "config.json")
    if cfg.get("pooling_mode_mean_tokens") or cfg.get("pooling_mode") == "mean":
        return gguf.PoolingType.MEAN
    if cfg.get("pooling_mode_cls_token") or cfg.get("pooling_mode") == "cls":
        return gguf.PoolingType.CLS
    raise ValueError(f"unsupported pooling in {pooling_dir / 'config.json'}: {cfg}")


def _special_token(
    tok_cfg: dict[str, Any], special_map: dict[str, Any], key: str, default: str
) -> str:
    """Special-token text: tokenizer_config.json, then special_tokens_map.json, then default."""
    for source in (tok_cfg, special_map):
        value = source.get(key)
        if isinstance(value, dict):  # AddedToken serialised as a dict
            value = value.get("content")
        if isinstance(value, str):
            return value
    return default


def _add_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int, n_token_types: int) -> None:
    tok_json = _read_json(model_dir / "tokenizer.json")
    model = tok_json.get("model", {})
    if model.get("type") != "WordPiece":
        raise ValueError(f"expected a WordPiece tokenizer, found {model.get('type')!r}")
    prefix = model.get("continuing_subword_prefix", _CONTINUATION)
    if prefix != _CONTINUATION:
        raise ValueError(f"unsupported continuation prefix {prefix!r} (llama.cpp assumes '##')")

    vocab: dict[str, int] = model["vocab"]
    if len(vocab) != n_vocab or sorted(vocab.values()) != list(range(n_vocab)):
        raise ValueError(f"tokenizer vocab ({len(vocab)}) does not match the model ({n_vocab})")
    special_ids = {int(t["id"]) for t in tok_json.get("added_tokens", []) if t.get("special")}

    tokens = [""] * n_vocab
    types = [gguf.TokenType.NORMAL] * n_vocab
    for text, idx in vocab.items():
        if idx in special_ids:
            tokens[idx] = text
            types[idx] = gguf.TokenType.CONTROL
        elif text.startswith(_CONTINUATION) and len(text) > len(_CONTINUATION):
            tokens[idx] = text[len(_CONTINUATION) :]
        else:
            tokens[idx] = _PHANTOM_SPACE + text
    if len(set(tokens)) != n_vocab:
        raise ValueError("vocabulary has duplicate pieces after the phantom-space mapping")

    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(n_token_types)

    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    special_map_path = model_dir / "special_tokens_map.json"
    special_map = _read_json(special_map_path) if special_map_path.is_file() else {}

    def token_id(key: str, default: str) -> int:
        text = _special_token(tok_cfg, special_map, key, default)
        if text not in vocab:
            raise ValueError(f"special token {key}={text!r} is not in the vocabulary")
        return vocab[text]

    cls_id = token_id("cls_token", "[CLS]")
    sep_id = token_id("sep_token", "[SEP]")
    writer.add_bos_token_id(cls_id)  # llama.cpp prepends BOS: BERT's [CLS]
    writer.add_eos_token_id(sep_id)
    writer.add_sep_token_id(sep_id)  # and appends SEP
    writer.add_unk_token_id(token_id("unk_token", "[UNK]"))
    writer.add_pad_token_id(token_id("pad_token", "[PAD]"))
    writer.add_mask_token_id(token_id("mask_token", "[MASK]"))
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    writer.add_add_eos_token(False)

    normalizer = tok_json.get("normalizer") or {}
    if normalizer.get("type") == "BertNormalizer":
        lowercase = bool(normalizer.get("lowercase", True))
        strip = normalizer.get("strip_accents")
        writer.add_bool(_KEY_NORMALIZER_LOWERCASE, lowercase)
        writer.add_bool(_KEY_NORMALIZER_STRIP_ACCENTS, lowercase if strip is None else bool(strip))


def _hf_name(name: str) -> str:
    """Strip the ``bert.`` prefix of *ForX checkpoints and rename old gamma/beta norms."""
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    return name


def _add_tensors(
    writer: gguf.GGUFWriter, model_dir: Path, n_layers: int, dtype: Literal["f32", "f16"]
) -> None:
    name_map = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, n_layers)
    keep_f32 = {gguf.TENSOR_NAMES[t] for t in _ALWAYS_F32}
    seen: set[str] = set()
    with safe_open(str(model_dir / "model.safetensors"), framework="numpy") as st:
        for raw_name in st.keys():  # noqa: SIM118 - safe_open is not a Mapping
            name = _hf_name(raw_name)
            if name in _SKIPPED_NAMES or name.startswith(_SKIPPED_PREFIXES):
                continue
            new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise ValueError(f"cannot map tensor {raw_name!r} to a llama.cpp bert tensor")
            data = np.asarray(st.get_tensor(raw_name))
            if data.dtype.kind != "f":
                raise ValueError(f"tensor {raw_name!r} has non-float dtype {data.dtype}")
            base = new_name.rsplit(".", 1)[0]
            half = dtype == "f16" and data.ndim >= 2 and base not in keep_f32
            data = data.astype(np.float16 if half else np.float32, copy=False)
            writer.add_tensor(new_name, np.ascontiguousarray(data))
            seen.add(new_name)
    required = {"token_embd.weight", "position_embd.weight", "token_embd_norm.weight"}
    if missing := required - seen:
        raise ValueError(f"checkpoint lacks required tensors: {sorted(missing)}")


def convert_sentence_transformer(
    model_dir: Path, out_path: Path, *, name: str, dtype: Literal["f32", "f16"] = "f16"
) -> None:
    """Write ``out_path`` as a llama.cpp ``bert`` GGUF from the checkpoint in ``model_dir``.

    ``model_dir`` holds the sentence-transformers layout (``config.json``,
    ``model.safetensors``, ``tokenizer.json``, optional ``modules.json`` and pooling module).
    Raises ``ValueError`` for checkpoints this converter does not understand (non-BERT,
    relative position embeddings, non-GELU activations, non-WordPiece tokenizers).  The file
    is written in place; callers that need atomicity write to a temporary name and rename.
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    cfg = _read_json(model_dir / "config.json")
    if cfg.get("model_type") != "bert":
        raise ValueError(f"not a BERT checkpoint: model_type={cfg.get('model_type')!r}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"llama.cpp's bert graph uses GELU, model has {cfg.get('hidden_act')!r}")

    n_layers = int(cfg["num_hidden_layers"])
    n_vocab = int(cfg["vocab_size"])
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32

    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_block_count(n_layers)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 512)))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_layer_norm_eps(float(cfg.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(_pooling_type(model_dir))
    _add_vocab(writer, model_dir, n_vocab, int(cfg.get("type_vocab_size", 2)))
    _add_tensors(writer, model_dir, n_layers, dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    log.debug("wrote %s (%s) from %s", out_path, dtype, model_dir)
