"""Load files into ``themis.sources`` / ``themis.documents`` with their embeddings.

The contracts that matter to callers:

* A source whose normalised text, metadata and chunking settings are unchanged since the last
  ingest is skipped before any chunking or embedding work.
* Models never mix: ``themis.corpus`` names the model the stored embeddings come from, and
  ingesting with another model (or dimension) raises ``ModelMismatch``.  ``reembed`` switches
  the whole table to a new model in one transaction.
* Embedding runs outside any transaction; each batch of sources is then written in one short
  transaction (old chunks deleted, new chunks copied in), so a reader sees a source either
  wholly before or wholly after its update, and no lock is held while a model runs.
  Inside a transaction of the caller's, those writes become savepoints of it instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import psycopg
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb
from tqdm import tqdm

from themis_pg.errors import ModelMismatch
from themis_pg.ingest.chunking import chunk_text
from themis_pg.ingest.readers import RawDocument, read_documents, source_uri

__all__ = [
    "CHUNKER_VERSION",
    "IngestReport",
    "TextEmbedder",
    "check_corpus",
    "ingest_paths",
    "normalise_text",
    "reembed",
    "text_sha256",
]

log = logging.getLogger(__name__)

# Bump when chunk_text's output changes for the same input and limits: every source is then
# re-chunked (and re-embedded) at its next ingest, as its stored chunking settings differ.
CHUNKER_VERSION = 1

_COPY_DOCUMENTS = (
    "COPY themis.documents (source_id, chunk_index, content, metadata, embedding)"
    " FROM STDIN WITH (FORMAT BINARY)"
)
_COPY_TYPES = ["int8", "int4", "text", "jsonb", "vector"]


class TextEmbedder(Protocol):
    """What ingest needs of an embedding model (``themis_pg.embedding.Embedder`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> npt.NDArray[Any]:
        """float32 (len(texts), dim), rows L2-normalised."""
        ...

    def count_tokens(self, text: str) -> int: ...


@dataclass
class IngestReport:
    """What one ``ingest_paths`` call did.  A ``.jsonl`` file holds many sources, so source
    counts can exceed file counts."""

    files_seen: int = 0
    files_unchanged: int = 0
    files_ingested: int = 0
    sources_unchanged: int = 0
    sources_written: int = 0
    sources_deleted: int = 0
    chunks_written: int = 0


@dataclass
class _Pending:
    """A source whose new chunks wait to be embedded and written."""

    uri: str
    sha256: str
    source_metadata: dict[str, Any]
    chunk_metadata: dict[str, Any]
    chunks: list[str]
    embeddings: list[npt.NDArray[np.float32]] = field(default_factory=list)


def normalise_text(text: str) -> str:
    """The text that is hashed and chunked: NFC, ``\\n`` line ends, no trailing spaces, no
    NUL (PostgreSQL text cannot hold it), no leading or trailing blank lines.  Cosmetic edits
    (line endings, trailing blanks) therefore cost no re-embedding."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\x00", "")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def text_sha256(text: str) -> str:
    """Hex sha256 of ``normalise_text(text)`` encoded as UTF-8 (what ``sources.sha256`` holds)."""
    return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as it will come back from jsonb, so stored and new metadata compare equal."""
    result: dict[str, Any] = json.loads(json.dumps(meta, sort_keys=True))
    return result


def _mismatch(model: str, dim: int) -> ModelMismatch:
    return ModelMismatch(
        f"documents are embedded with {model} (dim {dim}); re-embed with `themis reembed` "
        "or ingest with that model"
    )


def check_corpus(conn: psycopg.Connection[Any], embedder: TextEmbedder, *, record: bool) -> None:
    """Raise ``ModelMismatch`` unless ``themis.corpus`` is empty or names ``embedder``'s model
    and dimension.

    Run inside a transaction.  With ``record``, an empty corpus row is filled in with
    ``embedder`` and the row is held FOR SHARE until that transaction ends, so a concurrent
    ``reembed`` cannot switch models under a write.
    """
    query = "SELECT embedding_model, dim FROM themis.corpus" + (" FOR SHARE" if record else "")
    row = conn.execute(query).fetchone()
    if row is None:
        # No recorded model, but embeddings written by plain INSERTs still bind us.
        other = conn.execute(
            "SELECT vector_dims(embedding) FROM themis.documents"
            " WHERE embedding IS NOT NULL AND vector_dims(embedding) <> %s LIMIT 1",
            (embedder.dim,),
        ).fetchone()
        if other is not None:
            raise ModelMismatch(
                f"themis.documents holds embeddings of dim {other[0]}, but {embedder.name} "
                f"makes dim {embedder.dim}; re-embed with `themis reembed`"
            )
        if not record:
            return
        conn.execute(
            "INSERT INTO themis.corpus (embedding_model, dim) VALUES (%s, %s)"
            " ON CONFLICT (singleton) DO NOTHING",
            (embedder.name, embedder.dim),
        )
        row = conn.execute(query).fetchone()  # ours, or a concurrent ingest's
        assert row is not None
    model, dim = row
    if model != embedder.name or dim != embedder.dim:
        raise _mismatch(model, dim)


def _embed(embedder: TextEmbedder, texts: Sequence[str]) -> npt.NDArray[np.float32]:
    """``embedder.embed`` with its output contract checked: a wrong shape or NaN would
    otherwise be stored and poison every later search."""
    vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
    if vectors.shape != (len(texts), embedder.dim):
        raise RuntimeError(
            f"embedder {embedder.name} returned shape {vectors.shape}, "
            f"expected {(len(texts), embedder.dim)}"
        )
    if not np.isfinite(vectors).all():
        raise RuntimeError(f"embedder {embedder.name} returned non-finite values")
    return vectors


def _chunks_within_tokens(
    text: str, embedder: TextEmbedder, max_chars: int, overlap_chars: int, max_tokens: int
) -> list[str]:
    """``chunk_text`` output, re-chunked smaller until every chunk fits ``max_tokens``
    (token-dense text such as code or hashes exceeds the usual chars-per-token ratio)."""
    chars = max_chars
    while True:
        chunks = chunk_text(text, max_chars=chars, overlap_chars=min(overlap_chars, chars // 4))
        longest = max((embedder.count_tokens(c) for c in chunks), default=0)
        if longest <= max_tokens or chars <= 64:
            if longest > max_tokens:
                log.warning(
                    "a chunk of %d tokens exceeds %d; the model truncates it", longest, max_tokens
                )
            return chunks
        chars = max(64, int(chars * max_tokens / longest * 0.9))


def _stored_sources(
    conn: psycopg.Connection[Any], uris: Sequence[str], prefix: str | None
) -> dict[str, tuple[str, Any]]:
    """uri -> (sha256, metadata) of stored sources among ``uris`` or starting with ``prefix``."""
    with conn.transaction():
        rows = conn.execute(
            "SELECT uri, sha256, metadata FROM themis.sources"
            " WHERE uri = ANY(%s) OR (%s::text IS NOT NULL AND starts_with(uri, %s))",
            (list(uris), prefix, prefix),
        ).fetchall()
    return {uri: (sha, meta) for uri, sha, meta in rows}


def _write(
    conn: psycopg.Connection[Any],
    embedder: TextEmbedder,
    pending: Sequence[_Pending],
    deletes: Sequence[str],
) -> int:
    """Replace the chunks of ``pending`` sources and delete ``deletes``, in one transaction.
    Returns the number of sources deleted."""
    with conn.transaction():
        check_corpus(conn, embedder, record=True)
        deleted = 0
        if deletes:
            cur = conn.execute("DELETE FROM themis.sources WHERE uri = ANY(%s)", (list(deletes),))
            deleted = cur.rowcount
        ids: list[int] = []
        for src in pending:
            row = conn.execute(
                "INSERT INTO themis.sources (uri, sha256, metadata) VALUES (%s, %s, %s)"
                " ON CONFLICT (uri) DO UPDATE SET sha256 = EXCLUDED.sha256,"
                " metadata = EXCLUDED.metadata, ingested_at = now()"
                " RETURNING id",
                (src.uri, src.sha256, Jsonb(src.source_metadata)),
            ).fetchone()
            assert row is not None
            ids.append(row[0])
        if ids:
            conn.execute("DELETE FROM themis.documents WHERE source_id = ANY(%s)", (ids,))
        if not any(src.chunks for src in pending):
            return deleted
        with conn.cursor() as cur, cur.copy(_COPY_DOCUMENTS) as copy:
            copy.set_types(_COPY_TYPES)
            for source_id, src in zip(ids, pending, strict=True):
                for index, (content, vector) in enumerate(
                    zip(src.chunks, src.embeddings, strict=True)
                ):
                    copy.write_row((source_id, index, content, src.chunk_metadata, vector))
    return deleted


def _iter_slices(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ingest_paths(
    conn: psycopg.Connection[Any],
    paths: Sequence[Path],
    embedder: TextEmbedder,
    *,
    progress: bool = True,
    batch_size: int = 32,
    max_chars: int = 1200,
    overlap_chars: int = 150,
    max_tokens: int = 384,
    prune: bool = False,
) -> IngestReport:
    """Ingest files and directories (see ``readers.iter_files``) into the corpus.

    ``batch_size`` is the number of chunks per ``embedder.embed`` call; sources are written
    once about that many chunks are embedded.  Chunks are cut at ``max_chars`` and, if a
    chunk has more than ``max_tokens`` tokens, cut smaller.  Stored sources that a ``.jsonl``
    file no longer holds are deleted; with ``prune``, so are stored sources under a given
    directory whose file is gone.

    Raises ``ModelMismatch`` (before any embedding work) when the corpus is embedded with
    another model, ``IngestError`` for an unreadable file (sources written before it stay).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    register_vector(conn)
    with conn.transaction():
        check_corpus(conn, embedder, record=False)
    chunking = {
        "version": CHUNKER_VERSION,
        "max_chars": max_chars,
        "overlap_chars": overlap_chars,
        "max_tokens": max_tokens,
    }
    report = IngestReport()
    pending: list[_Pending] = []
    deletes: list[str] = []
    seen: set[str] = set()

    def flush(bar: tqdm[Any]) -> None:
        texts = [chunk for src in pending for chunk in src.chunks]
        vectors: list[npt.NDArray[np.float32]] = []
        for batch in _iter_slices(texts, batch_size):
            vectors.extend(_embed(embedder, batch))
            bar.update(len(batch))
        offset = 0
        for src in pending:
            src.embeddings = vectors[offset : offset + len(src.chunks)]
            offset += len(src.chunks)
        report.sources_deleted += _write(conn, embedder, pending, deletes)
        report.sources_written += len(pending)
        report.chunks_written += len(texts)
        pending.clear()
        deletes.clear()

    with tqdm(desc="embedding", unit="chunk", disable=not progress) as bar:
        for path, docs in read_documents(paths):
            report.files_seen += 1
            uris = [doc.uri for doc in docs]
            seen.update(uris)
            # A .jsonl file's sources are "<file>#..."; ones it no longer holds are stale.
            prefix = source_uri(path) + "#" if path.suffix.lower() == ".jsonl" else None
            stored = _stored_sources(conn, uris, prefix)
            stale = sorted(set(stored) - set(uris))
            changed = [
                p for doc in docs if (p := _prepare(doc, stored, chunking, embedder)) is not None
            ]
            report.sources_unchanged += len(docs) - len(changed)
            if not changed and not stale:
                report.files_unchanged += 1
                log.debug("unchanged: %s", path)
                continue
            report.files_ingested += 1
            log.debug("%s: %d changed, %d stale sources", path, len(changed), len(stale))
            pending.extend(changed)
            deletes.extend(stale)
            if sum(len(src.chunks) for src in pending) >= batch_size:
                flush(bar)
        if pending or deletes:
            flush(bar)
    if prune:
        report.sources_deleted += _prune(conn, paths, seen)
    log.info(
        "ingest: %d files (%d unchanged, %d ingested), %d chunks written, %d sources deleted",
        report.files_seen,
        report.files_unchanged,
        report.files_ingested,
        report.chunks_written,
        report.sources_deleted,
    )
    return report


def _prepare(
    doc: RawDocument,
    stored: dict[str, tuple[str, Any]],
    chunking: dict[str, Any],
    embedder: TextEmbedder,
) -> _Pending | None:
    """The chunks to write for ``doc``, or None when the stored source is identical."""
    text = normalise_text(doc.text)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    source_metadata = _jsonable({**doc.metadata, "chunking": chunking})
    if stored.get(doc.uri) == (sha, source_metadata):
        return None
    chunks = _chunks_within_tokens(
        text,
        embedder,
        chunking["max_chars"],
        chunking["overlap_chars"],
        chunking["max_tokens"],
    )
    if not chunks:
        log.warning("%s: no text to index", doc.uri)
    chunk_metadata = _jsonable({**doc.metadata, "uri": doc.uri})
    return _Pending(doc.uri, sha, source_metadata, chunk_metadata, chunks)


def _prune(conn: psycopg.Connection[Any], paths: Sequence[Path], seen: set[str]) -> int:
    """Delete stored sources under the given directories that this run did not see."""
    deleted = 0
    for path in paths:
        if not path.is_dir():
            continue
        prefix = source_uri(path).rstrip(os.sep) + os.sep
        with conn.transaction():
            rows = conn.execute(
                "SELECT uri FROM themis.sources WHERE starts_with(uri, %s)", (prefix,)
            ).fetchall()
            gone = [uri for (uri,) in rows if uri not in seen]
            if gone:
                cur = conn.execute("DELETE FROM themis.sources WHERE uri = ANY(%s)", (gone,))
                deleted += cur.rowcount
                log.info("pruned %d sources under %s", cur.rowcount, prefix)
    return deleted


def reembed(
    conn: psycopg.Connection[Any],
    embedder: TextEmbedder,
    *,
    progress: bool = True,
    batch_size: int = 64,
) -> int:
    """Re-embed every document with ``embedder`` and record it in ``themis.corpus``.

    All in one transaction, so searches see either the old model's embeddings or the new
    one's, never a mix.  Writes to ``themis.documents`` (and ingests) wait until it ends;
    reads do not.  Returns the number of documents re-embedded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    register_vector(conn)
    count = 0
    with conn.transaction():
        # The corpus row first: an ingest holding it FOR SHARE finishes before we start, and
        # later ones see the new model (and stop) instead of writing old-model vectors.
        conn.execute(
            "INSERT INTO themis.corpus (embedding_model, dim) VALUES (%s, %s)"
            " ON CONFLICT (singleton) DO UPDATE SET embedding_model = EXCLUDED.embedding_model,"
            " dim = EXCLUDED.dim, updated_at = now()",
            (embedder.name, embedder.dim),
        )
        conn.execute("LOCK TABLE themis.documents IN SHARE ROW EXCLUSIVE MODE")
        conn.execute(
            "CREATE TEMP TABLE themis_reembed (id bigint PRIMARY KEY, embedding vector)"
            " ON COMMIT DROP"
        )
        total_row = conn.execute("SELECT count(*) FROM themis.documents").fetchone()
        total = total_row[0] if total_row else 0
        with (
            tqdm(total=total, desc="re-embedding", unit="chunk", disable=not progress) as bar,
            conn.cursor(name="themis_reembed_docs") as docs,
            conn.cursor() as cur,
        ):
            docs.execute("SELECT id, content FROM themis.documents ORDER BY id")
            while rows := docs.fetchmany(batch_size):
                vectors = _embed(embedder, [content for _, content in rows])
                with cur.copy(
                    "COPY themis_reembed (id, embedding) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["int8", "vector"])
                    for (doc_id, _), vector in zip(rows, vectors, strict=True):
                        copy.write_row((doc_id, vector))
                count += len(rows)
                bar.update(len(rows))
        conn.execute(
            "UPDATE themis.documents d SET embedding = r.embedding, updated_at = now()"
            " FROM themis_reembed r WHERE d.id = r.id"
        )
    log.info("re-embedded %d documents with %s (dim %d)", count, embedder.name, embedder.dim)
    return count
