"""Ingest: read files, chunk them, embed the chunks and store them in ``themis.documents``.

``readers`` and ``chunking`` are pure (no database, no model); ``ingest`` does the writing.
"""

from themis_pg.ingest.chunking import chunk_text
from themis_pg.ingest.ingest import (
    IngestReport,
    TextEmbedder,
    check_corpus,
    ingest_paths,
    normalise_text,
    reembed,
    text_sha256,
)
from themis_pg.ingest.readers import RawDocument, iter_files, read_file

__all__ = [
    "IngestReport",
    "RawDocument",
    "TextEmbedder",
    "check_corpus",
    "chunk_text",
    "ingest_paths",
    "iter_files",
    "normalise_text",
    "read_file",
    "reembed",
    "text_sha256",
]
