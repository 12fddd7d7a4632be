"""Index snapshots: the resident matrix in a local file, so a restarted worker reads only what
changed since it was written instead of every embedding.

A snapshot is one file: a JSON header (model, dimension, rows, the change watermark the rows
reflect and the change-log bookkeeping at that watermark), then the ids (int64) and the unit
vectors (float32) as raw arrays at page-aligned offsets.  It is written to a temporary name,
fsynced and renamed, so a reader sees a whole file or none.

A file alone is never trusted: after writing it, the worker records its random token in
``themis.index_snapshots`` with a synchronous commit, and a later start uses the file only if
the database still holds that token for the same model, dimension and watermark, and the
change log still reaches back to that watermark.  ``sql/schema_0003.sql`` says why this
catches another database, a restored one and changes a crash lost; anything else (a file cut
short, another format version) is caught by the header and the file size.  Whatever fails,
the worker falls back to the full load and writes a fresh snapshot.

Reading: ``restore`` reads the ids and hands the vectors over as a :class:`VectorFile`, which
the store reads itself (``load_rows``): the NumPy store into its host buffer with ``preadv``
on several threads (the GIL is released while the kernel copies), the GPU store piece by
piece into small pinned buffers that are copied to the device while the next piece is read
(cupy_store.py), which is what makes a warm start many times faster than the load from
PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from ..bus.queries import query

log = logging.getLogger(__name__)

MAGIC = b"THEMISIX"
FORMAT_VERSION = 1
ALIGN = 4096
READ_PIECE = 64 << 20   # bytes per preadv call
# bench/load.py on the H200 host: 1.5 GB from the page cache in 0.105 / 0.080 / 0.051 s
# on 4 / 8 / 16 threads
READ_THREADS = min(16, os.cpu_count() or 1)

Allocate = Callable[[tuple[int, ...], Any], npt.NDArray[Any]]


@dataclass(frozen=True)
class SnapshotMeta:
    """What the rows of a snapshot reflect.  ``seen`` and ``pending`` are the index's change
    bookkeeping at ``watermark`` (index.py), restored with the rows."""

    token: str
    model: str
    dim: int
    rows: int
    watermark: int
    seen: dict[int, int]
    pending: list[int]

    def header(self) -> bytes:
        body = asdict(self)
        body["seen"] = [[seq, xid] for seq, xid in sorted(self.seen.items())]
        body["format"] = FORMAT_VERSION
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_header(cls, raw: bytes) -> SnapshotMeta:
        body = json.loads(raw)
        if body.get("format") != FORMAT_VERSION:
            raise ValueError(f"snapshot format {body.get('format')!r}, not {FORMAT_VERSION}")
        return cls(token=str(body["token"]), model=str(body["model"]), dim=int(body["dim"]),
                   rows=int(body["rows"]), watermark=int(body["watermark"]),
                   seen={int(s): int(x) for s, x in body["seen"]},
                   pending=[int(d) for d in body["pending"]])


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _layout(header_len: int, rows: int, dim: int) -> tuple[int, int, int]:
    """Offsets of the ids and the vectors, and the file size."""
    ids_at = _aligned(len(MAGIC) + 8 + header_len)
    vectors_at = _aligned(ids_at + 8 * rows)
    return ids_at, vectors_at, vectors_at + 4 * rows * dim


def write_file(path: Path, meta: SnapshotMeta, ids: npt.NDArray[np.int64],
               vectors: npt.NDArray[np.float32]) -> None:
    """Write the snapshot atomically (temporary file, fsync, rename, fsync of the folder)."""
    if ids.shape != (meta.rows,) or vectors.shape != (meta.rows, meta.dim):
        raise ValueError("snapshot arrays do not match their header")
    header = meta.header()
    ids_at, vectors_at, size = _layout(len(header), meta.rows, meta.dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(MAGIC + len(header).to_bytes(8, "little") + header)
            f.seek(ids_at)
            # bytes views, no copy (a memoryview cast fails on an empty matrix)
            f.write(np.ascontiguousarray(ids, "<i8").reshape(-1).view(np.uint8).data)
            f.seek(vectors_at)
            f.write(np.ascontiguousarray(vectors, "<f4").reshape(-1).view(np.uint8).data)
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_into(fd: int, out: memoryview, offset: int, threads: int | None = None) -> None:
    """Fill ``out`` from ``offset``, in pieces on ``threads`` threads (READ_THREADS)."""
    pieces = [(a, min(a + READ_PIECE, len(out))) for a in range(0, len(out), READ_PIECE)]
    threads = READ_THREADS if threads is None else threads

    def read(piece: tuple[int, int]) -> None:
        a, b = piece
        while a < b:
            got = os.preadv(fd, [out[a:b]], offset + a)
            if got <= 0:
                raise ValueError("snapshot file ended early")
            a += got

    if threads <= 1 or len(pieces) <= 1:
        for piece in pieces:
            read(piece)
        return
    with ThreadPoolExecutor(min(threads, len(pieces))) as pool:
        list(pool.map(read, pieces))


def _read_file(path: Path, out: memoryview, offset: int, threads: int | None = None) -> None:
    """``_read_into`` on a descriptor of its own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _read_into(fd, out, offset, threads)
    finally:
        os.close(fd)


def read_header(path: Path) -> SnapshotMeta:
    """The header of the snapshot at ``path``; ValueError if it is not a whole snapshot."""
    with path.open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a themis index snapshot")
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < (64 << 20):
            raise ValueError("snapshot header length out of range")
        meta = SnapshotMeta.from_header(f.read(n))
        size = os.fstat(f.fileno()).st_size
    if size != _layout(n, meta.rows, meta.dim)[2]:
        raise ValueError(f"snapshot file is {size} bytes, its header says otherwise")
    return meta


@dataclass(frozen=True)
class VectorFile:
    """The vectors of a snapshot file, read when the store asks: a GPU store stages them
    through small pinned buffers piece by piece rather than holding the whole matrix in host
    memory first (cupy_store.py)."""

    path: Path
    offset: int  # of row 0, in bytes
    rows: int
    dim: int

    def read(self, out: npt.NDArray[np.float32], first: int = 0,
             threads: int | None = None) -> None:
        """Rows ``first`` .. ``first + len(out)`` into ``out`` (C-contiguous float32), on
        ``threads`` threads (READ_THREADS); OSError or ValueError if the file fails."""
        if out.dtype != np.float32 or out.shape[1:] != (self.dim,) or \
                not out.flags.c_contiguous or first < 0 or first + len(out) > self.rows:
            raise ValueError(f"cannot read rows {first}..{first + len(out)} of a {self.rows} "
                             f"x {self.dim} snapshot into a {out.dtype} array {out.shape}")
        if len(out):
            _read_file(self.path, out.data.cast("B"), self.offset + 4 * self.dim * first,
                       threads)


def read_ids(path: Path, meta: SnapshotMeta) -> tuple[npt.NDArray[np.int64], VectorFile]:
    """The ids of the snapshot at ``path`` (its header ``meta``), and its vectors to read."""
    ids_at, vectors_at, _ = _layout(len(meta.header()), meta.rows, meta.dim)
    ids = np.empty(meta.rows, np.int64)
    if meta.rows:
        _read_file(path, ids.data.cast("B"), ids_at)
    return ids, VectorFile(path, vectors_at, meta.rows, meta.dim)


def read_arrays(path: Path, meta: SnapshotMeta, allocate: Allocate
                ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The ids and vectors of the snapshot at ``path`` (its header ``meta``); the vectors in a
    buffer from ``allocate(shape, dtype)``."""
    ids, source = read_ids(path, meta)
    vectors = allocate((meta.rows, meta.dim), np.float32)
    source.read(vectors)
    return ids, vectors


def snapshot_key(database: tuple[str, int, str], model: str, dim: int, device: str) -> str:
    """A file name for this database (host, port, name), model and device: two databases, or
    two workers on two GPUs of one host, never write the same file."""
    host, port, dbname = database
    where = f"{host}|{port}|{dbname}|{model}|{dim}|{device}"
    digest = hashlib.sha256(where.encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dbname}-{model}")
    return f"{safe}-{dim}-{device.replace(':', '')}-{digest}"


class SnapshotStore:
    """The snapshot file of one worker's index and its token in the database."""

    def __init__(self, directory: Path, key: str) -> None:
        self.path = Path(directory) / f"{key}.snapshot"
        self.key = key
        self.host = os.uname().nodename
        self._writer: threading.Thread | None = None
        self.last_write_ms = 0.0

    def restore(self, cur: psycopg.Cursor[Any], model: str, dim: int, horizon: int
                ) -> tuple[SnapshotMeta, npt.NDArray[np.int64], VectorFile] | None:
        """The snapshot's ids and its vectors to read, if the database (``cur``, inside the
        load's transaction) vouches for it and the change log still reaches back to it;
        else None, logged."""
        if not self.path.is_file():
            return None
        try:
            meta = read_header(self.path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("index snapshot %s is unusable (%s); loading from the database",
                        self.path, exc)
            return None
        row = cur.execute(query("snapshot_token"), {"token": meta.token}).fetchone()
        reason = None
        if row is None:
            reason = "this database does not know its token"
        elif (str(row[0]), int(row[1]), int(row[2]), int(row[3])) != \
                (meta.model, meta.dim, meta.watermark, meta.rows):
            reason = "its token names another model, dimension or watermark"
        elif (meta.model, meta.dim) != (model, dim):
            reason = f"it holds {meta.model} (dim {meta.dim}), the index {model} (dim {dim})"
        elif meta.watermark < horizon:
            reason = "the change log was pruned past its watermark"
        if reason is not None:
            log.info("index snapshot %s not used: %s", self.path, reason)
            return None
        try:
            ids, vectors = read_ids(self.path, meta)
        except (OSError, ValueError) as exc:
            log.warning("index snapshot %s could not be read (%s)", self.path, exc)
            return None
        return meta, ids, vectors

    def save(self, connect: Callable[[], psycopg.Connection[Any]], meta: SnapshotMeta,
             ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> None:
        """Write the file, then record its token (synchronous commit: see the module doc)."""
        started = time.perf_counter()
        write_file(self.path, meta, ids, vectors)
        with connect() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute(query("record_snapshot"), {
                "token": meta.token, "host": self.host, "key": self.key, "model": meta.model,
                "dim": meta.dim, "watermark": str(meta.watermark), "rows": meta.rows})
        self.last_write_ms = (time.perf_counter() - started) * 1000
        log.info("wrote index snapshot %s (%d rows) in %.0f ms", self.path, meta.rows,
                 self.last_write_ms)

    def save_in_background(self, connect: Callable[[], psycopg.Connection[Any]],
                           meta: SnapshotMeta, ids: npt.NDArray[np.int64],
                           vectors: npt.NDArray[np.float32]) -> None:
        """``save`` on a thread (after a full load, so serving starts at once); a failure is
        logged: the next start then loads from the database again."""
        self.wait()

        def run() -> None:
            try:
                self.save(connect, meta, ids, vectors)
            except Exception as exc:
                log.warning("could not write the index snapshot %s: %s", self.path, exc)

        self._writer = threading.Thread(target=run, name="index-snapshot", daemon=True)
        self._writer.start()

    def wait(self) -> None:
        """Until a background write has ended."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None


def new_token() -> str:
    return str(uuid.uuid4())
