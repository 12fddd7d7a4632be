"""ingest_paths / reembed against a real PostgreSQL and the real embedding model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import pytest
from pgvector.psycopg import register_vector

from themis_pg.errors import IngestError, ModelMismatch
from themis_pg.ingest import ingest_paths, reembed, text_sha256
from themis_pg.ingest.readers import source_uri
from themis_pg.resources import sample_corpus_dir


class CountingEmbedder:
    """The real embedder, counting the texts it embeds (and optionally under another name)."""

    def __init__(self, inner: Any, name: str | None = None) -> None:
        self.inner = inner
        self.name: str = name or inner.name
        self.dim: int = inner.dim
        self.texts = 0

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.texts += len(texts)
        result: npt.NDArray[np.float32] = self.inner.embed(texts)
        return result

    def count_tokens(self, text: str) -> int:
        return int(self.inner.count_tokens(text))


@pytest.fixture
def conn(migrated_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(migrated_db, autocommit=True) as c:
        register_vector(c)
        yield c


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """Three sample documents in a folder of their own, so tests may edit them."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ["tls-certificate-rotation.md", "rate-limiting.md", "feature-flags.md"]:
        shutil.copy(sample_corpus_dir() / name, folder / name)
    return folder


def documents(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[int, int, str]]]:
    """uri -> [(document id, chunk_index, content)] in chunk order."""
    rows = conn.execute(
        "SELECT s.uri, d.id, d.chunk_index, d.content FROM themis.documents d"
        " JOIN themis.sources s ON s.id = d.source_id ORDER BY s.uri, d.chunk_index"
    ).fetchall()
    out: dict[str, list[tuple[int, int, str]]] = {}
    for uri, doc_id, index, content in rows:
        out.setdefault(uri, []).append((doc_id, index, content))
    return out


def corpus_row(conn: psycopg.Connection[Any]) -> tuple[str, int] | None:
    row = conn.execute("SELECT embedding_model, dim FROM themis.corpus").fetchone()
    return (row[0], row[1]) if row else None


def test_sample_corpus_is_stored_with_its_embeddings(corpus_db: str, embedder: Any) -> None:
    """corpus_db is a clone of a template that conftest filled with ``ingest_paths``."""
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        register_vector(conn)
        files = sorted(sample_corpus_dir().glob("*.md"))
        docs = documents(conn)
        assert set(docs) == {source_uri(f) for f in files}
        n_docs = sum(len(chunks) for chunks in docs.values())
        assert n_docs >= len(files)
        for chunks in docs.values():
            assert [index for _, index, _ in chunks] == list(range(len(chunks)))
        assert corpus_row(conn) == (embedder.name, embedder.dim)

        # Each source records the hash of its text; each chunk carries its uri and title.
        tls = sample_corpus_dir() / "tls-certificate-rotation.md"
        source = conn.execute(
            "SELECT sha256, metadata FROM themis.sources WHERE uri = %s", (source_uri(tls),)
        ).fetchone()
        assert source is not None
        assert source[0] == text_sha256(tls.read_text(encoding="utf-8"))
        assert source[1]["title"] == "Rotating TLS keys and certificates"
        chunk_meta = conn.execute(
            "SELECT d.metadata FROM themis.documents d JOIN themis.sources s"
            " ON s.id = d.source_id WHERE s.uri = %s LIMIT 1",
            (source_uri(tls),),
        ).fetchone()
        assert chunk_meta is not None
        assert chunk_meta[0]["uri"] == source_uri(tls)
        assert chunk_meta[0]["title"] == "Rotating TLS keys and certificates"

        # Embeddings: the model's dimension, unit length, what the model gives for the content.
        rows = conn.execute(
            "SELECT content, embedding, vector_dims(embedding) FROM themis.documents ORDER BY id"
        ).fetchall()
        assert {dims for _, _, dims in rows} == {embedder.dim}
        stored = np.stack([vec.to_numpy() for _, vec, _ in rows])
        np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(
            stored[:4], embedder.embed([c for c, _, _ in rows[:4]]), atol=1e-5
        )

        # The change log saw every insert (the workers' incremental index depends on it).
        inserted = conn.execute("SELECT count(*) FROM themis.changes WHERE op = 'I'").fetchone()
        assert inserted == (n_docs,)

        # Again: nothing changed, so nothing is embedded or rewritten.
        ids = "SELECT array_agg(id ORDER BY id) FROM themis.documents"
        ids_before = conn.execute(ids).fetchone()
        counting = CountingEmbedder(embedder)
        again = ingest_paths(conn, [sample_corpus_dir()], counting, progress=False)
        assert again.files_seen == again.files_unchanged == len(files)
        assert again.files_ingested == again.chunks_written == again.sources_deleted == 0
        assert counting.texts == 0
        assert conn.execute(ids).fetchone() == ids_before


def test_sample_questions_find_their_documents(corpus_db: str, embedder: Any) -> None:
    """The corpus, chunking and model together: each sample question's source ranks high."""
    lines = (sample_corpus_dir().parent / "sample_questions.jsonl").read_text(encoding="utf-8")
    questions = [json.loads(line) for line in lines.splitlines()]
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute(
            "SELECT s.uri, d.content, d.embedding FROM themis.documents d"
            " JOIN themis.sources s ON s.id = d.source_id"
        ).fetchall()
    names = [Path(uri).name for uri, _, _ in rows]
    matrix = np.stack([vec.to_numpy() for _, _, vec in rows])
    scores = embedder.embed([q["question"] for q in questions]) @ matrix.T
    ranked = [[names[j] for j in np.argsort(-row)[:3]] for row in scores]
    # The first question is the demo's: its top chunk must be the one with the answer.
    best = int(np.argmax(scores[0]))
    assert names[best] == questions[0]["source"]
    assert questions[0]["expect"] in rows[best][1]
    top1 = sum(top[0] == q["source"] for top, q in zip(ranked, questions, strict=True))
    top3 = sum(q["source"] in top for top, q in zip(ranked, questions, strict=True))
    assert top1 >= 0.8 * len(questions), ranked
    assert top3 >= 0.95 * len(questions), ranked


def test_ingest_reports_what_it_wrote(
    conn: psycopg.Connection[Any], embedder: Any, small_corpus: Path
) -> None:
    counting = CountingEmbedder(embedder)
    assert corpus_row(conn) is None
    report = ingest_paths(conn, [small_corpus], counting, progress=False, batch_size=2)
    assert report.files_seen == report.files_ingested == report.sources_written == 3
    assert report.files_unchanged == report.sources_deleted == 0
    n_docs = sum(len(chunks) for chunks in documents(conn).values())
    assert report.chunks_written == n_docs == counting.texts
    assert corpus_row(conn) == (embedder.name, embedder.dim)


def test_changed_file_replaces_only_its_chunks(
    conn: psycopg.Connection[Any], embedder: Any, small_corpus: Path
) -> None:
    ingest_paths(conn, [small_corpus], embedder, progress=False)
    before = documents(conn)
    edited = small_corpus / "rate-limiting.md"
    edited.write_text(
        edited.read_text(encoding="utf-8") + "\n## Night mode\n\nBetween 01:00 and 05:00 UTC the"
        " anonymous limit drops to 15 requests per minute.\n",
        encoding="utf-8",
    )
    # Cosmetic changes (line endings, trailing spaces) are not changes.
    flags = small_corpus / "feature-flags.md"
    flags.write_bytes(flags.read_bytes().replace(b"\n", b"  \r\n"))

    counting = CountingEmbedder(embedder)
    report = ingest_paths(conn, [small_corpus], counting, progress=False)
    assert (report.files_seen, report.files_ingested, report.files_unchanged) == (3, 1, 2)
    after = documents(conn)
    assert report.chunks_written == len(after[source_uri(edited)]) == counting.texts
    for uri in before:
        if uri != source_uri(edited):
            assert after[uri] == before[uri]  # same rows, same ids
    old_ids = {doc_id for doc_id, _, _ in before[source_uri(edited)]}
    assert old_ids.isdisjoint(doc_id for doc_id, _, _ in after[source_uri(edited)])
    assert any("15 requests per minute" in content for _, _, content in after[source_uri(edited)])
    assert conn.execute("SELECT count(*) FROM themis.sources").fetchone() == (3,)
    stale = conn.execute(
        "SELECT count(*) FROM themis.documents WHERE id = ANY(%s)", (list(old_ids),)
    ).fetchone()
    assert stale == (0,)


def test_jsonl_lines_are_sources_and_removed_lines_are_deleted(
    conn: psycopg.Connection[Any], embedder: Any, tmp_path: Path
) -> None:
    path = tmp_path / "faq.jsonl"
    lines = [
        {"id": "q1", "title": "Ports", "content": "The registry listens on port 443."},
        {"id": "q2", "content": "Backups are kept for 35 days."},
        {"content": "Quota warnings are sent at 90 percent."},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    report = ingest_paths(conn, [path], embedder, progress=False)
    assert (report.files_ingested, report.sources_written, report.chunks_written) == (1, 3, 3)
    base = source_uri(path)
    assert set(documents(conn)) == {f"{base}#q1", f"{base}#q2", f"{base}#L3"}

    path.write_text(json.dumps(lines[1]) + "\n" + json.dumps(lines[0]) + "\n", encoding="utf-8")
    counting = CountingEmbedder(embedder)
    report = ingest_paths(conn, [path], counting, progress=False)
    assert report.sources_deleted == 1
    assert report.sources_unchanged == 2  # lines with ids may move: their uri is stable
    assert counting.texts == 0
    assert set(documents(conn)) == {f"{base}#q1", f"{base}#q2"}


def test_prune_deletes_sources_of_vanished_files(
    conn: psycopg.Connection[Any], embedder: Any, small_corpus: Path
) -> None:
    ingest_paths(conn, [small_corpus], embedder, progress=False)
    gone = small_corpus / "feature-flags.md"
    gone.unlink()
    report = ingest_paths(conn, [small_corpus], embedder, progress=False)
    assert report.sources_deleted == 0  # without prune, vanished files are kept
    assert source_uri(gone) in documents(conn)
    report = ingest_paths(conn, [small_corpus], embedder, progress=False, prune=True)
    assert report.sources_deleted == 1
    assert source_uri(gone) not in documents(conn)
    assert len(documents(conn)) == 2


@pytest.mark.parametrize("other", [("another-model", None), (None, 8)])
def test_other_model_in_corpus_is_refused(
    conn: psycopg.Connection[Any],
    embedder: Any,
    small_corpus: Path,
    other: tuple[str | None, int | None],
) -> None:
    name, dim = other[0] or embedder.name, other[1] or embedder.dim
    conn.execute("INSERT INTO themis.corpus (embedding_model, dim) VALUES (%s, %s)", (name, dim))
    counting = CountingEmbedder(embedder)
    with pytest.raises(ModelMismatch) as info:
        ingest_paths(conn, [small_corpus], counting, progress=False)
    assert f"embedded with {name} (dim {dim})" in info.value.message
    assert "themis reembed" in info.value.message
    assert counting.texts == 0  # refused before any embedding work
    assert conn.execute("SELECT count(*) FROM themis.sources").fetchone() == (0,)
    assert corpus_row(conn) == (name, dim)


def test_reembed_switches_the_whole_corpus(
    conn: psycopg.Connection[Any], embedder: Any, small_corpus: Path
) -> None:
    ingest_paths(conn, [small_corpus], embedder, progress=False)
    # A document inserted by hand, without an embedding, is re-embedded too.
    conn.execute("INSERT INTO themis.documents (content) VALUES ('A hand-written note.')")
    n_docs = conn.execute("SELECT count(*) FROM themis.documents").fetchone()
    assert n_docs is not None

    renamed = CountingEmbedder(embedder, name="minilm-renamed")
    assert reembed(conn, renamed, progress=False, batch_size=4) == n_docs[0] == renamed.texts
    assert corpus_row(conn) == ("minilm-renamed", embedder.dim)
    rows = conn.execute("SELECT content, embedding FROM themis.documents ORDER BY id").fetchall()
    assert all(vec is not None for _, vec in rows)
    np.testing.assert_allclose(
        np.stack([vec.to_numpy() for _, vec in rows]),
        embedder.embed([content for content, _ in rows]),
        atol=1e-5,
    )

    # The corpus now belongs to the other model: the original one is refused ...
    with pytest.raises(ModelMismatch, match="minilm-renamed"):
        ingest_paths(conn, [small_corpus / "rate-limiting.md"], embedder, progress=False)
    # ... and the new one finds every file unchanged.
    report = ingest_paths(conn, [small_corpus], renamed, progress=False)
    assert report.files_unchanged == 3


def test_reembed_is_one_transaction(
    conn: psycopg.Connection[Any], embedder: Any, small_corpus: Path
) -> None:
    """A failure half-way leaves every embedding and the corpus row as they were."""
    ingest_paths(conn, [small_corpus], embedder, progress=False)
    before = conn.execute("SELECT id, embedding FROM themis.documents ORDER BY id").fetchall()

    class FailsLate(CountingEmbedder):
        def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
            if self.texts:
                raise RuntimeError("model crashed")
            return super().embed(texts)

    with pytest.raises(RuntimeError, match="model crashed"):
        reembed(conn, FailsLate(embedder, name="other"), progress=False, batch_size=2)
    assert corpus_row(conn) == (embedder.name, embedder.dim)
    after = conn.execute("SELECT id, embedding FROM themis.documents ORDER BY id").fetchall()
    assert [(i, v.to_list()) for i, v in after] == [(i, v.to_list()) for i, v in before]


def test_plain_connection_commits_each_batch(
    migrated_db: str, embedder: Any, small_corpus: Path
) -> None:
    """On a non-autocommit connection the writes are committed, not left in a transaction."""
    with psycopg.connect(migrated_db) as writer:
        report = ingest_paths(writer, [small_corpus], embedder, progress=False)
        assert writer.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with psycopg.connect(migrated_db, autocommit=True) as reader:
            seen = reader.execute("SELECT count(*) FROM themis.documents").fetchone()
        assert seen == (report.chunks_written,)


def test_vectors_of_another_dimension_without_a_corpus_row_are_refused(
    conn: psycopg.Connection[Any], embedder: Any, small_corpus: Path
) -> None:
    conn.execute("INSERT INTO themis.documents (content, embedding) VALUES ('x', '[1,0,0]')")
    with pytest.raises(ModelMismatch, match="dim 3"):
        ingest_paths(conn, [small_corpus], embedder, progress=False)
    assert corpus_row(conn) is None


def test_unreadable_file_stops_ingest_with_its_name(
    conn: psycopg.Connection[Any], embedder: Any, small_corpus: Path
) -> None:
    bad = small_corpus / "zz-latin1.md"
    bad.write_bytes("# Caf\xe9\n".encode("latin-1"))
    with pytest.raises(IngestError, match=r"zz-latin1\.md: not valid UTF-8 at byte offset 5"):
        ingest_paths(conn, [small_corpus], embedder, progress=False)
