"""Random-weight GGUF models of a real shape, for throughput runs on the GPU machine (speed
does not depend on weight values; see ../shared/GPU.md).

    # here: the tokenizer of a real model, without its weights (a few MB)
    python bench/gpu/random_model.py tokenizer SmolLM2-135M-Instruct.Q4_1.gguf .carry8/tok.gguf
    # there: a Mistral-7B-shaped F16 model with that tokenizer, then llama-quantize it
    python bench/gpu/random_model.py mistral7b .carry8/tok.gguf /tmp/m7b-f16.gguf
    # or SmolLM2-135M's shape (the real file does not fit in a carry beside the kits)
    python bench/gpu/random_model.py smollm135m .carry8/tok.gguf /tmp/s135-f16.gguf
    # any model: here its header and tensor table without data; there random data in them
    python bench/gpu/random_model.py skeleton all-minilm-l6-v2.f16.gguf .carry9/emb.skel
    python bench/gpu/random_model.py fill .carry9/emb.skel /tmp/emb.gguf

The model is a llama-architecture GGUF with Mistral 7B's hyperparameters (32 layers, 4096
wide, 32 query and 8 KV heads, 14336 feed-forward, rope base 1e6) and the tokenizer (and chat
template) of the first file; one random array per tensor shape is reused across layers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

TOKENIZER_KEYS = ("tokenizer.", "general.name")


def _value(field: Any) -> Any:
    return field.contents()


def tokenizer_only(src: Path, dst: Path) -> None:
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch="llama")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, _value(field), field.types[0],
                                 sub_type=field.types[-1] if len(field.types) > 1 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SKELETON_KEY = "skeleton.tensors"


def skeleton(src: Path, dst: Path) -> None:
    """``src``'s fields and, as JSON in one more field, its tensor table (name, shape in
    ggml order, type): everything but the data, which random data of the same shapes can
    stand in for."""
    import json

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=str(reader.fields["general.architecture"]
                                                .contents()))
    _copy_fields(reader, writer)
    writer.add_string(SKELETON_KEY, json.dumps(
        [[t.name, [int(x) for x in t.shape], int(t.tensor_type)] for t in reader.tensors]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def from_skeleton(skel: Path, dst: Path) -> None:
    """A model of the skeleton's fields and tensor shapes with random float data (N(0, 0.02);
    norms' weights 1)."""
    import json

    reader = gguf.GGUFReader(str(skel))
    writer = gguf.GGUFWriter(str(dst), arch=str(reader.fields["general.architecture"]
                                                .contents()))
    _copy_fields(reader, writer, skip=(SKELETON_KEY,))
    rng = np.random.default_rng(0)
    types = {int(gguf.GGMLQuantizationType.F32): np.float32,
             int(gguf.GGMLQuantizationType.F16): np.float16}
    for name, shape, ttype in json.loads(reader.fields[SKELETON_KEY].contents()):
        if ttype not in types:
            raise SystemExit(f"{name}: tensor type {ttype} (only F32 and F16 skeletons)")
        dims = tuple(reversed(shape))  # numpy order
        data = np.ones(dims) if "norm" in name and name.endswith(".weight") else \
            rng.normal(0, 0.02, dims)
        writer.add_tensor(name, data.astype(types[ttype]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter,
                 skip: tuple[str, ...] = ()) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", *skip):
            continue
        writer.add_key_value(key, _value(field), field.types[0],
                             sub_type=field.types[-1] if len(field.types) > 1 else None)


def mistral7b(tokenizer: Path, dst: Path, n_embd: int = 4096, n_layer: int = 32,
              n_head: int = 32, n_head_kv: int = 8, n_ff: int = 14336) -> None:
    reader = gguf.GGUFReader(str(tokenizer))
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    head = n_embd // n_head
    writer = gguf.GGUFWriter(str(dst), arch="llama")
    writer.add_name("random Mistral-7B-shaped")
    writer.add_block_count(n_layer)
    writer.add_context_length(32768)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, _value(field), field.types[0],
                                 sub_type=field.types[-1] if len(field.types) > 1 else None)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)

    ones = np.ones(n_embd, np.float32)
    shapes = {"q": rand(n_embd, n_embd), "k": rand(n_head_kv * head, n_embd),
              "v": rand(n_head_kv * head, n_embd), "o": rand(n_embd, n_embd),
              "gate": rand(n_ff, n_embd), "up": rand(n_ff, n_embd), "down": rand(n_embd, n_ff)}
    writer.add_tensor("token_embd.weight", rand(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", rand(n_vocab, n_embd))
    for i in range(n_layer):
        b = f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", ones)
        writer.add_tensor(b + "attn_q.weight", shapes["q"])
        writer.add_tensor(b + "attn_k.weight", shapes["k"])
        writer.add_tensor(b + "attn_v.weight", shapes["v"])
        writer.add_tensor(b + "attn_output.weight", shapes["o"])
        writer.add_tensor(b + "ffn_norm.weight", ones)
        writer.add_tensor(b + "ffn_gate.weight", shapes["gate"])
        writer.add_tensor(b + "ffn_up.weight", shapes["up"])
        writer.add_tensor(b + "ffn_down.weight", shapes["down"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    what, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if what == "tiny":  # the same layout at a toy size, to check the file loads
        mistral7b(src, dst, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256)
    elif what == "smollm135m":  # SmolLM2-135M's shape (its tokenizer is tok.gguf's)
        mistral7b(src, dst, n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536)
    elif what == "tokenizer":
        tokenizer_only(src, dst)
    elif what == "skeleton":
        skeleton(src, dst)
    elif what == "fill":
        from_skeleton(src, dst)
    else:
        mistral7b(src, dst)
